"""Fleet-wide flow control in Redis: token buckets (rate limits) and per-run slots (concurrency).

Celery's own ``rate_limit`` is per worker instance (its docs say so; a global limit is
Celery issue 5732). Here every worker of the fleet takes tokens from one bucket in Redis,
atomically, in a Lua script that reads the Redis server's clock (``TIME``), so worker
clocks never matter.

A task refused a token is not blocked: it gets the seconds until a token will be there
for it, counting the tasks already waiting ahead of it (a waiting line per bucket), and
Celery re-queues it with that countdown. Tasks waiting in line are therefore spread over
the refill instead of all retrying at the next token.

Keys (``{scope}`` is ``run:<run id>``, ``tenant:<tenant>`` or ``global``):

* ``taskexec:rl:{scope}:<limit>``: hash ``tokens``, ``ts`` (server seconds of the last refill);
* ``taskexec:rlq:{scope}:<limit>``: sorted set of waiting holders, scored by when each
  is expected back;
* ``taskexec:slots:<run id>``: sorted set of holders of a run's concurrency slots, scored
  by lease expiry (a killed worker's slot comes back when its lease runs out).

Example:
    >>> limiter = RateLimiter(redis.Redis())  # doctest: +SKIP
    >>> llm = RateLimit(per_minute=120, burst=10)
    >>> limiter.acquire(bucket_key("llm", llm, run_id="r1"), llm, holder="score[0]")  # doctest: +SKIP
    Grant(granted=True, wait=0.0, tokens=9.0, waiting=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from taskexec.errors import PlanError
from taskexec.models import RateLimit

__all__ = ["Grant", "RateLimiter", "Slots", "bucket_key", "slots_key"]

# KEYS[1] bucket hash {tokens, ts}; KEYS[2] waiting line (zset holder -> expected return)
# ARGV[1] refill rate, tokens per second; ARGV[2] burst (bucket capacity); ARGV[3] tokens
#   wanted; ARGV[4] holder id; ARGV[5] "now" in seconds for tests ('' = Redis TIME)
# Returns {granted 0|1, seconds to wait (string), tokens left (string), holders waiting}.
# Numbers go back as strings: Redis turns Lua numbers into integers.
_ACQUIRE = """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder = ARGV[4]
local now
if ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- a holder that did not come back within 30 s of its turn has left the line
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 30)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil then
  tokens, ts = burst, now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
local ttl = math.ceil(burst / rate) + 60
local granted, wait = 0, 0
local my_turn = redis.call('ZSCORE', KEYS[2], holder)
local ahead
if my_turn then
  ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. my_turn)
else
  ahead = redis.call('ZCARD', KEYS[2])
end
-- Grant when the tokens cover the holders ahead in line too, or when this holder's turn
-- has come (those ahead of it are late: their turns came earlier).
if tokens - ahead * n >= n or (my_turn and tonumber(my_turn) <= now and tokens >= n) then
  tokens = tokens - n
  granted = 1
  redis.call('ZREM', KEYS[2], holder)
else
  wait = (n - tokens + ahead * n) / rate
  if wait < 0.001 then wait = 0.001 end
  redis.call('ZADD', KEYS[2], now + wait, holder)
  redis.call('EXPIRE', KEYS[2], math.ceil(wait) + 60)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('EXPIRE', KEYS[1], ttl)
return {granted, tostring(wait), tostring(tokens), redis.call('ZCARD', KEYS[2])}
"""

# KEYS[1] holders of a run's slots (zset holder -> lease expiry, server seconds)
# ARGV[1] slots in all; ARGV[2] holder id; ARGV[3] lease seconds; ARGV[4] "now" ('' = TIME)
# Returns {granted 0|1, seconds until the earliest lease ends (string), holders}.
# A holder already in the set renews its lease (a redelivered copy of the same task).
_TAKE_SLOT = """
local limit, holder, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now
if ARGV[4] ~= '' then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], holder) or redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 60)
  return {1, '0', redis.call('ZCARD', KEYS[1])}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(first[2]) - now), redis.call('ZCARD', KEYS[1])}
