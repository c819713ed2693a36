"""The user service's admission with a shared count (mtt.service.shared_limits)
against a count in memory that a test can silence: which admissions ask it,
what each -redis-limits-when-down answer gives, what is let go and renewed.
The real count, in a real Redis, is test_redis_limits.py's."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import pytest

from mtt.address import Destination
from mtt.config import Limits
from mtt.core.commands import Command, Entry, Opt
from mtt.core.leases import SharedRefusal, WhenDown, lease_ip
from mtt.core.usage import Usage
from mtt.core.users import User, UserLimits
from mtt.errors import StoreError
from mtt.service.user_service import UserService
from mtt.store.memory import MemoryStore

DST = Destination("127.0.0.1", 9)
# Renewals a test can wait for; a retry during an outage only when a test says so.
FAST = dataclasses.replace(Limits(), redis_lease_renew=0.02, redis_limits_retry=3600.0)


class Count:
    """A shared count in memory: path -> entry names, as Redis keeps them."""

    def __init__(self) -> None:
        self.entries: dict[str, set[str]] = {}
        self.silent = False
        self.admits = 0
        self.renewals = 0
        self.released: list[str] = []

    def _answer(self) -> None:
        if self.silent:
            raise StoreError("Redis: no answer within 5 s")

    async def admit(
        self, path: str, name: str, ip: str, limits: UserLimits, lease: float
    ) -> SharedRefusal | None:
        self.admits += 1
        self._answer()
        names = self.entries.setdefault(path, set())
        if limits.max_tunnels and len(names) >= limits.max_tunnels:
            return SharedRefusal("tunnels", len(names))
        ips = {lease_ip(n) for n in names}
        if limits.max_ips and ip not in ips and len(ips) >= limits.max_ips:
            return SharedRefusal("ips", len(ips))
        names.add(name)
        return None

    async def renew(self, held: Mapping[str, Sequence[str]], lease: float) -> None:
        self._answer()
        self.renewals += 1
        for path, names in held.items():
            self.entries.setdefault(path, set()).update(names)

    async def release(self, names: Mapping[str, Sequence[str]]) -> None:
        self._answer()
        for path, gone in names.items():
            self.released.extend(gone)
            self.entries.get(path, set()).difference_update(gone)

    def held(self, path: str) -> int:
        return len(self.entries.get(path, ()))


class SharedStore(MemoryStore):
    def __init__(self, count: Count) -> None:
        super().__init__()
        self.count = count

    def shared_count(self) -> Count:  # type: ignore[override]
        return self.count


@pytest.fixture
def count() -> Count:
    return Count()


async def service_with(
    count: Count, when_down: WhenDown = WhenDown.OPEN, **users: UserLimits
) -> UserService:
    service = UserService(SharedStore(count), limits=FAST, when_down=when_down)
    await service.start()
    entries = tuple(Entry(path, User(DST, limits)) for path, limits in users.items())
    await service.change(Command(Opt.ADD, entries=entries))
    return service


@pytest.fixture
async def open_service(count: Count) -> AsyncIterator[UserService]:
    service = await service_with(
        count,
        **{"/two": UserLimits(max_tunnels=2), "/one-ip": UserLimits(max_ips=1)},
    )
    yield service
    await service.close()


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait for the keeper task (renewals every 20 ms) to have done something."""
    try:
        async with asyncio.timeout(5):
            while True:
                if check():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within 5 s: {what}") from None


async def test_only_users_with_max_tunnels_or_max_ips_ask_the_count(count: Count) -> None:
    service = await service_with(
        count,
        **{
            "/quota": UserLimits(quota=10**9, expire=2**40, rate=1000),
            "/none": UserLimits(),
            "/two": UserLimits(max_tunnels=2),
        },
    )
    try:
        for path in ("/quota", "/none"):
            assert (await service.admit(0, path, "10.0.0.1")).refused is None
        assert count.admits == 0
        assert (await service.admit(0, "/two", "10.0.0.1")).refused is None
        assert count.admits == 1
    finally:
        await service.close()


async def test_the_nodes_own_count_comes_first(open_service: UserService, count: Count) -> None:
    for _ in range(2):
        assert (await open_service.admit(0, "/two", "10.0.0.1")).refused is None
    assert (await open_service.admit(1, "/two", "10.0.0.1")).refused == "at its limit of 2 tunnels"
    assert count.admits == 2  # refused here, without a round trip


