"""Final predictions from memory: the answer to GET for a prediction that can never change again.

A prediction is final once it is terminal (completed or failed) and was never rehosted: every write
to a prediction row is fenced on a status before terminal, and an output copy is only ever queued
while the prediction is still processing. A rehosted one is not final, since its links expire in
windows and retention deletes its files: it is read every time. What is kept is the body's JSON, keyed
by (tenant, id), so a hit costs neither a round trip nor a serialization; the budget headers come
from the tenant's balance snapshot (app/budgets/balances.py), never from here.
"""

from __future__ import annotations

from collections import OrderedDict

MAX_PREDICTIONS = 4096  # about 1 KB each


class FinalPredictions:
    def __init__(self, max_predictions: int = MAX_PREDICTIONS) -> None:
        self._bodies: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._max = max_predictions

    def get(self, tenant_id: str, prediction_id: str) -> bytes | None:
        key = (tenant_id, prediction_id)
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def put(self, tenant_id: str, prediction_id: str, body: bytes) -> None:
        key = (tenant_id, prediction_id)
        self._bodies[key] = body
        self._bodies.move_to_end(key)
        if len(self._bodies) > self._max:
            self._bodies.popitem(last=False)

    def clear(self) -> None:
        self._bodies.clear()

    def __len__(self) -> int:
        return len(self._bodies)


# One per process, like the key cache.
FINAL = FinalPredictions()
