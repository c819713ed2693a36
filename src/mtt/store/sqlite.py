"""One node, durable by default (-db PATH): users and counters in a SQLite file.

Theory of operation. Every change (opt 1-4) is one transaction in WAL mode
with synchronous=FULL, so it is on disk before commit() returns and the
controller says res 1; a change that fails rolls back whole and raises
StoreError. Counters arrive every second for every busy user, so they are
buffered: add_usage() only adds to `_pending`, and a background task writes
the deltas every flush_interval (and close() writes the rest). A crash loses
at most one interval of counts, never a user or a setting.

A harvest (opt 7) is one transaction too: the harvest's rows are written and
the same users' counters zeroed together, buffered deltas included, so after
a crash the harvest and the counters add up to what was counted, whichever
side of the commit the crash fell on. An acknowledged harvest's rows go in
the ack's transaction; its id stays (the last HarvestBounds.acked_kept).

All sqlite3 calls run on one dedicated thread, so the event loop never waits
on the disk. Operations that write go through `_lock`, one at a time, and
update `_stored` (the counters as the file holds them) only once their
transaction has committed; reads answer `_stored` + the batch being flushed
+ `_pending` without touching the file, so a quota check costs a dict lookup.

One server per file: open() takes an exclusive flock on `users.db.lock`
beside the database before it touches the file, and holds it until close().
Two servers on one file would each serve the table they loaded and overwrite
each other's changes; the second is refused in one line naming the first's
pid. The kernel drops the lock when the process dies, even by kill -9, so it
is never stale. Before SQLite opens the file, the directory, the lock and the
database are checked for what an operator can fix (read-only filesystem,
permissions, a file where a directory should be), so that only a file that
really is someone else's is called "not an mtt user database".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from operator import attrgetter, is_
from pathlib import Path
from typing import Any, TypeVar, cast

from mtt.address import Destination
from mtt.config import Limits
from mtt.core.commands import Command, Entry, Opt, runs
from mtt.core.harvest import (
    Acked,
    AckState,
    Harvest,
    HarvestBook,
    HarvestBounds,
    HarvestOutcome,
    Share,
    Taken,
    pick,
)
from mtt.core.usage import Usage
from mtt.core.users import NO_LIMITS, MuxProtocol, User, UserLimits
from mtt.errors import ConfigError, StoreError
from mtt.store.base import RemoteChange, Served, SharedCount, StoreSnapshot
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.store")
_LIMITS = Limits()

LOCK_SUFFIX = ".lock"  # users.db.lock: flock-ed by the one server using users.db
NOT_OURS = "not an mtt user database"

# 2 added users.mux; a version 1 file is migrated at open (_prepare).
SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE users (
    path TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    rate INTEGER NOT NULL DEFAULT 0,
    max_tunnels INTEGER NOT NULL DEFAULT 0,
    max_ips INTEGER NOT NULL DEFAULT 0,
    quota INTEGER NOT NULL DEFAULT 0,
    expire INTEGER NOT NULL DEFAULT 0,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    quota_used INTEGER NOT NULL DEFAULT 0,
    total_tunnels INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL DEFAULT 0,
    mux TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Added to files of every version on opening (an earlier server ignores them):
# the pending harvest (acked 0, at most one) and the ids acknowledged lately,
# seq giving their order; the users of the pending one.
_HARVEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS harvests (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    taken_at REAL NOT NULL,
    more INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS harvest_users (
    id TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    total_tunnels INTEGER NOT NULL,
    PRIMARY KEY (id, path)
) WITHOUT ROWID;
"""
_NEXT_SEQ = "SELECT coalesce(max(seq), 0) + 1 FROM harvests"
_FORGET_ACKED = """
DELETE FROM harvests WHERE acked = 1 AND id NOT IN
    (SELECT id FROM harvests WHERE acked = 1 ORDER BY seq DESC LIMIT ?)
"""
# The three upserts of a user row share their head and their conflict clause.
_INSERT_USERS = (
    "INSERT INTO users (path, host, port, rate, max_tunnels, max_ips, quota, expire, mux)\n"
)
_REPLACE_USER = """
ON CONFLICT (path) DO UPDATE SET
    host = excluded.host, port = excluded.port, rate = excluded.rate,
    max_tunnels = excluded.max_tunnels, max_ips = excluded.max_ips,
    quota = excluded.quota, expire = excluded.expire, mux = excluded.mux
"""
_UPSERT = (
    _INSERT_USERS
    + """VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
    + _REPLACE_USER
)
# Many users of one User (entries of one dst, mtt.core.commands._parse_adds): their
# paths as one JSON array, one statement; 40,000 rows row by row took 65 ms, this 20.
_UPSERT_RUN = (
    _INSERT_USERS
    + """SELECT value, ?, ?, ?, ?, ?, ?, ?, ? FROM json_each(?) WHERE true
"""
    + _REPLACE_USER
)
# A user of no limits and the server's -mux-protocol, as most are: three values
# to bind, not nine; 40,000 users with a port each took 76 ms row by row, this 50.
_UPSERT_PLAIN = (
    _INSERT_USERS
    + """VALUES (?, ?, ?, 0, 0, 0, 0, 0, '')
"""
    + _REPLACE_USER
)
# Such users of one host, each its own port (a port per user): one JSON object
# {path: port}, one statement; 40,000 of them took 54 ms of CPU row by row, this 29.
_UPSERT_PORTS = (
    _INSERT_USERS
    + """SELECT key, ?, value, 0, 0, 0, 0, 0, '' FROM json_each(?) WHERE true
"""
    + _REPLACE_USER
)
_LOAD = """
SELECT path, host, port, rate, max_tunnels, max_ips, quota, expire,
    bytes_up, bytes_down, quota_used, total_tunnels, last_seen, mux
FROM users
"""
# Version 1 to 2: users.mux, '' for "the server's -mux-protocol".
_MIGRATE_1 = "ALTER TABLE users ADD COLUMN mux TEXT NOT NULL DEFAULT ''"
_ADD_USAGE = """
UPDATE users SET bytes_up = bytes_up + ?, bytes_down = bytes_down + ?,
    quota_used = quota_used + ?, total_tunnels = total_tunnels + ?,
    last_seen = max(last_seen, ?)
WHERE path = ?
"""
_RESET_USAGE = """
UPDATE users SET bytes_up = 0, bytes_down = 0, total_tunnels = 0,
    quota_used = quota_used + ?, last_seen = max(last_seen, ?)
WHERE path = ?
"""
_SET_REVISION = "INSERT OR REPLACE INTO meta (key, value) VALUES ('revision', ?)"
# Fields of the entries of a change, for loops of C over the 40,000 of a bulk add.
_PATH = attrgetter("path")
_QUOTA_USED = attrgetter("quota_used")

T = TypeVar("T")


class SqliteStore:
    """Users and counters in one SQLite file, written from one thread."""

    def __init__(
        self, path: str, flush_interval: float, busy_timeout: float = _LIMITS.sqlite_busy_timeout
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self.busy_timeout = busy_timeout  # waiting for another process's lock (sqlite3 CLI)
        self.revision = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtt-sqlite")
        self._db: sqlite3.Connection | None = None  # used on the executor's thread only
        self._json_each = False  # this SQLite has json_each (3.38+ always, earlier if built in)
        self._lock_fd: int | None = None  # the flock on path + LOCK_SUFFIX, held until close()
        self._lock = asyncio.Lock()
        self._stored: dict[str, Usage] = {}  # path -> counters as committed; also the user set
        self._flushing: dict[str, Usage] = {}  # deltas being written right now
        self._pending: dict[str, Usage] = {}  # deltas not yet given to the file
        self._flusher: asyncio.Task[None] | None = None
        self._harvests = HarvestBook(HarvestBounds().acked_kept)  # as the file holds them

    @classmethod
    async def open(
        cls, path: str, flush_interval: float, busy_timeout: float = _LIMITS.sqlite_busy_timeout
    ) -> SqliteStore:
        """Open (creating if needed) the database; ConfigError if it is unusable."""
        store = cls(path, flush_interval, busy_timeout)
        try:
            await store._run(store._open_sync)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _open_sync(self) -> None:
        try:
            self._lock_fd = _claim(self.path)  # before anything opens the database
            _check_writable(self.path)
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            self._release()
            raise ConfigError(f"-db {self.path}: cannot open: {exc}") from None
        except BaseException:
            self._release()
            raise
        try:
            _prepare(db)
        except (sqlite3.Error, ConfigError) as exc:
            db.close()
            self._release()
            why = _sqlite_problem(exc) if isinstance(exc, sqlite3.Error) else str(exc)
            raise ConfigError(f"-db {self.path}: {why}") from None
        self._db = db
        self._json_each = _has_json_each(db)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    # -- the Store protocol ---------------------------------------------------------------

    async def load(self) -> StoreSnapshot:
        async with self._lock:
            try:
                revision, users, usage = await self._run(self._load_sync)
                pending, acked = await self._run(self._load_harvests_sync)
            except sqlite3.Error as exc:
                raise StoreError(f"reading {self.path}: {exc}") from None
            self.revision = revision
            self._stored = usage
            self._harvests.restore(pending, acked)
        if self._flusher is None:
            self._flusher = spawn(self._flush_loop(), name="flush counters to sqlite")
        return StoreSnapshot(revision, users)

    def _load_sync(self) -> tuple[int, dict[str, User], dict[str, Usage]]:
        db = self._conn()
        row = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        users: dict[str, User] = {}
        usage: dict[str, Usage] = {}
        limits_seen: dict[tuple[int, ...], UserLimits] = {}
        for row_ in db.execute(_LOAD):
            path, host, port, *limits, up, down, used, total, seen, mux = row_
            key = tuple(limits)
            user_limits = limits_seen.get(key)
            if user_limits is None:  # panels sell a handful of plans: share them
                user_limits = limits_seen[key] = UserLimits(*key) if any(key) else NO_LIMITS
            users[path] = User(Destination(host, port), user_limits, _mux(mux))
            usage[path] = Usage(up, down, used, total, seen)
        return (row[0] if row else 0), users, usage

    def _load_harvests_sync(self) -> tuple[Harvest | None, list[str]]:
        db = self._conn()
        acked = [i for (i,) in db.execute("SELECT id FROM harvests WHERE acked = 1 ORDER BY seq")]
        row = db.execute(
            "SELECT id, taken_at, more FROM harvests WHERE acked = 0 ORDER BY seq LIMIT 1"
        ).fetchone()
        if row is None:
            return None, acked
        harvest_id, taken_at, more = row
        rows = db.execute(
            "SELECT path, bytes_up, bytes_down, total_tunnels FROM harvest_users WHERE id = ?",
            (harvest_id,),
        )
        users = tuple(sorted((path, Share(up, down, total)) for path, up, down, total in rows))
        return Harvest(harvest_id, taken_at, users, bool(more)), acked

    async def commit(self, command: Command) -> int:
        return await self._to_the_end(self._commit(command))

    async def _commit(self, command: Command) -> int:
        async with self._lock:
            revision = self.revision + 1
            drop: list[str] = []
            if command.opt is Opt.RESET:
                drop = list(self._stored)
            elif command.opt is Opt.DELETE:
                drop = [p for p in command.paths if p in self._stored]
            elif command.opt is Opt.REPLACE:
                keep = {e.path for e in command.entries}
                drop = [p for p in self._stored if p not in keep]
            try:
                paths, fresh, quotas = await self._run(self._commit_sync, command, drop, revision)
            except sqlite3.Error as exc:
                raise StoreError(f"writing {self.path}: {exc}") from None
            self.revision = revision
            stored, pending = self._stored, self._pending
            for path in drop:
                stored.pop(path, None)
                pending.pop(path, None)
            # A new user's counters start at zero: one loop of C for 40,000 entries.
            collections.deque(map(stored.setdefault, paths, fresh), maxlen=0)
            for path, quota_used in quotas:
                stored[path].quota_used = quota_used
                delta = pending.get(path)
                if delta is not None:
                    delta.quota_used = 0  # the panel's value starts a new period
            return revision

    def _commit_sync(
        self, command: Command, drop: list[str], revision: int
    ) -> tuple[list[str], list[Usage], list[tuple[str, int]]]:
        """The transaction; then, made here rather than on the event loop while
        it waits, each entry's path, zeroed counters for it (kept if it is a new
        user) and (path, quota_used) of the entries that set it."""
        entries = command.entries
        paths = list(map(_PATH, entries))
        fresh = [Usage() for _ in entries]
        quotas: list[tuple[str, int]] = []
        if not all(map(is_, map(_QUOTA_USED, entries), repeat(None))):  # some set quota_used
            quotas = [(e.path, e.quota_used) for e in entries if e.quota_used is not None]
        db = self._conn()
        with _transaction(db):
            if command.opt is Opt.RESET:
                db.execute("DELETE FROM users")
            elif drop:
                db.executemany("DELETE FROM users WHERE path = ?", ((p,) for p in drop))
            if command.entries:
                _upsert(db, command, self._json_each)
                db.executemany(
                    "UPDATE users SET quota_used = ? WHERE path = ?",
                    ((quota_used, path) for path, quota_used in quotas),
                )
            db.execute(_SET_REVISION, (revision,))
        return paths, fresh, quotas

    async def add_usage(self, deltas: dict[str, Usage]) -> None:
        stored, pending = self._stored, self._pending
        for path, delta in deltas.items():
            if path not in stored:
                continue
            mine = pending.get(path)
            if mine is None:
                pending[path] = delta.copy()
            else:
                mine.add(delta)

    async def read_usage(self, paths: Iterable[str] | None, reset: bool) -> dict[str, Usage]:
        if not reset:
            return self._current(self._stored if paths is None else paths)
        return await self._to_the_end(self._read_and_reset(paths))

    async def _read_and_reset(self, paths: Iterable[str] | None) -> dict[str, Usage]:
        async with self._lock:
            out = self._current(self._stored if paths is None else paths)
            taken = {p: self._pending[p].copy() for p in out if p in self._pending}
            try:
                await self._run(self._reset_sync, list(out), taken)
            except sqlite3.Error as exc:
                raise StoreError(f"writing {self.path}: {exc}") from None
            self._zeroed(out, taken)
            return out

    def _zeroed(self, read: dict[str, Usage], taken: dict[str, Usage]) -> None:
        """After a reset's or harvest's commit: the file's rows hold zero
        bytes and tunnels, and the buffered deltas that `read` included
        (`taken`) are in the file; what arrived meanwhile stays buffered."""
        for path, now in read.items():
            counters = self._stored.get(path)
            if counters is None:
                continue
            counters.bytes_up = counters.bytes_down = counters.total_tunnels = 0
            counters.quota_used = now.quota_used
            counters.last_seen = now.last_seen
            delta = taken.get(path)
            left = self._pending.get(path)
            if delta is not None and left is not None:  # keep what came in meanwhile
                left.bytes_up -= delta.bytes_up
                left.bytes_down -= delta.bytes_down
                left.quota_used -= delta.quota_used
                left.total_tunnels -= delta.total_tunnels

    def _reset_sync(self, paths: list[str], taken: dict[str, Usage]) -> None:
        db = self._conn()
        with _transaction(db):
            _reset_rows(db, paths, taken)

    # -- harvests (docs/protocol.md §6, harvests) --------------------------------------------

    async def harvest(
        self,
        harvest_id: str,
        paths: Sequence[str] | None,
        now: float,
        bounds: HarvestBounds,
    ) -> HarvestOutcome:
        return await self._to_the_end(self._harvest(harvest_id, paths, now, bounds))

    async def _harvest(
        self, harvest_id: str, paths: Sequence[str] | None, now: float, bounds: HarvestBounds
    ) -> HarvestOutcome:
        async with self._lock:  # no flush in between: _flushing is empty
            book = self._harvests
            book.kept = bounds.acked_kept
            verdict = book.verdict(harvest_id)
            if verdict is not None:
                return verdict
            current = self._current(self._stored if paths is None else paths)
            users, more = pick(current, None, bounds)
            harvest = Harvest(harvest_id, now, users, more)
            read = {path: current[path] for path, _ in users}
            taken = {p: self._pending[p].copy() for p in read if p in self._pending}
            try:
                await self._run(self._harvest_sync, harvest, taken)
            except sqlite3.Error as exc:
                raise StoreError(f"writing {self.path}: {exc}") from None
            self._zeroed(read, taken)
            book.begin(harvest)
            return Taken(harvest, repeat=False)

    def _harvest_sync(self, harvest: Harvest, taken: dict[str, Usage]) -> None:
        db = self._conn()
        with _transaction(db):
            (seq,) = db.execute(_NEXT_SEQ).fetchone()
            db.execute(
                "INSERT INTO harvests (id, seq, acked, taken_at, more) VALUES (?, ?, 0, ?, ?)",
                (harvest.harvest_id, seq, harvest.taken_at, int(harvest.more)),
            )
            db.executemany(
                "INSERT INTO harvest_users (id, path, bytes_up, bytes_down, total_tunnels)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    (harvest.harvest_id, path, s.bytes_up, s.bytes_down, s.total_tunnels)
                    for path, s in harvest.users
                ),
            )
            _reset_rows(db, [path for path, _ in harvest.users], taken)

    async def ack_harvest(self, harvest_id: str, bounds: HarvestBounds) -> Acked:
        return await self._to_the_end(self._ack(harvest_id, bounds))

    async def _ack(self, harvest_id: str, bounds: HarvestBounds) -> Acked:
        async with self._lock:
            book = self._harvests
            book.kept = bounds.acked_kept
            state = book.ack_state(harvest_id)
            if state is AckState.ACKED:
                try:
                    await self._run(self._ack_sync, harvest_id, bounds.acked_kept)
                except sqlite3.Error as exc:
                    raise StoreError(f"writing {self.path}: {exc}") from None
                book.acked(harvest_id)
            return book.outcome(state)

    def _ack_sync(self, harvest_id: str, kept: int) -> None:
        db = self._conn()
        with _transaction(db):
            (seq,) = db.execute(_NEXT_SEQ).fetchone()
            db.execute("UPDATE harvests SET acked = 1, seq = ? WHERE id = ?", (seq, harvest_id))
            db.execute("DELETE FROM harvest_users WHERE id = ?", (harvest_id,))
            db.execute(_FORGET_ACKED, (kept,))

    async def pending_harvest(self) -> Harvest | None:
        return self._harvests.pending

    def _current(self, paths: Iterable[str]) -> dict[str, Usage]:
        """Committed counters plus what is on its way to the file."""
        stored, flushing, pending = self._stored, self._flushing, self._pending
        out: dict[str, Usage] = {}
        for path in paths:
            counters = stored.get(path)
            if counters is None:
                continue
            total = counters.copy()
            for deltas in (flushing, pending):
                delta = deltas.get(path)
                if delta is not None:
                    total.add(delta)
            out[path] = total
        return out

    def watch(self, on_remote: RemoteChange, served: Served) -> None:
        pass  # one node: nobody else writes this file

    def shared_count(self) -> SharedCount | None:
        return None  # one server per file: its own count is the whole count

    def reachable(self) -> bool:
        """The database is open (a failed write is the controller's 503, per change)."""
        return self._db is not None

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        try:
            await self.flush()
        except StoreError as exc:
            log.error("counters not saved at shutdown: %s", exc)
        with contextlib.suppress(sqlite3.Error):
            await self._run(self._close_sync)
        self._executor.shutdown(wait=True)

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        self._release()

    # -- counters ---------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreError as exc:
                log.warning("counters kept in memory, will retry: %s", exc)

    async def flush(self) -> None:
        """Write the buffered counter deltas in one transaction."""
        await self._to_the_end(self._flush())

    async def _flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            batch = self._flushing = self._pending
            self._pending = {}
            try:
                await self._run(self._flush_sync, batch)
            except sqlite3.Error as exc:
                for path, delta in batch.items():  # give them back, for the next try
                    if path in self._stored:
                        self._pending.setdefault(path, Usage()).add(delta)
                raise StoreError(f"writing {self.path}: {exc}") from None
            finally:
                self._flushing = {}
            for path, delta in batch.items():
                counters = self._stored.get(path)
                if counters is not None:
                    counters.add(delta)

    def _flush_sync(self, batch: dict[str, Usage]) -> None:
        db = self._conn()
        with _transaction(db):
            db.executemany(
                _ADD_USAGE,
                (
                    (d.bytes_up, d.bytes_down, d.quota_used, d.total_tunnels, d.last_seen, p)
                    for p, d in batch.items()
                ),
            )

    async def _to_the_end(self, operation: Coroutine[Any, Any, T]) -> T:
        """Run a write to its end even if our caller is cancelled (a controller
        client hanging up): the thread would finish the transaction anyway, and
        the counters in memory must follow the file."""

        async def outcome() -> tuple[T | None, Exception | None]:
            try:
                return await operation, None
            except Exception as exc:  # handed to the caller, not logged as a task failure
                return None, exc

        result, error = await asyncio.shield(spawn(outcome(), name="sqlite store write"))
        if error is not None:
            raise error
        return cast(T, result)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the database is closed")
        return self._db


def _prepare(db: sqlite3.Connection) -> None:
    """Check (or create) the schema; settings that make a commit durable."""
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise ConfigError(f"cannot use write-ahead logging (journal_mode is {mode})")
    db.execute("PRAGMA synchronous = FULL")
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        with _transaction(db):
            _run_script(db, _SCHEMA)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT INTO meta (key, value) VALUES ('revision', 0)")
        _add_harvest_tables(db)
        return
    if not {"users", "meta"} <= tables:
        raise ConfigError(f"{NOT_OURS} (it has other tables: {', '.join(sorted(tables))})")
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    if row is None:
        raise ConfigError(f"{NOT_OURS} (no schema version)")
    if row[0] == 1:
        with _transaction(db):
            db.execute(_MIGRATE_1)
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        log.info("store: users table of schema version 1 migrated to %d", SCHEMA_VERSION)
    elif row[0] != SCHEMA_VERSION:
        raise ConfigError(
            f"schema version {row[0]}, this server reads {SCHEMA_VERSION} (a newer mtt wrote it?)"
        )
    _add_harvest_tables(db)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (BEGIN IMMEDIATE); rolled back if
    anything raises, the error then going on to the caller."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _has_json_each(db: sqlite3.Connection) -> bool:
    """json_each, and one that gives an object's keys unescaped (_UPSERT_PORTS
    takes the paths from them)."""
    key = '/"\\\u00e9'  # a quote, a backslash and a non-ASCII letter, each escaped in JSON
    try:
        row = db.execute("SELECT key FROM json_each(?)", (json.dumps({key: 1}),)).fetchone()
    except sqlite3.OperationalError:  # built without JSON (SQLITE_OMIT_JSON, or before 3.38)
        return False
    return bool(row == (key,))


def _upsert(db: sqlite3.Connection, command: Command, json_each: bool) -> None:
    """Write the users of these entries (a path given twice ends as its last
    entry says). With json_each: each run of two or more entries sharing one
    User (mtt.core.commands.runs) as one statement with the paths as a JSON
    array, the single users of no limits and no mux of their own as one
    statement per host with {path: port} as a JSON object, the rest row by
    row. Each path is then written once, so the order of the statements does
    not matter."""
    entries: Sequence[Entry] = command.entries
    if not json_each:
        _upsert_rows(db, entries)
        return
    if _upsert_one_host(db, command):
        return
    last = dict(zip(map(_PATH, entries), entries, strict=True))
    if len(last) != len(entries):  # a path twice: only its last entry counts
        entries = list(last.values())
    ports: dict[str, dict[str, int]] = {}  # host -> {path: port}
    rows: list[tuple[Any, ...]] = []
    for start, end in runs(entries):
        entry = entries[start]
        user = entry.user
        if end - start > 1:
            paths = json.dumps([e.path for e in entries[start:end]], ensure_ascii=False)
            db.execute(_UPSERT_RUN, (*_row("", user)[1:], paths))
        elif user.limits is NO_LIMITS and user.mux is None:
            dst = user.dst
            of_host = ports.get(dst.host)
            if of_host is None:
                of_host = ports[dst.host] = {}
            of_host[entry.path] = dst.port
        else:
            rows.append(_row(entry.path, user))
    for host, of_host in ports.items():
        db.execute(_UPSERT_PORTS, (host, json.dumps(of_host, ensure_ascii=False)))
    if rows:
        db.executemany(_UPSERT, rows)


def _upsert_one_host(db: sqlite3.Connection, command: Command) -> bool:
    """A port each on one host (mtt.core.commands.plain_columns): the columns
    taken whole, one statement; False, nothing written, for any other entries."""
    plain = command.plain()
    if plain is None or len(set(plain[1])) != 1:
        return False
    paths, hosts, ports = plain
    of_host = dict(zip(paths, ports, strict=True))  # a path given twice: its last port
    db.execute(_UPSERT_PORTS, (hosts[0], json.dumps(of_host, ensure_ascii=False)))
    return True


def _upsert_rows(db: sqlite3.Connection, entries: Sequence[Entry]) -> None:
    """Without json_each: row by row in order, three values a row for a user
    of no limits and no mux of its own, nine for the others."""
    rows: list[tuple[Any, ...]] = []
    statement = _UPSERT_PLAIN  # of the rows not yet written
    for entry in entries:
        user = entry.user
        if user.limits is NO_LIMITS and user.mux is None:
            row, kind = (entry.path, user.dst.host, user.dst.port), _UPSERT_PLAIN
        else:
            row, kind = _row(entry.path, user), _UPSERT
        if kind is not statement and rows:
            db.executemany(statement, rows)
            rows = []
        statement = kind
        rows.append(row)
    if rows:
        db.executemany(statement, rows)


def _add_harvest_tables(db: sqlite3.Connection) -> None:
    """Harvest tables, in a file of ours that has none yet (from an earlier version)."""
    with _transaction(db):
        _run_script(db, _HARVEST_SCHEMA)


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Each ;-separated statement of a schema, inside the caller's transaction
    (executescript would commit it first)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _reset_rows(db: sqlite3.Connection, paths: list[str], taken: dict[str, Usage]) -> None:
    """Zero bytes and tunnels of these rows; the buffered deltas the caller
    read (taken) land in quota_used and last_seen, in the same transaction."""
    rows = []
    for path in paths:
        delta = taken.get(path)
        rows.append((delta.quota_used, delta.last_seen, path) if delta else (0, 0.0, path))
    db.executemany(_RESET_USAGE, rows)


def _claim(db: str) -> int:
    """Create the directory, then take the lock beside the database; its descriptor."""
    if os.path.isdir(db):
        example = os.path.join(db, "users.db")
        raise ConfigError(f"-db {db} is a directory; name a file in it, e.g. -db {example}")
    directory = Path(db).parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = _file_in_the_way(directory)
        raise ConfigError(f"-db {db}: {in_the_way} is a file, not a directory") from None
    except OSError as exc:
        what = f"cannot create the directory {exc.filename}"
        raise _access_problem(db, exc.errno, what) from None
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False  # opening the lock file says what is wrong
    if read_only:
        raise _access_problem(db, errno.EROFS, f"cannot write {directory}")
    lock = db + LOCK_SUFFIX
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited by the workers
    except OSError as exc:
        raise _access_problem(db, exc.errno, f"cannot write {lock}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _pid_in(fd)
        os.close(fd)
        raise ConfigError(
            f"-db {db} is in use by another mtt-mu-server{holder}; give each instance its own -db"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"-db {db}: cannot lock {lock}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # the pid is for the message above only
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _pid_in(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _file_in_the_way(directory: Path) -> Path:
    """The first part of the path that exists and is not a directory."""
    for part in (*reversed(directory.parents), directory):
        if part.exists() and not part.is_dir():
            return part
    return directory


def _check_writable(db: str) -> None:
    """What SQLite needs: the file (created 0600, not umask 644), its -wal and
    -shm, and the directory to create them in, all writable by us."""
    for path, create in ((db, True), (db + "-wal", False), (db + "-shm", False)):
        try:
            flags = os.O_RDWR | (os.O_CREAT if create else 0)
            os.close(os.open(path, flags, 0o600))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _access_problem(db, exc.errno, f"cannot write {path}") from None
    directory = os.path.dirname(db) or "."
    if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        raise _access_problem(db, errno.EACCES, f"cannot create files in {directory}")


def _access_problem(db: str, err: int | None, what: str) -> ConfigError:
    """An operating system's refusal (an errno), as what is wrong and what to do."""
    if err == errno.EROFS:
        return ConfigError(
            f"-db {db}: read-only filesystem ({what}); the server writes every change there"
            " and cannot start without it: remount it read-write or give another -db"
            " (-db memory keeps the users in memory only)"
        )
    if err in (errno.EACCES, errno.EPERM):
        return ConfigError(
            f"-db {db}: permission denied ({what} as uid {os.geteuid()}); the server must"
            " read and write the file and create files in its directory"
        )
    reason = os.strerror(err) if err else "unknown error"
    return ConfigError(f"-db {db}: {reason[:1].lower()}{reason[1:]} ({what})")


def _sqlite_problem(exc: sqlite3.Error) -> str:
    """Only a file SQLite cannot read as a database is someone else's."""
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF  # the primary result code
    if code == sqlite3.SQLITE_NOTADB:
        return f"{NOT_OURS} ({exc})"
    if code == sqlite3.SQLITE_CORRUPT:
        return f"damaged database ({exc}): restore a backup, or move it away to start empty"
    return f"cannot use it: {exc}"


def _row(path: str, user: User) -> tuple[Any, ...]:
    limits = user.limits
    return (
        path,
        user.dst.host,
        user.dst.port,
        limits.rate,
        limits.max_tunnels,
        limits.max_ips,
        limits.quota,
        limits.expire,
        user.mux.value if user.mux is not None else "",
    )


def _mux(value: str) -> MuxProtocol | None:
    """A user's mux column: '' is the server's -mux-protocol; anything we cannot
    read (a file edited by hand) is too, with a line saying so."""
    if not value:
        return None
    try:
        return MuxProtocol(value)
    except ValueError:
        log.warning("store: unknown mux %r of a user, using the server's -mux-protocol", value)
        return None
