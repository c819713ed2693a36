from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from mtt.transport.tls import self_signed_pem
from tests.support import ServerProcess, running_server


@pytest.fixture(scope="session")
def cert_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for tunnel.test, as an operator's cert/key files."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed_pem("tunnel.test")
    (tmp / "cert.pem").write_bytes(cert)
    (tmp / "key.pem").write_bytes(key)
    return tmp / "cert.pem", tmp / "key.pem"


@pytest.fixture
def client_tls(cert_files: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that verifies the test certificate, with SNI tunnel.test."""
    ctx = ssl.create_default_context(cafile=str(cert_files[0]))
    return ctx


@pytest.fixture
def tls_server(cert_files: tuple[Path, Path]) -> Iterator[ServerProcess]:
    with running_server(
        "-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-timeout", "1m"
    ) as s:
        yield s
