"""Our server-side frame headers parse as RFC 6455 frames in a reference parser."""

import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from mtt.transport.wsframe import binary_frame_header


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_header_round_trips(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    reader = StreamReader()
    reader.feed_data(binary_frame_header(size) + payload)
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame = done.value
    assert frame.opcode is Opcode.BINARY and frame.fin
    assert frame.data == payload
