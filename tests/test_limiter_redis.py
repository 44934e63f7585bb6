"""The Redis limiter where Redis itself matters: replicas, Cluster, TTLs, retries and failures.

Every test starts its own redis-server processes (tests/redis_server.py) and uses the server's
TIME, as production does. The failover tests kill, stall (`DEBUG SLEEP`) and restart Redis under
each `ratelimit.on_error` mode.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cohortgate.config import Quota
from cohortgate.config import RateLimitSettings
from cohortgate.limiter import Decision
from cohortgate.limiter import FailoverLimiter
from cohortgate.limiter import LimiterUnavailable
from cohortgate.limiter import MemoryLimiter
from cohortgate.limiter import RedisLimiter
from cohortgate.limiter import make_limiter
from cohortgate.limiter import redis_key
from cohortgate.limiter.redis import SETTLE_DELAY
from tests.redis_server import RedisCluster
from tests.redis_server import RedisServer
from tests.redis_server import free_port
from tests.redis_server import redis_cluster
from tests.redis_server import redis_server

TIMEOUT = 0.2  # the failover tests' ratelimit.timeout
SLACK = 0.1  # scheduling noise allowed on top of it
PROBE = 0.05


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as started:
        yield started


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client for looking at what the limiter wrote."""
    client = Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- sharing


async def test_two_replicas_share_one_limit(server: RedisServer) -> None:
    replicas = [RedisLimiter(server.url, timeout=2.0) for _ in range(2)]
    try:
        quota = Quota(rpm=10, tpm=100_000)
        calls = [replicas[i % 2].acquire("acme", quota, 100) for i in range(40)]
        decisions = await asyncio.gather(*calls)
        assert sum(d.allowed for d in decisions) == 10
        refused = [d for d in decisions if not d.allowed]
        assert {d.refused for d in refused} == {"requests"}
        # a request refills every 6 s; a few ms have passed since the bucket ran dry
        assert all(5.5 < d.retry_after <= 6.0 for d in refused)
        # shared, not split: 10 in all (each replica's batch may take any share of them), and
        # a replica that admitted none of them sees the bucket empty
        for replica in replicas:
            assert not (await replica.acquire("acme", quota, 0)).allowed
        first = await replicas[0].acquire("beta", quota, 100)
        second = await replicas[1].acquire("beta", quota, 100)
        assert (first.requests.remaining, second.requests.remaining) == (9, 8)
    finally:
        for replica in replicas:
            await replica.close()


async def test_cluster_shares_limits_without_crossslot(cluster: RedisCluster) -> None:
    replicas = [RedisLimiter(cluster.url, timeout=2.0) for _ in range(2)]
    try:
        assert all(replica.cluster for replica in replicas)
        customers = [f"customer-{i}" for i in range(12)]
        quota = Quota(rpm=5, tpm=10_000)
        calls = [
            replicas[i % 2].acquire(customer, quota, 100)
            for customer in customers
            for i in range(12)
        ]
        decisions = await asyncio.gather(*calls)
        for n, customer in enumerate(customers):
            mine = decisions[n * 12 : (n + 1) * 12]
            assert sum(d.allowed for d in mine) == 5, customer
        for customer in customers:
            await replicas[0].settle(customer, quota, 50, "redis")
        # the customers are spread over the nodes, each key with a TTL on its own node
        admin = ClusterClient.from_url(cluster.url.replace("redis+cluster", "redis"))
        try:
            await admin.initialize()
            owners = set()
            for customer in customers:
                key = redis_key(customer)
                owner = admin.get_node_from_key(key)
                assert owner is not None
                owners.add(owner.port)
                assert 0 < await admin.pttl(key) <= 60_000 + 1_000, customer
            assert len(owners) >= 2
        finally:
            await admin.aclose()
    finally:
        for replica in replicas:
            await replica.close()


async def test_every_key_has_a_ttl(server: RedisServer, admin: Redis) -> None:
    limiter = RedisLimiter(server.url, timeout=2.0)
    try:
        quota = Quota(rpm=60, tpm=6_000)  # 1 request, 100 tokens per second
        for i in range(20):
            await limiter.acquire(f"c{i}", quota, 50 * i)
        await limiter.settle("c3", quota, 7000, "redis")  # tokens to -1150: 71.5 s to full
        keys = [key async for key in admin.scan_iter("*")]
        assert len(keys) == 20
        for key in keys:
            assert key.startswith(b"cg:{") and key.endswith(b"}:b"), key
            assert await admin.pttl(key) > 0, key
        # until both buckets are full again, plus a 1 s margin
        assert 1_000 < await admin.pttl(redis_key("c0")) <= 2_000
        assert 71_500 < await admin.pttl(redis_key("c3")) <= 72_500
        # a denied request writes nothing, not even a key
        assert not (await limiter.acquire("fresh", Quota(rpm=1, tpm=10), 11)).allowed
        assert await admin.exists(redis_key("fresh")) == 0
    finally:
        await limiter.close()


