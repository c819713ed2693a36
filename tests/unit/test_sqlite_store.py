"""SqliteStore: every change all or nothing, counters buffered but never lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mtt.address import Destination
from mtt.core.commands import Command, Entry, Opt
from mtt.core.harvest import Acked, AckState, Harvest, HarvestBounds, Refused, Share, Taken
from mtt.core.usage import Usage
from mtt.core.users import NO_LIMITS, MuxProtocol, User, UserLimits
from mtt.errors import ConfigError, StoreError
from mtt.store.sqlite import SqliteStore

LIMITS = UserLimits(rate=1000, max_tunnels=2, max_ips=3, quota=10**9, expire=2_000_000_000)


def user(port: int = 8000, limits: UserLimits = LIMITS) -> User:
    return User(Destination("127.0.0.1", port), limits)


def add(*paths: str, quota_used: int | None = None) -> Command:
    return Command(Opt.ADD, entries=tuple(Entry(p, user(), quota_used) for p in paths))


def replace(*paths: str) -> Command:
    return Command(Opt.REPLACE, entries=tuple(Entry(p, user(9000)) for p in paths))


def delete(*paths: str) -> Command:
    return Command(Opt.DELETE, paths=paths)


def usage(up: int, down: int = 0, tunnels: int = 0, seen: float = 0.0) -> Usage:
    return Usage(up, down, up + down, tunnels, seen)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "users.db")


async def opened(path: str, **kwargs: float) -> SqliteStore:
    store = await SqliteStore.open(path, kwargs.pop("flush_interval", 60.0), **kwargs)
    await store.load()
    return store


@pytest.fixture
async def store(db_path: str) -> AsyncIterator[SqliteStore]:
    store = await opened(db_path)
    yield store
    await store.close()


async def test_creates_a_private_directory_and_an_empty_table(db_path: str) -> None:
    store = await SqliteStore.open(db_path, 1.0)
    snapshot = await store.load()
    await store.close()
    assert (snapshot.revision, snapshot.users) == (0, {})
    assert os.stat(os.path.dirname(db_path)).st_mode & 0o777 == 0o700
    assert os.stat(db_path).st_mode & 0o077 == 0


async def test_each_opt_and_a_monotonic_revision(store: SqliteStore, db_path: str) -> None:
    assert await store.commit(add("/a", "/b", "/c")) == 1
    assert await store.commit(delete("/b", "/nobody")) == 2
    assert set(await store.read_usage(None, False)) == {"/a", "/c"}
    assert await store.commit(replace("/c", "/d")) == 3
    with contextlib.closing(sqlite3.connect(db_path)) as db:  # in the file, as sqlite3(1) sees it
        revision = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        rows = db.execute("SELECT path, port FROM users ORDER BY path").fetchall()
    assert revision == (3,)
    assert rows == [("/c", 9000), ("/d", 9000)]
    assert await store.commit(Command(Opt.RESET)) == 4
    assert await store.commit(Command(Opt.REPLACE)) == 5
    assert await store.read_usage(None, False) == {}


async def test_replace_and_add_keep_counters_quota_used_sets_them(store: SqliteStore) -> None:
    await store.commit(add("/a", "/b"))
    await store.add_usage({"/a": usage(10, 5, 1, 100.0), "/b": usage(7), "/ghost": usage(1)})
    await store.flush()
    await store.add_usage({"/a": usage(1)})
    await store.commit(replace("/a"))
    await store.commit(add("/a"))
    assert await store.read_usage(None, False) == {"/a": Usage(11, 5, 16, 1, 100.0)}
    await store.commit(add("/a", quota_used=3))
    assert (await store.read_usage(["/a"], False))["/a"].quota_used == 3
    await store.commit(delete("/a"))
    await store.commit(add("/a"))
    assert await store.read_usage(None, False) == {"/a": Usage()}


async def test_read_and_reset_is_atomic_and_loses_no_delta(
    store: SqliteStore, db_path: str
) -> None:
    await store.commit(add("/a", "/b"))
    await store.add_usage({"/a": usage(100, 50, 2, 5.0)})
    await store.flush()
    await store.add_usage({"/a": usage(1, 1, 1, 6.0)})  # pending, not yet in the file
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # hold the reset's transaction back a moment
    reading = asyncio.ensure_future(store.read_usage(["/a", "/nobody"], True))
    await asyncio.sleep(0.05)
    await store.add_usage({"/a": usage(1000)})  # arrives while the reset is written
    assert not reading.done()
    other.execute("ROLLBACK")
    other.close()
    first = await reading
    assert first == {"/a": Usage(101, 51, 152, 3, 6.0)}
    assert await store.read_usage(["/a"], True) == {"/a": Usage(1000, 0, 1152, 0, 6.0)}
    assert await store.read_usage(["/a"], False) == {"/a": Usage(0, 0, 1152, 0, 6.0)}


async def test_reopen_restores_users_revision_and_counters(db_path: str) -> None:
    store = await opened(db_path)
    await store.commit(add("/a", "/b", quota_used=40))
    await store.commit(Command(Opt.ADD, entries=(Entry("/c", User(Destination("::1", 80))),)))
    await store.add_usage({"/a": usage(10, 20, 3, 1234.5)})
    await store.close()  # flushes what is pending
    again = await opened(db_path)
    snapshot = await again.load()
    counters = await again.read_usage(None, False)
    await again.close()
    assert snapshot.revision == 2
    assert snapshot.users == {"/a": user(), "/b": user(), "/c": User(Destination("::1", 80))}
    assert counters["/a"] == Usage(10, 20, 70, 3, 1234.5)
    assert counters["/b"] == Usage(0, 0, 40, 0, 0.0)


async def test_counters_are_flushed_in_the_background(db_path: str) -> None:
    store = await opened(db_path, flush_interval=0.05)
    await store.commit(add("/a"))
    await store.add_usage({"/a": usage(5)})
    await asyncio.sleep(0.3)
    with sqlite3.connect(db_path) as peek:
        row = peek.execute("SELECT bytes_up FROM users WHERE path = '/a'").fetchone()
    await store.close()
    assert row == (5,)


async def test_a_locked_database_raises_and_changes_nothing(db_path: str) -> None:
    store = await opened(db_path, busy_timeout=0.1)
    await store.commit(add("/a"))
    await store.add_usage({"/a": usage(5)})
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process (the sqlite3 CLI) holds the file
    try:
        with pytest.raises(StoreError):
            await store.commit(add("/b"))
        with pytest.raises(StoreError):
            await store.commit(Command(Opt.RESET))
        with pytest.raises(StoreError):
            await store.read_usage(None, True)
        with pytest.raises(StoreError):
            await store.flush()
        assert await store.read_usage(None, False) == {"/a": usage(5)}
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.commit(add("/c")) == 2
    await store.close()
    again = await opened(db_path)
    snapshot = await again.load()
    counters = await again.read_usage(None, False)
    await again.close()
    assert (snapshot.revision, set(snapshot.users)) == (2, {"/a", "/c"})
    assert counters["/a"] == usage(5)


async def test_a_file_that_is_not_ours_is_a_config_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigError, match=r"garbage\.db: not an mtt user database"):
        await SqliteStore.open(str(garbage), 1.0)
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE something (x)")
    with pytest.raises(ConfigError, match="not an mtt user database"):
        await SqliteStore.open(str(foreign), 1.0)
    assert garbage.read_bytes() == b"not a database at all" * 100  # left as it was


async def test_a_file_in_the_way_of_the_directory_is_named(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    for db in (blocked / "users.db", blocked / "sub" / "users.db"):  # EEXIST, ENOTDIR
        with pytest.raises(ConfigError) as caught:
            await SqliteStore.open(str(db), 1.0)
        message = str(caught.value)
        assert message.startswith(f"-db {db}: ")
        assert "is a file, not a directory" in message
        assert "not an mtt user database" not in message
    with pytest.raises(ConfigError, match=r"is a directory; name a file in it, e\.g\. -db "):
        await SqliteStore.open(str(tmp_path), 1.0)
    assert f"{tmp_path.name}.lock" not in os.listdir(tmp_path.parent)  # refused before creating


async def test_a_damaged_database_is_not_called_foreign(db_path: str) -> None:
    store = await opened(db_path)
    await store.commit(add(*(f"/u{i}" for i in range(2000))))
    await store.close()
    fd = os.open(db_path, os.O_WRONLY)  # keep the header, scramble the pages after it
    os.pwrite(fd, b"\xff" * 16384, 4096)
    os.close(fd)
    with pytest.raises(ConfigError) as caught:
        await SqliteStore.open(db_path, 1.0)
    assert "damaged" in str(caught.value)
    assert "not an mtt user database" not in str(caught.value)


async def test_one_file_one_store_until_it_closes(db_path: str) -> None:
    first = await opened(db_path)
    await first.commit(add("/a"))
    with pytest.raises(ConfigError) as caught:
        await SqliteStore.open(db_path, 1.0)
    assert str(caught.value) == (
        f"-db {db_path} is in use by another mtt-mu-server (pid {os.getpid()});"
        " give each instance its own -db"
    )
    assert (await first.commit(add("/b"))) == 2  # the holder is untouched
    await first.close()
    second = await opened(db_path)
    snapshot = await second.load()
    await second.close()
    assert set(snapshot.users) == {"/a", "/b"}


async def test_bulk_add_and_load_stay_fast(db_path: str) -> None:
    store = await opened(db_path)
    paths = [f"/user{i}" for i in range(40_000)]
    started = time.perf_counter()
    await store.commit(add(*paths))
    added = time.perf_counter() - started
    await store.close()
    again = await SqliteStore.open(db_path, 60.0)
    started = time.perf_counter()
    snapshot = await again.load()
    loaded = time.perf_counter() - started
    await again.close()
    assert len(snapshot.users) == 40_000
    assert added < 5.0, added
    assert loaded < 2.0, loaded


async def test_a_cancelled_caller_does_not_split_memory_from_the_file(db_path: str) -> None:
    store = await opened(db_path)
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    committing = asyncio.ensure_future(store.commit(add("/a")))
    await asyncio.sleep(0.05)
    committing.cancel()  # the controller's client hung up
    other.execute("ROLLBACK")
    other.close()
    with pytest.raises(asyncio.CancelledError):
        await committing
    assert await store.commit(add("/b")) == 2  # the first one went through whole
    assert set(await store.read_usage(None, False)) == {"/a", "/b"}
    await store.close()


# -- harvests (docs/protocol.md §6, harvests) ----------------------------------------------

BOUNDS = HarvestBounds()


def peek(db_path: str, query: str) -> list[tuple[object, ...]]:
    """The file as another reader sees it, committed transactions only."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return db.execute(query).fetchall()


