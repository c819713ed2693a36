from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from harness.gopeers import (
    Peer,
    go_binary,
    start_download_source,
    start_echo_server,
    start_peer,
    start_upload_sink,
    stop_peer,
    stop_server,
)

from mtt.transport.tls import self_signed_pem


@pytest.fixture(scope="session")
def go_bins() -> dict[str, Path]:
    """The Go peers, built once from Debian's packages; a missing Go fails here."""
    return {name: go_binary(name) for name in ("gorelay", "wsload", "mttclient")}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("interop-tls")
    cert, key = self_signed_pem("tunnel.test")
    (tmp / "cert.pem").write_bytes(cert)
    (tmp / "key.pem").write_bytes(key)
    return tmp / "cert.pem", tmp / "key.pem"


@pytest.fixture
def go_peer() -> Iterator[object]:
    """Start Go peers that are killed at teardown: go_peer([argv]) -> (proc, addr)."""
    started: list[Peer] = []

    def start(args: list[str]) -> tuple[Peer, str]:
        proc, addr = start_peer(args)
        started.append(proc)
        return proc, addr

    yield start
    for proc in started:
        stop_peer(proc)


@pytest.fixture
async def dsts() -> AsyncIterator[dict[str, int]]:
    """The three dst protocols wsload speaks: echo, upload (sha back), download."""
    servers = {
        "echo": await start_echo_server(),
        "upload": await start_upload_sink(),
        "download": await start_download_source(),
    }
    yield {name: port for name, (_, port) in servers.items()}
    for server, _ in servers.values():
        await stop_server(server)
