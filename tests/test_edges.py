"""No input answers 5xx (SPEC §2): what the gateway or its database cannot take is refused with a 4xx
problem naming the field, and nothing is stored. Each case here was a 500 (or a body read to the end)
before the shared types in app/core/types.py and the request guard in app/core/guard.py."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import uvicorn

from app.main import create_app
from app.runtime import Runtime
from app.upstream.simulator import SimState
from tests.conftest import Api, Tenant, valid_body

BAD_TEXT = {
    "nul": "a\x00b",
    "control": "a\x07b",
    "escape": "a\x1bb",
    "c1": "a\x85b",
}


def _raw_json(body: dict[str, Any], field: str, value_json: str) -> bytes:
    """A JSON body whose `field` holds `value_json` verbatim (e.g. a lone surrogate escape)."""
    marker = "__RAW__"
    text = orjson.dumps({**body, field: marker}).decode()
    return text.replace(f'"{marker}"', value_json).encode()


def assert_problem(response: httpx.Response, field: str, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["field"] == field, problem
    return problem


async def tenant_count(api: Api) -> int:
    listed = await api.admin("GET", "/admin/v1/tenants")
    assert listed.status_code == 200, listed.text
    return len(listed.json()["data"])


async def prediction_count(tenant: Tenant) -> int:
    listed = await tenant.get("/api/v1/predictions", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    return len(listed.json()["data"])


async def post_raw(tenant: Tenant, content: bytes) -> httpx.Response:
    headers = tenant.headers(**{"Content-Type": "application/json"})
    return await tenant.api.http.post("/api/v1/models/ltx-2-19b/generate", content=content, headers=headers)


# ---------------------------------------------------------------- what the fuzzer found


@pytest.mark.parametrize("path", ["/api/v1/predictions", "/api/v1/webhook-deliveries"])
async def test_cursor_with_nul_is_refused(api: Api, path: str) -> None:
    tenant = await api.tenant()
    assert_problem(await tenant.get(path, params={"cursor": "\x00"}), "cursor")


async def test_operator_cursor_and_tenant_filter_with_nul_are_refused(api: Api) -> None:
    for param in ("cursor", "tenant"):
        response = await api.admin("GET", "/admin/v1/webhook-deliveries", params={param: "a\x00"})
        assert_problem(response, param)


@pytest.mark.parametrize("field", ["ratePerMinute", "maxConcurrent", "budgetCents"])
@pytest.mark.parametrize("value", [2**31, 2**63, 2**64, -(2**63) - 1, 10**30])
async def test_integers_beyond_the_column_are_refused(api: Api, field: str, value: int) -> None:
    before = await tenant_count(api)
    assert_problem(await api.admin("POST", "/admin/v1/tenants", json={"name": "x", field: value}), field)
    existing = await api.tenant()
    patched = await api.admin("PATCH", f"/admin/v1/tenants/{existing.id}", json={field: value})
    assert_problem(patched, field)
    assert await tenant_count(api) == before + 1
    current = await api.admin("GET", f"/admin/v1/tenants/{existing.id}")
    assert current.json()[field] is None


async def test_the_largest_32_bit_values_are_taken(api: Api) -> None:
    body = {"name": "big", "ratePerMinute": 2**31 - 1, "maxConcurrent": 2**31 - 1, "budgetCents": 2**31 - 1}
    created = await api.admin("POST", "/admin/v1/tenants", json=body)
    assert created.status_code == 201, created.text
    assert {k: created.json()[k] for k in body} == body


async def test_key_budget_beyond_the_column_is_refused(api: Api) -> None:
    tenant = await api.tenant()
    response = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"budgetCents": 2**40})
    assert_problem(response, "budgetCents")


@pytest.mark.parametrize(
    "metadata",
    [
        {"n": 2**64},
        {"n": 2**63},
        {"n": -(2**63) - 1},
        {"deep": [[[[{"n": 2**70}]]]]},
    ],
)
async def test_metadata_integers_beyond_64_bits_are_refused(api: Api, sim: SimState, metadata: Any) -> None:
    tenant = await api.tenant()
    assert_problem(await tenant.submit(valid_body(metadata=metadata)), "metadata")
    assert sim.submits == 0
    assert await prediction_count(tenant) == 0


async def test_metadata_64_bit_bounds_are_taken(api: Api) -> None:
    tenant = await api.tenant()
    metadata = {"max": 2**63 - 1, "min": -(2**63)}
    response = await tenant.submit(valid_body(metadata=metadata))
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == metadata


@pytest.mark.parametrize("depth", [33, 300])
async def test_deeply_nested_metadata_is_refused(api: Api, sim: SimState, depth: int) -> None:
    tenant = await api.tenant()
    nested = "[" * depth + "]" * depth  # 300 levels fit in well under 2 KB
    content = _raw_json(valid_body(), "metadata", '{"a":' + nested + "}")
    response = await post_raw(tenant, content)
    assert_problem(response, "metadata")
    assert sim.submits == 0


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_metadata_numbers_json_cannot_hold_are_refused(api: Api, sim: SimState, literal: str) -> None:
    tenant = await api.tenant()
    content = _raw_json(valid_body(), "metadata", '{"x":' + literal + "}")
    response = await post_raw(tenant, content)
    assert_problem(response, "metadata")
    assert sim.submits == 0


# ---------------------------------------------------------------- text no column can hold


@pytest.mark.parametrize("value", [*BAD_TEXT.values(), "\ud800"], ids=[*BAD_TEXT, "surrogate"])
@pytest.mark.parametrize("field", ["name", "webhookUrl"])
async def test_operator_text_fields_refuse_unstorable_text(api: Api, field: str, value: str) -> None:
    before = await tenant_count(api)
    body = {"name": "x", field: "https://hooks.example.com/" + value if field == "webhookUrl" else value}
    for method, path in [("POST", "/admin/v1/tenants"), ("PATCH", f"/admin/v1/tenants/{(await api.tenant()).id}")]:
        content = _raw_json(body, field, orjson.dumps(body[field]).decode() if value != "\ud800" else '"\\ud800"')
        response = await api.admin(method, path, content=content, headers={"content-type": "application/json"})
        assert_problem(response, field)
    assert await tenant_count(api) == before + 1


@pytest.mark.parametrize("value_json", ['"\\u0000"', '"\\ud800"', '"a\\u0001"'])
async def test_key_name_refuses_unstorable_text(api: Api, value_json: str) -> None:
    tenant = await api.tenant()
    content = _raw_json({}, "name", value_json)
    response = await api.admin(
        "POST", f"/admin/v1/tenants/{tenant.id}/keys", content=content, headers={"content-type": "application/json"}
    )
    assert_problem(response, "name")
    keys = await api.admin("GET", f"/admin/v1/tenants/{tenant.id}/keys")
    assert len(keys.json()["data"]) == 1


@pytest.mark.parametrize(
    ("field", "value_json"),
    [
        ("prompt", '"a cat\\u0000"'),
        ("prompt", '"a cat\\ud800"'),
        ("prompt", '"a cat\\udfff waves"'),
        ("prompt", '"a cat\\u0007"'),
        ("image", '"https://example.com/\\u0000.png"'),
        ("image", '"https://example.com/\\ud800.png"'),
        ("image", '"https://example.com/a\\n.png"'),
        ("webhook", '"https://hooks.example.com/\\u0000"'),
        ("webhook", '"https://hooks.example.com/\\udbff"'),
        ("metadata", '{"k":"\\u0000"}'),
        ("metadata", '{"\\u0000":"v"}'),
        ("metadata", '{"k":"\\ud800"}'),
        ("metadata", '{"k":["\\udc00"]}'),
    ],
)
async def test_submit_text_fields_refuse_unstorable_text(api: Api, sim: SimState, field: str, value_json: str) -> None:
    tenant = await api.tenant()
    content = _raw_json(valid_body(), field, value_json)
    response = await post_raw(tenant, content)
    assert_problem(response, field)
    assert sim.submits == 0
    assert await prediction_count(tenant) == 0


async def test_prompt_may_hold_newlines_and_tabs(api: Api) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(valid_body(prompt="line one\n\tline two\r\n", metadata={"note": "a\nb"}))
    assert response.status_code == 200, response.text


# ---------------------------------------------------------------- path, query and header parameters


@pytest.mark.parametrize("value", ["\x00", "a\x01", "a\x7f"], ids=["nul", "control", "del"])
async def test_operator_path_parameters_refuse_control_characters(api: Api, value: str) -> None:
    tenant = await api.tenant()
    quoted = quote(value)
    cases = [
        ("GET", f"/admin/v1/tenants/{quoted}", "tenantId"),
        ("PATCH", f"/admin/v1/tenants/{quoted}", "tenantId"),
        ("DELETE", f"/admin/v1/tenants/{quoted}", "tenantId"),
        ("GET", f"/admin/v1/tenants/{quoted}/usage", "tenantId"),
        ("POST", f"/admin/v1/tenants/{quoted}/keys", "tenantId"),
        ("GET", f"/admin/v1/tenants/{quoted}/keys", "tenantId"),
        ("DELETE", f"/admin/v1/tenants/{tenant.id}/keys/{quoted}", "keyId"),
        ("POST", f"/admin/v1/tenants/{quoted}/webhook-secret/rotate", "tenantId"),
        ("GET", f"/admin/v1/webhook-deliveries/{quoted}", "deliveryId"),
        ("POST", f"/admin/v1/webhook-deliveries/{quoted}/redeliver", "deliveryId"),
    ]
    for method, path, field in cases:
        kwargs: dict[str, Any] = {"json": {}} if method in ("PATCH", "POST") else {}
        assert_problem(await api.admin(method, path, **kwargs), field)


@pytest.mark.parametrize("value", ["\x00", "a\x01"], ids=["nul", "control"])
async def test_tenant_path_parameters_refuse_control_characters(api: Api, sim: SimState, value: str) -> None:
    tenant = await api.tenant()
    quoted = quote(value)
    assert_problem(await tenant.get(f"/api/v1/predictions/{quoted}"), "predictionId")
    assert_problem(await tenant.get(f"/api/v1/webhook-deliveries/{quoted}"), "deliveryId")
    response = await api.http.post(f"/api/v1/models/{quoted}/generate", json=valid_body(), headers=tenant.headers())
    assert_problem(response, "modelId")
    assert sim.submits == 0


async def test_usage_report_dates_at_the_calendar_edge_are_refused(api: Api) -> None:
    for params, field in [
        ({"to": "9999-12-31"}, "to"),
        ({"from": "0001-01-01T00:00:00+01:00"}, "from"),
        ({"from": "\x00"}, "from"),
    ]:
        assert_problem(await api.admin("GET", "/admin/v1/usage", params=params), field)


@pytest.mark.parametrize("value", ["k\x00", "k\x01", "k\x7f"], ids=["nul", "control", "del"])
async def test_idempotency_key_with_control_characters_is_refused(api: Api, sim: SimState, value: str) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(**{"Idempotency-Key": value})
    assert_problem(response, "Idempotency-Key")
    assert sim.submits == 0


async def test_absurdly_long_header_is_refused(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    response = await tenant.submit(**{"X-Padding": "a" * 70_000})
    assert_problem(response, "x-padding", status=431)
    assert response.json()["code"] == "headers_too_large"
    assert sim.submits == 0


async def test_absurdly_long_api_key_is_refused_without_a_5xx(api: Api) -> None:
    response = await api.http.get("/api/v1/usage", headers={"Authorization": "Bearer vg_" + "a" * 70_000})
    assert_problem(response, "authorization", status=431)


# ---------------------------------------------------------------- one webhook-URL check


async def test_operator_webhook_url_goes_through_the_same_check_as_a_submit(api: Api, sim: SimState) -> None:
    api.runtime.settings.webhook_allow_private = False
    tenant = await api.tenant()
    private = "http://169.254.169.254/latest"
    for method, path in [("POST", "/admin/v1/tenants"), ("PATCH", f"/admin/v1/tenants/{tenant.id}")]:
        response = await api.admin(method, path, json={"name": "x", "webhookUrl": private})
        problem = assert_problem(response, "webhookUrl")
        assert problem["code"] == "webhook_url_forbidden"
    problem = assert_problem(await tenant.submit(valid_body(webhook=private)), "webhook")
    assert problem["code"] == "webhook_url_forbidden"
    assert sim.submits == 0


# ---------------------------------------------------------------- the 64 KiB body limit

LIMIT = 64 * 1024
BIG = 8 * 1024 * 1024


async def test_body_at_the_limit_is_read(api: Api) -> None:
    tenant = await api.tenant()
    body = orjson.dumps(valid_body())
    response = await post_raw(tenant, body + b" " * (LIMIT - len(body)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("with_key", [True, False])
async def test_body_over_the_limit_is_413_from_content_length(api: Api, sim: SimState, with_key: bool) -> None:
    tenant = await api.tenant()
    body = orjson.dumps(valid_body())
    headers = tenant.headers(**{"Content-Type": "application/json"}) if with_key else {}
    response = await api.http.post(
        "/api/v1/models/ltx-2-19b/generate", content=body + b" " * (LIMIT + 1 - len(body)), headers=headers
    )
    problem = assert_problem(response, "body", status=413)
    assert problem["code"] == "payload_too_large" and problem["limit"] == LIMIT
    assert response.headers["connection"] == "close"
    assert sim.submits == 0


async def test_chunked_body_over_the_limit_is_413(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    pulled: list[int] = []

    async def chunks() -> Any:
        pulled.append(0)
        while pulled[-1] < BIG:
            pulled[-1] += 16 * 1024
            yield b" " * (16 * 1024)

    for path, headers in [
        ("/admin/v1/tenants", {"Content-Type": "application/json"}),
        ("/api/v1/models/ltx-2-19b/generate", tenant.headers()),
    ]:
        assert_problem(await api.http.post(path, content=chunks(), headers=headers), "body", status=413)
        assert pulled[-1] <= LIMIT + 16 * 1024  # the guard stopped pulling one chunk past the limit
    assert sim.submits == 0


class ByteCounter:
    """An ASGI wrapper counting the request-body bytes the server handed to the application."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.consumed = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.consumed += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture
async def real_server(runtime: Runtime) -> AsyncIterator[tuple[int, ByteCounter]]:
    """The gateway behind a real uvicorn (httptools, as `vidgate serve` runs it) on a loopback port whose
    connections have a small receive buffer, so bytes the gateway does not read stay with the client."""
    counter = ByteCounter(create_app(runtime.settings, runtime))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # inherited by accepted sockets
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(counter, http="httptools", lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield listener.getsockname()[1], counter
    finally:
        server.should_exit = True
        await task
        listener.close()


async def _send_big_body(port: int, head: bytes, framed: Callable[[bytes], bytes], first: int) -> tuple[bytes, int]:
    """Send `head` and the first `first` bytes of an 8 MB body, read the answer to the end, then try to send
    the rest; return the answer and how many body bytes the client got into the socket in all."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(head + (framed(b" " * first) if first else b""))
        await writer.drain()
        # The answer comes while the body is still unsent, and the server closes the connection after it.
        answer = await asyncio.wait_for(reader.read(), 30)
        sent = first
        chunk = b" " * (64 * 1024)
        with contextlib.suppress(ConnectionError):
            while sent < BIG:
                writer.write(framed(chunk))
                await writer.drain()
                sent += len(chunk)
        return answer, sent
    finally:
        writer.close()  # also when the answer never came, so the server's request ends with the test


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_real_server_does_not_read_an_8_mb_body(
    real_server: tuple[int, ByteCounter], sim: SimState, framing: str
) -> None:
    port, counter = real_server
    head = b"POST /api/v1/models/ltx-2-19b/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
    if framing == "chunked":
        # One byte past the limit, sent before the answer: the guard answers on the chunk that passes it.
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        answer, sent = await _send_big_body(port, head, lambda c: b"%x\r\n%s\r\n" % (len(c), c), LIMIT + 1)
    else:
        head += b"Content-Length: %d\r\n\r\n" % BIG
        answer, sent = await _send_big_body(port, head, lambda c: c, 0)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer[:300]
    assert orjson.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "payload_too_large"
    # No API key was sent; the application read nothing of a body announced too large, and no more than
    # the chunk that passed the limit of a chunked one; the connection was closed on the rest.
    assert counter.consumed == (0 if framing == "content-length" else LIMIT + 1)
    assert sent < BIG
    print(f"{framing}: the client got {sent} of {BIG} body bytes out; the application read {counter.consumed}")
    assert sim.submits == 0


async def test_json_nested_past_the_parser_limit_is_a_4xx(api: Api, sim: SimState) -> None:
    tenant = await api.tenant()
    depth = 30_000  # fits in 64 KiB, and is deeper than Python's JSON parser can recurse
    content = _raw_json(valid_body(), "metadata", '{"a":' + "[" * depth + "]" * depth + "}")
    response = await post_raw(tenant, content)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert sim.submits == 0


# ---------------------------------------------------------------- the dashboard's parameters (issue 24 B4)

DASHBOARD_CASES = [
    ("/dashboard/predictions", {"to": "9999-12-31"}, "to"),
    ("/dashboard/deliveries", {"to": "9999-12-31"}, "to"),
    ("/dashboard/usage.csv", {"to": "9999-12-31"}, "to"),
    ("/dashboard/predictions", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
    ("/dashboard/deliveries", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
    ("/dashboard/usage.csv", {"from": "0001-01-01T00:00:00+01:00"}, "from"),
    ("/dashboard/predictions", {"tenant": "t\x00"}, "tenant"),
    ("/dashboard/predictions", {"cursor": "c\x00"}, "cursor"),
    ("/dashboard/deliveries", {"tenant": "t\x00"}, "tenant"),
    ("/dashboard/deliveries", {"cursor": "c\x00"}, "cursor"),
    ("/dashboard", {"q": "q\x00"}, "q"),
    ("/dashboard", {"q": "q\x01"}, "q"),
    ("/dashboard/tenants/" + quote("ten\x00"), {}, "tenant_id"),
    ("/dashboard/static/" + quote("a\x00"), {}, "name"),
]


@pytest.mark.parametrize(("path", "params", "field"), DASHBOARD_CASES)
async def test_dashboard_parameters_the_database_cannot_take_are_refused(
    api: Api, path: str, params: dict[str, str], field: str
) -> None:
    from tests.test_dashboard import login

    await login(api)
    answer = await api.http.get(path, params=params)
    assert answer.status_code == 422, answer.text[:2000]
    assert field in answer.text


async def test_dashboard_forms_refuse_unstorable_path_parameters(api: Api) -> None:
    from tests.test_dashboard import login

    csrf = await login(api)
    for path in (
        "/dashboard/tenants/" + quote("t\x00") + "/settings",
        "/dashboard/tenants/" + quote("t\x00") + "/keys",
        "/dashboard/tenants/t/keys/" + quote("k\x00") + "/revoke",
        "/dashboard/deliveries/" + quote("d\x00") + "/redeliver",
    ):
        answer = await api.http.post(path, data={"csrf": csrf, "name": "x"})
        assert answer.status_code in (404, 422), (path, answer.status_code, answer.text[:500])


@pytest.mark.parametrize("value", ["a\x00b", "a\x01b"], ids=["nul", "control"])
async def test_dashboard_form_fields_the_database_cannot_take_are_refused(api: Api, value: str) -> None:
    from tests.test_dashboard import login

    csrf = await login(api)
    tenant = await api.tenant(name="forms")
    for path in (
        f"/dashboard/tenants/{tenant.id}/keys",
        f"/dashboard/tenants/{tenant.id}/settings",
        "/dashboard/tenants",
    ):
        answer = await api.http.post(path, data={"csrf": csrf, "name": value})
        assert answer.status_code == 422, (path, answer.text[:500])
    # The list filters a redeliver form carries back are dropped when the list could not take them.
    answer = await api.http.post(
        "/dashboard/deliveries/dlv_x/redeliver", data={"csrf": csrf, "tenant": value, "status": value}
    )
    assert answer.status_code == 404, answer.text[:500]


async def test_operator_outputs_path_with_nul_is_refused(api: Api) -> None:
    assert_problem(await api.admin("GET", "/admin/v1/predictions/" + quote("p\x00") + "/outputs"), "predictionId")
