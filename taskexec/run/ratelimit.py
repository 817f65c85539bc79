"""Fleet-wide flow control in Redis: token buckets (rate limits) and per-run slots (concurrency).

Celery's own ``rate_limit`` is per worker instance (its docs say so; a global limit is
Celery issue 5732). Here every worker of the fleet takes tokens from one bucket in Redis,
atomically, in a Lua script that reads the Redis server's clock (``TIME``), so worker
clocks never matter.

A task refused a token is not blocked: the token it will get is reserved for it (a
waiting line per bucket), it learns when that token will be there, and Celery re-queues it
with that countdown. Tasks waiting in line are therefore spread over the refill, each
coming back at its turn, instead of all retrying at the next token; a newcomer queues
behind them. Tokens reserved for a holder that never comes back return to the bucket 30 s
after its turn, and those of a run that ended at once (:meth:`RateLimiter.give_back`).

Keys (``{scope}`` is ``run:<run id>``, ``tenant:<tenant>`` or ``global``):

* ``taskexec:rl:{scope}:<limit>``: hash ``tokens`` (below zero by the tokens reserved for
  the waiting line), ``ts`` (server seconds of the last refill), ``x`` (server seconds the
  key lives to), ``n:<holder>`` (tokens reserved for a holder, when more than one);
* ``taskexec:rlq:{scope}:<limit>``: sorted set of waiting holders, scored by the time
  their reserved tokens are refilled;
* ``taskexec:slots:<run id>``: sorted set of holders of a run's concurrency slots, scored
  by lease expiry (a killed worker's slot comes back when its lease runs out).

Example:
    >>> limiter = RateLimiter(Redis())  # doctest: +SKIP
    >>> llm = RateLimit(per_minute=120, burst=10)
    >>> limiter.acquire(bucket_key("llm", llm, run_id="r1"), llm, holder="score[0]")  # doctest: +SKIP
    Grant(granted=True, wait=0.0, tokens=9.0, waiting=0)
"""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis

from taskexec.errors import InvalidInputError
from taskexec.models import RateLimit

__all__ = ["Grant", "RateLimiter", "Slots", "bucket_key", "holder", "slots_key"]

# The clock and the refill, shared by the bucket scripts: ``now`` from ARGV[CLOCK] ('' =
# Redis TIME); ``tokens``, ``ts`` from KEYS[1] (a missing bucket is full), refilled to now;
# ``expiry``, the time the key's TTL was last set to reach.
_REFILL = """
local now
if ARGV[CLOCK] ~= '' then
  now = tonumber(ARGV[CLOCK])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'x')
local tokens, ts, expiry = tonumber(state[1]), tonumber(state[2]), tonumber(state[3])
if tokens == nil then
  tokens, ts = burst, now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
  ts = now
end
"""

# Holders that did not come back within 30 s of their time leave the line (KEYS[2]) and
# give their tokens back: 1 each, unless ``n:<holder>`` in KEYS[1] says more.
_FORGET = """
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - 30, 'LIMIT', 0, 100)) do
  tokens = tokens + (tonumber(redis.call('HGET', KEYS[1], 'n:' .. gone)) or 1)
  redis.call('HDEL', KEYS[1], 'n:' .. gone)
  redis.call('ZREM', KEYS[2], gone)
end
tokens = math.min(burst, tokens)
"""

