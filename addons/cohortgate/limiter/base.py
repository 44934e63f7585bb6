"""The limiter interface: what a decision says, and the bucket arithmetic both backends share.

Each customer has two token buckets, requests and tokens, as OpenAI's own limits behave: a bucket
holds at most its per-minute limit and refills continuously at limit / 60 per second, so no window
boundary ever lets a burst of twice the limit through. `Limiter.acquire` refills both buckets and
then takes one request and the reserved tokens from them, or nothing at all; `Limiter.settle`
corrects the tokens bucket by what the response really used. The in-memory and Redis backends
differ only in where the two levels live; the numbers that go into the response headers are
computed here, once, from those two levels.
"""

from __future__ import annotations

import math
from abc import ABC
from abc import abstractmethod
from collections.abc import Awaitable
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any
from typing import Final
from typing import Literal

from cohortgate.config import Quota

__all__ = [
    "DONE",
    "EPSILON",
    "BucketState",
    "Decision",
    "Limiter",
    "LimiterUnavailable",
    "Refused",
    "decision_from_levels",
    "open_decision",
]

Refused = Literal["requests", "tokens"]

# Levels are doubles (in Lua too): a refill of 6 s at 1/12 per second may come out as 0.49999...
# instead of 0.5. A need within EPSILON of the level counts as met, so a caller that waits exactly
# `retry_after` is admitted; real levels are multiples of far coarser steps than this.
EPSILON: Final = 1e-9


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket as the `x-ratelimit-*` headers show it."""

    limit: int  # the per-minute limit (= bucket capacity)
    remaining: int  # whole units left now, clamped to >= 0
    reset: float  # seconds until the bucket is full again


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one `acquire`: admitted or not, and the state of both buckets after it."""

    allowed: bool
    refused: Refused | None  # which bucket refused (requests are checked first)
    requests: BucketState
    tokens: BucketState
    # 0 when allowed; else seconds until the request fits (math.inf when it never can)
    retry_after: float
    backend: str  # "memory" | "redis" | "open": who decided; settle() must go to the same one


class LimiterUnavailable(Exception):
    """The backend failed or timed out, and `ratelimit.on_error` is "closed"."""


class Limiter(ABC):
    """Per-key request and token buckets."""

    name: str

    @abstractmethod
    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        """Refill both buckets for the time passed, then take 1 request and `tokens`, or nothing.

        One atomic step: concurrent calls never both see the same last unit. A denied request is
        never charged.
        """

    @abstractmethod
    def settle(self, key: str, quota: Quota, delta: int, backend: str) -> Awaitable[object]:
        """Charge `delta` = actual tokens - reserved tokens to the tokens bucket of `key`.

        Positive takes more (the level may go below zero, so later requests wait); negative gives
        back, never above capacity; 0 does nothing. `backend` is the `Decision.backend` of the
        acquire being settled.

        Not a coroutine: the correction is applied or queued when this returns, ahead of any
        decision asked for afterwards, so a response need not wait for it. Await the result
        to know that it was applied (it raises when it could not be).
        """

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers; raise when it is unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and background tasks."""


class _Done:
    """An awaitable that is already done: the result of a settle with nothing left to do."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that ends at once


DONE: Final = _Done()


def _bucket(limit: int, level: float) -> BucketState:
    """The header view of a bucket holding `level` units of `limit`."""
    remaining = min(limit, max(0, math.floor(level + EPSILON)))
    reset = max(0.0, (limit - level) * 60.0 / limit)
    return BucketState(limit=limit, remaining=remaining, reset=reset)


def _wait(need: float, level: float, limit: int) -> float:
    """Seconds until a bucket of `limit` now holding `level` holds `need`."""
    if need > limit:
        return math.inf
    return max(0.0, (need - level) * 60.0 / limit)


def decision_from_levels(
    quota: Quota,
    tokens: int,
    refused: Refused | None,
    requests_level: float,
    tokens_level: float,
    backend: str,
) -> Decision:
    """The Decision for levels read after an acquire (after the take when it was allowed)."""
    if refused is None:
        retry_after = 0.0
    else:
        # The time until both buckets hold enough: retrying sooner is refused again.
        retry_after = max(
            _wait(1, requests_level, quota.rpm), _wait(tokens, tokens_level, quota.tpm)
        )
    return Decision(
        allowed=refused is None,
        refused=refused,
        requests=_bucket(quota.rpm, requests_level),
        tokens=_bucket(quota.tpm, tokens_level),
        retry_after=retry_after,
        backend=backend,
    )


def open_decision(quota: Quota) -> Decision:
    """Allowed without counting ("open" on_error): full buckets in the headers."""
    return Decision(
        allowed=True,
        refused=None,
        requests=BucketState(limit=quota.rpm, remaining=quota.rpm, reset=0.0),
        tokens=BucketState(limit=quota.tpm, remaining=quota.tpm, reset=0.0),
        retry_after=0.0,
        backend="open",
    )
