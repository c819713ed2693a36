"""smux (xtaci/smux v1 and v2) as a sans-I/O protocol: no sockets, no clock.

``frames`` is the 8-byte header codec; ``session`` the stream state machine
with receive budget, v2 windows and keepalive driven by a caller's ``now``.
"""

from mtt.smux.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    UPD_SIZE,
    Cmd,
    Frame,
    FrameDecoder,
    decode_upd,
    encode_frame,
    encode_upd,
)
from mtt.smux.session import (
    INITIAL_PEER_WINDOW,
    V1_SEND_WINDOW,
    Event,
    SessionEnded,
    SmuxConfig,
    SmuxSession,
    StreamData,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamWritable,
)

__all__ = [
    "HEADER_SIZE",
    "INITIAL_PEER_WINDOW",
    "MAX_PAYLOAD",
    "UPD_SIZE",
    "V1_SEND_WINDOW",
    "Cmd",
    "Event",
    "Frame",
    "FrameDecoder",
    "SessionEnded",
    "SmuxConfig",
    "SmuxSession",
    "StreamData",
    "StreamEnded",
    "StreamOpened",
    "StreamRefused",
    "StreamWritable",
    "decode_upd",
    "encode_frame",
    "encode_upd",
]
