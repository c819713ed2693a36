"""The user service: the one authoritative view of users, their counters and
their server-wide limits, behind the controller.

Changes go to the store first (durable or shared before res 1), then to every
data plane (the in-process tunnel listener, or each worker). Admission against
max_tunnels, max_ips, quota and expire, and rate tokens, are decided here,
because a user's tunnels may land in any worker. With a store several nodes
share, max_tunnels and max_ips are counted across the nodes too
(mtt.service.shared_limits); rate stays per node.

Open tunnels are held to expire and quota too (mtt.core.enforcement): after
every collection the service closes the tunnels of users past either, hands
the planes the quota the others have left (a plane closes a user's tunnels
itself once it has counted that much, then says so: Exhausted), and arms a
timer for each expire due before the next collection but one. A cut is one
log line per user and shows in the listing (`blocked`) until a change lets
the user in again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from mtt.config import Limits
from mtt.core.admission import AdmissionBook, Verdict, expired, over_quota
from mtt.core.commands import CHANGES, Command, Entry, Opt, apply_command
from mtt.core.enforcement import (
    Blocked,
    Cut,
    cut_message,
    cut_reason,
    expiry_delay,
    quota_left,
)
from mtt.core.harvest import HarvestOutcome, Taken
from mtt.core.leases import WhenDown, shared_limited
from mtt.core.rate import Direction, GrantRules, TokenSchedule
from mtt.core.stats import StatsTotals
from mtt.core.usage import Usage
from mtt.core.users import User, UserLimits, UserTable
from mtt.errors import StoreError
from mtt.service.results import (
    Changed,
    HarvestAcked,
    Harvested,
    HarvestPending,
    HarvestRefused,
    Kicked,
    Listed,
    Pong,
    Result,
    UserReport,
)
from mtt.service.shared_limits import SharedAdmission
from mtt.store.base import Store
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.service")

_LIMITS = Limits()


class Plane(Protocol):
    """Where tunnels are served: this process, or a pool of workers."""

    async def apply(self, command: Command, kick: bool) -> None: ...
    async def collect(self) -> list[dict[str, Any]]: ...
    async def kick(self, paths: tuple[str, ...], why: str | None = None) -> int: ...

    def grant(self, budgets: dict[str, int]) -> None:
        """The quota left of users with open tunnels (mtt.core.enforcement)."""
        ...


# What a cut tunnel logs at debug level (the user's one line says the rest).
_WHY: dict[Cut, str] = {"expired": "user expired", "quota": "quota used up"}


@dataclass(slots=True)
class Live:
    """A user's open tunnels across every plane, as last reported."""

    active: int = 0
    ips: frozenset[str] = frozenset()


