"""The gateway's public base URL as a caller sees it: what links in answers and webhooks start with."""

from __future__ import annotations

import re
from ipaddress import IPv6Address, ip_address

from starlette.requests import Request
from starlette.types import Scope

from app.core.errors import AppError
from app.core.settings import Settings

# RFC 9110 uri-host [":" port]: a registered name (letters, digits, '-', '_', dots), an IPv4 address or
# a bracketed IPv6 address. Anything else could inject a path, credentials or a second host into a link.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]{2,45})\]|(?P<name>[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_.])?))"
    r"(?::(?P<port>[0-9]{1,5}))?"
)


class InvalidHost(AppError):
    status = 400
    code = "invalid_host"
    title = "Invalid Host header"


def checked_host(value: str) -> str:
    match = _HOST.fullmatch(value)
    valid = match is not None and ".." not in (match["name"] or "") and int(match["port"] or 0) <= 65535
    if match is not None and valid and match["ipv6"]:
        try:
            IPv6Address(match["ipv6"])
        except ValueError:
            valid = False
    if not valid:
        raise InvalidHost("The Host header must be a host name or address with an optional port.", field="Host")
    return value


def _last(header: str | None) -> str | None:
    # Each proxy appends; the right-most value is the one our trusted peer wrote, not one a client sent it.
    if not header:
        return None
    return header.rsplit(",", 1)[-1].strip() or None


def _trusted(peer: str, settings: Settings) -> bool:
    if not settings.trusted_proxies:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in settings.trusted_proxies)


def public_base_url(request: Request, settings: Settings) -> str:
    """VIDGATE_PUBLIC_BASE_URL when set; otherwise the scheme and Host the request came with (or what a
    trusted proxy says they were), never an address the caller did not use."""
    if settings.public_base_url:
        return settings.public_base_url
    headers = request.headers
    return base_url_of(
        request.scope,
        settings,
        headers.get("host"),
        headers.get("x-forwarded-proto"),
        headers.get("x-forwarded-host"),
    )


def base_url_of(
    scope: Scope, settings: Settings, host: str | None, forwarded_proto: str | None, forwarded_host: str | None
) -> str:
    """public_base_url from the ASGI scope and the first value of each header (the bare routes read
    every header in one pass: app/predictions/hot.py)."""
    if settings.public_base_url:
        return settings.public_base_url
    scheme = "https" if scope.get("scheme") == "https" else "http"
    client = scope.get("client")
    if client and _trusted(client[0], settings):
        proto = _last(forwarded_proto)
        if proto in ("http", "https"):
            scheme = proto
        host = _last(forwarded_host) or host
    if not host:
        server = scope.get("server")
        if not server:
            raise InvalidHost("The request has no Host header.", field="Host")
        address, port = server
        host = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    return f"{scheme}://{checked_host(host)}{scope.get('root_path', '')}"


def client_address(request: Request, settings: Settings) -> str:
    """The caller's address: the peer, or what a trusted proxy says the client was (X-Forwarded-For's
    right-most entry, the one that proxy appended)."""
    client = request.scope.get("client")
    peer = client[0] if client else ""
    if peer and _trusted(peer, settings):
        forwarded = _last(request.headers.get("x-forwarded-for"))
        if forwarded:
            try:
                return str(ip_address(forwarded))
            except ValueError:
                pass
    return peer


def via_tls(request: Request, settings: Settings) -> bool:
    """Whether the client reached us over TLS: our own, or a trusted proxy's (X-Forwarded-Proto: https)."""
    if request.scope.get("scheme") == "https":
        return True
    client = request.scope.get("client")
    if client and _trusted(client[0], settings):
        return _last(request.headers.get("x-forwarded-proto")) == "https"
    return False
