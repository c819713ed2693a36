"""Hostile input (issue 6): what the open internet sends to port 443, and what a
careless or malicious panel sends to the controller.

Every case checks the same things: the server answers with a clear error or a
close, in bounded time; it logs at most one line per connection, naming the
peer (127.0.0.1:port) and the reason, and never a traceback; its memory stays
bounded where the input is large; and a "canary" user's tunnel, opened before
the attack, still echoes afterwards (and a fresh one opens), so one peer's
garbage never costs another user service.

The main servers run with one worker, so the canary and the attacker share a
process. Observations are printed; `pytest -rP` shows them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import struct
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from mtt.smux import Cmd, Frame, FrameDecoder, encode_frame
from tests.integration.hostile_helpers import (
    INVALID_CLOSE_CODES,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    SNI,
    VALID_CLOSE_CODES,
    Closing,
    GiB,
    HttpReply,
    KiB,
    MiB,
    RawWebSocket,
    RssWatch,
    blackhole_address,
    client_hello,
    connect,
    dst_server,
    echo,
    exchange,
    lines_for_port,
    local_port,
    plain_get,
    pusher,
    raw_tcp_exchange,
    read_until_eof,
    refusing_address,
    resetter,
    rst_close,
    send_and_read,
    slow_reader,
    slow_tls_connect,
    upgrade_request,
    ws_frame,
)
from tests.support import ServerProcess, pattern, running_server

HANDSHAKE_BOUND = 10.0  # README: 10 s for the TLS handshake, 10 s for the request
DIAL_TIMEOUT = 10.0  # README: -dial-timeout defaults to 10 s
SLACK = 4.0  # event-loop lag of this test process with hundreds of sockets open
QUICK = 3.0  # a malformed input is answered or dropped within this
FORBIDDEN = ("python", "picows", "aiohttp", "mtt")  # no page or header may name these
_SMUX_HEADER = struct.Struct("<BBHI")


def note(text: str) -> None:
    """An observation for the report (shown with pytest -rP)."""
    print(text)


# -- servers and the canary ----------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_tls() -> Iterator[ServerProcess]:
    """The target: TLS with a self-signed certificate, one worker process."""
    with running_server("-force-tls", "-n", SNI, "-workers", "1") as server:
        yield server


@pytest.fixture(scope="module")
def hostile_plain() -> Iterator[ServerProcess]:
    """The same behind a TLS-terminating proxy: plain HTTP, one worker."""
    with running_server("-workers", "1") as server:
        yield server


class Canary:
    """Another user's tunnel, open across an attack; it must keep echoing."""

    def __init__(self, server: ServerProcess, ws: RawWebSocket, tls: bool) -> None:
        self.server = server
        self.ws = ws
        self.tls = tls

    async def check(self) -> None:
        payload = os.urandom(4096)
        self.ws.send_binary(payload)
        await self.ws.drain(5)
        assert await self.ws.read_data(len(payload), 5) == payload, "canary tunnel broken"
        fresh = await RawWebSocket.open(self.server, "/canary", tls=self.tls)
        try:
            fresh.send_binary(b"fresh canary")
            assert await fresh.read_data(12, 5) == b"fresh canary", "new tunnel does not echo"
        finally:
            fresh.abort()


@pytest.fixture
async def canary(hostile_tls: ServerProcess) -> AsyncIterator[Canary]:
    async with dst_server(echo) as dst:
        hostile_tls.add("/canary", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/canary", tls=True)
        bird = Canary(hostile_tls, ws, True)
        await bird.check()
        try:
            yield bird
        finally:
            ws.abort()


async def new_log(server: ServerProcess, mark: int) -> list[str]:
    """Server log lines after `mark`, once the log pump has caught up."""
    await asyncio.sleep(0.15)
    return list(server.lines[mark:])


def assert_log_discipline(lines: list[str], ports: list[int]) -> None:
    """No traceback; at most one line per connection."""
    text = "".join(lines)
    assert "Traceback" not in text, text
    for port in ports:
        mine = lines_for_port(lines, port)
        assert len(mine) <= 1, f"{len(mine)} log lines for one connection:\n{''.join(mine)}"


def assert_names_nothing(raw: bytes) -> None:
    lowered = raw.lower()
    for word in FORBIDDEN:
        assert word.encode() not in lowered, f"reply names {word!r}: {raw[:600]!r}"


# -- TCP and TLS garbage -----------------------------------------------------------


def _random_bytes(seed: int, size: int) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    data[0] = 0x47  # never looks like a TLS record header (0x16)
    return bytes(data)


GARBAGE_BEFORE_TLS: dict[str, Callable[[], bytes]] = {
    "random-bytes": lambda: _random_bytes(1, 4096),
    "http-request-in-clear": lambda: plain_get("/canary"),
    "clienthello-then-garbage": lambda: client_hello() + _random_bytes(2, 2048),
    "tls-record-of-garbage": lambda: b"\x16\x03\x01\x00\x40" + _random_bytes(3, 64),
}


@pytest.mark.parametrize("kind", list(GARBAGE_BEFORE_TLS))
async def test_garbage_before_tls_is_dropped(
    hostile_tls: ServerProcess, canary: Canary, kind: str
) -> None:
    """Answered as nginx answers (tests/interop/test_probe_resistance.py has the
    bytes): a first byte that is no TLS record is plain HTTP to it, a 400; a
    broken handshake gets what OpenSSL writes, ending in an alert; then the close."""
    mark = len(hostile_tls.lines)
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile_tls.port)
    try:
        reply = await send_and_read(
            reader, writer, GARBAGE_BEFORE_TLS[kind](), limit_s=QUICK + 2, until_eof=True
        )
    finally:
        writer.transport.abort()
    note(f"{kind}: {reply.describe()}, {len(reply.raw)} bytes back")
    assert reply.closed and reply.elapsed < QUICK, reply.describe()
    if kind in ("random-bytes", "http-request-in-clear"):
        assert reply.status == 400, reply.raw[:300]
    else:  # TLS records: an alert, or the server's flight and then one
        assert reply.raw[:1] in (b"\x15", b"\x16") and reply.raw[1:3] == b"\x03\x03", reply.raw
    assert b" 101 " not in reply.raw
    assert_names_nothing(reply.raw)
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [reply.local_port])


@pytest.mark.parametrize("tls", [True, False], ids=["after-tls", "plain-port"])
async def test_garbage_instead_of_http_gets_400(
    hostile_tls: ServerProcess, hostile_plain: ServerProcess, canary: Canary, tls: bool
) -> None:
    server = hostile_tls if tls else hostile_plain
    mark = len(server.lines)
    junk = _random_bytes(4, 2048) + b"\r\n\r\n"
    reply = await exchange(server, junk, tls=tls, limit_s=QUICK + 2, until_eof=True)
    note(f"garbage {'after TLS' if tls else 'on the plain port'}: {reply.describe()}")
    assert reply.status in (None, 400), reply.raw[:300]
    assert reply.closed and reply.elapsed < QUICK, reply.describe()
    # The reply must not reflect the request, raw or escaped.
    assert junk[:16] not in reply.raw
    assert repr(junk[:16])[2:-1].encode() not in reply.raw, reply.raw[:300]
    assert_names_nothing(reply.raw)
    await canary.check()
    assert_log_discipline(await new_log(server, mark), [reply.local_port])


def _signature(reply: HttpReply) -> tuple[object, ...]:
    """What a prober sees: status line, headers in order (but Date) and body."""
    status_line = reply.raw.split(b"\r\n", 1)[0]
    headers = tuple((k, v) for k, v in reply.headers if k.lower() != "date")
    length = reply.header("Content-Length")
    body = reply.body[: int(length)] if length is not None and length.isdigit() else reply.body
    return status_line, headers, body


# -- oversized request heads ----------------------------------------------------------