async def test_a_harvest_is_in_the_file_with_the_counters_it_zeroed(db_path: str) -> None:
    store = await opened(db_path)  # a minute between flushes: none happens here
    await store.commit(add("/a", "/b", "/idle"))
    await store.add_usage({"/a": usage(100, 50, 2, 5.0)})
    await store.flush()
    await store.add_usage({"/a": usage(1, 2, 1, 6.0), "/b": usage(7, 0, 1, 3.0)})  # buffered
    taken = await store.harvest("h1", None, 1000.5, BOUNDS)
    expected = Harvest("h1", 1000.5, (("/a", Share(101, 52, 3)), ("/b", Share(7, 0, 1))), False)
    assert taken == Taken(expected, repeat=False)
    # Harvested deltas are in the file although no flush ran: a crash now keeps them.
    assert peek(db_path, "SELECT id, acked, taken_at, more FROM harvests") == [("h1", 0, 1000.5, 0)]
    assert peek(db_path, "SELECT path, bytes_up, bytes_down, total_tunnels FROM harvest_users") == [
        ("/a", 101, 52, 3),
        ("/b", 7, 0, 1),
    ]
    assert peek(db_path, "SELECT path, bytes_up, bytes_down, quota_used FROM users") == [
        ("/a", 0, 0, 153),
        ("/b", 0, 0, 7),
        ("/idle", 0, 0, 0),
    ]
    assert await store.read_usage(["/a"], False) == {"/a": Usage(0, 0, 153, 0, 6.0)}
    assert await store.harvest("h1", ["/idle"], 2000.0, BOUNDS) == Taken(expected, repeat=True)
    assert await store.harvest("h2", None, 2000.0, BOUNDS) == Refused("h1", acked_before=False)
    await store.close()

    again = await opened(db_path)
    assert await again.pending_harvest() == expected
    assert await again.ack_harvest("h1", BOUNDS) == Acked(AckState.ACKED, "")
    assert peek(db_path, "SELECT id, acked FROM harvests") == [("h1", 1)]
    assert peek(db_path, "SELECT * FROM harvest_users") == []
    await again.close()

    third = await opened(db_path)
    assert await third.pending_harvest() is None
    assert await third.ack_harvest("h1", BOUNDS) == Acked(AckState.ALREADY_ACKED, "")
    assert await third.harvest("h1", None, 0.0, BOUNDS) == Refused("", acked_before=True)
    nothing = await third.harvest("h2", None, 3000.0, BOUNDS)
    assert nothing == Taken(Harvest("h2", 3000.0, (), False), repeat=False)
    await third.close()


