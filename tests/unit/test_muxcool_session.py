"""MuxCoolSession, the server's side: client frames in, events and our frames out
(docs/protocol.md §11)."""

from __future__ import annotations

import pytest

from mtt.errors import MuxCoolProtocolError
from mtt.muxcool import (
    OPTION_DATA,
    OPTION_ERROR,
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
from mtt.smux import SessionEnded, StreamData, StreamEnded, StreamOpened, StreamRefused

LOCAL = Target(Network.TCP, 0, AddressType.IPV4, b"\x7f\0\0\1")
DNS = Target(Network.UDP, 53, AddressType.IPV4, b"\x08" * 4)


def new(sid: int, data: bytes | None = None, target: Target = LOCAL) -> bytes:
    option = OPTION_DATA if data is not None else 0
    return encode_frame(Frame(sid, Status.NEW, option, target, payload=data or b""))


def keep(sid: int, data: bytes) -> bytes:
    return encode_frame(Frame(sid, Status.KEEP, OPTION_DATA, payload=data))


def end(sid: int, data: bytes | None = None, error: bool = False) -> bytes:
    option = (OPTION_DATA if data is not None else 0) | (OPTION_ERROR if error else 0)
    return encode_frame(Frame(sid, Status.END, option, payload=data or b""))


def keepalive(data: bytes | None = None) -> bytes:
    option = OPTION_DATA if data is not None else 0
    return encode_frame(Frame(0, Status.KEEPALIVE, option, payload=data or b""))


def session(**kw: object) -> MuxCoolSession:
    return MuxCoolSession(MuxCoolConfig(**kw), 0.0)  # type: ignore[arg-type]


def sent(s: MuxCoolSession) -> list[Frame]:
    return FrameDecoder().feed(s.data_to_send())


def test_new_with_data_opens_and_delivers_keep_carries_end_ends() -> None:
    s = session()
    events = s.receive_data(new(1, b"GET /") + keep(1, b" HTTP/1.1") + end(1), 0.0)
    assert events == [
        StreamOpened(1),
        StreamData(1, b"GET /"),
        StreamData(1, b" HTTP/1.1"),
        StreamEnded(1),
    ]
    assert (s.stream_count, s.buffered) == (1, 14)
    assert sent(s) == []  # a server answers New with nothing but data


def test_new_without_data_then_data_in_keep() -> None:
    s = session()
    assert s.receive_data(new(7), 0.0) == [StreamOpened(7)]
    assert s.receive_data(keep(7, b"x"), 0.0) == [StreamData(7, b"x")]


def test_end_delivers_its_data_first_and_later_frames_are_dropped() -> None:
    s = session()
    s.receive_data(new(1), 0.0)
    assert s.receive_data(end(1, b"last"), 0.0) == [StreamData(1, b"last"), StreamEnded(1)]
    assert s.receive_data(keep(1, b"late") + end(1), 0.0) == []
    assert s.is_open(1)  # until the I/O layer closes it


def test_end_with_error_ends_as_well() -> None:
    s = session()
    s.receive_data(new(1), 0.0)
    assert s.receive_data(end(1, error=True), 0.0) == [StreamEnded(1)]


def test_frames_for_unknown_sub_connections_are_dropped_without_an_answer() -> None:
    s = session()
    assert s.receive_data(keep(9, b"data") + end(9) + end(9, b"x"), 0.0) == []
    assert (s.buffered, sent(s)) == (0, [])


def test_keepalive_and_its_data_are_ignored() -> None:
    s = session()
    assert s.receive_data(keepalive(b"padding") + keepalive(), 0.0) == []
    assert (s.buffered, sent(s)) == (0, [])


def test_udp_is_refused_with_end_and_option_error_and_its_data_dropped() -> None:
    s = session()
    global_id = bytes(range(8))
    xudp = encode_frame(Frame(3, Status.NEW, OPTION_DATA, DNS, extra=global_id, payload=b"q"))
    assert s.receive_data(xudp + keep(3, b"more"), 0.0) == [StreamRefused(3, "UDP")]
    assert sent(s) == [Frame(3, Status.END, OPTION_ERROR)]
    assert (s.stream_count, s.buffered) == (0, 0)


def test_new_beyond_max_streams_is_refused_the_rest_go_on() -> None:
    s = session(max_streams=2)
    events = s.receive_data(new(1) + new(2) + new(3, b"x") + keep(1, b"a"), 0.0)
    assert events == [
        StreamOpened(1),
        StreamOpened(2),
        StreamRefused(3, "2 open"),
        StreamData(1, b"a"),
    ]
    assert sent(s) == [Frame(3, Status.END, OPTION_ERROR)]
    s.close_stream(2)
    assert s.receive_data(new(4), 0.0) == [StreamOpened(4)]


def test_new_for_a_sub_connection_already_open_ends_the_session() -> None:
    s = session()
    s.receive_data(new(1), 0.0)
    with pytest.raises(MuxCoolProtocolError, match="New for sub-connection 1, open already"):
        s.receive_data(new(1), 0.0)
    assert s.closed


def test_a_closed_id_may_be_opened_again() -> None:
    s = session()
    s.receive_data(new(1), 0.0)
    s.close_stream(1)
    assert s.receive_data(new(1), 0.0) == [StreamOpened(1)]


def test_too_many_refusals_end_the_session() -> None:
    s = session(max_streams=0, max_refusals=3)
    assert len(s.receive_data(new(1) + new(2) + new(3), 0.0)) == 3
    with pytest.raises(MuxCoolProtocolError, match="more than 3 sub-connections refused"):
        s.receive_data(new(4), 0.0)


def test_bad_bytes_close_the_session_and_it_stays_closed() -> None:
    s = session()
    with pytest.raises(MuxCoolProtocolError):
        s.receive_data(b"\x00\x04\x00\x01\x07\x00", 0.0)
    assert s.closed and s.get_timer() is None
    with pytest.raises(MuxCoolProtocolError, match="closed"):
        s.receive_data(keepalive(), 0.0)


def test_send_data_is_cut_in_8_kib_keep_frames() -> None:
    s = session()
    s.receive_data(new(5), 0.0)
    data = bytes(range(256)) * 80  # 20480 bytes
    assert s.send_data(5, data) == len(data)
    frames = sent(s)
    assert [(f.session_id, f.status, f.option, len(f.payload)) for f in frames] == [
        (5, Status.KEEP, OPTION_DATA, 8192),
        (5, Status.KEEP, OPTION_DATA, 8192),
        (5, Status.KEEP, OPTION_DATA, 4096),
    ]
    assert b"".join(f.payload for f in frames) == data


def test_send_data_to_an_unknown_or_closed_sub_connection_takes_nothing() -> None:
    s = session()
    assert s.send_data(1, b"x") == 0
    s.receive_data(new(1), 0.0)
    s.close()
    assert s.send_data(1, b"x") == 0


def test_close_stream_sends_end_with_error_when_asked() -> None:
    s = session()
    s.receive_data(new(1) + new(2), 0.0)
    s.close_stream(1)
    s.close_stream(2, error=True)
    s.close_stream(2)  # once only
    assert sent(s) == [Frame(1, Status.END, 0), Frame(2, Status.END, OPTION_ERROR)]
    assert s.stream_count == 0


def test_the_session_budget_pauses_reading_until_consumed() -> None:
    s = session(receive_budget=10, stream_budget=100)
    s.receive_data(new(1, b"12345") + new(2, b"1234"), 0.0)
    assert not s.reading_paused()
    s.receive_data(keep(2, b"5"), 0.0)
    assert s.reading_paused()
    s.consumed(1, 1)
    assert not s.reading_paused() and s.buffered == 9


def test_one_sub_connection_over_its_budget_pauses_reading() -> None:
    """A dst that does not read stops the uploads of the whole session, as in v2ray."""
    s = session(receive_budget=1000, stream_budget=4)
    s.receive_data(new(1, b"abcd") + new(2, b"x"), 0.0)
    assert s.reading_paused()
    s.consumed(2, 1)
    assert s.reading_paused()
    s.consumed(1, 1)
    assert not s.reading_paused()


def test_consumed_never_frees_more_than_delivered() -> None:
    s = session()
    s.receive_data(new(1, b"abc"), 0.0)
    s.consumed(1, 100)
    s.consumed(9, 100)
    assert s.buffered == 0


def test_bytes_of_a_closed_sub_connection_count_until_consumed() -> None:
    s = session(receive_budget=4)
    s.receive_data(new(1, b"abcd"), 0.0)
    s.close_stream(1)
    assert s.reading_paused() and s.buffered == 4
    s.consumed(1, 4)
    assert not s.reading_paused() and s.buffered == 0


def test_close_keeps_its_counts_for_consumed() -> None:
    s = session()
    s.receive_data(new(1, b"abcd"), 0.0)
    s.close()
    assert s.buffered == 4
    s.consumed(1, 4)
    assert s.buffered == 0
    s.close_stream(1)
    assert sent(s) == []  # nothing is queued once closed


def test_a_session_without_sub_connections_ends_after_idle_timeout() -> None:
    s = session(idle_timeout=60.0)
    assert s.get_timer() == 60.0
    s.receive_data(keepalive(), 30.0)  # a KeepAlive keeps it
    assert s.handle_timer(60.0) == []
    assert s.get_timer() == 90.0
    assert s.handle_timer(90.0) == [
        SessionEnded("nothing received for 60s, no sub-connection open")
    ]
    assert s.closed and s.get_timer() is None and s.handle_timer(200.0) == []


def test_an_open_sub_connection_keeps_the_session() -> None:
    s = session(idle_timeout=60.0)
    s.receive_data(new(1), 0.0)
    assert s.handle_timer(60.0) == []
    assert s.get_timer() == 120.0
    s.close_stream(1)
    assert s.handle_timer(120.0) == [
        SessionEnded("nothing received for 120s, no sub-connection open")
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"max_metadata": 3},
        {"max_metadata": 513},
        {"max_payload": 0},
        {"write_chunk": 65536},
        {"receive_budget": 0},
        {"stream_budget": 0},
        {"max_streams": -1},
        {"max_refusals": -1},
        {"idle_timeout": 0},
    ],
)
def test_config_rejects_what_cannot_work(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MuxCoolConfig(**bad)  # type: ignore[arg-type]
