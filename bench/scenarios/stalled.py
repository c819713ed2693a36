"""Connections that stall before or during the TLS handshake (scanners, slowloris,
a burst of clients behind a broken network): the server's RSS per stalled
connection, and whether the memory comes back once they are gone.

Each wave opens N silent TCP connections (not a byte sent), then N that send a
TLS ClientHello, read the server's reply and never answer it; the server's RSS
is read with each set open, then all are closed and, once the server has
closed its side, RSS is read again. Waves repeat on the same server. Both
relays drop a stalled handshake after 10 s, so a wave must be measured sooner:
a relay that closed some early fails the sample rather than skewing it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from bench.context import Context, interleave
from bench.model import Failure, Metric
from bench.peers import SERVER_NAME, BenchError, EchoDst, Relay, start_gorelay, start_ours
from bench.procstat import rss_bytes
from bench.settings import Settings

SECTION = "Stalled connections: memory"
WARM_CONNECTIONS = 32
SETTLE_S = 0.5  # after a set is open, before RSS is read
AFTER_S = 3.0  # after the server closed a wave, before RSS is read (ours trims within ~2 s)
WAIT_LIMIT_S = 30.0  # for the server to accept, or to close, a wave
HANDSHAKE_DEADLINE_S = 10.0  # both relays drop a stalled handshake after this
KIB_TARGET = 40.0  # the bound per stalled connection
AFTER_TARGET_PCT = 10.0  # RSS after a wave, above its level before the wave
DEPLOYED_ENV = {"PYTHONMALLOC": "malloc"}  # what the systemd unit sets
ORIGINAL_GO = "the original Go server: 38-41 KiB per stalled connection (not built here)"


@dataclass
class StalledSample:
    silent_kib: list[float] = field(default_factory=list)  # per wave
    hello_kib: list[float] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)  # before the first wave, after each wave

    def rise_pct(self) -> list[float]:
        """How far RSS after each wave is above its level before that wave, in %."""
        return [(after / before - 1) * 100 for before, after in itertools.pairwise(self.rss_mib)]


def steps(s: Settings) -> int:
    return 2 if s.stalled_connections else 0


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (SNI, ALPN http/1.1), sent as is on every connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError as exc:
        raise BenchError(f"cannot count the server's descriptors: {exc}") from exc


def _wait_descriptors(relay: Relay, done: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not done(descriptors(relay.pid)):
        if not relay.alive():
            raise BenchError(f"{relay.label} died {what}")
        if time.monotonic() > deadline:
            raise BenchError(f"{relay.label}: not done {what} within {WAIT_LIMIT_S:.0f} s")
        time.sleep(0.05)


def _open(addr: str, n: int, hello: bytes | None) -> list[socket.socket]:
    """n connections; with hello, each sends it and reads the server's first flight."""
    host, port = addr.rsplit(":", 1)
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.create_connection((host, int(port)), timeout=10)
            socks.append(sock)
            if hello is not None:
                sock.sendall(hello)
        if hello is not None:
            _read_replies(socks)
    except BaseException:
        _close(socks)
        raise
    return socks


def _read_replies(socks: list[socket.socket]) -> None:
    """Wait until every server has answered its ClientHello (bytes read, then ignored)."""
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        left = len(socks)
        deadline = time.monotonic() + WAIT_LIMIT_S
        while left:
            if time.monotonic() > deadline:
                raise BenchError(f"{left} of {len(socks)} ClientHellos got no answer")
            for key, _ in sel.select(0.5):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    if not conn.recv(65536):
                        raise BenchError("the server closed a connection during its handshake")
                except BlockingIOError:
                    continue
                sel.unregister(conn)
                left -= 1