class UserService:
    def __init__(
        self,
        store: Store,
        *,
        kick_on_delete: bool = False,
        limits: Limits = _LIMITS,
        when_down: WhenDown = WhenDown.OPEN,
    ) -> None:
        self.store = store
        self._limits = limits
        count = store.shared_count()
        # max_tunnels and max_ips over every node sharing the store, beside this node's count
        self.shared = SharedAdmission(count, when_down, limits) if count is not None else None
        self._grants = GrantRules(
            limits.rate_burst, limits.rate_grants_per_second, limits.rate_min_grant
        )
        self.kick_on_delete = kick_on_delete
        self.table = UserTable()
        self.revision = 0
        self.plane: Plane | None = None
        self.live: dict[str, Live] = {}
        self._admitted = AdmissionBook()  # tunnels admitted against server-wide limits
        self._schedules: dict[tuple[str, Direction], TokenSchedule] = {}
        self._change_lock = asyncio.Lock()
        self._reload_queued = False
        self._usage_lock = asyncio.Lock()
        self._collector: asyncio.Task[None] | None = None
        self.totals = StatsTotals()
        self._late: list[dict[str, Any]] = []  # reports of workers that exited
        self.gauges: dict[str, int] = {}
        # Users whose open tunnels a limit closed, with the User they were cut as.
        self.blocked: dict[str, tuple[Blocked, User]] = {}
        self._expiry: dict[str, tuple[int, asyncio.TimerHandle]] = {}  # path -> (expire, timer)

    async def start(self, plane: Plane | None = None) -> None:
        snapshot = await self.store.load()
        self.table.replace(snapshot.users.items())
        self.revision = snapshot.revision
        self.store.watch(self._remote_change, self._served)
        if self.shared is not None:
            self.shared.start()
        if plane is not None:
            self.attach(plane)

    def attach(self, plane: Plane) -> None:
        self.plane = plane
        self._collector = spawn(self._collect_loop(), name="collect counters")

    async def close(self) -> None:
        """Count what the planes still hold, then let the store flush."""
        if self._collector is not None:
            self._collector.cancel()
        for _, timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        with contextlib.suppress(StoreError, ConnectionError, OSError):
            await self.collect()
        if self.shared is not None:
            await self.shared.close()
        await self.store.close()

    def absorb(self, report: dict[str, Any]) -> None:
        """A worker's last report, sent as it exits; folded in by the next collect."""
        self._late.append(report)

    def count(self) -> int:
        return len(self.table)

    def snapshot(self) -> Command:
        """The whole table, for a worker that starts or restarts."""
        return Command(Opt.REPLACE, entries=_entries(self.table.items()))

    # -- the controller ------------------------------------------------------------

    async def execute(self, command: Command) -> Result:
        """Carry out a validated command; StoreError if the store cannot take it."""
        opt = command.opt
        if opt in CHANGES:
            revision, count = await self.change(command)
            return Changed(revision, count)
        if opt is Opt.LIST:
            reports = await self.list_users(command.paths or None, command.reset)
            return Listed(tuple(reports), len(self.table), self.revision)
        if opt is Opt.KICK:
            kicked = await self.plane.kick(command.paths) if self.plane is not None else 0
            return Kicked(kicked, len(self.table), self.revision)
        if opt is Opt.HARVEST:
            outcome = await self.harvest(command.harvest_id, command.paths or None)
            if isinstance(outcome, Taken):
                return Harvested(outcome.harvest, outcome.repeat, len(self.table), self.revision)
            return HarvestRefused(outcome, command.harvest_id, len(self.table), self.revision)
        if opt is Opt.ACK:
            acked = await asyncio.shield(
                self.store.ack_harvest(command.harvest_id, _LIMITS.harvest)
            )
            return HarvestAcked(acked, command.harvest_id, len(self.table), self.revision)
        if opt is Opt.PENDING:
            pending = await self.store.pending_harvest()
            return HarvestPending(pending, len(self.table), self.revision)
        return Pong(len(self.table), self.revision)

    async def change(self, command: Command) -> tuple[int, int]:
        """Store, then serve: once the store has it, the change is applied
        everywhere even if the controller request is cancelled midway.
        Returns the revision the store gave this change and the users then."""
        return await asyncio.shield(self._change(command))

    async def _change(self, command: Command) -> tuple[int, int]:
        async with self._change_lock:
            revision = await self.store.commit(command)
            # Off by more than one: another node's change landed first, or the
            # shared table was reset; ours applies to the store's table, not ours.
            if revision == self.revision + 1:
                await self._serve(command, revision)
            elif not await self._reload(f"a change got revision {revision}"):
                await self._serve(command, revision)  # the best we know until
                self._remote_change(revision, None)  # the store answers again
            return revision, len(self.table)

    async def _serve(self, command: Command, revision: int) -> None:
        """Apply a change here and in every worker; only then does the ping
        name its revision, so a panel that sees it can count on its users."""
        self._apply_local(command)
        try:
            if self.plane is not None:
                await self.plane.apply(command, self.kick_on_delete)
        finally:
            self.revision = revision
        await self._unblock()

    async def _reload(self, why: str) -> bool:
        """Adopt the store's whole table (under the change lock); False, the
        table kept, if the store cannot answer (it resyncs us when it is back)."""
        log.info("reloading the users at revision %d: %s", self.revision, why)
        self._reload_queued = False
        try:
            snapshot = await self.store.load()
        except StoreError as exc:
            log.warning("reloading the users after revision %d: %s", self.revision, exc)
            return False
        command = Command(Opt.REPLACE, entries=_entries(snapshot.users.items()))
        await self._serve(command, snapshot.revision)
        return True

    def _apply_local(self, command: Command) -> None:
        apply_command(self.table, command)
        table = self.table
        for key in [k for k in self._schedules if k[0] not in table]:
            del self._schedules[key]
        for (path, _), schedule in self._schedules.items():
            user = table.lookup(path)
            if user is not None:
                schedule.rate = user.limits.rate

    def _remote_change(self, revision: int, command: Command | None) -> None:
        """Another node changed the shared table (command None: reload it)."""
        if command is None:
            if self._reload_queued:
                return  # one reload, still waiting for the lock, covers this one too
            self._reload_queued = True
        spawn(self._follow(revision, command), name="apply a remote change")

    def _served(self) -> tuple[int, int]:
        """The revision and number of users this node serves, for the store's checks."""
        return self.revision, len(self.table)

    async def _follow(self, revision: int, command: Command | None) -> None:
        async with self._change_lock:
            if command is None:
                await self._reload("the store asks")
            elif revision == self.revision + 1:
                await self._serve(command, revision)
            elif revision > self.revision:
                await self._reload(f"revision {revision} arrived")
            # else: our own change, or one already seen

    # -- counters ----------------------------------------------------------------------

    async def _collect_loop(self) -> None:
        while True:
            await asyncio.sleep(self._limits.collect_interval)
            try:
                await self.collect()
                await self.enforce()
            except (StoreError, ConnectionError, OSError) as exc:
                log.warning("collecting counters: %s", exc)

    async def collect(self) -> None:
        """Fold every plane's counter deltas into the store; refresh live state."""
        if self.plane is None:
            return
        async with self._usage_lock:
            await self._collect_locked()

    async def _collect_locked(self) -> None:
        assert self.plane is not None
        reports = await self.plane.collect()
        reports += self._late
        self._late = []
        deltas: dict[str, Usage] = {}
        live: dict[str, Live] = {}
        gauges: dict[str, int] = {}
        totals = self.totals
        for report in reports:
            totals.add(report["stats"])
            for name, value in report["gauges"].items():
                gauges[name] = gauges.get(name, 0) + value
            for path, (usage, active, ips) in report["users"].items():
                delta = Usage.from_wire(usage)
                totals.bytes_up += delta.bytes_up
                totals.bytes_down += delta.bytes_down
                if path in deltas:
                    deltas[path].add(delta)
                else:
                    deltas[path] = delta
                if active:
                    seen = live.get(path)
                    if seen is None:
                        live[path] = Live(active, frozenset(ips))
                    else:
                        live[path] = Live(seen.active + active, seen.ips | frozenset(ips))
        self.live = live
        self.gauges = gauges
        if deltas:
            await self.store.add_usage(deltas)

    async def list_users(self, paths: Iterable[str] | None, reset: bool) -> list[UserReport]:
        async with self._usage_lock:
            if self.plane is not None:
                await self._collect_locked()
            wanted = self.table if paths is None else [p for p in paths if p in self.table]
            usage = await self.store.read_usage(list(wanted), reset)
        now = time.time()
        users = []
        for path in sorted(wanted):
            user = self.table.lookup(path)
            if user is None:
                continue
            counters = usage.get(path) or Usage()
            live = self.live.get(path) or Live()
            blocked = self.blocked.get(path)
            cut = blocked[0] if blocked is not None else None
            users.append(_describe(path, user, counters, live, now, blocked=cut))
        return users

    async def harvest(self, harvest_id: str, paths: tuple[str, ...] | None) -> HarvestOutcome:
        """Collect what the planes hold, then let the store take the harvest
        (docs/protocol.md §6, harvests). Shielded: a panel that hangs up
        mid-request finds the harvest under its id when it asks again."""
        return await asyncio.shield(self._harvest(harvest_id, paths))

    async def _harvest(self, harvest_id: str, paths: tuple[str, ...] | None) -> HarvestOutcome:
        async with self._usage_lock:
            if self.plane is not None:
                await self._collect_locked()
            outcome = await self.store.harvest(harvest_id, paths, time.time(), _LIMITS.harvest)
        if isinstance(outcome, Taken) and not outcome.repeat:
            harvest = outcome.harvest
            log.info(
                "harvest %s taken: %d users, %d bytes up, %d down%s",
                harvest_id,
                len(harvest.users),
                sum(share.bytes_up for _, share in harvest.users),
                sum(share.bytes_down for _, share in harvest.users),
                " (more left for the next one)" if harvest.more else "",
            )
        return outcome

    # -- requests from agents ---------------------------------------------------------

    async def admit(self, agent: int, path: str, ip: str) -> Verdict:
        """Admit (and count) the tunnel, with the quota its user has left; or why not."""
        user = self.table.lookup(path)
        if user is None:
            return Verdict("user deleted")
        limits = user.limits
        now = time.time()
        used = 0
        known = False
        if limits.quota and not expired(limits, now):
            try:
                usage = await self.store.read_usage([path], False)
                known = True
            except StoreError as exc:  # a shared store is away: serve, as for users without quota
                log.warning("admitting %s without its quota check: %s", path, exc)
                usage = {}
            used = usage[path].quota_used if path in usage else 0
        refused = self._admitted.refusal(path, limits, ip, now, used)
        blocked = self.blocked.get(path)
        if refused is None and blocked is not None and blocked[0].reason == "quota":
            # Cut a moment ago: the closed tunnels' last bytes may not be counted yet.
            refused = "over quota (used up while its tunnels were open)"
        if refused is not None:
            return Verdict(refused)
        # Counted here before any wait, so admissions meanwhile see this one.
        self._admitted.admit(agent, path, ip)
        if self.shared is not None and shared_limited(limits):
            try:
                refused = await self.shared.admit(agent, path, ip, limits)
            except asyncio.CancelledError:
                self._admitted.release(agent, path, ip)
                raise
            if refused is not None:
                self._admitted.release(agent, path, ip)
                return Verdict(refused)
        if limits.expire:
            self._arm_expiry(path, limits, now)
        # A change during the store read: its own budgets follow with the next collection.
        same = self.table.lookup(path) is user
        return Verdict(None, quota_left(limits, used) if known and same else None)

    async def exhausted(self, path: str, closed: int, unreported: int) -> None:
        """A plane spent a user's quota budget and closed `closed` of its tunnels
        (unreported: what it counted since its last report): close the rest."""
        async with self._change_lock:
            user = self.table.lookup(path)
            if user is None or not user.limits.quota:
                return
            try:
                usage = await self.store.read_usage([path], False)
            except StoreError as exc:
                log.warning("user %s: quota used up by one plane; store unread: %s", path, exc)
                usage = {}
            used = (usage[path].quota_used if path in usage else 0) + unreported
            if cut_reason(user.limits, time.time(), used) is None:
                return  # the limit was raised after that plane's budget was handed out
            await self._cut(path, user, "quota", used, closed)

    # -- limits on open tunnels ------------------------------------------------------

    async def enforce(self) -> None:
        """Close the tunnels of users past their expire or quota; hand the planes
        what is left of each quota; arm the expiries due soon. After a collection."""
        if self.plane is None:
            return
        async with self._change_lock:
            table = self.table
            limited: list[tuple[str, User]] = []
            for path in self.live:
                user = table.lookup(path)
                if user is not None and (user.limits.quota or user.limits.expire):
                    limited.append((path, user))
            if not limited:
                return
            quota_paths = [path for path, user in limited if user.limits.quota]
            usage: dict[str, Usage] = {}
            if quota_paths:
                try:
                    usage = await self.store.read_usage(quota_paths, False)
                except StoreError as exc:  # budgets handed out before keep counting down
                    log.warning("quota of open tunnels not checked: %s", exc)
            now = time.time()
            budgets: dict[str, int] = {}
            cuts: list[tuple[str, User, Cut, int]] = []
            for path, user in limited:
                counters = usage.get(path)
                used = counters.quota_used if counters is not None else 0
                reason = cut_reason(user.limits, now, used)
                if reason is not None:
                    cuts.append((path, user, reason, used))
                    continue
                left = quota_left(user.limits, used) if counters is not None else None
                if left is not None:
                    budgets[path] = left
                if user.limits.expire:
                    self._arm_expiry(path, user.limits, now)
            if budgets:
                self.plane.grant(budgets)
            for path, user, reason, used in cuts:
                await self._cut(path, user, reason, used)

    async def _cut(self, path: str, user: User, reason: Cut, used: int, closed: int = 0) -> None:
        """Close the user's tunnels on every plane (closed: already closed by one);
        one log line, and the listing says so, if any tunnel was open."""
        if self.plane is not None:
            closed += await self.plane.kick((path,), _WHY[reason])
        if not closed:
            return
        now = time.time()
        earlier = self.blocked.get(path)
        if earlier is not None and earlier[0].reason == reason:
            # The same event: a tunnel admitted as the cut went out, or a second
            # process that spent its budget before the cut reached it.
            log.debug("user %s: %d more tunnels closed (%s)", path, closed, _WHY[reason])
            return
        self.blocked[path] = (Blocked(reason, now), user)
        log.info(
            "%s",
            cut_message(path, reason, user.limits, quota_used=used, tunnels=closed, now=now),
        )

    async def _unblock(self) -> None:
        """After a change: users cut by a limit that no longer holds are let in again."""
        if not self.blocked:
            return
        table = self.table
        changed: list[tuple[str, User]] = []
        for path, (_, cut_as) in list(self.blocked.items()):
            user = table.lookup(path)
            if user is None:
                del self.blocked[path]
            elif user is not cut_as:
                changed.append((path, user))
        if not changed:
            return
        try:
            usage = await self.store.read_usage([p for p, _ in changed], False)
        except StoreError as exc:
            log.warning("blocked users not rechecked after a change: %s", exc)
            return
        now = time.time()
        for path, user in changed:
            counters = usage.get(path)
            reason = cut_reason(user.limits, now, counters.quota_used if counters else 0)
            if reason is None:
                del self.blocked[path]
                log.info("user %s: let in again (its limits changed)", path)
            else:
                self.blocked[path] = (Blocked(reason, self.blocked[path][0].at), user)

    def _arm_expiry(self, path: str, limits: UserLimits, now: float) -> None:
        """A timer for the user's expire if it falls before the next collection but
        one (those after are armed by a later one); the same expire is armed once."""
        delay = expiry_delay(limits, now, self._limits.expire_horizon)
        if delay is None:
            return
        armed = self._expiry.get(path)
        if armed is not None:
            if armed[0] == limits.expire:
                return
            armed[1].cancel()
        timer = asyncio.get_running_loop().call_later(delay, self._expiry_due, path)
        self._expiry[path] = (limits.expire, timer)

    def _expiry_due(self, path: str) -> None:
        self._expiry.pop(path, None)
        spawn(self._expire(path), name=f"expire {path}")

    async def _expire(self, path: str) -> None:
        async with self._change_lock:
            user = self.table.lookup(path)
            if user is None:
                return
            now = time.time()
            if expired(user.limits, now):
                await self._cut(path, user, "expired", 0)
            else:  # moved since, or the clocks disagree by a hair
                self._arm_expiry(path, user.limits, now)

    async def release(self, agent: int, path: str, ip: str, delta: Usage) -> None:
        self.totals.bytes_up += delta.bytes_up
        self.totals.bytes_down += delta.bytes_down
        async with self._usage_lock:
            await self.store.add_usage({path: delta})
        self._admitted.release(agent, path, ip)
        if self.shared is not None:
            self.shared.release(agent, path, ip)

    def agent_gone(self, agent: int) -> None:
        """A worker died: its tunnels died with it."""
        self._admitted.agent_gone(agent)
        if self.shared is not None:
            self.shared.agent_gone(agent)

    async def tokens(self, path: str, direction: Direction, want: int) -> int:
        user = self.table.lookup(path)
        if user is None or not user.limits.rate:
            return max(want, self._limits.rate_unlimited_grant)  # no limit (any more)
        key = (path, direction)
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = self._schedules[key] = TokenSchedule(user.limits.rate, self._grants)
        grant, delay = schedule.reserve(want, asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)
        return grant


def _entries(items: Iterable[tuple[str, User]]) -> tuple[Entry, ...]:
    return tuple(Entry(path, user) for path, user in items)


def _describe(
    path: str, user: User, usage: Usage, live: Live, now: float, *, blocked: Blocked | None
) -> UserReport:
    limits = user.limits
    if expired(limits, now):
        state = "expired"
    elif over_quota(limits, usage.quota_used):
        state = "over_quota"
    else:
        state = "ok"
    return UserReport(path, user, usage, live.active, tuple(sorted(live.ips)), state, blocked)
