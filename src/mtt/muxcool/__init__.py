"""Mux.Cool (v2ray's multiplexer) as a sans-I/O protocol: no sockets, no clock.

``frames`` is the frame codec; ``session`` the server's sub-connection state
machine with receive budgets and the idle end driven by a caller's ``now``.
It reports in smux's events (mtt.smux), so one driver runs either.
"""

from mtt.muxcool.frames import (
    MAX_METADATA,
    MAX_PAYLOAD,
    OPTION_DATA,
    OPTION_ERROR,
    AddressType,
    Frame,
    FrameDecoder,
    Network,
    Status,
    Target,
    encode_data,
    encode_end,
    encode_frame,
)
from mtt.muxcool.session import MuxCoolConfig, MuxCoolSession

__all__ = [
    "MAX_METADATA",
    "MAX_PAYLOAD",
    "OPTION_DATA",
    "OPTION_ERROR",
    "AddressType",
    "Frame",
    "FrameDecoder",
    "MuxCoolConfig",
    "MuxCoolSession",
    "Network",
    "Status",
    "Target",
    "encode_data",
    "encode_end",
    "encode_frame",
]