_FIVE_THOUSAND_HEADERS = "".join(f"X-Flood-{i}: {i}\r\n" for i in range(5000))
_TWO_THOUSAND_HEADERS = _FIVE_THOUSAND_HEADERS[: _FIVE_THOUSAND_HEADERS.index("X-Flood-2000:")]
_ONE_MIB_HEADER = "X-Huge: " + "h" * MiB + "\r\n"


@pytest.mark.parametrize(
    ("request_head", "piece"),
    [
        pytest.param(upgrade_request("/" + "a" * 100 * KiB), 0, id="100KiB-path"),
        pytest.param(upgrade_request("/" + "a" * 100 * KiB), 4096, id="100KiB-path-dribbled"),
        pytest.param(
            upgrade_request("/canary?" + "q" * 100 * KiB), 0, id="100KiB-query-on-user-path"
        ),
        pytest.param(
            upgrade_request("/canary", extra=_FIVE_THOUSAND_HEADERS),
            4096,
            id="5000-headers-dribbled",
        ),
        pytest.param(upgrade_request("/canary", extra=_ONE_MIB_HEADER), 0, id="1MiB-header"),
        pytest.param(
            upgrade_request("/canary", extra=_ONE_MIB_HEADER), 4096, id="1MiB-header-dribbled"
        ),
    ],
)
async def test_oversized_request_heads_are_refused(
    hostile_tls: ServerProcess, canary: Canary, request_head: bytes, piece: int
) -> None:
    """Over TLS (how the head is split into reads varies): never an upgrade, a 4xx or
    a close, and no memory kept."""
    mark = len(hostile_tls.lines)
    async with RssWatch(hostile_tls) as rss:
        reply = await exchange(hostile_tls, request_head, tls=True, limit_s=8, piece=piece)
    note(f"{len(request_head)}-byte head: {reply.describe()}, RSS +{rss.growth / MiB:.1f} MiB")
    assert reply.status != 101, "an oversized request head was upgraded"
    assert reply.status is None or 400 <= reply.status < 500, reply.raw[:200]
    assert reply.status is not None or reply.closed, reply.describe()
    assert reply.elapsed < 6, reply.describe()
    assert rss.growth < 16 * MiB, rss.growth
    assert_names_nothing(reply.raw)
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [reply.local_port])


@pytest.mark.parametrize(
    ("make_head", "piece"),
    [
        pytest.param(
            lambda path: upgrade_request(path + "?" + "q" * 40 * KiB),
            0,
            id="40KiB-query-in-one-segment",
        ),
        pytest.param(
            lambda path: upgrade_request(path, extra=_TWO_THOUSAND_HEADERS),
            0,
            id="2000-headers-in-one-segment",
        ),
        pytest.param(
            lambda path: upgrade_request(path + "?" + "q" * 40 * KiB),
            4096,
            id="40KiB-query-dribbled",
        ),
        pytest.param(
            lambda path: upgrade_request(path, extra=_TWO_THOUSAND_HEADERS),
            4096,
            id="2000-headers-dribbled",
        ),
    ],
)
async def test_oversized_heads_on_a_user_path_look_like_unknown_paths(
    hostile_plain: ServerProcess, make_head: Callable[[str], bytes], piece: int
) -> None:
    """Plain HTTP, where a head under 64 KiB written at once reaches the server in one
    read: an oversized upgrade must be refused the same way whether the path is a
    user's or not, or the answer tells a prober which paths exist."""
    async with dst_server() as dst:
        hostile_plain.add("/oversized-user", dst.addr)
        user = await exchange(hostile_plain, make_head("/oversized-user"), tls=False, piece=piece)
        unknown = await exchange(hostile_plain, make_head("/no-such-user"), tls=False, piece=piece)
    note(f"user path: {user.describe()}; unknown path: {unknown.describe()}")
    assert user.status != 101, "an oversized request head was upgraded"
    assert user.status is None or 400 <= user.status < 500
    assert (_signature(user), user.status is None and user.closed) == (
        _signature(unknown),
        unknown.status is None and unknown.closed,
    ), (user.raw[:300], unknown.raw[:300])


# -- slowloris ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_slowloris_is_dropped_in_time_while_users_get_through(
    hostile_tls: ServerProcess, hostile_plain: ServerProcess, canary: Canary
) -> None:
    """Hundreds of connections that stall at every stage of TLS and HTTP: each is
    dropped within its handshake bound, and during the attack new tunnels open
    and echo within a few seconds on both listeners."""
    async with dst_server(echo) as plain_echo:
        hostile_plain.add("/canary", plain_echo.addr)
        marks = {
            hostile_tls.port: len(hostile_tls.lines),
            hostile_plain.port: len(hostile_plain.lines),
        }
        hello = client_hello()
        established = 0
        all_in = asyncio.Event()
        # kind -> list of (seconds from the measuring point until dropped or None, port)
        outcome: dict[str, list[tuple[float | None, int]]] = {}
        bounds: dict[str, float] = {}

        async def dribble(writer: asyncio.StreamWriter) -> None:
            for i in range(40):
                await asyncio.sleep(1)
                if writer.is_closing():
                    return
                writer.write(b"X-Slow-%d: still coming\r\n" % i)

        def count_in() -> None:
            nonlocal established
            established += 1
            if established == total:
                all_in.set()

        async def attack(kind: str, server: ServerProcess, stage: str, bound: float) -> None:
            bounds[kind] = bound
            started = time.monotonic()
            helper: asyncio.Future[None] | None = None
            if stage == "slow-tls":
                reader, writer, tls_obj, out = await slow_tls_connect(server, 7.0, count_in)
                tls_obj.write(b"GET /canary HTTP/1.1\r\nHost: x\r\n")
                writer.write(out.read())
            elif stage in ("tcp-silent", "hello-part", "hello-full"):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(
                    {"tcp-silent": b"", "hello-part": hello[:60], "hello-full": hello}[stage]
                )
            else:  # the request stalls after a completed TLS handshake (or on plain HTTP)
                reader, writer = await connect(server, tls=server is hostile_tls, limit_s=20)
                started = time.monotonic()
                writer.write(b"GET /canary HTTP/1.1\r\nHost: tunnel.test\r\n")
                if stage == "dribble":
                    helper = asyncio.ensure_future(dribble(writer))
            port = local_port(writer)
            if stage != "slow-tls":
                count_in()
            try:
                _, closed = await read_until_eof(reader, bound + 3 * SLACK)
                dropped = time.monotonic() - started if closed else None
                outcome.setdefault(kind, []).append((dropped, port))
            finally:
                if helper is not None:
                    helper.cancel()
                writer.transport.abort()

        plan = [
            ("tls:tcp-silent", hostile_tls, "tcp-silent", HANDSHAKE_BOUND, 60),
            ("tls:partial-clienthello", hostile_tls, "hello-part", HANDSHAKE_BOUND, 60),
            ("tls:clienthello-then-silence", hostile_tls, "hello-full", HANDSHAKE_BOUND, 60),
            ("tls:half-request", hostile_tls, "half-request", HANDSHAKE_BOUND, 60),
            ("tls:dribbled-headers", hostile_tls, "dribble", HANDSHAKE_BOUND, 60),
            ("tls:slow-tls-then-half-request", hostile_tls, "slow-tls", 2 * HANDSHAKE_BOUND, 20),
            ("plain:tcp-silent", hostile_plain, "tcp-silent", HANDSHAKE_BOUND, 60),
            ("plain:half-request", hostile_plain, "half-request", HANDSHAKE_BOUND, 60),
            ("plain:dribbled-headers", hostile_plain, "dribble", HANDSHAKE_BOUND, 60),
        ]
        total = sum(count for *_, count in plan)
        probes: list[tuple[str, float]] = []

        async def user_probe(server: ServerProcess, tls: bool) -> None:
            started = time.monotonic()
            ws = await RawWebSocket.open(server, "/canary", tls=tls)
            try:
                ws.send_binary(b"real user")
                assert await ws.read_data(9, 5) == b"real user"
            finally:
                ws.abort()
            probes.append(("tls" if tls else "plain", time.monotonic() - started))

        async with RssWatch(hostile_tls) as rss:
            attackers = asyncio.gather(
                *(
                    attack(kind, server, stage, bound)
                    for kind, server, stage, bound, count in plan
                    for _ in range(count)
                ),
                return_exceptions=True,
            )
            try:
                await asyncio.wait_for(all_in.wait(), 20)
                # The attack is in place: real users must get through now.
                for i in range(10):
                    async with asyncio.timeout(QUICK):
                        await user_probe(
                            *((hostile_tls, True) if i % 2 else (hostile_plain, False))
                        )
                    await asyncio.sleep(0.3)
                holding = total - sum(
                    1
                    for results in outcome.values()
                    for dropped, _ in results
                    if dropped is not None
                )
                await canary.check()
            finally:
                errors = [e for e in await attackers if isinstance(e, BaseException)]
            assert not errors, f"{len(errors)} attackers failed, first: {errors[0]!r}"
        note(
            f"{total} stalled connections; users during the attack: "
            + ", ".join(f"{kind} {t:.2f} s" for kind, t in probes)
        )
        note(f"still held after the probes: {holding}; TLS server RSS +{rss.growth / MiB:.1f} MiB")
        assert holding > total * 0.8, "the probes did not run while the attack was in place"
        failures = []
        for kind, results in sorted(outcome.items()):
            times = [d for d, _ in results if d is not None]
            never = len(results) - len(times)
            note(
                f"{kind}: {len(results)} dropped after {min(times, default=0):.1f}..{max(times, default=0):.1f} s"
                + (f", {never} never" if never else "")
            )
            if never or max(times) > bounds[kind] + SLACK:
                failures.append(kind)
        assert not failures, f"not dropped within the handshake bound: {failures}"
        assert rss.growth < 64 * MiB, rss.growth
        await canary.check()
        for server in (hostile_tls, hostile_plain):
            lines = await new_log(server, marks[server.port])
            ports = [port for results in outcome.values() for _, port in results]
            assert_log_discipline(lines, ports)
            assert len(lines) <= total, f"{len(lines)} log lines for {total} connections"