async def test_traffic_during_a_harvest_stays_live(store: SqliteStore, db_path: str) -> None:
    await store.commit(add("/a"))
    await store.add_usage({"/a": usage(10, 20, 1, 5.0)})
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # hold the harvest's transaction back a moment
    taking = asyncio.ensure_future(store.harvest("h1", None, 1.0, BOUNDS))
    await asyncio.sleep(0.05)
    await store.add_usage({"/a": usage(1000, 0, 1, 6.0)})  # arrives while it is written
    assert not taking.done()
    other.execute("ROLLBACK")
    other.close()
    taken = await taking
    assert isinstance(taken, Taken) and taken.harvest.users == (("/a", Share(10, 20, 1)),)
    assert await store.read_usage(["/a"], False) == {"/a": Usage(1000, 0, 1030, 1, 6.0)}
    await store.ack_harvest("h1", BOUNDS)
    second = await store.harvest("h2", None, 2.0, BOUNDS)
    assert isinstance(second, Taken) and second.harvest.users == (("/a", Share(1000, 0, 1)),)


async def test_a_harvest_the_file_refuses_moves_nothing(db_path: str) -> None:
    store = await opened(db_path, busy_timeout=0.1)
    await store.commit(add("/a"))
    await store.add_usage({"/a": usage(5, 6, 1)})
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError):
            await store.harvest("h1", None, 1.0, BOUNDS)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.pending_harvest() is None
    assert await store.read_usage(["/a"], False) == {"/a": Usage(5, 6, 11, 1, 0.0)}
    taken = await store.harvest("h1", None, 1.0, BOUNDS)
    assert isinstance(taken, Taken) and taken.harvest.users == (("/a", Share(5, 6, 1)),)
    await store.close()


