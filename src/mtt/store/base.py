"""The store interface: what the user service needs from memory, SQLite or Redis.

The service keeps the table it serves from in memory; a store makes changes
durable (or shared) before the controller answers res 1, and holds the
per-user counters, so billing survives restarts and adds up across nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mtt.core.commands import Command
from mtt.core.harvest import Acked, Harvest, HarvestBounds, HarvestOutcome
from mtt.core.leases import SharedRefusal
from mtt.core.usage import Usage
from mtt.core.users import User, UserLimits


@dataclass(slots=True)
class StoreSnapshot:
    revision: int = 0
    users: dict[str, User] = field(default_factory=dict)


# A change made by another node: (its revision, the command), or (revision, None)
# when the store cannot say what changed and the table must be reloaded.
RemoteChange = Callable[[int, Command | None], None]
# What the service serves now: (revision, number of users), for a shared store
# to compare with its own and ask for a reload when they disagree.
Served = Callable[[], tuple[int, int]]


class SharedCount(Protocol):
    """The tunnels of users with max_tunnels or max_ips, counted over every node
    (docs/redis.md, "Limits across nodes"): leases named by mtt.core.leases.
    Each call raises StoreError, within the store's socket timeout, if the
    store does not answer."""

    async def admit(
        self, path: str, name: str, ip: str, limits: UserLimits, lease: float
    ) -> SharedRefusal | None:
        """In one atomic step: drop the user's lapsed entries, count its tunnels
        and client addresses on every node, and add this one (lasting `lease`
        seconds) if it fits; else what it did not fit."""
        ...

    async def renew(self, held: Mapping[str, Sequence[str]], lease: float) -> None:
        """This node's entries (path -> names) last `lease` seconds more; those
        the store lapsed or never had are added back."""
        ...

    async def release(self, names: Mapping[str, Sequence[str]]) -> None:
        """Entries whose tunnels closed (path -> names) free their slots."""
        ...


class Store(Protocol):
    async def load(self) -> StoreSnapshot:
        """The table and its revision, as last committed."""
        ...

    async def commit(self, command: Command) -> int:
        """Make a validated change (opt 1-4) durable and return the revision it
        got (the one its controller reply names, whatever commits follow).

        Entries that carry quota_used set that counter; removed users lose
        their counters. Raise StoreError, having applied nothing, if it cannot.
        """
        ...

    async def add_usage(self, deltas: dict[str, Usage]) -> None:
        """Fold counter deltas in; paths that are not users are ignored."""
        ...

    async def read_usage(self, paths: Iterable[str] | None, reset: bool) -> dict[str, Usage]:
        """Counters of the given users (None: all); with reset, atomically zero
        bytes_up, bytes_down and total_tunnels (not quota_used) as they are read."""
        ...

    async def harvest(
        self,
        harvest_id: str,
        paths: Sequence[str] | None,
        now: float,
        bounds: HarvestBounds,
    ) -> HarvestOutcome:
        """Take a harvest (docs/protocol.md §6, harvests): move bytes_up,
        bytes_down and total_tunnels of the picked users (mtt.core.harvest.pick)
        into a pending harvest under harvest_id, in one step that is durable
        (or shared) before it returns; or answer the harvest already pending
        under that id; or refuse. StoreError, nothing moved, if it cannot."""
        ...

    async def ack_harvest(self, harvest_id: str, bounds: HarvestBounds) -> Acked:
        """Forget the pending harvest harvest_id, keeping its id (idempotent)."""
        ...

    async def pending_harvest(self) -> Harvest | None:
        """The harvest taken and not yet acknowledged, if any."""
        ...

    def watch(self, on_remote: RemoteChange, served: Served) -> None:
        """Be told of changes other nodes make (shared stores only)."""
        ...

    def shared_count(self) -> SharedCount | None:
        """The count of limited users' tunnels over every node, for a store that
        several nodes share; None: this node's own count is the whole count."""
        ...

    def reachable(self) -> bool:
        """Whether the store answers, as last seen: no round trip (for /readyz)."""
        ...

    async def close(self) -> None:
        """Flush what is buffered; later calls are not expected."""
        ...