"""

# KEYS[1] holders of a run's slots; ARGV[1] holder; ARGV[2] lease seconds; ARGV[3] now ('' = TIME)
# Returns 1 when the holder still held its slot (lease renewed), 0 when it had lost it.
_RENEW_SLOT = """
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Grant:
    """The answer of the limiter: granted, or how long to wait before asking again."""

    granted: bool
    wait: float
    tokens: float
    waiting: int


def bucket_key(name: str, limit: RateLimit, *, run_id: str, tenant: str | None = None) -> str:
    """The Redis key of a limit's bucket for a run, by the limit's scope.

    >>> bucket_key("llm", RateLimit(per_minute=60), run_id="r1")
    'taskexec:rl:run:r1:llm'
    >>> bucket_key("llm", RateLimit(per_minute=60, scope="global"), run_id="r1")
    'taskexec:rl:global:llm'
    """
    if limit.scope == "global":
        scope = "global"
    elif limit.scope == "tenant":
        scope = f"tenant:{tenant or '-'}"
    else:
        scope = f"run:{run_id}"
    return f"taskexec:rl:{scope}:{name}"


def slots_key(run_id: str) -> str:
    """The Redis key of a run's concurrency slots."""
    return f"taskexec:slots:{run_id}"


def _now(now: float | None) -> str:
    return "" if now is None else repr(now)


class RateLimiter:
    """Token buckets shared by every worker of the fleet.

    Args:
        client: Redis, the broker's server by default.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        # register_script: EVALSHA, falling back to EVAL once after a Redis restart.
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(
        self, key: str, limit: RateLimit, *, holder: str, n: int = 1, now: float | None = None
    ) -> Grant:
        """Take ``n`` tokens for ``holder``, or learn how long to wait for them.

        Args:
            key: The bucket (:func:`bucket_key`).
            limit: Its rate and burst.
            holder: Who asks (a task id): its place in the waiting line is kept.
            n: Tokens wanted.
            now: Server time override, for tests; default: Redis ``TIME``.

        Raises:
            PlanError: ``n`` is above the burst, so it could never be granted.
        """
        if n > limit.burst:
            raise PlanError(
                f"{n} tokens asked of a bucket that holds at most {limit.burst} (burst)", path="rate_limits"
            )
        granted, wait, tokens, waiting = self._acquire(
            keys=[key, key.replace("taskexec:rl:", "taskexec:rlq:", 1)],
            args=[limit.per_minute / 60.0, limit.burst, n, holder, _now(now)],
        )
        return Grant(bool(granted), float(wait), float(tokens), int(waiting))

    def peek(self, key: str, limit: RateLimit) -> tuple[float, int]:
        """Tokens available now (as of the last refill) and holders waiting, for status views."""
        tokens, _ = self.client.hmget(key, ["tokens", "ts"])
        waiting = self.client.zcard(key.replace("taskexec:rl:", "taskexec:rlq:", 1))
        return (float(tokens) if tokens is not None else float(limit.burst)), int(waiting)


class Slots:
    """A run's concurrency slots: at most ``limit`` holders at once, each with a lease."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._take = client.register_script(_TAKE_SLOT)
        self._renew = client.register_script(_RENEW_SLOT)

    def take(self, key: str, limit: int, *, holder: str, lease: float, now: float | None = None) -> Grant:
        """Take a slot (or renew the holder's); when all are taken, the seconds until a lease ends."""
        granted, wait, held = self._take(keys=[key], args=[limit, holder, lease, _now(now)])
        return Grant(bool(granted), max(0.0, float(wait)), 0.0, int(held))

    def renew(self, key: str, *, holder: str, lease: float, now: float | None = None) -> bool:
        """Extend a holder's lease; false when it had already lost the slot."""
        return bool(self._renew(keys=[key], args=[holder, lease, _now(now)]))

    def release(self, key: str, *, holder: str) -> None:
        """Give a slot back."""
        self.client.zrem(key, holder)

    def held(self, key: str) -> int:
        """Slots held now (expired leases included until the next take)."""
        return int(self.client.zcard(key))