def _close(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def _warm_up(relay: Relay, hello: bytes) -> int:
    """First-use costs (imports, TLS tables, pools) out of the deltas; returns the
    server's descriptor count at rest."""
    before = descriptors(relay.pid)
    socks = _open(relay.addr, WARM_CONNECTIONS, None) + _open(relay.addr, WARM_CONNECTIONS, hello)
    _close(socks)
    _wait_descriptors(relay, lambda fds: fds <= before, "closing the warm-up connections")
    time.sleep(AFTER_S)  # and whatever start-up left open (the controller's connection)
    return descriptors(relay.pid)


def measure(start: Callable[[], Relay], n: int, waves: int, hello: bytes) -> StalledSample:
    relay = start()
    sample = StalledSample()
    try:
        base = _warm_up(relay, hello)
        sample.rss_mib.append(rss_bytes(relay.pid) / 2**20)
        for _ in range(waves):
            _wave(relay, n, hello, base, sample)
    finally:
        relay.stop()
    return sample


def _wave(relay: Relay, n: int, hello: bytes, base: int, sample: StalledSample) -> None:
    before = rss_bytes(relay.pid)
    started = time.monotonic()
    silent: list[socket.socket] = []
    handshaking: list[socket.socket] = []
    try:
        silent = _open(relay.addr, n, None)
        _wait_descriptors(relay, lambda fds: fds >= base + n, f"accepting {n:,} connections")
        time.sleep(SETTLE_S)
        with_silent = rss_bytes(relay.pid)
        handshaking = _open(relay.addr, n, hello)
        _wait_descriptors(relay, lambda fds: fds >= base + 2 * n, "accepting the handshakes")
        time.sleep(SETTLE_S)
        with_both = rss_bytes(relay.pid)
        if descriptors(relay.pid) < base + 2 * n:
            raise BenchError(f"{relay.label} closed stalled connections before they were measured")
        if time.monotonic() - started > HANDSHAKE_DEADLINE_S:
            raise BenchError(f"opening a wave took over {HANDSHAKE_DEADLINE_S:.0f} s")
    finally:
        _close(silent + handshaking)
    _wait_descriptors(relay, lambda fds: fds <= base, "closing a wave")
    time.sleep(AFTER_S)
    sample.silent_kib.append((with_silent - before) / n / 1024)
    sample.hello_kib.append((with_both - with_silent) / n / 1024)
    sample.rss_mib.append(rss_bytes(relay.pid) / 2**20)


def _trail(samples: list[StalledSample]) -> str:
    return "; ".join(" -> ".join(f"{x:.0f}" for x in s.rss_mib) for s in samples)


def run(ctx: Context) -> None:
    s = ctx.settings
    n, waves = s.stalled_connections, s.stalled_waves
    hello = client_hello()
    with contextlib.ExitStack() as stack:
        echo = EchoDst()
        stack.callback(echo.stop)
        # As deploy/mtt-mu-server.service runs it: Python's objects in glibc's heap.
        ours = partial(start_ours, ctx.certs, echo.addr, "-workers", "1", env=DEPLOYED_ENV)
        go = partial(start_gorelay, ctx.certs, echo.addr)
        try:
            samples = interleave(
                ctx,
                f"{waves} waves of {n:,} + {n:,} stalled connections",
                [
                    ("ours", partial(measure, ours, n, waves, hello)),
                    ("Go relay", partial(measure, go, n, waves, hello)),
                ],
                rounds=1,  # RSS is near-deterministic; one round keeps this under a minute
            )
        except (BenchError, RuntimeError, OSError) as exc:
            ctx.results.failures.append(Failure(SECTION, "stalled connections", str(exc)))
            ctx.progress.note(f"stalled connections: FAILED: {exc}")
            return
    mine, theirs = samples["ours"], samples["Go relay"]
    where = "ours runs with -workers 1 (one process); the worst of the waves"
    ctx.results.metrics += [
        Metric(
            section=SECTION,
            name=f"RSS per silent TCP connection (no byte sent), {n:,} at once",
            unit="KiB",
            better="lower",
            ours=[max(x.silent_kib) for x in mine],
            ref=[max(x.silent_kib) for x in theirs],
            limit=KIB_TARGET,
            gate=True,
            note=f"{where}; {ORIGINAL_GO}",
        ),
        Metric(
            section=SECTION,
            name=f"RSS per stalled TLS handshake (ClientHello, no answer), {n:,} at once",
            unit="KiB",
            better="lower",
            ours=[max(x.hello_kib) for x in mine],
            ref=[max(x.hello_kib) for x in theirs],
            limit=KIB_TARGET,
            note=f"{where}, on top of the silent ones; {ORIGINAL_GO}",
        ),
        Metric(
            section=SECTION,
            name="RSS after the first wave, above its level before",
            unit="%",
            better="lower",
            ours=[x.rise_pct()[0] for x in mine],
            ref=[x.rise_pct()[0] for x in theirs],
            limit=AFTER_TARGET_PCT,
            gross_limit=5 * AFTER_TARGET_PCT,
            gate=True,
            note=(
                f"RSS {AFTER_S:g} s after the server closed its side of the wave; in MiB, before "
                f"the first wave, then after each: ours {_trail(mine)}, Go {_trail(theirs)} "
                "(Go's runtime hands freed memory back over minutes)"
            ),
        ),
    ]
    if waves > 1:
        ctx.results.metrics.append(
            Metric(
                section=SECTION,
                name=f"RSS after waves 2-{waves}, above the level before each (the worst)",
                unit="%",
                better="lower",
                ours=[max(x.rise_pct()[1:]) for x in mine],
                ref=[max(x.rise_pct()[1:]) for x in theirs],
                limit=AFTER_TARGET_PCT,
                gross_limit=5 * AFTER_TARGET_PCT,
                gate=True,
                note="the same waves: whether memory ratchets up with every burst",
            )
        )