# -- upgrade requests that are not quite right ------------------------------------------


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_probes_cannot_tell_a_user_path_from_an_unknown_one(
    hostile_tls: ServerProcess, hostile_plain: ServerProcess, tls: bool
) -> None:
    """Issue 6: a GET of a user's path, a GET of an unknown path and an upgrade on
    an unknown path get the same answer (status, headers but Date, body), and
    nothing in it names the implementation."""
    server = hostile_tls if tls else hostile_plain
    async with dst_server() as dst:
        server.add("/real-user", dst.addr)
        requests = {
            "GET of a user's path": plain_get("/real-user"),
            "GET of an unknown path": plain_get("/no-such-user"),
            "upgrade on an unknown path": upgrade_request("/no-such-user"),
        }
        replies = {name: await exchange(server, raw, tls=tls) for name, raw in requests.items()}
        assert dst.total == 0
    for name, reply in replies.items():
        note(f"{name}: {reply.raw[:400]!r}")
    first_name, first = next(iter(replies.items()))
    differences = [
        f"{name}: {_signature(reply)!r} vs {first_name}: {_signature(first)!r}"
        for name, reply in replies.items()
        if _signature(reply) != _signature(first)
    ]
    assert not differences, "\n".join(differences)
    for reply in replies.values():
        assert reply.status is not None and reply.status != 101
        assert_names_nothing(reply.raw)


def _b64(n: int) -> str:
    return base64.b64encode(b"k" * n).decode()


@pytest.mark.parametrize(
    "request_head",
    [
        pytest.param(upgrade_request("/canary", version="8"), id="version-8"),
        pytest.param(upgrade_request("/canary", version=None), id="version-missing"),
        pytest.param(upgrade_request("/canary", key=None), id="key-missing"),
        pytest.param(upgrade_request("/canary", key="not a key!"), id="key-not-base64"),
        pytest.param(upgrade_request("/canary", key=_b64(8)), id="key-of-8-bytes"),
        pytest.param(upgrade_request("/canary", upgrade=None), id="upgrade-header-missing"),
        pytest.param(upgrade_request("/canary", upgrade="h2c"), id="upgrade-to-h2c"),
        pytest.param(upgrade_request("/canary", connection=None), id="connection-header-missing"),
        pytest.param(upgrade_request("/canary", method="POST"), id="method-post"),
    ],
)
async def test_broken_upgrades_on_a_user_path_look_like_unknown_paths(
    hostile_tls: ServerProcess, canary: Canary, request_head: bytes
) -> None:
    """A wrong version or key on a user's path must not reveal that the path
    exists (no 426 or 400 that an unknown path would not get)."""
    mark = len(hostile_tls.lines)
    reply = await exchange(hostile_tls, request_head, tls=True)
    unknown = await exchange(hostile_tls, upgrade_request("/no-such-user"), tls=True)
    note(f"{request_head.split(b' HTTP')[0].decode()}...: {reply.describe()}")
    assert reply.status is not None and reply.status != 101, reply.describe()
    assert _signature(reply) == _signature(unknown), (reply.raw[:400], unknown.raw[:400])
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [reply.local_port])


# -- WebSocket frames after a good upgrade ---------------------------------------------------


@pytest.mark.parametrize(
    ("build", "codes"),
    [
        pytest.param(lambda: ws_frame(OP_BINARY, b"hello", mask=False), {1002}, id="unmasked"),
        pytest.param(
            lambda: ws_frame(OP_BINARY, b"x" * 64 * KiB, announced=2**63 - 1),
            {1009, 1002},
            id="length-2^63-1",
        ),
        pytest.param(
            lambda: ws_frame(OP_BINARY, b"x" * 64 * KiB, announced=2**64 - 1),
            {1009, 1002},
            id="length-2^64-1",
        ),
        pytest.param(
            lambda: ws_frame(OP_BINARY, b"x" * 64 * KiB, announced=MiB + 1),
            {1009},
            id="length-1MiB+1",
        ),
        pytest.param(lambda: ws_frame(OP_BINARY, b"hello", rsv=4), {1002}, id="rsv1"),
        pytest.param(lambda: ws_frame(OP_BINARY, b"hello", rsv=3), {1002}, id="rsv2+rsv3"),
        pytest.param(lambda: ws_frame(0x3, b"hello"), {1002}, id="opcode-0x3"),
        pytest.param(lambda: ws_frame(0x7, b"hello"), {1002}, id="opcode-0x7"),
        pytest.param(lambda: ws_frame(0xB, b"hello"), {1002}, id="opcode-0xB"),
        pytest.param(lambda: ws_frame(0xF, b"hello"), {1002}, id="opcode-0xF"),
        pytest.param(lambda: ws_frame(OP_PING, b"hello" * 26), {1002}, id="ping-of-130-bytes"),
        pytest.param(lambda: ws_frame(OP_PING, b"hello", fin=False), {1002}, id="fragmented-ping"),
        pytest.param(lambda: ws_frame(OP_CLOSE, b"\x00\x01hello"), {1002}, id="close-code-1"),
        pytest.param(lambda: ws_frame(OP_CLOSE, b"\x03"), {1002}, id="close-of-1-byte"),
        pytest.param(
            lambda: ws_frame(OP_CLOSE, b"\x03\xe8bad \xff\xfe"), {1007}, id="close-reason-not-utf8"
        ),
        pytest.param(
            lambda: ws_frame(OP_CONT, b"hello"),
            {1002},
            id="continuation-without-start",
        ),
        pytest.param(
            lambda: ws_frame(OP_BINARY, b"he", fin=False) + ws_frame(OP_BINARY, b"llo"),
            {1002},
            id="new-message-inside-fragmented-one",
        ),
    ],
)
async def test_frame_violations_close_the_tunnel(
    hostile_tls: ServerProcess, canary: Canary, build: Callable[[], bytes], codes: set[int]
) -> None:
    mark = len(hostile_tls.lines)
    async with dst_server() as dst:
        hostile_tls.add("/frames", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/frames", tls=True)
        try:
            await dst.wait_for(lambda: dst.total == 1)
            async with RssWatch(hostile_tls) as rss:
                ws.send(build())
                with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                    await ws.drain(2)
                closing = await ws.wait_closed(2)
        finally:
            ws.abort()
        await dst.wait_for(lambda: dst.open == 0, 3)
        relayed = b"".join(bytes(c.received) for c in dst.conns)
    note(f"{closing.describe()}, RSS +{rss.growth / KiB:.0f} KiB, relayed {relayed[:20]!r}")
    assert closing.code in codes and closing.eof and closing.elapsed < QUICK, closing.describe()
    assert b"hello" not in relayed and b"xxxx" not in relayed, relayed[:100]
    assert rss.growth < 4 * MiB, rss.growth
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [ws.port])