async def test_acknowledged_ids_in_the_file_are_bounded(db_path: str) -> None:
    store = await opened(db_path)
    kept = HarvestBounds(acked_kept=2)
    for harvest_id in ("h1", "h2", "h3"):
        await store.harvest(harvest_id, None, 1.0, kept)
        await store.ack_harvest(harvest_id, kept)
    assert peek(db_path, "SELECT id FROM harvests ORDER BY seq") == [("h2",), ("h3",)]
    await store.close()


async def test_a_file_of_an_earlier_version_gains_the_harvest_tables(db_path: str) -> None:
    store = await opened(db_path)
    await store.commit(add("/a"))
    await store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("DROP TABLE harvests")
        db.execute("DROP TABLE harvest_users")
        db.commit()
    again = await opened(db_path)
    assert set(await again.read_usage(None, False)) == {"/a"}
    assert await again.harvest("h1", None, 1.0, BOUNDS) == Taken(
        Harvest("h1", 1.0, (), False), repeat=False
    )
    await again.close()


async def test_a_users_mux_survives_a_restart(db_path: str) -> None:
    store = await opened(db_path)
    v2 = User(Destination("127.0.0.1", 8388), mux=MuxProtocol.MUXCOOL)
    plain = User(Destination("127.0.0.1", 8389), LIMITS, MuxProtocol.NONE)
    entries = (Entry("/v2", v2), Entry("/plain", plain), Entry("/a", user()))
    await store.commit(Command(Opt.ADD, entries=entries))
    await store.close()
    again = await opened(db_path)
    snapshot = await again.load()
    await again.close()
    assert snapshot.users == {"/v2": v2, "/plain": plain, "/a": user()}


