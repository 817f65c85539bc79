"""Where a plan's HTTP requests may go: public addresses, and what the operator allows.

A plan names URLs (an ``http`` task, a ``notify`` webhook) and a worker fetches them from
inside the operator's network. Unguarded, a plan reads what only the worker can reach:
``http://127.0.0.1:…`` (the worker's own services), ``http://169.254.169.254/…`` (the cloud
metadata service: instance credentials), a database's HTTP port on a private address.
So a request may reach only public addresses, unless the operator allows more
(``TASKEXEC_HTTP_ALLOW``: hostnames, ``*.example.com``, addresses and CIDR ranges).

Refused: loopback, private (RFC 1918, fc00::/7), link-local (169.254/16, fe80::/10),
unspecified, multicast, reserved, shared (CGNAT 100.64/10), anything else not globally
routable, the cloud metadata addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200),
and IPv6 forms that carry one of those (IPv4-mapped ``::ffff:127.0.0.1``, NAT64, 6to4).

The check runs **when the connection is made, on the addresses the connection uses**:
the hostname is resolved once, every address is checked, and the socket connects to a
checked address (TLS still verifies the certificate against the hostname). Checking the
URL first and letting the HTTP library resolve it again would let a DNS server answer a
public address to the check and ``127.0.0.1`` to the connection (DNS rebinding), and
would not see where a redirect leads; here every redirect is a new connection, checked
the same way. Proxies from the environment are not used: through a proxy, the worker
would check the proxy's address, not the destination's.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import ssl
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from taskexec.errors import DestinationNotAllowedError

__all__ = ["Allowance", "connect", "opener", "refusal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Instance metadata services (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba): named in errors.
METADATA = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200"))
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def refusal(ip: IPAddress) -> str | None:
    """Why a plan may not reach ``ip`` unless the operator allows it; ``None``: a public address.

    >>> refusal(ipaddress.ip_address("169.254.169.254")), refusal(ipaddress.ip_address("1.1.1.1"))
    ('a cloud metadata address', None)
    """
    if isinstance(ip, ipaddress.IPv6Address) and (v4 := _embedded_v4(ip)) is not None:
        inner = refusal(v4)
        return f"{inner} (as {v4})" if inner else None
    if ip in METADATA:
        return "a cloud metadata address"
    for reason, hit in (
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("an unspecified address", ip.is_unspecified),
        ("a multicast address", ip.is_multicast),
        ("a shared (CGNAT) address", isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
    ):
        if hit:
            return reason
    return None if ip.is_global else "not a public address"


def _host(name: str) -> str:
    return name.lower().rstrip(".")


@dataclass(frozen=True)
class Allowance:
    """The destinations the operator allows beyond public addresses (``TASKEXEC_HTTP_ALLOW``).

    Example:
        >>> a = Allowance.parse(["127.0.0.1/32", "*.internal.example.com"])
        >>> a.allows("api.internal.example.com", ipaddress.ip_address("10.0.0.5"))
        True
    """

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowance:
        """From ``TASKEXEC_HTTP_ALLOW`` entries (already validated by the settings)."""
        hosts, suffixes, networks = set(), [], []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                if entry.startswith("*."):
                    suffixes.append(_host(entry[1:]))
                else:
                    hosts.add(_host(entry))
        return cls(frozenset(hosts), tuple(suffixes), tuple(networks))

    def allows(self, host: str, ip: IPAddress) -> bool:
        """Whether a connection to ``host`` may use ``ip``."""
        name = _host(host)
        if name in self.hosts or any(name.endswith(s) for s in self.suffixes):
            return True
        if any(ip.version == net.version and ip in net for net in self.networks):
            return True
        return refusal(ip) is None


def connect(
    host: str,
    port: int,
    allowance: Allowance,
    timeout: float | None = None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """A TCP connection to ``host``, on an address that the allowance permits.

    Every address ``host`` resolves to is checked; the socket connects to the first
    permitted one that answers, so what was checked is what is reached.

    Raises:
        DestinationNotAllowedError: Every address of ``host`` is refused (nothing is sent).
        OSError: Resolution or every permitted connection failed.
    """
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    refused: list[str] = []
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if not allowance.allows(host, ip):
            refused.append(f"{ip}, {refusal(ip)}")
            continue
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, int | float):  # not urllib's "no timeout given" sentinel
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            error = e
            continue
        return sock
    if error is not None:
        raise error
    if not refused:
        raise OSError(f"{host} has no address")
    literal = refused[0].startswith(host + ",")
    raise DestinationNotAllowedError(
        f"refused to connect to {'' if literal else host + ' at '}{refused[0]}: "
        "not allowed on this worker (the operator allows destinations in TASKEXEC_HTTP_ALLOW)"
    )


class _Guarded:
    """Mixed into http.client's connections: their one socket comes from :func:`connect`."""

    allowance = Allowance()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # http.client opens its socket through this attribute (HTTPS then wraps it in TLS
        # for self.host): replacing it keeps the rest of the connection logic as is.
        self._create_connection = self._guarded

    def _guarded(
        self, address: tuple[str, int], timeout: float | None = None, source_address: Any = None
    ) -> socket.socket:
        host, port = address
        return connect(host, port, self.allowance, timeout, source_address)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connection: type[http.client.HTTPConnection]) -> None:
        super().__init__()
        self._connection = connection

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connection: type[http.client.HTTPSConnection]) -> None:
        super().__init__()
        self._connection = connection
        self._tls = ssl.create_default_context()  # verifies the certificate against the hostname

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection, req, context=self._tls)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@functools.lru_cache(maxsize=16)
def opener(allowance: Allowance, *, redirects: bool = True) -> urllib.request.OpenerDirector:
    """A urllib opener for http and https only, each connection checked against ``allowance``.

    No proxy, file, ftp or data handler: a redirect can only lead to another checked
    HTTP connection. ``redirects=False``: a 3xx is returned as an ``HTTPError``.
    """

    class Connection(_Guarded, http.client.HTTPConnection):
        pass

    class SecureConnection(_Guarded, http.client.HTTPSConnection):
        pass

    Connection.allowance = SecureConnection.allowance = allowance
    director = urllib.request.OpenerDirector()
    for h in (
        _HTTPHandler(Connection),
        _HTTPSHandler(SecureConnection),
        urllib.request.UnknownHandler(),  # any other scheme: URLError("unknown url type")
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPRedirectHandler() if redirects else _NoRedirect(),
    ):
        director.add_handler(h)
    return director
