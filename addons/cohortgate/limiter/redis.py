"""The Redis limiter: buckets shared by every replica, decisions batched into one Lua script.

Decisions and corrections (settles) queue in the order they are asked for; one EVALSHA of
bucket.lua runs the whole queue (atomic on the server, in that order) while the next batch
gathers (group commit: one call in flight, batches grow with the load). A decision is sent at
once; a correction waits for the next decision's batch, at most SETTLE_DELAY, so a request
costs one round trip and, under load, a fraction of one. The time is taken from the
Redis server's own clock, so replicas whose clocks disagree still share one bucket.
Both buckets of a customer live in one hash, `cg:{<16 hex of sha256(key)>}:b`; the braces are a
Redis Cluster hash tag, so the script touches a single slot. Every key carries a TTL: it expires
once both buckets would be full again, which is the same as the key being absent.

Client retries are off: a retried EVALSHA whose first attempt did reach the server would charge
the requests twice. A failure is raised to every caller of the batch (see failover.py), never
repeated. On a Cluster a batch is split by hash slot, one script per slot, run concurrently.
`redis+cluster://` and `rediss+cluster://` URLs select redis-py's Cluster client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from cohortgate.config import Quota
from cohortgate.limiter.base import DONE
from cohortgate.limiter.base import Decision
from cohortgate.limiter.base import Limiter
from cohortgate.limiter.base import Refused
from cohortgate.limiter.base import decision_from_levels

__all__ = ["BUCKET_SCRIPT", "RedisLimiter", "redis_key"]

BUCKET_SCRIPT: Final = resources.files("cohortgate.limiter").joinpath("bucket.lua").read_text()

_CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_POOL_HEADROOM: Final = 4
_CLUSTER_CALLS: Final = 16
#: How long a correction may wait for a decision's batch to ride with before it is sent alone.
#: Other replicas see it that much later (a refund: they are stricter meanwhile).
SETTLE_DELAY: Final = 0.005
_Reply = tuple[int, float, float]
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


@dataclass(slots=True)
class _Op:
    """One queued decision or correction, and the future its caller waits on."""

    mode: str
    key: str  # the Redis key: redis_key() of the caller's key
    quota: Quota
    amount: int
    future: asyncio.Future[_Reply]


class RedisLimiter(Limiter):
    """Token buckets in Redis (or Redis Cluster), shared by every process that uses the same URL."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        clock: Callable[[], float] | None = None,
        max_batch: int = 128,
    ) -> None:
        """`clock` (seconds) replaces the server's TIME: tests move time without sleeping.

        At most `max_batch` operations go into one script call (a longer queue is sent in
        several, one after the other), so one call never holds Redis for long.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        # a Cluster batch runs one script per slot, at most _CLUSTER_CALLS at once
        self._client = _client(url, timeout, _CLUSTER_CALLS + _POOL_HEADROOM)
        self._cluster_calls = asyncio.Semaphore(_CLUSTER_CALLS)
        self._max_batch = max_batch
        self._timeout = timeout
        self._clock = clock
        self._script = self._client.register_script(BUCKET_SCRIPT)
        self._lock = asyncio.Lock()
        self._ready = False  # topology known and script loaded since the last failure
        self._queue: list[_Op] = []
        self._sender: asyncio.Task[None] | None = None
        self._flush_timer: asyncio.TimerHandle | None = None

    @property
    def cluster(self) -> bool:
        """Whether this limiter talks to a Redis Cluster."""
        return isinstance(self._client, RedisCluster)

    def _now(self) -> str:
        """ARGV[1]: the injected clock in microseconds, or "" for the server's TIME."""
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

    def _submit(self, mode: str, key: str, quota: Quota, amount: int, *,
                now: bool = True) -> asyncio.Future[_Reply]:
        """Queue one operation; the sender takes it with the next batch, started now or (for
        `now=False`) by the next operation that is, or after SETTLE_DELAY."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Reply] = loop.create_future()
        self._queue.append(_Op(mode, redis_key(key), quota, amount, future))
        if now:
            self._start_sender()
        elif self._flush_timer is None:
            self._flush_timer = loop.call_later(SETTLE_DELAY, self._start_sender)
        return future

    def _start_sender(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._queue and (self._sender is None or self._sender.done()):
            self._sender = asyncio.get_running_loop().create_task(
                self._send_queue(), name="cohortgate-redis-batch")

    async def _send_queue(self) -> None:
        """Send the queue, batch after batch, until it is empty (one batch in flight)."""
        while self._queue:
            # an operation whose caller gave up (a timeout) is not sent at all
            batch = [op for op in self._queue[: self._max_batch] if not op.future.done()]
            del self._queue[: self._max_batch]
            if not batch:
                continue
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                for op in batch + self._queue:
                    op.future.cancel()
                self._queue.clear()
                raise

    async def _send(self, batch: list[_Op]) -> None:
        try:
            if not self._ready:
                await self._prepare()
            if isinstance(self._client, RedisCluster):
                groups: dict[int, list[_Op]] = {}
                for op in batch:
                    groups.setdefault(key_slot(op.key.encode()), []).append(op)
                replies = await asyncio.gather(
                    *(self._cluster_call(group) for group in groups.values()))
                ordered = [op for group in groups.values() for op in group]
                flat = [value for reply in replies for value in reply]
            else:
                ordered = batch
                flat = await self._call(batch)
        except asyncio.CancelledError:
            self._ready = False
            raise
        except Exception as e:
            self._ready = False  # a failure or a timeout: check again before the next batch
            for op in batch:
                if not op.future.done():
                    op.future.set_exception(e)
            return
        for n, op in enumerate(ordered):
            if not op.future.done():  # its caller may have given up (a timeout)
                refused, requests_level, tokens_level = flat[3 * n: 3 * n + 3]
                op.future.set_result(
                    (int(refused), float(requests_level), float(tokens_level)))

    async def _cluster_call(self, ops: Sequence[_Op]) -> list[bytes | int]:
        async with self._cluster_calls:
            return await self._call(ops)

    async def _call(self, ops: Sequence[_Op]) -> list[bytes | int]:
        args: list[str | int] = [self._now()]
        for op in ops:
            args += (op.mode, op.quota.rpm, op.quota.tpm, op.amount)
        reply: list[bytes | int] = await self._script(keys=[op.key for op in ops], args=args)
        return reply

    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        """Take one request and `tokens` from `key`'s buckets, or nothing."""
        if tokens < 0:
            raise ValueError(f"tokens must not be negative, got {tokens}")
        code, requests_level, tokens_level = await self._submit("acquire", key, quota, tokens)
        return decision_from_levels(
            quota, tokens, _REFUSED[code], requests_level, tokens_level, self.name
        )

    def settle(self, key: str, quota: Quota, delta: int, backend: str) -> Awaitable[object]:
        """Charge (or refund, when negative) `delta` tokens to `key`; nothing is sent for 0.

        Queued at once, so it reaches Redis before any decision asked for after this call."""
        if delta == 0:
            return DONE
        return self._submit("settle", key, quota, delta, now=False)

    async def ping(self) -> None:
        """Reach the server (every primary of a Cluster) and load the script there."""
        await self._prepare(force=True)

    async def close(self) -> None:
        """Send what is queued (bounded by the timeout; then the rest is cancelled), then close
        every connection."""
        self._start_sender()
        if self._sender is not None and not self._sender.done():
            try:
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(self._sender)
            except TimeoutError:
                self._sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._sender
        await self._client.aclose()
