"""Users shared by several nodes through Redis (-store redis://...).

Layout, all under PREFIX (one Redis database may hold one mtt deployment):

    mtt:users     hash  path -> compact JSON [host, port, rate, max_tunnels, max_ips, quota, expire]
                        and the user's "mux" after them when it has one
    mtt:revision  int   bumped by every accepted change
    mtt:epoch     str   random; replaced whenever mtt:revision or mtt:epoch is found missing
    mtt:up, mtt:down, mtt:quota, mtt:tunnels, mtt:seen
                  hashes path -> counter (absent = 0); only users have entries
    mtt:changes   channel: "<revision> <epoch> <command wire JSON>" after every change
                  ("<revision> <epoch> " alone when the command is too big to publish)
    mtt:harvest   hash  id, taken_at, more: the pending harvest, absent when none
    mtt:harvest:users   hash  path -> "<bytes_up> <bytes_down> <total_tunnels>" of it
    mtt:harvest:acked   sorted set  ids of the last acknowledged harvests (score: ack time)
    mtt:adm:<path>, mtt:admip:<path>   the leases of tunnels admitted against
                  max_tunnels and max_ips on every node (mtt.store.redis_limits)

Every change is one Lua script (apply, INCR, PUBLISH), so no node ever sees a
half-applied change and revisions have no holes. Each node keeps serving the
table it last had when Redis is down; controller writes then fail (res 2).

Redis is the truth, whatever happens to it. A revision counts within an epoch:
after FLUSHALL, FLUSHDB or an eviction the keys are gone, the next load or
change starts a new epoch (and may restart the revision), and a node that
hears of another epoch reloads instead of comparing revisions. Besides
pub/sub, every Limits.redis_check_interval each node compares Redis's epoch, revision and
number of users with its own and reloads on any difference, so a lost
message, a flush or an eviction is repaired within redis_check_interval + redis_settle.

What is shared: the table, the counters (bytes, tunnels, quota_used, last
seen) summed over every node, and the open tunnels of users with max_tunnels
or max_ips (mtt.store.redis_limits). What is not: rate is enforced by each
node for its own tunnels, so N nodes allow up to N times it.
Quota is checked against the shared quota_used, which lags by up to the flush
interval (plus the 1 s counter collection) on each node.

A harvest is global, as the counters are: one Lua script moves the shared
counters of the picked users into mtt:harvest:users, after the node taking it
has written its own buffered deltas. Other nodes' deltas not yet flushed stay
theirs and land in the live counters, for the next harvest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from mtt.address import Destination
from mtt.config import Limits
from mtt.core.commands import Command, Opt
from mtt.core.harvest import (
    ENTRY_OVERHEAD,
    Acked,
    AckState,
    Harvest,
    HarvestBounds,
    HarvestOutcome,
    Refused,
    Share,
    Taken,
)
from mtt.core.usage import Usage
from mtt.core.users import LIMIT_FIELDS, NO_LIMITS, MuxProtocol, User, UserLimits
from mtt.errors import ConfigError, StoreError
from mtt.store.base import RemoteChange, Served, SharedCount, StoreSnapshot
from mtt.store.redis_limits import RedisCount
from mtt.transport.tasks import spawn

log = logging.getLogger("mtt.store")

PREFIX = "mtt:"
USERS = PREFIX + "users"
REVISION = PREFIX + "revision"
EPOCH = PREFIX + "epoch"
CHANNEL = PREFIX + "changes"
# Counter hashes, in Usage field order except that last_seen keeps a maximum.
UP, DOWN, QUOTA, TUNNELS, SEEN = (PREFIX + n for n in ("up", "down", "quota", "tunnels", "seen"))
COUNTERS = (UP, DOWN, QUOTA, TUNNELS, SEEN)
HARVEST = PREFIX + "harvest"
HARVEST_USERS = HARVEST + ":users"
HARVEST_ACKED = HARVEST + ":acked"

_LIMITS = Limits()

# Both keys exist after this, and a new epoch begins if either was missing:
# a revision counter that restarts must not be taken for the old one.
# KEYS: revision, epoch. ARGV[1]: a fresh epoch, used if one is needed.
_ENSURE_EPOCH = """
local epoch = redis.call('GET', KEYS[2])
if not epoch or redis.call('EXISTS', KEYS[1]) == 0 then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
  if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], '0') end
