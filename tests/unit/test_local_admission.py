"""A process admits a tunnel of a user limited by quota and expire alone from
what it already holds (its quota budget, an expire far enough away), and asks
the user service whenever that is not enough to say yes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from mtt.address import Destination
from mtt.core.admission import Verdict
from mtt.core.commands import Command, Entry, Opt
from mtt.core.rate import Direction
from mtt.core.usage import Usage
from mtt.core.users import User, UserLimits
from mtt.service.agent import Agent

HORIZON = 2.0
DST = Destination("127.0.0.1", 9)
QUOTA = 1 << 20


class Link:
    """The service: admits every tunnel, with the quota left it was given."""

    def __init__(self, quota_left: int | None) -> None:
        self.quota_left = quota_left
        self.admits = 0
        self.released: list[Usage] = []

    async def admit(self, path: str, ip: str) -> Verdict:
        self.admits += 1
        return Verdict(None, self.quota_left)

    def release(self, path: str, ip: str, delta: Usage) -> None:
        self.released.append(delta)

    async def tokens(self, path: str, direction: Direction, want: int) -> int:
        return want

    def exhausted(self, path: str, closed: int, unreported: int) -> None:
        pass


class Tunnel:
    def __init__(self) -> None:
        self.kicked: list[str | None] = []
        self.paused: list[Direction] = []

    def kick(self, why: str | None = None) -> bool:
        self.kicked.append(why)
        return True

    def throttle_pause(self, direction: Direction) -> None:
        self.paused.append(direction)

    def throttle_resume(self, direction: Direction) -> None:
        pass


def agent_with(limits: UserLimits, link: Link, path: str = "/u") -> Agent:
    agent = Agent(link, HORIZON)
    agent.apply(Command(Opt.ADD, (Entry(path, User(DST, limits)),)), kick=False)
    return agent


def ask(agent: Agent, path: str = "/u") -> Awaitable[str | None] | None:
    user = agent.table.lookup(path)
    assert user is not None
    return agent.admission(path, user, "192.0.2.1")


def asks_service(agent: Agent, path: str = "/u") -> bool:
    """Whether the next tunnel would wait for the service (the question not sent)."""
    pending = ask(agent, path)
    if pending is None:
        return False
    assert asyncio.iscoroutine(pending)
    pending.close()
    return True


async def admitted_by_service(agent: Agent, path: str = "/u") -> Tunnel:
    """The first tunnel: the service admits it and names the quota left."""
    pending = ask(agent, path)
    assert pending is not None, "the first tunnel of a quota user is the service's"
    assert await pending is None
    user = agent.table.lookup(path)
    assert user is not None
    tunnel = Tunnel()
    agent.opened(path, user, tunnel, "192.0.2.1")
    return tunnel


def test_a_quota_users_next_tunnel_is_admitted_from_the_budget_held() -> None:
    async def main() -> None:
        link = Link(quota_left=QUOTA)
        agent = agent_with(UserLimits(quota=QUOTA), link)
        await admitted_by_service(agent)
        assert link.admits == 1
        for _ in range(5):
            assert not asks_service(agent)
        assert link.admits == 1

    asyncio.run(main())


def test_a_spent_budget_sends_the_next_tunnel_to_the_service() -> None:
    async def main() -> None:
        link = Link(quota_left=1000)
        agent = agent_with(UserLimits(quota=QUOTA), link)
        tunnel = await admitted_by_service(agent)
        meter = agent.meters["/u"]
        meter.count_up(999, tunnel)
        assert not asks_service(agent)  # one byte left
        meter.count_down(1, tunnel)
        assert tunnel.paused == [Direction.DOWN]
        pending = ask(agent)
        assert pending is not None
        assert await pending is None
        assert link.admits == 2

    asyncio.run(main())


def test_a_kick_or_a_change_of_limits_drops_the_budget() -> None:
    async def main() -> None:
        link = Link(quota_left=QUOTA)
        agent = agent_with(UserLimits(quota=QUOTA), link)
        tunnel = await admitted_by_service(agent)
        assert agent.kick(("/u",), "quota used up") == 1
        assert tunnel.kicked == ["quota used up"]
        assert asks_service(agent)  # a cut user is the service's to refuse

        agent = agent_with(UserLimits(quota=QUOTA), link)
        await admitted_by_service(agent)
        agent.apply(Command(Opt.ADD, (Entry("/u", User(DST, UserLimits(quota=2 * QUOTA))),)), False)
        assert asks_service(agent)

        agent = agent_with(UserLimits(quota=QUOTA), link)
        await admitted_by_service(agent)
        reset = Entry("/u", User(DST, UserLimits(quota=QUOTA)), quota_used=0)
        agent.apply(Command(Opt.ADD, (reset,)), False)
        assert asks_service(agent)  # a new billing period: the service's count

    asyncio.run(main())


def test_a_budget_after_a_collection_admits_again() -> None:
    async def main() -> None:
        link = Link(quota_left=QUOTA)
        agent = agent_with(UserLimits(quota=QUOTA), link)
        await admitted_by_service(agent)
        agent.kick(("/u",))
        assert asks_service(agent)
        agent.grant({"/u": 5000})
        assert not asks_service(agent)
        agent.grant({"/u": 0})
        assert asks_service(agent)

    asyncio.run(main())


def test_tunnel_and_address_counts_are_always_the_services() -> None:
    async def main() -> None:
        for limits in (UserLimits(quota=QUOTA, max_tunnels=8), UserLimits(max_ips=2)):
            link = Link(quota_left=QUOTA if limits.quota else None)
            agent = agent_with(limits, link)
            await admitted_by_service(agent)
            assert asks_service(agent)

    asyncio.run(main())


def test_an_expire_is_the_services_once_it_is_near() -> None:
    async def main() -> None:
        now = int(time.time())
        far = agent_with(UserLimits(expire=now + 3600), Link(None))
        assert not asks_service(far)  # nothing to count: no question to ask
        near = agent_with(UserLimits(expire=now + 1), Link(None))
        assert asks_service(near)
        past = agent_with(UserLimits(expire=now - 1), Link(None))
        assert asks_service(past)
        # quota and a far expire: the budget decides
        link = Link(quota_left=QUOTA)
        both = agent_with(UserLimits(quota=QUOTA, expire=now + 3600), link)
        await admitted_by_service(both)
        assert not asks_service(both)

    asyncio.run(main())


def test_a_tunnel_admitted_here_closes_without_a_release() -> None:
    async def main() -> None:
        link = Link(quota_left=QUOTA)
        agent = agent_with(UserLimits(quota=QUOTA), link)
        first = await admitted_by_service(agent)
        assert not asks_service(agent)
        user = agent.table.lookup("/u")
        assert user is not None
        second = Tunnel()
        meter = agent.opened("/u", user, second, "192.0.2.1")
        meter.count_up(100, second)
        agent.closed(meter, second, "192.0.2.1", admitted=False)
        assert link.released == []  # its bytes go with the next collection
        agent.closed(meter, first, "192.0.2.1", admitted=True)
        assert [d.bytes_up for d in link.released] == [100]
        report = agent.collect()
        assert "/u" not in report["users"]  # released with the admitted tunnel's delta

    asyncio.run(main())
