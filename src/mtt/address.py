"""Host:port addresses as users and flags write them."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from itertools import repeat
from operator import getitem, itemgetter
from typing import NamedTuple

# Matched whole (fullmatch): "$" would also match before a trailing newline.
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}")


class Destination(NamedTuple):
    """A TCP endpoint: host (name or address, IPv6 without brackets) and port.

    A named tuple rather than a frozen dataclass: as immutable, and made by
    tuple.__new__ (Destination._make over zip(hosts, ports)) in half the
    time, for the 40,000 Destinations of a bulk add in every process."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int | str) -> str:
    """host:port as Go's net.JoinHostPort writes it: an IPv6 host in brackets.

    The one formatter of addresses, so every log line and reply reads back with
    parse_destination; a host already in brackets is kept as it is.
    """
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_destination(text: str, *, allow_empty_host: bool = False) -> Destination:
    """Parse `host:port` (IPv6 in brackets) with port 1..65535; raise ValueError.

    allow_empty_host accepts `:port` (listen on every address), as Go does.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError("must be host:port")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{quote(host)} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or (not host and not allow_empty_host):
            raise ValueError("must be host:port")
        if ":" in host:
            raise ValueError("an IPv6 host must be written in brackets, [addr]:port")
        if host and not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{quote(host)} is not a valid host name or address")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError("port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535 and not (allow_empty_host and port == 0):
        raise ValueError("port must be a number from 1 to 65535")
    return Destination(host, port)


def quote(text: str, limit: int = 64) -> str:
    """Quote a value for an error message, cut so a reply or log line stays small."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(shown)


class DestinationParser:
    """parse_destination for many texts naming few hosts (a bulk add's 40,000
    `127.0.0.1:port`), with the same result or error for each text.

    A host parse_destination has accepted without brackets is remembered: a
    text of that host, a colon and a port then needs only the port checked, and
    its Destination shares the one host string. Anything else goes to
    parse_destination itself. Memory grows with the distinct hosts seen, so
    one parser lives as long as one request."""

    __slots__ = ("_hosts",)

    def __init__(self) -> None:
        self._hosts: dict[str, str] = {}  # host text -> the same text, kept once

    def parse(self, text: str) -> Destination:
        # A remembered host matched _HOSTNAME: no brackets, no colon in it, not
        # empty; so rpartition splits text exactly as parse_destination does.
        host, _, port_text = text.rpartition(":")
        known = self._hosts.get(host)
        if (
            known is not None
            and len(port_text) <= 5
            and port_text.isascii()
            and port_text.isdigit()
            and 1 <= (port := int(port_text)) <= 65535
        ):
            return Destination(known, port)
        destination = parse_destination(text)
        if not text.startswith("["):
            self._hosts.setdefault(destination.host, destination.host)
        return destination


def destinations(texts: Sequence[str]) -> list[Destination] | None:
    """parse_destination of every text, or None if any text is not a host
    without brackets, a colon and a port (parse_destination then says why,
    or parses what this leaves to it: an IPv6 address in brackets).

    For a bulk add's column of 40,000 dsts with a port each: a pass of C over
    the column per check instead of a parse per text, and the Destinations of
    one host share its string, as DestinationParser's do."""
    if not texts:
        return []
    host = texts[0].rpartition(":")[0]
    prefix = host + ":"
    hosts: list[str] | None = None  # None: every text is prefix and its port
    port_texts: list[str]
    if all(map(str.startswith, texts, repeat(prefix))):  # one host, a port each
        port_texts = list(map(getitem, texts, repeat(slice(len(prefix), None))))
    else:
        parts = [text.rpartition(":") for text in texts]
        port_texts = list(map(itemgetter(2), parts))
        hosts = list(map(itemgetter(0), parts))
    # With no colon in them, each port text is what rpartition splits off.
    if (
        not all(map(str.isdigit, port_texts))
        or not all(map(str.isascii, port_texts))
        or max(map(len, port_texts)) > 5
    ):
        return None
    ports = list(map(int, port_texts))
    if min(ports) < 1 or max(ports) > 65535:
        return None
    if hosts is None:
        if not _HOSTNAME.fullmatch(host):
            return None
        return list(map(Destination._make, zip(repeat(host), ports, strict=False)))
    # _HOSTNAME has no colon and no bracket: such a host is what rpartition split off.
    known = {host: host for host in set(hosts)}  # each host text, kept once
    if not all(map(_HOSTNAME.fullmatch, known)):
        return None
    return list(map(Destination._make, zip(map(known.__getitem__, hosts), ports, strict=True)))
