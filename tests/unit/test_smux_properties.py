"""Property tests: splits never matter, garbage only ever raises SmuxProtocolError,
and a session never holds more than its peer sent."""

from __future__ import annotations

import itertools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtt.errors import SmuxProtocolError
from mtt.smux import (
    Cmd,
    Event,
    Frame,
    FrameDecoder,
    SmuxConfig,
    SmuxSession,
    StreamData,
    encode_frame,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BUDGET = 100_000
MAX_READ = 100_000

stream_ids = st.sampled_from([0, 1, 2, 3, 5, 7, 2**32 - 1])


@st.composite
def frame_lists(draw: st.DrawFn, version: int | None = None) -> list[Frame]:
    ver = draw(st.sampled_from([1, 2])) if version is None else version
    cmds = [Cmd.SYN, Cmd.FIN, Cmd.PSH, Cmd.NOP] + ([Cmd.UPD] if ver == 2 else [])
    frames = []
    for _ in range(draw(st.integers(0, 12))):
        cmd = draw(st.sampled_from(cmds))
        if cmd == Cmd.PSH:
            payload = draw(st.binary(max_size=300))
        elif cmd == Cmd.UPD:
            payload = struct.pack(
                "<II", draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
            )
        else:
            payload = b""
        frames.append(Frame(ver, cmd, draw(stream_ids), payload))
    return frames


def encode(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f.version, f.cmd, f.stream_id, f.payload) for f in frames)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@SETTINGS
@given(frame_lists(), st.lists(st.integers(0, 10_000), max_size=20))
def test_decoder_split_invariance(frames: list[Frame], cuts: list[int]) -> None:
    wire = encode(frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for piece in split(wire, cuts):
        got += decoder.feed(piece)
    assert got == frames
    assert decoder.pending == 0


def session_events(pieces: list[bytes], is_client: bool, version: int) -> tuple[list[Event], bytes]:
    config = SmuxConfig(is_client=is_client, version=version, max_streams=4)
    session = SmuxSession(config, 0.0)
    events: list[Event] = []
    for piece in pieces:
        new = session.receive_data(piece, 0.0)
        for event in new:
            if isinstance(event, StreamData) and len(event.data) % 2:
                session.consumed(event.stream_id, 1)
        events += new
    return events, session.data_to_send()


@SETTINGS
@given(frame_lists(), st.lists(st.integers(0, 10_000), max_size=20), st.booleans())
def test_session_split_invariance(frames: list[Frame], cuts: list[int], is_client: bool) -> None:
    # Valid input never raises, and how it is cut never changes what happens.
    version = frames[0].version if frames else 1
    wire = encode(frames)
    whole = session_events([wire], is_client, version)
    assert session_events(split(wire, cuts), is_client, version) == whole


@SETTINGS
@given(frame_lists(), st.booleans())
def test_one_frame_per_message_is_read_as_byte_by_byte(
    frames: list[Frame], is_client: bool
) -> None:
    # A message that is exactly one frame takes the decoder's short way; it must
    # give the same events, budget and output as the bytes fed one at a time.
    version = frames[0].version if frames else 1
    wire = encode(frames)
    per_frame = [encode([f]) for f in frames]
    one_by_one = [wire[i : i + 1] for i in range(len(wire))]
    assert session_events(per_frame, is_client, version) == session_events(
        one_by_one, is_client, version
    )


garbage = st.one_of(
    st.binary(max_size=200),
    # Mostly valid headers with odd fields, to get past the first check.
    st.lists(
        st.tuples(
            st.sampled_from([0, 1, 2, 3]),
            st.integers(0, 6),
            st.integers(0, 0xFFFF),
            stream_ids,
            st.binary(max_size=40),
        ),
        max_size=8,
    ).map(lambda hs: b"".join(struct.pack("<BBHI", *h[:4]) + h[4] for h in hs)),
)


@SETTINGS
@given(garbage, st.lists(st.integers(0, 500), max_size=5), st.booleans(), st.sampled_from([1, 2]))
def test_garbage_raises_only_protocol_errors(
    data: bytes, cuts: list[int], is_client: bool, version: int
) -> None:
    decoder = FrameDecoder()
    session = SmuxSession(SmuxConfig(is_client=is_client, version=version), 0.0)
    try:
        for piece in split(data, cuts):
            decoder.feed(piece)
    except SmuxProtocolError:
        pass
    try:
        for piece in split(data, cuts):
            for event in session.receive_data(piece, 1.0):
                if isinstance(event, StreamData):
                    session.consumed(event.stream_id, len(event.data))
                    session.send_data(event.stream_id, event.data)
    except SmuxProtocolError:
        assert session.closed
    assert session.buffered == 0
    session.handle_timer(1000.0)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.just(0)),
        st.tuples(st.just("send"), st.integers(0, 70_000)),
        st.tuples(st.just("consume"), st.integers(0, 70_000)),
        st.tuples(st.just("close"), st.integers(0, 3)),
        st.tuples(st.just("pump"), st.integers(1, MAX_READ)),
        st.tuples(st.just("server_close"), st.integers(0, 3)),
    ),
    max_size=40,
)


@SETTINGS
@given(ops, st.sampled_from([1, 2]))
def test_sessions_hold_no_more_than_was_sent(script: list[tuple[str, int]], version: int) -> None:
    client = SmuxSession(SmuxConfig(is_client=True, version=version), 0.0)
    server = SmuxSession(SmuxConfig(version=version, receive_budget=BUDGET), 0.0)
    sids: list[int] = []
    wire = bytearray()
    sent = delivered = consumed = 0
    unconsumed: dict[int, int] = {}
    for op, arg in script:
        if op == "open":
            sids.append(client.open_stream())
        elif op == "send" and sids:
            sent += client.send_data(sids[arg % len(sids)], bytes(arg))
        elif op == "close" and sids:
            client.close_stream(sids[arg % len(sids)])
        elif op == "server_close" and sids:
            server.close_stream(sids[arg % len(sids)])
        elif op == "consume" and unconsumed:
            sid = next(iter(unconsumed))
            take = min(arg, unconsumed[sid])
            server.consumed(sid, take)
            consumed += take
            unconsumed[sid] -= take
            if not unconsumed[sid]:
                del unconsumed[sid]
        elif op == "pump":
            wire += client.data_to_send()
            if not server.reading_paused():
                piece = bytes(wire[:arg])
                del wire[:arg]
                for event in server.receive_data(piece, 0.0):
                    if isinstance(event, StreamData):
                        assert server.is_open(event.stream_id)
                        delivered += len(event.data)
                        unconsumed[event.stream_id] = unconsumed.get(event.stream_id, 0) + len(
                            event.data
                        )
            client.receive_data(server.data_to_send(), 0.0)
        assert 0 <= server.buffered == delivered - consumed <= sent
        # One read can overshoot the budget by at most what that read carried.
        assert server.buffered < BUDGET + MAX_READ
        if version == 2 and sids:
            assert client.send_window(sids[-1]) >= 0
