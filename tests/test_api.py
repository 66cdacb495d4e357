"""Operator API, tenant auth, reads, pagination, errors and the OpenAPI document (in-process)."""

from __future__ import annotations

from typing import Any

import pytest

from app.tenants.service import hash_key
from app.upstream.simulator import SimState
from tests.conftest import ADMIN_TOKEN, Api, valid_body

PROBLEM = "application/problem+json"


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["code"] == code and body["detail"]
    assert "Traceback" not in response.text
    return body


async def test_create_tenant_defaults_and_flat_shape(api: Api) -> None:
    response = await api.admin("POST", "/admin/v1/tenants", json={"name": "acme"})
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "acme"
    assert body["budgetCents"] is None and body["budgetPeriod"] == "month"
    assert body["maxConcurrent"] is None and body["ratePerMinute"] is None and body["webhookUrl"] is None
    assert body["webhookSecret"].startswith("whsec_")
    assert body["id"] and body["createdAt"]
    shown = (await api.admin("GET", f"/admin/v1/tenants/{body['id']}")).json()
    assert "webhookSecret" not in shown
    listed = (await api.admin("GET", "/admin/v1/tenants")).json()["data"]
    assert [t["id"] for t in listed] == [body["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "a", "budgetCents": -1}, "budgetCents"),
        ({"name": "a", "budgetCents": "100"}, "budgetCents"),
        ({"name": "a", "budgetCents": 2**31}, "budgetCents"),
        ({"name": "a", "budgetPeriod": "year"}, "budgetPeriod"),
        ({"name": "a", "maxConcurrent": 0}, "maxConcurrent"),
        ({"name": "a", "ratePerMinute": 0}, "ratePerMinute"),
        ({"name": "a", "webhookUrl": "gopher://x"}, "webhookUrl"),
        ({"name": "a", "colour": "red"}, "colour"),
    ],
)
async def test_invalid_tenant_bodies(api: Api, body: dict[str, Any], field: str) -> None:
    response = await api.admin("POST", "/admin/v1/tenants", json=body)
    problem = assert_problem(response, 422, response.json()["code"])
    assert problem["field"] == field
    assert (await api.admin("GET", "/admin/v1/tenants")).json()["data"] == []


async def test_patch_and_delete_tenant(api: Api) -> None:
    tenant = await api.tenant(budgetCents=100)
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{tenant.id}", json={"budgetCents": None, "maxConcurrent": 3})
    assert patched.status_code == 200
    assert patched.json()["budgetCents"] is None and patched.json()["maxConcurrent"] == 3
    assert patched.json()["name"] == "acme"
    assert (await api.admin("DELETE", f"/admin/v1/tenants/{tenant.id}")).status_code == 204
    assert_problem(await api.admin("GET", f"/admin/v1/tenants/{tenant.id}"), 404, "tenant_not_found")
    assert_problem(await tenant.get("/api/v1/usage"), 401, "invalid_api_key")


