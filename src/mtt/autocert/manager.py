"""When to order a certificate, and handing it to the processes that serve it.

The supervisor runs one CertManager; workers only serve what it sends them
(a certificate through the same reload that -cert/-key changes use, the
TLS-ALPN-01 challenge certificates through their own message). At start a
kept certificate that has not expired is served at once; without one the
listener serves a self-signed certificate until the first is issued, since
TLS-ALPN-01 needs the very port to be listening.

Then: renew when core/renewal.py says so, retry a failed order with bounded
exponential backoff, and log every step (ordering, the challenge answered,
issued with its end and the renewal time, a failure with its reason and the
next try). Orders run under the state directory's lock (state.py): a
second server on the same state directory waits, then picks up what the
first one got.

The `acme` library blocks: each of its calls runs in a daemon thread of its
own, awaited with an outer bound. Not asyncio.to_thread: a thread of the
loop's default executor is joined when the loop closes, so an order stuck in
a request would hold the server's exit; a daemon thread is simply left
behind, and its result, if any, dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mtt.accept.tls_setup import TlsSpec
from mtt.autocert.client import HTTP_01, TLS_ALPN_01, Account, Challenge, describe
from mtt.autocert.http01 import Http01Listener
from mtt.autocert.state import AcmeState, Kept, iso
from mtt.config import ServerConfig
from mtt.core.renewal import Backoff, renewal_time
from mtt.errors import ConfigError
from mtt.transport.tls import alpn_challenge_pem

log = logging.getLogger("mtt.acme")
T = TypeVar("T")

Install = Callable[[TlsSpec], Awaitable[None]]
SetChallenges = Callable[[dict[str, TlsSpec]], Awaitable[None]]


async def in_thread(work: Callable[[], T], within: float) -> T:
    """work() in a daemon thread, awaited for at most `within` seconds."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="acme", daemon=True).start()
    async with asyncio.timeout(within):
        return await future