async def test_a_full_bucket_is_deleted(server: RedisServer, admin: Redis) -> None:
    now = [1000.0]
    limiter = RedisLimiter(server.url, timeout=2.0, clock=lambda: now[0])
    try:
        quota = Quota(rpm=60, tpm=6_000)
        decision = await limiter.acquire("acme", quota, 500)
        assert await admin.exists(redis_key("acme")) == 1
        now[0] += 1  # the request is back
        await limiter.settle("acme", quota, -500, decision.backend)  # and the tokens
        assert await admin.exists(redis_key("acme")) == 0
    finally:
        await limiter.close()


async def test_key_is_one_hash_under_a_hash_tag(server: RedisServer, admin: Redis) -> None:
    limiter = RedisLimiter(server.url, timeout=2.0)
    try:
        await limiter.acquire("acme", Quota(rpm=5, tpm=1000), 300)
        key = redis_key("acme")
        assert key == f"cg:{{{hashlib.sha256(b'acme').hexdigest()[:16]}}}:b"
        assert key_slot(key.encode()) == key_slot(hashlib.sha256(b"acme").hexdigest()[:16].encode())
        fields = await admin.hgetall(key)
        assert set(fields) == {b"r", b"t", b"at"}
        assert float(fields[b"r"]) == 4.0
        assert float(fields[b"t"]) == 700.0
        decision = await limiter.acquire("acme", Quota(rpm=5, tpm=1000), 0)
        fields = await admin.hgetall(key)
        # a few microseconds of refill: kept as a fraction, not truncated to an integer
        assert 3.0 < float(fields[b"r"]) < 3.01
        assert decision.requests.remaining == 3
    finally:
        await limiter.close()


