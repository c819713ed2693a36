"""mtt-client: local TCP connections tunnelled as WebSockets over TLS.

    local app --TCP--> DstConnection --> PlainClientTunnel --> one WebSocket (smux_off)
                                    \\-> MuxLocalStream --> MuxPool --> ClientSession
                                                           (one smux stream in a pooled
                                                            WebSocket, smux_on)

``dialer`` opens the WebSockets (TLS, Host/SNI, resumption, handshake timeout),
``plain`` and ``mux`` relay bytes with back-pressure both ways, ``main`` reads
flags and the SIP003 environment. Every limit lives in ClientLimits below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mtt.address import Destination
from mtt.smux.session import SmuxConfig

KiB = 1024


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Sizes and waits of the client; the defaults follow the Go mtt-client."""

    # TCP connect + TLS + HTTP upgrade, all together (gorilla's HandshakeTimeout).
    handshake_timeout: float = 10.0
    # Largest WebSocket message we send: the Go client's 16 KiB copy buffer (plain),
    # one 16 KiB smux frame plus its 8-byte header (mux).
    max_message: int = 16 * KiB
    # Write-buffer high-water mark of every transport; past it the other side stops reading.
    write_high_water: int = 256 * KiB
    # Local bytes held while the WebSocket is being dialed; reading stops beyond it.
    dial_buffer: int = 256 * KiB
    # Largest WebSocket frame accepted from the server.
    max_ws_frame: int = 1024 * KiB
    # picows' first read buffer of a WebSocket, grown when a frame needs more: a client holds
    # few WebSockets, so it starts larger than the server's.
    ws_read_buffer: int = 64 * KiB
    # How long a closed tunnel may wait for a slow peer to take its last bytes.
    close_linger: float = 5.0
    # At shutdown, how long the close frames and FINs get to reach the sockets; then the rest
    # is dropped.
    shutdown_linger: float = 1.0
    # smux as mos-tls-tunnel configures it (docs/protocol.md §5), client side.
    smux: SmuxConfig = field(default_factory=lambda: SmuxConfig(is_client=True, version=1))


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What mtt-client was asked to do, after flags and SIP003 are resolved."""

    bind: str
    server: Destination
    server_name: str
    path: str = "/"
    mux: bool = False
    mux_max_stream: int = 4
    insecure: bool = False
    idle_timeout: float = 300.0
    fast_open: bool = False
    verbose: bool = False
    limits: ClientLimits = field(default_factory=ClientLimits)