async def test_the_shared_refusal_frees_the_local_slot(
    open_service: UserService, count: Count
) -> None:
    count.entries["/two"] = {"other 1 10.0.0.7", "other 2 10.0.0.8"}  # another node's two
    verdict = await open_service.admit(0, "/two", "10.0.0.1")
    assert verdict.refused == "at its limit of 2 tunnels across nodes"
    count.entries["/two"].clear()  # the other node's tunnels closed
    for _ in range(2):  # the refusal took no slot of this node's own count
        assert (await open_service.admit(0, "/two", "10.0.0.1")).refused is None
    count.entries["/one-ip"] = {"other 1 10.0.0.7"}
    verdict = await open_service.admit(0, "/one-ip", "10.0.0.1")
    assert verdict.refused == "at its limit of 1 client addresses across nodes"


async def test_a_closed_tunnel_lets_go_of_its_lease_and_renewals_carry_the_rest(
    open_service: UserService, count: Count
) -> None:
    assert (await open_service.admit(0, "/two", "10.0.0.1")).refused is None
    assert (await open_service.admit(1, "/two", "10.0.0.2")).refused is None
    first, second = sorted(count.entries["/two"])
    count.entries["/two"].clear()  # Redis lost them (a flush): renewals add them back
    await until(lambda: count.held("/two") == 2, "renewed")
    await open_service.release(0, "/two", "10.0.0.1", Usage())
    await until(lambda: count.held("/two") == 1, "let go")
    (kept,) = count.entries["/two"]
    assert lease_ip(kept) == "10.0.0.2"
    open_service.agent_gone(1)  # a worker died with its tunnels
    await until(lambda: count.held("/two") == 0, "a dead worker's lease let go")
    assert sorted(count.released) == [first, second]


async def test_a_clean_shutdown_lets_go_of_every_lease(count: Count) -> None:
    service = await service_with(count, **{"/two": UserLimits(max_tunnels=2)})
    for ip in ("10.0.0.1", "10.0.0.2"):
        assert (await service.admit(0, "/two", ip)).refused is None
    await service.close()
    assert count.held("/two") == 0
    assert len(count.released) == 2


async def test_open_admits_on_the_nodes_count_and_says_so_once(
    open_service: UserService, count: Count, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mtt.service")
    count.silent = True
    assert (await open_service.admit(0, "/two", "10.0.0.1")).refused is None
    assert (await open_service.admit(0, "/two", "10.0.0.1")).refused is None
    assert count.admits == 1  # the second did not wait for a silent Redis
    # the node's own count still holds
    assert (await open_service.admit(0, "/two", "10.0.0.1")).refused == "at its limit of 2 tunnels"
    warnings = [r.getMessage() for r in caplog.records if "shared limits" in r.getMessage()]
    assert warnings == [
        "shared limits: Redis: no answer within 5 s; admitting on this node's own count"
        " until it answers (-redis-limits-when-down open)"
    ]
    count.silent = False
    # the next renewal ends the outage and hands Redis the tunnels admitted meanwhile
    await until(lambda: count.held("/two") == 2, "the outage's tunnels renewed")
    await until(lambda: "Redis answers again" in caplog.text, "the outage's end said")
    await open_service.release(0, "/two", "10.0.0.1", Usage())
    await until(lambda: count.held("/two") == 1, "let go")
    assert (await open_service.admit(0, "/two", "10.0.0.3")).refused is None
    assert count.admits == 2  # asked again


async def test_closed_refuses_limited_users_only(
    count: Count, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mtt.service")
    service = await service_with(
        count, WhenDown.CLOSED, **{"/two": UserLimits(max_tunnels=2), "/free": UserLimits()}
    )
    try:
        count.silent = True
        refusals = [(await service.admit(0, "/two", "10.0.0.1")).refused for _ in range(3)]
        assert refusals == [
            "its limits across nodes cannot be checked (Redis: no answer within 5 s);"
            " -redis-limits-when-down closed",
            *[
                "its limits across nodes cannot be checked (Redis did not answer a moment"
                " ago); -redis-limits-when-down closed"
            ]
            * 2,
        ]
        assert count.admits == 1  # only the first waited for Redis
        assert (await service.admit(0, "/free", "10.0.0.1")).refused is None
        assert caplog.text.count("refusing users with max_tunnels or max_ips") == 1
        count.silent = False
        # the entry a timed-out call may have added is let go once Redis answers
        await until(lambda: len(count.released) == 1, "the unsure entry let go")
        # the refusals took no slot: both fit
        assert (await service.admit(0, "/two", "10.0.0.1")).refused is None
        assert (await service.admit(0, "/two", "10.0.0.1")).refused is None
    finally:
        await service.close()
