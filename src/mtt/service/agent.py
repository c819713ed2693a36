"""The user side of one tunnel-serving process: its copy of the user table,
what each user's tunnels count, and the questions only the user service can
answer (admission against server-wide limits, rate tokens).

The service is in the same process (-workers 1) or the supervisor (workers);
either way the agent reaches it through a ServiceLink and answers the same
requests, so both layouts run the same code.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any, Protocol

from mtt.core.commands import Command, apply_command
from mtt.core.meter import MeteredTunnel
from mtt.core.rate import Direction, Pausable, Throttle
from mtt.core.stats import STATS
from mtt.core.usage import Usage
from mtt.core.users import User, UserTable
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.agent")


class ServiceLink(Protocol):
    async def admit(self, path: str, ip: str) -> str | None:
        """None to admit, or why the tunnel is refused."""
        ...

    def release(self, path: str, ip: str, delta: Usage) -> None:
        """An admitted tunnel closed; delta is its user's uncounted traffic."""
        ...

    async def tokens(self, path: str, direction: Direction, want: int) -> int: ...


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
        "opened",
        "path",
        "rate",
        "throttles",
        "tunnels",
        "up",
    )

    def __init__(self, path: str) -> None:
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

    def count_up(self, size: int, tunnel: Pausable) -> None:
        """size bytes from the client were read for tunnel; charge the rate."""
        self.up += size
        throttle = self.throttles[Direction.UP]
        if throttle is not None:
            throttle.charge(size, tunnel)

    def count_down(self, size: int, tunnel: Pausable) -> None:
        """size bytes from dst were read for tunnel; charge the rate."""
        self.down += size
        throttle = self.throttles[Direction.DOWN]
        if throttle is not None:
            throttle.charge(size, tunnel)

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
    def __init__(self, link: ServiceLink) -> None:
        self.table = UserTable()
        self.meters: dict[str, UserMeter] = {}
        self._link = link
        self.gauges: Gauges | None = None  # set by the tunnel listener

    # -- for the tunnel listener -------------------------------------------------

    def admission(self, path: str, user: User, ip: str) -> Awaitable[str | None] | None:
        """None when the tunnel may open now; else ask the service (server-wide limits)."""
        if user.limits.needs_admission():
            return self._link.admit(path, ip)
        return None

    def opened(self, path: str, user: User, tunnel: MeteredTunnel, ip: str) -> UserMeter:
        meter = self.meters.get(path)
        if meter is None:
            meter = self.meters[path] = UserMeter(path)
            self._set_throttles(meter, user.limits.rate)
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
        """A change to the table; with kick, tunnels of removed users close now."""
        before = set(self.meters) if kick else set()
        apply_command(self.table, command)
        table = self.table
        for path, meter in self.meters.items():
            user = table.lookup(path)
            rate = user.limits.rate if user is not None else 0
            if rate != meter.rate:
                self._set_throttles(meter, rate)
        if kick:
            gone = [p for p in before if p not in table]
            if gone:
                self.kick(gone)

    def kick(self, paths: list[str] | tuple[str, ...]) -> int:
        kicked = 0
        for path in paths:
            meter = self.meters.get(path)
            if meter is None:
                continue
            for tunnel in list(meter.tunnels):
                tunnel.kick()
                kicked += 1
        return kicked

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