# KEYS[1] bucket hash {tokens, ts}; KEYS[2] waiting line (zset holder -> its reserved time)
# ARGV[1] refill rate, tokens per second; ARGV[2] burst (bucket capacity); ARGV[3] tokens
#   wanted; ARGV[4] holder id; ARGV[5] "now" in seconds for tests ('' = Redis TIME)
# Returns {granted 0|1, seconds to wait (string), tokens left (string), holders waiting
#   (counted when refused, 0 when granted)}.
# Numbers go back as strings: Redis turns Lua numbers into integers.
#
# A refused holder reserves its tokens: the bucket goes below zero by them, and the holder
# joins the line with the time its tokens will have been refilled. Back at that time, it
# is granted without taking tokens again; a newcomer can only queue behind the debt. So
# grants follow the rate exactly, in the order of asking, and a holder is refused again
# only when it comes back before its time.
_ACQUIRE = (
    """
local rate, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder = ARGV[4]
"""
    + _REFILL.replace("ARGV[CLOCK]", "ARGV[5]")
    + """
local granted, wait = 0, 0
local turn = redis.call('ZSCORE', KEYS[2], holder)
if turn then
  -- Reserved earlier: granted at its time (10 ms early at most: worker clocks differ).
  wait = tonumber(turn) - now
  if wait <= 0.01 then
    granted, wait = 1, 0
    redis.call('ZREM', KEYS[2], holder)
    redis.call('HDEL', KEYS[1], 'n:' .. holder)
  end
else
  if tokens < n then
    -- Short of tokens: those of holders that never came back count again first.
"""
    + _FORGET
    + """
  end
  if tokens >= n then
    tokens = tokens - n
    granted = 1
  else
    tokens = tokens - n
    wait = -tokens / rate
    if wait < 0.001 then wait = 0.001 end
    redis.call('ZADD', KEYS[2], now + wait, holder)
    redis.call('EXPIRE', KEYS[2], math.ceil(wait) + 60)
    if n ~= 1 then
      redis.call('HSET', KEYS[1], 'n:' .. holder, n)
    end
  end
end
-- Kept until the bucket is full again (a debt included), then a minute more. EXPIRE is
-- the dearest call here (Redis rewrites it for replication): it is renewed only when the
-- key would go too soon, then with a minute to spare, so a busy bucket renews it once a
-- minute; ``x`` notes the time the key now lives to.
local need = now + (burst - tokens) / rate + 60
if expiry ~= nil and expiry >= need then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
else
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts), 'x', tostring(need + 60))
  redis.call('EXPIRE', KEYS[1], math.ceil(need + 60 - now))
end
if granted == 1 then
  return {1, '0', tostring(tokens), 0}
end
return {0, tostring(wait), tostring(tokens), redis.call('ZCARD', KEYS[2])}
"""
)

# KEYS[1] bucket hash; KEYS[2] waiting line
# ARGV[1] refill rate; ARGV[2] burst; ARGV[3] holder, or a prefix of holders (``<run id>/``);
#   ARGV[4] "now" ('' = Redis TIME); ARGV[5] '1' when ARGV[3] is a prefix
# Returns the tokens given back (string): those reserved for the holders named, which leave
# the line (their run has ended: they will not come back for them).
_RETURN = (
    """
local rate, burst, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local whole = ARGV[5] ~= '1'
"""
    + _REFILL.replace("ARGV[CLOCK]", "ARGV[4]")
    + _FORGET
    + """
local back = 0
for _, h in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  if h == prefix or (not whole and string.sub(h, 1, #prefix) == prefix) then
    back = back + (tonumber(redis.call('HGET', KEYS[1], 'n:' .. h)) or 1)
    redis.call('HDEL', KEYS[1], 'n:' .. h)
    redis.call('ZREM', KEYS[2], h)
  end
end
tokens = math.min(burst, tokens + back)
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
end
return tostring(back)
"""
)

# KEYS[1] bucket hash; KEYS[2] waiting line; ARGV[1] rate; ARGV[2] burst; ARGV[3] "now"
# Returns {tokens now (string, below zero by the tokens reserved), holders waiting}; writes
# the refill (and the tokens of the line's expired holders) back.
_PEEK = (
    """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
"""
    + _REFILL.replace("ARGV[CLOCK]", "ARGV[3]")
    + _FORGET
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
end
return {tostring(tokens), redis.call('ZCARD', KEYS[2])}
"""
)

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
    #: Seconds until the tokens reserved for the holder are there (0 when granted).
    wait: float
    #: Tokens left in the bucket (0 while holders wait in line).
    tokens: float
    #: Holders in the bucket's line, this one included, when refused (0 when granted).
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


def holder(run_id: str, task_id: str = "") -> str:
    """Who waits in a bucket's line for a task of a run (without a task: the run's prefix).

    >>> holder("r1", "score[0]")
    'r1/score[0]'
    """
    return f"{run_id}/{task_id}"


def slots_key(run_id: str) -> str:
    """The Redis key of a run's concurrency slots."""
    return f"taskexec:slots:{run_id}"


