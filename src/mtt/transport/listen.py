"""Listening sockets for the tunnel listener and the controller."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from mtt.address import parse_destination
from mtt.config import Limits
from mtt.errors import ConfigError

_LIMITS = Limits()


def split_host_port(address: str) -> tuple[str, int]:
    """Split a Go listen address (`host:port`, `:port`, `[v6]:port`); raise ConfigError."""
    try:
        dst = parse_destination(address, allow_empty_host=True)
    except ValueError as exc:
        raise ConfigError(f"bad listen address {address!r}: {exc}") from None
    return dst.host, dst.port


def tcp_listen_socket(
    address: str,
    *,
    fast_open: bool = False,
    backlog: int = _LIMITS.listen_backlog,
    reuse_port: bool = False,
    listen: bool = True,
) -> socket.socket:
    """A bound (by default listening) TCP socket; a ConfigError says why it could not be made.

    reuse_port lets several workers listen on the same port (SO_REUSEPORT).
    """
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve listen address {address!r}: {exc.strerror}") from None
    # "" listens on every address: prefer a dual-stack IPv6 socket, as Go does.
    infos.sort(key=lambda info: info[0] != socket.AF_INET6 if not host else 0)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and not host:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if fast_open and hasattr(socket, "TCP_FASTOPEN"):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, _LIMITS.fast_open_queue)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def unix_listen_socket(path: str, backlog: int = _LIMITS.listen_backlog) -> socket.socket:
    """A listening Unix socket at path; a stale socket file left by a crash is replaced."""
    if not path:
        raise ConfigError("-bind-unix needs a socket path in -b")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on unix socket {path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
