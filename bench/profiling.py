"""py-spy profiles of the gateway under the benchmark's own load (`python -m bench --profile`).

py-spy samples the running process (100 Hz, --nonblocking, busy threads only) into collapsed stacks;
this module turns them into shares of busy CPU time by component (which library's code was on top of
the stack) and by function (self and inclusive), and draws a small flamegraph SVG."""

from __future__ import annotations

import asyncio
import html
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

COMPONENTS = (
    ("app/", "vidgate app/"),
    ("sqlalchemy/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"),
    ("aiosqlite/", "aiosqlite/sqlite3"),
    ("sqlite3/", "aiosqlite/sqlite3"),
    ("fastapi/", "FastAPI"),
    ("starlette/", "Starlette"),
    ("uvicorn/", "uvicorn"),
    ("h11/", "h11 (HTTP parser)"),
    ("httptools/", "httptools"),
    ("pydantic", "pydantic"),
    ("aiohttp/", "aiohttp"),
    ("yarl/", "aiohttp"),
    ("multidict/", "aiohttp"),
    ("prometheus_client/", "prometheus_client"),
    ("asyncio/", "asyncio"),
    ("logging/", "logging"),
    ("json/", "json"),
    ("orjson", "orjson"),
    ("typing", "typing"),
    ("anyio/", "anyio"),
)


def pyspy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def component(file: str) -> str:
    path = file.replace("\\", "/")
    for marker, name in COMPONENTS:
        if f"/{marker}" in path or path.startswith(marker):
            return name
    return "other"


def _frame(text: str) -> tuple[str, str]:
    match = FRAME.match(text.strip())
    if not match:
        return text.strip(), "?"
    file = match.group("file")
    short = file
    for anchor in ("site-packages/", "/work/main/", "lib/python3"):
        if anchor in short:
            short = short.split(anchor, 1)[1]
    if "/app/" in file and not short.startswith("app/"):
        short = "app/" + file.split("/app/", 1)[1]
    return match.group("func"), short


# Leaves where a thread waits rather than works (a logging or executor thread blocked on its queue, the
# event loop in epoll): py-spy does not always see these as idle, so they are dropped from the shares.
IDLE_LEAVES = {
    "Condition.wait",
    "EpollSelector.select",
    "PollSelector.select",
    "SelectSelector.select",
    "Event.wait",
    "Thread._wait_for_tstate_lock",
}


def parse(raw: Path, *, drop_idle: bool = True) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        frames = [_frame(f) for f in head.split(";")]
        if drop_idle and frames and frames[-1][0] in IDLE_LEAVES:
            continue
        stacks.append((frames, int(count)))
    return stacks


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    stacks = parse(raw)
    total = sum(c for _, c in stacks)
    if not total:
        return {"samples": 0}
    by_component: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    app_inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        func, file = frames[-1]
        by_component[component(file)] += count
        self_time[f"{file}:{func}"] += count
        seen = set()
        for f, fl in frames:
            key = f"{fl}:{f}"
            if key not in seen:
                seen.add(key)
                inclusive[key] += count
                if component(fl) == "vidgate app/":
                    app_inclusive[key] += count
    share = lambda c: round(c / total, 4)  # noqa: E731
    return {
        "samples": total,
        "components": [(k, share(v)) for k, v in by_component.most_common()],
        "self": [(k, share(v)) for k, v in self_time.most_common(top)],
        "inclusive": [(k, share(v)) for k, v in inclusive.most_common(top * 2)],
        "app_inclusive": [(k, share(v)) for k, v in app_inclusive.most_common(top)],
        "raw": raw.name,
        "svg": raw.with_suffix(".svg").name,
    }


def flamegraph_svg(raw: Path, out: Path, width: int = 1600, row: int = 16, min_share: float = 0.002) -> None:
    """A plain flamegraph (root at the bottom) of collapsed stacks; hover a box for its share."""
    tree: dict[str, Any] = {"n": 0, "c": {}}
    for frames, count in parse(raw):
        node = tree
        node["n"] += count
        for func, file in frames:
            node = node["c"].setdefault(f"{func} ({file})", {"n": 0, "c": {}})
            node["n"] += count
    total = tree["n"] or 1

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(c) for c in node["c"].values() if c["n"] / total >= min_share), default=0)

    height = (depth(tree) + 1) * row
    boxes: list[str] = []

    def draw(node: dict[str, Any], name: str, x: float, level: int) -> None:
        w = node["n"] / total * width
        if w < min_share * width:
            return
        y = height - (level + 1) * row
        hue = 10 + (hash(name) % 40)
        label = html.escape(name)
        text = html.escape(name[: int(w / 7)]) if w > 30 else ""
        boxes.append(
            f'<g><title>{label}: {node["n"] / total:.1%}</title><rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" '
            f'fill="hsl({hue},80%,60%)"/><text x="{x + 3:.1f}" y="{y + row - 4}" font-size="11">{text}</text></g>'
        )
        cx = x
        for child_name, child in sorted(node["c"].items()):
            draw(child, child_name, cx, level + 1)
            cx += child["n"] / total * width

    draw(tree, "all", 0.0, 0)
    out.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace">'
        + "".join(boxes)
        + "</svg>"
    )


async def record(pid: int, prefix: Path, duration_s: float) -> dict[str, Any]:
    exe = pyspy()
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    raw = prefix.with_suffix(".txt")
    argv = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, int(duration_s))),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
    ]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode != 0 or not raw.exists():
        return {"error": out.decode(errors="replace")[-500:]}
    flamegraph_svg(raw, prefix.with_suffix(".svg"))
    summary = summarize(raw)
    # 100 samples a second of a thread that was busy all along: how much of one core the gateway used.
    summary["busy_share_of_one_core"] = round(summary.get("samples", 0) / (max(1, int(duration_s)) * 100), 3)
    return summary
