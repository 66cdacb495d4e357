"""`vidgate serve` runs its worker as a child process (`vidgate worker`), not as tasks in the process that
serves requests: the child polls, delivers and reports its metrics through serve's /metrics; stopping
serve stops it, a killed serve leaves no orphan, and a child that dies is started again.

Real processes against this module's database (SQLite or PostgreSQL, following VIDGATE_TEST_DB)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Receiver, valid_body
from tests.procs import ADMIN_TOKEN, Gateway, Proc, Procs, Simulator, gateway_env, until, verify

# Fixtures: pytest finds them in this module's namespace (`x as x` marks them as used on purpose).
from tests.procs import module_procs_fixture as module_procs_fixture
from tests.procs import proc_cwd_fixture as proc_cwd_fixture
from tests.procs import proc_db_fixture as proc_db_fixture
from tests.procs import procs_fixture as procs_fixture
from tests.procs import sim_fixture as sim_fixture
from tests.procs import simulator_proc_fixture as simulator_proc_fixture

pytestmark = pytest.mark.slow


def children_started(proc: Proc) -> list[int]:
    """The worker processes serve started, in order (from its log)."""
    return [int(e["pid"]) for e in proc.logs() if e.get("msg") == "worker process started"]


def pollers(proc: Proc) -> list[int]:
    """The process id of every worker loop that started, from its `worker_id` (host-pid-random)."""
    return [int(e["worker_id"].split("-")[-2]) for e in proc.logs() if e.get("msg") == "worker started"]


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def completes_with_webhook(gw: Gateway, key: str, secret: str, receiver: Receiver) -> dict[str, Any]:
    submitted = await gw.submit_ok(key, valid_body())
    final: dict[str, Any] = {}

    async def completed() -> bool:
        final.update(await gw.prediction(key, submitted["id"]))
        return final["status"] == "completed"

    await until(completed, 30, "the prediction to complete", every=0.1)
    event = verify(secret, await receiver.next(timeout=30))
    assert event["type"] == "prediction.completed" and event["data"]["id"] == submitted["id"]
    return final


async def scrape(gw: Gateway) -> str:
    answer = await gw.http.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.text


def sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_serve_polls_from_a_child_process_and_stops_it(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    gw = await procs.serve(gateway_env(proc_db, sim))
    async with gw.http:
        await until(lambda: len(pollers(gw.proc)) == 1, 30, "the worker to start")
        [child] = children_started(gw.proc)
        # The one worker loop runs in the child: the process serving requests runs none.
        assert pollers(gw.proc) == [child] and child != gw.proc.pid

        receiver: Receiver = await receiver_factory()
        tenant, key = await gw.tenant(webhookUrl=receiver.url)
        await completes_with_webhook(gw, key, tenant["webhookSecret"], receiver)

        # The child's poll and delivery metrics are in serve's scrape (each is counted once stored, which
        # may be just after the prediction reads as completed and the receiver has its webhook).
        async def counted() -> bool:
            metrics = await scrape(gw)
            return (
                sample(metrics, "vidgate_upstream_polls_per_prediction_count") >= 1
                and sample(metrics, 'vidgate_webhook_attempts_total{outcome="succeeded"}') >= 1
            )

        await until(counted, 30, "the poll and the delivery in /metrics", every=0.1)

        gw.proc.send(signal.SIGTERM)
        assert await gw.proc.wait(60) == -signal.SIGTERM, gw.proc.tail()  # as uvicorn dies by it
        assert gone(child)
        messages = [e.get("msg") for e in gw.proc.logs()]
        assert "worker stopped" in messages  # drained and handed its leases back, stopped by serve itself:
        assert "serve went away; stopping" not in messages  # not by the end of the pipe


async def test_a_killed_serve_leaves_no_worker_behind(procs: Procs, proc_db: str, sim: Simulator) -> None:
    gw = await procs.serve(gateway_env(proc_db, sim))
    async with gw.http:
        await until(lambda: len(pollers(gw.proc)) == 1, 30, "the worker to start")
        [child] = children_started(gw.proc)
        os.kill(gw.proc.pid, signal.SIGKILL)  # serve alone: its child is not signalled
        await until(lambda: gone(child), 60, "the orphaned worker to exit")
        logs = gw.proc.logs()
        assert any(e.get("msg") == "serve went away; stopping" for e in logs)
        assert any(e.get("msg") == "worker stopped" for e in logs)  # drained, leases handed back


async def test_a_worker_child_that_dies_is_started_again(
    procs: Procs, proc_db: str, sim: Simulator, receiver_factory: Any
) -> None:
    gw = await procs.serve(gateway_env(proc_db, sim))
    async with gw.http:
        await until(lambda: len(pollers(gw.proc)) == 1, 30, "the worker to start")
        [first] = children_started(gw.proc)
        os.kill(first, signal.SIGKILL)
        await until(lambda: len(pollers(gw.proc)) == 2, 60, "a new worker to start")
        second = children_started(gw.proc)[-1]
        assert second != first and pollers(gw.proc)[-1] == second
        exited = [e for e in gw.proc.logs() if e.get("msg") == "worker process exited; restarting it"]
        assert [(e["pid"], e["returncode"]) for e in exited] == [(first, -signal.SIGKILL)]

        receiver: Receiver = await receiver_factory()
        tenant, key = await gw.tenant(webhookUrl=receiver.url)
        await completes_with_webhook(gw, key, tenant["webhookSecret"], receiver)
