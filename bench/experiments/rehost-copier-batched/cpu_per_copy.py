"""CPU per output copy, robust to other load (process CPU time, not wall): N copy jobs of the sandbox
clip, copied by the copier in rounds of VIDGATE_OUTPUT_COPY_CONCURRENCY, on the tests' fixtures
(in-process simulator, so its CPU is counted too, alike on both sides). Not a test: it asserts
nothing about speed. Copy it into tests/ of the tree to measure and run

    CPU_C=8 VIDGATE_TEST_DB=postgresql .venv/bin/python -m pytest -q -p no:xdist -s tests/cpu_per_copy.py
"""

from __future__ import annotations

import os
import time

from sqlalchemy import func, select

from app.core.database import transaction
from app.outputs.models import OutputCopy
from tests.test_outputs import Setup
from tests.test_outputs import settings_overrides as settings_overrides
from tests.test_outputs import setup as setup

N = int(os.environ.get("CPU_N", "400"))
C = int(os.environ.get("CPU_C", "8"))


async def test_cpu_per_copy(setup: Setup, sim_url: str) -> None:
    setup.runtime.settings.output_copy_concurrency = C
    for i in range(N):
        await setup.prediction([f"{sim_url}/sandbox/outputs/{i}.mp4"])
    cpu, wall = time.process_time(), time.perf_counter()
    while await setup.copier.run_round():
        pass
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        stored = await session.scalar(select(func.count()).select_from(OutputCopy).where(OutputCopy.status == "stored"))
    assert stored == N
    print(f"\nCPUCOPY C={C} N={N}: {cpu / N * 1000:.2f} ms CPU per copy, {N / wall:.0f} copies/s wall")
