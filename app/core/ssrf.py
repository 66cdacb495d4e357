"""SSRF guard for outgoing webhook deliveries.

Webhook URLs are chosen by tenants, so without a guard any tenant could make the
gateway call its own admin endpoints, the cloud metadata service or anything else on
the private network. The guard works in two layers, and deliveries need both:

* :func:`check_url` runs when a URL is registered and again right before each
  delivery. It rejects malformed URLs, credentials in URLs, internal-only host names
  and forbidden IP literals without touching DNS.
* :class:`GuardedResolver` is installed on the delivery ``TCPConnector``. aiohttp asks it
  for the addresses it is about to connect to, so the very addresses that were
  checked are the ones used: a DNS answer that changes between check and connect
  (DNS rebinding) cannot slip through.

aiohttp never consults the resolver for hosts it recognises as IP literals (canonical
dotted quads such as ``127.0.0.1`` and every IPv6 literal such as ``[::1]``): it
connects to them directly. Only :func:`check_url`
catches those, which is why it must run on every URL that is actually requested,
including redirect targets (deliver with ``allow_redirects=False``) and why the
delivery session must not pick up proxies from the environment (``trust_env=False``,
the default), since with a proxy the resolver only ever sees the proxy's host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Final, TypeAlias
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

__all__ = [
    "ForbiddenTarget",
    "GuardedResolver",
    "check_url",
    "forbidden_reason",
    "parse_ip_literal",
    "resolve_checked",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenTarget(OSError):
    """The URL or the address it resolves to may not be called.

    ``reason`` is a short human sentence saying what to change.

    It derives from ``OSError`` (and therefore still from ``Exception``) on purpose:
    aiohttp only treats ``OSError`` raised by a resolver as a connection failure. When
    :class:`GuardedResolver` refuses a target, aiohttp wraps it in
    ``aiohttp.ClientConnectorDNSError`` (a ``ClientConnectorError``/``ClientError``),
    so existing ``except aiohttp.ClientError`` handlers keep working, and the original
    instance stays reachable as both ``err.os_error`` and ``err.__cause__``.
    Test ``isinstance(err.__cause__, ForbiddenTarget)`` to tell a refused target (a
    configuration problem that retrying will not fix) from a network error.
    """

    reason: str

    def __init__(self, reason: str) -> None:
        # errno None + strerror: aiohttp copies strerror into the message of the
        # ClientConnectorError it wraps us in, so the reason shows up there.
        super().__init__(None, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self) -> tuple[type[ForbiddenTarget], tuple[str]]:
        # OSError would pickle as ForbiddenTarget(None, reason), which does not match
        # our constructor; pickling matters when errors cross process boundaries.
        return (type(self), (self.reason,))


# --------------------------------------------------------------------------- literals

_HEX_DIGITS: Final = frozenset("0123456789abcdef")
_OCT_DIGITS: Final = frozenset("01234567")
_DEC_DIGITS: Final = frozenset("0123456789")


def _parse_ipv4_part(part: str) -> int | None:
    # str.isdigit()/int() accept non-ASCII digits ("١٢٧"), which no resolver does, so
    # digits are checked against explicit ASCII sets.
    if part.startswith("0x"):
        digits = part[2:]
        if not set(digits) <= _HEX_DIGITS:
            return None
        # inet_aton and the WHATWG URL parser both read a bare "0x" as 0.
        return int(digits, 16) if digits else 0
    if not part or not set(part) <= _DEC_DIGITS:
        return None
    if len(part) > 1 and part[0] == "0":
        return int(part, 8) if set(part) <= _OCT_DIGITS else None
    # Anything longer cannot fit in 32 bits; the cap also keeps int() away from
    # CPython's limit on huge decimal strings.
    return int(part) if len(part) <= 10 else None


def _parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    parts = host.lower().split(".")
    # A single trailing dot (fully-qualified form) is accepted by browsers.
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        value = _parse_ipv4_part(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    # inet_aton semantics: leading parts are single bytes, the last part fills all
    # remaining bytes, so "127.1" is 127.0.0.1 and "10.1.2" is 10.1.0.2.
    if any(v > 0xFF for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def _parse_ipv6(host: str) -> ipaddress.IPv6Address | None:
    # In URLs the zone separator is percent-encoded ("fe80::1%25eth0").
    candidate = host.replace("%25", "%", 1)
    try:
        return ipaddress.IPv6Address(candidate)
    except ValueError:
        return None


def parse_ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Interpret ``host`` the way permissive resolvers (inet_aton, browsers, curl) do.

    Accepts dotted decimal, a single 32-bit integer (``2130706433``), octal
    (``0177.0.0.1``, ``017700000001``), hex (``0x7f.0.0.1``, ``0x7f000001``), shorthand
    (``127.1``, ``10.1.2``), mixes of those (``0x7f.1``), and bracketed or bare IPv6
    including IPv4-mapped forms (``::ffff:127.0.0.1``, ``[::ffff:7f00:1]``) and zones.

    Returns ``None`` when the host is not an IP literal, i.e. a DNS name. Note that a
    host that looks numeric but is out of range (``1.2.3.256``, ``08.0.0.1``) also
    yields ``None``; :func:`check_url` refuses such hosts separately.
    """
    if host.startswith("[") and host.endswith("]"):
        return _parse_ipv6(host[1:-1])
    if ":" in host:
        return _parse_ipv6(host)
    return _parse_ipv4(host)


