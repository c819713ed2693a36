"""Users shared by several nodes through Redis (-store redis://...).

Layout, all under PREFIX (one Redis database may hold one mtt deployment):

    mtt:users     hash  path -> compact JSON [host, port, rate, max_tunnels, max_ips, quota, expire]
    mtt:revision  int   bumped by every accepted change
    mtt:up, mtt:down, mtt:quota, mtt:tunnels, mtt:seen
                  hashes path -> counter (absent = 0); only users have entries
    mtt:changes   channel: "<revision> <command wire JSON>" after every change
                  ("<revision> " alone when the command is too big to publish)

Every change is one Lua script (apply, INCR, PUBLISH), so no node ever sees a
half-applied change and revisions have no holes. Each node keeps serving the
table it last had when Redis is down; controller writes then fail (res 2).

What is shared: the table, and the counters (bytes, tunnels, quota_used, last
seen) summed over every node. What is not: max_tunnels, max_ips and rate are
enforced by each node for its own tunnels, so N nodes allow up to N times them.
Quota is checked against the shared quota_used, which lags by up to the flush
interval (plus the 1 s counter collection) on each node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mtt.address import Destination
from mtt.controller.api import Command, Opt
from mtt.errors import ConfigError, StoreError
from mtt.server.users import LIMIT_FIELDS, NO_LIMITS, User, UserLimits
from mtt.store.base import RemoteChange, StoreSnapshot, Usage
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.store")

PREFIX = "mtt:"
USERS = PREFIX + "users"
REVISION = PREFIX + "revision"
CHANNEL = PREFIX + "changes"
# Counter hashes, in Usage field order except that last_seen keeps a maximum.
UP, DOWN, QUOTA, TUNNELS, SEEN = (PREFIX + n for n in ("up", "down", "quota", "tunnels", "seen"))
COUNTERS = (UP, DOWN, QUOTA, TUNNELS, SEEN)

# Bigger commands are announced by revision only; the other nodes reload the
# table (one HGETALL) rather than every subscriber buffering megabytes.
MAX_PUBLISHED = 1 << 20
FLUSH_CHUNK = 2000  # users per script call when counters are flushed
READ_CHUNK = 1000  # Lua's unpack() stops near 8000 values
SOCKET_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # resubscription backoff, seconds

# KEYS: users, revision, up, down, quota, tunnels, seen.
# ARGV: the command as published, its operations as JSON (strings only, so
# no number goes through Lua's doubles), the channel.
_COMMIT = """
local ops = cjson.decode(ARGV[2])
local op = ops.op
local users = KEYS[1]
if op == 3 then
  redis.call('DEL', users, KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
elseif op == 2 then
  for _, path in ipairs(ops.del) do
    redis.call('HDEL', users, path)
    for i = 3, 7 do redis.call('HDEL', KEYS[i], path) end
  end
else
  if op == 4 then
    local keep = {}
    for _, e in ipairs(ops.set) do keep[e[1]] = true end
    redis.call('DEL', users)
    for i = 3, 7 do
      for _, path in ipairs(redis.call('HKEYS', KEYS[i])) do
        if not keep[path] then redis.call('HDEL', KEYS[i], path) end
      end
    end
  end
  for _, e in ipairs(ops.set) do
    redis.call('HSET', users, e[1], e[2])
    if e[3] ~= '' then redis.call('HSET', KEYS[5], e[1], e[3]) end
  end
end
local rev = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], rev .. ' ' .. ARGV[1])
return rev
"""

# KEYS: users, up, down, quota, tunnels, seen. ARGV[1]: JSON
# [[path, up, down, quota, tunnels, seen], ...] as strings. Users that no
# longer exist are skipped, so a late flush cannot bring back their counters.
_ADD_USAGE = """
for _, e in ipairs(cjson.decode(ARGV[1])) do
  local path = e[1]
  if redis.call('HEXISTS', KEYS[1], path) == 1 then
    for i = 2, 5 do
      if e[i] ~= '0' then redis.call('HINCRBY', KEYS[i], path, e[i]) end
    end
    if e[6] ~= '0' then
      local seen = tonumber(redis.call('HGET', KEYS[6], path) or '0')
      if tonumber(e[6]) > seen then redis.call('HSET', KEYS[6], path, e[6]) end
    end
  end
