"""max_tunnels and max_ips over every node sharing one Redis (docs/redis.md,
"Limits across nodes").

Per user with tunnels admitted against those limits:

    mtt:adm:<path>    sorted set  lease name "<node> <n> <client ip>" -> its end,
                                  in Redis's own clock (ms), so nodes' clocks never matter
    mtt:admip:<path>  hash        client ip -> entries of mtt:adm:<path> with that address

An admission is one script: drop the entries whose lease ended (a node that
died stopped renewing them), count what is left (ZCARD for tunnels, HLEN for
addresses), refuse or add. Both keys expire with their last lease, so a user
whose nodes all died leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mtt.core.leases import SharedRefusal
from mtt.core.users import UserLimits
from mtt.errors import StoreError

ADMITTED = "mtt:adm:"
ADMITTED_IPS = "mtt:admip:"

# Redis's clock in ms; the address at the end of a lease's name; both keys
# kept until the latest lease in them ends.
_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function ip_of(name)
  return string.match(name, '^%S+ %S+ (.*)$') or ''
end
local function keep(tunnels, ips)
  local last = redis.call('ZRANGE', tunnels, -1, -1, 'WITHSCORES')
  if last[2] then
    local at = math.floor(tonumber(last[2]))
    redis.call('PEXPIREAT', tunnels, at)
    redis.call('PEXPIREAT', ips, at)
  else
    redis.call('DEL', ips)
  end
end
local function forget(ips, ip)
  if redis.call('HINCRBY', ips, ip, -1) <= 0 then redis.call('HDEL', ips, ip) end
end
"""

# KEYS: tunnels, ips. ARGV: name, ip, max_tunnels, max_ips, lease (ms).
# Returns {'ok'}, or {'tunnels'|'ips', count} when the tunnel does not fit.
_ADMIT = (
    _COMMON
    + """
local now = now_ms()
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, name in ipairs(lapsed) do forget(KEYS[2], ip_of(name)) end
if #lapsed > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local tunnels = redis.call('ZCARD', KEYS[1])
  if tunnels == 0 then redis.call('DEL', KEYS[2]) end
  local max_tunnels = tonumber(ARGV[3])
  if max_tunnels > 0 and tunnels >= max_tunnels then return {'tunnels', tunnels} end
  local max_ips = tonumber(ARGV[4])
  if max_ips > 0 and redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
    local ips = redis.call('HLEN', KEYS[2])
    if ips >= max_ips then return {'ips', ips} end
  end
  redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[1])
keep(KEYS[1], KEYS[2])
return {'ok'}
"""
)

# KEYS: tunnels, ips of each user in turn. ARGV: lease (ms), JSON [[name, ...], ...]
# aligned with the users. Entries Redis lapsed (or lost) are added back, their
# address counted again. Returns how many were added back.
_RENEW = (
    _COMMON
    + """
local ends = now_ms() + tonumber(ARGV[1])
local added = 0
for i, names in ipairs(cjson.decode(ARGV[2])) do
  local tunnels, ips = KEYS[2 * i - 1], KEYS[2 * i]
  for _, name in ipairs(names) do
    if redis.call('ZADD', tunnels, ends, name) == 1 then
      redis.call('HINCRBY', ips, ip_of(name), 1)
      added = added + 1
    end
  end
  keep(tunnels, ips)
end
return added
"""
)

# KEYS as _RENEW's. ARGV: JSON [[name, ...], ...] aligned with the users.
_RELEASE = (
    _COMMON
    + """
for i, names in ipairs(cjson.decode(ARGV[1])) do
  local tunnels, ips = KEYS[2 * i - 1], KEYS[2 * i]
  for _, name in ipairs(names) do
    if redis.call('ZREM', tunnels, name) == 1 then forget(ips, ip_of(name)) end
  end
  keep(tunnels, ips)
end
return 0
"""
)


def keys_of(path: str) -> tuple[str, str]:
    """The sorted set of a user's leases and the hash of their addresses."""
    return ADMITTED + path, ADMITTED_IPS + path


class RedisCount:
    """The shared count (store.base.SharedCount) in the Redis of a RedisStore.
    Every call is bounded by `timeout` (the store's socket timeout) as a whole,
    a fresh connection's handshake included."""

    def __init__(self, redis: Redis, timeout: float, chunk: int) -> None:
        self._redis = redis
        self._timeout = timeout
        self._chunk = chunk
        self._admit = redis.register_script(_ADMIT)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def admit(
        self, path: str, name: str, ip: str, limits: UserLimits, lease: float
    ) -> SharedRefusal | None:
        args: list[str | int] = [name, ip, limits.max_tunnels, limits.max_ips, _ms(lease)]
        try:
            async with asyncio.timeout(self._timeout):
                result = await self._admit(keys=list(keys_of(path)), args=args)
        except (RedisError, OSError) as exc:
            raise self._error(exc) from None
        kind = _text(result[0])
        if kind == "ok":
            return None
        return SharedRefusal(kind, int(result[1]))

    async def renew(self, held: Mapping[str, Sequence[str]], lease: float) -> None:
        await self._each_chunk(self._renew, [_ms(lease)], held)

    async def release(self, names: Mapping[str, Sequence[str]]) -> None:
        await self._each_chunk(self._release, [], names)

    async def _each_chunk(
        self, script: AsyncScript, first: list[str], by_path: Mapping[str, Sequence[str]]
    ) -> None:
        """One script call per chunk of entries, all in one pipeline (not a
        transaction: each script is atomic on its own)."""
        if not by_path:
            return
        try:
            async with asyncio.timeout(self._timeout):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for keys, groups in lease_chunks(by_path, self._chunk):
                        await script(keys=keys, args=[*first, groups], client=pipe)
                    await pipe.execute()
        except (RedisError, OSError) as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> StoreError:
        if isinstance(exc, TimeoutError) and not str(exc):  # asyncio.timeout's
            return StoreError(f"Redis: no answer within {self._timeout:g} s")
        return StoreError(f"Redis: {exc or type(exc).__name__}")


def lease_chunks(
    by_path: Mapping[str, Sequence[str]], size: int
) -> Iterator[tuple[list[str], str]]:
    """(keys, JSON groups of names) of at most `size` names each; a user with
    more is split over several."""
    keys: list[str] = []
    groups: list[list[str]] = []
    count = 0
    for path, names in by_path.items():
        for start in range(0, len(names), size):
            part = list(names[start : start + size])
            if count and count + len(part) > size:
                yield keys, _json(groups)
                keys, groups, count = [], [], 0
            keys.extend(keys_of(path))
            groups.append(part)
            count += len(part)
    if groups:
        yield keys, _json(groups)


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def _json(value: object) -> str:
    """Paths and addresses as raw UTF-8, not escapes for Lua's cjson to undo."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
