"""GET /healthz and GET /readyz of a real server: while it starts, runs, loses
its Redis, loses a worker, and stops. Every wait is bounded."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_redis_store import RedisServer, _free_port
from tests.support import ROOT, running_server, server_command

READY_LINE = "tunnel listener on "
Probe = tuple[int, dict[str, Any]] | None  # None: nothing listens


def probe(controller: str, path: str, token: str = "") -> Probe:
    host, port = controller.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        assert response.getheader("Content-Type", "").startswith("application/json")
        assert response.getheader("Cache-Control") == "no-store"
        return response.status, json.loads(response.read())
    except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
        return None  # nothing listens, or the controller closed as it stopped
    finally:
        conn.close()


OK = (200, {"status": "ok"})


def unready(*reasons: str) -> tuple[int, dict[str, Any]]:
    return 503, {"status": "unready", "reasons": list(reasons)}


def wait_for(
    check: Callable[[], Probe], wanted: Probe, within: float, seen: list[Probe] | None = None
) -> float:
    """Poll every 50 ms until check() gives wanted; the seconds it took."""
    start = time.monotonic()
    last: Probe = None
    while time.monotonic() - start < within:
        last = check()
        if seen is not None:
            seen.append(last)
        if last == wanted:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"no {wanted} within {within} s; last {last}")


@contextlib.contextmanager
def started_by_hand(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The server started on a controller port chosen here, so it can be probed
    before its ready line; stderr is left to the caller."""
    controller = f"127.0.0.1:{_free_port()}"
    argv = [*server_command(), "-b", "127.0.0.1:0", "-c", controller, "-db", "memory", *args]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc, controller
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def read_available(proc: subprocess.Popen[bytes]) -> bytes:
    """What the server has written to stderr so far, without waiting."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    out = b""
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, 65536):
            out += chunk
    return out


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_only_after_the_ready_line_and_unready_once_stopping(workers: str) -> None:
    with started_by_hand("-workers", workers) as (proc, controller):
        log = b""
        before: list[Probe] = []
        deadline = time.monotonic() + 30
        while True:
            assert time.monotonic() < deadline, (before[-5:], log.decode())
            answer = probe(controller, "/readyz")
            log += read_available(proc)  # everything written before that answer, and more
            if answer == OK:
                break
            before.append(answer)
            assert proc.poll() is None, log.decode()
            time.sleep(0.01)
        # The 200 came after the ready line was written; what came before it
        # was nothing listening yet, or "starting".
        assert READY_LINE.encode() in log
        assert set(map(str, before)) <= {"None", str(unready("starting"))}, before
        assert probe(controller, "/healthz") == OK

        proc.send_signal(signal.SIGTERM)
        after: list[Probe] = []
        wait_for(lambda: probe(controller, "/readyz"), None, 15, after)
        # At most an answer already on its way when the signal came, then never ok again.
        while after and after[0] == OK:
            after.pop(0)
        assert all(a in (unready("stopping"), None) for a in after), after
        assert proc.wait(20) == 0
        log += read_available(proc)
        assert b"Traceback" not in log, log.decode()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_probes_while_running_need_no_token_and_posts_stay_commands(workers: str) -> None:
    token = "health-test-token"
    with running_server("-workers", workers, "-c-token", token) as server:
        for path in ("/healthz", "/readyz"):
            assert probe(server.controller, path) == OK  # no token needed
            assert probe(server.controller, path, token="wrong") == OK
        # A Go panel may POST to any path: these are still commands, behind the token.
        host, port = server.controller.rsplit(":", 1)
        for token_sent, status in (("", 401), (token, 200)):
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            headers = {"Authorization": f"Bearer {token_sent}"} if token_sent else {}
            conn.request("POST", "/readyz", body=b'{"opt": 9}', headers=headers)
            response = conn.getresponse()
            assert response.status == status
            assert "res" in json.loads(response.read())
            conn.close()
        # Everything else on GET still needs the token.
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", "/metrics")
        assert conn.getresponse().status == 401
        conn.close()


@pytest.mark.slow
def test_a_killed_worker_is_unready_until_it_is_back() -> None:
    with running_server("-workers", "2") as server:
        assert probe(server.controller, "/readyz") == OK
        victim = server.children()[0]
        os.kill(victim, signal.SIGKILL)
        seen: list[Probe] = []
        took = wait_for(lambda: probe(server.controller, "/readyz"), unready("workers"), 5, seen)
        assert probe(server.controller, "/healthz") == OK  # alive all along
        back = wait_for(lambda: probe(server.controller, "/readyz"), OK, 30)
        assert victim not in server.children() and len(server.children()) == 2
        assert "worker 1 exited" in server.log_text() or "worker 2 exited" in server.log_text()
        print(f"\nunready {took:.2f} s after the kill, ready again {back:.2f} s later")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_a_redis_outage_is_unready_store_until_redis_answers_again(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        with running_server("-store", redis.url, "-workers", "1") as server:
            readyz: Callable[[], Probe] = lambda: probe(server.controller, "/readyz")  # noqa: E731
            assert readyz() == OK
            assert redis.proc is not None
            redis.proc.send_signal(signal.SIGSTOP)  # up, but answers nothing
            stalled = wait_for(readyz, unready("store"), 20)
            assert probe(server.controller, "/healthz") == OK
            redis.proc.send_signal(signal.SIGCONT)
            resumed = wait_for(readyz, OK, 20)
            redis.kill()  # gone: connections refused
            killed = wait_for(readyz, unready("store"), 20)
            redis.start()
            restarted = wait_for(readyz, OK, 20)
            print(
                f"\nstore unready {stalled:.1f} s after SIGSTOP, ready {resumed:.1f} s after "
                f"SIGCONT; unready {killed:.1f} s after a kill, ready {restarted:.1f} s after "
                "a restart"
            )
            server_log = server.log_text()
            assert "lost the Redis subscription" in server_log
    finally:
        redis.kill()


def test_a_sqlite_store_is_ready(tmp_path: Path) -> None:
    with running_server("-db", str(tmp_path / "users.db"), "-workers", "1") as server:
        assert probe(server.controller, "/readyz") == OK
