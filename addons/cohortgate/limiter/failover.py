"""What happens when the shared limiter fails: `ratelimit.on_error` = local, open or closed.

`FailoverLimiter` wraps the primary (Redis) limiter. Every call to it is bounded by `timeout`;
the first error or timeout marks it down, and from then on it is not called at all, so a request
costs nothing extra while Redis is away. One background task pings the primary every
`probe_interval` seconds and marks it up again when it answers; the limiter returns to the shared
buckets by itself. While down, `on_error` decides:

- "local":  a process-local MemoryLimiter decides (Decision.backend "memory");
- "open":   every request is allowed, with full-bucket headers (Decision.backend "open");
- "closed": `LimiterUnavailable` is raised (the proxy answers 503 `ratelimit_unavailable`).

`settle` goes to whichever backend made the decision, and is dropped (logged at debug) when that
backend is "open" or down: a lost correction is better than a request that waits on a dead store.

A call that timed out may still run on Redis once it wakes (the command had been sent): that
request is then charged there as well as decided by the fallback. The error is on the side of
counting, never of admitting twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from collections.abc import Callable
from typing import Final

from redis.exceptions import RedisError

from cohortgate.config import Quota
from cohortgate.limiter.base import DONE
from cohortgate.limiter.base import Decision
from cohortgate.limiter.base import Limiter
from cohortgate.limiter.base import LimiterUnavailable
from cohortgate.limiter.base import open_decision
from cohortgate.limiter.memory import MemoryLimiter

__all__ = ["ON_ERROR_MODES", "FailoverLimiter"]

ON_ERROR_MODES: Final = ("local", "open", "closed")

# What "the backend failed" means; anything else is a bug and propagates.
_BACKEND_ERRORS: Final = (RedisError, OSError, TimeoutError)

log = logging.getLogger(__name__)


def _describe(error: BaseException) -> str:
    """A one-line reason for logs and on_state: the type, and the message when there is one."""
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class FailoverLimiter(Limiter):
    """A primary limiter, with a fallback policy for when it fails and a probe that restores it."""

    def __init__(
        self,
        primary: Limiter,
        *,
        on_error: str,
        timeout: float,
        fallback: Limiter | None = None,
        probe_interval: float = 0.5,
        on_state: Callable[[bool, str], None] | None = None,
    ) -> None:
        if on_error not in ON_ERROR_MODES:
            raise ValueError(
                f"on_error must be one of {', '.join(ON_ERROR_MODES)}, got {on_error!r}"
            )
        if timeout <= 0 or probe_interval <= 0:
            raise ValueError("timeout and probe_interval must be positive")
        self.name = primary.name
        self._primary = primary
        self._fallback = fallback if fallback is not None else MemoryLimiter()
        self._on_error = on_error
        self._timeout = timeout
        self._probe_interval = probe_interval
        self._on_state = on_state
        self._healthy = True
        # Bumped on every down/up change: an error from a call that started before the last
        # change describes an outage that is already over (or already recorded).
        self._generation = 0
        self._probe: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """Whether the primary is in use (not marked down)."""
        return self._healthy

    @property
    def fallback_active(self) -> bool:
        """Whether decisions come from the local fallback now ("local" mode, primary down)."""
        return not self._healthy and self._on_error == "local"

    @property
    def on_error(self) -> str:
        """The mode in force while the primary is down."""
        return self._on_error

    async def acquire(self, key: str, quota: Quota, tokens: int) -> Decision:
        """The primary's decision, or the `on_error` policy's when the primary is down or fails."""
        if self._healthy:
            generation = self._generation
            try:
                async with asyncio.timeout(self._timeout):
                    return await self._primary.acquire(key, quota, tokens)
            except _BACKEND_ERRORS as e:
                self._mark_down(e, generation)
                cause: BaseException | None = e
        else:
            cause = None
        if self._on_error == "local":
            return await self._fallback.acquire(key, quota, tokens)
        if self._on_error == "open":
            return open_decision(quota)
        raise LimiterUnavailable(f"{self._primary.name} limiter unavailable") from cause

    def settle(self, key: str, quota: Quota, delta: int, backend: str) -> Awaitable[object]:
        """Send the correction to the backend that decided; drop it for "open" or a down primary.

        Queued with the primary at once; awaiting the result waits (bounded by the timeout) for
        it to be applied and marks the primary down when it fails."""
        if delta == 0:
            return DONE
        if backend == self._primary.name:
            if not self._healthy:
                log.debug("settle of %+d tokens dropped: %s is down", delta, backend)
                return DONE
            return self._primary_settled(
                self._primary.settle(key, quota, delta, backend), delta, self._generation)
        if backend == self._fallback.name:
            return self._fallback.settle(key, quota, delta, backend)
        log.debug("settle of %+d tokens dropped: decided by %s", delta, backend)
        return DONE

    async def _primary_settled(self, pending: Awaitable[object], delta: int,
                               generation: int) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await pending
        except _BACKEND_ERRORS as e:
            self._mark_down(e, generation)
            log.debug("settle of %+d tokens dropped: %s", delta, _describe(e))

    async def ping(self) -> None:
        """Ping the primary, bounded by the timeout; a failure marks it down (and is raised)."""
        generation = self._generation
        try:
            await self._ping_primary()
        except _BACKEND_ERRORS as e:
            self._mark_down(e, generation)
            raise

    async def _ping_primary(self) -> None:
        async with asyncio.timeout(self._timeout):
            await self._primary.ping()

    async def close(self) -> None:
        """Stop the probe, then close both limiters."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        await self._primary.close()
        await self._fallback.close()

    def _mark_down(self, error: BaseException, generation: int) -> None:
        if not self._healthy or generation != self._generation:
            return
        self._healthy = False
        self._generation += 1
        why = _describe(error)
        log.warning(
            "%s limiter down (%s); on_error=%s until it answers again",
            self._primary.name,
            why,
            self._on_error,
        )
        self._probe = asyncio.create_task(self._probe_until_up(), name="cohortgate-limiter-probe")
        if self._on_state is not None:
            self._on_state(False, why)

    def _mark_up(self) -> None:
        self._healthy = True
        self._generation += 1
        self._probe = None
        log.info("%s limiter back: its shared limits are in force again", self._primary.name)
        if self._on_state is not None:
            self._on_state(True, "")

    async def _probe_until_up(self) -> None:
        """Ping the primary every probe_interval until it answers, then mark it up."""
        while True:
            await asyncio.sleep(self._probe_interval)
            try:
                await self._ping_primary()
            except _BACKEND_ERRORS as e:
                log.debug("%s limiter still down: %s", self._primary.name, _describe(e))
                continue
            self._mark_up()
            return