def _looks_numeric(host: str) -> bool:
    # WHATWG URL rule: a host whose last label is a number is meant as IPv4, so if it
    # does not parse as one it is malformed rather than a DNS name. Such hosts are
    # refused so no resolver gets to apply its own, possibly laxer, reading of them.
    labels = host.lower().split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    last = labels[-1]
    if last.startswith("0x"):
        return set(last[2:]) <= _HEX_DIGITS
    return last != "" and set(last) <= _DEC_DIGITS


# ------------------------------------------------------------------------ address policy

_V4: Final[tuple[tuple[ipaddress.IPv4Network, str], ...]] = tuple(
    (ipaddress.IPv4Network(net), why)
    for net, why in (
        # Most specific first: the first match supplies the reason.
        ("169.254.169.254/32", "the cloud metadata endpoint (link-local 169.254.0.0/16)"),
        ("255.255.255.255/32", "the limited broadcast address"),
        ("0.0.0.0/8", "an unspecified 'this network' address (0.0.0.0/8)"),
        ("10.0.0.0/8", "a private address (10.0.0.0/8)"),
        ("100.64.0.0/10", "a carrier-grade NAT shared address (100.64.0.0/10)"),
        ("127.0.0.0/8", "a loopback address (127.0.0.0/8)"),
        ("169.254.0.0/16", "a link-local address (169.254.0.0/16)"),
        ("172.16.0.0/12", "a private address (172.16.0.0/12)"),
        ("192.0.0.0/24", "an IETF protocol assignment (192.0.0.0/24)"),
        ("192.0.2.0/24", "a documentation address (192.0.2.0/24)"),
        ("192.88.99.0/24", "a deprecated 6to4 relay anycast address (192.88.99.0/24)"),
        ("192.168.0.0/16", "a private address (192.168.0.0/16)"),
        ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15)"),
        ("198.51.100.0/24", "a documentation address (198.51.100.0/24)"),
        ("203.0.113.0/24", "a documentation address (203.0.113.0/24)"),
        ("224.0.0.0/4", "a multicast address (224.0.0.0/4)"),
        ("240.0.0.0/4", "a reserved address (240.0.0.0/4)"),
    )
)

_V6: Final[tuple[tuple[ipaddress.IPv6Network, str], ...]] = tuple(
    (ipaddress.IPv6Network(net), why)
    for net, why in (
        ("::/128", "the unspecified address (::)"),
        ("::1/128", "the loopback address (::1)"),
        ("fd00:ec2::254/128", "the AWS metadata endpoint (unique local fc00::/7)"),
        ("64:ff9b:1::/48", "a local-use NAT64 address (64:ff9b:1::/48)"),
        ("2001::/23", "an IETF protocol assignment such as Teredo (2001::/23)"),
        ("2001:db8::/32", "a documentation address (2001:db8::/32)"),
        ("3fff::/20", "a documentation address (3fff::/20)"),
        ("fc00::/7", "a unique local (private) address (fc00::/7)"),
        ("fe80::/10", "a link-local address (fe80::/10)"),
        ("fec0::/10", "a deprecated site-local address (fec0::/10)"),
        ("ff00::/8", "a multicast address (ff00::/8)"),
    )
)

