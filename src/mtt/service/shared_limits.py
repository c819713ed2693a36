"""max_tunnels and max_ips across the nodes of one Redis (docs/redis.md,
"Limits across nodes"), on top of the node's own admission.

For a user with either limit, an admission the node's own count lets in is
also counted in the shared store (one atomic script), which refuses it when
the user's tunnels or addresses on all nodes are at the limit. Each admitted
tunnel holds a lease there (mtt.core.leases) that a keeper task renews every
Limits.redis_lease_renew and lets go when the tunnel closes; a clean shutdown
lets go of them all, and a node that dies frees its slots when the leases end.

When the store does not answer (within its socket timeout), the admission
follows -redis-limits-when-down: open admits on the node's own count, closed
refuses. One line says when an outage of the shared count begins and one when
it ends; during one, an admission asks the store again at most every
Limits.redis_limits_retry, so the others do not each wait out a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from mtt.config import Limits
from mtt.core.leases import LeaseLedger, Outage, WhenDown, merge, unchecked_reason
from mtt.core.users import UserLimits
from mtt.errors import StoreError
from mtt.store.base import SharedCount
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.service")


class SharedAdmission:
    def __init__(self, count: SharedCount, when_down: WhenDown, limits: Limits) -> None:
        self._count = count
        self._when_down = when_down
        self._lease = limits.redis_lease
        self._renew_every = limits.redis_lease_renew
        self.ledger = LeaseLedger(secrets.token_hex(6))
        self._outage = Outage(limits.redis_limits_retry)
        self._releases: dict[str, list[str]] = {}  # path -> entries to let go of
        self._down_since = 0.0  # loop time the outage began
        self._wake = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._keeper is None:
            self._keeper = spawn(self._keep(), name="renew the shared leases")

    async def admit(self, agent: int, path: str, ip: str, limits: UserLimits) -> str | None:
        """None to admit (a lease is taken), else why not. Called once the
        node's own count has let the tunnel in."""
        name = self.ledger.take(agent, path, ip)
        loop = asyncio.get_running_loop()
        why = "Redis did not answer a moment ago"
        asked = self._outage.due(loop.time())
        if asked:
            try:
                refusal = await self._count.admit(path, name, ip, limits, self._lease)
            except StoreError as exc:
                why = str(exc)
                self._failed(why)
            except asyncio.CancelledError:
                self._outage.abandoned()
                self._unsure(agent, path, ip, name)
                raise
            else:
                self._answered()
                if refusal is None:
                    self.ledger.admitted(name)
                    return None
                self.ledger.drop(agent, path, ip, name)
                return refusal.reason(limits)
        if self._when_down is WhenDown.CLOSED:
            if asked:  # Redis may still run the call that timed out: let go of it later
                self._unsure(agent, path, ip, name)
            else:
                self.ledger.drop(agent, path, ip, name)
            return unchecked_reason(why)
        self.ledger.admitted(name)  # WhenDown.OPEN: Redis gets it with the next renewal
        return None

    def _unsure(self, agent: int, path: str, ip: str, name: str) -> None:
        """A refused admission whose call got no answer: the entry it may have
        added is let go of with the next renewal (not now: Redis is silent)."""
        self.ledger.drop(agent, path, ip, name)
        self._releases.setdefault(path, []).append(name)

    def release(self, agent: int, path: str, ip: str) -> None:
        """An admitted tunnel closed: its lease goes (soon, in a batch)."""
        name = self.ledger.give_back(agent, path, ip)
        if name is not None:
            self._releases.setdefault(path, []).append(name)
            self._wake.set()

    def agent_gone(self, agent: int) -> None:
        """A worker died with its tunnels: their leases go."""
        gone = self.ledger.agent_gone(agent)
        if gone:
            merge(self._releases, gone.items())
            self._wake.set()

    async def close(self) -> None:
        """A clean shutdown: every lease this node holds goes now (bounded by
        the store's timeout; a lease not let go ends by itself)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        releases, self._releases = self._releases, {}
        merge(releases, self.ledger.clear().items())
        if not releases:
            return
        try:
            await self._count.release(releases)
        except StoreError as exc:
            log.warning(
                "shared limits: %d leases not let go (they end within %g s): %s",
                sum(len(names) for names in releases.values()),
                self._lease,
                exc,
            )

    async def _keep(self) -> None:
        """Let go of released leases as they come, renew the held ones every
        redis_lease_renew; one call at a time, so a release made during a
        renewal follows it (a renewal adds back what it carries)."""
        loop = asyncio.get_running_loop()
        renew_at = loop.time() + self._renew_every
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, renew_at - loop.time()))
            self._wake.clear()
            renewing = loop.time() >= renew_at
            if self._outage.down and not renewing:
                continue  # Redis is silent: what to let go of waits for the next renewal
            releases, self._releases = self._releases, {}
            held: dict[str, list[str]] = {}
            if renewing:
                renew_at = loop.time() + self._renew_every
                held = self.ledger.held()
            if not releases and not held:
                continue
            try:
                await self._count.release(releases)
                await self._count.renew(held, self._lease)
            except StoreError as exc:
                self._failed(str(exc))
                # Tried again with the next renewal, while they may still hold a slot.
                if loop.time() - self._down_since < self._lease:
                    merge(self._releases, releases.items())
            else:
                self._answered()

    def _failed(self, why: str) -> None:
        now = asyncio.get_running_loop().time()
        if self._outage.failed(now):
            self._down_since = now
            if self._when_down is WhenDown.OPEN:
                then = "admitting on this node's own count"
            else:
                then = "refusing users with max_tunnels or max_ips"
            log.warning(
                "shared limits: %s; %s until it answers (-redis-limits-when-down %s)",
                why,
                then,
                self._when_down.value,
            )

    def _answered(self) -> None:
        if self._outage.answered():
            log.info("shared limits: Redis answers again; counting across nodes")
