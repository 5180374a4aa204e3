"""Outbound HTTP to user-supplied URLs (webhook steps, CRM adapters), guarded against SSRF.

A URL is vetted before any byte is sent: only http and https; the host is resolved and
refused when any address it resolves to is not public (private, loopback, link-local,
multicast, reserved, unspecified, shared 100.64/10, or such an address embedded in an
IPv6 form: IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo). Literal IPs in any form
``getaddrinfo`` accepts (``2130706433``, ``0x7f.1``) are judged by what they resolve to.

The request then goes to the vetted address itself, with the original ``Host`` header
and, for https, the original name as SNI and for certificate checks, so a DNS answer
that changes between check and connect cannot redirect it. Redirects are never
followed: a 3xx is returned to the caller as it is.

``settings.outbound_allow_private`` names hosts or CIDR ranges allowed anyway (an
internal CRM, a test server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import httpx
from temporalio.exceptions import ApplicationError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def refused(url: str, why: str) -> ApplicationError:
    return ApplicationError(
        f"outbound call to {url} refused: {why}", type="OutboundRefused", non_retryable=True
    )


@dataclass(frozen=True)
class AllowList:
    """Hosts (by name, case-insensitive) and networks reachable although not public."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str | None) -> AllowList:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in (spec or "").split(","):
            entry = raw.strip().strip("[]").lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        candidates = [ip, *_embedded_ipv4(ip)]
        return any(
            c in net for c in candidates for net in self.networks if c.version == net.version
        )


def _embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries (and would reach through a translator)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # ::/96 minus :: and ::1 (judged as IPv6)
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(ip in prefix for prefix in NAT64_PREFIXES):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _why_not_public(ip: IPAddress) -> str | None:
    checks = (
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("shared address space (100.64.0.0/10)", ip in SHARED_ADDRESS_SPACE),
        ("private", ip.is_private),
        ("reserved", ip.is_reserved),
        ("not globally routable", not ip.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why an outbound call must not reach ``ip``; None when it is a public address."""
    for inner in _embedded_ipv4(ip):
        why = _why_not_public(inner)
        if why is not None:
            return f"{ip} embeds {inner}, which is {why}"
    why = _why_not_public(ip)
    return f"{ip} is {why}" if why else None


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A vetted URL and the address a request to it must connect to."""

    url: httpx.URL
    host: str
    ip: IPAddress
    addresses: tuple[IPAddress, ...] = field(default=())


async def vet_url(
    url: str | httpx.URL,
    allow: AllowList | str | None = None,
    *,
    resolve: Resolver = system_resolve,
) -> Target:
    """Check that ``url`` may be called; raise ``OutboundRefused`` if not.

    Resolution failures are ordinary (retryable) errors: DNS can recover.
    """
    allow = allow if isinstance(allow, AllowList) else AllowList.parse(allow)
    shown = str(url)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as err:
        raise refused(shown, f"not a valid URL ({err})") from None
    if parsed.scheme not in ("http", "https"):
        raise refused(shown, f"scheme {parsed.scheme or '(none)'!r} is not http or https")
    host = parsed.host
    if not host:
        raise refused(shown, "the URL has no host")
    if "%" in host:
        raise refused(shown, "IPv6 zone identifiers are not allowed")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    bare = host.rstrip(".")
    if (bare == "localhost" or bare.endswith(".localhost")) and not allow.allows_host(host):
        # RFC 6761: loopback by definition, whatever a resolver says.
        raise refused(shown, f"{host!r} is loopback (allow it with NURTURE_OUTBOUND_ALLOW_PRIVATE)")
    try:
        resolved = await resolve(host, port)
    except (OSError, UnicodeError) as err:
        raise RuntimeError(f"outbound call to {shown}: cannot resolve {host!r}: {err}") from None
    addresses: list[IPAddress] = []
    for text in resolved:
        try:
            addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError:
            raise refused(shown, f"{host!r} resolved to {text!r}, not an IP address") from None
    if not addresses:
        raise RuntimeError(f"outbound call to {shown}: {host!r} resolved to no address")
    if not allow.allows_host(host):
        for ip in addresses:
            if allow.allows_ip(ip):
                continue
            why = forbidden_reason(ip)
            if why is not None:
                via = "" if host == str(ip) else f"; {host!r} resolves to it"
                raise refused(shown, f"{why}{via} (allow it with NURTURE_OUTBOUND_ALLOW_PRIVATE)")
    return Target(parsed, host, addresses[0], tuple(addresses))


def pin(target: Target, request: httpx.Request) -> None:
    """Point ``request`` at the vetted address, keeping Host and TLS name of the URL.

    The Host header was set from the URL when the request was built.
    """
    request.url = request.url.copy_with(host=str(target.ip))
    if target.url.scheme == "https":
        request.extensions = {**request.extensions, "sni_hostname": target.host}


async def request(
    method: str,
    url: str,
    *,
    allow_private: str | None,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    json: object = None,
    params: Mapping[str, str] | None = None,
    timeout_seconds: float = 10,
    resolve: Resolver = system_resolve,
) -> httpx.Response:
    """One HTTP request to a user-supplied URL through the guard; redirects are not followed.

    Raises ``OutboundRefused`` (non-retryable) for a refused target, ``httpx.HTTPError``
    for network failures.
    """
    target = await vet_url(url, allow_private, resolve=resolve)
    # trust_env=False: a proxy from the environment would connect on our behalf, unpinned.
    async with httpx.AsyncClient(
        timeout=timeout_seconds, follow_redirects=False, trust_env=False
    ) as client:
        built = client.build_request(
            method, target.url, headers=headers, content=content, json=json, params=params
        )
        pin(target, built)
        return await client.send(built, follow_redirects=False)
