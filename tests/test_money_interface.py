"""Money moves in app/budgets only, by conditional SQL (issue 24 C3): the scope strings are built in one
place, no other domain writes a prediction's charge or slot, a prediction is charged once however many
confirms reach it, and a maxConcurrent set later adds the slots taken to the tenant's count instead of
writing an absolute value over it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from sqlalchemy import event, select

from app.budgets import movements as budgets_movements
from app.budgets import service as budgets_service
from app.budgets.models import LedgerEntry
from app.budgets.scopes import tenant_scope
from app.core.database import transaction
from app.predictions import service as predictions_service
from app.predictions import writer as predictions_writer
from app.predictions.models import Prediction
from app.tenants.models import Tenant as TenantRow
from app.upstream.simulator import SimState
from tests.conftest import Api
from tests.test_money_batches import balance, confirm_jobs, held

APP = Path(__file__).resolve().parent.parent / "app"
SCOPES = APP / "budgets" / "scopes.py"
MONEY_COLUMNS = {"charged_cents", "holds_slot"}


def _sources() -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(APP.rglob("*.py"))]


def test_scope_strings_are_built_in_one_place() -> None:
    built = []
    for path, tree in _sources():
        if path == SCOPES:
            continue
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
                text = str(node.values[0].value)
            if text is not None and (text.startswith("tenant:") or text.startswith("key:")):
                built.append(f"{path.relative_to(APP.parent)}:{node.lineno}")
    assert built == [], "scope strings built outside app/budgets/scopes.py"


def test_only_budgets_writes_a_predictions_charge_or_slot() -> None:
    writes = []
    for path, tree in _sources():
        if path.is_relative_to(APP / "budgets") or path.is_relative_to(APP / "migrations"):
            continue
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.keyword) and node.arg:
                names = [node.arg]
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.attr for t in targets if isinstance(t, ast.Attribute)]
            elif isinstance(node, ast.Dict):
                names = [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "set_committed_value":
                names = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if MONEY_COLUMNS & set(names):
                writes.append(f"{path.relative_to(APP.parent)}:{getattr(node, 'lineno', '?')}")
    assert writes == [], "a prediction's money columns written outside app/budgets"


async def test_a_prediction_is_charged_once_whoever_settles_it(api: Api, sim: SimState) -> None:
    """Two settles of one prediction (a confirm retried after its first COMMIT landed, or applied twice
    by a bug): the charge, the ledger and the counters move once."""
    rt = api.runtime
    tenant = await api.tenant(budgetCents=1_000)
    batch = await held(rt, tenant, 1, idempotent=False)
    (job,) = confirm_jobs(batch, 11)
    async with transaction(rt.sessions) as session:
        (confirmed,) = await predictions_writer.apply(rt, session, [job])
    assert confirmed["costCents"] == 11
    estimate = job.prediction.estimate_cents
    async with transaction(rt.sessions) as session:
        tenant_row = await session.get(TenantRow, tenant.id)
        prediction = await session.get(Prediction, confirmed["id"])
        assert tenant_row is not None and prediction is not None
        again = budgets_movements.Settle(tenant_row, predictions_service.hold_of(prediction), estimate, 30, prediction)
        assert await budgets_movements.settle_many(session, [again]) == []
    assert await balance(rt, tenant) == (11, 0)
    async with transaction(rt.sessions) as session:
        row = await session.get(Prediction, confirmed["id"], populate_existing=True)
        assert row is not None and row.charged_cents == 11
        kinds = list(
            await session.scalars(select(LedgerEntry.kind).where(LedgerEntry.prediction_id == confirmed["id"]))
        )
        assert sorted(kinds) == ["reserve", "settle"]
        assert await budgets_service.verify_ledger(session) == []


async def test_max_concurrent_set_later_adds_the_slots_taken(api: Api, sim: SimState) -> None:
    """The slots of predictions already in flight are added to the tenant's count by one arithmetic UPDATE
    (no absolute value written over what concurrent submits and ends counted)."""
    rt = api.runtime
    tenant = await api.tenant()
    for _ in range(2):
        assert (await tenant.submit()).status_code == 200
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(rt.engine.sync_engine, "before_cursor_execute", record)
    try:
        patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"maxConcurrent": 2})
    finally:
        event.remove(rt.engine.sync_engine, "before_cursor_execute", record)
    assert patched.status_code == 200, patched.text
    writes = [s for s in seen if s.startswith("UPDATE tenants") and "in_flight=" in s.replace(" = ", "=")]
    assert writes, seen
    assert all("in_flight=(tenants.in_flight +" in w.replace(" = ", "=") for w in writes), writes
    async with transaction(rt.sessions) as session:
        row = await session.get(TenantRow, tenant.id)
        assert row is not None and row.in_flight == 2
        slots = await session.scalars(select(Prediction.holds_slot).where(Prediction.tenant_id == tenant.id))
        assert list(slots) == [True, True]
    assert tenant_scope(tenant.id) == f"tenant:{tenant.id}"
