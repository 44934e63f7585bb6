"""The in-memory limiter: one process's buckets in a bounded dict, the embedded default.

asyncio-safe without locks: `acquire` and `settle` never await, so each runs to completion before
any other coroutine sees the buckets. The dict holds at most `max_keys` customers; the least
recently used goes first. Dropping a key is the same as resetting it to full, which loses nothing
for a bucket that had refilled anyway (the least recently used one almost always has: a bucket is
full again at most a minute after its last request, unless usage drove it below zero).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable
from collections.abc import Callable

from cohortgate.config import Quota
from cohortgate.limiter.base import DONE
from cohortgate.limiter.base import EPSILON
from cohortgate.limiter.base import Decision
from cohortgate.limiter.base import Limiter
from cohortgate.limiter.base import Refused
from cohortgate.limiter.base import decision_from_levels

__all__ = ["MemoryLimiter"]


class _Buckets:
    """Both levels of one key, as of `at` (clock seconds)."""

    __slots__ = ("at", "requests", "tokens")

    def __init__(self, requests: float, tokens: float, at: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.at = at


class MemoryLimiter(Limiter):
    """Token buckets in this process's memory."""

    name = "memory"

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Buckets] = OrderedDict()

    def __len__(self) -> int:
        """How many keys are held (full buckets may or may not be)."""
        return len(self._buckets)

    def _levels(self, key: str, quota: Quota, now: float) -> tuple[float, float, float]:
        """Both levels of `key` refilled up to `now`, clamped to `quota`, and the time they hold at.

        A clock that went backwards refills nothing and keeps the later time.
        """
        buckets = self._buckets.get(key)
        if buckets is None:
            return float(quota.rpm), float(quota.tpm), now
        self._buckets.move_to_end(key)
        elapsed = now - buckets.at
        if elapsed <= 0:
            return min(buckets.requests, quota.rpm), min(buckets.tokens, quota.tpm), buckets.at
        requests = min(quota.rpm, buckets.requests + elapsed * quota.rpm / 60.0)
        tokens = min(quota.tpm, buckets.tokens + elapsed * quota.tpm / 60.0)
        return requests, tokens, now

    def _store(self, key: str, quota: Quota, requests: float, tokens: float, at: float) -> None:
        if requests >= quota.rpm and tokens >= quota.tpm:
            self._buckets.pop(key, None)  # full: the same as absent
            return
        buckets = self._buckets.get(key)
        if buckets is not None:
            buckets.requests, buckets.tokens, buckets.at = requests, tokens, at
            return
        self._buckets[key] = _Buckets(requests, tokens, at)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        """Take one request and `tokens` from `key`'s buckets, or nothing (see Limiter)."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        requests_level, tokens_level, at = self._levels(key, quota, self._clock())
        refused: Refused | None = None
        if requests_level < 1 - EPSILON:
            refused = "requests"
        elif tokens_level < tokens - EPSILON:
            refused = "tokens"
        else:
            requests_level -= 1
            tokens_level -= tokens
            self._store(key, quota, requests_level, tokens_level, at)
        return decision_from_levels(quota, tokens, refused, requests_level, tokens_level, self.name)

    def settle(self, key: str, quota: Quota, delta: int, backend: str) -> Awaitable[object]:
        """Charge (or refund, when negative) `delta` tokens to `key` (see Limiter), at once."""
        if delta:
            requests_level, tokens_level, at = self._levels(key, quota, self._clock())
            tokens_level = min(float(quota.tpm), tokens_level - delta)
            self._store(key, quota, requests_level, tokens_level, at)
        return DONE

    async def ping(self) -> None:
        """Memory always answers."""

    async def close(self) -> None:
        """Forget every bucket."""
        self._buckets.clear()
