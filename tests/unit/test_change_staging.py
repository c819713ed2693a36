"""The user service stages a big change on the planes while the store writes
it, and applies it only once the store has it; a small one goes after."""

from __future__ import annotations

import asyncio
from typing import Any

from mtt.address import Destination
from mtt.config import Limits
from mtt.core.commands import Command, Entry, Opt
from mtt.core.users import User
from mtt.errors import StoreError
from mtt.service.user_service import UserService
from mtt.store.memory import MemoryStore
from mtt.transport.tasks import spawn

LIMITS = Limits(worker_stage_entries=3)


def add(count: int) -> Command:
    user = User(Destination("127.0.0.1", 1))
    return Command(Opt.ADD, entries=tuple(Entry(f"/u{i}", user) for i in range(count)))


class SlowStore(MemoryStore):
    """A store whose commit waits for a word, failing if told to; logs what happens."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.go = asyncio.Event()
        self.fail = False

    async def commit(self, command: Command) -> int:
        self.log.append("store begins")
        await self.go.wait()
        if self.fail:
            self.log.append("store fails")
            raise StoreError("disk full")
        self.log.append("store done")
        return await super().commit(command)


class Plane:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def stage(self, command: Command, kick: bool) -> None:
        self.log.append(f"stage {len(command.entries)}")

    async def apply(self, command: Command, kick: bool) -> None:
        self.log.append(f"apply {len(command.entries)}")

    async def collect(self) -> list[dict[str, Any]]:
        return []

    async def kick(self, paths: tuple[str, ...], why: str | None = None) -> int:
        return 0

    def grant(self, budgets: dict[str, int]) -> None:
        pass


async def test_a_big_change_is_staged_during_the_store_and_applied_after() -> None:
    log: list[str] = []
    store = SlowStore(log)
    service = UserService(store, limits=LIMITS)
    await service.start()
    service.plane = Plane(log)  # attach() would start the collector too
    change = spawn(service.change(add(3)), name="change")
    await asyncio.sleep(0.01)
    assert log == ["store begins", "stage 3"]
    store.go.set()
    assert await change == (1, 3)
    assert log == ["store begins", "stage 3", "store done", "apply 3"]
    log.clear()
    assert await service.change(add(2)) == (2, 3)
    assert log == ["store begins", "store done", "apply 2"]


async def test_a_change_the_store_refuses_is_staged_and_never_applied() -> None:
    log: list[str] = []
    store = SlowStore(log)
    store.fail = True
    service = UserService(store, limits=LIMITS)
    await service.start()
    service.plane = Plane(log)
    change = spawn(service.change(add(5)), name="change")
    await asyncio.sleep(0.01)
    store.go.set()
    try:
        await change
    except StoreError as exc:
        assert str(exc) == "disk full"
    else:
        raise AssertionError("the store's refusal went unreported")
    assert log == ["store begins", "stage 5", "store fails"]
    assert (service.revision, service.count()) == (0, 0)