def _rows(path: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT * FROM users ORDER BY path").fetchall()


@pytest.mark.parametrize("json_each", [True, False])
async def test_runs_of_one_user_are_written_as_entry_by_entry(
    tmp_path: Path, json_each: bool
) -> None:
    """Entries sharing a User go in one statement (mtt.store.sqlite._upsert):
    the file must end as if each entry were written in turn, with or without
    json_each, a path given twice as its last entry says."""
    store = await opened(str(tmp_path / "users.db"))
    store._json_each = json_each
    shared = User(Destination("10.0.0.1", 1))
    limited = User(Destination("h.example", 2), LIMITS, MuxProtocol.SMUX)
    odd = ['/q"uote', "/back\\slash", "/é/😀", "/x"]
    entries = [
        Entry("/dup", limited),
        *(Entry(f"/s{i}", shared) for i in range(5)),
        Entry("/single", User(Destination("10.0.0.2", 3))),
        *(Entry(p, limited, quota_used=7 if p == "/x" else None) for p in odd),
        Entry("/dup", shared),
        Entry("/s0", shared),
        # Singles of no limits take three values a row, the others nine: in order still.
        Entry("/mix", User(Destination("10.0.0.3", 4))),
        Entry("/mix", User(Destination("h.example", 2), LIMITS, MuxProtocol.SMUX)),
        Entry("/mix2", User(Destination("h.example", 2), LIMITS, MuxProtocol.SMUX)),
        Entry("/mix2", User(Destination("10.0.0.3", 4))),
    ]
    await store.commit(Command(Opt.ADD, entries=tuple(entries)))
    await store.commit(Command(Opt.ADD, entries=(Entry("/s1", limited), Entry("/s2", limited))))
    await store.close()
    rows = {row[0]: row for row in _rows(str(tmp_path / "users.db"))}
    assert len(rows) == 13
    plain = ("10.0.0.1", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, "")
    sold = ("h.example", 2, 1000, 2, 3, 10**9, 2_000_000_000, 0, 0, 0, 0, 0.0, "smux")
    assert rows["/dup"][1:] == rows["/s0"][1:] == rows["/s3"][1:] == plain
    assert rows["/s1"][1:] == rows["/s2"][1:] == rows['/q"uote'][1:] == sold
    assert rows["/back\\slash"][1:] == rows["/é/😀"][1:] == sold
    assert rows["/x"][1:] == (*sold[:9], 7, *sold[10:])
    assert rows["/single"][1:3] == ("10.0.0.2", 3)
    assert rows["/mix"][1:] == sold
    assert rows["/mix2"][1:] == ("10.0.0.3", 4, *plain[2:])


@pytest.mark.parametrize("json_each", [True, False])
async def test_a_port_per_user_is_written_as_entry_by_entry(
    tmp_path: Path, json_each: bool
) -> None:
    """Single users of no limits go in one statement per host, paths and ports
    as a JSON object (mtt.store.sqlite._UPSERT_PORTS): hosts interleaved, a
    path moved to another host or into a run later in the request, and paths
    JSON escapes must all end as written entry by entry."""
    store = await opened(str(tmp_path / "users.db"))
    store._json_each = json_each
    shared = User(Destination("10.0.0.9", 9))
    entries = [
        *(Entry(f"/a{i}", User(Destination("10.0.0.1", 1000 + i))) for i in range(3)),
        Entry('/q"uote', User(Destination("h.example", 7))),
        Entry("/back\\slash", User(Destination("10.0.0.1", 2000))),
        Entry("/é/😀", User(Destination("h.example", 8))),
        Entry("/a1", User(Destination("h.example", 9))),  # moved to another host
        Entry("/a2", shared),
        Entry("/b", shared),
        Entry('/q"uote', User(Destination("10.0.0.1", 3000))),
    ]
    await store.commit(Command(Opt.ADD, entries=tuple(entries)))
    await store.close()
    rows = {row[0]: row[1:3] for row in _rows(str(tmp_path / "users.db"))}
    assert rows == {
        "/a0": ("10.0.0.1", 1000),
        "/a1": ("h.example", 9),
        "/a2": ("10.0.0.9", 9),
        "/b": ("10.0.0.9", 9),
        '/q"uote': ("10.0.0.1", 3000),
        "/back\\slash": ("10.0.0.1", 2000),
        "/é/😀": ("h.example", 8),
    }
    again = await opened(str(tmp_path / "users.db"))
    try:
        snapshot = await again.load()
    finally:
        await again.close()
    assert {p: (u.dst.host, u.dst.port) for p, u in snapshot.users.items()} == rows
    assert all(u.limits is NO_LIMITS and u.mux is None for u in snapshot.users.values())


async def test_a_port_each_on_one_host_is_written_whole(tmp_path: Path) -> None:
    """Only plain Users of one host (mtt.core.commands.plain_columns): one
    statement for all; a path given twice keeps its last port."""
    store = await opened(str(tmp_path / "users.db"))
    entries = [Entry(f"/p{i}", User(Destination("10.0.0.1", 1000 + i))) for i in range(5)]
    entries.append(Entry("/p1", User(Destination("10.0.0.1", 7))))
    entries.append(Entry('/q"uote/é', User(Destination("10.0.0.1", 8))))
    await store.commit(Command(Opt.ADD, entries=tuple(entries)))
    await store.close()
    rows = {row[0]: row[1:] for row in _rows(str(tmp_path / "users.db"))}
    plain = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, "")
    assert rows == {
        "/p0": ("10.0.0.1", 1000, *plain),
        "/p1": ("10.0.0.1", 7, *plain),
        "/p2": ("10.0.0.1", 1002, *plain),
        "/p3": ("10.0.0.1", 1003, *plain),
        "/p4": ("10.0.0.1", 1004, *plain),
        '/q"uote/é': ("10.0.0.1", 8, *plain),
    }


