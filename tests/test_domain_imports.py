"""The domains (the packages under app/ but core) depend on each other one way only: no import cycle,
counting every import, inside functions and under TYPE_CHECKING too. app/core imports no domain."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"
DOMAINS = sorted(p.name for p in APP.iterdir() if p.is_dir() and p.name != "core" and any(p.rglob("*.py")))


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from app import budgets` names the package in the alias, not in the module.
            modules.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return modules


def dependencies(package: str) -> dict[str, set[str]]:
    """The domains `package` imports, each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in sorted((APP / package).rglob("*.py")):
        for module in imported_modules(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[0] == "app" and parts[1] in DOMAINS and parts[1] != package:
                found.setdefault(parts[1], set()).add(str(path.relative_to(APP.parent)))
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path (its first node repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_the_domain_import_graph_has_no_cycle() -> None:
    edges = {domain: dependencies(domain) for domain in DOMAINS}
    cycle = find_cycle({domain: set(deps) for domain, deps in edges.items()})
    if cycle is not None:
        steps = [f"{a} -> {b} ({', '.join(sorted(edges[a][b]))})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("domain import cycle:\n  " + "\n  ".join(steps))


def test_core_imports_no_domain() -> None:
    assert dependencies("core") == {}


def test_the_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
