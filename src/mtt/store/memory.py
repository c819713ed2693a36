"""The original's behaviour: users live as long as the process (-db memory)."""

from __future__ import annotations

from collections.abc import Iterable

from mtt.core.commands import Command, Opt
from mtt.core.usage import Usage
from mtt.store.base import RemoteChange, Served, StoreSnapshot


class MemoryStore:
    """Counters in a dict; every commit succeeds."""

    def __init__(self) -> None:
        self.revision = 0
        self.usage: dict[str, Usage] = {}

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

    def watch(self, on_remote: RemoteChange, served: Served) -> None:
        pass

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
            counters = usage.setdefault(entry.path, Usage())
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