end
"""

_LOAD_EPOCH = _ENSURE_EPOCH + "return epoch\n"

# KEYS: users, revision, up, down, quota, tunnels, seen, epoch.
# ARGV: the command as published, its operations as JSON (strings only, so
# no number goes through Lua's doubles), the channel, a fresh epoch.
# Starts a new epoch where _ENSURE_EPOCH would (INCR then creates the revision).
# Returns {revision, epoch}.
_COMMIT = """
local epoch = redis.call('GET', KEYS[8])
if not epoch or redis.call('EXISTS', KEYS[2]) == 0 then
  epoch = ARGV[4]
  redis.call('SET', KEYS[8], epoch)
end
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
redis.call('PUBLISH', ARGV[3], rev .. ' ' .. epoch .. ' ' .. ARGV[1])
return {rev, epoch}
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
# for every user, ARGV[3]: paths per HMGET and HDEL. Returns
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
local chunk = tonumber(ARGV[3])
for first = 1, n, chunk do
  local last = math.min(first + chunk - 1, n)
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


# The pending harvest as a script returns it: {id, taken_at, more, {path, share, ...}}.
_STORED_HARVEST = """
local function stored()
  local h = redis.call('HMGET', KEYS[5], 'id', 'taken_at', 'more')
  return {h[1], h[2], h[3], redis.call('HGETALL', KEYS[6])}
end
"""

# KEYS: users, up, down, tunnels, harvest, harvest users, acked ids.
# ARGV: the id, JSON paths or '*', max users, max reply bytes, bytes per
# entry besides the path, taken_at. Returns {'repeat'|'new', stored()},
# {'pending', pending id, acked before: 0|1} or {'acked'}. Counter values
# are moved as strings: no number goes through Lua's doubles.
_HARVEST = (
    _STORED_HARVEST
    + """
local pending = redis.call('HGET', KEYS[5], 'id')
if pending then
  if pending == ARGV[1] then return {'repeat', stored()} end
  local before = redis.call('ZSCORE', KEYS[7], ARGV[1]) and 1 or 0
  return {'pending', pending, before}
end
if redis.call('ZSCORE', KEYS[7], ARGV[1]) then return {'acked'} end
local paths = {}
if ARGV[2] == '*' then
  local seen = {}
  for i = 2, 4 do
    for _, path in ipairs(redis.call('HKEYS', KEYS[i])) do
      if not seen[path] then seen[path] = true; paths[#paths + 1] = path end
    end
  end
else
  paths = cjson.decode(ARGV[2])
end
table.sort(paths)
local max_users, max_bytes, overhead = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local count, size, more = 0, 0, 0
for _, path in ipairs(paths) do
  if redis.call('HEXISTS', KEYS[1], path) == 1 then
    local up = redis.call('HGET', KEYS[2], path) or '0'
    local down = redis.call('HGET', KEYS[3], path) or '0'
    local tunnels = redis.call('HGET', KEYS[4], path) or '0'
    if up ~= '0' or down ~= '0' or tunnels ~= '0' then
      local cost = overhead + #path
      if count >= max_users or (count > 0 and size + cost > max_bytes) then
        more = 1
        break
      end
      count = count + 1
      size = size + cost
      redis.call('HSET', KEYS[6], path, up .. ' ' .. down .. ' ' .. tunnels)
      for i = 2, 4 do redis.call('HDEL', KEYS[i], path) end
    end
  end
end
redis.call('HSET', KEYS[5], 'id', ARGV[1], 'taken_at', ARGV[6], 'more', more)
return {'new', stored()}
"""
)

# KEYS: harvest, harvest users, acked ids. ARGV: the id, the time, ids kept.
# Returns {state, the id pending after this}.
_ACK = """
local pending = redis.call('HGET', KEYS[1], 'id')
if pending == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
  return {'acked', ''}
end
local state = redis.call('ZSCORE', KEYS[3], ARGV[1]) and 'already_acked' or 'unknown'
return {state, pending or ''}
"""

# KEYS as _HARVEST's. Returns stored(), all nil but the users ({}) when none is pending.
_PENDING = _STORED_HARVEST + "return stored()\n"


