"""Once startup is done, what it loaded is frozen out of the collector's sight and the youngest generation is
collected less often (app/core/lifecycle.py, issue 25: about 5 % of a submit's CPU at 32 concurrent)."""

from __future__ import annotations

import gc

from app.core import lifecycle


def test_ready_heap_freezes_startup_and_collects_the_young_less_often() -> None:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    loaded = ["something startup made, still referenced"]
    assert any(loaded is o for o in gc.get_objects())
    try:
        lifecycle.ready_heap()
        assert gc.get_threshold() == (lifecycle.YOUNG_GENERATION_THRESHOLD, *thresholds[1:])
        assert thresholds[0] < lifecycle.YOUNG_GENERATION_THRESHOLD
        assert gc.get_freeze_count() > 0
        assert not any(loaded is o for o in gc.get_objects())  # frozen objects are in no generation
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
