"""The user side of one tunnel-serving process: its copy of the user table,
what each user's tunnels count, and the questions only the user service can
answer (admission against server-wide limits, rate tokens).

The service is in the same process (-workers 1) or the supervisor (workers);
either way the agent reaches it through a ServiceLink and answers the same
requests, so both layouts run the same code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mtt.core.admission import Verdict
from mtt.core.commands import Command, Opt, apply_command
from mtt.core.enforcement import budget, expiry_delay
from mtt.core.leases import shared_limited
from mtt.core.meter import MeteredTunnel
from mtt.core.rate import Direction, Pausable, Throttle
from mtt.core.stats import STATS
from mtt.core.usage import Usage
from mtt.core.users import User, UserLimits, UserTable
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.agent")


class ServiceLink(Protocol):
    async def admit(self, path: str, ip: str) -> Verdict:
        """Whether the tunnel may open, and the user's quota left if it has one."""
        ...

    def release(self, path: str, ip: str, delta: Usage) -> None:
        """An admitted tunnel closed; delta is its user's uncounted traffic."""
        ...

    async def tokens(self, path: str, direction: Direction, want: int) -> int: ...

    def exhausted(self, path: str, closed: int, unreported: int) -> None:
        """This process spent the user's quota budget and closed `closed` of its
        tunnels; unreported is what it counted that the service has not seen."""
        ...


class Gauges(Protocol):
    def __call__(self) -> dict[str, int]:
        """Live counts (tunnels by mode, streams) for metrics."""
        ...


class UserMeter:
    """One user's traffic in this process, counted by its tunnels as it flows."""

    __slots__ = (
        "active",
        "down",
        "ips",
        "last_seen",
        "left",
        "limits",
        "on_spent",
        "opened",
        "path",
        "rate",
        "throttles",
        "tunnels",
        "up",
    )

    def __init__(self, path: str, on_spent: Callable[[UserMeter], None]) -> None:
        self.path = path
        self.up = 0  # deltas since the last report
        self.down = 0
        self.opened = 0
        self.last_seen = 0.0
        self.active = 0
        self.ips: Counter[str] = Counter()
        self.tunnels: set[MeteredTunnel] = set()
        self.throttles: tuple[Throttle | None, Throttle | None] = (None, None)
        self.rate = 0
        # Bytes this process may still count before the user's quota is used up
        # (mtt.core.enforcement), None without a quota or before the service said;
        # the limits it was computed for, so a change of them drops it.
        self.left: int | None = None
        self.limits: UserLimits | None = None
        self.on_spent = on_spent

    def count_up(self, size: int, tunnel: Pausable) -> None:
        """size bytes from the client were read for tunnel; charge the rate."""
        self.up += size
        if self.left is not None:
            self._spend(size, tunnel, Direction.UP)
        throttle = self.throttles[Direction.UP]
        if throttle is not None:
            throttle.charge(size, tunnel)

    def count_down(self, size: int, tunnel: Pausable) -> None:
        """size bytes from dst were read for tunnel; charge the rate."""
        self.down += size
        if self.left is not None:
            self._spend(size, tunnel, Direction.DOWN)
        throttle = self.throttles[Direction.DOWN]
        if throttle is not None:
            throttle.charge(size, tunnel)

    def _spend(self, size: int, tunnel: Pausable, direction: Direction) -> None:
        assert self.left is not None
        before = self.left
        self.left = before - size
        if self.left <= 0:
            # Stop reading now, as a rate limit would: the cut comes a loop turn
            # later, and a tunnel would read up to its write buffers meanwhile.
            tunnel.throttle_pause(direction)
            if before > 0:  # once, when the budget runs out
                self.on_spent(self)

    def grant(self, left: int, limits: UserLimits) -> None:
        """The quota left as the service knows it: what this process has counted
        since its last report still comes off it."""
        self.left = budget(left, self.up + self.down)
        self.limits = limits
        if self.left <= 0:
            self.on_spent(self)

    def forget(self, tunnel: Pausable) -> None:
        """tunnel (an smux stream) is gone: drop it from the download rate's waiters."""
        throttle = self.throttles[Direction.DOWN]
        if throttle is not None:
            throttle.forget(tunnel)

    def take_delta(self) -> Usage:
        delta = Usage(self.up, self.down, self.up + self.down, self.opened, self.last_seen)
        self.up = self.down = self.opened = 0
        return delta

    def dirty(self) -> bool:
        return bool(self.up or self.down or self.opened or self.active)


