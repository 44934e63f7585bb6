"""Per-customer request and token rate limits: token buckets in memory or shared in Redis.

`make_limiter(settings)` builds the limiter the `[ratelimit]` config asks for: a MemoryLimiter for
"memory", else a RedisLimiter behind a FailoverLimiter that applies `on_error` when Redis fails.
The proxy calls `acquire` before forwarding, `settle` with the response's usage, and `close` on
shutdown. Nothing here imports mitmproxy.
"""

from __future__ import annotations

from collections.abc import Callable

from cohortgate.config import RateLimitSettings
from cohortgate.limiter.base import BucketState
from cohortgate.limiter.base import Decision
from cohortgate.limiter.base import Limiter
from cohortgate.limiter.base import LimiterUnavailable
from cohortgate.limiter.base import Refused
from cohortgate.limiter.failover import FailoverLimiter
from cohortgate.limiter.memory import MemoryLimiter
from cohortgate.limiter.redis import RedisLimiter
from cohortgate.limiter.redis import redis_key

__all__ = [
    "BucketState",
    "Decision",
    "FailoverLimiter",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RedisLimiter",
    "Refused",
    "make_limiter",
    "redis_key",
]


def make_limiter(
    settings: RateLimitSettings, *, on_state: Callable[[bool, str], None] | None = None
) -> Limiter:
    """The limiter for `settings`; `on_state(up, why)` hears when a Redis backend fails and returns.

    Building it opens no connection: the first acquire (or an explicit `ping`) does.
    """
    if settings.backend == "memory":
        return MemoryLimiter()
    return FailoverLimiter(
        RedisLimiter(settings.backend, timeout=settings.timeout),
        on_error=settings.on_error,
        timeout=settings.timeout,
        fallback=MemoryLimiter(),
        on_state=on_state,
    )
