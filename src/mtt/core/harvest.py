"""Harvests: counters taken exactly once (docs/protocol.md §6, harvests).

A read-and-reset (opt 5 with reset) zeroes the counters in the request that
reads them: when its reply is lost, those bytes are gone. A harvest (opt 7)
instead moves bytes_up, bytes_down and total_tunnels out of the live counters
into a pending harvest named by the panel's own id, in one step of the store.
Asking again with that id answers the very same numbers; only an ack (opt 8)
forgets them. So a lost reply loses nothing (ask again) and a retried request
counts nothing twice (the same id is the same harvest).

At most one harvest is pending at a time. A second one would have to say
which bytes belong to which, and a panel that lost its id could no longer
tell which of several pending ones it had stored; with one, a harvest under
another id is refused naming the pending one (opt 10 also tells it), and the
panel finishes that first. The ids of the last acknowledged harvests are
kept, so a delayed duplicate of an acknowledged request is refused instead of
taking a new harvest under an id the panel considers done.

Pure: the stores hold the state (memory, a SQLite table, Redis keys) and use
the book and pick() to decide; time is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from mtt.core.usage import Usage

# A reply carries each harvested user as {"path": ..., "bytes_up": ..., ...}:
# the JSON around a path, with three counters of up to 2^63, is below this.
ENTRY_OVERHEAD = 96
HARVEST_ID = re.compile(r"[A-Za-z0-9._:-]+")  # safe in logs, Redis and SQL alike


@dataclass(frozen=True, slots=True)
class HarvestBounds:
    """Sizes of harvest requests and replies (held by mtt.config.Limits)."""

    # A harvest_id: long enough for a UUID with a prefix, short enough to log.
    id_max_length: int = 128
    # Paths a harvest may name (args_bunch); the 2 MiB body allows far more.
    max_paths: int = 10_000
    # Users in one harvest; past it (or past max_reply) the reply says more: true
    # and the rest stays counted live, for the next harvest.
    max_users: int = 10_000
    # Bytes of the users of one reply, as ENTRY_OVERHEAD + the path's UTF-8 length each.
    max_reply: int = 1 << 20
    # Ids of acknowledged harvests remembered, oldest forgotten first.
    acked_kept: int = 1024


@dataclass(frozen=True, slots=True)
class Share:
    """What a harvest took of one user's counters."""

    bytes_up: int
    bytes_down: int
    total_tunnels: int

    @classmethod
    def of(cls, usage: Usage) -> Share:
        return cls(usage.bytes_up, usage.bytes_down, usage.total_tunnels)

    def __bool__(self) -> bool:
        return bool(self.bytes_up or self.bytes_down or self.total_tunnels)


@dataclass(frozen=True, slots=True)
class Harvest:
    """A harvest as taken: its users in path order, and whether more were left."""

    harvest_id: str
    taken_at: float  # unix time
    users: tuple[tuple[str, Share], ...]
    more: bool


@dataclass(frozen=True, slots=True)
class Taken:
    """The harvest under the id asked for; repeat: taken by an earlier request."""

    harvest: Harvest
    repeat: bool


@dataclass(frozen=True, slots=True)
class Refused:
    """No harvest under that id: another is pending, or the id was acknowledged."""

    pending_id: str  # "" when none is pending
    acked_before: bool  # the id itself was acknowledged already


HarvestOutcome = Taken | Refused


class AckState(StrEnum):
    ACKED = "acked"  # this request forgot the pending harvest
    ALREADY_ACKED = "already_acked"  # an earlier request did (a retried ack)
    UNKNOWN = "unknown"  # no harvest with that id is remembered


@dataclass(frozen=True, slots=True)
class Acked:
    state: AckState
    pending_id: str  # the harvest pending after this ack, "" when none


def id_problem(harvest_id: object, bounds: HarvestBounds) -> str | None:
    """Why a harvest_id is not acceptable, or None."""
    if not isinstance(harvest_id, str):
        return "must be a string"
    if not harvest_id:
        return "is empty"
    if len(harvest_id) > bounds.id_max_length:
        return f"is longer than {bounds.id_max_length} characters"
    if not HARVEST_ID.fullmatch(harvest_id):
        return "may hold only letters, digits and . _ : -"
    return None


def entry_cost(path: str) -> int:
    """Reply bytes one harvested user is charged against max_reply."""
    return ENTRY_OVERHEAD + len(path.encode())


def pick(
    counters: Mapping[str, Usage], paths: Iterable[str] | None, bounds: HarvestBounds
) -> tuple[tuple[tuple[str, Share], ...], bool]:
    """The users a new harvest takes, in path order: those with something to
    take, among paths (None: every user), within max_users and max_reply.
    The second value says whether users with something were left out."""
    wanted = counters.keys() if paths is None else {p for p in paths if p in counters}
    taken: list[tuple[str, Share]] = []
    size = 0
    for path in sorted(wanted):
        share = Share.of(counters[path])
        if not share:
            continue
        cost = entry_cost(path)
        if len(taken) >= bounds.max_users or (taken and size + cost > bounds.max_reply):
            return tuple(taken), True
        size += cost
        taken.append((path, share))
    return tuple(taken), False


class HarvestBook:
    """The pending harvest and the ids acknowledged lately, as a store holds them.

    A store asks first (verdict, ack_state), makes the answer durable, then
    records it here (begin, acked): the book never runs ahead of the store.
    """

    __slots__ = ("_acked", "kept", "pending")

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self.pending: Harvest | None = None
        self._acked: dict[str, None] = {}  # insertion order: oldest first

    def restore(self, pending: Harvest | None, acked: Iterable[str]) -> None:
        """State as a store loaded it (acked oldest first)."""
        self.pending = pending
        self._acked = {}
        for harvest_id in acked:
            self._remember(harvest_id)

    @property
    def acked_ids(self) -> tuple[str, ...]:
        return tuple(self._acked)

    def verdict(self, harvest_id: str) -> HarvestOutcome | None:
        """The answer to a harvest under harvest_id, or None: take a new one."""
        pending = self.pending
        if pending is not None:
            if pending.harvest_id == harvest_id:
                return Taken(pending, repeat=True)
            return Refused(pending.harvest_id, harvest_id in self._acked)
        if harvest_id in self._acked:
            return Refused("", acked_before=True)
        return None

    def begin(self, harvest: Harvest) -> None:
        if self.pending is not None:
            raise ValueError(f"harvest {self.pending.harvest_id} is pending")
        self.pending = harvest

    def ack_state(self, harvest_id: str) -> AckState:
        """What an ack of harvest_id does (nothing yet)."""
        if self.pending is not None and self.pending.harvest_id == harvest_id:
            return AckState.ACKED
        if harvest_id in self._acked:
            return AckState.ALREADY_ACKED
        return AckState.UNKNOWN

    def acked(self, harvest_id: str) -> None:
        """The pending harvest harvest_id is acknowledged: forget it, keep its id."""
        if self.pending is not None and self.pending.harvest_id == harvest_id:
            self.pending = None
        self._remember(harvest_id)

    def outcome(self, state: AckState) -> Acked:
        pending = self.pending
        return Acked(state, pending.harvest_id if pending is not None else "")

    def _remember(self, harvest_id: str) -> None:
        self._acked.pop(harvest_id, None)
        self._acked[harvest_id] = None
        while len(self._acked) > self.kept:
            del self._acked[next(iter(self._acked))]
