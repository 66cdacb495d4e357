"""OpenAPI links: which operation an answer leads to, and with which of its values (a client, or a
fuzzer's stateful phase, follows them: create a tenant -> create its key -> revoke it)."""

from __future__ import annotations

from typing import Any


def link(method: str, path: str, **parameters: str) -> dict[str, Any]:
    """A link to `method path` of this API; each parameter is a runtime expression such as
    `$response.body#/id` or `$request.path.tenantId`."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method.lower()}", "parameters": parameters}


def links(status: int, description: str, **named: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry of a route whose `status` answer carries `named` links."""
    return {status: {"description": description, "links": named}}
