"""The two hot routes (submit, GET of a prediction) answer every request, good or bad, exactly as they did
when FastAPI served them, and their OpenAPI is unchanged (issue 25: they may be served by bare ASGI
handlers, with every behaviour kept).

Both tests compare with snapshots recorded from the FastAPI routes (tests/snapshots/). To record them
again on purpose: `VIDGATE_RECORD_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_hot_routes.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.core.guard import MAX_BODY_BYTES
from tests.conftest import Api, valid_body

SNAPSHOTS = Path(__file__).parent / "snapshots"
RECORD = os.environ.get("VIDGATE_RECORD_SNAPSHOTS") == "1"
HOT = [("/api/v1/models/{modelId}/generate", "post"), ("/api/v1/predictions/{predictionId}", "get")]
SUBMIT = "/api/v1/models/ltx-2-19b/generate"
JSON = {"Content-Type": "application/json"}
# What is compared of every answer: headers whose presence or value the contract fixes.
VALUED = (
    "allow",
    "content-type",
    "idempotent-replayed",
    "location",
    "preference-applied",
    "www-authenticate",
    "x-content-type-options",
    "x-budget-remaining-cents",
    "connection",
)
PRESENT = ("retry-after", "server-timing", "x-request-id", "x-budget-resets-at")


def compare_with_snapshot(name: str, actual: Any) -> None:
    path = SNAPSHOTS / name
    if RECORD:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_bytes(orjson.dumps(actual, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        return
    expected = orjson.loads(path.read_bytes())
    assert actual == orjson.loads(orjson.dumps(actual)) and expected is not None
    for key in sorted(set(expected) | set(actual)) if isinstance(expected, dict) else []:
        assert actual.get(key) == expected.get(key), key
    assert actual == expected


def _referenced(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for value in node.values():
            _referenced(value, found)
    elif isinstance(node, list):
        for value in node:
            _referenced(value, found)


def _without_defaults(node: Any) -> Any:
    """The schema with `additionalProperties: true` left out: it is JSON Schema's default, which newer
    pydantic writes out for a `dict[str, Any]` and older pydantic does not (`make test-lowest`)."""
    if isinstance(node, dict):
        return {k: _without_defaults(v) for k, v in node.items() if not (k == "additionalProperties" and v is True)}
    if isinstance(node, list):
        return [_without_defaults(v) for v in node]
    return node


async def test_the_hot_routes_openapi_is_unchanged(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    operations = {f"{method.upper()} {path}": spec["paths"][path][method] for path, method in HOT}
    schemas = spec["components"]["schemas"]
    names: set[str] = set()
    _referenced(operations, names)
    while True:  # schemas referenced by the referenced schemas
        more: set[str] = set()
        _referenced([schemas[n] for n in names], more)
        if more <= names:
            break
        names |= more
    security = {
        n: spec["components"]["securitySchemes"][n]
        for op in operations.values()
        for s in op.get("security", [])
        for n in s
    }
    snapshot = {"operations": operations, "schemas": {n: schemas[n] for n in sorted(names)}, "security": security}
    compare_with_snapshot("hot_routes_openapi.json", _without_defaults(snapshot))


def _labelled(text: str, ids: dict[str, str]) -> str:
    for value, label in ids.items():
        text = text.replace(value, label)
    return text


def _answer(response: httpx.Response, ids: dict[str, str]) -> dict[str, Any]:
    headers = response.headers
    seen: dict[str, Any] = {"status": response.status_code}
    for name in VALUED:
        if name in headers:
            seen[name] = [_labelled(value, ids) for value in headers.get_list(name)]
    seen["present"] = [name for name in PRESENT if name in headers]
    if name_id := headers.get("x-request-id"):
        seen["request-id-given"] = name_id == "given-id-1"
    text = _labelled(response.text, ids)
    if headers.get("content-type", "").endswith("json") and text:
        body = orjson.loads(text)
        if headers["content-type"] == "application/problem+json":
            seen["problem"] = body
        else:
            seen["keys"] = sorted(body)
            seen["prediction-status"] = body.get("status")
            seen["replayed-id"] = body.get("id") in ids.values() or body.get("id")[:5]
    else:
        seen["body"] = text[:200]
    return seen


async def test_every_answer_of_the_hot_routes(api: Api) -> None:
    await every_answer(api)


async def test_every_answer_with_real_commits(live_api: Api) -> None:
    """A real pool and commits: on PostgreSQL the GETs take the batched read (app/predictions/reads.py)."""
    await every_answer(live_api)


async def every_answer(api: Api) -> None:
    tenant = await api.tenant(budgetCents=1000)
    other = await api.tenant(name="other")
    keys = {}
    for name, scopes in {"read": ["read"], "generate": ["generate"], "revoked": ["generate", "read"]}.items():
        made = await api.admin("POST", f"/admin/v1/tenants/{tenant.id}/keys", json={"scopes": scopes})
        assert made.status_code == 201, made.text
        keys[name] = made.json()
    revoked = await api.admin("DELETE", f"/admin/v1/tenants/{tenant.id}/keys/{keys['revoked']['id']}")
    assert revoked.status_code == 200, revoked.text
    first = await tenant.submit()
    assert first.status_code == 200, first.text
    theirs = await other.submit()
    ids = {first.json()["id"]: "<first>", theirs.json()["id"]: "<theirs>"}
    auth = tenant.headers()
    body = orjson.dumps(valid_body())
    pred = "/api/v1/predictions/" + first.json()["id"]

    def bearer(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]['key']}"}

    cases: list[tuple[str, str, str, dict[str, Any], bytes | None]] = [
        # name, method, path, headers, body
        ("submit", "POST", SUBMIT, {**auth, **JSON}, body),
        ("submit idem", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "k1"}, body),
        ("submit idem replay", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "k1"}, body),
        (
            "submit idem other body",
            "POST",
            SUBMIT,
            {**auth, **JSON, "Idempotency-Key": "k1"},
            orjson.dumps(valid_body(prompt="another")),
        ),
        ("submit idem empty", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": ""}, body),
        ("submit idem long", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "k" * 256}, body),
        ("submit idem longest", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "k" * 255}, body),
        ("submit idem control", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "a\x01b"}, body),
        ("submit idem latin1", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": b"caf\xe9"}, body),
        ("submit idem utf8", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "café".encode()}, body),
        ("submit prefer wait", "POST", SUBMIT, {**auth, **JSON, "Prefer": "wait=1"}, body),
        ("submit prefer other", "POST", SUBMIT, {**auth, **JSON, "Prefer": "respond-async"}, body),
        ("submit request id", "POST", SUBMIT, {**auth, **JSON, "X-Request-Id": "given-id-1"}, body),
        ("submit no key", "POST", SUBMIT, JSON, body),
        ("submit basic", "POST", SUBMIT, {**JSON, "Authorization": "Basic dXNlcjpwdw=="}, body),
        ("submit bearer only", "POST", SUBMIT, {**JSON, "Authorization": "Bearer"}, body),
        ("submit bearer spaces", "POST", SUBMIT, {**JSON, "Authorization": f"bearer   {tenant.key}  "}, body),
        ("submit unknown key", "POST", SUBMIT, {**JSON, "Authorization": "Bearer vg_nope"}, body),
        ("submit other token", "POST", SUBMIT, {**JSON, "Authorization": "Bearer nope"}, body),
        ("submit revoked", "POST", SUBMIT, {**JSON, **bearer("revoked")}, body),
        ("submit read scope", "POST", SUBMIT, {**JSON, **bearer("read")}, body),
        ("submit generate scope", "POST", SUBMIT, {**JSON, **bearer("generate")}, body),
        ("submit unknown model", "POST", "/api/v1/models/nope/generate", {**auth, **JSON}, body),
        ("submit long model", "POST", f"/api/v1/models/{'m' * 101}/generate", {**auth, **JSON}, body),
        ("submit model control", "POST", "/api/v1/models/m%01/generate", {**auth, **JSON}, body),
        ("submit model nul", "POST", "/api/v1/models/m%00/generate", {**auth, **JSON}, body),
        ("submit model encoded", "POST", "/api/v1/models/ltx-2-19b%2Fx/generate", {**auth, **JSON}, body),
        ("submit bad json", "POST", SUBMIT, {**auth, **JSON}, b'{"prompt": '),
        ("submit bad json no key", "POST", SUBMIT, JSON, b"{"),
        ("submit empty body", "POST", SUBMIT, {**auth, **JSON}, b""),
        ("submit empty body no type", "POST", SUBMIT, auth, None),
        ("submit no content type", "POST", SUBMIT, auth, body),
        ("submit text plain", "POST", SUBMIT, {**auth, "Content-Type": "text/plain"}, body),
        ("submit json charset", "POST", SUBMIT, {**auth, "Content-Type": "application/json; charset=utf-8"}, body),
        ("submit plus json", "POST", SUBMIT, {**auth, "Content-Type": "application/merge-patch+json"}, body),
        ("submit form type", "POST", SUBMIT, {**auth, "Content-Type": "application/x-www-form-urlencoded"}, body),
        ("submit array", "POST", SUBMIT, {**auth, **JSON}, b"[]"),
        ("submit null", "POST", SUBMIT, {**auth, **JSON}, b"null"),
        ("submit string", "POST", SUBMIT, {**auth, **JSON}, b'"x"'),
        ("submit missing prompt", "POST", SUBMIT, {**auth, **JSON}, orjson.dumps(valid_body(prompt=None))),
        ("submit extra field", "POST", SUBMIT, {**auth, **JSON}, orjson.dumps({**valid_body(), "extra": 1})),
        (
            "submit many errors",
            "POST",
            SUBMIT,
            {**auth, **JSON},
            orjson.dumps({"image": "ftp://x", "duration": 99, "resolution": "9k", "seed": "x", "zzz": 1}),
        ),
        ("submit prompt nul", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", b"a\\u0000cat")),
        ("submit prompt surrogate", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", b"a\\ud800cat")),
        ("submit prompt control", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", b"a\\u0001cat")),
        ("submit prompt tab", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", b"a\\tcat")),
        ("submit metadata nan", "POST", SUBMIT, {**auth, **JSON}, body[:-1] + b',"metadata":{"a":NaN}}'),
        ("submit metadata inf", "POST", SUBMIT, {**auth, **JSON}, body[:-1] + b',"metadata":{"a":1e999}}'),
        (
            "submit metadata bigint",
            "POST",
            SUBMIT,
            {**auth, **JSON},
            body[:-1] + b',"metadata":{"a":' + b"9" * 30 + b"}}",
        ),
        ("submit metadata ok", "POST", SUBMIT, {**auth, **JSON}, body[:-1] + b',"metadata":{"a":[1,2.5,null,true]}}'),
        ("submit duplicate keys", "POST", SUBMIT, {**auth, **JSON}, body[:-1] + b',"prompt":"second"}'),
        ("submit float duration", "POST", SUBMIT, {**auth, **JSON}, orjson.dumps(valid_body(duration=5.0))),
        ("submit string duration", "POST", SUBMIT, {**auth, **JSON}, orjson.dumps(valid_body(duration="5"))),
        ("submit bool duration", "POST", SUBMIT, {**auth, **JSON}, orjson.dumps(valid_body(duration=True))),
        ("submit bom", "POST", SUBMIT, {**auth, **JSON}, b"\xef\xbb\xbf" + body),
        ("submit utf16", "POST", SUBMIT, {**auth, **JSON}, body.decode().encode("utf-16")),
        ("submit bad utf8", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", b"a \xff cat")),
        ("submit latin1 prompt", "POST", SUBMIT, {**auth, **JSON}, body.replace(b"a cat", "a caf\xe9".encode())),
        ("submit deep", "POST", SUBMIT, {**auth, **JSON}, b'{"metadata":' + b"[" * 3000 + b"]" * 3000 + b"}"),
        ("submit bad body no key", "POST", SUBMIT, JSON, b"{}"),
        ("submit bad body revoked", "POST", SUBMIT, {**JSON, **bearer("revoked")}, b"{}"),
        ("submit bad path and body", "POST", f"/api/v1/models/{'m' * 101}/generate", {**auth, **JSON}, b"{}"),
        ("submit bad header and body", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "a\x01"}, b"{}"),
        (
            "submit bad path header body",
            "POST",
            "/api/v1/models/m%00/generate",
            {**auth, **JSON, "Idempotency-Key": "a\x01"},
            b'{"prompt": 1}',
        ),
        ("submit long idem bad body", "POST", SUBMIT, {**auth, **JSON, "Idempotency-Key": "k" * 256}, b"{}"),
        ("submit unknown model bad body", "POST", "/api/v1/models/nope/generate", {**auth, **JSON}, b"{}"),
        ("submit too large", "POST", SUBMIT, {**auth, **JSON}, body + b" " * MAX_BODY_BYTES),
        ("submit bad host", "POST", SUBMIT, {**auth, **JSON, "Host": "a/b"}, body),
        ("submit forwarded host", "POST", SUBMIT, {**auth, **JSON, "X-Forwarded-Host": "evil.example"}, body),
        ("submit get", "GET", SUBMIT, auth, None),
        ("submit head", "HEAD", SUBMIT, auth, None),
        ("submit put", "PUT", SUBMIT, {**auth, **JSON}, body),
        ("submit options", "OPTIONS", SUBMIT, auth, None),
        ("submit trailing slash", "POST", SUBMIT + "/", {**auth, **JSON}, body),
        ("submit query", "POST", SUBMIT + "?a=1", {**auth, **JSON}, body),
        ("submit double slash", "POST", "/api/v1/models//generate", {**auth, **JSON}, body),
        ("submit upper", "POST", SUBMIT.upper(), {**auth, **JSON}, body),
        # the GET
        ("get", "GET", pred, auth, None),
        ("get again", "GET", pred, auth, None),
        ("get query", "GET", pred + "?x=1", auth, None),
        ("get request id", "GET", pred, {**auth, "X-Request-Id": "given-id-1"}, None),
        ("get with body", "GET", pred, {**auth, **JSON}, b"{}"),
        ("get unknown", "GET", "/api/v1/predictions/pred_nope", auth, None),
        ("get theirs", "GET", "/api/v1/predictions/" + theirs.json()["id"], auth, None),
        ("get nul", "GET", "/api/v1/predictions/p%00", auth, None),
        ("get control", "GET", "/api/v1/predictions/p%7F", auth, None),
        ("get long", "GET", "/api/v1/predictions/" + "p" * 300, auth, None),
        ("get no key", "GET", pred, {}, None),
        ("get unknown key", "GET", pred, {"Authorization": "Bearer vg_nope"}, None),
        ("get revoked", "GET", pred, bearer("revoked"), None),
        ("get generate scope", "GET", pred, bearer("generate"), None),
        ("get read scope", "GET", pred, bearer("read"), None),
        ("get nul no key", "GET", "/api/v1/predictions/p%00", {}, None),
        ("get nul revoked", "GET", "/api/v1/predictions/p%00", bearer("revoked"), None),
        ("get head", "HEAD", pred, auth, None),
        ("get post", "POST", pred, {**auth, **JSON}, b"{}"),
        ("get delete", "DELETE", pred, auth, None),
        ("get trailing slash", "GET", pred + "/", auth, None),
        ("get subpath", "GET", pred + "/x", auth, None),
        ("get empty id", "GET", "/api/v1/predictions/", auth, None),
        ("get bad host", "GET", pred, {**auth, "Host": "a/b"}, None),
    ]
    answers: dict[str, Any] = {}
    for name, method, path, headers, content in cases:
        response = await api.http.request(method, path, headers=headers, content=content)
        answers[name] = _answer(response, ids)
        if name == "submit idem":
            ids[response.json()["id"]] = "<idem>"
    compare_with_snapshot("hot_routes_answers.json", answers)


@pytest.mark.parametrize("path", [SUBMIT, "/api/v1/predictions/pred_x"])
async def test_the_hot_routes_keep_their_route_label(api: Api, path: str) -> None:
    """Metrics and the access log name the route template, not the raw path."""
    from app.core import metrics

    method = "POST" if "generate" in path else "GET"
    template = HOT[0][0] if method == "POST" else HOT[1][0]
    before = metrics.REQUESTS.labels(route=template, method=method, status="401")._value.get()
    await api.http.request(method, path, content=b"{}" if method == "POST" else None, headers=JSON)
    assert metrics.REQUESTS.labels(route=template, method=method, status="401")._value.get() == before + 1


async def test_the_hot_routes_are_served_bare(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FastAPI's routing and dependency solving: no endpoint of FastAPI's runs for them."""
    import fastapi.routing

    from app.predictions import hot

    served: list[str] = []
    solved: list[str] = []
    for name in ("generate", "get_prediction"):
        handler = getattr(hot, name)

        async def counted(*args: Any, _handler: Any = handler, _name: str = name) -> None:
            served.append(_name)
            await _handler(*args)

        monkeypatch.setattr(hot, name, counted)
    solve = fastapi.routing.solve_dependencies

    async def counted_solve(*args: Any, **kwargs: Any) -> Any:
        solved.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counted_solve)
    tenant = await api.tenant()
    submitted = await tenant.submit()
    assert submitted.status_code == 200, submitted.text
    got = await tenant.get(f"/api/v1/predictions/{submitted.json()['id']}")
    assert got.status_code == 200, got.text
    assert served == ["generate", "get_prediction"]
    assert not [path for path in solved if path.startswith("/api/v1/")]
    assert (await tenant.get("/api/v1/predictions")).status_code == 200  # any other route: FastAPI's
    assert "/api/v1/predictions" in solved


