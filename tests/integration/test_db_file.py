"""-db PATH at start: one server per file, and a file that cannot be used is
described as it is (read-only, permission, in use), never called foreign."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import ServerProcess, server_command, start_server

NOT_OURS = "not an mtt user database"


def run_to_the_end(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """A server start that must fail, on free ports, optionally under a wrapper."""
    argv = [*prefix, *server_command(), "-b", "127.0.0.1:0", "-c", "127.0.0.1:0", "-workers", "1"]
    argv += args
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The error line of a start that failed as an operator expects: code 1, no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def make_valid_db(db: Path) -> str:
    """A real server writes one user to db and stops; the file's sha256."""
    server = start_server("-db", str(db), "-workers", "1")
    try:
        server.add("/kept", "127.0.0.1:9")
    finally:
        assert server.stop() == 0, server.log_text()
    return hashlib.sha256(db.read_bytes()).hexdigest()


def users_of(server: ServerProcess) -> list[str]:
    status, reply = server.control({"opt": 5})
    assert (status, reply["res"]) == (200, 1), reply
    return sorted(u["path"] for u in reply["users"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid(1)")
def test_a_second_server_on_one_db_is_refused_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state" / "users.db"
    # Workers, as by default: they must not trip over the supervisor's lock.
    first = start_server("-db", str(db), "-workers", "2", prefix=("setsid",))
    try:
        first.add("/first", "127.0.0.1:9")
        line = one_line_failure(run_to_the_end("-db", str(db)))
        assert line == (
            f"mtt-mu-server: -db {db} is in use by another mtt-mu-server"
            f" (pid {first.proc.pid}); give each instance its own -db"
        )
        first.add("/second", "127.0.0.1:9")
        assert users_of(first) == ["/first", "/second"]
    finally:
        os.killpg(first.proc.pid, signal.SIGKILL)  # no clean exit: the kernel drops the lock
        first.proc.wait(10)
    again = start_server("-db", str(db), "-workers", "1")
    try:
        assert users_of(again) == ["/first", "/second"]
    finally:
        assert again.stop() == 0, again.log_text()


def _read_only_prefix(directory: Path) -> tuple[str, ...]:
    """Run a command with `directory` bind-mounted read-only in a private mount
    namespace: the server sees a read-only filesystem, nothing else does, and
    the mount goes away with the process."""
    mapping = () if os.geteuid() == 0 else ("--map-root-user",)
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    prefix = ("unshare", "--mount", *mapping, "sh", "-c", script, str(directory))
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.decode().strip()}")
    return prefix


@pytest.mark.slow
def test_a_valid_db_on_a_read_only_filesystem_is_named_read_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "users.db"
    digest = make_valid_db(db)
    prefix = _read_only_prefix(state)
    line = one_line_failure(run_to_the_end("-db", str(db), prefix=prefix))
    assert line.startswith(f"mtt-mu-server: -db {db}: read-only filesystem"), line
    assert NOT_OURS not in line
    assert "-db memory" in line  # what else the operator can do
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest
    again = start_server("-db", str(db), "-workers", "1")  # writable again: all there
    try:
        assert users_of(again) == ["/kept"]
    finally:
        assert again.stop() == 0, again.log_text()


def _without_file_access_rights() -> tuple[str, ...]:
    """root passes every permission check; without CAP_DAC_OVERRIDE it does not."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1) to drop root's file access rights")
    prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop capabilities here: {probe.stderr.decode().strip()}")
    return prefix


@pytest.mark.slow
def test_a_db_the_server_may_not_write_is_named_permission_denied(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "users.db"
    digest = make_valid_db(db)
    prefix = _without_file_access_rights()
    db.chmod(0o400)  # readable, not writable
    try:
        line = one_line_failure(run_to_the_end("-db", str(db), prefix=prefix))
    finally:
        db.chmod(0o600)
    assert line.startswith(f"mtt-mu-server: -db {db}: permission denied"), line
    assert NOT_OURS not in line
    state.chmod(0o500)  # the file is fine, the directory (for -wal, -shm) is not
    try:
        line = one_line_failure(run_to_the_end("-db", str(db), prefix=prefix))
    finally:
        state.chmod(0o700)
    assert line.startswith(f"mtt-mu-server: -db {db}: permission denied"), line
    assert str(state) in line
    assert NOT_OURS not in line
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_a_file_where_the_directory_should_be_is_named(tmp_path: Path) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    db = in_the_way / "sub" / "users.db"
    line = one_line_failure(run_to_the_end("-db", str(db)))
    assert line.startswith(f"mtt-mu-server: -db {db}: "), line
    assert f"{in_the_way} is a file, not a directory" in line
    assert NOT_OURS not in line


def test_a_foreign_file_is_still_called_foreign(tmp_path: Path) -> None:
    db = tmp_path / "users.db"
    db.write_bytes(os.urandom(8192))
    line = one_line_failure(run_to_the_end("-db", str(db)))
    assert line.startswith(f"mtt-mu-server: -db {db}: {NOT_OURS}"), line