_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_RESERVED_V6: Final = ipaddress.IPv6Network("::/8")
_GLOBAL_UNICAST_V6: Final = ipaddress.IPv6Network("2000::/3")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    # These forms make the kernel or a translator deliver to an IPv4 address, so that
    # IPv4 address is what gets judged.
    if ip in _V4_MAPPED:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "an IPv4-mapped form of"
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "a NAT64 (64:ff9b::/96) form of"
    if ip.sixtofour is not None:
        return ip.sixtofour, "a 6to4 (2002::/16) form of"
    if ip in _V4_COMPATIBLE:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), "an IPv4-compatible form of"
    return None


def forbidden_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Say why ``ip`` may not be called, or return ``None`` for a public unicast address.

    IPv6 forms that carry an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that IPv4 address. Explicit
    networks are used instead of ``ipaddress``'s ``is_private``/``is_global`` because
    those flags changed meaning between Python patch releases.
    """
    if isinstance(ip, ipaddress.IPv4Address):
        for net, why in _V4:
            if ip in net:
                return why
        return None

    for net6, why in _V6[:2]:
        if ip in net6:
            return why
    embedded = _embedded_ipv4(ip)
    if embedded is not None:
        inner, form = embedded
        inner_why = forbidden_reason(inner)
        return None if inner_why is None else f"{form} {inner}, which is {inner_why}"
    for net6, why in _V6[2:]:
        if ip in net6:
            return why
    if ip in _RESERVED_V6:
        return "a reserved address (::/8)"
    if ip not in _GLOBAL_UNICAST_V6:
        return "outside the global unicast range 2000::/3"
    return None


# ---------------------------------------------------------------------------- URLs

_INTERNAL_NAMES: Final = frozenset(
    {"localhost", "ip6-localhost", "ip6-loopback", "metadata.google.internal", "home.arpa"}
)
_INTERNAL_SUFFIXES: Final = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")
_FIX_HOST: Final = "use a publicly reachable host"


def _refuse_internal_name(host: str) -> None:
    # Trailing dots are stripped because "localhost." resolves exactly like "localhost".
    name = host.lower().rstrip(".")
    if name in _INTERNAL_NAMES or name.endswith(_INTERNAL_SUFFIXES):
        raise ForbiddenTarget(f"The host {host!r} is an internal-only name; {_FIX_HOST}.")


def check_url(url: str, *, allow_private: bool) -> None:
    """Raise :class:`ForbiddenTarget` unless ``url`` is an acceptable webhook target.

    Requires an absolute ``http``/``https`` URL with a host, no userinfo and, if a port
    is given, a port in 1..65535. Unless ``allow_private``, IP-literal hosts in any form
    :func:`parse_ip_literal` understands must pass :func:`forbidden_reason`, and
    internal-only names (``localhost``, ``*.localhost``, ``*.local``, ``*.internal``,
    ...) are refused. Does no DNS lookup; :class:`GuardedResolver` checks what names
    resolve to at connect time.
    """
    # Parsers disagree on whitespace, control characters and backslashes (some strip
    # them, some treat "\" as "/"), so any of them makes the URL ambiguous.
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in url):
        raise ForbiddenTarget("The URL contains whitespace, control characters or backslashes; percent-encode them.")
    try:
        # yarl is what aiohttp uses, so the host checked here is the host it connects to.
        parsed = URL(url)
        netloc = urlsplit(url).netloc
    except (ValueError, UnicodeError) as exc:
        raise ForbiddenTarget(f"The URL is not valid ({exc}); give a full http(s) URL.") from exc
    if parsed.scheme not in ("http", "https"):
        raise ForbiddenTarget("Only http:// and https:// URLs can receive webhooks.")
    host = parsed.raw_host
    if not parsed.is_absolute() or not host:
        raise ForbiddenTarget("The URL has no host; give a full URL such as https://example.com/hook.")
    # yarl silently drops an empty userinfo ("http://@host"), so look at the raw text.
    if parsed.raw_user is not None or parsed.raw_password is not None or "@" in netloc:
        raise ForbiddenTarget("The URL contains credentials (user:pass@); send them in a header instead.")
    port = parsed.explicit_port
    if port is not None and not 1 <= port <= 65535:
        raise ForbiddenTarget(f"Port {port} is not usable; use a port between 1 and 65535.")

    ip = parse_ip_literal(host)
    # yarl strips the brackets of "[v1.x]" and would pass "v1.x" on as a DNS name.
    if "[" in netloc and not isinstance(ip, ipaddress.IPv6Address):
        raise ForbiddenTarget(f"The bracketed host {host!r} is not an IPv6 address; fix the host.")
    if ip is None:
        if ":" in host or "%" in host:
            raise ForbiddenTarget(f"The host {host!r} is not a valid address or host name; fix the host.")
        if _looks_numeric(host):
            raise ForbiddenTarget(f"The host {host!r} looks like an IP address but is not a valid one; fix the host.")
        if not allow_private:
            _refuse_internal_name(host)
        return
    if not allow_private:
        why = forbidden_reason(ip)
        if why is not None:
            raise ForbiddenTarget(f"{_describe_literal(host, ip)} is {why}; {_FIX_HOST}.")


def _describe_literal(host: str, ip: IPAddress) -> str:
    # Show the canonical form too, so "0x7f.1" in a reason is recognisable as 127.0.0.1.
    shown = host.strip("[]")
    return f"The address {shown}" if shown == str(ip) else f"The address {shown} ({ip})"


# ------------------------------------------------------------------------- resolution


async def resolve_checked(host: str, port: int, *, allow_private: bool) -> list[str]:
    """Resolve ``host`` (both address families) and return the IP strings to connect to.

    Raises :class:`ForbiddenTarget` if any resolved address is forbidden (unless
    ``allow_private``) or if the lookup returns no IPv4/IPv6 address. Refusing when
    *any* address is bad, rather than dropping the bad ones, stops a name that mixes
    public and internal records from being used at all. IP-literal hosts skip DNS and
    are returned in canonical form. A failing lookup (``socket.gaierror``) propagates
    unchanged, as it may be transient and worth a retry, unlike a refused target.
    """
    literal = parse_ip_literal(host)
    if literal is not None:
        candidates: list[IPAddress] = [literal]
    else:
        loop = asyncio.get_running_loop()
        # No AI_ADDRCONFIG: every record is judged, even of a family this machine
        # cannot reach right now.
        infos = await loop.getaddrinfo(
            host, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        candidates = []
        for family, _type, _proto, _canon, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            text = str(sockaddr[0])
            if len(sockaddr) == 4 and "%" not in text and sockaddr[3]:
                # Without the scope a link-local address would not be connectable.
                text = f"{text}%{sockaddr[3]}"
            address = ipaddress.ip_address(text)
            if address not in candidates:
                candidates.append(address)
    if not candidates:
        raise ForbiddenTarget(f"The host {host!r} has no IPv4 or IPv6 address; check the host name.")
    if not allow_private:
        for address in candidates:
            why = forbidden_reason(address)
            if why is not None:
                if literal is not None:
                    raise ForbiddenTarget(f"{_describe_literal(host, address)} is {why}; {_FIX_HOST}.")
                raise ForbiddenTarget(f"{host} resolves to {address}, which is {why}; {_FIX_HOST}.")
    return [str(address) for address in candidates]


_NUMERIC_FLAGS: Final = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses forbidden targets at connect time.

    Put it on the ``TCPConnector`` used for webhook deliveries::

        connector = aiohttp.TCPConnector(resolver=GuardedResolver(allow_private=False))

    aiohttp connects to exactly the addresses returned here (they are flagged numeric,
    so nothing re-resolves them), which closes the DNS-rebinding window.

    How a refusal surfaces: :meth:`resolve` raises :class:`ForbiddenTarget`, an
    ``OSError``; aiohttp wraps it as ``aiohttp.ClientConnectorDNSError`` whose
    ``os_error`` and ``__cause__`` are the original ``ForbiddenTarget``. Callers tell a
    refused target from other failures with
    ``isinstance(err.__cause__, ForbiddenTarget)``. No connection is opened.

    aiohttp skips the resolver for canonical IP-literal hosts (``127.0.0.1``,
    ``[::1]``) and for the target behind a proxy, so :func:`check_url` must still be
    applied to every requested URL, redirects included.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        # Both families are always checked so a forbidden record of the other family
        # still condemns the name; the connector's family only filters the result.
        addresses = await resolve_checked(host, port, allow_private=self._allow_private)
        results: list[ResolveResult] = []
        for address in addresses:
            address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (socket.AF_UNSPEC, address_family):
                continue
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=address_family,
                    proto=socket.IPPROTO_TCP,
                    flags=_NUMERIC_FLAGS,
                )
            )
        if not results:
            # A plain OSError: aiohttp reports it as an ordinary DNS failure.
            raise OSError(None, f"{host} has no address of the family the connector uses")
        return results

    async def close(self) -> None:
        # Stateless: lookups go through the event loop's default executor.
        return None
