"""max_tunnels and max_ips across nodes (-store redis://, docs/redis.md, "Limits
across nodes"): the bookkeeping a node does around the shared count.

Each tunnel a node admits for a user with max_tunnels or max_ips holds a
lease in the shared store: an entry named `<node> <n> <client ip>` that lives
until the node renews it or lets it go. A node that dies stops renewing, so
its entries lapse within the lease and free their slots for the other nodes.

Pure: the ledger of this node's leases (which entry a closing tunnel lets go,
which entries a renewal covers), the outage state that decides when the store
is asked again after it failed, and the refusal texts. The store runs the
count; the service schedules renewals and calls.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from mtt.core.users import UserLimits


class WhenDown(enum.StrEnum):
    """-redis-limits-when-down: what an admission the shared store cannot answer gets."""

    OPEN = "open"  # admitted on this node's own count (its workers' tunnels)
    CLOSED = "closed"  # refused


def shared_limited(limits: UserLimits) -> bool:
    """Whether an admission of this user needs the count across nodes; the
    others (rate, quota and expire only, or no limit) never pay the round trip."""
    return bool(limits.max_tunnels or limits.max_ips)


def lease_name(node: str, number: int, ip: str) -> str:
    """An entry's name: unique per node and tunnel, ending in the client address
    (which holds no space), so the store can count addresses from names alone."""
    return f"{node} {number} {ip}"


def lease_ip(name: str) -> str:
    """The client address at the end of an entry's name."""
    return name.split(" ", 2)[2]


@dataclass(frozen=True, slots=True)
class SharedRefusal:
    """What the shared count refused on: "tunnels" or "ips", and the count it saw."""

    kind: str
    count: int

    def reason(self, limits: UserLimits) -> str:
        """The log line's reason, worded as the node's own refusal (AdmissionBook)."""
        if self.kind == "tunnels":
            return f"at its limit of {limits.max_tunnels} tunnels across nodes"
        return f"at its limit of {limits.max_ips} client addresses across nodes"


def unchecked_reason(why: str) -> str:
    """The refusal of a limited user while the count cannot be had (WhenDown.CLOSED)."""
    return f"its limits across nodes cannot be checked ({why}); -redis-limits-when-down closed"


# A lease as the service keys it: (agent, path, client ip); leases of one key
# are interchangeable, since a closing tunnel names only its key.
LeaseKey = tuple[int, str, str]


class LeaseLedger:
    """This node's leases: every tunnel it admitted against the shared count
    and has not released, whether or not the store has heard of it yet (an
    admission while the store was away, with WhenDown.OPEN): renewals carry
    them all, so the store learns of those once it answers again. A lease
    taken for an admission still being decided is left out of renewals, which
    would otherwise add it behind the admission's back."""

    __slots__ = ("_by_key", "_deciding", "_next", "node")

    def __init__(self, node: str) -> None:
        self.node = node
        self._next = 0
        self._by_key: dict[LeaseKey, list[str]] = {}
        self._deciding: set[str] = set()

    def take(self, agent: int, path: str, ip: str) -> str:
        """A new lease for a tunnel being admitted; its entry's name. Then
        `admitted` or `drop` it."""
        self._next += 1
        name = lease_name(self.node, self._next, ip)
        self._by_key.setdefault((agent, path, ip), []).append(name)
        self._deciding.add(name)
        return name

    def admitted(self, name: str) -> None:
        """Its tunnel was admitted: renewals carry the lease from now on."""
        self._deciding.discard(name)

    def drop(self, agent: int, path: str, ip: str, name: str) -> None:
        """Its tunnel was refused."""
        self._deciding.discard(name)
        key = (agent, path, ip)
        names = self._by_key.get(key)
        if names is None or name not in names:
            return
        names.remove(name)
        if not names:
            del self._by_key[key]

    def give_back(self, agent: int, path: str, ip: str) -> str | None:
        """A tunnel of that key closed: the entry to release (None: it held none,
        being admitted before its user had these limits)."""
        key = (agent, path, ip)
        names = self._by_key.get(key)
        if names is None:
            return None
        # Any admitted one is as good: the tunnel's own is not told apart.
        at = next((i for i, name in enumerate(names) if name not in self._deciding), 0)
        name = names.pop(at)
        if not names:
            del self._by_key[key]
        self._deciding.discard(name)
        return name

    def agent_gone(self, agent: int) -> dict[str, list[str]]:
        """A worker died with its tunnels: path -> the entries to release."""
        gone: dict[str, list[str]] = {}
        for key in [k for k in self._by_key if k[0] == agent]:
            names = self._by_key.pop(key)
            self._deciding.difference_update(names)
            gone.setdefault(key[1], []).extend(names)
        return gone

    def held(self) -> dict[str, list[str]]:
        """path -> the entries of admitted tunnels, for a renewal."""
        held: dict[str, list[str]] = {}
        deciding = self._deciding
        for (_, path, _), names in self._by_key.items():
            kept = [name for name in names if name not in deciding]
            if kept:
                held.setdefault(path, []).extend(kept)
        return held

    def clear(self) -> dict[str, list[str]]:
        """Everything, forgotten: a clean shutdown releases it all."""
        everything: dict[str, list[str]] = {}
        for (_, path, _), names in self._by_key.items():
            everything.setdefault(path, []).extend(names)
        self._by_key.clear()
        self._deciding.clear()
        return everything

    def __len__(self) -> int:
        return sum(len(names) for names in self._by_key.values())


def merge(into: dict[str, list[str]], more: Iterable[tuple[str, Iterable[str]]]) -> None:
    """Entries to release, grouped by path."""
    for path, names in more:
        into.setdefault(path, []).extend(names)


class Outage:
    """Whether to ask the shared store now, and when an outage begins and ends
    (one log line each). While the store is away, one admission at a time, at
    most one every `retry` seconds, asks it again; the others get WhenDown's
    answer at once, so a stalled store costs only that one a socket timeout."""

    __slots__ = ("_next_try", "_probing", "down", "retry")

    def __init__(self, retry: float) -> None:
        self.retry = retry
        self.down = False
        self._probing = False
        self._next_try = 0.0

    def due(self, now: float) -> bool:
        """True: ask the store (it answered last time, or a retry is due now,
        which this call takes until it fails, succeeds or is abandoned)."""
        if not self.down:
            return True
        if self._probing or now < self._next_try:
            return False
        self._probing = True
        return True

    def failed(self, now: float) -> bool:
        """The store did not answer; True when this begins an outage."""
        self._probing = False
        self._next_try = now + self.retry
        began = not self.down
        self.down = True
        return began

    def answered(self) -> bool:
        """The store answered; True when this ends an outage."""
        self._probing = False
        ended = self.down
        self.down = False
        return ended

    def abandoned(self) -> None:
        """A call that `due` allowed ended without a word either way (cancelled)."""
        self._probing = False
