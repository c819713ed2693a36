"""What every tunnel does with WebSocket frames before relaying them.

picows parses frames but leaves some of RFC 6455 to its user: reserved bits
set without a negotiated extension (§5.2), a continuation frame outside a
fragmented message or a new message inside one (§5.4). Those end the
connection with 1002, as gorilla/websocket does. Pings are answered here
rather than by picows, so that a client that never reads its pongs cannot
make them pile up: while the client is not reading, pongs are skipped, which
§5.5.3 allows ("MAY elect to send a Pong frame for only the most recently
processed Ping frame").

A frame over max_frame_size gets 1009, but picows goes on parsing until it
disconnects 10 ms later, and hands over the rest of that frame, and any after
it, if they arrive in time: once a close frame has gone out, nothing but the
client's close is acted on.
"""

from __future__ import annotations

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

_DATA = (WSMsgType.BINARY, WSMsgType.TEXT)


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
