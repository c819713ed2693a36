"""mtt: a multi-user WebSocket-over-TLS tunnel server compatible with mos-tls-tunnel."""

__version__ = "0.1.0"
