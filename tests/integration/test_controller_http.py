"""The controller over HTTP: exact reply fields, fitting status codes, bounded bodies."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support import ServerProcess, running_server


@pytest.fixture(scope="module")
def server() -> ServerProcess:  # type: ignore[misc]
    with running_server() as s:
        yield s


def test_ping_on_a_fresh_server_reports_zero_users(server: ServerProcess) -> None:
    revision = server.control({"opt": 3})[1]["revision"]
    assert server.control({"opt": 9}) == (
        200,
        {"res": 1, "err_string": "", "current_users": 0, "revision": revision},
    )


def test_every_reply_carries_the_live_count(server: ServerProcess) -> None:
    revision = server.control({"opt": 3})[1]["revision"]
    status, reply = server.control(
        {"opt": 1, "args_bunch": [{"path": f"/c{i}", "dst": "127.0.0.1:9"} for i in range(5)]}
    )
    assert (status, reply) == (
        200,
        {"res": 1, "err_string": "", "current_users": 5, "revision": revision + 1},
    )
    status, reply = server.control({"opt": 11})
    assert status == 400
    assert reply == {
        "res": 2,
        "err_string": "unknown opt 11 (valid: 1 add, 2 delete, 3 reset, 4 replace, 5 list, "
        "6 kick, 7 harvest, 8 ack, 9 ping, 10 pending)",
        "current_users": 5,
        "revision": revision + 1,
    }


def test_bad_json_is_400_with_json_body(server: ServerProcess) -> None:
    status, reply = server.control(None, raw=b"{not json")
    assert status == 400
    assert reply["res"] == 2 and reply["err_string"].startswith("body is not valid JSON")
    assert set(reply) == {"res", "err_string", "current_users", "revision"}


def test_invalid_utf8_is_rejected(server: ServerProcess) -> None:
    status, reply = server.control(
        None, raw=b'{"opt": 1, "args_bunch": [{"path": "/\xff", "dst": "a:1"}]}'
    )
    assert (status, reply["res"]) == (400, 2)
    assert "UTF-8" in reply["err_string"]


def test_non_post_is_405(server: ServerProcess) -> None:
    for method in ("GET", "PUT", "DELETE"):
        status, reply = server.control(None, method=method, raw=b"")
        assert status == 405
        assert reply["res"] == 2 and f"method {method} not allowed" in reply["err_string"]


def test_oversized_body_is_413_without_reading_it_all(server: ServerProcess) -> None:
    host, port = server.controller.rsplit(":", 1)
    body = b"x" * (2 * 1024 * 1024 + 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: c\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413")
    doc = json.loads(reply.split("\r\n\r\n", 1)[1])
    assert doc["res"] == 2 and "larger than 2097152 bytes" in doc["err_string"]


def test_oversized_chunked_body_is_413(server: ServerProcess) -> None:
    host, port = server.controller.rsplit(":", 1)
    chunk = b"x" * 65536
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n")
        reply = b""
        try:
            for _ in range(40):  # 2.5 MiB, stops early once the server answers
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        except OSError:
            pass
        sock.settimeout(10)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413")


def test_body_of_exactly_the_limit_is_read(server: ServerProcess) -> None:
    doc = {"opt": 9, "pad": ""}
    base = len(json.dumps(doc).encode())
    doc["pad"] = "p" * (2 * 1024 * 1024 - base)
    raw = json.dumps(doc).encode()
    assert len(raw) == 2 * 1024 * 1024
    assert server.control(None, raw=raw)[0] == 200


def test_bulk_add_40000_is_applied_atomically(server: ServerProcess) -> None:
    """One change of 40,000 users, all or nothing (its time is the benchmark's:
    control plane, bulk add)."""
    revision = server.control({"opt": 3})[1]["revision"]
    bunch = [{"path": f"/bulk/{i}", "dst": f"127.0.0.1:{1 + i % 60000}"} for i in range(40_000)]
    status, reply = server.control({"opt": 1, "args_bunch": bunch})
    assert (status, reply) == (
        200,
        {"res": 1, "err_string": "", "current_users": 40_000, "revision": revision + 1},
    )
    bunch.append({"path": "/bulk/bad", "dst": "127.0.0.1:99999"})
    status, reply = server.control({"opt": 1, "args_bunch": [{"path": "/x", "dst": "h:1"}, *bunch]})
    assert status == 400 and reply["current_users"] == 40_000
    assert server.control({"opt": 9})[1]["current_users"] == 40_000
