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

MAX_PREDICTIONS = 4096
# Bounded by bytes too: a body's metadata may take 4 KB and its outputs list is the vendor's.
MAX_BYTES = 16 * 1024 * 1024


class FinalPredictions:
    def __init__(self, max_predictions: int = MAX_PREDICTIONS, max_bytes: int = MAX_BYTES) -> None:
        self._bodies: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._max = max_predictions
        self._max_bytes = max_bytes
        self._bytes = 0

    def get(self, tenant_id: str, prediction_id: str) -> bytes | None:
        key = (tenant_id, prediction_id)
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def put(self, tenant_id: str, prediction_id: str, body: bytes) -> None:
        key = (tenant_id, prediction_id)
        self._bytes -= len(self._bodies.pop(key, b""))
        if len(body) > self._max_bytes // 16:
            return  # so large that keeping it would push out many others: read it from the database
        self._bodies[key] = body
        self._bytes += len(body)
        while len(self._bodies) > self._max or self._bytes > self._max_bytes:
            self._bytes -= len(self._bodies.popitem(last=False)[1])

    def clear(self) -> None:
        self._bodies.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._bodies)


# One per process, like the key cache.
FINAL = FinalPredictions()
