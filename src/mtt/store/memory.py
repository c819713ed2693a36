"""The original's behaviour: users live as long as the process (-db memory)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mtt.core.commands import Command, Opt
from mtt.core.harvest import (
    Acked,
    AckState,
    Harvest,
    HarvestBook,
    HarvestBounds,
    HarvestOutcome,
    Taken,
    pick,
)
from mtt.core.usage import Usage
from mtt.store.base import RemoteChange, Served, SharedCount, StoreSnapshot


class MemoryStore:
    """Counters in a dict; every commit succeeds. A pending harvest lives as
    long as the process, like the counters it was taken from."""

    def __init__(self) -> None:
        self.revision = 0
        self.usage: dict[str, Usage] = {}
        self.harvests = HarvestBook(HarvestBounds().acked_kept)

    async def load(self) -> StoreSnapshot:
        return StoreSnapshot(self.revision)

    async def commit(self, command: Command) -> int:
        apply_usage_change(self.usage, command)
        self.revision += 1
        return self.revision

    async def add_usage(self, deltas: dict[str, Usage]) -> None:
        usage = self.usage
        for path, delta in deltas.items():
            counters = usage.get(path)
            if counters is not None:
                counters.add(delta)

    async def read_usage(self, paths: Iterable[str] | None, reset: bool) -> dict[str, Usage]:
        return read_usage(self.usage, paths, reset)

    async def harvest(
        self,
        harvest_id: str,
        paths: Sequence[str] | None,
        now: float,
        bounds: HarvestBounds,
    ) -> HarvestOutcome:
        book = self.harvests
        book.kept = bounds.acked_kept
        verdict = book.verdict(harvest_id)
        if verdict is not None:
            return verdict
        users, more = pick(self.usage, paths, bounds)
        for path, _ in users:
            counters = self.usage[path]
            counters.bytes_up = counters.bytes_down = counters.total_tunnels = 0
        harvest = Harvest(harvest_id, now, users, more)
        book.begin(harvest)
        return Taken(harvest, repeat=False)

    async def ack_harvest(self, harvest_id: str, bounds: HarvestBounds) -> Acked:
        book = self.harvests
        book.kept = bounds.acked_kept
        state = book.ack_state(harvest_id)
        if state is AckState.ACKED:
            book.acked(harvest_id)
        return book.outcome(state)

    async def pending_harvest(self) -> Harvest | None:
        return self.harvests.pending

    def watch(self, on_remote: RemoteChange, served: Served) -> None:
        pass

    def shared_count(self) -> SharedCount | None:
        return None  # one node: its own count is the whole count

    def reachable(self) -> bool:
        return True

    async def close(self) -> None:
        pass


def apply_usage_change(usage: dict[str, Usage], command: Command) -> None:
    """What a change does to the counters: new users start at zero, removed
    users lose theirs, quota_used is set where the entry says so."""
    opt = command.opt
    if opt is Opt.RESET:
        usage.clear()
    elif opt is Opt.DELETE:
        for path in command.paths:
            usage.pop(path, None)
    elif opt in (Opt.ADD, Opt.REPLACE):
        if opt is Opt.REPLACE:
            keep = {e.path for e in command.entries}
            for path in [p for p in usage if p not in keep]:
                del usage[path]
        for entry in command.entries:
            counters = usage.get(entry.path)
            if counters is None:  # not setdefault: a Usage built for each of 40,000 kept ones
                counters = usage[entry.path] = Usage()
            if entry.quota_used is not None:
                counters.quota_used = entry.quota_used


def read_usage(
    usage: dict[str, Usage], paths: Iterable[str] | None, reset: bool
) -> dict[str, Usage]:
    """Copies of the counters, zeroing the resettable ones if asked."""
    selected = usage.keys() if paths is None else [p for p in paths if p in usage]
    out: dict[str, Usage] = {}
    for path in selected:
        counters = usage[path]
        out[path] = counters.copy()
        if reset:
            counters.bytes_up = counters.bytes_down = counters.total_tunnels = 0
    return out