_SCHEMA_1 = """
CREATE TABLE users (
    path TEXT PRIMARY KEY, host TEXT NOT NULL, port INTEGER NOT NULL,
    rate INTEGER NOT NULL DEFAULT 0, max_tunnels INTEGER NOT NULL DEFAULT 0,
    max_ips INTEGER NOT NULL DEFAULT 0, quota INTEGER NOT NULL DEFAULT 0,
    expire INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0, quota_used INTEGER NOT NULL DEFAULT 0,
    total_tunnels INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema', 1), ('revision', 7);
INSERT INTO users (path, host, port, rate, bytes_up, quota_used, last_seen)
    VALUES ('/old', '127.0.0.1', 8000, 1000, 5, 9, 12.5);
"""


async def test_a_version_1_file_is_migrated_and_keeps_its_users(db_path: str) -> None:
    """The file an earlier server wrote, before users had a mux."""
    os.makedirs(os.path.dirname(db_path))
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.executescript(_SCHEMA_1)
    store = await opened(db_path)
    snapshot = await store.load()
    counters = await store.read_usage(None, False)
    await store.commit(add("/new"))
    await store.close()
    assert snapshot.revision == 7
    assert snapshot.users == {"/old": User(Destination("127.0.0.1", 8000), UserLimits(rate=1000))}
    assert counters["/old"] == Usage(5, 0, 9, 0, 12.5)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (2,)
        assert db.execute("SELECT mux FROM users ORDER BY path").fetchall() == [("",), ("",)]