class RedisStore:
    """The shared table and counters; counter deltas are batched in memory."""

    def __init__(self, url: str, flush_interval: float) -> None:
        try:
            self._redis: Redis = Redis.from_url(
                url,
                socket_timeout=_LIMITS.redis_socket_timeout,
                socket_connect_timeout=_LIMITS.redis_socket_timeout,
                socket_keepalive=True,
                health_check_interval=_LIMITS.redis_health_check_interval,
                # Fail fast: a controller write gets res 2 now, not after backoff;
                # the flusher and the subscription retry on their own schedule.
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as exc:
            raise ConfigError(f"-store: {exc}") from None  # the URL may hold a password
        self.flush_interval = flush_interval
        self._commit = self._redis.register_script(_COMMIT)
        self._load_epoch = self._redis.register_script(_LOAD_EPOCH)
        self._add_usage = self._redis.register_script(_ADD_USAGE)
        self._read_usage = self._redis.register_script(_READ_USAGE)
        self._harvest = self._redis.register_script(_HARVEST)
        self._ack = self._redis.register_script(_ACK)
        self._pending_harvest = self._redis.register_script(_PENDING)
        self._count = RedisCount(
            self._redis, _LIMITS.redis_socket_timeout, _LIMITS.redis_lease_chunk
        )
        self._pending: dict[str, Usage] = {}  # this node's deltas not yet in Redis
        self._usage_lock = asyncio.Lock()  # a flush and a read never interleave
        self._epoch = ""  # of the table last loaded, the one the service serves
        self._heard = 0  # the highest revision of that epoch heard of (load, commit, message)
        self._loads = 0
        self._load_failed = False  # the service still serves a table it could not reload
        self._flusher: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._flush_failing = False
        self._answered = 0.0  # loop time Redis last answered (0: never)

    def shared_count(self) -> SharedCount:
        return self._count

    def reachable(self) -> bool:
        """Redis answered within Limits.redis_ready_max_age, and the subscription
        has not failed since; the table check every redis_check_interval keeps
        this fresh while Redis is up."""
        if not self._answered:
            return False
        age = asyncio.get_running_loop().time() - self._answered
        return age <= _LIMITS.redis_ready_max_age

    def _heard_from_redis(self) -> None:
        self._answered = asyncio.get_running_loop().time()

    # -- the table ---------------------------------------------------------------------

    async def load(self) -> StoreSnapshot:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await self._load_epoch(keys=[REVISION, EPOCH], args=[_new_epoch()], client=pipe)
                pipe.hgetall(USERS)
                pipe.get(REVISION)
                raw_epoch, raw, raw_revision = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._load_failed = True  # the next check asks again
            self._answered = 0.0
            raise StoreError(f"Redis: {exc}") from None
        self._load_failed = False
        self._heard_from_redis()
        users = {path.decode(): decode_user(value) for path, value in raw.items()}
        revision = int(raw_revision or 0)
        epoch = raw_epoch.decode()
        # No await from here until the service adopts the snapshot: a check
        # never sees this epoch with the previous table.
        self._heard = max(self._heard, revision) if epoch == self._epoch else revision
        self._epoch = epoch
        self._loads += 1
        if self._flusher is None:
            self._flusher = spawn(self._flush_loop(), name="flush counters to Redis")
        return StoreSnapshot(revision, users)

    async def commit(self, command: Command) -> int:
        wire = json.dumps(command.to_wire(), separators=(",", ":"))
        published = wire if len(wire) <= _LIMITS.redis_max_published else ""
        ops: dict[str, Any] = {"op": int(command.opt)}
        if command.opt is Opt.DELETE:
            ops["del"] = list(command.paths)
        elif command.opt in (Opt.ADD, Opt.REPLACE):
            ops["set"] = [
                [e.path, encode_user(e.user), "" if e.quota_used is None else str(e.quota_used)]
                for e in command.entries
            ]
        args = [published, _json(ops), CHANNEL, _new_epoch()]
        try:
            raw_revision, raw_epoch = await self._commit(
                keys=[USERS, REVISION, *COUNTERS, EPOCH], args=args
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        self._heard_from_redis()
        revision = int(raw_revision)
        if raw_epoch.decode() == self._epoch:
            self._heard = max(self._heard, revision)
        # else a new epoch began: its message makes the service reload
        return revision

    # -- counters ----------------------------------------------------------------------

    async def add_usage(self, deltas: dict[str, Usage]) -> None:
        """Only buffered here: the flusher writes every flush_interval."""
        _merge(self._pending, deltas)

    async def read_usage(self, paths: Iterable[str] | None, reset: bool) -> dict[str, Usage]:
        selected = "*" if paths is None else _json(list(paths))
        async with self._usage_lock:
            try:
                result = await self._read_usage(
                    keys=[USERS, *COUNTERS],
                    args=["1" if reset else "0", selected, str(_LIMITS.redis_read_chunk)],
                )
            except (RedisError, OSError) as exc:
                raise StoreError(f"Redis: {exc}") from None
            self._heard_from_redis()
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
            await self._flush_locked()

    async def _flush_locked(self) -> None:
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
                size = _LIMITS.redis_flush_chunk
                for start in range(0, len(rows), size):
                    chunk = _json(rows[start : start + size])
                    await self._add_usage(keys=[USERS, *COUNTERS], args=[chunk], client=pipe)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            _merge(batch, self._pending)  # newer deltas on top of the old
            self._pending = batch
            raise StoreError(f"Redis: {exc}") from None

    # -- harvests (docs/protocol.md §6, harvests; global, like the counters) ---------------

    async def harvest(
        self,
        harvest_id: str,
        paths: Sequence[str] | None,
        now: float,
        bounds: HarvestBounds,
    ) -> HarvestOutcome:
        selected = "*" if paths is None else _json(list(dict.fromkeys(paths)))
        args: list[str | int] = [
            harvest_id,
            selected,
            bounds.max_users,
            bounds.max_reply,
            ENTRY_OVERHEAD,
            repr(now),
        ]
        async with self._usage_lock:
            try:
                # This node's buffered deltas first: what it counted is in this harvest.
                await self._flush_locked()
                result = await self._harvest(
                    keys=[USERS, UP, DOWN, TUNNELS, HARVEST, HARVEST_USERS, HARVEST_ACKED],
                    args=args,
                )
            except (RedisError, OSError) as exc:
                raise StoreError(f"Redis: {exc}") from None
        kind = _text(result[0])
        if kind == "pending":
            return Refused(_text(result[1]), acked_before=bool(result[2]))
        if kind == "acked":
            return Refused("", acked_before=True)
        harvest = _decode_harvest(result[1])
        assert harvest is not None  # the script answers one for 'new' and 'repeat'
        return Taken(harvest, repeat=kind == "repeat")

    async def ack_harvest(self, harvest_id: str, bounds: HarvestBounds) -> Acked:
        try:
            state, pending = await self._ack(
                keys=[HARVEST, HARVEST_USERS, HARVEST_ACKED],
                args=[harvest_id, repr(time.time()), bounds.acked_kept],
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return Acked(AckState(_text(state)), _text(pending))

    async def pending_harvest(self) -> Harvest | None:
        try:
            result = await self._pending_harvest(
                keys=[USERS, UP, DOWN, TUNNELS, HARVEST, HARVEST_USERS, HARVEST_ACKED]
            )
        except (RedisError, OSError) as exc:
            raise StoreError(f"Redis: {exc}") from None
        return _decode_harvest(result)

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

    def watch(self, on_remote: RemoteChange, served: Served) -> None:
        if self._watcher is None:
            self._watcher = spawn(self._watch(on_remote, served), name="Redis subscription")

    async def _watch(self, on_remote: RemoteChange, served: Served) -> None:
        """Follow the change channel and check the table every redis_check_interval;
        after any break, resubscribe and reload."""
        delay = _LIMITS.redis_retry_min
        broken = False
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)  # sent, not yet answered: no sign of life
                # Subscribed before checking: nothing falls in between.
                if broken:
                    log.info("store: Redis is back; reloading the users")
                    await self._drop_idle_connections()
                    on_remote(0, None)
                    expected = None
                else:
                    expected = await self._check(on_remote, served, None)
                    if expected is not None:  # changed between load() and subscribing
                        on_remote(expected, None)
                        expected = None
                broken = False
                delay = _LIMITS.redis_retry_min
                due = loop.time() + _LIMITS.redis_check_interval
                while True:
                    wait = max(0.0, due - loop.time())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"], on_remote)
                    if loop.time() >= due:
                        expected = await self._check(on_remote, served, expected)
                        due = loop.time() + (
                            _LIMITS.redis_check_interval
                            if expected is None
                            else _LIMITS.redis_settle
                        )
            except (RedisError, OSError) as exc:
                self._answered = 0.0  # a lost connection or a timeout: unreachable now
                if not broken:
                    log.warning(
                        "store: lost the Redis subscription (%s); serving the last table, retrying",
                        exc or type(exc).__name__,
                    )
                    await self._drop_idle_connections()
                broken = True
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LIMITS.redis_retry_max)

    async def _check(
        self, on_remote: RemoteChange, served: Served, expected: int | None
    ) -> int | None:
        """Compare Redis's table with the one served and ask for a reload if
        they differ. Returns a revision Redis has that no message announced
        yet, for the next check (redis_settle later) to expect; else None."""
        loads = self._loads
        before, _ = served()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(EPOCH)
            pipe.get(REVISION)
            pipe.hlen(USERS)
            raw_epoch, raw_revision, users = await pipe.execute()
        self._heard_from_redis()
        if self._loads != loads:
            return None  # a reload happened meanwhile: compare next time
        revision = int(raw_revision or 0)
        now, count = served()
        if self._load_failed:
            why = "answers again after a failed reload"
        elif raw_epoch is None or raw_revision is None:
            why = "lost its revision keys (flushed or evicted)"
        elif raw_epoch.decode() != self._epoch:
            why = "began a new epoch"
        elif revision < before:
            why = f"went back to revision {revision}"
        elif revision == before == now and int(users) != count:
            why = f"holds {users} users at revision {revision}"
        elif expected is not None and self._heard < expected:
            why = f"has revision {expected}, never announced"
        else:
            return revision if revision > self._heard else None
        log.warning("store: reloading the users: Redis %s (this node: revision %d)", why, now)
        on_remote(revision, None)
        return None

    async def _drop_idle_connections(self) -> None:
        """Close pooled connections to a Redis that went away: each would
        otherwise fail the first command sent on it after Redis is back."""
        with contextlib.suppress(RedisError, OSError):
            await self._redis.connection_pool.disconnect(inuse_connections=False)

    def _deliver(self, data: bytes, on_remote: RemoteChange) -> None:
        head, _, rest = data.partition(b" ")
        epoch, _, body = rest.partition(b" ")
        try:
            revision = int(head)
            command = Command.from_wire(json.loads(body)) if body else None
        except (ValueError, KeyError, TypeError) as exc:
            log.error("store: unreadable change on %s (%s); reloading", CHANNEL, exc)
            on_remote(0, None)
            return
        if epoch.decode(errors="replace") != self._epoch:
            on_remote(revision, None)  # of another epoch: revisions do not compare
            return
        self._heard = max(self._heard, revision)
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
    fields: list[Any] = [user.dst.host, user.dst.port]
    fields += [getattr(user.limits, name) for name in LIMIT_FIELDS]
    if user.mux is not None:
        fields.append(user.mux.value)  # absent for most users: what older nodes wrote
    return json.dumps(fields, separators=(",", ":"))


def decode_user(raw: bytes) -> User:
    host, port, *rest = json.loads(raw)
    limits = rest[: len(LIMIT_FIELDS)]
    mux = None
    if len(rest) > len(LIMIT_FIELDS):
        try:
            mux = MuxProtocol(rest[len(LIMIT_FIELDS)])
        except ValueError:  # written by a newer node: the server's -mux-protocol here
            log.warning("store: unknown mux %r of a user, using -mux-protocol", rest[-1])
    return User(Destination(host, port), UserLimits(*limits) if any(limits) else NO_LIMITS, mux)


def _new_epoch() -> str:
    """A candidate epoch; Redis keeps it only where it must start a new one."""
    return secrets.token_hex(8)


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


def _text(value: bytes | str | int | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode_harvest(raw: list[Any]) -> Harvest | None:
    """A script's stored(): {id, taken_at, more, {path, "up down tunnels", ...}}."""
    harvest_id, taken_at, more, flat = raw
    if harvest_id is None:
        return None
    users = []
    for i in range(0, len(flat), 2):
        up, down, tunnels = _text(flat[i + 1]).split()
        users.append((_text(flat[i]), Share(int(up), int(down), int(tunnels))))
    return Harvest(
        _text(harvest_id), float(_text(taken_at)), tuple(sorted(users)), _text(more) == "1"
    )


def _int(values: list[bytes | None], index: int) -> int:
    value = values[index]
    return int(value) if value is not None else 0
