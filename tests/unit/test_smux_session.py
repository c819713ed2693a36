"""SmuxSession: two endpoints talking in memory, plus byte-level scripts.

The fake I/O layer here does what the asyncio driver must do: move
data_to_send() to the peer's receive_data(), stop reading while the receiver's
reading_paused(), and call consumed() once the app has the bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest

from mtt.errors import SmuxProtocolError
from mtt.smux import (
    INITIAL_PEER_WINDOW,
    V1_SEND_WINDOW,
    Cmd,
    Event,
    Frame,
    FrameDecoder,
    SessionEnded,
    SmuxConfig,
    SmuxSession,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamWritable,
    encode_frame,
    encode_upd,
)

MiB = 1024 * 1024


def frames_of(data: bytes) -> list[Frame]:
    return FrameDecoder().feed(data)


def server(version: int = 1, **kw: object) -> SmuxSession:
    return SmuxSession(SmuxConfig(version=version, **kw), 0.0)  # type: ignore[arg-type]


def client(version: int = 1, **kw: object) -> SmuxSession:
    return SmuxSession(SmuxConfig(is_client=True, version=version, **kw), 0.0)  # type: ignore[arg-type]


@dataclass
class Side:
    """One endpoint plus the app above it: hashes what it reads."""

    session: SmuxSession
    events: list[Event] = field(default_factory=list)
    hashes: dict[int, Any] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    auto_consume: bool = True
    max_buffered: int = 0

    def handle(self, events: list[Event]) -> None:
        self.events += events
        for event in events:
            if isinstance(event, StreamData):
                sid = event.stream_id
                self.hashes.setdefault(sid, hashlib.sha256()).update(event.data)
                self.received[sid] = self.received.get(sid, 0) + len(event.data)
        self.max_buffered = max(self.max_buffered, self.session.buffered)
        if self.auto_consume:
            for event in events:
                if isinstance(event, StreamData):
                    self.session.consumed(event.stream_id, len(event.data))


class Link:
    """Client and server joined by two in-memory wires read in chunks."""

    def __init__(self, c: SmuxSession, s: SmuxSession, chunk: int = 65536) -> None:
        self.client = Side(c)
        self.server = Side(s)
        self.chunk = chunk
        self.wires = {id(self.client): bytearray(), id(self.server): bytearray()}
        self.now = 0.0

    def step(self) -> bool:
        progress = False
        for src, dst in ((self.client, self.server), (self.server, self.client)):
            wire = self.wires[id(dst)]
            wire += src.session.data_to_send()
            if wire and not dst.session.reading_paused():
                piece = bytes(wire[: self.chunk])
                del wire[: self.chunk]
                dst.handle(dst.session.receive_data(piece, self.now))
                progress = True
        return progress

    def run(self) -> None:
        while self.step():
            pass


def test_open_stream_ids_like_go() -> None:
    c = client()
    assert [c.open_stream() for _ in range(3)] == [3, 5, 7]
    assert frames_of(c.data_to_send()) == [Frame(1, Cmd.SYN, sid, b"") for sid in (3, 5, 7)]
    s = server()
    assert [s.open_stream(), s.open_stream()] == [2, 4]


def test_open_and_data_both_ways_with_checksums() -> None:
    link = Link(client(), server())
    c, s = link.client.session, link.server.session
    sids = [c.open_stream() for _ in range(3)]
    link.run()
    assert link.server.events == [StreamOpened(sid) for sid in sids]
    up = {sid: bytes([sid]) * (MiB + sid * 1000) for sid in sids}
    down = {sid: hashlib.sha256(up[sid]).digest() * (40000 + sid) for sid in sids}
    for sid in sids:
        assert c.send_data(sid, up[sid]) == len(up[sid])
        assert s.send_data(sid, down[sid]) == len(down[sid])
    link.run()
    for sid in sids:
        assert link.server.hashes[sid].digest() == hashlib.sha256(up[sid]).digest()
        assert link.client.hashes[sid].digest() == hashlib.sha256(down[sid]).digest()
    assert c.buffered == s.buffered == 0
    assert c.stream_count == s.stream_count == 3


def test_psh_is_split_at_max_frame_size() -> None:
    c = client(max_frame_size=16384)
    sid = c.open_stream()
    c.data_to_send()
    assert c.send_data(sid, memoryview(b"z" * 40000)) == 40000
    frames = frames_of(c.data_to_send())
    assert [len(f.payload) for f in frames] == [16384, 16384, 7232]
    assert all(f.cmd == Cmd.PSH and f.stream_id == sid for f in frames)
    assert c.send_data(sid, b"") == 0
    assert c.pending_output == 0


def test_fin_from_client_then_server() -> None:
    link = Link(client(), server())
    c, s = link.client.session, link.server.session
    sid = c.open_stream()
    link.run()
    s.close_stream(sid)
    link.run()
    assert link.client.events == [StreamEnded(sid)]
    assert not s.is_open(sid)
    # The peer's FIN ends its direction only: we keep sending until close_stream.
    assert c.is_open(sid)
    assert c.send_data(sid, b"late") == 4
    c.close_stream(sid)
    c.close_stream(sid)  # idempotent
    link.run()
    assert link.server.events == [StreamOpened(sid)]  # PSH and FIN for a closed id: ignored
    assert c.stream_count == s.stream_count == 0


def test_stream_stays_writable_after_peer_fin() -> None:
    s = server()
    s.receive_data(encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.FIN, 3), 0.0)
    assert s.is_open(3)
    assert s.send_data(3, b"reply") == 5
    assert frames_of(s.data_to_send()) == [Frame(1, Cmd.PSH, 3, b"reply")]


def test_second_fin_and_psh_after_fin_are_dropped() -> None:
    s = server()
    wire = encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.FIN, 3)
    wire += encode_frame(1, Cmd.PSH, 3, b"after") + encode_frame(1, Cmd.FIN, 3)
    assert s.receive_data(wire, 0.0) == [StreamOpened(3), StreamEnded(3)]
    assert s.buffered == 0


def test_unknown_ids_are_ignored_and_payload_skipped() -> None:
    s = server(version=2)
    wire = encode_frame(2, Cmd.PSH, 99, b"x" * 1000) + encode_frame(2, Cmd.FIN, 99)
    wire += encode_upd(2, 99, 5, 5) + encode_frame(2, Cmd.SYN, 3)
    wire += encode_frame(2, Cmd.PSH, 3, b"ok")
    assert s.receive_data(wire, 0.0) == [StreamOpened(3), StreamData(3, b"ok")]
    assert s.data_to_send() == b""


def test_duplicate_syn_is_ignored() -> None:
    s = server()
    syn = encode_frame(1, Cmd.SYN, 3)
    assert s.receive_data(syn, 0.0) == [StreamOpened(3)]
    assert s.receive_data(syn, 0.0) == []
    assert s.stream_count == 1
    assert s.data_to_send() == b""


def test_id_can_be_reused_after_close_stream() -> None:
    s = server()
    syn = encode_frame(1, Cmd.SYN, 3)
    s.receive_data(syn, 0.0)
    s.close_stream(3)
    assert frames_of(s.data_to_send()) == [Frame(1, Cmd.FIN, 3, b"")]
    assert s.receive_data(syn, 0.0) == [StreamOpened(3)]


def test_max_streams_refusal_session_survives() -> None:
    link = Link(client(), server(max_streams=16))
    c, s = link.client.session, link.server.session
    sids = [c.open_stream() for _ in range(17)]
    link.run()
    assert link.server.events == [StreamOpened(sid) for sid in sids[:16]] + [
        StreamRefused(sids[16])
    ]
    assert link.client.events == [StreamEnded(sids[16])]
    assert s.stream_count == 16
    for sid in sids:
        c.send_data(sid, f"to {sid}".encode())
    for sid in sids[:16]:
        s.send_data(sid, f"from {sid}".encode())
    link.run()
    assert set(link.server.received) == set(sids[:16])
    assert set(link.client.received) == set(sids[:16])
    assert not s.closed
    # A closed slot can be taken by a new stream.
    c.close_stream(sids[0])
    c.close_stream(sids[16])
    new = c.open_stream()
    link.run()
    assert link.server.events[-2:] == [StreamEnded(sids[0]), StreamRefused(new)]
    s.close_stream(sids[0])
    newer = c.open_stream()
    link.run()
    assert link.server.events[-1] == StreamOpened(newer)


def test_client_refuses_every_syn() -> None:
    c = client()
    assert c.receive_data(encode_frame(1, Cmd.SYN, 2), 0.0) == [StreamRefused(2)]
    assert frames_of(c.data_to_send()) == [Frame(1, Cmd.FIN, 2, b"")]
    assert c.stream_count == 0


def test_zero_length_psh_gives_no_event() -> None:
    s = server()
    wire = encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.PSH, 3)
    assert s.receive_data(wire, 0.0) == [StreamOpened(3)]


# -- receive budget ------------------------------------------------------------


def test_budget_pauses_and_resumes() -> None:
    budget = 256 * 1024
    link = Link(client(), server(receive_budget=budget), chunk=16 * 1024 + 8)
    link.server.auto_consume = False
    c, s = link.client.session, link.server.session
    sid = c.open_stream()
    c.send_data(sid, b"a" * (300 * 1024))
    link.run()
    assert s.reading_paused()
    assert s.buffered == budget  # 16 full frames read, then reading stopped
    assert link.wires[id(link.server)]  # the rest waits in the "socket"
    s.consumed(sid, 1)
    assert not s.reading_paused()
    assert s.buffered == budget - 1
    s.consumed(sid, 10**9)  # more than delivered: clamped
    assert s.buffered == 0
    link.run()
    assert s.buffered == 300 * 1024 - budget
    assert link.server.received[sid] == 300 * 1024


def test_consumed_after_close_stream_still_frees_budget() -> None:
    s = server()
    s.receive_data(encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.PSH, 3, b"x" * 100), 0.0)
    s.close_stream(3)
    assert s.buffered == 100
    s.consumed(3, 60)
    assert s.buffered == 40
    s.consumed(3, 60)
    assert s.buffered == 0
    s.consumed(3, 60)
    s.consumed(77, 5)
    s.consumed(3, -5)
    assert s.buffered == 0


def test_consumed_after_reuse_counts_old_bytes_first() -> None:
    s = server(version=2)
    s.receive_data(encode_frame(2, Cmd.SYN, 3) + encode_frame(2, Cmd.PSH, 3, b"x" * 100), 0.0)
    s.close_stream(3)
    s.receive_data(encode_frame(2, Cmd.SYN, 3) + encode_frame(2, Cmd.PSH, 3, b"y" * 10), 0.0)
    s.data_to_send()
    s.consumed(3, 104)
    assert s.buffered == 6
    # The new stream read 4 bytes: its first UPD says 4, not 104.
    assert s.data_to_send() == encode_upd(2, 3, 4, 64 * 1024)


def test_consumed_after_session_close() -> None:
    s = server()
    s.receive_data(encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.PSH, 3, b"x" * 10), 0.0)
    s.close()
    s.consumed(3, 10)
    assert s.buffered == 0


# -- keepalive -----------------------------------------------------------------


def test_nop_every_interval_regardless_of_traffic() -> None:
    c = client(keepalive_interval=30.0, keepalive_timeout=70.0)
    assert c.get_timer() == 30.0
    assert c.handle_timer(29.9) == []
    assert c.data_to_send() == b""
    c.receive_data(encode_frame(1, Cmd.NOP, 0), 25.0)  # traffic does not delay NOPs
    assert c.handle_timer(30.0) == []
    assert c.data_to_send() == encode_frame(1, Cmd.NOP, 0)
    assert c.get_timer() == 60.0
    # A late wake-up sends one NOP and keeps the grid (Go's ticker drops ticks).
    c.receive_data(encode_frame(1, Cmd.NOP, 0), 80.0)
    c.handle_timer(95.0)
    assert c.data_to_send() == encode_frame(1, Cmd.NOP, 0)
    assert c.get_timer() == 120.0


def test_keepalive_timeout_and_refresh_by_any_frame() -> None:
    s = server()
    s.receive_data(encode_frame(1, Cmd.SYN, 3), 10.0)
    s.receive_data(encode_frame(1, Cmd.NOP, 0), 50.0)
    s.handle_timer(60.0)
    s.data_to_send()
    assert s.get_timer() == 90.0  # next NOP before the 120 s timeout
    assert s.handle_timer(119.9) == []
    assert not s.closed
    assert s.get_timer() == 120.0
    [ended] = s.handle_timer(120.0)
    assert isinstance(ended, SessionEnded)
    assert "keepalive" in ended.reason
    assert s.closed
    assert s.get_timer() is None
    assert s.handle_timer(200.0) == []
    with pytest.raises(SmuxProtocolError):
        s.receive_data(encode_frame(1, Cmd.NOP, 0), 121.0)


def test_partial_frame_refreshes_the_clock() -> None:
    s = server()
    s.receive_data(encode_frame(1, Cmd.SYN, 3), 0.0)
    s.receive_data(encode_frame(1, Cmd.PSH, 3, b"abc")[:5], 60.0)
    assert s.handle_timer(70.0) == []


def test_no_timeout_while_reading_is_paused() -> None:
    s = server(receive_budget=100)
    s.receive_data(encode_frame(1, Cmd.SYN, 3) + encode_frame(1, Cmd.PSH, 3, b"x" * 100), 0.0)
    assert s.reading_paused()
    assert s.handle_timer(70.0) == []
    assert not s.closed
    s.consumed(3, 100)
    assert s.handle_timer(139.0) == []
    assert s.handle_timer(140.0) != []
    assert s.closed


def test_server_nop_waits_for_the_peer_version() -> None:
    s = server(version=1)
    s.handle_timer(30.0)
    assert s.data_to_send() == b""  # a v1 NOP would kill a v2 Go peer
    s.receive_data(encode_frame(2, Cmd.SYN, 3), 31.0)
    assert frames_of(s.data_to_send()) == [Frame(2, Cmd.NOP, 0, b"")]


# -- versions ------------------------------------------------------------------


def test_server_adopts_first_frame_version_then_rejects_others() -> None:
    s = server(version=1)
    assert s.version == 1
    assert s.receive_data(encode_frame(2, Cmd.SYN, 3), 0.0) == [StreamOpened(3)]
    assert s.version == 2
    s.send_data(3, b"v2")
    s.close_stream(3)
    assert {f.version for f in frames_of(s.data_to_send())} == {2}
    with pytest.raises(SmuxProtocolError):
        s.receive_data(encode_frame(1, Cmd.NOP, 0), 0.0)
    assert s.closed
    with pytest.raises(SmuxProtocolError):
        s.receive_data(b"", 0.0)


def test_client_rejects_other_version() -> None:
    c = client(version=2)
    with pytest.raises(SmuxProtocolError):
        c.receive_data(encode_frame(1, Cmd.NOP, 0), 0.0)
    assert c.closed


def test_garbage_closes_the_session() -> None:
    s = server()
    with pytest.raises(SmuxProtocolError):
        s.receive_data(b"\x01\x09" + bytes(6), 0.0)
    assert s.closed
    assert s.get_timer() is None
    assert s.send_data(3, b"x") == 0
    with pytest.raises(SmuxProtocolError):
        s.open_stream()


def test_close_is_idempotent_and_keeps_output_drainable() -> None:
    c = client()
    sid = c.open_stream()
    c.close()
    c.close()
    assert c.closed
    assert c.stream_count == 0
    assert not c.is_open(sid)
    assert frames_of(c.data_to_send()) == [Frame(1, Cmd.SYN, sid, b"")]
    c.close_stream(sid)
    assert c.data_to_send() == b""


def test_config_is_checked() -> None:
    for bad in (
        {"version": 3},
        {"max_frame_size": 65536},
        {"max_frame_size": 0},
        {"keepalive_timeout": 10.0},
        {"stream_window": 0},
        {"receive_budget": 0},
    ):
        with pytest.raises(ValueError):
            SmuxConfig(**bad)


# -- version 2 flow control ----------------------------------------------------


def test_v1_has_no_window() -> None:
    c = client()
    sid = c.open_stream()
    assert c.send_window(sid) == V1_SEND_WINDOW
    assert c.send_data(sid, bytes(MiB)) == MiB
    assert c.send_window(999) == 0


def test_v2_sender_stops_at_window_and_resumes_on_upd() -> None:
    link = Link(client(version=2), server(version=2))
    link.server.auto_consume = False
    c, s = link.client.session, link.server.session
    sid = c.open_stream()
    assert c.send_window(sid) == INITIAL_PEER_WINDOW
    assert c.send_data(sid, bytes(MiB)) == INITIAL_PEER_WINDOW
    assert c.send_window(sid) == 0
    assert c.send_data(sid, b"more") == 0
    link.run()
    assert s.buffered == INITIAL_PEER_WINDOW
    # First read: Go acks at once, with the real window.
    s.consumed(sid, 1)
    assert s.data_to_send() == encode_upd(2, sid, 1, 64 * 1024)
    c.receive_data(encode_upd(2, sid, 1, 64 * 1024), 0.0)
    assert c.send_window(sid) == 0  # 262143 in flight > 65536
    # Less than half a window since the last UPD: no ack yet.
    s.consumed(sid, 32767)
    assert s.data_to_send() == b""
    s.consumed(sid, 1)
    upd = s.data_to_send()
    assert upd == encode_upd(2, sid, 32769, 64 * 1024)
    s.consumed(sid, INITIAL_PEER_WINDOW)
    upd = s.data_to_send()
    assert upd == encode_upd(2, sid, INITIAL_PEER_WINDOW, 64 * 1024)
    assert c.receive_data(upd, 0.0) == [StreamWritable(sid)]
    assert c.send_window(sid) == 64 * 1024
    assert c.send_data(sid, bytes(MiB)) == 64 * 1024


def test_v2_writable_only_after_window_was_exhausted() -> None:
    c = client(version=2)
    sid = c.open_stream()
    c.send_data(sid, bytes(1000))
    assert c.receive_data(encode_upd(2, sid, 1000, 65536), 0.0) == []
    assert c.send_window(sid) == 65536


def test_v2_peer_consuming_more_than_sent_blocks_the_stream() -> None:
    # Go's writeV2 returns ErrConsumed and sends nothing; the session lives on.
    c = client(version=2)
    sid = c.open_stream()
    c.send_data(sid, bytes(10))
    c.receive_data(encode_upd(2, sid, 11, 65536), 0.0)
    assert c.send_window(sid) == 0
    assert c.send_data(sid, b"x") == 0
    assert c.receive_data(encode_upd(2, sid, 10, 65536), 0.0) == [StreamWritable(sid)]
    assert not c.closed


def test_v2_upd_counters_wrap_like_uint32() -> None:
    c = client(version=2)
    sid = c.open_stream()
    c.receive_data(encode_upd(2, sid, 0, 2**32 - 1), 0.0)
    # int32(0xffffffff) = -1: Go sees no window at all.
    assert c.send_window(sid) == 0


def test_v2_many_mib_both_ways() -> None:
    link = Link(client(version=2), server(version=2))
    c, s = link.client.session, link.server.session
    sids = [c.open_stream() for _ in range(2)]
    link.run()
    total = 4 * MiB
    payload = {sid: bytes(range(256)) * (total // 256) for sid in sids}
    sent_up = dict.fromkeys(sids, 0)
    sent_down = dict.fromkeys(sids, 0)
    writable_events = 0
    while any(sent_up[sid] < total or sent_down[sid] < total for sid in sids):
        for sid in sids:
            sent_up[sid] += c.send_data(sid, memoryview(payload[sid])[sent_up[sid] :])
            sent_down[sid] += s.send_data(sid, memoryview(payload[sid])[sent_down[sid] :])
        assert link.step()
        writable_events = sum(isinstance(e, StreamWritable) for e in link.client.events)
    link.run()
    digest = hashlib.sha256(payload[sids[0]]).digest()
    for sid in sids:
        assert link.server.hashes[sid].digest() == digest
        assert link.client.hashes[sid].digest() == digest
    assert writable_events > 0
    # The window bounds memory: never more than the initial guess per stream.
    assert link.server.max_buffered <= INITIAL_PEER_WINDOW * len(sids)


def test_v2_lazy_consumer_bounds_the_sender() -> None:
    link = Link(client(version=2), server(version=2))
    link.server.auto_consume = False
    c, s = link.client.session, link.server.session
    sid = c.open_stream()
    sent = 0
    for _ in range(50):
        sent += c.send_data(sid, bytes(100_000))
        link.run()
        pending = s.buffered
        s.consumed(sid, pending // 2)
    # The consumer holds back data, so the in-flight window never grows past Go's bound.
    assert s.buffered <= INITIAL_PEER_WINDOW
    assert sent == link.server.received[sid]


def test_upd_frames_use_struct_layout() -> None:
    s = server(version=2)
    s.receive_data(encode_frame(2, Cmd.SYN, 3) + encode_frame(2, Cmd.PSH, 3, b"abc"), 0.0)
    s.consumed(3, 3)
    assert s.data_to_send() == struct.pack("<BBHIII", 2, 4, 8, 3, 3, 65536)


def test_v2_frames_queued_match_what_send_data_took() -> None:
    c = client(version=2, max_frame_size=16384)
    sid = c.open_stream()
    c.data_to_send()
    c.receive_data(encode_upd(2, sid, 0, 28036), 0.0)
    assert c.send_data(sid, bytes(100_000)) == 28036
    frames = frames_of(c.data_to_send())
    assert [len(f.payload) for f in frames] == [16384, 28036 - 16384]
