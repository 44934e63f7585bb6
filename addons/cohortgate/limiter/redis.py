"""The Redis limiter: buckets shared by every replica, one Lua script per decision.

Each decision is one EVALSHA of bucket.lua (one round trip, atomic on the server), with the time
taken from the Redis server's own clock, so replicas whose clocks disagree still share one bucket.
Both buckets of a customer live in one hash, `cg:{<16 hex of sha256(key)>}:b`; the braces are a
Redis Cluster hash tag, so the script touches a single slot. Every key carries a TTL: it expires
once both buckets would be full again, which is the same as the key being absent.

Client retries are off: a retried EVALSHA whose first attempt did reach the server would charge
the request twice. A failure is raised to the caller (see failover.py), never repeated.
`redis+cluster://` and `rediss+cluster://` URLs select redis-py's Cluster client.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from importlib import resources
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cohortgate.config import Quota
from cohortgate.limiter.base import Decision
from cohortgate.limiter.base import Limiter
from cohortgate.limiter.base import Refused
from cohortgate.limiter.base import decision_from_levels

__all__ = ["BUCKET_SCRIPT", "RedisLimiter", "redis_key"]

BUCKET_SCRIPT: Final = resources.files("cohortgate.limiter").joinpath("bucket.lua").read_text()

_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_POOL_HEADROOM: Final = 4
_REFUSED: Final[dict[int, Refused | None]] = {0: None, 1: "requests", 2: "tokens"}


def redis_key(key: str) -> str:
    """The Redis key holding both buckets of `key`: a hash of it inside a Cluster hash tag.

    Hashed, so a customer id of any length or content makes a short, safe key name.
    """
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"cg:{{{digest[:16]}}}:b"


def _no_retry() -> Retry:
    """A retry policy that makes exactly one attempt (redis-py raises after `retries` + 1)."""
    return Retry(NoBackoff(), 0)


def _client(url: str, timeout: float, connections: int) -> Redis | RedisCluster:
    """A client for `url`: retries off, both socket timeouts `timeout` seconds, at most
    `connections` connections (per node, for a Cluster)."""
    scheme, sep, rest = url.partition("://")
    cluster_scheme = _CLUSTER_SCHEMES.get(scheme.lower())
    if cluster_scheme is not None:
        return RedisCluster.from_url(
            f"{cluster_scheme}{sep}{rest}",
            retry=_no_retry(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=connections,
        )
    return Redis.from_url(
        url,
        retry=_no_retry(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        max_connections=connections,
    )


class RedisLimiter(Limiter):
    """Token buckets in Redis (or Redis Cluster), shared by every process that uses the same URL."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        clock: Callable[[], float] | None = None,
        max_in_flight: int = 64,
    ) -> None:
        """`clock` (seconds) replaces the server's TIME: tests move time without sleeping.

        At most `max_in_flight` scripts run at once; more callers queue for a turn (redis-py's
        pool would refuse them with "Too many connections", which reads as Redis being down).
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        # headroom for _prepare's own commands next to a full set of scripts
        self._client = _client(url, timeout, max_in_flight + _POOL_HEADROOM)
        self._in_flight = asyncio.Semaphore(max_in_flight)
        self._clock = clock
        self._script = self._client.register_script(BUCKET_SCRIPT)
        self._lock = asyncio.Lock()
        self._ready = False  # topology known and script loaded since the last failure

    @property
    def cluster(self) -> bool:
        """Whether this limiter talks to a Redis Cluster."""
        return isinstance(self._client, RedisCluster)

    def _now(self) -> str:
        """ARGV[5]: the injected clock in microseconds, or "" for the server's TIME."""
        if self._clock is None:
            return ""
        return str(round(self._clock() * 1_000_000))

    async def _prepare(self, *, force: bool = False) -> None:
        """Before the first decision, and again after any failure: learn a Cluster's topology and
        load the script, one caller at a time.

        redis-py's asyncio Cluster client must be initialized before concurrent use (concurrent
        first commands fail with spurious connection errors); loading the script here spares the
        first decisions after a Redis restart a NOSCRIPT round trip each.
        """
        async with self._lock:
            if self._ready and not force:
                return
            self._ready = False
            if isinstance(self._client, RedisCluster):
                await self._client.initialize()
            await self._client.script_load(BUCKET_SCRIPT)
            self._ready = True

    async def _run(
        self, mode: str, key: str, quota: Quota, amount: int
    ) -> tuple[int, float, float]:
        if not self._ready:
            await self._prepare()
        try:
            async with self._in_flight:
                reply = await self._script(
                    keys=[redis_key(key)],
                    args=[mode, quota.rpm, quota.tpm, amount, self._now()],
                )
        except BaseException:
            self._ready = False  # a failure, a timeout or a cancel: check again before the next
            raise
        refused, requests_level, tokens_level = reply
        return int(refused), float(requests_level), float(tokens_level)

    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        """Take one request and `tokens` from `key`'s buckets, or nothing: one EVALSHA."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        code, requests_level, tokens_level = await self._run("acquire", key, quota, tokens)
        return decision_from_levels(
            quota, tokens, _REFUSED[code], requests_level, tokens_level, self.name
        )

    async def settle(self, key: str, quota: Quota, delta: int, backend: str) -> None:
        """Charge (or refund, when negative) `delta` tokens to `key`: one EVALSHA, none for 0."""
        if delta == 0:
            return
        await self._run("settle", key, quota, delta)

    async def ping(self) -> None:
        """Reach the server (every primary of a Cluster) and load the script there."""
        await self._prepare(force=True)

    async def close(self) -> None:
        """Close every connection of the client."""
        await self._client.aclose()