def _smux_data_frames(size: int, seed: int) -> bytes:
    """`size` bytes of back-to-back PSH frames for stream 3 (the last one cut short):
    every whole frame in it would be data for dst."""
    chunk = 32 * KiB
    data = pattern(seed, size)
    return b"".join(psh(3, data[i : i + chunk]) for i in range(0, size, chunk))[:size]


@pytest.mark.parametrize("subprotocol", ["smux_off", "smux_on"])
@pytest.mark.parametrize("pause_s", [None, 0.005], ids=["one-write", "in-pieces"])
@pytest.mark.parametrize("size", [MiB + 1, 2 * MiB], ids=["1MiB+1", "2MiB"])
async def test_oversized_frames_never_reach_dst(
    hostile_tls: ServerProcess, canary: Canary, size: int, pause_s: float | None, subprotocol: str
) -> None:
    """A whole frame over the 1 MiB bound is answered with 1009, and nothing of it,
    nor of the frame after it, reaches dst (nor the smux session), however fast or
    slowly it arrives. picows sends the 1009 at the frame header but goes on parsing
    until it disconnects 10 ms later, handing over the frame if it completes by then."""
    mark = len(hostile_tls.lines)
    mux = subprotocol == "smux_on"
    before = syn(3) + psh(3, b"before;") if mux else b"before;"
    oversized = _smux_data_frames(size, 10) if mux else pattern(10, size)
    after = psh(3, b"after") if mux else b"after"
    wire = ws_frame(OP_BINARY, oversized) + ws_frame(OP_BINARY, after)
    async with dst_server() as dst:
        hostile_tls.add("/too-big", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/too-big", tls=True, subprotocol=subprotocol)
        try:
            ws.send_binary(before)
            await dst.wait_for(lambda: dst.total == 1 and dst.conns[0].received_total >= 7)
            if pause_s is None:
                ws.send(wire)
                with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                    await ws.drain(5)
            else:
                await ws.send_in_pieces(wire, 64 * KiB, pause_s)
            closing = await ws.wait_closed(QUICK + 2)
        finally:
            ws.abort()
        await dst.wait_for(lambda: dst.open == 0, 3)
        relayed = b"".join(bytes(c.received) for c in dst.conns)
    note(f"{size}-byte frame: {closing.describe()}, dst got {len(relayed)} bytes")
    assert relayed == b"before;", f"{len(relayed)} bytes reached dst: {relayed[:40]!r}"
    assert closing.code == 1009 and closing.eof and closing.elapsed < QUICK, closing.describe()
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [ws.port])


async def _close_with(server: ServerProcess, subprotocol: str, code: int) -> tuple[Closing, int]:
    """Send a close frame with `code` on a fresh tunnel: the server's answer, and our port."""
    async with dst_server() as dst:
        server.add("/close-codes", dst.addr)
        ws = await RawWebSocket.open(server, "/close-codes", tls=True, subprotocol=subprotocol)
        try:
            ws.send(ws_frame(OP_CLOSE, struct.pack("!H", code) + b"bye"))
            return await ws.wait_closed(QUICK + 2), ws.port
        finally:
            ws.abort()


@pytest.mark.parametrize("subprotocol", ["smux_off", "smux_on"])
@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
async def test_invalid_close_codes_fail_with_1002(
    hostile_tls: ServerProcess, subprotocol: str, code: int
) -> None:
    mark = len(hostile_tls.lines)
    closing, port = await _close_with(hostile_tls, subprotocol, code)
    note(f"close {code} on {subprotocol}: {closing.describe()}")
    assert closing.code == 1002 and closing.eof and closing.elapsed < QUICK, closing.describe()
    assert_log_discipline(await new_log(hostile_tls, mark), [port])


@pytest.mark.parametrize("subprotocol", ["smux_off", "smux_on"])
@pytest.mark.parametrize("code", VALID_CLOSE_CODES)
async def test_valid_close_codes_are_echoed(
    hostile_tls: ServerProcess, subprotocol: str, code: int
) -> None:
    """As gorilla/websocket's default close handler does (RFC 6455 §5.5.1)."""
    closing, _ = await _close_with(hostile_tls, subprotocol, code)
    assert closing.code == code and closing.eof and closing.elapsed < QUICK, closing.describe()


async def test_protocol_errors_log_one_line_naming_the_peer(hostile_tls: ServerProcess) -> None:
    mark = len(hostile_tls.lines)
    ports = []
    async with dst_server() as dst:
        hostile_tls.add("/frames", dst.addr)
        for bad in (
            ws_frame(OP_BINARY, b"hello", mask=False),
            ws_frame(OP_BINARY, b"", announced=2**63 - 1),
            ws_frame(0x3, b"hello"),
        ):
            ws = await RawWebSocket.open(hostile_tls, "/frames", tls=True)
            ports.append(ws.port)
            ws.send(bad)
            await ws.wait_closed(2)
            ws.abort()
    lines = [line for line in await new_log(hostile_tls, mark) if "mtt.controller" not in line]
    for line in lines:
        note(line.rstrip())
    stray = [line for line in lines if not any(lines_for_port([line], p) for p in ports)]
    assert not stray, "log lines that name no peer:\n" + "".join(stray)
    for port in ports:
        assert len(lines_for_port(lines, port)) == 1, port