end
return 0
"""

# KEYS: users, up, down, quota, tunnels, seen. ARGV[1]: '1' to reset,
# ARGV[2]: JSON list of paths (those that are not users are skipped), or '*'
# for every user. Returns
# {paths, up, down, quota, tunnels, seen}, aligned, nil where absent; with
# reset, up, down and tunnels of those paths are zeroed in the same step.
_READ_USAGE = """
local paths
if ARGV[2] == '*' then
  paths = redis.call('HKEYS', KEYS[1])
else
  paths = {}
  for _, path in ipairs(cjson.decode(ARGV[2])) do
    if redis.call('HEXISTS', KEYS[1], path) == 1 then paths[#paths + 1] = path end
  end
end
local out = {paths, {}, {}, {}, {}, {}}
local n = #paths
for first = 1, n, 1000 do
  local last = math.min(first + 999, n)
  for i = 2, 6 do
    local values = redis.call('HMGET', KEYS[i], unpack(paths, first, last))
    for j = 1, last - first + 1 do out[i][first + j - 1] = values[j] end
  end
  if ARGV[1] == '1' then
    for _, i in ipairs({2, 3, 5}) do
      redis.call('HDEL', KEYS[i], unpack(paths, first, last))
    end
  end
end
return out
"""


class RedisStore:
    """The shared table and counters; counter deltas are batched in memory."""

    def __init__(self, url: str, flush_interval: float) -> None:
        try:
            self._redis: Redis = Redis.from_url(
                url,
                socket_timeout=SOCKET_TIMEOUT,
                socket_connect_timeout=SOCKET_TIMEOUT,
                socket_keepalive=True,
                health_check_interval=15,
                # Fail fast: a controller write gets res 2 now, not after backoff;
                # the flusher and the subscription retry on their own schedule.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"-store: {exc}") from None  # the URL may hold a password
        self.flush_interval = flush_interval
        self._commit = self._redis.register_script(_COMMIT)
        self._add_usage = self._redis.register_script(_ADD_USAGE)
        self._read_usage = self._redis.register_script(_READ_USAGE)
        self._pending: dict[str, Usage] = {}  # this node's deltas not yet in Redis
        self._usage_lock = asyncio.Lock()  # a flush and a read never interleave
        self._loaded_revision = 0
        self._flusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._flush_failing = False

    # -- the table ---------------------------------------------------------------------

    async def load(self) -> StoreSnapshot:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(USERS)
                pipe.get(REVISION)
                raw, revision = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        users = {path.decode(): decode_user(value) for path, value in raw.items()}
        self._loaded_revision = int(revision or 0)
        if self._flusher is None:
            self._flusher = spawn(self._flush_loop(), name="flush counters to Redis")
        return StoreSnapshot(self._loaded_revision, users)

    async def commit(self, command: Command) -> int:
        wire = json.dumps(command.to_wire(), separators=(",", ":"))
        published = wire if len(wire) <= MAX_PUBLISHED else ""
        ops: dict[str, Any] = {"op": int(command.opt)}
        if command.opt is Opt.DELETE:
            ops["del"] = list(command.paths)
        elif command.opt in (Opt.ADD, Opt.REPLACE):
            ops["set"] = [
                [e.path, encode_user(e.user), "" if e.quota_used is None else str(e.quota_used)]
                for e in command.entries
            ]
        args = [published, _json(ops), CHANNEL]
        try:
            revision = await self._commit(keys=[USERS, REVISION, *COUNTERS], args=args)
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return int(revision)

    # -- counters ----------------------------------------------------------------------

    async def add_usage(self, deltas: dict[str, Usage]) -> None:
        """Only buffered here: the flusher writes every flush_interval."""
        _merge(self._pending, deltas)

    async def read_usage(self, paths: Iterable[str] | None, reset: bool) -> dict[str, Usage]:
        selected = "*" if paths is None else _json(list(paths))
        async with self._usage_lock:
            try:
                result = await self._read_usage(
                    keys=[USERS, *COUNTERS], args=["1" if reset else "0", selected]
                )
            except (RedisError, OSError) as exc:
                raise StoreError(f"Redis: {exc}") from None
            names, up, down, quota, tunnels, seen = result
            out: dict[str, Usage] = {}
            pending = self._pending
            for i, raw_path in enumerate(names):
                path = raw_path.decode() if isinstance(raw_path, bytes) else raw_path
                usage = Usage(
                    _int(up, i), _int(down, i), _int(quota, i), _int(tunnels, i), _int(seen, i)
                )
                mine = pending.get(path)
                if mine is not None:
                    usage.add(mine)
                    if reset:  # what this node counted is in this period's totals now
                        mine.bytes_up = mine.bytes_down = mine.total_tunnels = 0
                out[path] = usage
            return out

    async def flush(self) -> None:
        """Write this node's deltas; on failure keep them for the next try."""
        async with self._usage_lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return
            rows = [
                [
                    path,
                    str(d.bytes_up),
                    str(d.bytes_down),
                    str(d.quota_used),
                    str(d.total_tunnels),
                    str(int(d.last_seen)),
                ]
                for path, d in batch.items()
            ]
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    for start in range(0, len(rows), FLUSH_CHUNK):
                        chunk = _json(rows[start : start + FLUSH_CHUNK])
                        await self._add_usage(keys=[USERS, *COUNTERS], args=[chunk], client=pipe)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                _merge(batch, self._pending)  # newer deltas on top of the old
                self._pending = batch
                raise StoreError(f"Redis: {exc}") from None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except StoreError as exc:
                if not self._flush_failing:
                    log.warning("store: counters kept in memory until Redis is back: %s", exc)
                self._flush_failing = True
                continue
            if self._flush_failing:
                log.info("store: counters written to Redis again")
            self._flush_failing = False

    # -- other nodes' changes ----------------------------------------------------------

    def watch(self, on_remote: RemoteChange) -> None:
        if self._watcher is None:
            self._watcher = spawn(self._watch(on_remote), name="Redis subscription")

    async def _watch(self, on_remote: RemoteChange) -> None:
        """Follow the change channel; after any break, resubscribe and resync."""
        delay = RETRY_MIN
        broken = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                # Subscribed before reading the revision: nothing falls in between.
                revision = int(await self._redis.get(REVISION) or 0)
                if broken:
                    log.info("store: Redis is back; reloading the users (revision %d)", revision)
                    on_remote(revision, None)
                elif revision != self._loaded_revision:
                    on_remote(revision, None)  # changed between load() and subscribing
                broken = False
                delay = RETRY_MIN
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"], on_remote)
            except (RedisError, OSError) as exc:
                if not broken:
                    log.warning(
                        "store: lost the Redis subscription (%s); serving the last table, retrying",
                        exc or type(exc).__name__,
                    )
                broken = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    @staticmethod
    def _deliver(data: bytes, on_remote: RemoteChange) -> None:
        head, _, body = data.partition(b" ")
        try:
            revision = int(head)
            command = Command.from_wire(json.loads(body)) if body else None
        except (ValueError, KeyError, TypeError) as exc:
            log.error("store: unreadable change on %s (%s); reloading", CHANNEL, exc)
            on_remote(0, None)
            return
        on_remote(revision, command)

    async def close(self) -> None:
        for task in (self._watcher, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self.flush()
        except StoreError as exc:
            users = len(self._pending)
            log.error("store: counters of %d users not written: %s", users, exc)
        await self._redis.aclose()


def encode_user(user: User) -> str:
    limits = [getattr(user.limits, name) for name in LIMIT_FIELDS]
    return json.dumps([user.dst.host, user.dst.port, *limits], separators=(",", ":"))


def decode_user(raw: bytes) -> User:
    host, port, *limits = json.loads(raw)
    return User(Destination(host, port), UserLimits(*limits) if any(limits) else NO_LIMITS)


def _json(value: Any) -> str:
    """For the scripts: paths as raw UTF-8, not escapes for Lua's cjson to undo."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _merge(into: dict[str, Usage], deltas: dict[str, Usage]) -> None:
    """One entry per user however long Redis is away."""
    for path, delta in deltas.items():
        mine = into.get(path)
        if mine is None:
            into[path] = delta.copy()
        else:
            mine.add(delta)


def _int(values: list[bytes | None], index: int) -> int:
    value = values[index]
    return int(value) if value is not None else 0
