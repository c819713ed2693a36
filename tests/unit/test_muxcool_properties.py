"""Property tests of Mux.Cool: encode/decode round trip, splits never matter,
garbage only ever raises MuxCoolProtocolError, and a session's counts stay true."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtt.errors import MuxCoolProtocolError
from mtt.muxcool import (
    OPTION_DATA,
    AddressType,
    Frame,
    FrameDecoder,
    MuxCoolConfig,
    MuxCoolSession,
    Network,
    Status,
    Target,
    encode_frame,
)
from mtt.smux import StreamData

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ids = st.sampled_from([0, 1, 2, 3, 128, 0xFFFF])


@st.composite
def targets(draw: st.DrawFn) -> Target:
    kind = draw(st.sampled_from(list(AddressType)))
    if kind is AddressType.DOMAIN:
        address = draw(st.binary(max_size=255))
    else:
        address = draw(
            st.binary(min_size=4, max_size=4)
            if kind is AddressType.IPV4
            else st.binary(min_size=16, max_size=16)
        )
    return Target(draw(st.sampled_from(list(Network))), draw(st.integers(0, 0xFFFF)), kind, address)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    status = draw(st.sampled_from(list(Status)))
    target = draw(targets()) if status is Status.NEW else None
    option = draw(st.integers(0, 255))
    used = 4 + (
        0
        if target is None
        else 5 + len(target.address) + (target.address_type is AddressType.DOMAIN)
    )
    extra = draw(st.binary(max_size=min(16, 512 - used)))
    payload = draw(st.binary(max_size=300)) if option & OPTION_DATA else b""
    return Frame(draw(ids), status, option, target, extra, payload)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@SETTINGS
@given(st.lists(frames(), max_size=10), st.lists(st.integers(0, 10_000), max_size=20))
def test_round_trip_in_any_split(sent: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in sent)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for piece in split(wire, cuts):
        got += decoder.feed(piece)
    assert got == sent
    assert decoder.pending == 0
    assert [encode_frame(f) for f in got] == [encode_frame(f) for f in sent]


@SETTINGS
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_garbage_only_raises_protocol_errors(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder()
    try:
        for piece in split(data, cuts):
            decoder.feed(piece)
    except MuxCoolProtocolError:
        pass
    assert decoder.pending <= 2 + 512 + 2 + 0xFFFF


def _session_run(pieces: list[bytes], consume_every: int) -> MuxCoolSession:
    s = MuxCoolSession(MuxCoolConfig(max_streams=3, max_refusals=5, receive_budget=500), 0.0)
    held: dict[int, int] = {}
    delivered = consumed = 0
    try:
        for i, piece in enumerate(pieces):
            for event in s.receive_data(piece, float(i)):
                if isinstance(event, StreamData):
                    held[event.stream_id] = held.get(event.stream_id, 0) + len(event.data)
                    delivered += len(event.data)
            if consume_every and i % consume_every == 0:
                for sid, n in list(held.items()):
                    s.consumed(sid, n)
                    consumed += n
                    del held[sid]
            s.handle_timer(float(i))
            assert s.buffered == delivered - consumed
    except MuxCoolProtocolError:
        assert s.closed
    return s


@SETTINGS
@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=10), st.integers(0, 3))
def test_a_session_fed_garbage_raises_only_protocol_errors(
    data: bytes, cuts: list[int], consume_every: int
) -> None:
    _session_run(split(data, cuts), consume_every)


@SETTINGS
@given(
    st.lists(frames(), max_size=30),
    st.lists(st.integers(0, 10_000), max_size=20),
    st.integers(0, 3),
)
def test_a_session_fed_frames_counts_exactly(
    sent: list[Frame], cuts: list[int], consume_every: int
) -> None:
    wire = b"".join(encode_frame(f) for f in sent)
    s = _session_run(split(wire, cuts), consume_every)
    assert s.stream_count <= 3
    assert s.buffered >= 0
