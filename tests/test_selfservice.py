"""A tenant serving itself with a `manage` key (SPEC §13), end to end against real receivers: its endpoint,
a secret rotation whose `webhook.test` the receiver verifies with `standardwebhooks`, its deliveries with
attempts and redelivery, and keys never wider than the key that makes them. Every change is audited as
`key:{prefix}`."""

from __future__ import annotations

from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.conftest import Api, Receiver, Tenant, eventually, valid_body


async def manage_key(api: Api, tenant: Tenant, **body: Any) -> dict[str, str]:
    body.setdefault("scopes", ["generate", "read", "manage"])
    made = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json=body)
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['key']}", "prefix": made.json()["prefix"]}


def auth(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


async def audit_actions(api: Api, actor: str) -> list[str]:
    rows = (await api.admin("GET", "/admin/v1/audit", params={"actor": actor})).json()["data"]
    return [r["action"] for r in reversed(rows)]


async def test_endpoint_rotation_and_test_ping_end_to_end(live_api: Api, receiver_factory: Any) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant()
    old_secret = tenant.data["webhookSecret"]
    key = await manage_key(live_api, tenant)
    http = live_api.http

    assert (await http.get("/api/v1/webhook-endpoint", headers=auth(key))).json() == {
        "url": None,
        "eventsFilter": None,
        "disabledAt": None,
    }
    missing = await http.post("/api/v1/webhook-endpoint/test", headers=auth(key))
    assert missing.status_code == 409 and missing.json()["code"] == "webhook_endpoint_missing"
    set_url = await http.patch(
        "/api/v1/webhook-endpoint",
        json={"url": receiver.url, "eventsFilter": ["prediction.failed", "prediction.completed"]},
        headers=auth(key),
    )
    assert set_url.status_code == 200, set_url.text
    assert set_url.json()["eventsFilter"] == ["prediction.completed", "prediction.failed"]
    forbidden = await http.patch("/api/v1/webhook-endpoint", json={"url": "ftp://example.com/x"}, headers=auth(key))
    assert forbidden.status_code == 422 and forbidden.json()["field"] == "url"

    rotated = await http.post("/api/v1/webhook-endpoint/rotate-secret", headers=auth(key))
    assert rotated.status_code == 200, rotated.text
    new_secret = rotated.json()["webhookSecret"]
    assert new_secret.startswith("whsec_") and new_secret != old_secret

    tested = await http.post("/api/v1/webhook-endpoint/test", headers=auth(key))
    assert tested.status_code == 200 and tested.json()["delivered"] is True and tested.json()["status"] == 204
    item = await receiver.next()
    event = Webhook(new_secret).verify(item.body, item.headers)
    assert event["type"] == "webhook.test" and event["data"]["tenantId"] == tenant.id
    assert Webhook(old_secret).verify(item.body, item.headers) == event  # both sign during the grace
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "A" * 44).verify(item.body, item.headers)

    receiver.statuses.append(500)
    failed = (await http.post("/api/v1/webhook-endpoint/test", headers=auth(key))).json()
    assert failed == {"delivered": False, "status": 500, "error": None}

    assert await audit_actions(live_api, f"key:{key['prefix']}") == ["tenant.update", "webhook_secret.rotate"]
    # The secret never reaches the audit log.
    audit = (await live_api.admin("GET", "/admin/v1/audit")).text
    assert new_secret not in audit and old_secret not in audit


