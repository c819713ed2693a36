"""The user table: URL path -> the user's TCP backend and per-user limits.

Lookups happen once per upgrade, changes come from the controller; a plain
dict gives O(1) lookups at a million users, and each controller request is
applied with one dict operation per entry after validation, so a reader on the
event loop never sees a half-applied request.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from mtt.address import Destination


class MuxProtocol(enum.StrEnum):
    """What a WebSocket carries when its client names no sub-protocol
    (docs/protocol.md §3): the server's -mux-protocol, or a user's "mux"."""

    NONE = "none"  # one plain byte stream (§4)
    SMUX = "smux"  # xtaci/smux (§5)
    MUXCOOL = "mux.cool"  # v2ray's Mux.Cool (§11)


@dataclass(frozen=True, slots=True)
class UserLimits:
    """What a panel sells: 0 means unlimited (or, for expire, never)."""

    rate: int = 0  # bytes/s in each direction, shared by all the user's tunnels
    max_tunnels: int = 0  # concurrent tunnels (WebSocket connections)
    max_ips: int = 0  # distinct client addresses with open tunnels
    quota: int = 0  # bytes up + down; past it new tunnels are refused
    expire: int = 0  # unix time; from then on new tunnels are refused

    def needs_admission(self) -> bool:
        """True when opening a tunnel needs the whole server's view (not just this process)."""
        return bool(self.max_tunnels or self.max_ips or self.quota or self.expire)


NO_LIMITS = UserLimits()
LIMIT_FIELDS = ("rate", "max_tunnels", "max_ips", "quota", "expire")


@dataclass(slots=True)
class User:
    dst: Destination
    limits: UserLimits = field(default=NO_LIMITS)
    # For a client that names no sub-protocol; None: the server's -mux-protocol.
    mux: MuxProtocol | None = None


class UserTable:
    """Paths to users; every method is all-or-nothing."""

    __slots__ = ("_routes",)

    def __init__(self) -> None:
        self._routes: dict[str, User] = {}

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, path: object) -> bool:
        return path in self._routes

    def __iter__(self) -> Iterator[str]:
        return iter(self._routes)

    def items(self) -> Iterable[tuple[str, User]]:
        return self._routes.items()

    def lookup(self, path: str) -> User | None:
        return self._routes.get(path)

    def add(self, entries: Iterable[tuple[str, User]]) -> None:
        """Add or overwrite; entries must already be validated."""
        self._routes.update(entries)

    def delete(self, paths: Iterable[str]) -> None:
        """Remove paths; unknown paths are ignored, as in the original."""
        routes = self._routes
        for path in paths:
            routes.pop(path, None)

    def reset(self) -> None:
        self._routes = {}

    def replace(self, entries: Iterable[tuple[str, User]]) -> None:
        """The whole table at once: one assignment, so no reader sees a gap."""
        self._routes = dict(entries)
