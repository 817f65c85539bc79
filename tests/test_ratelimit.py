"""Token buckets and concurrency slots in Redis: the bucket math with an injected clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from taskexec.errors import InvalidInputError
from taskexec.models import RateLimit
from taskexec.run.ratelimit import RateLimiter, Slots, bucket_key, slots_key

pytestmark = pytest.mark.integration

LIMIT = RateLimit(per_minute=60, burst=5)  # one token a second, five saved


@pytest.fixture
def client(redis_db: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_db) as c:
        c.flushdb()
        yield c


def test_a_full_bucket_grants_its_burst_then_refills_at_the_rate(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    key = bucket_key("api", LIMIT, run_id="r")
    grants = [limiter.acquire(key, LIMIT, holder=f"t{i}", now=1000.0) for i in range(5)]
    assert all(g.granted for g in grants)
    assert [g.tokens for g in grants] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert not limiter.acquire(key, LIMIT, holder="late", now=1000.0).granted
    assert not limiter.acquire(key, LIMIT, holder="late", now=1000.5).granted  # half a token
    assert limiter.acquire(key, LIMIT, holder="late", now=1001.0).granted  # its turn, one token


def test_refill_never_exceeds_the_burst(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    key = bucket_key("api", LIMIT, run_id="r")
    limiter.acquire(key, LIMIT, holder="a", now=0.0)
    later = [limiter.acquire(key, LIMIT, holder=f"b{i}", now=3600.0) for i in range(6)]
    assert [g.granted for g in later] == [True] * 5 + [False]


def test_refused_holders_wait_in_line_spread_over_the_refill(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    key = bucket_key("api", LIMIT, run_id="r")
    for i in range(5):
        limiter.acquire(key, LIMIT, holder=f"t{i}", now=50.0)
    waits = [limiter.acquire(key, LIMIT, holder=f"w{i}", now=50.0) for i in range(3)]
    assert [(g.granted, g.wait) for g in waits] == [(False, 1.0), (False, 2.0), (False, 3.0)]
    assert waits[-1].waiting == 3
    # A newcomer does not jump the line while others wait for the tokens.
    assert not limiter.acquire(key, LIMIT, holder="newcomer", now=51.0).granted
    assert limiter.acquire(key, LIMIT, holder="w0", now=51.0).granted
    assert limiter.peek(key, LIMIT, now=51.0) == (-3.0, 3)  # w1, w2 and the newcomer wait, reserved


def test_a_refused_holder_is_granted_its_reserved_token_at_its_time_and_only_then(
    client: redis.Redis,
) -> None:
    limiter = RateLimiter(client)
    key = bucket_key("api", LIMIT, run_id="r")
    for i in range(5):
        limiter.acquire(key, LIMIT, holder=f"t{i}", now=10.0)
    turns = {f"w{i}": 10.0 + limiter.acquire(key, LIMIT, holder=f"w{i}", now=10.0).wait for i in range(4)}
    assert turns == {"w0": 11.0, "w1": 12.0, "w2": 13.0, "w3": 14.0}
    early = limiter.acquire(key, LIMIT, holder="w2", now=12.5)  # early: told the rest, keeps its turn
    assert (early.granted, early.wait) == (False, 0.5)
    # Each granted at its turn, a newcomer behind them all: grants follow the rate exactly.
    assert all(limiter.acquire(key, LIMIT, holder=h, now=t).granted for h, t in turns.items())
    newcomer = limiter.acquire(key, LIMIT, holder="n", now=14.0)
    assert (newcomer.granted, newcomer.wait, newcomer.waiting) == (False, 1.0, 1)


def test_tokens_reserved_for_a_holder_that_never_comes_back_return_after_30_s(client: redis.Redis) -> None:
    slow = RateLimit(per_minute=6, burst=10)  # a token every 10 s
    limiter = RateLimiter(client)
    key = bucket_key("api", slow, run_id="r")
    assert limiter.acquire(key, slow, holder="t", n=10, now=0.0).granted
    assert limiter.acquire(key, slow, holder="gone", n=3, now=0.0).wait == 30.0  # its turn: 30.0
    tokens, waiting = limiter.peek(key, slow, now=59.5)
    assert (tokens, waiting) == (pytest.approx(2.95), 1)
    # 30 s past its turn it has left the line, and its 3 tokens are back.
    tokens, waiting = limiter.peek(key, slow, now=60.5)
    assert (tokens, waiting) == (pytest.approx(2.95 + 3 + 0.1), 0)


def test_an_ended_run_gives_back_the_tokens_reserved_for_its_waiting_tasks(client: redis.Redis) -> None:
    shared = RateLimit(per_minute=60, burst=2, scope="global")
    limiter = RateLimiter(client)
    key = bucket_key("api", shared, run_id="a")
    assert limiter.acquire(key, shared, holder="a/t0", n=2, now=0.0).granted
    for holder in ("a/t1", "b/t1", "a/t10", "a/t2"):
        limiter.acquire(key, shared, holder=holder, now=0.0)
    limiter.acquire(key, shared, holder="a/t3", n=2, now=0.0)
    assert limiter.peek(key, shared, now=0.0) == (-6.0, 5)
    assert limiter.give_back(key, shared, run_id="a", task_id="t1", now=0.0) == 1.0  # not a/t10
    assert limiter.give_back(key, shared, run_id="a", now=1.0) == 4.0
    assert limiter.peek(key, shared, now=1.0) == (0.0, 1)  # b/t1's token is still reserved
    assert limiter.acquire(key, shared, holder="b/t1", now=2.0).granted  # at its turn, as promised
    assert limiter.give_back(key, shared, run_id="a", now=2.0) == 0.0


def test_a_bucket_outlives_its_debt_and_its_ttl_is_not_set_on_every_call(client: redis.Redis) -> None:
    slow = RateLimit(per_minute=6, burst=10)  # a token every 10 s, Redis's own clock
    limiter = RateLimiter(client)
    key = bucket_key("api", slow, run_id="r")
    assert limiter.acquire(key, slow, holder="a", n=10).granted
    assert 218 <= client.ttl(key) <= 221  # full again in 100 s, a minute more, a minute to spare
    assert not limiter.acquire(key, slow, holder="b", n=5).granted  # 150 s + a minute: covered
    assert 218 <= client.ttl(key) <= 221  # so left alone
    assert not limiter.acquire(key, slow, holder="c", n=5).granted  # 200 s + a minute: not covered
    assert 318 <= client.ttl(key) <= 321


def test_asking_for_more_than_the_burst_is_refused_clearly(client: redis.Redis) -> None:
    with pytest.raises(InvalidInputError, match=r"at most 5 \(burst\)"):
        RateLimiter(client).acquire(bucket_key("api", LIMIT, run_id="r"), LIMIT, holder="t", n=6)


def test_server_time_is_used_without_an_injected_clock(client: redis.Redis) -> None:
    limiter = RateLimiter(client)
    key = bucket_key("api", LIMIT, run_id="live")
    assert all(limiter.acquire(key, LIMIT, holder=f"t{i}").granted for i in range(5))
    refused = limiter.acquire(key, LIMIT, holder="t5")
    assert not refused.granted and 0 < refused.wait <= 1.0


def test_scopes_key_the_bucket() -> None:
    run = RateLimit(per_minute=1)
    glob = RateLimit(per_minute=1, scope="global")
    tenant = RateLimit(per_minute=1, scope="tenant")
    assert bucket_key("x", run, run_id="r1") != bucket_key("x", run, run_id="r2")
    assert bucket_key("x", glob, run_id="r1") == bucket_key("x", glob, run_id="r2")
    assert bucket_key("x", tenant, run_id="r1", tenant="a") == bucket_key(
        "x", tenant, run_id="r2", tenant="a"
    )
    assert bucket_key("x", tenant, run_id="r1", tenant="a") != bucket_key(
        "x", tenant, run_id="r1", tenant="b"
    )


def test_slots_cap_holders_and_come_back_when_a_lease_ends(client: redis.Redis) -> None:
    slots = Slots(client)
    key = slots_key("r")
    assert [slots.take(key, 2, holder=h, lease=5, now=10.0).granted for h in "abc"] == [True, True, False]
    refused = slots.take(key, 2, holder="c", lease=5, now=12.0)
    assert not refused.granted and refused.wait == pytest.approx(3.0)
    assert slots.take(key, 2, holder="a", lease=5, now=12.0).granted  # a holder renews its own
    assert slots.renew(key, holder="b", lease=5, now=12.0)
    slots.release(key, holder="b")
    assert slots.take(key, 2, holder="c", lease=5, now=12.5).granted
    # a's lease (renewed at 12 until 17) runs out: its slot goes to d, and a cannot renew it.
    assert slots.take(key, 2, holder="d", lease=5, now=17.5).granted
    assert not slots.renew(key, holder="a", lease=5, now=17.6)