async def test_concurrent_gets_answer_as_one_by_one(live_api: Api) -> None:
    """On PostgreSQL the GETs that arrive together share one statement (app/predictions/reads.py): each
    answer is the one a GET on its own gets, a tenant never sees another's prediction."""
    import asyncio

    from app.predictions import reads

    mine = await live_api.tenant(budgetCents=1000)
    other = await live_api.tenant(name="other")
    ids = [(await mine.submit()).json()["id"] for _ in range(4)]
    theirs = (await other.submit()).json()["id"]
    asks = [(mine, i) for i in ids] + [(mine, theirs), (other, theirs), (mine, "pred_nope"), (other, ids[0])]

    async def get(tenant: Any, prediction_id: str) -> tuple[int, Any, str | None, str | None]:
        answer = await tenant.get(f"/api/v1/predictions/{prediction_id}")
        return (
            answer.status_code,
            answer.json(),
            answer.headers.get("x-budget-remaining-cents"),
            answer.headers.get("retry-after"),
        )

    one_by_one = [await get(tenant, i) for tenant, i in asks]
    together = await asyncio.gather(*(get(tenant, i) for tenant, i in asks * 4))
    assert together == one_by_one * 4
    assert [status for status, *_ in one_by_one] == [200] * 4 + [404, 200, 404, 404]
    reader = reads.batched(live_api.runtime.sessions, live_api.runtime.settings)
    if reader is not None:  # PostgreSQL
        assert reader.largest_batch > 1


