"""`-fallback URL`: every request that is not a tunnel is relayed, as raw
bytes both ways, to a decoy web site, so the box serves a real site.

After the first request head the connection is a plain byte pipe to the
decoy (like nginx's stream proxy): methods, headers, bodies, keep-alive and
even protocol upgrades pass untouched. Back-pressure runs both ways through
the transports' write-buffer limits; an idle pipe is closed.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from dataclasses import dataclass
from typing import cast

from mtt.address import Destination
from mtt.errors import ConfigError
from mtt.transport.dst import DstConnection, dial
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.server")


@dataclass(frozen=True, slots=True)
class Fallback:
    """Where non-tunnel requests go."""

    dst: Destination
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Fallback:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"bad -fallback {url!r}: use http://host[:port] or https://host[:port]"
            )
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ConfigError(f"bad -fallback {url!r}: bad port") from None
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(f"bad -fallback {url!r}: requests keep their own paths; give no path")
        return cls(Destination(parts.hostname, port), parts.scheme == "https")


class FallbackRelay(asyncio.Protocol):
    """Takes over a client connection and pipes it to the decoy."""

    def __init__(
        self,
        transport: asyncio.Transport,
        first_bytes: bytes,
        fallback: Fallback,
        *,
        peer: str,
        connect_timeout: float,
        idle_timeout: float,
        high_water: int,
    ) -> None:
        self._client = transport
        self._first = first_bytes
        self._fallback = fallback
        self._peer = peer
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._high_water = high_water
        self._upstream: DstConnection | None = None
        self._pending: list[bytes] = [first_bytes]
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        self._client.set_protocol(self)
        self._client.set_write_buffer_limits(high=self._high_water)
        self._client.pause_reading()  # until the decoy answers the connect
        self._timer = self._loop.call_later(self._idle_timeout, self._check_idle)
        spawn(self._connect(), name=f"fallback for {self._peer}")

    async def _connect(self) -> None:
        fb = self._fallback
        try:
            if fb.tls:
                await self._dial_tls()
            else:
                await dial(self, fb.dst, self._connect_timeout, self._high_water)
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or repr(exc))
            log.warning("%s: fallback %s unreachable: %s", self._peer, fb.dst, reason)
            self._close()

    async def _dial_tls(self) -> None:
        fb = self._fallback
        async with asyncio.timeout(self._connect_timeout):
            await self._loop.create_connection(
                lambda: DstConnection(self, self._high_water),
                fb.dst.host,
                fb.dst.port,
                ssl=ssl.create_default_context(),
                server_hostname=fb.dst.host,
            )

    # -- client side (asyncio.Protocol) ---------------------------------------

    def data_received(self, data: bytes) -> None:
        self._last = self._loop.time()
        if self._upstream is None:
            self._pending.append(data)
        else:
            self._upstream.write(data)

    def eof_received(self) -> bool:
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    # -- decoy side (DstOwner) --------------------------------------------------

    def dst_connected(self, conn: DstConnection) -> None:
        if self._closed:
            conn.close()
            return
        self._upstream = conn
        for chunk in self._pending:
            conn.write(chunk)
        self._pending = []
        if not self._client.is_closing():
            self._client.resume_reading()

    def dst_data(self, data: bytes) -> None:
        self._last = self._loop.time()
        if not self._client.is_closing():
            self._client.write(data)

    def dst_eof(self) -> None:
        self._close()

    def dst_lost(self, exc: Exception | None) -> None:
        self._close()

    def dst_pause_writing(self) -> None:
        if not self._client.is_closing():
            self._client.pause_reading()

    def dst_resume_writing(self) -> None:
        if not self._client.is_closing():
            self._client.resume_reading()

    # -- ending -----------------------------------------------------------------

    def _check_idle(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._idle_timeout:
            self._close()
        else:
            self._timer = self._loop.call_later(self._idle_timeout - idle, self._check_idle)

    def _close(self) -> None:
        """Close both sides after flushing what each has buffered."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._upstream is not None:
            self._upstream.close()
        cast(asyncio.BaseTransport, self._client).close()
