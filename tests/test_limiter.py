"""The limiter contract, run against both backends: MemoryLimiter and RedisLimiter.

Each Redis test gets a fresh redis-server of its own (tests/redis_server.py); time is an injected
clock (passed to the Lua script instead of the server's TIME), so refill is tested without sleeps.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Coroutine
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any
from typing import cast

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from cohortgate.config import Quota
from cohortgate.limiter import Decision
from cohortgate.limiter import Limiter
from cohortgate.limiter import MemoryLimiter
from cohortgate.limiter import RedisLimiter
from cohortgate.limiter.base import DONE
from cohortgate.limiter.base import EPSILON
from tests.redis_server import RedisServer
from tests.redis_server import redis_server


class Clock:
    """A clock that moves only when told, kept in whole microseconds so refills are exact."""

    def __init__(self, start: float = 1000.0) -> None:
        self.micros = round(start * 1_000_000)

    def __call__(self) -> float:
        return self.micros / 1_000_000

    def advance(self, seconds: float) -> None:
        self.micros += round(seconds * 1_000_000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["memory", "redis"])
async def limiter(
    request: pytest.FixtureRequest, clock: Clock, tmp_path: Path
) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        yield MemoryLimiter(clock=clock)
        return
    with redis_server(tmp_path / "redis") as server:
        redis_limiter = RedisLimiter(server.url, timeout=2.0, clock=clock)
        try:
            yield redis_limiter
        finally:
            await redis_limiter.close()


async def admitted(limiter: Limiter, key: str, quota: Quota, n: int, tokens: int = 0) -> int:
    """How many of `n` sequential acquires were allowed."""
    return sum([(await limiter.acquire(key, quota, tokens)).allowed for _ in range(n)])


# --------------------------------------------------------------------------- admission


async def test_concurrent_acquires_admit_exactly_the_limit(limiter: Limiter) -> None:
    quota = Quota(rpm=5, tpm=100_000)
    decisions = await asyncio.gather(*(limiter.acquire("acme", quota, 10) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 5
    refused = [d for d in decisions if not d.allowed]
    assert {d.refused for d in refused} == {"requests"}
    # the sixth request fits once one request has refilled: 60 s / 5
    assert all(d.retry_after == pytest.approx(12.0) for d in refused)
    assert sorted(d.requests.remaining for d in decisions if d.allowed) == [0, 1, 2, 3, 4]


async def test_a_new_key_starts_full(limiter: Limiter) -> None:
    decision = await limiter.acquire("new", Quota(rpm=3, tpm=1000), 1000)
    assert decision.allowed
    assert (decision.requests.remaining, decision.tokens.remaining) == (2, 0)


async def test_customers_are_independent(limiter: Limiter) -> None:
    quota = Quota(rpm=2, tpm=1000)
    assert await admitted(limiter, "alice", quota, 5) == 2
    bob = await limiter.acquire("bob", quota, 1000)
    assert bob.allowed
    assert bob.requests.remaining == 1
    assert not (await limiter.acquire("alice", quota, 0)).allowed
    # keys that hash alike in a naive scheme, and odd ones, are still separate customers
    for key in ["", "alice ", "ALICE", "al{ice}", "ünïcode", "x" * 10_000]:
        assert (await limiter.acquire(key, quota, 0)).allowed, key


async def test_negative_reservation_is_a_bug(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="negative"):
        await limiter.acquire("acme", Quota(rpm=1, tpm=1), -1)


# --------------------------------------------------------------------------- tokens


async def test_reservation_that_fits(limiter: Limiter) -> None:
    quota = Quota(rpm=100, tpm=1000)
    first = await limiter.acquire("acme", quota, 600)
    assert first.allowed
    assert first.refused is None
    assert first.retry_after == 0
    assert first.tokens.remaining == 400
    exact = await limiter.acquire("acme", quota, 400)  # exactly what is left
    assert exact.allowed
    assert exact.tokens.remaining == 0


async def test_reservation_that_does_not_fit(limiter: Limiter) -> None:
    quota = Quota(rpm=100, tpm=1000)  # tokens refill at 1000 / 60 per second
    await limiter.acquire("acme", quota, 600)
    refused = await limiter.acquire("acme", quota, 500)
    assert not refused.allowed
    assert refused.refused == "tokens"
    assert refused.retry_after == pytest.approx(100 * 60 / 1000)
    assert refused.tokens.remaining == 400


async def test_reservation_larger_than_the_capacity_never_fits(
    limiter: Limiter, clock: Clock
) -> None:
    quota = Quota(rpm=100, tpm=1000)
    decision = await limiter.acquire("acme", quota, 1001)
    assert (decision.allowed, decision.refused) == (False, "tokens")
    assert decision.retry_after == math.inf
    clock.advance(3600)
    assert not (await limiter.acquire("acme", quota, 1001)).allowed
    # nothing was taken: the whole bucket is still there
    assert (await limiter.acquire("acme", quota, 1000)).allowed


async def test_denied_on_tokens_takes_no_request(limiter: Limiter) -> None:
    quota = Quota(rpm=2, tpm=1000)
    assert (await limiter.acquire("acme", quota, 900)).allowed
    refused = await limiter.acquire("acme", quota, 200)
    assert refused.refused == "tokens"
    assert refused.requests.remaining == 1  # not charged
    assert refused.requests.reset == pytest.approx(30.0)
    last = await limiter.acquire("acme", quota, 100)
    assert last.allowed
    assert (last.requests.remaining, last.tokens.remaining) == (0, 0)


async def test_denied_on_requests_takes_no_tokens(limiter: Limiter) -> None:
    quota = Quota(rpm=1, tpm=1000)
    assert (await limiter.acquire("acme", quota, 100)).allowed
    refused = await limiter.acquire("acme", quota, 300)
    assert refused.refused == "requests"
    assert refused.tokens.remaining == 900  # not charged
    assert refused.retry_after == pytest.approx(60.0)


async def test_retry_after_waits_for_both_buckets(limiter: Limiter) -> None:
    quota = Quota(rpm=1, tpm=60)  # a request a minute, a token a second
    decision = await limiter.acquire("acme", quota, 60)
    await limiter.settle("acme", quota, 60, decision.backend)  # tokens at -60
    refused = await limiter.acquire("acme", quota, 60)
    assert refused.refused == "requests"  # requests are checked first
    # the request bucket is ready in 60 s, the 60 tokens only in 120 s: retrying sooner is futile
    assert refused.retry_after == pytest.approx(120.0)
    never = await limiter.acquire("acme", quota, 61)
    assert (never.refused, never.retry_after) == ("requests", math.inf)


# --------------------------------------------------------------------------- settle


async def test_settle_positive_drives_the_level_below_zero(limiter: Limiter, clock: Clock) -> None:
    quota = Quota(rpm=100, tpm=600)  # 10 tokens per second
    decision = await limiter.acquire("acme", quota, 100)
    await limiter.settle("acme", quota, 700, decision.backend)  # used 800, reserved 100
    refused = await limiter.acquire("acme", quota, 100)
    assert refused.refused == "tokens"
    assert refused.tokens.remaining == 0  # clamped, the level itself is -200
    assert refused.retry_after == pytest.approx(30.0)  # from -200 to 100 at 10/s
    assert refused.tokens.reset == pytest.approx(80.0)  # from -200 to 600
    clock.advance(29.9)
    assert not (await limiter.acquire("acme", quota, 100)).allowed
    clock.advance(0.1)
    allowed = await limiter.acquire("acme", quota, 100)
    assert allowed.allowed
    assert allowed.tokens.remaining == 0


async def test_settle_negative_refunds_up_to_capacity(limiter: Limiter) -> None:
    quota = Quota(rpm=100, tpm=1000)
    decision = await limiter.acquire("acme", quota, 300)
    await limiter.settle("acme", quota, -200, decision.backend)  # used 100 of 300
    after = await limiter.acquire("acme", quota, 0)
    assert after.tokens.remaining == 900
    await limiter.settle("acme", quota, -5000, decision.backend)
    full = await limiter.acquire("acme", quota, 0)
    assert full.tokens.remaining == 1000
    assert full.tokens.reset == 0
    assert full.requests.remaining == 97  # settle never touches the requests bucket


async def test_settle_zero_changes_nothing(limiter: Limiter) -> None:
    quota = Quota(rpm=10, tpm=100)
    decision = await limiter.acquire("acme", quota, 40)
    await limiter.settle("acme", quota, 0, decision.backend)
    after = await limiter.acquire("acme", quota, 0)
    assert after.tokens.remaining == 60


async def test_settle_of_an_unknown_key_starts_from_full(limiter: Limiter) -> None:
    quota = Quota(rpm=10, tpm=100)
    await limiter.settle("acme", quota, 150, limiter.name)
    refused = await limiter.acquire("acme", quota, 1)
    assert refused.refused == "tokens"
    assert refused.retry_after == pytest.approx(51 * 60 / 100)


# --------------------------------------------------------------------------- refill


async def test_refill_is_continuous(limiter: Limiter, clock: Clock) -> None:
    quota = Quota(rpm=60, tpm=1_000_000)
    assert await admitted(limiter, "acme", quota, 61) == 60
    clock.advance(6)
    assert await admitted(limiter, "acme", quota, 6) == 6
    seventh = await limiter.acquire("acme", quota, 0)
    assert not seventh.allowed
    assert seventh.retry_after == pytest.approx(1.0)
    clock.advance(0.5)
    assert not (await limiter.acquire("acme", quota, 0)).allowed
    clock.advance(0.5)
    assert (await limiter.acquire("acme", quota, 0)).allowed


async def test_no_burst_above_capacity_after_a_long_idle(limiter: Limiter, clock: Clock) -> None:
    quota = Quota(rpm=10, tpm=1000)
    assert await admitted(limiter, "acme", quota, 3) == 3
    clock.advance(86_400)
    assert await admitted(limiter, "acme", quota, 30) == 10
    clock.advance(86_400)
    assert (await limiter.acquire("acme", quota, 1000)).allowed
    assert not (await limiter.acquire("acme", quota, 1)).allowed


async def test_no_window_lets_twice_the_limit_through(limiter: Limiter, clock: Clock) -> None:
    """A fixed-window limiter admits 2x the limit around a boundary; a bucket never does."""
    quota = Quota(rpm=10, tpm=1_000_000)
    times: list[float] = []
    for _ in range(601):  # 5 minutes in steps of 0.5 s, 3 attempts each
        for _ in range(3):
            if (await limiter.acquire("acme", quota, 0)).allowed:
                times.append(clock())
        clock.advance(0.5)
    # it does let the steady rate through: the full bucket, then 10 a minute
    assert len(times) == 10 + 50
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t - start <= 60]
        assert len(in_window) <= 2 * quota.rpm
        # the bucket invariant: capacity + refill over the window
        for j, end in enumerate(in_window):
            assert j + 1 <= quota.rpm + (end - start) * quota.rpm / 60 + EPSILON


async def test_quota_change_clamps_the_level(limiter: Limiter) -> None:
    big, small = Quota(rpm=100, tpm=10_000), Quota(rpm=20, tpm=500)
    assert await admitted(limiter, "acme", big, 10, tokens=100) == 10  # 90 and 9000 left
    shrunk = await limiter.acquire("acme", small, 100)
    assert shrunk.allowed
    assert (shrunk.requests.limit, shrunk.tokens.limit) == (20, 500)
    assert (shrunk.requests.remaining, shrunk.tokens.remaining) == (19, 400)
    grown = await limiter.acquire("acme", big, 100)  # a larger quota does not refill at once
    assert (grown.requests.remaining, grown.tokens.remaining) == (18, 300)


# --------------------------------------------------------------------------- headers


async def test_header_values(limiter: Limiter, clock: Clock) -> None:
    quota = Quota(rpm=60, tpm=6000)  # 1 request and 100 tokens per second
    first = await limiter.acquire("acme", quota, 600)
    assert first.requests.limit == 60
    assert first.tokens.limit == 6000
    assert first.requests.remaining == 59
    assert first.requests.reset == pytest.approx(1.0)
    assert first.tokens.remaining == 5400
    assert first.tokens.reset == pytest.approx(6.0)
    clock.advance(0.5)
    second = await limiter.acquire("acme", quota, 0)
    # 59.5 - 1 = 58.5 requests: 58 whole ones, full in 1.5 s
    assert second.requests.remaining == 58
    assert second.requests.reset == pytest.approx(1.5)
    assert second.tokens.remaining == 5450
    assert second.tokens.reset == pytest.approx(5.5)
    assert second.backend == limiter.name


# --------------------------------------------------------------------------- memory only


async def test_memory_forgets_the_least_recently_used_key(clock: Clock) -> None:
    limiter = MemoryLimiter(clock=clock, max_keys=2)
    quota = Quota(rpm=1, tpm=100)
    assert (await limiter.acquire("a", quota, 0)).allowed
    assert (await limiter.acquire("b", quota, 0)).allowed
    assert not (await limiter.acquire("a", quota, 0)).allowed  # a is now the most recent
    assert (await limiter.acquire("c", quota, 0)).allowed  # b goes
    assert len(limiter) == 2
    assert not (await limiter.acquire("a", quota, 0)).allowed
    assert (await limiter.acquire("b", quota, 0)).allowed  # forgotten: full again


async def test_memory_drops_full_buckets(clock: Clock) -> None:
    limiter = MemoryLimiter(clock=clock)
    quota = Quota(rpm=60, tpm=600)
    decision = await limiter.acquire("a", quota, 100)
    assert len(limiter) == 1
    clock.advance(1)
    await limiter.settle("a", quota, -100, decision.backend)
    assert len(limiter) == 0


def test_memory_needs_room_for_a_key() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryLimiter(max_keys=0)


# --------------------------------------------------------------------------- the bucket model


@dataclass
class ModelBuckets:
    """The reference: exact fractions, times in whole milliseconds."""

    levels: tuple[Fraction, Fraction, int] | None = None  # requests, tokens, at; None = full

    def refilled(self, quota: Quota, now: int) -> tuple[Fraction, Fraction, int]:
        if self.levels is None:
            return Fraction(quota.rpm), Fraction(quota.tpm), now
        requests, tokens, at = self.levels
        elapsed = max(0, now - at)
        return (
            min(Fraction(quota.rpm), requests + Fraction(elapsed * quota.rpm, 60_000)),
            min(Fraction(quota.tpm), tokens + Fraction(elapsed * quota.tpm, 60_000)),
            max(at, now),
        )

    def store(self, quota: Quota, requests: Fraction, tokens: Fraction, at: int) -> None:
        full = requests >= quota.rpm and tokens >= quota.tpm
        self.levels = None if full else (requests, tokens, at)

    def acquire(self, quota: Quota, now: int, want: int) -> tuple[str | None, Fraction, Fraction]:
        requests, tokens, at = self.refilled(quota, now)
        if requests < 1:
            return "requests", requests, tokens
        if tokens < want:
            return "tokens", requests, tokens
        requests, tokens = requests - 1, tokens - want
        self.store(quota, requests, tokens, at)
        return None, requests, tokens

    def settle(self, quota: Quota, now: int, delta: int) -> None:
        requests, tokens, at = self.refilled(quota, now)
        self.store(quota, requests, min(Fraction(quota.tpm), tokens - delta), at)


QUOTAS = (Quota(rpm=3, tpm=500), Quota(rpm=7, tpm=2000), Quota(rpm=1, tpm=90))

operations = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.integers(0, 90_000)),
        st.tuples(st.just("acquire"), st.integers(0, 2_100)),
        st.tuples(st.just("settle"), st.integers(-3_000, 3_000)),
        st.tuples(st.just("quota"), st.integers(0, len(QUOTAS) - 1)),
    ),
    max_size=60,
)


async def check_against_model(
    limiter: Limiter, clock: Clock, ops: list[tuple[str, int]], key: str = "k"
) -> None:
    """Replay `ops` on `limiter` and on the model; every decision must match, and the admitted
    requests and tokens must obey the bucket invariant over every window."""
    model = ModelBuckets()
    quota = QUOTAS[0]
    now = 0  # ms since the start
    admitted_at: list[tuple[int, int]] = []  # (ms, tokens)
    refunds: list[tuple[int, int]] = []
    for op, value in ops:
        if op == "wait":
            now += value
            clock.advance(value / 1000)
        elif op == "quota":
            quota = QUOTAS[value]
        elif op == "settle":
            await limiter.settle(key, quota, value, limiter.name)
            model.settle(quota, now, value)
            if value < 0:
                refunds.append((now, -value))
        else:
            decision = await limiter.acquire(key, quota, value)
            refused, requests, tokens = model.acquire(quota, now, value)
            expected = (refused, max(0, math.floor(requests)), max(0, math.floor(tokens)))
            got = (decision.refused, decision.requests.remaining, decision.tokens.remaining)
            assert got == expected, (op, value, now)
            reset_requests = float((quota.rpm - requests) * 60 / quota.rpm)
            reset_tokens = float((quota.tpm - tokens) * 60 / quota.tpm)
            assert decision.requests.reset == pytest.approx(reset_requests, abs=1e-6)
            assert decision.tokens.reset == pytest.approx(reset_tokens, abs=1e-6)
            if decision.allowed:
                admitted_at.append((now, value))
    cap_r = max(q.rpm for q in QUOTAS)
    cap_t = max(q.tpm for q in QUOTAS)
    for i, (start, _) in enumerate(admitted_at):
        for j in range(i, len(admitted_at)):
            end = admitted_at[j][0]
            window = Fraction(end - start, 60_000)
            assert j - i + 1 <= cap_r + window * cap_r
            taken = sum(t for _, t in admitted_at[i : j + 1])
            given_back = sum(t for at, t in refunds if start <= at <= end)
            assert taken - given_back <= cap_t + window * cap_t


def run_now[T](coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that must not suspend: proves the memory limiter never awaits."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    raise AssertionError("the memory limiter suspended inside a decision")


class _SyncMemory(Limiter):
    """A MemoryLimiter whose every call is checked to complete without suspending."""

    name = "memory"

    def __init__(self, clock: Clock) -> None:
        self.inner = MemoryLimiter(clock=clock)

    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        return run_now(self.inner.acquire(key, quota, tokens))

    def settle(self, key: str, quota: Quota, delta: int, backend: str) -> Awaitable[object]:
        pending = self.inner.settle(key, quota, delta, backend)
        assert pending is DONE  # applied before it returned
        return pending

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


@settings(max_examples=300, deadline=None)
@given(ops=operations)
def test_memory_matches_the_bucket_model(ops: list[tuple[str, int]]) -> None:
    clock = Clock()
    run_now(check_against_model(_SyncMemory(clock), clock, ops))


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@settings(max_examples=40, deadline=None)
@given(ops=operations)
def test_redis_matches_the_bucket_model(
    shared_server: RedisServer, ops: list[tuple[str, int]]
) -> None:
    async def replay() -> None:
        clock = Clock()
        limiter = RedisLimiter(shared_server.url, timeout=2.0, clock=clock)
        try:
            await check_against_model(limiter, clock, ops, key=str(uuid.uuid4()))
        finally:
            await limiter.close()

    asyncio.run(replay())