async def evalsha_calls(admin: Redis) -> int:
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.parametrize("max_batch", [1, 16, 128])
async def test_a_burst_is_batched_on_one_connection(server: RedisServer, admin: Redis,
                                                    max_batch: int) -> None:
    """300 callers at once: the queue goes out in batches of at most max_batch, one call in
    flight (redis-py's pool would refuse callers beyond its size, reading as Redis failing)."""
    limiter = RedisLimiter(server.url, timeout=2.0, max_batch=max_batch)
    try:
        await limiter.ping()
        before = await evalsha_calls(admin)
        quota = Quota(rpm=5, tpm=100_000)
        decisions = await asyncio.gather(*(limiter.acquire("acme", quota, 1) for _ in range(300)))
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 295  # in call order
        calls = await evalsha_calls(admin) - before
        assert -(-300 // max_batch) <= calls <= -(-300 // max_batch) + 1
        clients = (await admin.info("clients"))["connected_clients"]
        assert clients <= 1 + 1 + 1  # this admin connection, the batches, _prepare's
    finally:
        await limiter.close()


@pytest.mark.parametrize(("settle_first", "allowed"), [(True, True), (False, False)])
async def test_operations_run_in_the_order_they_were_asked(
        server: RedisServer, settle_first: bool, allowed: bool) -> None:
    """A refund queued before a decision (in the same batch) is in force for it: the
    response's settle reaches Redis before the next request's acquire."""
    limiter = RedisLimiter(server.url, timeout=2.0)
    try:
        quota = Quota(rpm=100, tpm=1000)
        assert (await limiter.acquire("acme", quota, 900)).allowed
        if settle_first:
            refund = limiter.settle("acme", quota, -800, "redis")  # queued as it returns
            acquire = asyncio.ensure_future(limiter.acquire("acme", quota, 500))
        else:
            acquire = asyncio.ensure_future(limiter.acquire("acme", quota, 500))
            await asyncio.sleep(0)  # the acquire has run up to its wait: queued
            refund = limiter.settle("acme", quota, -800, "redis")
        await refund
        decision = await acquire
        assert isinstance(decision, Decision) and decision.allowed is allowed
    finally:
        await limiter.close()


async def test_a_caller_that_gave_up_is_not_sent(server: RedisServer, admin: Redis) -> None:
    """Queued behind a stalled batch, an acquire whose caller timed out is dropped, not charged
    when Redis wakes (the caller was told to fall back)."""
    limiter = RedisLimiter(server.url, timeout=2.0)
    try:
        await limiter.ping()
        sleeper = server.stall(0.5)
        await asyncio.sleep(0.1)  # DEBUG SLEEP has started
        quota = Quota(rpm=10, tpm=1000)
        in_flight = asyncio.ensure_future(limiter.acquire("first", quota, 1))
        await asyncio.sleep(0.05)  # sent, stalled
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(limiter.acquire("gave-up", quota, 1), 0.1)
        assert (await in_flight).allowed
        await asyncio.to_thread(sleeper.wait)
        await limiter.acquire("after", quota, 1)  # the queue has been sent since
        assert await admin.exists(redis_key("first"))
        assert not await admin.exists(redis_key("gave-up"))
    finally:
        await limiter.close()


async def test_a_failed_batch_fails_every_caller_and_recovers(server: RedisServer) -> None:
    limiter = RedisLimiter(server.url, timeout=0.5)
    try:
        quota = Quota(rpm=10, tpm=1000)
        await limiter.acquire("acme", quota, 1)
        server.kill()
        results = await asyncio.gather(*(limiter.acquire("acme", quota, 1) for _ in range(20)),
                                       return_exceptions=True)
        assert all(isinstance(r, (RedisConnectionError, RedisTimeoutError, OSError))
                   for r in results), results
        server.start()
        decision = await limiter.acquire("acme", quota, 1)
        assert decision.allowed  # a new server: the bucket starts full again
    finally:
        await limiter.close()


async def test_a_settle_rides_with_the_next_decision(server: RedisServer, admin: Redis) -> None:
    """A correction is not sent alone when a decision follows it: one call carries both."""
    limiter = RedisLimiter(server.url, timeout=2.0)
    try:
        quota = Quota(rpm=10, tpm=1000)
        await limiter.acquire("acme", quota, 500)
        before = await evalsha_calls(admin)
        refund = limiter.settle("acme", quota, -400, "redis")
        decision = await limiter.acquire("acme", quota, 800)  # fits only after the refund
        await refund
        assert decision.allowed
        assert await evalsha_calls(admin) - before == 1
        # alone, it is sent after SETTLE_DELAY
        started = time.perf_counter()
        await limiter.settle("acme", quota, -100, "redis")
        assert time.perf_counter() - started < SETTLE_DELAY + 0.5
        assert await evalsha_calls(admin) - before == 2
    finally:
        await limiter.close()


async def test_close_sends_what_is_queued(server: RedisServer, admin: Redis) -> None:
    limiter = RedisLimiter(server.url, timeout=2.0)
    quota = Quota(rpm=10, tpm=1000)
    await limiter.acquire("acme", quota, 500)
    refund = limiter.settle("acme", quota, -300, "redis")
    await limiter.close()
    await refund
    assert float((await admin.hgetall(redis_key("acme")))[b"t"]) > 790


async def test_close_gives_up_on_a_stalled_redis_after_the_timeout(server: RedisServer) -> None:
    limiter = RedisLimiter(server.url, timeout=TIMEOUT)
    await limiter.ping()
    sleeper = server.stall(1)
    await asyncio.sleep(0.1)
    quota = Quota(rpm=10, tpm=1000)
    waiting = [asyncio.ensure_future(limiter.acquire("acme", quota, 1)) for _ in range(3)]
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await limiter.close()
    assert time.perf_counter() - started < TIMEOUT + SLACK
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, (asyncio.CancelledError, RedisTimeoutError)) for r in results), \
        results
    await asyncio.to_thread(sleeper.wait)


# --------------------------------------------------------------------------- no retries


async def test_a_timed_out_acquire_is_sent_once(server: RedisServer, admin: Redis) -> None:
    """A client retry would send the script again, and both copies run once Redis wakes."""
    limiter = RedisLimiter(server.url, timeout=TIMEOUT)
    try:
        await limiter.ping()  # connect and load the script first
        sleeper = server.stall(1)
        started = time.perf_counter()
        with pytest.raises(RedisTimeoutError):
            await limiter.acquire("acme", Quota(rpm=10, tpm=1000), 100)
        assert time.perf_counter() - started < TIMEOUT + SLACK
        await asyncio.to_thread(sleeper.wait)
        fields = await admin.hgetall(redis_key("acme"))
        assert float(fields[b"r"]) == 9.0  # charged once (a retry would leave 8.00...)
        assert float(fields[b"t"]) == 900.0
    finally:
        await limiter.close()


