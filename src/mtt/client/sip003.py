"""SIP003: how a shadowsocks client starts a plugin (pure parsing, no I/O).

The plugin learns its addresses from the environment: it listens on
SS_LOCAL_HOST:SS_LOCAL_PORT and tunnels to SS_REMOTE_HOST:SS_REMOTE_PORT.
Options come in SS_PLUGIN_OPTIONS as `key=value` or bare `flag` items
separated by `;`, named like the command-line flags
(`wss;wss-path=/p1;mux;n=example.com`). A backslash escapes `;`, `=` and
itself (https://shadowsocks.org/doc/sip003.html).

The Go client enters plugin mode as soon as any of the five variables is
set, and then needs all four addresses; we do the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mtt.address import format_hostport
from mtt.errors import ConfigError

ADDRESS_VARS = ("SS_REMOTE_HOST", "SS_REMOTE_PORT", "SS_LOCAL_HOST", "SS_LOCAL_PORT")
OPTIONS_VAR = "SS_PLUGIN_OPTIONS"


@dataclass(frozen=True, slots=True)
class PluginEnv:
    """What a SIP003 host handed us."""

    local: str  # host:port to listen on (-b)
    remote: str  # host:port of the tunnel server (-s)
    options: tuple[tuple[str, str | None], ...]  # (key, value or None for a bare flag)


def join_host_port(host: str, port: str) -> str:
    """Go's net.JoinHostPort: an IPv6 host gets brackets (SIP003 passes the port as text)."""
    return format_hostport(host, port)


def split_options(text: str) -> list[tuple[str, str | None]]:
    """Parse SS_PLUGIN_OPTIONS into (key, value) items; value None for a bare flag.

    The value is everything after the first unescaped `=`; empty items are
    skipped. Raises ConfigError for an item without a key.
    """
    items: list[tuple[str, str | None]] = []
    key: list[str] = []
    value: list[str] | None = None
    escaped = False

    def end_item() -> None:
        name = "".join(key).strip()
        if not name and value is None:
            return  # empty item: `a;;b` or a trailing `;`
        if not name:
            raise ConfigError(f"SS_PLUGIN_OPTIONS: option without a name in {text!r}")
        items.append((name, None if value is None else "".join(value)))

    for char in text:
        target = key if value is None else value
        if escaped:
            target.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ";":
            end_item()
            key, value = [], None
        elif char == "=" and value is None:
            value = []
        else:
            target.append(char)
    if escaped:  # a trailing lone backslash stands for itself
        (key if value is None else value).append("\\")
    end_item()
    return items


def plugin_env(environ: Mapping[str, str]) -> PluginEnv | None:
    """The SIP003 settings in environ, None when not started as a plugin."""
    present = [name for name in (*ADDRESS_VARS, OPTIONS_VAR) if name in environ]
    if not present:
        return None
    missing = [name for name in ADDRESS_VARS if not environ.get(name)]
    if missing:
        raise ConfigError(f"incomplete SIP003 environment: {', '.join(missing)} not set")
    return PluginEnv(
        local=join_host_port(environ["SS_LOCAL_HOST"], environ["SS_LOCAL_PORT"]),
        remote=join_host_port(environ["SS_REMOTE_HOST"], environ["SS_REMOTE_PORT"]),
        options=tuple(split_options(environ.get(OPTIONS_VAR, ""))),
    )
