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

Requests go through httpx (:func:`client`: one pooled client per worker process and
allowance), whose connections are opened by :class:`GuardedBackend`, an httpcore network
backend that resolves and checks the host, then connects to a checked address. A kept-alive
connection is reused only for its own origin (scheme, host, port), so it was checked when
it was opened.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from taskexec.errors import DestinationNotAllowedError

__all__ = ["Allowance", "GuardedBackend", "client", "close_clients", "connect", "permitted", "refusal"]

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


def _refused(host: str, refused: list[str]) -> DestinationNotAllowedError:
    literal = refused[0].startswith(host + ",")
    return DestinationNotAllowedError(
        f"refused to connect to {'' if literal else host + ' at '}{refused[0]}: "
        "not allowed on this worker (the operator allows destinations in TASKEXEC_HTTP_ALLOW)"
    )


def permitted(host: str, port: int, allowance: Allowance) -> list[tuple[int, Any]]:
    """The addresses of ``host`` a connection may use, as ``(family, sockaddr)``, in resolver order.

    ``host`` is resolved once here: the caller connects to these socket addresses, never to
    the name again (a second resolution could answer another address: DNS rebinding).

    Raises:
        DestinationNotAllowedError: Every address of ``host`` is refused.
        OSError: ``host`` does not resolve.
    """
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    refused: list[str] = []
    found: list[tuple[int, Any]] = []
    for family, _, _, _, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if allowance.allows(host, ip):
            found.append((family, sockaddr))
        else:
            refused.append(f"{ip}, {refusal(ip)}")
    if found:
        return found
    if not refused:
        raise OSError(f"{host} has no address")
    raise _refused(host, refused)


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
    error: OSError | None = None
    for family, sockaddr in permitted(host, port, allowance):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if timeout is not None:
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as e:
            sock.close()
            error = e
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert error is not None  # permitted() returns at least one address
    raise error


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend whose TCP connections go through :func:`connect`.

    httpcore then wraps the socket in TLS for the URL's host (``server_hostname``), so the
    certificate is still verified against the name, not the address.
    """

    def __init__(self, allowance: Allowance) -> None:
        self.allowance = allowance

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = permitted(host, port, self.allowance)
        except OSError as e:  # DNS: a connection error, retried as one
            raise httpcore.ConnectError(f"{host}: {e}") from e
        error: Exception | None = None
        for _, sockaddr in addresses:
            # A literal address (scope included): the base backend connects to it as is.
            try:
                return super().connect_tcp(str(sockaddr[0]), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        assert error is not None
        raise error

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:  # pragma: no cover
        raise httpcore.UnsupportedProtocol("no unix sockets from a plan")


class GuardedTransport(httpx.HTTPTransport):
    """httpx's transport, its connection pool opening connections with :class:`GuardedBackend`."""

    def __init__(self, allowance: Allowance, limits: httpx.Limits) -> None:
        # A context of our own, verifying against the system's CAs (``SSL_CERT_FILE`` too):
        # what the worker's other TLS clients trust.
        tls = ssl.create_default_context()
        super().__init__(verify=tls, trust_env=False, limits=limits)
        # httpx does not take a network backend yet (encode/httpx#3180): the pool it built
        # is replaced by the same one with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=tls,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(allowance),
        )


#: Pooled clients of this process, by (pid, allowance, redirects). A forked child (a pool
#: process) never uses its parent's: their sockets would be shared.
_clients: dict[tuple[int, Allowance, bool], httpx.Client] = {}
_lock = threading.Lock()
#: Clients kept at most (a worker has one allowance; tests make many).
MAX_CLIENTS = 8


def client(allowance: Allowance, *, redirects: bool = True) -> httpx.Client:
    """This process's pooled httpx client for ``allowance``: http and https only, no
    proxies from the environment, every connection checked against ``allowance``.

    ``redirects``: follow them (at most 10, each to a checked connection); else a 3xx is
    returned as the response. Timeouts are given per request.
    """
    key = (os.getpid(), allowance, redirects)
    with _lock:
        found = _clients.get(key)
        if found is None:
            mine = [k for k in _clients if k[0] == key[0]]
            if len(mine) >= MAX_CLIENTS:
                _clients.pop(mine[0]).close()
            found = _clients[key] = httpx.Client(
                transport=GuardedTransport(allowance, httpx.Limits(max_connections=20, keepalive_expiry=30)),
                follow_redirects=redirects,
                max_redirects=10,
                trust_env=False,
            )
        return found


def close_clients() -> None:
    """Close this process's pooled clients (tests, a worker's shutdown)."""
    with _lock:
        pid = os.getpid()
        for key in [k for k in _clients if k[0] == pid]:
            _clients.pop(key).close()