async def test_no_retry_when_redis_is_unreachable() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout=TIMEOUT)
    try:
        started = time.perf_counter()
        with pytest.raises(RedisConnectionError):
            await limiter.acquire("acme", Quota(rpm=1, tpm=1), 0)
        assert time.perf_counter() - started < 0.05  # refused at once, not retried with backoff
        await limiter.settle("acme", Quota(rpm=1, tpm=1), 0, "redis")  # no round trip at all
        with pytest.raises(RedisConnectionError):
            await limiter.settle("acme", Quota(rpm=1, tpm=1), 1, "redis")
    finally:
        await limiter.close()


# --------------------------------------------------------------------------- failover


class StateLog:
    """Records on_state calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []

    def __call__(self, up: bool, why: str) -> None:
        self.calls.append((up, why))

    @property
    def ups(self) -> list[bool]:
        return [up for up, _ in self.calls]


def failover(server: RedisServer, on_error: str, states: StateLog) -> FailoverLimiter:
    return FailoverLimiter(
        RedisLimiter(server.url, timeout=TIMEOUT),
        on_error=on_error,
        timeout=TIMEOUT,
        fallback=MemoryLimiter(),
        probe_interval=PROBE,
        on_state=states,
    )


async def wait_healthy(limiter: FailoverLimiter, within: float) -> None:
    deadline = time.monotonic() + within
    while not limiter.healthy:
        assert time.monotonic() < deadline, "did not return to Redis"
        await asyncio.sleep(0.01)


Outcome = Decision | LimiterUnavailable


async def timed_acquire(limiter: FailoverLimiter, key: str, quota: Quota) -> tuple[float, Outcome]:
    """(seconds taken, the Decision or the LimiterUnavailable raised)."""
    started = time.perf_counter()
    try:
        outcome: Outcome = await limiter.acquire(key, quota, 10)
    except LimiterUnavailable as e:
        outcome = e
    return time.perf_counter() - started, outcome


def check_fallback(on_error: str, outcome: Outcome) -> None:
    """The outcome each mode promises while Redis is away."""
    if on_error == "closed":
        assert isinstance(outcome, LimiterUnavailable)
        return
    assert isinstance(outcome, Decision), outcome
    assert outcome.allowed
    assert outcome.backend == ("memory" if on_error == "local" else "open")


@pytest.mark.parametrize("on_error", ["local", "open", "closed"])
async def test_redis_killed_and_restarted(server: RedisServer, on_error: str) -> None:
    states = StateLog()
    limiter = failover(server, on_error, states)
    quota = Quota(rpm=3, tpm=1000)
    try:
        assert (await limiter.acquire("acme", quota, 10)).backend == "redis"
        server.kill()

        first, outcome = await timed_acquire(limiter, "acme", quota)
        assert first < TIMEOUT + SLACK
        check_fallback(on_error, outcome)
        assert not limiter.healthy
        assert limiter.fallback_active is (on_error == "local")
        assert states.ups == [False]
        assert states.calls[0][1]  # says why
        for _ in range(20):  # while down, Redis is not even tried
            spent, outcome = await timed_acquire(limiter, "acme", quota)
            assert spent < TIMEOUT / 2  # far from the timeout a try on a stalled Redis costs
        if on_error == "local":  # the local buckets still limit: 3 a minute
            assert isinstance(outcome, Decision)
            assert (outcome.allowed, outcome.refused) == (False, "requests")

        server.start()  # the same port, empty
        await wait_healthy(limiter, within=2.0)
        assert states.calls[1:] == [(True, "")]
        back = await limiter.acquire("acme", quota, 10)
        assert back.backend == "redis"
        assert back.requests.remaining == 2  # Redis lost its data: a fresh, shared bucket
    finally:
        await limiter.close()


@pytest.mark.parametrize("on_error", ["local", "open", "closed"])
async def test_redis_stalled(server: RedisServer, on_error: str) -> None:
    states = StateLog()
    limiter = failover(server, on_error, states)
    quota = Quota(rpm=100, tpm=100_000)
    try:
        assert (await limiter.acquire("acme", quota, 10)).backend == "redis"
        sleeper = server.stall(2)

        # requests in flight when Redis stalls each wait the timeout, no longer
        results = await asyncio.gather(*(timed_acquire(limiter, "acme", quota) for _ in range(5)))
        for spent, outcome in results:
            assert TIMEOUT * 0.9 < spent < TIMEOUT + SLACK
            check_fallback(on_error, outcome)
        assert states.ups == [False]  # once, however many failed together
        assert "timed out" in states.calls[0][1]
        for _ in range(20):
            spent, outcome = await timed_acquire(limiter, "acme", quota)
            assert spent < TIMEOUT / 2  # far from the timeout a try on a stalled Redis costs
            check_fallback(on_error, outcome)

        await asyncio.to_thread(sleeper.wait)
        await wait_healthy(limiter, within=PROBE + TIMEOUT + 1.0)
        assert states.ups == [False, True]
        assert (await limiter.acquire("acme", quota, 10)).backend == "redis"
    finally:
        await limiter.close()


async def test_closed_from_the_start_fails_fast() -> None:
    states = StateLog()
    url = f"redis://127.0.0.1:{free_port()}/0"
    limiter = FailoverLimiter(
        RedisLimiter(url, timeout=TIMEOUT), on_error="closed", timeout=TIMEOUT, on_state=states
    )
    try:
        with pytest.raises(LimiterUnavailable) as caught:
            await limiter.acquire("acme", Quota(rpm=1, tpm=1), 0)
        assert isinstance(caught.value.__cause__, RedisConnectionError)
        with pytest.raises(LimiterUnavailable) as caught:
            await limiter.acquire("acme", Quota(rpm=1, tpm=1), 0)
        assert caught.value.__cause__ is None  # not tried again while down
        assert states.ups == [False]
    finally:
        await limiter.close()


async def test_settle_goes_to_the_backend_that_decided(server: RedisServer, admin: Redis) -> None:
    states = StateLog()
    limiter = failover(server, "local", states)
    quota = Quota(rpm=10, tpm=1000)
    try:
        decided = await limiter.acquire("acme", quota, 100)
        await limiter.settle("acme", quota, 200, decided.backend)
        assert float(await admin.hget(redis_key("acme"), "t") or 0) == pytest.approx(700, abs=1)

        server.kill()
        local = await limiter.acquire("acme", quota, 100)
        assert local.backend == "memory"
        assert local.tokens.remaining == 900
        await limiter.settle("acme", quota, 500, local.backend)
        assert (await limiter.acquire("acme", quota, 0)).tokens.remaining == 400

        started = time.perf_counter()
        await limiter.settle("acme", quota, 500, "redis")  # Redis is down: dropped, no wait
        await limiter.settle("acme", quota, 500, "open")  # nothing to correct
        assert time.perf_counter() - started < TIMEOUT / 2
        assert (await limiter.acquire("acme", quota, 0)).tokens.remaining == 400
    finally:
        await limiter.close()


async def test_a_failing_settle_marks_redis_down(server: RedisServer) -> None:
    states = StateLog()
    limiter = failover(server, "local", states)
    quota = Quota(rpm=10, tpm=1000)
    try:
        decided = await limiter.acquire("acme", quota, 100)
        server.kill()
        await limiter.settle("acme", quota, 10, decided.backend)  # swallowed
        assert states.ups == [False]
        assert (await limiter.acquire("acme", quota, 0)).backend == "memory"
    finally:
        await limiter.close()


async def test_a_failed_ping_marks_redis_down(server: RedisServer) -> None:
    states = StateLog()
    limiter = failover(server, "closed", states)
    try:
        await limiter.ping()  # at start-up: connects and loads the script
        server.kill()
        with pytest.raises(RedisConnectionError):
            await limiter.ping()
        assert states.ups == [False]
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire("acme", Quota(rpm=1, tpm=1), 0)
        server.start()
        await wait_healthy(limiter, within=2.0)
        assert (await limiter.acquire("acme", Quota(rpm=1, tpm=1), 0)).backend == "redis"
    finally:
        await limiter.close()


def test_failover_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="on_error"):
        FailoverLimiter(MemoryLimiter(), on_error="fail", timeout=1.0)


# --------------------------------------------------------------------------- make_limiter


async def test_make_limiter(cluster: RedisCluster) -> None:
    memory = make_limiter(RateLimitSettings(backend="memory", on_error="local", timeout=0.05))
    assert isinstance(memory, MemoryLimiter)

    url = f"redis://127.0.0.1:{free_port()}/0"
    redis = make_limiter(RateLimitSettings(backend=url, on_error="closed", timeout=0.05))
    assert isinstance(redis, FailoverLimiter)
    assert redis.name == "redis"
    assert redis.on_error == "closed"
    await redis.close()

    states = StateLog()
    clustered = make_limiter(
        RateLimitSettings(backend=cluster.url, on_error="local", timeout=1.0), on_state=states
    )
    try:
        decision = await clustered.acquire("acme", Quota(rpm=1, tpm=10), 10)
        assert decision.backend == "redis"
        assert not (await clustered.acquire("acme", Quota(rpm=1, tpm=10), 0)).allowed
        await clustered.ping()
        assert states.calls == []
    finally:
        await clustered.close()
