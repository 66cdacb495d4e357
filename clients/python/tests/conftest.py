"""The client against real processes: the upstream simulator, `vidgate migrate` and `vidgate serve`.

The gateway is the server's own `vidgate` command (next to this interpreter, or VIDGATE_BIN), started as
a subprocess with a fake vendor key pointing at the simulator, so it runs the same code as production.
A small fault proxy can sit between the client and the gateway. Nothing here imports the server.
"""

from __future__ import annotations

import http.server
import itertools
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import pytest

VIDGATE = os.environ.get("VIDGATE_BIN") or str(Path(sys.executable).parent / "vidgate")
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
STARTUP_S = 60.0
BODY: dict[str, Any] = {
    "image": "https://example.com/cat.png",
    "prompt": "a cat waves",
    "resolution": "480p",
    "duration": 5,
}
COST = 9  # what the simulator charges for BODY


_handed_out: set[int] = set()


def free_port() -> int:
    """A port for a server another process binds later. Not `bind(0)`: that answers from the ephemeral
    range, which every outgoing connection also draws from, so the port could be taken before the server
    binds it. Below that range the kernel hands nothing out by itself."""
    first = random.randrange(10_000, 32_000)
    for port in itertools.chain(range(first, 32_000), range(10_000, first)):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below 32000")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Gateway:
    url: str
    sim_url: str
    log_dir: Path
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return self.http.request(method, self.url + path, headers=headers, **kwargs)

    def tenant(self, **settings: Any) -> tuple[dict[str, Any], str]:
        settings.setdefault("name", "t-" + secrets.token_hex(4))
        created = self.admin("POST", "/admin/v1/tenants", json=settings)
        assert created.status_code == 201, created.text
        key = self.admin("POST", f"/admin/v1/tenants/{created.json()['id']}/keys", json={})
        assert key.status_code == 201, key.text
        return dict(created.json()), str(key.json()["key"])

    def sim(self, path: str, **values: Any) -> dict[str, Any]:
        answer = self.http.post(self.sim_url + path, json=values) if values else self.http.get(self.sim_url + path)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def upstream_submits(self) -> int:
        return int(self.sim("/_sim/stats")["submits"])


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    if not Path(VIDGATE).exists() and shutil.which(VIDGATE) is None:
        pytest.fail(
            f"the gateway's `vidgate` command is needed for these tests (looked for {VIDGATE}; set VIDGATE_BIN)"
        )
    work = tmp_path_factory.mktemp("gateway")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIDGATE_") and k != "VIBEDREAM_API_KEY"}
    sim_port, port = free_port(), free_port()
    sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{port}"
    env.update(
        VIDGATE_DATABASE_URL=f"sqlite:///{work / 'gateway.db'}",
        VIDGATE_UPSTREAM_BASE_URL=sim_url,
        VIDGATE_UPSTREAM_API_KEY="vd-fake-" + secrets.token_hex(8),
        VIDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        VIDGATE_PUBLIC_BASE_URL=url,
        VIDGATE_WEBHOOK_ALLOW_PRIVATE="true",
        # The gateway copies outputs from the simulator as it would from the vendor.
        VIDGATE_OUTPUT_HOSTS=f"127.0.0.1:{sim_port}",
        VIDGATE_OUTPUTS_STORE=str(work / "outputs"),
        VIDGATE_POLL_INTERVAL_S="0.3",
        # The gateway holds a submit at most 2 s: a 4 s prediction shows the client's polling after it.
        VIDGATE_PREFER_WAIT_MAX_S="2",
        VIDGATE_LOG_LEVEL="WARNING",
    )
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        proc = subprocess.Popen([VIDGATE, *args], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        processes.append(proc)
        return proc

    try:
        start("simulator", "simulator", "--port", str(sim_port), "--completion-s", "1", "--estimated-time", "0-1s")
        wait_until(lambda: _answers(sim_url + "/"), STARTUP_S, "the simulator")
        migrated = subprocess.run(
            [VIDGATE, "migrate"], env=env, cwd=work, capture_output=True, timeout=STARTUP_S, check=False
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        serve = start("serve", "serve", "--port", str(port))
        wait_until(lambda: serve.poll() is None and _answers(url + "/healthz"), STARTUP_S, "the gateway")
        yield Gateway(url, sim_url, work)
    finally:
        for proc in processes:
            proc.kill()
            proc.wait(15)


@pytest.fixture
def sim_defaults(gateway: Gateway) -> Gateway:
    """The simulator as the session started it: 1 s to complete, no faults."""
    gateway.sim("/_sim/config", completion_s=1, estimated_time="0-1s", failure_ratio=0)
    gateway.sim("/_sim/faults", submit_count=0, poll_count=0, poll_delay_s=0)
    return gateway


# ---------------------------------------------------------------- fault proxy


@dataclass
class FaultProxy:
    """Between the client and the gateway. `post_faults` is applied to the next POSTs in order:
    "drop" forwards the request, lets the gateway answer, then closes the connection without a word;
    "503" / "503-date" forward it too, then answer 503 with Retry-After in seconds / as an HTTP-date."""

    url: str
    post_faults: list[str] = field(default_factory=list)
    posts: list[dict[str, str]] = field(default_factory=list)  # the headers of every POST seen
    gets: list[str] = field(default_factory=list)  # the path of every GET
    lock: threading.Lock = field(default_factory=threading.Lock)


def _proxy_handler(target: str, proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    upstream = httpx.Client(base_url=target, timeout=120)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")
            }
            fault = None
            if self.command == "GET":
                proxy.gets.append(self.path)
            if self.command == "POST":
                with proxy.lock:
                    proxy.posts.append({k.lower(): v for k, v in headers.items()})
                    fault = proxy.post_faults.pop(0) if proxy.post_faults else None
            answer = upstream.request(self.command, self.path, content=body, headers=headers)
            if fault == "drop":
                self.close_connection = True
                return  # the gateway did the work; its answer is lost on the way back
            if fault in ("503", "503-date"):
                retry_after = "0" if fault == "503" else formatdate(time.time() + 1, usegmt=True)
                self._reply(503, {"Retry-After": retry_after}, b'{"code":"service_unavailable","detail":"proxy"}')
                return
            passed = {
                k: v
                for k, v in answer.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
            }
            self._reply(answer.status_code, passed, answer.content)

        def _reply(self, status: int, headers: dict[str, str], content: bytes) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(content)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(content)

        do_GET = _forward
        do_POST = _forward

    return Handler


@pytest.fixture
def fault_proxy(gateway: Gateway) -> Iterator[FaultProxy]:
    port = free_port()
    proxy = FaultProxy(f"http://127.0.0.1:{port}")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _proxy_handler(gateway.url, proxy))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