class TunnelAccount:
    """What one tunnel needs to count itself in and out."""

    __slots__ = ("_agent", "admitted", "client_ip", "meter", "path", "user")

    def __init__(self, agent: Agent, path: str, user: User, client_ip: str, admitted: bool):
        self._agent = agent
        self.path = path
        self.user = user
        self.client_ip = client_ip
        self.admitted = admitted
        self.meter: UserMeter | None = None

    def open(self, tunnel: MeteredTunnel) -> UserMeter:
        self.meter = meter = self._agent.opened(self.path, self.user, tunnel, self.client_ip)
        return meter

    def close(self, tunnel: MeteredTunnel) -> None:
        meter, self.meter = self.meter, None
        if meter is not None:
            self._agent.closed(meter, tunnel, self.client_ip, self.admitted)
        elif self.admitted:
            self._agent.abandon(self.path, self.client_ip)


class Agent:
    def __init__(self, link: ServiceLink, expire_horizon: float) -> None:
        self.table = UserTable()
        # An expire closer than this is the service's to admit (it arms the cut).
        self.expire_horizon = expire_horizon
        self.meters: dict[str, UserMeter] = {}
        self._link = link
        self.gauges: Gauges | None = None  # set by the tunnel listener
        # The quota left that an admission named, for the meter its tunnel creates.
        self._granted: dict[str, tuple[int, UserLimits]] = {}

    # -- for the tunnel listener -------------------------------------------------

    def admission(self, path: str, user: User, ip: str) -> Awaitable[str | None] | None:
        """None when the tunnel may open now; else ask the service (server-wide limits)."""
        limits = user.limits
        if not limits.needs_admission() or self._admits_here(path, limits):
            return None
        return self._admit(path, ip)

    def _admits_here(self, path: str, limits: UserLimits) -> bool:
        """Whether this process can admit a tunnel of a user limited by quota and
        expire alone without asking the service: from the quota budget it holds
        for the user's open tunnels (a process whose budget ran out, was kicked or
        is stale asks again), and while `expire` is further away than the next
        enforcement but one, which arms its timer (docs/controller.md, "Limits on
        open tunnels"). max_tunnels and max_ips need every process's count."""
        if shared_limited(limits):
            return False
        if expiry_delay(limits, time.time(), self.expire_horizon) is not None:
            return False  # the service arms its timer
        if not limits.quota:
            return True
        meter = self.meters.get(path)
        return (
            meter is not None
            and meter.left is not None
            and meter.left > 0
            and meter.limits == limits
        )

    async def _admit(self, path: str, ip: str) -> str | None:
        verdict = await self._link.admit(path, ip)
        left = verdict.quota_left
        user = self.table.lookup(path)
        if verdict.refused is None and left is not None and user is not None:
            meter = self.meters.get(path)
            if meter is None:
                self._granted[path] = (left, user.limits)
            elif meter.left is None:
                meter.grant(left, user.limits)
        return verdict.refused

    def opened(self, path: str, user: User, tunnel: MeteredTunnel, ip: str) -> UserMeter:
        meter = self.meters.get(path)
        if meter is None:
            meter = self.meters[path] = UserMeter(path, self._spent)
            self._set_throttles(meter, user.limits.rate)
            granted = self._granted.pop(path, None)
            if granted is not None and granted[1] == user.limits:
                meter.grant(*granted)
        meter.active += 1
        meter.opened += 1
        meter.ips[ip] += 1
        meter.tunnels.add(tunnel)
        meter.last_seen = time.time()
        return meter

    def closed(self, meter: UserMeter, tunnel: MeteredTunnel, ip: str, admitted: bool) -> None:
        meter.active -= 1
        meter.ips[ip] -= 1
        if meter.ips[ip] <= 0:
            del meter.ips[ip]
        meter.tunnels.discard(tunnel)
        for throttle in meter.throttles:
            if throttle is not None:
                throttle.forget(tunnel)
        meter.last_seen = time.time()
        if admitted:
            # Quota decisions need this tunnel's bytes before its slot is free.
            self._link.release(meter.path, ip, meter.take_delta())
        if not meter.active and not meter.dirty():
            self._drop(meter)

    def abandon(self, path: str, ip: str) -> None:
        """An admitted tunnel that never opened (the client left during the upgrade)."""
        self._granted.pop(path, None)
        self._link.release(path, ip, Usage())

    def _drop(self, meter: UserMeter) -> None:
        if self.meters.get(meter.path) is meter:
            del self.meters[meter.path]
        for throttle in meter.throttles:
            if throttle is not None:
                throttle.release_all()

    # -- rate limits ----------------------------------------------------------------

    def _set_throttles(self, meter: UserMeter, rate: int) -> None:
        for old in meter.throttles:
            if old is not None:
                old.release_all()
        meter.rate = rate
        if not rate:
            meter.throttles = (None, None)
            return
        meter.throttles = (
            self._throttle(meter.path, Direction.UP),
            self._throttle(meter.path, Direction.DOWN),
        )

    def _throttle(self, path: str, direction: Direction) -> Throttle:
        def ask(want: int) -> None:
            spawn(self._ask(throttle, path, direction, want), name=f"tokens for {path}")

        throttle = Throttle(direction, ask)
        return throttle

    async def _ask(self, throttle: Throttle, path: str, direction: Direction, want: int) -> None:
        try:
            grant = await self._link.tokens(path, direction, want)
        except ConnectionError:
            grant = want  # the service is gone; don't strand the tunnels
        throttle.granted(grant)

    # -- requests from the service ---------------------------------------------------

    def apply(self, command: Command, kick: bool) -> None:
        """A change to the table; with kick, tunnels of removed users close now.

        A quota budget computed for other limits, or before the panel set
        quota_used, is dropped: the next collection hands out a new one."""
        before = set(self.meters) if kick else set()
        apply_command(self.table, command)
        table = self.table
        for path, meter in self.meters.items():
            user = table.lookup(path)
            rate = user.limits.rate if user is not None else 0
            if rate != meter.rate:
                self._set_throttles(meter, rate)
            if meter.left is not None and (user is None or user.limits != meter.limits):
                meter.left = None
        for path, (_, limits) in list(self._granted.items()):
            user = table.lookup(path)
            if user is None or user.limits != limits:
                del self._granted[path]
        if command.opt in (Opt.ADD, Opt.REPLACE) and (self.meters or self._granted):
            for entry in command.entries:
                if entry.quota_used is not None:
                    self._granted.pop(entry.path, None)
                    reset = self.meters.get(entry.path)
                    if reset is not None:
                        reset.left = None
        if kick:
            gone = [p for p in before if p not in table]
            if gone:
                self.kick(gone)

    def kick(self, paths: list[str] | tuple[str, ...], why: str | None = None) -> int:
        """Close the users' tunnels now; how many were still open (not already closing)."""
        kicked = 0
        for path in paths:
            meter = self.meters.get(path)
            if meter is None:
                continue
            meter.left = None  # its next tunnel asks the service, which may refuse it
            for tunnel in list(meter.tunnels):
                kicked += tunnel.kick(why)
        return kicked

    def grant(self, budgets: dict[str, int]) -> None:
        """The quota each user has left, from the service after a collection."""
        table = self.table
        for path, left in budgets.items():
            meter = self.meters.get(path)
            user = table.lookup(path)
            if meter is not None and user is not None and user.limits.quota:
                meter.grant(left, user.limits)

    def _spent(self, meter: UserMeter) -> None:
        """A meter's quota budget ran out: close the user's tunnels here at once,
        then tell the service (which closes them everywhere and says so). Called
        from inside a tunnel's read: the closing waits for the next loop turn."""
        asyncio.get_running_loop().call_soon(self._cut_spent, meter)

    def _cut_spent(self, meter: UserMeter) -> None:
        if self.meters.get(meter.path) is not meter:
            return  # its tunnels are gone
        # Cut even if a new budget came meanwhile: the tunnels that ran it out are
        # paused, and the service does not block a user whose limit was raised.
        closed = self.kick((meter.path,), "quota used up")
        self._link.exhausted(meter.path, closed, meter.up + meter.down)

    def collect(self) -> dict[str, Any]:
        """Counter deltas (then zeroed) and live state of every user with any,
        and this process's event counts and gauges."""
        now = time.time()
        users: dict[str, Any] = {}
        for path, meter in list(self.meters.items()):
            if meter.active:
                meter.last_seen = now
            users[path] = [meter.take_delta().to_wire(), meter.active, list(meter.ips)]
            if not meter.active:
                self._drop(meter)
        gauges = self.gauges() if self.gauges is not None else {}
        return {"users": users, "stats": STATS.take(), "gauges": gauges}
