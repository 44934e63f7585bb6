"""Revocations shared through Redis, with a local copy on every replica.

`cohortgate revoke` with a Redis backend calls `publish_revocation`: it records the entry in one
of two Redis hashes and publishes a one-word "something changed" on a channel. Each proxy
replica runs one `SharedRevocations`: a background task that subscribes to that channel and
re-reads both hashes whole right after subscribing, on every message, and every
`sync_interval` seconds (which also catches a lost message and an entry deleted by hand). The
request path reads `SharedRevocations.current`, a frozen `Revocations`, and never waits on
Redis; when Redis is away the last good copy stays in force and the task reconnects by itself.

Both hashes carry the `{revocations}` hash tag, so in a Redis Cluster they live in one slot.
Classic pub/sub (PUBLISH/SUBSCRIBE) is broadcast to every node of a cluster, so the
subscriber may sit on any node; redis-py's cluster pubsub picks the node serving the channel's
slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cohortgate.policy import NO_REVOCATIONS
from cohortgate.policy import Revocations

logger = logging.getLogger("cohortgate.revocations")

JTI_KEY = "cg:{revocations}:jti"  # hash: jti -> JSON {"reason": str, "at": rfc3339}
CUSTOMERS_KEY = "cg:{revocations}:customers"  # hash: sub -> JSON {"reason": str, "at": rfc3339}
CHANNEL = "cg:revocations"  # pub/sub: a message means "something changed, resync"

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0

RedisClient = redis.Redis | RedisCluster


def redis_client(url: str, *, timeout: float) -> RedisClient:
    """A client for `url`, without client-side retries, every socket operation bounded by `timeout`.

    redis://, rediss:// and unix:// give a plain client; redis+cluster:// and rediss+cluster://
    a cluster client (the URL names one startup node). No retries: a command that timed out
    may have run, and running it twice is the caller's decision.
    """
    scheme, sep, rest = url.partition("://")
    no_retries = Retry(NoBackoff(), 0)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": no_retries,
    }
    cluster_scheme = _CLUSTER_SCHEMES.get(scheme.lower()) if sep else None
    if cluster_scheme is not None:
        return RedisCluster.from_url(f"{cluster_scheme}://{rest}", **options)
    client: redis.Redis = redis.Redis.from_url(url, **options)
    return client


def _key_for(jti: str | None, customer: str | None) -> tuple[str, str]:
    if (jti is None) == (customer is None):
        raise ValueError("give exactly one of a jti or a customer")
    if jti is not None:
        return JTI_KEY, jti
    assert customer is not None
    return CUSTOMERS_KEY, customer


async def publish_revocation(
        url: str, *, jti: str | None, customer: str | None, reason: str, at: str,
        timeout: float = 2.0,  # noqa: ASYNC109 - bounds each socket operation, not a deadline
) -> bool:
    """Record a revocation in Redis and tell every replica; False when it was already there.

    Publishes even when the entry was there already: a previous `revoke` may have died between
    the two commands, and a needless resync costs nothing. Redis errors propagate.
    """
    key, ident = _key_for(jti, customer)
    entry = json.dumps({"reason": reason, "at": at}, ensure_ascii=False, sort_keys=True)
    client = redis_client(url, timeout=timeout)
    try:
        added = await client.hsetnx(key, ident, entry)
        await client.publish(CHANNEL, key)
    finally:
        await client.aclose()
    return bool(added)


def _decode_id(raw: bytes | str) -> str:
    # surrogateescape: an id that is not UTF-8 still counts, and can only match itself
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


class SharedRevocations:
    """A local copy of the revocations kept in Redis.

    The request path reads `.current`, never Redis.
    """

    def __init__(self, url: str, *, timeout: float = 1.0, sync_interval: float = 5.0,
                 on_change: Callable[[Revocations], None] | None = None) -> None:
        if timeout <= 0 or sync_interval <= 0:
            raise ValueError("timeout and sync_interval must be positive")
        self.url = url
        self.timeout = timeout
        self.sync_interval = sync_interval
        self.on_change = on_change
        self.current: Revocations = NO_REVOCATIONS
        self.synced = False
        self._client: RedisClient | None = None
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_attempt: asyncio.Event | None = None
        self._backoff = _FIRST_BACKOFF
        self._outage = False
        self._reported: set[tuple[str, str, bytes]] = set()  # malformed entries already logged

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background sync; returns after the first attempt or `timeout`. Never raises.

        Waiting for the first attempt means a replica that starts beside a reachable Redis
        enforces its revocations from the first request.
        """
        if self._task is not None:
            return
        self._first_attempt = asyncio.Event()
        try:
            self._client = redis_client(self.url, timeout=self.timeout)
        except Exception as e:  # a malformed URL: config validation should have caught it
            logger.warning("revocations in Redis: cannot use %s: %s", _safe_url(self.url), e)
            return
        self._task = asyncio.create_task(self._run(), name="cohortgate-revocation-sync")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), self.timeout)

    async def close(self) -> None:
        """Stop the task and close the connections; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop_pubsub()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    @property
    def running(self) -> bool:
        """The background task is alive (it only ends through close())."""
        return self._task is not None and not self._task.done()

    # ---- the background task -------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._lost(e)
                await self._drop_pubsub()
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, _MAX_BACKOFF)

    async def _follow(self) -> None:
        """Subscribe, sync, then resync on every message and every sync_interval.

        Returns only by raising: any error ends this connection and `_run` starts over.
        """
        client = self._client
        assert client is not None
        if isinstance(client, RedisCluster):
            await client.initialize()  # the pubsub needs the slot map to pick its node
        pubsub = client.pubsub()
        self._pubsub = pubsub
        await pubsub.subscribe(CHANNEL)
        await self._sync()  # after SUBSCRIBE: a change from now on arrives as a message
        loop = asyncio.get_running_loop()
        next_sync = loop.time() + self.sync_interval
        while True:
            wait = max(0.0, next_sync - loop.time())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is not None:
                # a burst of revocations costs one resync
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                    pass
            elif loop.time() < next_sync:
                continue  # a subscribe confirmation
            await self._sync()
            next_sync = loop.time() + self.sync_interval

    async def _sync(self) -> None:
        client = self._client
        assert client is not None
        jti_raw = await client.hgetall(JTI_KEY)
        customers_raw = await client.hgetall(CUSTOMERS_KEY)
        new = Revocations(jti=self._ids("jti", jti_raw),
                          customers=self._ids("customers", customers_raw))
        self._recovered()
        if new != self.current:
            self.current = new
            self._notify(new)

    def _ids(self, section: str, entries: Mapping[bytes | str, bytes | str]) -> frozenset[str]:
        """Every field of the hash is revoked; a malformed value is logged, never skipped."""
        ids = []
        for raw_id, value in entries.items():
            ident = _decode_id(raw_id)
            raw_entry = value.encode() if isinstance(value, str) else value
            ids.append(ident)
            problem = _entry_problem(raw_entry)
            if problem is not None and (section, ident, raw_entry) not in self._reported:
                self._reported.add((section, ident, raw_entry))
                logger.warning("revocations in Redis: %s %r: %s (still revoked)",
                               section, ident, problem)
        return frozenset(ids)

    def _notify(self, new: Revocations) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(new)
        except Exception:
            logger.exception("revocations in Redis: the on_change callback failed")

    def _recovered(self) -> None:
        if self._outage:
            logger.warning("revocations in Redis: %s is back; resynced",
                           _safe_url(self.url))
        self._outage = False
        self._backoff = _FIRST_BACKOFF
        self.synced = True
        self._mark_first_attempt()

    def _lost(self, error: Exception) -> None:
        if not self._outage:
            self._outage = True
            logger.warning(
                "revocations in Redis: cannot sync with %s (%s: %s); keeping the last copy "
                "(%d entries) and retrying", _safe_url(self.url), type(error).__name__, error,
                len(self.current))
        self._mark_first_attempt()

    def _mark_first_attempt(self) -> None:
        if self._first_attempt is not None:
            self._first_attempt.set()

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _entry_problem(raw: bytes) -> str | None:
    """Why a hash value is not `{"reason": str, "at": str}`, or None when it is."""
    try:
        entry = json.loads(raw)
    except ValueError:
        return "the value is not JSON"
    if not isinstance(entry, dict):
        return "the value is not a JSON object"
    if not isinstance(entry.get("reason"), str) or not isinstance(entry.get("at"), str):
        return 'the value lacks "reason" or "at"'
    return None


def _safe_url(url: str) -> str:
    """The URL without a password, for logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{hostpart}"
