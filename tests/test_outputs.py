"""Rehosted outputs (SPEC section 8): the copier end to end, the stores (a directory and a real
S3-compatible server), signed links with Range support, the bound on failing copies, the host list,
redirects and the SSRF guard, retention, and memory while copying a large output.

These tests create the copy job the way the poller does (`enqueue_copy` in a transaction, the
prediction left `processing` and not due for polling) and run the copier with the worker's own
terminal callback; tests/test_outputs_wiring.py runs the whole way with a worker."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select, update

from app.core import clock
from app.core.database import transaction
from app.core.settings import Settings
from app.outputs import service as outputs_service
from app.outputs import signing
from app.outputs.copier import Copier, allowed_host
from app.outputs.models import OutputCopy, StoredOutput
from app.outputs.service import RangeNotSatisfiable, parse_range
from app.outputs.signing import window_expiry
from app.outputs.store import LocalStore, open_store
from app.predictions.models import Prediction
from app.runtime import Runtime
from app.upstream.simulator import SANDBOX_MP4, SimState, generated_chunks
from app.webhooks.models import WebhookDelivery
from app.worker import Worker
from bench.ports import free_port
from tests.conftest import Api, Tenant

PUBLIC = "http://gateway.test"


def sim_host(sim_url: str) -> str:
    return urlsplit(sim_url).netloc


@pytest.fixture
def settings_overrides(sim_url: str, tmp_path: Path) -> dict[str, Any]:
    return dict(
        outputs_store=str(tmp_path / "outputs"),
        output_hosts=[sim_host(sim_url)],
        public_base_url=PUBLIC,
        output_copy_max_s=60.0,
    )


def generated_digest(seed: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in generated_chunks(seed, size):
        digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Setup:
    api: Api
    runtime: Runtime
    tenant: Tenant
    copier: Copier

    async def new_http(self) -> None:
        """After a settings change: the next copy opens a session with them."""
        await self.copier.close()
        self.copier._http = None

    async def prediction(self, sources: list[str]) -> str:
        """A prediction the vendor just reported completed, with its copy job queued."""
        submitted = await self.tenant.submit()
        assert submitted.status_code == 200, submitted.text
        prediction_id = str(submitted.json()["id"])
        async with transaction(self.runtime.sessions) as session:
            await session.execute(update(Prediction).where(Prediction.id == prediction_id).values(next_poll_at=None))
            queued = await outputs_service.enqueue_copy(
                session,
                self.runtime.settings,
                prediction_id=prediction_id,
                tenant_id=self.tenant.id,
                sources=sources,
                vendor_completed_at=clock.now(),
                model_name="LTX-2 19B",
            )
        assert queued
        return prediction_id

    async def row(self, prediction_id: str) -> Prediction:
        async with transaction(self.runtime.sessions, readonly=True) as session:
            prediction = await session.get(Prediction, prediction_id)
            assert prediction is not None
            return prediction

    async def job(self, prediction_id: str) -> OutputCopy:
        async with transaction(self.runtime.sessions, readonly=True) as session:
            job = await session.get(OutputCopy, prediction_id)
            assert job is not None
            return job

    async def links(self, prediction_id: str) -> list[str] | None:
        async with transaction(self.runtime.sessions, readonly=True) as session:
            return await outputs_service.current_links(session, self.runtime.settings, prediction_id)

    async def webhooks(self, prediction_id: str) -> list[dict[str, Any]]:
        async with transaction(self.runtime.sessions, readonly=True) as session:
            rows = await session.scalars(select(WebhookDelivery).where(WebhookDelivery.prediction_id == prediction_id))
            return [orjson.loads(row.payload) for row in rows]


@pytest.fixture
async def setup(live_api: Api, live_runtime: Runtime, receiver_factory: Any) -> AsyncIterator[Setup]:
    receiver = await receiver_factory()
    tenant = await live_api.tenant(webhookUrl=receiver.url)
    copier = Worker(live_runtime).copier
    yield Setup(live_api, live_runtime, tenant, copier)
    await copier.close()


async def fetch(api: Api, link: str, **headers: str) -> Any:
    return await api.http.get(link, headers=headers)


# ---------------------------------------------------------------- the copy, end to end


async def test_copy_stores_identical_bytes_and_completes_with_our_links(
    setup: Setup, sim_url: str, sim: SimState
) -> None:
    size = 3 * 1024 * 1024 + 17
    sources = [f"{sim_url}/sandbox/generated/{size}/big.mp4", f"{sim_url}/sandbox/outputs/clip.mp4"]
    prediction_id = await setup.prediction(sources)

    assert await setup.copier.run_round() == 1
    prediction = await setup.row(prediction_id)
    assert prediction.status == "completed"
    links = await setup.links(prediction_id)
    assert links is not None and len(links) == 2
    assert prediction.outputs == links
    assert all(link.startswith(f"{PUBLIC}/outputs/{prediction_id}/") for link in links)
    # The webhook was written in the transaction that completed the prediction, with the same links.
    (event,) = await setup.webhooks(prediction_id)
    assert event["type"] == "prediction.completed"
    assert event["data"]["outputs"] == links

    # The vendor deleting its files afterwards changes nothing: we serve our copy.
    sim.faults.output_gone = True
    big = await fetch(setup.api, links[0])
    assert big.status_code == 200
    assert big.headers["content-type"] == "video/mp4"
    assert int(big.headers["content-length"]) == size
    assert hashlib.sha256(big.content).hexdigest() == generated_digest("big.mp4", size)
    clip = await fetch(setup.api, links[1])
    assert clip.content == SANDBOX_MP4.read_bytes()
    assert big.headers["etag"] != clip.headers["etag"]

    # Operators see the vendor's URLs and what is stored; usage reports stored bytes per tenant.
    view = await setup.api.admin("GET", f"/admin/v1/predictions/{prediction_id}/outputs")
    assert view.status_code == 200, view.text
    assert view.json()["sourceUrls"] == sources
    assert view.json()["storedBytes"] == size + SANDBOX_MP4.stat().st_size
    usage = await setup.api.admin("GET", "/admin/v1/usage?groupBy=tenant")
    (mine,) = [row for row in usage.json()["data"] if row["tenant"] == setup.tenant.id]
    assert mine["storedBytes"] == size + SANDBOX_MP4.stat().st_size


async def test_a_second_copier_never_takes_a_leased_job(setup: Setup, sim_url: str) -> None:
    await setup.prediction([f"{sim_url}/sandbox/outputs/clip.mp4"])
    other = Copier(dataclasses.replace(setup.runtime, worker_id="other-process"), finish=setup.copier.finish)
    claimed = await setup.copier._claim(10)
    assert len(claimed) == 1
    assert await other._claim(10) == []
    # Once the lease has run out (the first process died), the other one takes the job over.
    clock.shift_to(clock.now() + timedelta(seconds=setup.runtime.settings.lease_s + 1))
    assert len(await other._claim(10)) == 1


# ---------------------------------------------------------------- links


@pytest.fixture
async def stored(setup: Setup, sim_url: str) -> tuple[Setup, str, str, int]:
    size = 1000
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/generated/{size}/small.mp4"])
    await setup.copier.run_round()
    links = await setup.links(prediction_id)
    assert links is not None
    return setup, prediction_id, links[0], size


async def test_range_requests(stored: tuple[Setup, str, str, int]) -> None:
    setup, _, link, size = stored
    whole = b"".join(generated_chunks("small.mp4", size))

    part = await fetch(setup.api, link, Range="bytes=10-19")
    assert part.status_code == 206
    assert part.content == whole[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{size}"
    assert part.headers["content-length"] == "10"

    suffix = await fetch(setup.api, link, Range="bytes=-5")
    assert (suffix.status_code, suffix.content) == (206, whole[-5:])
    assert suffix.headers["content-range"] == f"bytes {size - 5}-{size - 1}/{size}"

    rest = await fetch(setup.api, link, Range="bytes=990-")
    assert (rest.status_code, rest.content) == (206, whole[990:])
    past_end = await fetch(setup.api, link, Range="bytes=995-5000")
    assert (past_end.status_code, past_end.content) == (206, whole[995:])

    beyond = await fetch(setup.api, link, Range=f"bytes={size}-")
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["code"] == "range_not_satisfiable"

    head = await setup.api.http.head(link)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert head.content == b""
    assert head.headers["accept-ranges"] == "bytes"

    etag = head.headers["etag"]
    assert (await fetch(setup.api, link, **{"If-None-Match": etag})).status_code == 304
    assert (await fetch(setup.api, link, **{"If-None-Match": "*"})).status_code == 304
    assert (await fetch(setup.api, link, **{"If-None-Match": f'"other", W/{etag}'})).status_code == 304
    assert (await fetch(setup.api, link, **{"If-None-Match": '"other"'})).status_code == 200
    stale = await fetch(setup.api, link, Range="bytes=0-9", **{"If-Range": '"other"'})
    assert (stale.status_code, stale.content) == (200, whole)


async def test_outputs_are_never_sniffed_or_run_as_documents(stored: tuple[Setup, str, str, int]) -> None:
    setup, _, link, _ = stored
    for answer in (await fetch(setup.api, link), await setup.api.http.head(link)):
        assert answer.status_code == 200
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-security-policy"] == "sandbox; default-src 'none'"
        assert answer.headers["content-disposition"] == 'inline; filename="0.mp4"'


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=-20", 10, (0, 10)),
        ("bytes=3-1", 10, None),  # inverted: ignored
        ("bytes=0-1,4-5", 10, None),  # several ranges: the whole file
        ("items=0-1", 10, None),
        ("bytes=abc", 10, None),
        ("bytes=\u0661-\u0662", 10, None),  # non-ASCII digits
        ("bytes=" + "9" * 5000 + "-", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=-1", 0)])
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


async def test_tampered_and_expired_links_answer_403(stored: tuple[Setup, str, str, int]) -> None:
    setup, prediction_id, link, _ = stored
    assert (await fetch(setup.api, link)).status_code == 200
    base, query = link.split("?")
    expires, sig = (part.split("=", 1)[1] for part in query.split("&"))
    tampered = [
        f"{base}?expires={expires}&sig={sig[:-2]}AA",
        f"{base}?expires={int(expires) + 3600}&sig={sig}",
        f"{base.replace('/0.mp4', '/1.mp4')}?expires={expires}&sig={sig}",
        f"{base}?expires={expires}",
        f"{base}?expires=soon&sig={sig}",
        f"{base}?expires={expires}&sig=%C3%A9{sig[1:]}",  # non-ASCII
        f"{base}?expires=%D9%A1%D9%A2&sig={sig}",  # non-ASCII digits
        base,
    ]
    # Signed with the right key but expiring past now + TTL (in 2100): refused all the same.
    key = signing.signing_key(setup.runtime.settings)
    far = int(datetime(2100, 1, 1, tzinfo=UTC).timestamp())
    tampered.append(PUBLIC + signing.link_path(key, prediction_id, "0.mp4", far))
    ttl = setup.runtime.settings.output_url_ttl_s
    tampered.append(PUBLIC + signing.link_path(key, prediction_id, "0.mp4", int(clock.now().timestamp()) + ttl + 60))
    for url in tampered:
        answer = await fetch(setup.api, url)
        assert answer.status_code == 403, url
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["code"] == "output_link_invalid"

    # Until it expires every reader gets this very link; after, the old one is refused and a GET
    # of the prediction hands out the next one.
    clock.shift_to(clock.now() + timedelta(seconds=setup.runtime.settings.output_url_ttl_s - 5))
    assert await setup.links(prediction_id) == [link]
    clock.shift_to(clock.now() + timedelta(seconds=10))
    expired = await fetch(setup.api, link)
    assert expired.status_code == 403
    assert expired.json()["code"] == "output_link_expired"
    fresh = await setup.links(prediction_id)
    assert fresh is not None and fresh != [link]
    assert (await fetch(setup.api, fresh[0])).status_code == 200


@given(
    stored=st.integers(min_value=1_600_000_000, max_value=2_500_000_000),
    ttl=st.integers(min_value=60, max_value=10 * 365 * 86400),
    later=st.integers(min_value=0, max_value=50 * 365 * 86400),
)
def test_link_windows(stored: int, ttl: int, later: int) -> None:
    """A link handed out at any moment is valid for at most one TTL and at least a second, and every
    moment before its expiry hands out the same one."""
    stored_at = datetime.fromtimestamp(stored, UTC)
    now = stored_at + timedelta(seconds=later)
    expires = window_expiry(stored_at, now, ttl)
    assert now.timestamp() < expires <= now.timestamp() + ttl
    assert (expires - stored) % ttl == 0
    assert window_expiry(stored_at, datetime.fromtimestamp(expires - 1, UTC), ttl) == expires
    assert window_expiry(stored_at, datetime.fromtimestamp(expires, UTC), ttl) == expires + ttl


async def test_links_signed_with_another_key_are_refused(stored: tuple[Setup, str, str, int]) -> None:
    setup, prediction_id, link, _ = stored
    other = Settings(**{**setup.runtime.settings.model_dump(), "output_signing_key": "another key"})
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        (forged,) = (await outputs_service.current_links(session, other, prediction_id)) or []
    assert forged != link
    assert (await fetch(setup.api, forged)).status_code == 403


# ---------------------------------------------------------------- failures


async def test_a_copy_failing_until_the_bound_fails_the_prediction(setup: Setup, sim_url: str, sim: SimState) -> None:
    sim.faults.output_gone = True
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/outputs/clip.mp4"])
    charged = (await setup.row(prediction_id)).charged_cents

    await setup.copier.run_round()
    job = await setup.job(prediction_id)
    assert job.status == "copying" and job.attempts == 1
    assert "404" in (job.last_error or "")
    assert (await setup.row(prediction_id)).status == "processing"

    # Past VIDGATE_OUTPUT_COPY_MAX_S the next attempt gives up with the gateway's own message.
    clock.shift_to(clock.now() + timedelta(seconds=setup.runtime.settings.output_copy_max_s + 1))
    await setup.copier.run_round()
    prediction = await setup.row(prediction_id)
    assert prediction.status == "failed"
    assert prediction.error is not None and prediction.error.startswith("vidgate could not copy the output")
    assert prediction.charged_cents == charged  # VIDGATE_KEEP_FAILED_CHARGE (default): the vendor billed it
    (event,) = await setup.webhooks(prediction_id)
    assert event["type"] == "prediction.failed"
    assert sim.output_fetches == 1  # past the bound it gives up without asking again


async def test_a_flaky_then_stalled_vendor_is_retried_until_it_works(setup: Setup, sim_url: str, sim: SimState) -> None:
    size = 512 * 1024
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/generated/{size}/stall.mp4"])
    sim.faults.output_count = 1
    sim.faults.output_status = 503
    await setup.copier.run_round()
    assert "503" in ((await setup.job(prediction_id)).last_error or "")

    sim.faults.output_stall_s = 5.0
    setup.copier.runtime.settings.output_read_timeout_s = 0.3
    await setup.new_http()
    clock.shift_to(clock.now() + timedelta(seconds=5))  # due again, well within the bound
    await setup.copier.run_round()
    job = await setup.job(prediction_id)
    assert (job.status, job.attempts) == ("copying", 2)

    sim.faults.output_stall_s = 0.0
    clock.shift_to(clock.now() + timedelta(seconds=5))  # due again, well within the bound
    await setup.copier.run_round()
    assert (await setup.row(prediction_id)).status == "completed"
    assert sim.output_fetches == 3


@pytest.mark.parametrize(
    ("content_type", "max_bytes", "chunked", "reason"),
    [
        ("text/html", None, False, "not video, audio or an image"),
        # A document with scripts, served from the gateway's origin (security review, issue 24 B1).
        ("image/svg+xml", None, False, "not video, audio or an image"),
        ("image/svg+xml; charset=utf-8", None, False, "not video, audio or an image"),
        ("image/x-unknown+xml", None, False, "not video, audio or an image"),
        (None, 100, False, "over the limit"),  # refused from Content-Length
        (None, 100, True, "over the limit"),  # no length given: refused while streaming
    ],
)
async def test_wrong_type_or_too_large_fails_at_once(
    setup: Setup,
    sim_url: str,
    sim: SimState,
    content_type: str | None,
    max_bytes: int | None,
    chunked: bool,
    reason: str,
) -> None:
    sim.faults.output_content_type = content_type
    sim.faults.output_chunked = chunked
    if max_bytes is not None:
        setup.copier.runtime.settings.output_max_bytes = max_bytes
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/generated/5000/x.mp4"])
    await setup.copier.run_round()
    prediction = await setup.row(prediction_id)
    assert prediction.status == "failed"
    assert prediction.error is not None and reason in prediction.error
    assert prediction.error.startswith("vidgate refused to copy the output")
    leftovers = [p for p in Path(setup.runtime.settings.outputs_store).rglob("*") if p.is_file()]
    assert leftovers == []  # nothing half-stored, not even a staging file


async def test_hosts_outside_the_list_are_never_fetched(setup: Setup, sim_url: str, sim: SimState) -> None:
    port = urlsplit(sim_url).port
    prediction_id = await setup.prediction([f"http://localhost:{port}/sandbox/outputs/clip.mp4"])
    await setup.copier.run_round()
    prediction = await setup.row(prediction_id)
    assert prediction.status == "failed"
    assert prediction.error is not None and "VIDGATE_OUTPUT_HOSTS" in prediction.error
    assert sim.output_fetches == 0


async def test_redirects_only_within_the_hosts(setup: Setup, sim_url: str, sim: SimState) -> None:
    port = urlsplit(sim_url).port
    sim.faults.output_redirect = f"http://localhost:{port}/sandbox/outputs/clip.mp4"
    outside = await setup.prediction([f"{sim_url}/sandbox/outputs/clip.mp4"])
    await setup.copier.run_round()
    assert (await setup.row(outside)).status == "failed"
    assert sim.output_fetches == 1  # the redirect itself; its target was never asked

    # A redirect within the list is followed (one hop, then the file).
    sim.faults.output_redirect = None
    inside = await setup.prediction([f"{sim_url}/hop"])
    redirects = 0

    async def hop(_request: Any) -> Any:
        nonlocal redirects
        redirects += 1
        from aiohttp import web

        raise web.HTTPFound(f"{sim_url}/sandbox/outputs/clip.mp4")

    from aiohttp import web

    app = web.Application()
    app.router.add_get("/hop", hop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hop_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hop_port).start()
    try:
        async with transaction(setup.runtime.sessions) as session:
            await session.execute(
                update(OutputCopy)
                .where(OutputCopy.prediction_id == inside)
                .values(sources=[f"http://127.0.0.1:{hop_port}/hop"])
            )
        setup.copier.runtime.settings.output_hosts = [sim_host(sim_url), f"127.0.0.1:{hop_port}"]
        await setup.copier.run_round()
    finally:
        await runner.cleanup()
    assert redirects == 1
    assert (await setup.row(inside)).status == "completed"


async def test_the_ssrf_guard_refuses_private_addresses_unless_allowed(
    setup: Setup, sim_url: str, sim: SimState
) -> None:
    setup.copier.runtime.settings.webhook_allow_private = False
    await setup.new_http()
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/outputs/clip.mp4"])
    await setup.copier.run_round()
    prediction = await setup.row(prediction_id)
    assert prediction.status == "failed"
    assert prediction.error is not None and "loopback" in prediction.error
    assert sim.output_fetches == 0


async def test_without_rehosting_nothing_is_queued(setup: Setup, sim_url: str) -> None:
    setup.runtime.settings.rehost_outputs = False
    async with transaction(setup.runtime.sessions) as session:
        queued = await outputs_service.enqueue_copy(
            session,
            setup.runtime.settings,
            prediction_id="pred_x",
            tenant_id=setup.tenant.id,
            sources=[f"{sim_url}/sandbox/outputs/clip.mp4"],
            vendor_completed_at=None,
            model_name=None,
        )
    assert not queued  # the caller finishes with the vendor's URLs, as before
    assert await setup.copier.run_round() == 0


def test_allowed_hosts() -> None:
    from yarl import URL

    hosts = ["assets.vibedream.ai", "cdn.example.com:8443"]
    assert allowed_host(URL("https://assets.vibedream.ai/x.mp4"), hosts)
    assert allowed_host(URL("https://ASSETS.vibedream.ai./x.mp4"), hosts)
    assert not allowed_host(URL("https://assets.vibedream.ai:8080/x.mp4"), hosts)
    assert not allowed_host(URL("https://evil.assets.vibedream.ai/x.mp4"), hosts)
    assert allowed_host(URL("https://cdn.example.com:8443/x.mp4"), hosts)
    assert not allowed_host(URL("https://cdn.example.com/x.mp4"), hosts)


# ---------------------------------------------------------------- retention


async def test_retention_deletes_stored_outputs_per_tenant(stored: tuple[Setup, str, str, int]) -> None:
    setup, prediction_id, link, _ = stored
    patched = await setup.api.admin("PATCH", f"/admin/v1/tenants/{setup.tenant.id}", json={"outputRetentionDays": 2})
    assert patched.status_code == 200 and patched.json()["outputRetentionDays"] == 2
    store = open_store(setup.runtime.settings)
    sweep = outputs_service.sweep
    assert await sweep(setup.runtime.sessions, setup.runtime.settings, store) == 0

    clock.shift_to(clock.now() + timedelta(days=1))
    assert await sweep(setup.runtime.sessions, setup.runtime.settings, store) == 0  # the default is 30 days...
    clock.shift_to(clock.now() + timedelta(days=1, seconds=1))
    assert await sweep(setup.runtime.sessions, setup.runtime.settings, store) == 1  # ...this tenant keeps 2
    async with transaction(setup.runtime.sessions, readonly=True) as session:
        key = await session.scalar(select(StoredOutput.key).where(StoredOutput.prediction_id == prediction_id))
    assert key is not None
    assert not (Path(setup.runtime.settings.outputs_store) / key).exists()
    assert await setup.links(prediction_id) is None
    gone = await fetch(setup.api, link)  # still within the link's week, but the file is gone
    assert gone.status_code == 410
    usage = await setup.api.admin("GET", "/admin/v1/usage?groupBy=tenant")
    assert all(row.get("storedBytes", 0) == 0 for row in usage.json()["data"])


# ---------------------------------------------------------------- S3 (a real S3-compatible server)


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    port = free_port()
    binary = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test", region_name="us-east-1"
        )
        for _ in range(200):
            try:
                client.create_bucket(Bucket="vidgate-outputs")
                break
            except Exception:
                if proc.poll() is not None:
                    raise
                import time

                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def s3_overrides(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for name, value in dict(
        AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1"
    ).items():
        monkeypatch.setenv(name, value)
    return dict(outputs_store="s3://vidgate-outputs/test-run", outputs_s3_endpoint_url=moto_server)


async def test_s3_store_round_trip(setup: Setup, sim_url: str, s3_overrides: dict[str, Any]) -> None:
    import boto3

    for name, value in s3_overrides.items():
        setattr(setup.runtime.settings, name, value)
    setup.copier.store = open_store(setup.runtime.settings)
    size = 6 * 1024 * 1024 + 3  # more than one upload part
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/generated/{size}/s3.mp4"])
    await setup.copier.run_round()
    assert (await setup.row(prediction_id)).status == "completed"

    client = boto3.client("s3", endpoint_url=s3_overrides["outputs_s3_endpoint_url"])
    listed = client.list_objects_v2(Bucket="vidgate-outputs", Prefix=f"test-run/{prediction_id}/")
    assert [o["Size"] for o in listed["Contents"]] == [size]

    links = await setup.links(prediction_id)
    assert links is not None
    whole = await fetch(setup.api, links[0])
    assert hashlib.sha256(whole.content).hexdigest() == generated_digest("s3.mp4", size)
    part = await fetch(setup.api, links[0], Range="bytes=-100")
    assert part.status_code == 206
    assert part.content == whole.content[-100:]


@pytest.mark.skipif(not hasattr(os, "O_DIRECTORY"), reason="POSIX directory fsync")
async def test_the_local_store_syncs_the_directories_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "outputs"
    root.mkdir()
    target = root / "prediction" / "0.mp4"
    synced: list[tuple[int, bool]] = []  # (inode, the file there yet)
    fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, target.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 1000

    await LocalStore(root).put("prediction/0.mp4", chunks())
    assert target.read_bytes() == b"x" * 1000
    # The new directory's entry, the file's bytes, then its rename: each on disk before the file is
    # recorded as stored.
    assert synced == [(root.stat().st_ino, False), (target.stat().st_ino, False), (target.parent.stat().st_ino, True)]


async def test_an_output_that_fits_one_write_costs_one_hop_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.outputs import store as store_module

    hops: list[str] = []
    real = store_module._off_loop

    async def counting(fn: Any, *args: Any) -> Any:
        hops.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args)

    monkeypatch.setattr(store_module, "_off_loop", counting)

    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * (64 * 1024)

    store = LocalStore(tmp_path / "outputs")
    await store.put("small/0.mp4", chunks(4))
    assert hops == ["_finish"]  # open, write, fsync, rename, fsync the directory: one hop, not two
    hops.clear()
    await store.put("large/0.mp4", chunks(20))  # over one write buffer: opened when the first is full
    assert hops == ["_open_staging", "write", "_finish"]
    assert (tmp_path / "outputs" / "small" / "0.mp4").stat().st_size == 4 * 64 * 1024
    assert (tmp_path / "outputs" / "large" / "0.mp4").stat().st_size == 20 * 64 * 1024
    assert [p.name for p in (tmp_path / "outputs" / "large").iterdir()] == ["0.mp4"]  # no staging file left


# ---------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
async def test_memory_stays_flat_while_copying_a_large_output(setup: Setup, sim_url: str) -> None:
    size = 160 * 1024 * 1024
    prediction_id = await setup.prediction([f"{sim_url}/sandbox/generated/{size}/large.mp4"])
    baseline = rss_bytes()
    peak = baseline
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        await setup.copier.run_round()
    finally:
        stop.set()
        await sampler
    job = await setup.job(prediction_id)
    assert job.status == "stored" and job.stored_bytes == size
    # The whole file held at once would add 160 MB; chunks and two upload parts add a few.
    print(f"RSS grew by {(peak - baseline) / 2**20:.1f} MiB copying {size // 2**20} MiB")
    assert peak - baseline < size // 4, f"RSS grew by {(peak - baseline) // 2**20} MiB"