@pytest.mark.parametrize("token", [None, "wrong", ADMIN_TOKEN + "x", ""])
async def test_admin_token_required(api: Api, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = await api.http.get("/admin/v1/tenants", headers=headers)
    assert_problem(response, 401, "invalid_admin_token")


async def test_keys_are_random_hashed_and_shown_once(api: Api) -> None:
    tenant = await api.tenant()
    created = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"name": "ci"})
    assert created.status_code == 201
    key = created.json()
    assert key["key"].startswith("vg_") and len(key["key"]) >= 3 + 32
    assert key["prefix"] == key["key"][:11]
    listed = (await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")).json()["data"]
    assert all("key" not in k for k in listed)
    assert len(listed) == 2
    from app.core.database import transaction
    from app.tenants.models import ApiKey

    async with transaction(api.runtime.sessions) as session:
        row = await session.get(ApiKey, key["id"])
        assert row is not None and row.key_hash == hash_key(key["key"]) and key["key"] not in row.key_hash


async def test_key_without_body_and_revocation(api: Api) -> None:
    tenant = await api.tenant()
    created = await api.http.post(
        f"/admin/v1/tenants/{tenant.id}/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert created.status_code == 201
    key = created.json()
    ok = await api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key['key']}"})
    assert ok.status_code == 200
    revoked = await api.admin("DELETE", f"/admin/v1/tenants/{tenant.id}/keys/{key['id']}")
    assert revoked.status_code == 200 and revoked.json()["revokedAt"]
    refused = await api.http.get("/api/v1/usage", headers={"Authorization": f"Bearer {key['key']}"})
    assert_problem(refused, 401, "invalid_api_key")
    assert (await tenant.get("/api/v1/usage")).status_code == 200  # the tenant's other key still works
    assert_problem(await api.admin("DELETE", f"/admin/v1/tenants/{tenant.id}/keys/key_nope"), 404, "key_not_found")


@pytest.mark.parametrize(
    "authorization", [None, "Bearer vg_unknownunknownunknown", "Bearer sk_live_x", "Basic dmc6eA==", "Bearer "]
)
async def test_tenant_auth_failures(api: Api, sim: SimState, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await api.http.post("/api/v1/models/ltx-2-19b/generate", json=valid_body(), headers=headers)
    assert_problem(response, 401, "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert sim.submits == 0


async def test_predictions_are_private_to_their_tenant(api: Api) -> None:
    alice = await api.tenant(name="alice")
    bob = await api.tenant(name="bob")
    pred = (await alice.submit()).json()
    assert (await alice.get(f"/api/v1/predictions/{pred['id']}")).status_code == 200
    assert_problem(await bob.get(f"/api/v1/predictions/{pred['id']}"), 404, "prediction_not_found")
    assert (await bob.get("/api/v1/predictions")).json()["data"] == []
    assert_problem(await alice.get("/api/v1/predictions/pred_doesnotexist"), 404, "prediction_not_found")


async def test_get_prediction_shape(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    submitted = (await tenant.submit(valid_body(metadata={"k": "v"}))).json()
    assert set(submitted) == {
        "id",
        "status",
        "statusUrl",
        "estimatedTime",
        "costCents",
        "createdAt",
        "metadata",
        "provider",
    }
    assert submitted["estimatedTime"] == "0-1s" and submitted["provider"] == "vibedream"
    got = (await tenant.get(f"/api/v1/predictions/{submitted['id']}")).json()
    assert set(got) == {
        "id",
        "modelId",
        "modelName",
        "status",
        "outputs",
        "error",
        "createdAt",
        "completedAt",
        "costCents",
        "metadata",
        "provider",
    }
    assert got["modelId"] == "ltx-2-19b" and got["status"] == "processing" and got["metadata"] == {"k": "v"}
    assert got["provider"] == "vibedream"
    assert sim.polls == 0  # reads are served from the database


async def test_list_is_newest_first_and_cursor_paginated(api: Api) -> None:
    tenant = await api.tenant()
    ids = [(await tenant.submit()).json()["id"] for _ in range(5)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await tenant.get("/api/v1/predictions", params=params)).json()
        seen += [p["id"] for p in page["data"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert pages == 3
    filtered = (await tenant.get("/api/v1/predictions", params={"status": "completed"})).json()
    assert filtered["data"] == []
    assert_problem(await tenant.get("/api/v1/predictions", params={"status": "done"}), 422, "validation_error")
    assert_problem(await tenant.get("/api/v1/predictions", params={"limit": 0}), 422, "validation_error")
    assert_problem(await tenant.get("/api/v1/predictions", params={"limit": 101}), 422, "validation_error")


async def test_usage_shape(api: Api) -> None:
    tenant = await api.tenant(budgetCents=100, budgetPeriod="day")
    await tenant.submit()
    usage = (await tenant.get("/api/v1/usage")).json()
    assert usage["budgetCents"] == 100 and usage["period"] == "day"
    assert usage["spentCents"] == 9 and usage["reservedCents"] == 0 and usage["remainingCents"] == 91
    assert usage["periodStart"].endswith("T00:00:00.000Z") and usage["periodEnd"].endswith("T00:00:00.000Z")


async def test_unknown_route_and_method_are_problems(api: Api) -> None:
    assert_problem(await api.http.get("/api/v1/nope"), 404, "not_found")
    assert_problem(await api.http.delete("/api/v1/usage"), 405, "method_not_allowed")


async def test_openapi_declares_bearer_on_protected_routes(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["TenantKey"]["scheme"].lower() == "bearer"
    assert schemes["AdminToken"]["scheme"].lower() == "bearer"
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if path.startswith("/api/v1/"):
                assert {"TenantKey": []} in operation.get("security", []), (method, path)
            if path.startswith("/admin/v1/"):
                assert {"AdminToken": []} in operation.get("security", []), (method, path)


async def test_request_id_is_echoed_or_generated(api: Api) -> None:
    given = await api.http.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = await api.http.get("/healthz")
    assert len(generated.headers["x-request-id"]) >= 16
    assert "x-vidgate-sandbox" not in generated.headers  # tests run with a vendor key: not sandbox


async def test_readyz_checks_database_and_migrations(api: Api) -> None:
    response = await api.http.get("/readyz")
    body = response.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["migrations"] == "ok"


async def test_logs_are_json_lines_with_ids_and_no_secrets(api: Api) -> None:
    import io
    import json
    import logging

    from app.core.logging import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        tenant = await api.tenant(webhookUrl="https://hooks.example.com/x?token=hush")
        response = await tenant.submit(valid_body(webhook="https://hooks.example.com/y?token=hush2"))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # One line for the submit: its access line names the prediction, the provider and the charge.
    access = [line for line in lines if line["msg"] == "request" and line["route"].endswith("/generate")]
    assert len(access) == 1 and access[0]["status"] == 200
    assert access[0]["tenant_id"] == tenant.id
    assert access[0]["request_id"] == response.headers["x-request-id"]
    assert access[0]["prediction_id"] == response.json()["id"]
    assert (access[0]["provider"], access[0]["cost_cents"]) == ("vibedream", response.json()["costCents"])
    assert not [line for line in lines if line["msg"] == "prediction submitted"]
    text = stream.getvalue()
    for secret in (tenant.key, ADMIN_TOKEN, "vendor-test-key", "hush", tenant.data["webhookSecret"]):
        assert secret not in text


async def test_json_answers_are_nosniff(api: Api) -> None:
    tenant = await api.tenant()
    for answer in (
        await tenant.get("/api/v1/usage"),
        await tenant.get("/api/v1/predictions/nope"),
        await api.admin("GET", "/admin/v1/tenants"),
        await api.http.get("/healthz"),
        await api.http.get("/api/v1/nope"),
    ):
        assert answer.headers["x-content-type-options"] == "nosniff", answer.url


async def test_problem_details_name_enum_values_not_their_reprs(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    answers = [
        await tenant.get("/api/v1/predictions", params={"status": "bogus"}),
        await tenant.submit(valid_body(webhookEventsFilter=["bogus"])),
        await tenant.get("/api/v1/webhook-deliveries", params={"status": "bogus"}),
    ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert "Status." not in answer.text and "<" not in answer.text, answer.text
    assert "'processing'" in answers[0].json()["detail"]


async def test_status_filters_take_only_the_statuses_a_caller_can_see(api: Api) -> None:
    tenant = await api.tenant()
    # A prediction still submitting is not shown to its tenant, so it is no filter either.
    for path, status in [
        ("/api/v1/predictions", "submitting"),
        ("/api/v1/predictions", "bogus"),
        ("/api/v1/webhook-deliveries", "failed"),
    ]:
        answer = await tenant.get(path, params={"status": status})
        assert answer.status_code == 422, (path, status, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
    for path, status in [("/api/v1/predictions", "processing"), ("/api/v1/webhook-deliveries", "dead")]:
        answer = await tenant.get(path, params={"status": status})
        assert answer.status_code == 200 and answer.json()["data"] == [], answer.text
    answer = await api.admin("GET", "/admin/v1/webhook-deliveries", params={"status": "succeeded"})
    assert answer.status_code == 200, answer.text
