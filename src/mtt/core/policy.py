"""Which destinations users may be given (`-allow-dst`).

An open controller, or a compromised panel, could otherwise point a user at
anything the server can reach: the metadata service, the database on the
private network. Rules are CIDRs with optional port ranges; when any rule is
set, a dst must be an IP address inside one of them (a host name could be
re-pointed by DNS after the check).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mtt.address import Destination
from mtt.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DstRule:
    network: IPNetwork
    first_port: int = 1
    last_port: int = 65535

    def __str__(self) -> str:
        if (self.first_port, self.last_port) == (1, 65535):
            return str(self.network)
        ports = (
            str(self.first_port)
            if self.first_port == self.last_port
            else f"{self.first_port}-{self.last_port}"
        )
        return f"{self.network}:{ports}"


def parse_rule(text: str) -> DstRule:
    """`CIDR`, `CIDR:port` or `CIDR:first-last` (IPv6 CIDRs in brackets when a port follows)."""
    spec = text.strip()
    ports = ""
    if spec.startswith("["):
        network_text, sep, rest = spec[1:].partition("]")
        if rest.startswith("/"):  # [::1]/128:80 as well as [::1/128]:80
            prefix, _, tail = rest[1:].partition(":")
            network_text += "/" + prefix
            rest = ":" + tail if tail else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad -allow-dst {text!r}: use [v6-cidr]:ports")
        ports = rest[1:]
    elif spec.count(":") == 1:
        network_text, _, ports = spec.partition(":")
    else:
        network_text = spec
    try:
        network = ipaddress.ip_network(network_text, strict=False)
    except ValueError as exc:
        raise ConfigError(f"bad -allow-dst {text!r}: {exc}") from None
    if not ports:
        return DstRule(network)
    first_text, _, last_text = ports.partition("-")
    try:
        first = int(first_text)
        last = int(last_text) if last_text else first
    except ValueError:
        raise ConfigError(f"bad -allow-dst {text!r}: ports must be N or N-M") from None
    if not 1 <= first <= last <= 65535:
        raise ConfigError(f"bad -allow-dst {text!r}: ports must be within 1-65535, low to high")
    return DstRule(network, first, last)


@dataclass(frozen=True, slots=True)
class DstPolicy:
    rules: tuple[DstRule, ...] = ()

    def problem(self, dst: Destination) -> str | None:
        """Why dst is not allowed, or None."""
        if not self.rules:
            return None
        try:
            address = ipaddress.ip_address(dst.host.split("%", 1)[0])
        except ValueError:
            return "must be an IP address when -allow-dst is set"
        for rule in self.rules:
            if address in rule.network and rule.first_port <= dst.port <= rule.last_port:
                return None
        allowed = ", ".join(str(rule) for rule in self.rules)
        return f"is outside the allowed destinations ({allowed})"
