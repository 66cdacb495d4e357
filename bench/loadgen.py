"""The load generator: wrk with a generated Lua script (POST with a JSON body and an Authorization
header, or GET over a list of paths), one wrk thread, closed loop, fixed duration. When wrk is not
installed, `bench.aioload` (aiohttp in a separate process) stands in with the same output."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

LUA = r"""
local method = %(method)s
local body = %(body)s
local paths = {%(paths)s}
local auths = {%(auths)s}
local i = 0
request = function()
  i = i + 1
  local headers = {["Authorization"] = auths[(i %% #auths) + 1]}
  if body ~= nil then headers["Content-Type"] = "application/json" end
  return wrk.format(method, paths[(i %% #paths) + 1], headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50":%%d,"p75":%%d,"p90":%%d,"p99":%%d,"p999":%%d,"max":%%d,"mean":%%f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
"""


def _lua_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


@dataclass
class Load:
    """One closed-loop run's result. Latencies in milliseconds; rps counts only non-error answers."""

    requests: int
    errors: int
    duration_s: float
    p50: float
    p75: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float
    tool: str

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.duration_s if self.duration_s else 0.0

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {**self.__dict__, "rps": self.rps}


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


async def run_load(
    base_url: str,
    *,
    method: str,
    paths: list[str],
    auths: list[str],
    body: str | None,
    concurrency: int,
    duration_s: int,
    workdir: Path,
    timeout_s: int = 10,
) -> Load:
    if have_wrk():
        return await _wrk(base_url, method, paths, auths, body, concurrency, duration_s, workdir, timeout_s)
    return await _aioload(base_url, method, paths, auths, body, concurrency, duration_s, workdir, timeout_s)


def _parse(raw: dict[str, float], tool: str) -> Load:
    errors = int(raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"])
    return Load(
        requests=int(raw["requests"]),
        errors=errors,
        duration_s=raw["duration_us"] / 1e6,
        p50=raw["p50"] / 1000,
        p75=raw["p75"] / 1000,
        p90=raw["p90"] / 1000,
        p99=raw["p99"] / 1000,
        p999=raw["p999"] / 1000,
        max=raw["max"] / 1000,
        mean=raw["mean"] / 1000,
        tool=tool,
    )


async def _wrk(
    base_url: str,
    method: str,
    paths: list[str],
    auths: list[str],
    body: str | None,
    concurrency: int,
    duration_s: int,
    workdir: Path,
    timeout_s: int,
) -> Load:
    script = workdir / f"wrk-{method.lower()}-{len(paths)}-{len(auths)}.lua"
    script.write_text(
        LUA
        % {
            "method": _lua_str(method),
            "body": "nil" if body is None else _lua_str(body),
            "paths": ", ".join(_lua_str(p) for p in paths),
            "auths": ", ".join(_lua_str(a) for a in auths),
        }
    )
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{duration_s}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(script),
        base_url,
    ]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCHJSON "):
            return _parse(json.loads(line.removeprefix("BENCHJSON ")), "wrk")
    raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {out.decode()[-500:]} {err.decode()[-500:]}")


async def _aioload(
    base_url: str,
    method: str,
    paths: list[str],
    auths: list[str],
    body: str | None,
    concurrency: int,
    duration_s: int,
    workdir: Path,
    timeout_s: int,
) -> Load:
    spec = workdir / "aioload.json"
    spec.write_text(json.dumps({"base_url": base_url, "method": method, "paths": paths, "auths": auths, "body": body}))
    argv = [sys.executable, "-m", "bench.aioload", str(spec), str(concurrency), str(duration_s), str(timeout_s)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("BENCHJSON "):
            return _parse(json.loads(line.removeprefix("BENCHJSON ")), "aioload")
    raise RuntimeError(f"aioload gave no result (exit {proc.returncode}): {err.decode()[-800:]}")
