"""Starting and always stopping the benchmark's own processes.

Every process is started in a session of its own, so stopping it (SIGTERM, then SIGKILL) reaches its
children too and nothing else on the machine. `Processes.stop_all()` runs on normal exit, on an
exception, on Ctrl-C and on SIGTERM."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

_STATUS = re.compile(rb'"status":\s*(\d{3})')


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def statuses_since(self, offset: int) -> dict[str, int]:
        """HTTP statuses in vidgate's JSON access log ("vidgate.access" lines) written after `offset`."""
        counts: dict[str, int] = {}
        try:
            with self.log.open("rb") as handle:
                handle.seek(offset)
                for line in handle:
                    if b'"vidgate.access"' in line:
                        match = _STATUS.search(line)
                        if match:
                            key = match.group(1).decode()
                            counts[key] = counts.get(key, 0) + 1
        except OSError:
            pass
        return counts

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def proc_status_kb(pid: int, field: str) -> int | None:
    """A field of /proc/<pid>/status in kB (VmHWM = peak resident set, VmRSS = current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Processes:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[Proc] = []
        atexit.register(self.stop_all)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_all()
        raise SystemExit(128 + signum)

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Proc:
        log = self.log_dir / f"{name}.log"
        handle = log.open("ab")
        handle.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        handle.flush()
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 20.0) -> None:
        if proc in self.running:
            self.running.remove(proc)
        if proc.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(5)

    def stop_all_but(self, keep: Proc | None) -> None:
        for proc in list(reversed(self.running)):
            if proc is not keep:
                self.stop(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)


async def wait_http(url: str, proc: Proc, timeout_s: float = 60.0) -> None:
    """Wait until `url` answers anything below 500; fail early if the process died."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}; log {proc.log}:\n{proc.log_tail()}"
                )
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} did not answer {url} within {timeout_s:g} s; log {proc.log}:\n{proc.log_tail()}"
                )
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------- CPU taken by others

_CLK = os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK


def _ours_s(root: int, db_marker: str) -> dict[int, float]:
    """CPU seconds of this process (with its reaped children, e.g. finished wrk runs), of everything
    it started, and of the PostgreSQL backends serving the benchmark's databases."""
    parents: dict[int, int] = {}
    times: dict[int, tuple[float, float]] = {}
    marked: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            stat = (entry / "stat").read_text()
            rest = stat.rsplit(")", 1)[1].split()
            parents[pid] = int(rest[1])
            times[pid] = ((int(rest[11]) + int(rest[12])) / _CLK, (int(rest[13]) + int(rest[14])) / _CLK)
            if "postgres" in stat.split(")", 1)[0] and db_marker.encode() in (entry / "cmdline").read_bytes():
                marked.add(pid)
        except (OSError, IndexError, ValueError):
            continue
    ours = {root} | marked
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    out = {pid: times[pid][0] for pid in ours if pid in times}
    if root in times:
        out[root] = times[root][0] + times[root][1]
    return out


class CpuMeter:
    """How much of the machine's CPU went to processes that are not the benchmark's own while a
    measurement ran (other people's test suites on a shared machine, say). Reported per cell."""

    def __init__(self, db_marker: str = "vidgate_bench") -> None:
        self.db_marker = db_marker
        self.started = time.monotonic()
        self.busy0 = _machine_busy_s()
        self.ours0 = _ours_s(os.getpid(), db_marker)

    def foreign_cores(self) -> float:
        """Average number of cores busy with other processes since the meter started."""
        wall = time.monotonic() - self.started
        busy = _machine_busy_s() - self.busy0
        ours1 = _ours_s(os.getpid(), self.db_marker)
        # Processes started since count from zero; ones that ended since are lost (none do mid-cell).
        ours = sum(v - self.ours0.get(pid, 0.0) for pid, v in ours1.items())
        return max(busy - ours, 0.0) / wall if wall > 0 else 0.0
