"""What every tunnel does with WebSocket frames before relaying them.

picows parses frames but leaves some of RFC 6455 to its user: reserved bits
set without a negotiated extension (§5.2), a continuation frame outside a
fragmented message or a new message inside one (§5.4). Those end the
connection with 1002, as gorilla/websocket does. Pings are answered here
rather than by picows, so that a client that never reads its pongs cannot
make them pile up: while the client is not reading, pongs are skipped, which
§5.5.3 allows ("MAY elect to send a Pong frame for only the most recently
processed Ping frame").

Two gaps picows leaves open are closed here too. A frame over max_frame_size
gets 1009, but picows goes on parsing until it disconnects 10 ms later and
hands over the rest of that frame, and any after it, if they arrive in time:
once a close frame has gone out, nothing but the client's close is acted on.
And picows lets through close codes a peer may not send (0, 1006, 1014, 5000
and up): those fail with 1002, as in gorilla/websocket, whose set of valid
codes (RFC 6455 §7.4 and two IANA added since) is used here.
"""

from __future__ import annotations

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

_DATA = (WSMsgType.BINARY, WSMsgType.TEXT)

# 1004-1006 and 1015 are reserved, 1014 is not one gorilla/websocket knows;
# 3000-4999 are for libraries and applications.
_VALID_RECEIVED_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1014)))


def invalid_close_code(frame: WSFrame) -> int | None:
    """The status code of a close frame when a peer may not send it (an empty
    close has none and is valid)."""
    payload = frame.get_payload_as_bytes()
    if len(payload) < 2:
        return None
    code = int.from_bytes(payload[:2], "big")
    if code in _VALID_RECEIVED_CLOSE_CODES or 3000 <= code <= 4999:
        return None
    return code


class CheckedListener(WSListener):
    """Screens frames; subclasses relay data and handle the close."""

    def __init__(self) -> None:
        super().__init__()
        self._in_message = False
        self.ws_writing_paused = False

    def screen(self, transport: WSTransport, frame: WSFrame) -> WSMsgType | None:
        """The frame's type when the tunnel must act on it (data, close), else None."""
        msg_type = frame.msg_type
        if transport.is_close_frame_sent:
            # Sent by picows (a frame too big, the rest of which it still parses) or
            # by the tunnel, which has closed dst: no data or ping is wanted now.
            return msg_type if msg_type is WSMsgType.CLOSE else None
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self.violation("reserved bits set without an extension")
            return None
        if msg_type is WSMsgType.CONTINUATION:
            if not self._in_message:
                self.violation("continuation frame outside a fragmented message")
                return None
            self._in_message = not frame.fin
            return msg_type
        if msg_type in _DATA:
            if self._in_message:
                self.violation("new message inside a fragmented one")
                return None
            self._in_message = not frame.fin
            return msg_type
        if msg_type is WSMsgType.PING:
            if not self.ws_writing_paused and not transport.underlying_transport.is_closing():
                transport.send_pong(frame.get_payload_as_bytes())
            return None
        if msg_type is WSMsgType.CLOSE:
            code = invalid_close_code(frame)
            if code is not None:
                self.violation(f"invalid close code {code}")
                return None
            return msg_type
        return None  # PONG

    def violation(self, reason: str) -> None:
        """The client broke RFC 6455: log one line and close with 1002."""
        raise NotImplementedError

    @staticmethod
    def picows_close_reason(transport: WSTransport) -> str | None:
        """Why picows itself closed the connection (bad frame, too big), if it did."""
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        if sent is None or sent.code in (WSCloseCode.OK, WSCloseCode.GOING_AWAY):
            return None
        return f"{sent.code.name.lower().replace('_', ' ')}: {sent.reason}"
