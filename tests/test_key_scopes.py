"""Keys that can be narrowed (SPEC §13): scopes, models, an expiry and a budget of their own, checked from the
key cache with no statement of their own; `lastUsedAt` written from memory, not per request."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.core import clock
from app.core.database import transaction
from app.tenants import last_used
from app.tenants.models import ApiKey
from tests.conftest import Api, Tenant, valid_body
from tests.test_get_statements import statements

OTHER_MODEL = "ltx-2-fast"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"allowed_models": ["ltx-2-19b", OTHER_MODEL], "key_cache_ttl_s": 3600.0}


async def make_key(api: Api, tenant: Tenant, **body: Any) -> dict[str, Any]:
    made = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json=body)
    assert made.status_code == 201, made.text
    return dict(made.json())


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


# What each route needs: the scopes that open it.
ROUTES: list[tuple[str, str, set[str]]] = [
    ("POST", "/api/v1/models/ltx-2-19b/generate", {"generate"}),
    ("POST", "/api/v1/models/ltx-2-19b/quote", {"generate"}),
    ("GET", "/api/v1/predictions", {"read"}),
    ("GET", "/api/v1/predictions/{id}", {"read"}),
    ("GET", "/api/v1/usage", {"read"}),
    ("GET", "/api/v1/webhook-deliveries", {"read", "manage"}),
    ("GET", "/api/v1/webhook-endpoint", {"manage"}),
    ("GET", "/api/v1/keys", {"manage"}),
    ("POST", "/api/v1/webhook-endpoint/rotate-secret", {"manage"}),
]
SCOPE_SETS = [
    ["generate"],
    ["read"],
    ["manage"],
    ["generate", "read"],
    ["read", "manage"],
    ["generate", "read", "manage"],
]


async def test_the_scope_matrix(api: Api) -> None:
    tenant = await api.tenant()
    prediction_id = (await tenant.submit()).json()["id"]
    for scopes in SCOPE_SETS:
        key = await make_key(api, tenant, scopes=scopes)
        assert key["scopes"] == scopes
        for method, path, needs in ROUTES:
            body = valid_body() if method == "POST" and "models" in path else None
            answer = await api.http.request(method, path.format(id=prediction_id), json=body, headers=bearer(key))
            if needs & set(scopes):
                assert answer.status_code in (200, 201), (scopes, method, path, answer.text)
            else:
                assert answer.status_code == 403, (scopes, method, path, answer.text)
                assert answer.json()["code"] == "insufficient_scope", answer.text


async def test_a_key_made_without_scopes_generates_and_reads(api: Api) -> None:
    tenant = await api.tenant()
    listed = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")).json()["data"]
    assert listed[0]["scopes"] == ["generate", "read"] and listed[0]["models"] is None
    assert (await tenant.submit()).status_code == 200
    assert (await tenant.get("/api/v1/keys")).json()["code"] == "insufficient_scope"


async def test_the_model_matrix(api: Api) -> None:
    tenant = await api.tenant()
    cases = [(None, {"ltx-2-19b", OTHER_MODEL}), (["ltx-2-19b"], {"ltx-2-19b"}), ([OTHER_MODEL], {OTHER_MODEL})]
    for models, allowed in cases:
        key = await make_key(api, tenant, **({"models": models} if models is not None else {}))
        for model in ("ltx-2-19b", OTHER_MODEL):
            quoted = await api.http.post(f"/api/v1/models/{model}/quote", json=valid_body(), headers=bearer(key))
            if model in allowed:
                assert quoted.status_code == 200, (models, model, quoted.text)
            else:
                assert quoted.status_code == 403 and quoted.json()["code"] == "model_not_allowed", quoted.text
        submitted = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=bearer(key))
        assert submitted.status_code == (200 if "ltx-2-19b" in allowed else 403), submitted.text
        # A model the gateway does not serve at all is still a 404, whatever the key.
        unknown = await api.http.post("/api/v1/models/nope/quote", json=valid_body(), headers=bearer(key))
        assert unknown.status_code == 404 and unknown.json()["code"] == "model_not_found"
    refused = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"models": ["not-served"]})
    assert refused.status_code == 422 and refused.json()["field"] == "models"


async def test_an_expired_key_is_refused_from_the_cache_too(api: Api) -> None:
    tenant = await api.tenant()
    expires = clock.now() + timedelta(hours=1)
    key = await make_key(api, tenant, expiresAt=clock.iso(expires))
    submitted = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=bearer(key))
    assert submitted.status_code == 200, submitted.text
    path = f"/api/v1/predictions/{submitted.json()['id']}"
    assert (await api.http.get(path, headers=bearer(key))).status_code == 200  # cached now
    clock.shift_to(expires + timedelta(seconds=1))
    for answer in (
        await api.http.get(path, headers=bearer(key)),
        await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=bearer(key)),
        await api.http.get("/api/v1/usage", headers=bearer(key)),
    ):
        assert answer.status_code == 401 and answer.json()["code"] == "api_key_expired", answer.text
    assert (await tenant.submit()).status_code == 200  # the tenant's other key goes on
    past = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"expiresAt": "2001-01-01T00:00:00Z"})
    assert past.status_code == 422 and past.json()["field"] == "expiresAt"


async def test_a_key_budget_of_its_own(api: Api) -> None:
    tenant = await api.tenant(budgetCents=1000)
    key = await make_key(api, tenant, budgetCents=10)
    first = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=bearer(key))
    assert first.status_code == 200, first.text
    second = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=bearer(key))
    assert second.status_code == 402 and second.json()["code"] == "budget_exceeded"
    assert (await tenant.submit()).status_code == 200  # the tenant's budget is far from spent


async def test_last_used_is_written_from_memory_in_one_flush(api: Api) -> None:
    tenant = await api.tenant()
    await last_used.flush(api.runtime.sessions)
    with statements(api.runtime) as seen:
        for _ in range(3):
            assert (await tenant.submit()).status_code == 200
    assert not [s for s in seen if "UPDATE API_KEYS" in s.upper()]
    assert last_used.pending() >= 1
    with statements(api.runtime) as seen:
        assert await last_used.flush(api.runtime.sessions) >= 1
    assert len([s for s in seen if "UPDATE API_KEYS" in s.upper()]) == 1
    listed = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")).json()["data"]
    assert listed[0]["lastUsedAt"] is not None
    async with transaction(api.runtime.sessions, readonly=True) as session:
        stored = await session.scalar(select(ApiKey.last_used_at).where(ApiKey.tenant_id == tenant.id))
    assert stored is not None and stored <= clock.now()


async def test_scoped_keys_cost_no_statement_more_than_todays(api: Api) -> None:
    """The scope, model and expiry checks read the cached key: a submit runs the same statements."""
    tenant = await api.tenant()
    narrow = await make_key(api, tenant, scopes=["generate"], models=["ltx-2-19b"], expiresAt="2999-01-01T00:00:00Z")
    counts = []
    for headers in (tenant.headers(), bearer(narrow)):
        for _ in range(2):  # the first fills the key cache
            await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=headers)
        with statements(api.runtime) as seen:
            answer = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=headers)
            assert answer.status_code == 200, answer.text
        counts.append(len(seen))
    assert counts[0] == counts[1]
