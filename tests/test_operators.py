"""Operator tokens and the audit log (SPEC §13): a viewer reads every operator route and changes nothing,
every change through the operator API, the dashboard and a tenant's own API writes one audit row in its own
transaction, naming who made it, and no row holds a secret or a key."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from app.admin import service as admin_service
from app.audit.models import AuditEntry
from app.core.database import transaction
from app.runtime import Runtime
from app.tenants.schemas import TenantCreate
from tests.conftest import ADMIN_TOKEN, Api
from tests.test_dashboard import csrf_of

WRITE_METHODS = ("post", "put", "patch", "delete")


async def operator_token(api: Api, name: str, role: str) -> str:
    created = await api.admin("POST", "/admin/v1/operator-tokens", json={"name": name, "role": role})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["token"].startswith("vgo_") and body["role"] == role and body["name"] == name
    return str(body["token"])


def as_token(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit_count(runtime: Runtime) -> int:
    async with transaction(runtime.sessions, readonly=True) as session:
        return int(await session.scalar(select(func.count()).select_from(AuditEntry)) or 0)


async def operator_routes(api: Api) -> list[tuple[str, str]]:
    paths = (await api.http.get("/openapi.json")).json()["paths"]
    return [
        (method, path)
        for path, operations in paths.items()
        if path.startswith("/admin/v1/")
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]


def concrete(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids.get(m.group(1), "none"), path)


async def test_a_viewer_is_refused_on_every_write_route_and_changes_nothing(api: Api) -> None:
    tenant = await api.tenant()
    keys = await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")
    ids = {"tenantId": tenant.id, "keyId": keys.json()["data"][0]["id"]}
    viewer = await operator_token(api, "watcher", "viewer")
    before = await audit_count(api.runtime)
    writes = [(m, p) for m, p in await operator_routes(api) if m in WRITE_METHODS]
    assert len(writes) >= 8  # tenants, keys, secret, redeliver, operator tokens: the enumeration found them
    for method, path in writes:
        answer = await api.http.request(method.upper(), concrete(path, ids), json={}, headers=as_token(viewer))
        assert answer.status_code == 403, (method, path, answer.text)
        assert answer.json()["code"] == "forbidden", (method, path, answer.text)
    assert await audit_count(api.runtime) == before
    assert (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}")).status_code == 200  # not deleted
    assert (await tenant.submit()).status_code == 200  # its key still works


async def test_a_viewer_reads_every_operator_route(api: Api) -> None:
    tenant = await api.tenant()
    viewer = await operator_token(api, "reader", "viewer")
    reads = [p for m, p in await operator_routes(api) if m == "get"]
    for path in reads:
        answer = await api.http.get(concrete(path, {"tenantId": tenant.id}), headers=as_token(viewer))
        # A made-up id of another kind may be a 404; what matters is that reading is never refused.
        assert answer.status_code in (200, 404), (path, answer.status_code, answer.text)
    assert (await api.http.get("/admin/v1/audit", headers=as_token(viewer))).status_code == 200


async def test_operator_tokens_are_shown_once_stored_hashed_and_revocable(api: Api) -> None:
    token = await operator_token(api, "alice", "admin")
    listed = (await api.admin("GET", "/admin/v1/operator-tokens")).json()["data"]
    assert [t["name"] for t in listed] == ["alice"] and "token" not in listed[0]
    assert token.startswith(listed[0]["prefix"]) and token not in orjson.dumps(listed).decode()
    # An admin operator token changes things, as itself.
    made = await api.http.post("/admin/v1/tenants", json={"name": "by-alice"}, headers=as_token(token))
    assert made.status_code == 201, made.text
    duplicate = await api.admin("POST", "/admin/v1/operator-tokens", json={"name": "alice", "role": "viewer"})
    assert duplicate.status_code == 409
    revoked = await api.admin("DELETE", f"/admin/v1/operator-tokens/{listed[0]['id']}")
    assert revoked.status_code == 200 and revoked.json()["revokedAt"] is not None
    refused = await api.http.get("/admin/v1/tenants", headers=as_token(token))
    assert refused.status_code == 401 and refused.json()["code"] == "invalid_admin_token"
    assert (await api.http.get("/admin/v1/tenants", headers=as_token("vgo_made-up"))).status_code == 401


@pytest.mark.parametrize(
    "body", [{"name": "x", "role": "root"}, {"name": "two words", "role": "admin"}, {"name": "", "role": "viewer"}]
)
async def test_bad_operator_token_requests_are_422(api: Api, body: dict[str, Any]) -> None:
    assert (await api.admin("POST", "/admin/v1/operator-tokens", json=body)).status_code == 422


async def audit(api: Api, **params: str) -> list[dict[str, Any]]:
    answer = await api.admin("GET", "/admin/v1/audit", params=params)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


async def test_every_kind_of_operator_change_is_audited_with_its_actor(api: Api, receiver_factory: Any) -> None:
    alice = await operator_token(api, "alice", "admin")
    receiver = await receiver_factory()
    made = await api.http.post(
        "/admin/v1/tenants",
        json={"name": "audited", "webhookUrl": receiver.url},
        headers={**as_token(alice), "X-Request-Id": "req-create-1"},
    )
    tenant_id = made.json()["id"]
    await api.admin("PATCH", f"/admin/v1/tenants/{tenant_id}", json={"budgetCents": 700})
    key = (await api.admin("POST", f"/admin/v1/tenants/{tenant_id}/keys", json={"name": "k"})).json()
    await api.http.delete(f"/admin/v1/tenants/{tenant_id}/keys/{key['id']}", headers=as_token(alice))
    rotated = await api.admin("POST", f"/admin/v1/tenants/{tenant_id}/webhook-secret/rotate")
    await api.admin("DELETE", f"/admin/v1/tenants/{tenant_id}")

    rows = await audit(api)
    seen = [(r["action"], r["actor"], r["target"]) for r in reversed(rows)]
    assert seen == [
        ("operator_token.create", "admin", seen[0][2]),
        ("tenant.create", "operator:alice", f"tenant:{tenant_id}"),
        ("tenant.update", "admin", f"tenant:{tenant_id}"),
        ("key.create", "admin", f"key:{key['id']}"),
        ("key.revoke", "operator:alice", f"key:{key['id']}"),
        ("webhook_secret.rotate", "admin", f"tenant:{tenant_id}"),
        ("tenant.delete", "admin", f"tenant:{tenant_id}"),
    ]
    by_action = {r["action"]: r for r in rows}
    assert by_action["tenant.create"]["requestId"] == "req-create-1"
    update = by_action["tenant.update"]
    assert update["before"]["budgetCents"] is None and update["after"]["budgetCents"] == 700
    assert by_action["key.revoke"]["before"]["revokedAt"] is None and by_action["key.revoke"]["after"]["revokedAt"]
    assert by_action["key.create"]["after"]["prefix"] == key["prefix"]
    # Never a secret, a key or a token: only prefixes.
    dumped = orjson.dumps(rows).decode()
    for secret in (made.json()["webhookSecret"], rotated.json()["webhookSecret"], key["key"], alice):
        assert secret not in dumped
    assert "whsec_" not in dumped and "keyHash" not in dumped


async def test_the_audit_log_filters_and_pages(api: Api) -> None:
    tenants = [await api.tenant(name=f"t{i}") for i in range(3)]
    assert len(await audit(api, action="tenant.create")) == 3
    assert [r["target"] for r in await audit(api, target=f"tenant:{tenants[1].id}")] == [f"tenant:{tenants[1].id}"]
    assert len(await audit(api, actor="admin")) == 6  # three tenants, three keys
    assert await audit(api, actor="operator:nobody") == []
    assert await audit(api, **{"from": "2000-01-01", "to": "2000-01-02"}) == []
    assert len(await audit(api, **{"from": "2000-01-01"})) == 6
    # As the dashboard's form sends them: a blank filter is no filter, a padded one is read trimmed.
    assert len(await audit(api, target=" ", action="")) == 6
    assert len(await audit(api, action=" tenant.create ")) == 3
    pages: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "4", **({"cursor": cursor} if cursor else {})}
        page = (await api.admin("GET", "/admin/v1/audit", params=params)).json()
        pages += [r["id"] for r in page["data"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(pages) == 6 and pages == sorted(pages, reverse=True)
    bad = await api.admin("GET", "/admin/v1/audit", params={"from": "yesterday"})
    assert bad.status_code == 422 and bad.json()["field"] == "from"


async def test_a_change_rolled_back_leaves_no_audit_row(api: Api) -> None:
    before = await audit_count(api.runtime)
    with pytest.raises(RuntimeError):
        async with transaction(api.runtime.sessions) as session:
            await admin_service.create_tenant(session, api.runtime.settings, TenantCreate(name="gone"), "admin")
            raise RuntimeError("the change fails after its audit row was added")
    assert await audit_count(api.runtime) == before
    refused = await api.admin("POST", "/admin/v1/tenants", json={"name": "x", "webhookUrl": "ftp://nope"})
    assert refused.status_code == 422 and await audit_count(api.runtime) == before


async def dashboard_login(api: Api, token: str) -> str:
    page = await api.http.get("/dashboard/login")
    done = await api.http.post("/dashboard/login", data={"csrf": csrf_of(page), "token": token})
    assert done.status_code == 303, done.text
    return csrf_of(await api.http.get("/dashboard"))


async def test_dashboard_changes_are_audited_as_the_signed_in_operator(api: Api) -> None:
    bob = await operator_token(api, "bob", "admin")
    csrf = await dashboard_login(api, bob)
    made = await api.http.post("/dashboard/tenants", data={"csrf": csrf, "name": "from-the-dashboard"})
    assert made.status_code == 200, made.text
    rows = await audit(api, action="tenant.create")
    assert [(r["actor"], r["after"]["name"]) for r in rows] == [("operator:bob", "from-the-dashboard")]
    tenant_id = rows[0]["target"].removeprefix("tenant:")
    saved = await api.http.post(
        f"/dashboard/tenants/{tenant_id}/settings", data={"csrf": csrf, "name": "renamed", "budgetCents": "10"}
    )
    assert saved.status_code == 200, saved.text
    assert [r["actor"] for r in await audit(api, action="tenant.update")] == ["operator:bob"]


async def test_a_dashboard_viewer_sees_no_forms_and_is_refused_on_posts(api: Api) -> None:
    tenant = await api.tenant()
    viewer = await operator_token(api, "eve", "viewer")
    csrf = await dashboard_login(api, viewer)
    for path in ("/dashboard", f"/dashboard/tenants/{tenant.id}", "/dashboard/deliveries", "/dashboard/audit"):
        page = await api.http.get(path)
        assert page.status_code == 200, path
        posts = re.findall(r'<form[^>]*method="post"[^>]*action="([^"]+)"', page.text)
        assert posts == ["/dashboard/logout"], (path, posts)
        assert "operator:eve (viewer)" in page.text
    before = await audit_count(api.runtime)
    for action in (f"/dashboard/tenants/{tenant.id}/keys", f"/dashboard/tenants/{tenant.id}/webhook-secret/rotate"):
        refused = await api.http.post(action, data={"csrf": csrf})
        assert refused.status_code == 403 and "forbidden" in refused.text
    assert await audit_count(api.runtime) == before


async def test_revoking_an_operator_token_ends_its_dashboard_sessions(api: Api) -> None:
    token = await operator_token(api, "carol", "admin")
    await dashboard_login(api, token)
    token_id = (await api.admin("GET", "/admin/v1/operator-tokens")).json()["data"][0]["id"]
    assert (await api.admin("DELETE", f"/admin/v1/operator-tokens/{token_id}")).status_code == 200
    after = await api.http.get("/dashboard")
    assert after.status_code == 303 and after.headers["location"].startswith("/dashboard/login")


async def test_operator_token_names_are_one_word(api: Api) -> None:
    answer = await api.http.post(
        "/admin/v1/operator-tokens",
        json={"name": "a\u0000b", "role": "admin"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert answer.status_code == 422


async def test_the_dashboard_makes_keys_with_scopes_and_an_expiry(api: Api) -> None:
    tenant = await api.tenant()
    csrf = await dashboard_login(api, ADMIN_TOKEN)
    path = f"/dashboard/tenants/{tenant.id}/keys"
    made = await api.http.post(path, data={"csrf": csrf, "scope_manage": "1", "expiresAt": "2999-01-01T00:00"})
    assert made.status_code == 200 and 'id="new-key"' in made.text, made.text
    keys = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")).json()["data"]
    newest = max(keys, key=lambda k: k["id"])
    assert newest["scopes"] == ["manage"] and newest["expiresAt"] == "2999-01-01T00:00:00.000Z"
    past = await api.http.post(path, data={"csrf": csrf, "expiresAt": "2001-01-01T00:00"})
    assert past.status_code == 422 and "expiresAt" in past.text
    assert {r["actor"] for r in await audit(api, action="key.create")} == {"admin"}
