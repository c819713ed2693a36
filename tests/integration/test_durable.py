"""-db PATH: what the controller acknowledged is there after a restart or a kill -9."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_tunnel import echo_roundtrip, opener
from tests.support import (
    ServerProcess,
    echo_server,
    pattern,
    run_cli,
    start_server,
)

LIMITED = {"rate": 10_000_000, "max_tunnels": 4, "max_ips": 2, "quota": 10**12, "expire": 2**40}


def listing(server: ServerProcess) -> dict[str, Any]:
    status, reply = server.control({"opt": 5})
    assert (status, reply["res"]) == (200, 1), reply
    return reply


def ok(server: ServerProcess, doc: dict[str, Any]) -> dict[str, Any]:
    status, reply = server.control(doc)
    assert (status, reply["res"]) == (200, 1), reply
    return reply


@pytest.mark.slow
async def test_a_restart_keeps_users_settings_and_counters(tmp_path: Path) -> None:
    db = str(tmp_path / "state" / "users.db")
    # An hour between flushes: the counters can only reach the file at shutdown.
    args = ("-db", db, "-flush-interval", "1h", "-workers", "2")
    server = start_server(*args)
    try:
        async with echo_server() as echo:
            ok(server, {"opt": 1, "args_bunch": [{"path": "/a", "dst": echo.addr, **LIMITED}]})
            ok(server, {"opt": 1, "args_bunch": [{"path": "/b", "dst": "[::1]:9", "quota": 5}]})
            ok(server, {"opt": 1, "args_bunch": [{"path": "/c", "dst": echo.addr}]})
            ok(server, {"opt": 2, "args_bunch": [{"path": "/c"}]})
            ok(server, {"opt": 1, "args_bunch": [{"path": "/b", "dst": "[::1]:9", "quota": 5,
                                                  "quota_used": 3}]})  # fmt: skip
            for seed in (1, 2):
                payload = pattern(seed, 200_000)
                async with opener(server, None, "/a") as ws:
                    assert await echo_roundtrip(ws, payload) == payload
        before = listing(server)
    finally:
        assert server.stop() == 0, server.log_text()
    assert before["revision"] == 5
    counted = {u["path"]: u for u in before["users"]}
    assert counted["/a"]["bytes_up"] == counted["/a"]["bytes_down"] == 400_000
    assert counted["/a"]["total_tunnels"] == 2
    assert counted["/b"]["quota_used"] == 3
    assert "Traceback" not in server.log_text()

    again = start_server(*args)
    try:
        _, ping = again.control({"opt": 9})
        assert (ping["current_users"], ping["revision"]) == (2, 5)
        after = listing(again)
        assert after["users"] == before["users"]
        assert after["revision"] == 5
        ok(again, {"opt": 5, "reset": True})
    finally:
        assert again.stop() == 0, again.log_text()
    third = start_server(*args)
    try:
        users = {u["path"]: u for u in listing(third)["users"]}
        assert (users["/a"]["bytes_up"], users["/a"]["quota_used"]) == (0, 800_000)
    finally:
        assert third.stop() == 0, third.log_text()


def test_not_a_database_is_one_line_and_nonzero(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    db.write_bytes(b"these are not the users you are looking for" * 50)
    result = run_cli("-b", "127.0.0.1:0", "-c", "127.0.0.1:0", "-db", str(db))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "not an mtt user database" in result.stderr.strip().splitlines()[-1]


BATCH = 500


class BulkAdder(threading.Thread):
    """Adds batches of users, one request each, until the server dies.

    Batch i adds /r{i}/u0 ... /r{i}/u499; acked lists the batches that got res 1.
    """

    def __init__(self, server: ServerProcess, first: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.acked: list[int] = []
        self.next = first  # the batch after the last one sent (which may be unanswered)

    def run(self) -> None:
        while True:
            i = self.next
            body = [{"path": f"/r{i}/u{j}", "dst": "127.0.0.1:9", "quota": j} for j in range(BATCH)]
            self.next += 1
            try:
                reply = self.server.control({"opt": 1, "args_bunch": body})[1]
            except (OSError, http.client.HTTPException, ValueError):
                return
            if reply["res"] == 1:
                self.acked.append(i)


def kill_everything(server: ServerProcess) -> None:
    """SIGKILL the supervisor and its workers at once (their own process group)."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid(1)")
def test_kill_9_loses_no_acknowledged_change_and_half_applies_none(tmp_path: Path) -> None:
    db = str(tmp_path / "users.db")
    acked: set[int] = set()
    in_flight: set[int] = set()
    first = 0
    for delay in (0.0, 0.004, 0.011):  # a few different moments of a request
        server = start_server("-db", db, "-workers", "2", prefix=("setsid",))
        adder = BulkAdder(server, first)
        adder.start()
        deadline = time.monotonic() + 15
        while len(adder.acked) < 4 and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        assert adder.is_alive() and len(adder.acked) >= 4, server.log_text()
        kill_everything(server)
        adder.join(10)
        assert not adder.is_alive()
        acked |= set(adder.acked)
        in_flight.add(adder.next - 1)
        first = adder.next

    again = start_server("-db", db, "-workers", "1")
    try:
        _, ping = again.control({"opt": 9})
        users = listing(again)["users"]
    finally:
        assert again.stop() == 0, again.log_text()
    batches: dict[int, int] = {}
    for user in users:
        batch = int(user["path"].split("/")[1][1:])
        batches[batch] = batches.get(batch, 0) + 1
        assert user["quota"] == int(user["path"].rsplit("/u", 1)[1])
    assert set(batches.values()) == {BATCH}, "a request was half applied"
    assert acked <= set(batches), "an acknowledged request was lost"
    assert set(batches) - acked <= in_flight, "only a request in flight may be there unanswered"
    assert ping["revision"] == len(batches)
    assert ping["current_users"] == len(users) == BATCH * len(batches)