def _now(now: float | None) -> str:
    return "" if now is None else repr(now)


def _keys(bucket: str) -> list[str]:
    """A bucket's hash and its waiting line."""
    return [bucket, bucket.replace("taskexec:rl:", "taskexec:rlq:", 1)]


class RateLimiter:
    """Token buckets shared by every worker of the fleet.

    Args:
        redis: Redis, the broker's server by default.
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # register_script: EVALSHA, falling back to EVAL once after a Redis restart.
        self._acquire = redis.register_script(_ACQUIRE)
        self._peek = redis.register_script(_PEEK)
        self._give_back = redis.register_script(_RETURN)

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
            InvalidInputError: ``n`` is above the burst, so it could never be granted.
        """
        if n > limit.burst:
            raise InvalidInputError(
                f"{n} tokens asked of a bucket that holds at most {limit.burst} (burst)", path="rate_limits"
            )
        granted, wait, tokens, waiting = self._acquire(
            keys=_keys(key),
            args=[limit.per_minute / 60.0, limit.burst, n, holder, _now(now)],
        )
        return Grant(bool(granted), float(wait), max(0.0, float(tokens)), int(waiting))

    def peek(self, key: str, limit: RateLimit, *, now: float | None = None) -> tuple[float, int]:
        """Tokens in the bucket now and holders waiting, for status views and pacing.

        The tokens are below zero by those reserved for the waiting holders.
        """
        tokens, waiting = self._peek(keys=_keys(key), args=[limit.per_minute / 60.0, limit.burst, _now(now)])
        return float(tokens), int(waiting)

    def give_back(
        self, key: str, limit: RateLimit, *, run_id: str, task_id: str | None = None, now: float | None = None
    ) -> float:
        """Return the tokens reserved for a run's tasks waiting in line (or for one of them).

        A run that ends (cancelled, stopped) while tasks of it wait in a shared bucket's
        line would otherwise leave their tokens reserved for nobody until the line forgets
        them. Returns the tokens given back.
        """
        who = holder(run_id, task_id or "")
        prefix = "0" if task_id else "1"
        args: list[str | float] = [limit.per_minute / 60.0, limit.burst, who, _now(now), prefix]
        return float(self._give_back(keys=_keys(key), args=args))


class Slots:
    """A run's concurrency slots: at most ``limit`` holders at once, each with a lease."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._take = redis.register_script(_TAKE_SLOT)
        self._renew = redis.register_script(_RENEW_SLOT)

    def take(self, key: str, limit: int, *, holder: str, lease: float, now: float | None = None) -> Grant:
        """Take a slot (or renew the holder's); when all are taken, the seconds until a lease ends."""
        granted, wait, held = self._take(keys=[key], args=[limit, holder, lease, _now(now)])
        return Grant(bool(granted), max(0.0, float(wait)), 0.0, int(held))

    def renew(self, key: str, *, holder: str, lease: float, now: float | None = None) -> bool:
        """Extend a holder's lease; false when it had already lost the slot."""
        return bool(self._renew(keys=[key], args=[holder, lease, _now(now)]))

    def release(self, key: str, *, holder: str) -> None:
        """Give a slot back."""
        self.redis.zrem(key, holder)

    def held(self, key: str) -> int:
        """Slots held now (expired leases included until the next take)."""
        return int(self.redis.zcard(key))
