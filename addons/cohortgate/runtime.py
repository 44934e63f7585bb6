"""The gate's live state: config, trust store, revocations, limiter, decision log, metrics,
and their hot reload.

A `Runtime` is built whole from a config file or refused whole (ValueError), so the addon is
never half-configured. `poll()` reloads whatever changed on disk and keeps the last good state
when a reload fails, logging why. `open()` starts what needs the event loop (the admin
listener, the Redis revocation sync, an https:// trust store); `aclose()` stops it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from cohortgate.admin import AdminServer
from cohortgate.admin import Metrics
from cohortgate.audit import DecisionLog
from cohortgate.audit import LogError
from cohortgate.config import Config
from cohortgate.config import load_config
from cohortgate.jwks_remote import RemoteJwks
from cohortgate.keys import TrustStore
from cohortgate.keys import load_trust_store
from cohortgate.limiter import FailoverLimiter
from cohortgate.limiter import Limiter
from cohortgate.limiter import make_limiter
from cohortgate.policy import NO_REVOCATIONS
from cohortgate.policy import Revocations
from cohortgate.policy import check_revocation
from cohortgate.policy import load_revocations
from cohortgate.reasons import KeysUnavailable
from cohortgate.reasons import UnknownKey
from cohortgate.revocation_sync import SharedRevocations
from cohortgate.verify import Approval
from cohortgate.verify import Verifier

logger = logging.getLogger("cohortgate")

FileStamp = tuple[int, int, int] | None

# Decision lines kept in memory, in order, while the log cannot be written (~1 KB each).
MAX_PENDING_LINES = 10_000


def file_stamp(path: Path | str | None) -> FileStamp:
    """What changes when a file is edited or replaced: (inode, size, mtime_ns), None if absent."""
    if path is None or is_url(str(path)):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def is_url(source: str) -> bool:
    return source.startswith("https://")


def uses_redis(config: Config) -> bool:
    return config.ratelimit.backend != "memory"


def load_file_store(source: str) -> TrustStore:
    store = load_trust_store(source)
    for why in store.skipped:
        logger.warning("trust store %s: skipped a key: %s", store.source, why)
    return store


@dataclass
class Runtime:
    config: Config
    log: DecisionLog
    limiter: Limiter
    metrics: Metrics
    revocations: Revocations = NO_REVOCATIONS  # from the revocation file
    store: TrustStore | None = None  # None only while an https:// trust store never loaded
    verifier: Verifier | None = None
    shared: SharedRevocations | None = None  # the revocations in Redis, with a Redis backend
    remote: RemoteJwks | None = None  # the trust store, when authority.jwks is an https:// URL
    admin: AdminServer | None = None
    dropped_lines: int = 0  # refusal lines not kept while the log could not be written
    stamps: dict[str, FileStamp] = field(default_factory=dict)
    # (upstream, listen, ...) keys changed on disk that only take effect after a restart
    pending_restart: list[str] = field(default_factory=list)
    # the command line's --upstream and --listen, which win over the file on every reload
    overrides: tuple[str | None, str | None] = (None, None)

    @classmethod
    def start(cls, config_path: Path, *, upstream: str | None = None,
              listen: str | None = None) -> Runtime:
        """Load everything, or raise ValueError saying what is wrong (file, key, why)."""
        config = load_config(config_path, upstream=upstream, listen=listen)
        jwks = config.authority.jwks
        store = None if is_url(jwks) else load_file_store(jwks)
        revocations = load_revocations(config.revocation.file)
        metrics = Metrics()

        def limiter_state(up: bool, why: str) -> None:
            metrics.set_fallback(not up)
            if up:
                logger.warning("rate limiter: %s is back", config.ratelimit.backend)
            else:
                metrics.limiter_error("redis")
                logger.warning("rate limiter: backend failed (%s); on_error = %s", why,
                               config.ratelimit.on_error)

        try:
            limiter = make_limiter(config.ratelimit, on_state=limiter_state)
        except ValueError as e:
            raise ValueError(f"{config_path}: ratelimit.backend: {e}") from e
        log = DecisionLog(config.log.decisions, config.log.rotate_bytes, background=True)
        rt = cls(config, log, limiter, metrics, revocations, overrides=(upstream, listen))
        if store is not None:
            rt._use_store(store)
        else:
            rt.remote = RemoteJwks(jwks, on_update=rt._use_store)
        if uses_redis(config):
            rt.shared = SharedRevocations(config.ratelimit.backend,
                                          timeout=max(config.ratelimit.timeout, 1.0),
                                          on_change=lambda _: rt._count_revocations())
        rt._count_revocations()
        rt.stamps = rt._current_stamps(config_path)
        return rt

    def _use_store(self, store: TrustStore) -> None:
        self.store = store
        self.verifier = Verifier(self.config.authority, store)
        self.metrics.trust_store_loaded(len(store.keys), time.time())

    def _count_revocations(self) -> None:
        shared = self.shared.current if self.shared is not None else NO_REVOCATIONS
        self.metrics.set_revocations(len(self.revocations.jti | shared.jti),
                                     len(self.revocations.customers | shared.customers))

    def _current_stamps(self, config_path: Path | None) -> dict[str, FileStamp]:
        return {
            "config": file_stamp(config_path),
            "jwks": file_stamp(self.config.authority.jwks),
            "revocations": file_stamp(self.config.revocation.file),
        }

    def poll(self) -> list[str]:
        """Reload what changed on disk; returns what was reloaded. Never raises."""
        source = self.config.source
        now = self._current_stamps(source)
        reloaded: list[str] = []
        if source is not None and now["config"] != self.stamps.get("config"):
            self.stamps["config"] = now["config"]
            if self._reload_config(source):
                reloaded.append("config")
            now = self._current_stamps(source)  # the new config may point at other files
        if self.remote is None and now["jwks"] != self.stamps.get("jwks"):
            self.stamps["jwks"] = now["jwks"]
            if self._reload_store():
                reloaded.append("jwks")
        if now["revocations"] != self.stamps.get("revocations"):
            self.stamps["revocations"] = now["revocations"]
            if self._reload_revocations():
                reloaded.append("revocations")
        return reloaded

    def _reload_config(self, source: Path) -> bool:
        upstream, listen = self.overrides
        old = self.config
        try:
            new = load_config(source, upstream=upstream, listen=listen)
            same_source = new.authority.jwks == old.authority.jwks
            store = None if is_url(new.authority.jwks) else load_file_store(new.authority.jwks)
            revocations = load_revocations(new.revocation.file)
        except ValueError as e:
            logger.error("config reload failed, keeping the last good config: %s", e)
            return False
        restart = old.reload_requires_restart(new)
        for name, changed in (("log", new.log != old.log),
                              ("ratelimit", new.ratelimit != old.ratelimit),
                              ("authority.jwks", not same_source and (
                                  is_url(new.authority.jwks) or self.remote is not None))):
            if changed:
                restart.append(name)
        if restart:
            logger.warning(
                "config reloaded; %s changed and take effect only after a restart",
                ", ".join(restart),
            )
            self.pending_restart = restart
        self.config = new
        if store is not None and self.remote is None:
            self._use_store(store)
        elif self.store is not None:
            self._use_store(self.store)  # the new authority settings, the same keys
        self.revocations = revocations
        self._count_revocations()
        logger.info("config reloaded from %s", source)
        return True

    def _reload_store(self) -> bool:
        try:
            store = load_file_store(self.config.authority.jwks)
        except ValueError as e:
            logger.error("trust store reload failed, keeping the last good keys: %s", e)
            return False
        self._use_store(store)
        logger.info("trust store reloaded: %d keys", len(store.keys))
        return True

    def _reload_revocations(self) -> bool:
        try:
            revocations = load_revocations(self.config.revocation.file)
        except ValueError as e:
            logger.error("revocation reload failed, keeping the last good list: %s", e)
            return False
        self.revocations = revocations
        self._count_revocations()
        logger.info("revocations reloaded: %d entries", len(revocations))
        return True

    # ---- the decision log ---------------------------------------------------------------

    def record(self, line: dict[str, Any]) -> None:
        """Chain a decision line; the log's writer thread puts it in the file.

        When the disk refuses it (full, read-only), the writer keeps the lines in chain
        order and retries; meanwhile `audit_ok` is False and the gate serves nothing (a
        decision that cannot be recorded is not made). Once MAX_PENDING_LINES wait, further
        lines (refusals only, by then) are counted and dropped rather than exhaust memory.
        """
        log = self.log
        if log.failing is not None:
            self.metrics.log_write_error()
            if log.backlog >= MAX_PENDING_LINES:
                self.dropped_lines += 1
                return
        try:
            log.write(line)
        except (OSError, LogError) as e:  # only without the writer thread
            self.metrics.log_write_error()
            logger.error("decision log: cannot write: %s", e)

    @property
    def audit_ok(self) -> bool:
        return self.log.failing is None

    # ---- the request path -------------------------------------------------------------

    def verify(self, token: str, now: float) -> Approval:
        verifier = self.verifier
        if verifier is None:
            raise KeysUnavailable()
        try:
            return verifier.verify(token, now)
        except UnknownKey:
            if self.remote is not None:
                self.remote.refresh_soon()  # a rotated key, perhaps; this request still fails
            raise

    def check_revocation(self, approval: Approval) -> None:
        """The revocation file, then the local copy of Redis's list: no I/O."""
        check_revocation(approval, self.revocations)
        if self.shared is not None:
            check_revocation(approval, self.shared.current)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For /readyz: a trust store is loaded, and the limiter decides (Redis or fallback)."""
        checks: dict[str, str] = {}
        ready = True
        if self.store is None:
            ready = False
            checks["trust_store"] = "no key loaded yet"
        else:
            checks["trust_store"] = f"{len(self.store.keys)} keys"
        limiter = self.limiter
        if isinstance(limiter, FailoverLimiter) and not limiter.healthy:
            if limiter.on_error == "closed":
                ready = False
                checks["ratelimit"] = "redis down; on_error = closed refuses requests"
            else:
                checks["ratelimit"] = f"redis down; on_error = {limiter.on_error} in use"
        else:
            checks["ratelimit"] = "ok"
        if self.log.failing is not None:
            ready = False
            checks["decision_log"] = (f"cannot write ({self.log.failing}); "
                                      f"{self.log.backlog} lines waiting, "
                                      f"{self.dropped_lines} refusal lines dropped")
        else:
            checks["decision_log"] = "ok"
        return ready, {"ready": ready, "checks": checks}

    # ---- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Start what needs the event loop: the admin listener, the https:// trust store,
        the Redis revocation sync."""
        host, port = self.config.admin_listen
        self.admin = AdminServer(host, port, metrics=self.metrics, ready=self.readiness,
                                 audit_head=self.log.head)
        await self.admin.start()
        if self.remote is not None:
            await self.remote.start()
        if self.shared is not None:
            await self.shared.start()

    async def aclose(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        if self.remote is not None:
            await self.remote.close()
        if self.shared is not None:
            await self.shared.close()
        await self.limiter.close()
        self.log.close()

    def close(self) -> None:
        """Synchronous close for when no event loop runs any more: the log only."""
        self.log.close()