async def test_deliveries_with_attempts_and_redelivery(
    live_api: Api, worker: Any, receiver_factory: Any, settings_overrides: dict[str, Any]
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    key = await manage_key(live_api, tenant)
    other = await live_api.tenant(name="other", webhookUrl=receiver.url)
    submitted = await tenant.submit()
    assert submitted.status_code == 200, submitted.text
    first = await receiver.next()
    assert (await other.submit()).status_code == 200
    await receiver.next()

    listed = (await live_api.http.get("/api/v1/webhook-deliveries", headers=auth(key))).json()["data"]
    assert [d["id"] for d in listed] == [first.headers["webhook-id"]]  # its own only
    assert listed[0]["attemptLog"][0]["statusCode"] == 204

    redone = await live_api.http.post(f"/api/v1/webhook-deliveries/{listed[0]['id']}/redeliver", headers=auth(key))
    assert redone.status_code == 202, redone.text
    again = await receiver.next()
    assert again.headers["webhook-id"] == first.headers["webhook-id"]

    async def two_attempts() -> bool:
        rows = (await live_api.http.get("/api/v1/webhook-deliveries", headers=auth(key))).json()["data"]
        return len(rows[0]["attemptLog"]) == 2 and rows[0]["status"] == "succeeded"

    await eventually(two_attempts, what="the redelivery to be recorded")
    others = (await live_api.http.get("/api/v1/webhook-deliveries", headers=other.headers())).json()["data"]
    not_mine = await live_api.http.post(f"/api/v1/webhook-deliveries/{others[0]['id']}/redeliver", headers=auth(key))
    assert not_mine.status_code == 404
    assert "webhook_delivery.redeliver" in await audit_actions(live_api, f"key:{key['prefix']}")


async def test_the_tenant_endpoint_filter_applies_to_its_events(
    live_api: Api, worker: Any, receiver_factory: Any
) -> None:
    receiver: Receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    key = await manage_key(live_api, tenant)
    patched = await live_api.http.patch(
        "/api/v1/webhook-endpoint", json={"eventsFilter": ["prediction.failed"]}, headers=auth(key)
    )
    assert patched.status_code == 200, patched.text
    done = await tenant.submit(valid_body(), Prefer="wait=10")
    assert done.json()["status"] == "completed"
    ping = await live_api.http.post("/api/v1/webhook-endpoint/test", headers=auth(key))
    assert ping.json()["delivered"] is True
    # The ping went through; the completed event was filtered out, so the ping is the first arrival.
    assert '"webhook.test"' in (await receiver.next()).body
    rows = (await live_api.http.get("/api/v1/webhook-deliveries", headers=auth(key))).json()["data"]
    assert rows == []


async def test_keys_are_never_wider_than_their_maker(api: Api) -> None:
    tenant = await api.tenant()
    maker = await manage_key(api, tenant, models=["ltx-2-19b"], budgetCents=100)
    http = api.http

    made = await http.post("/api/v1/keys", json={"name": "ci", "scopes": ["generate"]}, headers=auth(maker))
    assert made.status_code == 201, made.text
    child = made.json()
    # What it does not name it inherits: the maker's models and budget.
    assert child["scopes"] == ["generate"] and child["models"] == ["ltx-2-19b"] and child["budgetCents"] == 100
    for wider in (
        {"scopes": ["generate", "manage", "read"], "budgetCents": 200},
        {"models": None},
        {"budgetCents": None},
        {"budgetCents": 101},
    ):
        refused = await http.post("/api/v1/keys", json=wider, headers=auth(maker))
        assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope", (wider, refused.text)

    narrow = {"Authorization": f"Bearer {child['key']}"}
    assert (await http.post("/api/v1/keys", json={}, headers=narrow)).json()["code"] == "insufficient_scope"
    submitted = await http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=narrow)
    assert submitted.status_code == 200, submitted.text

    listed = (await http.get("/api/v1/keys", headers=auth(maker))).json()["data"]
    assert {k["id"] for k in listed} >= {child["id"]} and all("key" not in k for k in listed)
    # The operator's full key is wider than the maker: a narrow key cannot take it out of service.
    full = next(k for k in listed if k["models"] is None)
    assert (await http.delete(f"/api/v1/keys/{full['id']}", headers=auth(maker))).status_code == 403
    revoked = await http.delete(f"/api/v1/keys/{child['id']}", headers=auth(maker))
    assert revoked.status_code == 200 and revoked.json()["revokedAt"] is not None
    gone = await http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=narrow)
    assert gone.status_code == 401
    assert await audit_actions(api, f"key:{maker['prefix']}") == ["key.create", "key.revoke"]
    other = await api.tenant(name="other")
    other_key = (await api.admin("GET", f"/admin/v1/tenants/{other.id}/keys")).json()["data"][0]
    assert (await http.delete(f"/api/v1/keys/{other_key['id']}", headers=auth(maker))).status_code == 404