async def test_text_and_fragmented_messages_are_stream_data(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    big = pattern(6, MiB)
    pieces = [big[i : i + KiB] for i in range(0, MiB, KiB)]
    frames = [
        ws_frame(OP_TEXT, b"text frame;"),
        ws_frame(OP_BINARY, b"ab", fin=False),
        ws_frame(OP_PING, b"between fragments"),
        ws_frame(OP_CONT, b"cd", fin=False),
        ws_frame(OP_CONT, b"ef;"),
        ws_frame(OP_TEXT, b"frag", fin=False),
        ws_frame(OP_CONT, b"mented text;"),
        ws_frame(OP_BINARY, pieces[0], fin=False),
        *(ws_frame(OP_CONT, piece, fin=False) for piece in pieces[1:-1]),
        ws_frame(OP_CONT, pieces[-1]),
    ]
    expected = b"text frame;abcdef;fragmented text;" + big
    async with dst_server() as dst:
        hostile_tls.add("/fragments", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/fragments", tls=True)
        try:
            ws.send(b"".join(frames))
            await ws.drain()
            await dst.wait_for(
                lambda: dst.total == 1 and dst.conns[0].received_total >= len(expected)
            )
            got = bytes(dst.conns[0].received)
            pong = await ws.read_frame(5)
            assert pong == (OP_PONG, b"between fragments")
            assert (await ws.wait_closed(0.3)).code is None, "the tunnel closed"
        finally:
            ws.abort()
    assert hashlib.sha256(got).digest() == hashlib.sha256(expected).digest()
    await canary.check()


async def test_ping_flood_is_answered(hostile_tls: ServerProcess, canary: Canary) -> None:
    async with dst_server(echo) as dst:
        hostile_tls.add("/pings", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/pings", tls=True)
        try:
            payloads = [i.to_bytes(4, "big") + b"p" * 121 for i in range(10_000)]
            pongs: list[bytes] = []
            closed_with: int | None = None

            async def read_pongs() -> None:
                nonlocal closed_with
                while len(pongs) < len(payloads):
                    frame = await ws.read_frame(10)
                    if frame is None or frame[0] == OP_CLOSE:
                        closed_with = -1 if frame is None else struct.unpack("!H", frame[1][:2])[0]
                        return
                    if frame[0] == OP_PONG:
                        pongs.append(frame[1])

            started = time.monotonic()
            async with RssWatch(hostile_tls) as rss:
                ws.send(b"".join(ws_frame(OP_PING, p) for p in payloads))
                await asyncio.gather(ws.drain(), read_pongs())
            note(
                f"10,000 pings: {len(pongs)} pongs in {time.monotonic() - started:.2f} s, "
                f"close {closed_with}, RSS +{rss.growth / MiB:.1f} MiB"
            )
            assert rss.growth < 16 * MiB, rss.growth
            if closed_with is None:
                assert pongs == payloads, "pongs missing, reordered or altered"
                ws.send_binary(b"after the flood")
                assert await ws.read_data(15, 5) == b"after the flood"
        finally:
            ws.abort()
    await canary.check()


async def test_unread_pongs_do_not_pile_up_in_the_server() -> None:
    with running_server("-force-tls", "-n", SNI, "-workers", "1") as server:
        async with dst_server() as dst:
            server.add("/pings", dst.addr)
            ws = await RawWebSocket.open(server, "/pings", tls=True)
            burst = ws_frame(OP_PING, b"p" * 125) * 1000
            sent = 0
            try:
                async with RssWatch(server) as rss:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(8):
                            while sent < 300_000:
                                ws.send(burst)
                                await ws.writer.drain()
                                sent += 1000
                    await asyncio.sleep(0.5)
            finally:
                ws.abort()
        note(
            f"{sent} pings ({sent * 131 / MiB:.0f} MiB) never read: RSS +{rss.growth / MiB:.1f} MiB"
        )
        assert rss.growth < 16 * MiB, f"RSS grew {rss.growth / MiB:.1f} MiB for {sent} unread pongs"


# -- smux abuse ------------------------------------------------------------------------------


def syn(sid: int) -> bytes:
    return encode_frame(1, Cmd.SYN, sid)


def psh(sid: int, data: bytes) -> bytes:
    return encode_frame(1, Cmd.PSH, sid, data)


class SmuxPeer:
    """The server's smux frames as seen from a hand-driven client."""

    def __init__(self, ws: RawWebSocket) -> None:
        self.ws = ws
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.closed: int | None = None  # close code, -1 at EOF without one

    def fins(self) -> set[int]:
        return {f.stream_id for f in self.frames if f.cmd is Cmd.FIN}

    async def wait_for(self, predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed is not None:
                raise TimeoutError(f"smux peer: condition not met (closed={self.closed})")
            try:
                frame = await self.ws.read_frame(left)
            except TimeoutError:
                continue
            if frame is None:
                self.closed = -1
            elif frame[0] == OP_CLOSE:
                self.closed = struct.unpack("!H", frame[1][:2])[0] if len(frame[1]) >= 2 else 1005
            elif frame[0] == OP_BINARY:
                self.frames += self.decoder.feed(frame[1])


@contextlib.asynccontextmanager
async def smux_tunnel(server: ServerProcess, path: str) -> AsyncIterator[SmuxPeer]:
    ws = await RawWebSocket.open(server, path, tls=True, subprotocol="smux_on")
    assert ws.subprotocol == "smux_on"
    try:
        yield SmuxPeer(ws)
    finally:
        ws.abort()


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(syn(3) + _SMUX_HEADER.pack(7, 0, 0, 5), id="version-7"),
        pytest.param(syn(3) + encode_frame(2, Cmd.PSH, 3, b"v2"), id="version-switch-1-to-2"),
        pytest.param(syn(3) + _SMUX_HEADER.pack(1, 9, 0, 3), id="unknown-cmd-9"),
        pytest.param(syn(3) + _SMUX_HEADER.pack(1, 4, 8, 3) + bytes(8), id="upd-in-v1-session"),
    ],
)
async def test_smux_protocol_errors_end_the_session_with_1002(
    hostile_tls: ServerProcess, canary: Canary, wire: bytes
) -> None:
    mark = len(hostile_tls.lines)
    async with dst_server() as dst:
        hostile_tls.add("/smux-bad", dst.addr)
        async with smux_tunnel(hostile_tls, "/smux-bad") as peer:
            ws = peer.ws
            ws.send_binary(wire)
            closing = await ws.wait_closed(QUICK + 2)
        await dst.wait_for(lambda: dst.open == 0, 3)
    note(f"{closing.describe()}; dst connections opened {dst.total}")
    assert closing.code == 1002 and closing.eof and closing.elapsed < QUICK, closing.describe()
    await canary.check()
    lines = await new_log(hostile_tls, mark)
    assert_log_discipline(lines, [ws.port])
    mine = lines_for_port(lines, ws.port)
    assert len(mine) == 1 and "smux" in mine[0], mine


async def test_smux_duplicate_syn_keeps_one_stream(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    async with dst_server() as dst:
        hostile_tls.add("/smux-dup", dst.addr)
        async with smux_tunnel(hostile_tls, "/smux-dup") as peer:
            peer.ws.send_binary(syn(3) + psh(3, b"first;"))
            await dst.wait_for(lambda: dst.total == 1 and bytes(dst.conns[0].received) == b"first;")
            peer.ws.send_binary(syn(3) + psh(3, b"second"))
            await dst.wait_for(lambda: bytes(dst.conns[0].received) == b"first;second")
            await asyncio.sleep(0.3)
            assert dst.total == 1 and dst.open == 1
            assert 3 not in peer.fins()
    await canary.check()


async def test_smux_syn_flood_never_dials_more_than_16(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    mark = len(hostile_tls.lines)
    sids = [3 + 2 * i for i in range(10_000)]
    async with dst_server() as dst:
        hostile_tls.add("/smux-flood", dst.addr)
        async with RssWatch(hostile_tls) as rss, smux_tunnel(hostile_tls, "/smux-flood") as peer:
            started = time.monotonic()
            peer.ws.send_binary(b"".join(syn(s) for s in sids))
            await peer.wait_for(lambda: len(peer.fins()) >= len(sids) - 16, 15)
            refused_in = time.monotonic() - started
            await dst.wait_for(lambda: dst.total >= 16, 5)
            await asyncio.sleep(0.5)
            assert peer.fins() == set(sids[16:]), "the streams refused are not those past the 16th"
            peer.ws.send_binary(psh(3, b"still alive"))
            await dst.wait_for(lambda: any(bytes(c.received) == b"still alive" for c in dst.conns))
        note(
            f"10,000 SYNs: {len(peer.fins())} refused with FIN in {refused_in:.2f} s; dst saw "
            f"{dst.total} connections, at most {dst.max_open} at once; RSS +{rss.growth / MiB:.1f} MiB"
        )
        assert dst.max_open <= 16 and dst.total == 16
        assert rss.growth < 16 * MiB
    await canary.check()
    assert "Traceback" not in "".join(await new_log(hostile_tls, mark))


async def test_smux_syn_flood_does_not_flood_the_log(hostile_tls: ServerProcess) -> None:
    mark = len(hostile_tls.lines)
    sids = [3 + 2 * i for i in range(1000)]
    async with dst_server() as dst:
        hostile_tls.add("/smux-flood-log", dst.addr)
        async with smux_tunnel(hostile_tls, "/smux-flood-log") as peer:
            peer.ws.send_binary(b"".join(syn(s) for s in sids))
            await peer.wait_for(lambda: len(peer.fins()) >= len(sids) - 16, 10)
            await dst.wait_for(lambda: dst.total >= 16)  # no dial left in flight at teardown
    lines = [
        line
        for line in await new_log(hostile_tls, mark)
        if "/smux-flood-log" in line and "mtt.controller" not in line
    ]
    note(f"1000 SYNs in one session: {len(lines)} log lines")
    assert len(lines) <= 3, f"{len(lines)} log lines for one session:\n{''.join(lines[:5])}"


async def test_smux_frame_split_into_one_byte_messages(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    payload = pattern(8, 3000)
    wire = syn(3) + psh(3, payload)
    async with dst_server() as dst:
        hostile_tls.add("/smux-bytes", dst.addr)
        async with smux_tunnel(hostile_tls, "/smux-bytes") as peer:
            started = time.monotonic()
            peer.ws.send(b"".join(ws_frame(OP_BINARY, wire[i : i + 1]) for i in range(len(wire))))
            await peer.ws.drain()
            await dst.wait_for(
                lambda: dst.total == 1 and dst.conns[0].received_total >= len(payload)
            )
            note(f"{len(wire)} one-byte messages delivered in {time.monotonic() - started:.2f} s")
            assert bytes(dst.conns[0].received) == payload
    await canary.check()


async def test_smux_thousands_of_frames_in_one_message(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    chunks = [b"%09d;" % i for i in range(5000)]
    async with dst_server() as dst:
        hostile_tls.add("/smux-many", dst.addr)
        async with smux_tunnel(hostile_tls, "/smux-many") as peer:
            peer.ws.send_binary(syn(3) + b"".join(psh(3, c) for c in chunks))
            expected = b"".join(chunks)
            await dst.wait_for(
                lambda: dst.total == 1 and dst.conns[0].received_total >= len(expected)
            )
            assert bytes(dst.conns[0].received) == expected
    await canary.check()


async def test_smux_truncated_psh_keeps_the_session_bounded(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    """A PSH that announces 65535 bytes and stops: nothing is allocated up front,
    nothing half-made reaches dst, the session waits; the rest completes it."""
    payload = pattern(9, 65535)
    async with dst_server() as dst:
        hostile_tls.add("/smux-trunc", dst.addr)
        async with RssWatch(hostile_tls) as rss, smux_tunnel(hostile_tls, "/smux-trunc") as peer:
            peer.ws.send_binary(syn(3) + _SMUX_HEADER.pack(1, 2, 65535, 3) + payload[:100])
            await dst.wait_for(lambda: dst.total == 1)
            closing = await peer.ws.wait_closed(1.0)
            assert closing.code is None and not closing.eof, closing.describe()
            assert dst.conns[0].received_total == 0
            peer.ws.send_binary(payload[100:])
            await dst.wait_for(lambda: dst.conns[0].received_total >= len(payload))
            assert bytes(dst.conns[0].received) == payload
        assert rss.growth < 4 * MiB, rss.growth
    await canary.check()


# -- the controller ---------------------------------------------------------------------------


def http_post(body: bytes, *, headers: str = "", method: str = "POST") -> bytes:
    length = "" if "Transfer-Encoding" in headers else f"Content-Length: {len(body)}\r\n"
    return (
        f"{method} / HTTP/1.1\r\nHost: controller\r\nContent-Type: application/json\r\n"
        f"{length}{headers}Connection: close\r\n\r\n"
    ).encode() + body


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n" % len(body[i : i + size]) + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


def first_json(reply: HttpReply) -> dict[str, object]:
    """The JSON body of the first response in `reply`."""
    content_type = reply.header("Content-Type") or ""
    assert content_type.startswith("application/json"), f"not a JSON reply: {reply.raw[:300]!r}"
    length = reply.header("Content-Length")
    body = reply.body[: int(length)] if length is not None else reply.body
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    return doc


def user_count(server: ServerProcess) -> int:
    status, reply = server.control({"opt": 9})
    assert status == 200, reply
    return int(reply["current_users"])


_GOOD = '{"path":"/ctl-new","dst":"127.0.0.1:9"}'


@pytest.mark.parametrize(
    ("body", "status", "hint"),
    [
        pytest.param(
            b'{"opt":9,"pad":"' + b"a" * (2 * MiB) + b'"}', 413, "2097152", id="just-over-2MiB"
        ),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, 400, "json", id="100k-nested-arrays"),
        pytest.param(
            b'{"opt":1,"args_bunch":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001,
            400,
            "json",
            id="100k-nested-objects",
        ),
        pytest.param(b'{"opt":"9"}', 400, "opt", id="opt-string"),
        pytest.param(b'{"opt":true}', 400, "opt", id="opt-boolean"),
        pytest.param(b'{"opt":null}', 400, "opt", id="opt-null"),
        pytest.param(b'{"opt":[1]}', 400, "opt", id="opt-array"),
        pytest.param(b'{"args_bunch":[]}', 400, "opt", id="opt-missing"),
        pytest.param(
            b'{"opt":1,"args_bunch":{"path":"/x","dst":"127.0.0.1:9"}}',
            400,
            "args_bunch",
            id="args-bunch-object",
        ),
        pytest.param(b'{"opt":1,"args_bunch":"/x"}', 400, "args_bunch", id="args-bunch-string"),
        pytest.param(b'{"opt":1,"args_bunch":null}', 400, "args_bunch", id="args-bunch-null"),
        pytest.param(b'{"opt":1,"args_bunch":["/x"]}', 400, "args_bunch[0]", id="entry-string"),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":7,"dst":"127.0.0.1:9"}]}',
            400,
            "path",
            id="path-number",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/x","dst":9}]}', 400, "dst", id="dst-number"
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/x","dst":null}]}', 400, "dst", id="dst-null"
        ),
        pytest.param(b'{"opt":1,"args_bunch":[{"path":"/x","dst":NaN}]}', 400, "dst", id="dst-NaN"),
        pytest.param(
            ('{"opt":1,"args_bunch":[' + _GOOD + ',{"path":"/bad","dst":"nowhere"}]}').encode(),
            400,
            "args_bunch[1]",
            id="good-entry-then-bad-one",
        ),
        pytest.param(
            (b'{"opt":2,"args_bunch":[{"path":"/ctl-keep"},{"path":3}]}'),
            400,
            "args_bunch[1]",
            id="delete-then-bad-entry",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/\xff\xfe","dst":"127.0.0.1:9"}]}',
            400,
            "utf-8",
            id="invalid-utf8",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/\\ud800","dst":"127.0.0.1:9"}]}',
            400,
            "path",
            id="lone-surrogate-in-path",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/x","dst":"127.0.0.1:1e100"}]}',
            400,
            "port",
            id="port-1e100",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/x","dst":"127.0.0.1:1180591620717411303424"}]}',
            400,
            "port",
            id="port-2^70",
        ),
        pytest.param(
            b'{"opt":1,"args_bunch":[{"path":"/x","dst":"127.0.0.1:0"}]}', 400, "port", id="port-0"
        ),
        pytest.param(b'{"opt":1180591620717411303424}', 400, "opt", id="opt-2^70"),
        pytest.param(b'{"opt":1e100}', 400, "opt", id="opt-1e100"),
        pytest.param(b'{"opt":NaN}', 400, "opt", id="opt-NaN"),
        pytest.param(b'{"opt":Infinity}', 400, "opt", id="opt-Infinity"),
        pytest.param(b'{"opt":-Infinity}', 400, "opt", id="opt-minus-Infinity"),
        pytest.param(b'{"opt":' + b"9" * 5000 + b"}", 400, "json", id="opt-of-5000-digits"),
        pytest.param(b'{"opt":9,"opt":3}', 400, "duplicate", id="duplicate-opt"),
        pytest.param(
            b'{"opt":2,"args_bunch":[{"path":"/nobody","path":"/ctl-keep"}]}',
            400,
            "duplicate",
            id="duplicate-path",
        ),
        pytest.param(b'[{"opt":9}]', 400, "object", id="top-level-array"),
        pytest.param(b'"opt"', 400, "object", id="top-level-string"),
        pytest.param(b"", 400, "json", id="empty-body"),
        pytest.param(b'{"opt":9} {"opt":3}', 400, "json", id="two-documents"),
    ],
)
async def test_controller_rejects_bad_bodies(
    hostile_tls: ServerProcess, body: bytes, status: int, hint: str
) -> None:
    server = hostile_tls
    server.add("/ctl-keep", "127.0.0.1:9")
    mark = len(server.lines)
    before = user_count(server)
    reply = await raw_tcp_exchange(server.controller, http_post(body), limit_s=10)
    doc = first_json(reply)
    note(f"{len(body)}-byte body: {reply.status} {doc}")
    assert reply.status == status, reply.raw[:300]
    assert set(doc) == {"res", "err_string", "current_users", "revision"}, doc
    assert doc["res"] == 2
    assert isinstance(doc["err_string"], str) and hint in doc["err_string"].lower(), doc
    assert user_count(server) == before, "a rejected request changed the users"
    lines = await new_log(server, mark)
    assert "Traceback" not in "".join(lines), "".join(lines)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_controller_wrong_method_is_405(hostile_tls: ServerProcess, method: str) -> None:
    before = user_count(hostile_tls)
    reply = await raw_tcp_exchange(
        hostile_tls.controller, http_post(b'{"opt":3}', method=method), limit_s=5
    )
    doc = first_json(reply)
    assert reply.status == 405 and reply.header("Allow") == "POST", reply.raw[:300]
    assert doc["res"] == 2 and method in str(doc["err_string"])
    assert user_count(hostile_tls) == before


async def test_controller_chunked_bodies(hostile_tls: ServerProcess) -> None:
    server = hostile_tls
    server.add("/ctl-keep", "127.0.0.1:9")
    before = user_count(server)
    revision = server.control({"opt": 9})[1]["revision"]
    reply = await raw_tcp_exchange(
        server.controller,
        http_post(chunked(b'{"opt":9}', 3), headers="Transfer-Encoding: chunked\r\n"),
    )
    assert reply.status == 200 and first_json(reply) == {
        "res": 1,
        "err_string": "",
        "current_users": before,
        "revision": revision,
    }
    huge = b'{"opt":3,"pad":"' + b"a" * (2 * MiB) + b'"}'
    reply = await raw_tcp_exchange(
        server.controller,
        http_post(chunked(huge, 64 * KiB), headers="Transfer-Encoding: chunked\r\n"),
        limit_s=10,
    )
    doc = first_json(reply)
    assert reply.status == 413 and doc["res"] == 2, reply.raw[:300]
    assert user_count(server) == before


@pytest.mark.parametrize(
    ("raw", "shut_after"),
    [
        pytest.param(
            b'POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\n\r\n{"opt":3}',
            None,
            id="content-length-shorter",
        ),
        pytest.param(
            b'POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 100\r\n\r\n{"opt":3}',
            1.0,
            id="content-length-longer-then-eof",
        ),
        pytest.param(
            b'POST / HTTP/1.1\r\nHost: c\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"opt":3}\r\n0\r\n\r\n',
            None,
            id="content-length-and-chunked",
        ),
        pytest.param(
            b'POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{"opt":3}\r\n0\r\n\r\n',
            None,
            id="bad-chunk-size",
        ),
        pytest.param(
            b'POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{"opt":3}\r\n',
            1.0,
            id="chunked-cut-short-then-eof",
        ),
    ],
)
async def test_controller_lying_framing(raw: bytes, shut_after: float | None) -> None:
    """Content-Length that lies, or chunking that is broken: a JSON 400 (or, once
    the body was cut short by EOF, a close), nothing applied, no traceback."""
    with running_server("-workers", "1") as server:
        server.add("/ctl-keep", "127.0.0.1:9")
        before = user_count(server)
        reply = await raw_tcp_exchange(
            server.controller, raw, limit_s=5, shut_write_after=shut_after
        )
        note(f"{reply.describe()}: {reply.raw[:300]!r}")
        if reply.status is None:
            assert shut_after is not None and reply.closed, reply.describe()
        else:
            assert reply.status == 400, reply.raw[:300]
            doc = first_json(reply)
            assert doc["res"] == 2 and doc["err_string"], doc
        assert user_count(server) == before
        lines = await new_log(server, 0)
        assert "Traceback" not in "".join(lines), "".join(lines)


# -- faults on the far side -----------------------------------------------------------------


async def test_refusing_dst_closes_only_that_tunnel(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    mark = len(hostile_tls.lines)
    with refusing_address() as addr:
        hostile_tls.add("/refused", addr)
        ws = await RawWebSocket.open(hostile_tls, "/refused", tls=True)
        try:
            closing = await ws.wait_closed(QUICK + 2)
        finally:
            ws.abort()
        async with smux_tunnel(hostile_tls, "/refused") as peer:
            started = time.monotonic()
            peer.ws.send_binary(syn(3))
            await peer.wait_for(lambda: 3 in peer.fins(), QUICK)
            fin_after = time.monotonic() - started
            peer.ws.send_binary(syn(5))
            await peer.wait_for(lambda: 5 in peer.fins(), QUICK)
            assert peer.closed is None, "the session died with its stream"
    note(f"plain tunnel: {closing.describe()}; smux stream FIN after {fin_after:.2f} s")
    assert closing.code is not None and closing.eof and closing.elapsed < QUICK, closing.describe()
    await canary.check()
    lines = await new_log(hostile_tls, mark)
    assert_log_discipline(lines, [ws.port])
    mine = lines_for_port(lines, ws.port)
    assert len(mine) == 1 and "refused" in mine[0].lower(), mine
    per_stream = lines_for_port(lines, peer.ws.port)
    assert len(per_stream) == 2 and all("refused" in line.lower() for line in per_stream), (
        per_stream
    )


@pytest.mark.slow
async def test_blackholed_dst_is_given_up_after_the_connect_timeout(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    mark = len(hostile_tls.lines)
    with blackhole_address() as addr:
        hostile_tls.add("/blackhole", addr)

        async def plain() -> tuple[float, int | None, int]:
            ws = await RawWebSocket.open(hostile_tls, "/blackhole", tls=True)
            try:
                ws.send_binary(b"into the void")
                closing = await ws.wait_closed(DIAL_TIMEOUT + 3 * SLACK)
            finally:
                ws.abort()
            return closing.elapsed, closing.code, ws.port

        async def muxed() -> tuple[float, int | None, int]:
            async with smux_tunnel(hostile_tls, "/blackhole") as peer:
                started = time.monotonic()
                peer.ws.send_binary(syn(3) + psh(3, b"into the void"))
                await peer.wait_for(lambda: 3 in peer.fins(), DIAL_TIMEOUT + 3 * SLACK)
                return time.monotonic() - started, peer.closed, peer.ws.port

        (plain_t, plain_code, plain_port), (mux_t, mux_closed, mux_port) = await asyncio.gather(
            plain(), muxed()
        )
    note(
        f"plain tunnel closed ({plain_code}) after {plain_t:.1f} s; smux stream FIN after {mux_t:.1f} s"
    )
    assert plain_code is not None
    assert DIAL_TIMEOUT - 1 <= plain_t <= DIAL_TIMEOUT + SLACK
    assert DIAL_TIMEOUT - 1 <= mux_t <= DIAL_TIMEOUT + SLACK
    assert mux_closed is None, "the session died with its stream"
    await canary.check()
    lines = await new_log(hostile_tls, mark)
    assert_log_discipline(lines, [plain_port])
    for port in (plain_port, mux_port):
        mine = lines_for_port(lines, port)
        assert len(mine) == 1 and "timed out" in mine[0], mine


async def test_dst_reset_mid_transfer(hostile_tls: ServerProcess, canary: Canary) -> None:
    mark = len(hostile_tls.lines)
    chunk = ws_frame(OP_BINARY, os.urandom(64 * KiB))
    async with dst_server(resetter(256 * KiB)) as dst:
        hostile_tls.add("/reset", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/reset", tls=True)

        async def upload() -> None:
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                for _ in range(160):  # at most 10 MiB
                    if ws.writer.is_closing():
                        return
                    ws.send(chunk)
                    await ws.drain(5)

        uploader = asyncio.ensure_future(upload())
        try:
            closing = await ws.wait_closed(10)
        finally:
            uploader.cancel()
            ws.abort()
        async with smux_tunnel(hostile_tls, "/reset") as peer:
            peer.ws.send_binary(syn(3))
            for i in range(20):  # 320 KiB: dst resets after 256 KiB
                peer.ws.send_binary(psh(3, bytes([i]) * 16 * KiB))
            await peer.wait_for(lambda: 3 in peer.fins(), 10)
            peer.ws.send_binary(syn(5) + psh(5, b"after the reset"))
            await dst.wait_for(
                lambda: any(bytes(c.received) == b"after the reset" for c in dst.conns)
            )
            assert peer.closed is None, "the session died with its stream"
    note(f"plain tunnel after dst reset: {closing.describe()}")
    assert closing.code is not None and closing.eof and closing.elapsed < 6, closing.describe()
    await canary.check()
    assert_log_discipline(await new_log(hostile_tls, mark), [ws.port])


@pytest.mark.slow
async def test_vanished_clients_are_cleaned_up_by_the_idle_timeout() -> None:
    """Clients that reset mid-upload, or go silent mid-download (no FIN, no RST):
    with -timeout 2s, every dst connection they held is closed within ~2 s."""
    idle = 2.0
    with running_server("-force-tls", "-n", SNI, "-workers", "1", "-timeout", "2s") as server:
        async with (
            dst_server() as sink,
            dst_server(pusher(256 * MiB, 30)) as source,
            dst_server() as mux_sink,
        ):
            server.add("/up", sink.addr)
            server.add("/down", source.addr)
            server.add("/mux", mux_sink.addr)

            async def reset_mid_upload() -> float:
                ws = await RawWebSocket.open(server, "/up", tls=True)
                frame = ws_frame(OP_BINARY, os.urandom(64 * KiB))
                try:
                    for _ in range(8):
                        ws.send(frame)
                    await ws.drain()
                    await sink.wait_for(
                        lambda: sink.total == 1 and sink.conns[0].received_total >= 256 * KiB
                    )
                    ws.send(frame)  # unsent bytes in flight, then the socket just goes
                finally:
                    rst_close(ws.writer)
                gone = time.monotonic()
                await sink.wait_for(lambda: sink.conns[0].closed_at is not None, 5 * idle)
                closed_at = sink.conns[0].closed_at
                assert closed_at is not None
                return closed_at - gone

            async def silent_mid_download() -> tuple[float, float]:
                ws = await RawWebSocket.open(server, "/down", tls=True)
                try:
                    assert len(await ws.read_data(256 * KiB)) >= 256 * KiB
                    gone = time.monotonic()  # from now on: not a byte read or written
                    await source.wait_for(lambda: source.conns[0].closed_at is not None, 5 * idle)
                    closed_at = source.conns[0].closed_at
                    assert closed_at is not None
                    # The client socket must go too, once the server stops waiting on it.
                    _, eof = await read_until_eof(ws.reader, 10 * idle, cap=1 << 40)
                    assert eof, "the server kept the silent client's socket"
                    return closed_at - gone, time.monotonic() - gone
                finally:
                    ws.abort()

            async def silent_smux() -> float:
                async with smux_tunnel(server, "/mux") as peer:
                    peer.ws.send_binary(syn(3) + psh(3, b"one") + syn(5) + psh(5, b"two"))
                    await mux_sink.wait_for(lambda: mux_sink.total == 2 and mux_sink.open == 2)
                    gone = time.monotonic()
                    await mux_sink.wait_for(lambda: mux_sink.open == 0, 5 * idle)
                    return time.monotonic() - gone

            upload_t, (download_t, socket_t), mux_t = await asyncio.gather(
                reset_mid_upload(), silent_mid_download(), silent_smux()
            )
        note(
            f"dst closed after: reset mid-upload {upload_t:.2f} s, silent mid-download "
            f"{download_t:.2f} s (client socket dropped after {socket_t:.2f} s), "
            f"silent smux session {mux_t:.2f} s"
        )
        assert upload_t <= idle + SLACK
        assert download_t <= idle + SLACK
        assert mux_t <= idle + SLACK
        await asyncio.sleep(0.3)
        assert "Traceback" not in server.log_text()


# -- slow readers -------------------------------------------------------------------------------


@pytest.mark.slow
async def test_client_that_stops_reading_does_not_grow_the_server(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    """dst tries to push 1 GiB for 10 s; the client reads nothing."""
    async with dst_server(pusher(GiB, 10)) as dst:
        hostile_tls.add("/push", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/push", tls=True)
        try:
            async with RssWatch(hostile_tls) as rss:
                await dst.wait_for(lambda: dst.total == 1)
                await dst.wait_for(lambda: dst.conns[0].closed_at is not None, 15)
        finally:
            ws.abort()
        pushed = dst.conns[0].sent
    note(
        f"dst got {pushed / MiB:.0f} MiB of 1 GiB into the server; RSS +{rss.growth / MiB:.1f} MiB"
    )
    assert rss.growth < 32 * MiB, rss.growth
    assert pushed < 128 * MiB, "no back-pressure reached dst"
    await canary.check()


@pytest.mark.slow
async def test_slow_dst_does_not_grow_the_server(
    hostile_tls: ServerProcess, canary: Canary
) -> None:
    """The client tries to push 1 GiB for 10 s at a dst reading 1 MiB/s."""
    frame = ws_frame(OP_BINARY, os.urandom(64 * KiB))
    async with dst_server(slow_reader(MiB), keep=0) as dst:
        hostile_tls.add("/slow-dst", dst.addr)
        ws = await RawWebSocket.open(hostile_tls, "/slow-dst", tls=True)
        offered = 0
        try:
            async with RssWatch(hostile_tls) as rss:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        while offered < GiB:
                            ws.send(frame)
                            await ws.writer.drain()
                            offered += 64 * KiB
        finally:
            ws.abort()
        got = dst.conns[0].received_total if dst.conns else 0
    note(
        f"client got {offered / MiB:.0f} MiB of 1 GiB into the server, dst read "
        f"{got / MiB:.1f} MiB; RSS +{rss.growth / MiB:.1f} MiB"
    )
    assert rss.growth < 32 * MiB, rss.growth
    assert offered < 128 * MiB, "no back-pressure reached the client"
    assert got >= 5 * MiB, "dst starved"
    await canary.check()