class CertManager:
    """Keeps a certificate for config.acme_domains served, from config.acme_directory."""

    def __init__(
        self,
        config: ServerConfig,
        install: Install,
        set_challenges: SetChallenges,
        http01: Http01Listener | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.domains = config.acme_domains
        self.limits = config.limits
        self.state = AcmeState(config.acme_dir, config.acme_directory, self.domains)
        self.install = install
        self.set_challenges = set_challenges
        self.http01 = http01
        self.clock = clock
        self.current: Kept | None = None
        self.failures = 0
        self.next_try = 0.0
        self.not_before = 0.0  # no order before this (acme_min_interval after the last)
        self.backoff = Backoff(self.limits.acme_retry_first, self.limits.acme_retry_max)
        self.names = ", ".join(self.domains)

    # -- start -----------------------------------------------------------------------

    def prepare(self) -> TlsSpec | None:
        """At start: the state directory, the account key, and the kept certificate
        to serve now (None: serve the self-signed one). ConfigError if the state
        directory cannot be used."""
        self.state.prepare()
        self.state.account_key()
        kept = self.state.kept()
        now = self.clock()
        if kept is None or kept.not_after <= now:
            why = "expired" if kept is not None else "none kept"
            log.info(
                "ACME: no certificate yet for %s (%s in %s): serving a self-signed one"
                " until it is issued",
                self.names,
                why,
                self.state.ca_dir,
            )
            return None
        self.current = kept
        log.info(
            "ACME: using the kept certificate for %s, valid until %s; %s",
            ", ".join(kept.names),
            kept.until(),
            self._plan(kept),
        )
        return kept.spec(self._origin())

    def _origin(self) -> str:
        return f"the ACME certificate for {self.names}"

    def _renewal(self, kept: Kept) -> float:
        return renewal_time(
            kept.not_before,
            kept.not_after,
            self.limits.acme_renew_ahead_max,
            self.limits.acme_renew_fraction,
        )

    def _plan(self, kept: Kept) -> str:
        if not kept.covers(self.domains):
            return f"ordering now: it does not cover {self.names}"
        return f"renewal scheduled at {iso(self._renewal(kept))}"

    # -- the loop --------------------------------------------------------------------

    def wait(self, now: float) -> float:
        """Seconds until the next order attempt (0: now)."""
        kept = self.current
        if self.next_try:
            when = self.next_try
        elif kept is None or not kept.covers(self.domains):
            when = now
        else:
            when = self._renewal(kept)
        return max(max(when, self.not_before) - now, 0.0)

    async def run(self) -> None:
        """Order, renew and retry until cancelled."""
        while True:
            wait = self.wait(self.clock())
            if wait > 0:
                await asyncio.sleep(min(wait, self.limits.acme_check_interval))
                continue
            await self.attempt()

    async def attempt(self) -> Kept | None:
        """One order (or the pick-up of another process's certificate); failures
        are logged and scheduled for a retry, never raised."""
        try:
            holder = self.state.lock.acquire()
        except ConfigError as exc:  # the lock file cannot be opened: a failure like any
            self._failed(exc)
            return None
        if holder is not None:
            self.next_try = self.clock() + self.limits.acme_retry_first
            who = f"pid {holder}" if holder else "another process"
            log.info(
                "ACME: another mtt-mu-server (%s) is ordering for %s; looking again at %s",
                who,
                self.state.root,
                iso(self.next_try),
            )
            return None
        try:
            kept = await self._order()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever it was, the order is retried later
            self._failed(exc)
            return None
        finally:
            self.state.lock.release()
        self.failures = 0
        self.next_try = 0.0
        self.not_before = self.clock() + self.limits.acme_min_interval
        return kept

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        delay = self.backoff.delay(self.failures)
        self.next_try = self.clock() + delay
        log.error(
            "ACME: ordering a certificate for %s failed: %s; next try in %.0f s, at %s"
            " (failure %d in a row)",
            self.names,
            describe(exc, self.limits.acme_order_timeout),
            delay,
            iso(self.next_try),
            self.failures,
        )

    async def _order(self) -> Kept:
        """Under the order lock: the kept certificate if another process renewed it
        meanwhile, else a new one from the CA."""
        kept = self.state.kept()
        if (
            kept is not None
            and kept.covers(self.domains)
            and self.clock() < self._renewal(kept)
            and (self.current is None or kept.serial != self.current.serial)
        ):
            await self._serve(kept, "picked up the certificate another process renewed")
            return kept
        kept = await self._issue()
        await self._serve(kept, "issued")
        return kept

    async def _issue(self) -> Kept:
        limits = self.limits
        config = self.config
        account = Account(
            config.acme_directory,
            self.state.account_key(),
            config.acme_email,
            config.acme_ca_bundle or True,
            limits.acme_request_timeout,
        )
        step = limits.acme_request_timeout * 3  # a few requests, each bounded by its timeout
        uri = await in_thread(account.open, step)
        prefer = (HTTP_01, TLS_ALPN_01) if self.http01 is not None else (TLS_ALPN_01,)
        log.info(
            "ACME: ordering a certificate for %s from %s (account %s)",
            self.names,
            config.acme_directory,
            uri,
        )
        pending = await in_thread(
            lambda: account.new_order(self.domains, prefer), step + len(self.domains) * step
        )
        try:
            await self._expose(pending.challenges)
            chain = await in_thread(
                lambda: account.finish(pending, limits.acme_order_timeout),
                limits.acme_order_timeout + step,
            )
        finally:
            await self._withdraw(pending.challenges)
        return self.state.save(chain.encode("latin-1"), pending.key_pem)

    async def _expose(self, challenges: list[Challenge]) -> None:
        """Serve the challenges' answers, everywhere, before the CA is told to look."""
        specs: dict[str, TlsSpec] = {}
        for challenge in challenges:
            if challenge.kind == TLS_ALPN_01:
                cert, key = alpn_challenge_pem(challenge.domain, challenge.key_authorization)
                specs[challenge.domain] = {
                    "cert_pem": cert.decode("latin-1"),
                    "key_pem": key.decode("latin-1"),
                    "origin": f"the TLS-ALPN-01 certificate for {challenge.domain}",
                }
                log.info(
                    "ACME: %s: answering TLS-ALPN-01 on the tunnel port %s",
                    challenge.domain,
                    self.config.bind,
                )
            elif self.http01 is not None:
                self.http01.answers[challenge.token] = challenge.key_authorization
                log.info(
                    "ACME: %s: answering HTTP-01 on %s", challenge.domain, self.config.acme_http
                )
        if specs:
            await self.set_challenges(specs)

    async def _withdraw(self, challenges: list[Challenge]) -> None:
        if self.http01 is not None:
            for challenge in challenges:
                self.http01.answers.pop(challenge.token, None)
        if any(c.kind == TLS_ALPN_01 for c in challenges):
            await self.set_challenges({})

    async def _serve(self, kept: Kept, how: str) -> None:
        await self.install(kept.spec(self._origin()))
        self.current = kept
        log.info(
            "ACME: certificate for %s %s, valid until %s (serial %x); %s",
            ", ".join(kept.names),
            how,
            kept.until(),
            kept.serial,
            self._plan(kept),
        )
