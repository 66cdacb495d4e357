"""Every operator API route has a `vidgate` command that does the same, with `--json` (SPEC §13): each route
names its command (`x-cli` in the OpenAPI document), and the command must exist. A route added without one,
or naming a command nobody wrote, fails here."""

from __future__ import annotations

from typing import Any

import typer

from app.cli import cli
from app.main import create_app
from tests.conftest import make_settings


def operator_operations() -> list[tuple[str, str, dict[str, Any]]]:
    app = create_app(make_settings("sqlite+aiosqlite:///unused.db", "http://127.0.0.1:9"))
    paths = app.openapi()["paths"]
    return [
        (method.upper(), path, operation)
        for path, operations in paths.items()
        if path.startswith("/admin/")
        for method, operation in operations.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def find_command(words: list[str]) -> Any:
    """The command `vidgate <words>` runs (typer's own click: groups are told by their `commands`)."""
    command: Any = typer.main.get_command(cli)
    for word in words:
        if not hasattr(command, "commands"):
            return None
        command = command.commands.get(word)
    return command


def test_every_operator_route_has_a_command_with_json() -> None:
    operations = operator_operations()
    assert len(operations) >= 20
    missing = []
    for method, path, operation in operations:
        name = operation.get("x-cli")
        command = find_command(name.split()) if name else None
        if command is None or hasattr(command, "commands"):
            missing.append(
                f"{method} {path}: x-cli={name!r} names no vidgate command "
                "(write the command, and name it on the route: openapi_extra=cli('group command'))"
            )
            continue
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        if "--json" not in options:
            missing.append(f"{method} {path}: `vidgate {name}` has no --json")
    assert not missing, "\n".join(missing)


def test_the_finder_tells_a_missing_command() -> None:
    assert find_command(["tenants", "create"]) is not None
    assert find_command(["tenants", "levitate"]) is None
    assert find_command(["nothing"]) is None
