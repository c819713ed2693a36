"""Requests and notifications both ways over one supervisor-worker channel.

A message with "id" is a request and gets a reply carrying "re" = that id; a
message without either is a notification. The worker asks the supervisor
(admission, rate tokens) as much as the supervisor asks the worker (changes,
counters), so neither side is only a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from mtt.errors import ProtocolError
from mtt.transport.tasks import spawn
from mtt.workers import channel

log = logging.getLogger("mtt.rpc")

Message = dict[str, Any]
Handler = Callable[[Message], Message | Awaitable[Message] | None]


def encode_request(message: Message) -> bytes:
    """A request body encoded once, for sending to many workers."""
    return json.dumps(message, separators=(",", ":")).encode()


class RpcChannel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: Handler,
        name: str,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._name = name
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Message]] = {}
        self.open = True

    async def call(self, message: Message) -> Message:
        return await self.call_encoded(encode_request(message))

    async def call_encoded(self, body: bytes) -> Message:
        """Send an encoded request object and wait for its reply."""
        if not self.open:
            raise ConnectionError(f"{self._name}: channel closed")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._writer.write(channel.encode_body(b'{"id":%d,' % request_id + body[1:]))
        try:
            await self._writer.drain()
            return await future
        finally:
            self._waiting.pop(request_id, None)

    def notify(self, message: Message) -> None:
        if self.open and not self._writer.is_closing():
            self._writer.write(channel.encode(message))

    async def run(self) -> None:
        """Dispatch incoming messages until the channel ends."""
        try:
            while (message := await channel.read_message(self._reader)) is not None:
                if "re" in message:
                    future = self._waiting.get(int(message["re"]))
                    if future is not None and not future.done():
                        future.set_result(message)
                    continue
                result = self._handler(message)
                request_id = message.get("id")
                if request_id is None:
                    continue
                if isinstance(result, dict) or result is None:
                    self._reply(request_id, result)
                else:
                    spawn(self._reply_later(request_id, result), name=f"{self._name} request")
        except (ProtocolError, ConnectionError, ValueError, KeyError) as exc:
            log.error("%s: control channel: %s", self._name, exc)
        finally:
            self.open = False
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"{self._name}: channel closed"))

    async def _reply_later(self, request_id: int, result: Awaitable[Message]) -> None:
        self._reply(request_id, await result)

    def _reply(self, request_id: int, result: Message | None) -> None:
        if self.open and not self._writer.is_closing():
            self._writer.write(channel.encode({**(result or {}), "re": request_id}))

    def close(self) -> None:
        self.open = False
        with contextlib.suppress(Exception):
            self._writer.close()
