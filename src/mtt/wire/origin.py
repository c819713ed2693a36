"""Which browser origins may open a tunnel (-allow-origin), sans-I/O.

Browsers send Origin on every WebSocket upgrade, serialized as
`scheme://host[:port]` (RFC 6454 §6.1): scheme and host in lower case, the
port only when it is not the scheme's default, or `null` for an opaque
origin. Non-browser clients mostly send none, or whatever their library
makes up. So the policy (docs/security.md, "Origin"): with no list every
request passes; with a list, a request that names an Origin must name one
in it, and a request without one passes (it is not a browser's).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Sequence

from mtt.errors import ConfigError

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
NULL = "null"  # an opaque origin (a sandboxed frame, a file:// page)


def normalize_origin(text: str) -> str | None:
    """An origin as a browser serializes it, or None if text is not one."""
    text = text.strip()
    if text.lower() == NULL:
        return NULL
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if not scheme or not host or parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        return None
    if ":" in host:  # urlsplit drops the brackets of an IPv6 literal
        host = f"[{host}]"
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


class OriginPolicy:
    """The -allow-origin list; empty allows any Origin."""

    def __init__(self, origins: Iterable[str] = ()) -> None:
        allowed: set[str] = set()
        for origin in origins:
            normal = normalize_origin(origin)
            if normal is None:
                raise ConfigError(
                    f"-allow-origin {origin!r} is not an origin"
                    " (scheme://host[:port], e.g. https://panel.example.com, or null)"
                )
            allowed.add(normal)
        self.allowed = frozenset(allowed)

    def __bool__(self) -> bool:
        return bool(self.allowed)

    def refused(self, values: Sequence[bytes]) -> str | None:
        """The Origin a request may not come from (its Origin header lines), or
        None when it may: no list, no Origin, or every Origin in the list."""
        if not self.allowed:
            return None
        for value in values:
            text = value.decode("latin-1")
            if normalize_origin(text) not in self.allowed:
                return text
        return None
