"""webhooks.verify: vectors signed by the `standardwebhooks` package, and the gateway's own deliveries."""

from __future__ import annotations

import base64
import http.server
import json
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BODY, Gateway, free_port
from standardwebhooks.webhooks import Webhook

from vidgate_client import Prediction, Vidgate, WebhookEvent, webhooks
from vidgate_client.webhooks import WebhookVerificationError

EVENT = {
    "type": "prediction.completed",
    "timestamp": "2026-01-15T12:00:00.000Z",
    "data": {"id": "pred_1", "status": "completed", "outputs": ["https://x/y.mp4"], "metadata": {"n": 1}},
}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signed(secret: str, body: bytes, *, at: datetime | None = None, msg_id: str = "msg_1") -> dict[str, str]:
    """Headers as a Standard Webhooks sender writes them, signed by the reference package."""
    moment = at or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, moment, body.decode()),
    }


BODY_BYTES = json.dumps(EVENT).encode()


def test_good_delivery_verifies_and_parses() -> None:
    secret = new_secret()
    event = webhooks.verify(BODY_BYTES, signed(secret, BODY_BYTES), secret)
    assert isinstance(event, WebhookEvent)
    assert event.id == "msg_1" and event.type == "prediction.completed" and event.data == EVENT["data"]
    assert event.timestamp == datetime(2026, 1, 15, 12, tzinfo=UTC)
    # Header names in any case, the body as text, and our signature equal to the reference's.
    upper = {k.upper(): v for k, v in signed(secret, BODY_BYTES).items()}
    assert webhooks.verify(BODY_BYTES.decode(), upper, secret) == event
    now = int(time.time())
    assert webhooks.sign(secret, "msg_1", now, BODY_BYTES) == Webhook(secret).sign(
        "msg_1", datetime.fromtimestamp(now, UTC), BODY_BYTES.decode()
    )


def test_tampered_body_fails() -> None:
    secret = new_secret()
    headers = signed(secret, BODY_BYTES)
    tampered = BODY_BYTES.replace(b'"n": 1', b'"n": 2')
    assert tampered != BODY_BYTES
    with pytest.raises(WebhookVerificationError):
        webhooks.verify(tampered, headers, secret)


def test_wrong_secret_fails() -> None:
    with pytest.raises(WebhookVerificationError):
        webhooks.verify(BODY_BYTES, signed(new_secret(), BODY_BYTES), new_secret())


@pytest.mark.parametrize("offset_s", [-301, 301, -3600, 86400])
def test_stale_and_future_timestamps_fail(offset_s: int) -> None:
    secret = new_secret()
    headers = signed(secret, BODY_BYTES, at=datetime.now(UTC) + timedelta(seconds=offset_s))
    with pytest.raises(WebhookVerificationError, match="from now"):
        webhooks.verify(BODY_BYTES, headers, secret)
    # The signature itself is good: a wider tolerance accepts it.
    assert webhooks.verify(BODY_BYTES, headers, secret, tolerance_s=abs(offset_s) + 60).type == EVENT["type"]


def test_inside_tolerance_verifies() -> None:
    secret = new_secret()
    for offset_s in (-290, 290):
        webhooks.verify(
            BODY_BYTES, signed(secret, BODY_BYTES, at=datetime.now(UTC) + timedelta(seconds=offset_s)), secret
        )


def test_moved_timestamp_breaks_the_signature() -> None:
    secret = new_secret()
    headers = signed(secret, BODY_BYTES)
    headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        webhooks.verify(BODY_BYTES, headers, secret)


def test_rotation_either_signature_and_either_secret() -> None:
    old, new = new_secret(), new_secret()
    moment = datetime.now(UTC)
    both = signed(new, BODY_BYTES, at=moment)
    both["webhook-signature"] += " " + signed(old, BODY_BYTES, at=moment)["webhook-signature"]
    assert webhooks.verify(BODY_BYTES, both, old).type == webhooks.verify(BODY_BYTES, both, new).type
    # A receiver that holds both secrets while it switches over accepts a delivery signed by either.
    assert webhooks.verify(BODY_BYTES, signed(old, BODY_BYTES), [new, old]).id == "msg_1"
    with pytest.raises(WebhookVerificationError):
        webhooks.verify(BODY_BYTES, both, [new_secret(), new_secret()])


@pytest.mark.parametrize(
    "broken",
    [
        {"webhook-signature": ""},
        {"webhook-signature": "v2,abc"},
        {"webhook-signature": "v1,not base64!"},
        {"webhook-timestamp": "yesterday"},
        {"webhook-id": ""},
    ],
)
def test_malformed_headers_fail(broken: dict[str, str]) -> None:
    secret = new_secret()
    with pytest.raises(WebhookVerificationError):
        webhooks.verify(BODY_BYTES, {**signed(secret, BODY_BYTES), **broken}, secret)


def test_a_bad_secret_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        webhooks.verify(BODY_BYTES, signed(new_secret(), BODY_BYTES), "whsec_***")


# ---------------------------------------------------------------- the gateway's deliveries


@pytest.fixture
def receiver() -> Iterator[tuple[str, queue.Queue[tuple[bytes, dict[str, str]]]]]:
    arrived: queue.Queue[tuple[bytes, dict[str, str]]] = queue.Queue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            arrived.put((body, dict(self.headers.items())))
            self.send_response(204)
            self.end_headers()

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/hooks", arrived
    finally:
        server.shutdown()
        server.server_close()


def test_gateway_deliveries_verify_before_and_during_rotation(
    sim_defaults: Gateway, receiver: tuple[str, queue.Queue[tuple[bytes, dict[str, str]]]]
) -> None:
    url, arrived = receiver
    tenant, key = sim_defaults.tenant(webhookUrl=url)
    old = tenant["webhookSecret"]
    with Vidgate(key, sim_defaults.url) as client:
        prediction = client.generate("ltx-2-19b", **BODY)
        body, headers = arrived.get(timeout=60)
        event = webhooks.verify(body, headers, old)
        assert event.type == "prediction.completed" and event.data["id"] == prediction.id
        assert Prediction.model_validate(event.data) == client.predictions.get(prediction.id)
        assert Webhook(old).verify(body, headers)["data"] == event.data

        rotated = sim_defaults.admin("POST", f"/admin/v1/tenants/{tenant['id']}/webhook-secret/rotate")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["webhookSecret"]
        second = client.generate("ltx-2-19b", **BODY)
        body, headers = arrived.get(timeout=60)
        assert len(headers["webhook-signature"].split()) == 2  # both secrets sign during the rotation
        for secret in (old, new):
            assert webhooks.verify(body, headers, secret).data["id"] == second.id
            Webhook(secret).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            webhooks.verify(body, headers, new_secret())


async def test_the_readme_receiver_accepts_good_and_refuses_forged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FastAPI receiver of the README, run as written."""
    fastapi = pytest.importorskip("fastapi")

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    block = next(b for b in readme.split("```python")[1:] if '@app.post("/hooks/vidgate"' in b).split("```")[0]
    old, new = new_secret(), new_secret()
    monkeypatch.setenv("VIDGATE_WEBHOOK_SECRETS", f"{new},{old}")
    namespace: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["app"], fastapi.FastAPI)
    transport = httpx.ASGITransport(app=namespace["app"])
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as http:
        for secret in (old, new):
            answer = await http.post("/hooks/vidgate", content=BODY_BYTES, headers=signed(secret, BODY_BYTES))
            assert answer.status_code == 204
        forged = signed(new_secret(), BODY_BYTES)
        assert (await http.post("/hooks/vidgate", content=BODY_BYTES, headers=forged)).status_code == 400
