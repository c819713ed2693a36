"""Requests and notifications both ways over one supervisor-worker channel.

A message with "id" is a request and gets a reply carrying "re" = that id; a
message without either is a notification. The worker asks the supervisor
(admission, rate tokens) as much as the supervisor asks the worker (changes,
counters), so neither side is only a client. Each side serves the message
types of mtt.workers.messages through one table of handlers.

A malformed frame (bad JSON, an unknown or ill-formed message, a message this
side does not serve) is the peer's protocol error and ends the channel. A
handler that raises is a bug in that handler, not in the channel: it is logged
with its traceback, the caller gets a Failed reply (RemoteError), and the
channel carries on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from mtt.errors import ProtocolError, RemoteError
from mtt.service.gc_pause import PAUSE
from mtt.transport.tasks import spawn
from mtt.workers import channel
from mtt.workers.messages import (
    Failed,
    Message,
    Notification,
    Reply,
    Request,
    Wire,
    checked,
    decode,
)

log = logging.getLogger("mtt.rpc")

R = TypeVar("R", bound=Reply)
# A request's handler returns its reply (or an awaitable of it); a notification's, None.
HandlerResult = Reply | Awaitable[Reply] | None
Handlers = Mapping[type[Message], Callable[[Any], HandlerResult]]


def encode_request(request: Request[Any]) -> bytes:
    """A request body encoded once, for sending to many workers."""
    return channel.encode_json(request.to_wire())


class RpcChannel:
    """Requests, replies and notifications over one ControlConnection, served
    as they arrive: each message is handled inside the read that completed it."""

    def __init__(
        self,
        connection: channel.ControlConnection,
        handlers: Handlers,
        name: str,
    ) -> None:
        self._connection = connection
        self._handlers = handlers
        self._name = name
        self._next_id = 0
        self._waiting: dict[int, tuple[Request[Any], asyncio.Future[Any]]] = {}
        self.open = True
        connection.closed.add_done_callback(self._closed)
        connection.attach(self._received)

    async def call(self, request: Request[R]) -> R:
        return await self.call_encoded(request, encode_request(request))

    async def call_encoded(self, request: Request[R], body: bytes) -> R:
        """Send request, already encoded as body, and wait for its reply."""
        if not self.open:
            raise ConnectionError(f"{self._name}: channel closed")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (request, future)
        self._connection.send(channel.encode_body(b'{"id":%d,' % request_id + body[1:]))
        try:
            await self._connection.drain()
            return await future
        finally:
            self._waiting.pop(request_id, None)

    def notify(self, message: Notification) -> None:
        if self.open:
            self._connection.send(channel.encode(message.to_wire()))

    async def drain(self) -> None:
        """Wait until what was sent has left for the kernel's buffer."""
        await self._connection.drain()

    async def run(self) -> None:
        """Wait until the channel ends (messages are served as they arrive)."""
        await asyncio.shield(self._connection.closed)

    def _closed(self, _: asyncio.Future[None]) -> None:
        self.open = False
        error = self._connection.error
        if error is not None:
            log.error("%s: control channel: %s", self._name, error)
        for _request, future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError(f"{self._name}: channel closed"))

    def _received(self, data: Wire) -> None:
        if "re" in data:
            self._answered(data)
        else:
            self._dispatch(data)

    def _answered(self, data: Wire) -> None:
        request_id = data["re"]
        if not isinstance(request_id, int):
            raise ProtocolError(f"reply to request {request_id!r}")
        waiting = self._waiting.get(request_id)
        if waiting is None:
            return  # its caller gave up (timed out)
        request, future = waiting
        if future.done():
            return
        if "error" in data:
            future.set_exception(RemoteError(f"{self._name}: {request.OP}: {data['error']}"))
        else:
            future.set_result(checked(request.reply_from_wire, data, f"{request.OP} reply"))

    def _dispatch(self, data: Wire) -> None:
        with PAUSE.paused():  # a change's 40,000 entries are no cyclic garbage
            self._dispatch_paused(data)

    def _dispatch_paused(self, data: Wire) -> None:
        request_id = data.get("id")
        if request_id is not None and not isinstance(request_id, int):
            raise ProtocolError(f"request id {request_id!r}")
        message = decode(data)
        handler = self._handlers.get(type(message))
        if handler is None:
            raise ProtocolError(f"{message.OP!r} is not served here")
        if (request_id is None) != isinstance(message, Notification):
            raise ProtocolError(f"{message.OP!r} {'without' if request_id is None else 'with'} id")
        try:
            result = handler(message)
        except Exception as exc:
            self._handler_failed(message, exc, request_id)
            return
        if request_id is None:
            return
        if inspect.isawaitable(result):
            spawn(self._reply_later(message, request_id, result), name=f"{self._name} request")
        else:
            self._reply(message, request_id, result)

    async def _reply_later(
        self, message: Message, request_id: int, result: Awaitable[Reply | None]
    ) -> None:
        try:
            reply = await result
        except Exception as exc:
            self._handler_failed(message, exc, request_id)
            return
        self._reply(message, request_id, reply)

    def _reply(self, message: Message, request_id: int, reply: Reply | None) -> None:
        if not isinstance(reply, Reply):
            error = TypeError(f"handler returned {reply!r}, not a reply")
            self._handler_failed(message, error, request_id)
            return
        self._send_reply(request_id, reply)

    def _handler_failed(self, message: Message, exc: Exception, request_id: int | None) -> None:
        log.error("%s: bug in the handler for %r: %r", self._name, message.OP, exc, exc_info=exc)
        if request_id is not None:
            self._send_reply(request_id, Failed(f"{type(exc).__name__}: {exc}"))

    def _send_reply(self, request_id: int, reply: Reply) -> None:
        if self.open:
            self._connection.send(channel.encode({**reply.to_wire(), "re": request_id}))

    def close(self) -> None:
        """Send what is queued, then end the channel."""
        self.open = False
        self._connection.close()
