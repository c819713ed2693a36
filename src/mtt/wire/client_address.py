"""Which address is the client's, when proxies we trust stand in front.

X-Forwarded-For lists every hop a request passed, each proxy appending the
address it accepted from; only the entries added by proxies we trust are
facts, anything further left may be made up by the client. So the list is
walked from the right, skipping trusted hops, and the first untrusted
address is the client's (nginx's `real_ip_recursive on`). X-Real-IP, one
address set by the last proxy, is used when there is no X-Forwarded-For.
Headers from a peer that is not a trusted proxy are ignored: anyone can send
them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from mtt.errors import ConfigError

UNIX = "unix:"  # as in nginx's set_real_ip_from: trust peers on a Unix socket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """The -trusted-proxy CIDRs; "unix:" trusts Unix-socket peers (client IP "")."""

    def __init__(self, cidrs: Iterable[str] = ()) -> None:
        networks: list[Network] = []
        self.unix = False
        for cidr in cidrs:
            if cidr == UNIX:
                self.unix = True
                continue
            try:
                networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ConfigError(f"-trusted-proxy {cidr!r} is not a CIDR or address") from None
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return self.unix or bool(self.networks)

    def contains(self, ip: str) -> bool:
        """Whether a peer at ip ("" for a Unix socket) is a trusted proxy."""
        if not ip:
            return self.unix
        address = _ip(ip)
        if address is None:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener reports IPv4 peers this way
        return any(address in network for network in self.networks)

    def real_client(
        self, peer_ip: str, headers: Iterable[tuple[bytes, bytes]], *, max_hops: int
    ) -> str:
        """The client's IP for a request from peer_ip with these (lower-case) headers;
        only the last max_hops X-Forwarded-For entries are looked at."""
        if not self.contains(peer_ip):
            return peer_ip
        forwarded: list[bytes] = []
        real_ip: list[bytes] = []
        for name, value in headers:
            if name == b"x-forwarded-for":
                forwarded.extend(value.split(b","))
            elif name == b"x-real-ip":
                real_ip.append(value)
        if forwarded:
            client = peer_ip
            for entry in reversed(forwarded[-max_hops:]):
                if not self.contains(client):
                    break
                ip = forwarded_ip(entry)
                if ip is None:
                    break  # garbage: believe nothing further left
                client = ip
            return client
        if len(real_ip) == 1 and (ip := forwarded_ip(real_ip[0])) is not None:
            return ip
        return peer_ip


def forwarded_ip(entry: bytes) -> str | None:
    """The IP of one X-Forwarded-For entry ("ip", "ipv4:port", "[ipv6]:port"), or None."""
    text = entry.strip()
    if not text.isascii() or len(text) > 64:
        return None
    host = text.decode("ascii")
    if host.startswith("["):
        host, sep, _ = host[1:].partition("]")
        if not sep:
            return None
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    address = _ip(host)
    return None if address is None else str(address)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in text:  # a scope id is local to the sender
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