@pytest.mark.parametrize("route", ["submit", "get"])
async def test_an_unexpected_error_in_a_bare_route_is_the_same_500(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    """As from a FastAPI route: it reaches the outermost handler, which logs its type and path and answers
    the internal_error problem (app/core/errors.py)."""
    from app.predictions import hot

    tenant = await api.tenant()
    submitted = await tenant.submit()

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(hot, "submit_answer" if route == "submit" else "prediction_answer", broken)
    transport = httpx.ASGITransport(app=api.http._transport.app, raise_app_exceptions=False)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        path = SUBMIT if route == "submit" else f"/api/v1/predictions/{submitted.json()['id']}"
        method = "POST" if route == "submit" else "GET"
        with caplog.at_level("ERROR", logger="vidgate.errors"):
            answer = await http.request(method, path, headers=tenant.headers(**JSON), json=valid_body())
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "internal_error" and "secret" not in answer.text
    (record,) = [r for r in caplog.records if r.name == "vidgate.errors"]
    assert record.getMessage() == "unhandled error"
    assert (record.error_type, record.path) == ("RuntimeError", path)  # type: ignore[attr-defined]


async def test_under_a_root_path_fastapi_serves_them_the_same(api: Api) -> None:
    """The dispatcher leaves a request under a root_path to FastAPI's routes, which run the same code."""
    tenant = await api.tenant(budgetCents=1000)
    transport = httpx.ASGITransport(app=api.http._transport.app, root_path="/gw")  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as http:
        submitted = await http.post("/gw" + SUBMIT, headers=tenant.headers(), json=valid_body())
        assert submitted.status_code == 200, submitted.text
        assert submitted.json()["statusUrl"].startswith("http://gateway.test/gw/api/v1/predictions/")
        got = await http.get(f"/gw/api/v1/predictions/{submitted.json()['id']}", headers=tenant.headers())
        assert got.status_code == 200 and got.json()["id"] == submitted.json()["id"]
        assert got.headers["x-budget-remaining-cents"] and got.headers["retry-after"]
        bad = await http.post("/gw" + SUBMIT, headers=tenant.headers(**JSON), content=b"{")
        assert bad.status_code == 422 and bad.json()["field"] == "1"


async def test_a_batched_read_is_the_one_row_read(live_api: Api) -> None:
    """app/predictions/reads.py answers each key as predictions_service.read_with_balance does."""
    import asyncio

    from app.budgets import balances
    from app.budgets import service as budgets_service
    from app.core import clock
    from app.core.database import read_connection
    from app.predictions import reads
    from app.predictions import service as predictions_service
    from app.tenants import service as tenants_service

    runtime = live_api.runtime
    reader = reads.batched(runtime.sessions, runtime.settings)
    if reader is None:
        pytest.skip("reads are batched on PostgreSQL only")
    mine = await live_api.tenant(budgetCents=1000)
    other = await live_api.tenant(name="other")
    ids = [(await mine.submit()).json()["id"] for _ in range(3)]
    theirs = (await other.submit()).json()["id"]
    hit = tenants_service.authenticate_cached(mine.key)
    assert hit is not None
    tenant = hit[0]
    start = budgets_service.period_of(tenant.budget_period, clock.now()).start
    scope = balances.counter_scope(tenant)
    keys = [(i, tenant.id, scope, start) for i in [*ids, theirs, "pred_nope"]]
    async with read_connection(runtime.sessions) as connection:
        expected = [
            await predictions_service.read_with_balance(connection, runtime.settings, t, i, s, p) for i, t, s, p in keys
        ]
    assert [r is None for r in expected] == [False, False, False, True, True]
    assert [await reads.read_with_balance(reader, key) for key in keys] == expected
    assert list(await asyncio.gather(*(reads.read_with_balance(reader, key) for key in keys))) == expected
