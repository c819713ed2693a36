"""GET /metrics: Prometheus text that prometheus_client's own parser reads,
with counts that match the traffic the test made."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import ServerProcess, echo_server, pattern, running_server


def scrape(server: ServerProcess, token: str = "") -> tuple[int, str, str]:
    host, port = server.controller.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_metrics_count_what_happened(
    workers: str, cert_files: tuple[Path, Path], client_tls: ssl.SSLContext
) -> None:
    args = ("-cert", str(cert_files[0]), "-key", str(cert_files[1]), "-workers", workers)
    with running_server(*args, "-metrics-per-user") as server:
        async with echo_server() as echo:
            server.add("/m1", echo.addr)
            payload = pattern(7, 300_001)
            for _ in range(3):
                async with opener(server, client_tls, "/m1") as ws:
                    assert await echo_roundtrip(ws, payload) == payload
            with pytest.raises(InvalidStatus):
                async with opener(server, client_tls, "/nobody"):
                    pass
            # A TLS handshake that fails: a handshake record of garbage.
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(b"\x16\x03\x01\x00\x05hello")
                raw.recv(100)
            # Plain HTTP to the TLS port: nginx's 400 for it, a bad request.
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                raw.recv(100)
            server.add("/dead", "127.0.0.1:9")  # nothing listens on the discard port
            async with opener(server, client_tls, "/dead") as ws:
                await ws.wait_closed()
            status, content_type, text = scrape(server)
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    got = samples(text)
    assert got[("mtt_users", ())] == 2
    assert got[("mtt_revision", ())] == 2
    assert got[("mtt_tunnels_opened_total", (("mode", "plain"),))] == 4
    assert got[("mtt_tunnels_active", (("mode", "plain"),))] == 0
    assert got[("mtt_bytes_total", (("direction", "up"),))] == 3 * len(payload)
    assert got[("mtt_bytes_total", (("direction", "down"),))] == 3 * len(payload)
    assert got[("mtt_handshake_failures_total", (("reason", "unknown_path"),))] == 1
    assert got[("mtt_handshake_failures_total", (("reason", "tls"),))] == 1
    assert got[("mtt_handshake_failures_total", (("reason", "bad_request"),))] == 1
    assert got[("mtt_dial_failures_total", (("reason", "refused"),))] == 1
    assert got[("mtt_handshake_seconds_count", ())] == 4
    assert got[("mtt_handshake_seconds_bucket", (("le", "+Inf"),))] == 4
    assert 0 < got[("mtt_handshake_seconds_sum", ())] < 4 * 10
    assert got[("mtt_user_bytes_total", (("direction", "up"), ("user", "/m1")))] == 3 * len(payload)
    assert got[("mtt_user_quota_used_bytes", (("user", "/m1"),))] == 6 * len(payload)


def test_metrics_per_user_only_when_asked_and_token_guarded() -> None:
    with running_server("-c-token", "s3cret") as server:
        server.token = "s3cret"
        server.add("/secret-path", "127.0.0.1:9")
        status, _, text = scrape(server)
        assert status == 401
        assert "secret-path" not in text
        status, _, text = scrape(server, "s3cret")
        assert status == 200
        assert "secret-path" not in text
        assert samples(text)[("mtt_users", ())] == 1
