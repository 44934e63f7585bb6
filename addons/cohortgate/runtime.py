"""The gate's live state: config, trust store, revocations, decision log, and their hot reload.

A `Runtime` is built whole from a config file or refused whole (ValueError), so the addon is
never half-configured. `poll()` reloads whatever changed on disk and keeps the last good state
when a reload fails, logging why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

from cohortgate.audit import DecisionLog
from cohortgate.config import Config
from cohortgate.config import load_config
from cohortgate.keys import TrustStore
from cohortgate.keys import load_trust_store
from cohortgate.limiter import Limiter
from cohortgate.limiter import make_limiter
from cohortgate.policy import Revocations
from cohortgate.policy import check_revocation
from cohortgate.policy import load_revocations
from cohortgate.revocation_sync import SharedRevocations
from cohortgate.verify import Approval
from cohortgate.verify import Verifier

logger = logging.getLogger("cohortgate")

FileStamp = tuple[int, int, int] | None


def file_stamp(path: Path | str | None) -> FileStamp:
    """What changes when a file is edited or replaced: (inode, size, mtime_ns), None if absent."""
    if path is None:
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


@dataclass
class Runtime:
    config: Config
    store: TrustStore
    verifier: Verifier
    revocations: Revocations  # from the revocation file
    log: DecisionLog
    limiter: Limiter
    shared: SharedRevocations | None  # the revocations in Redis, when the backend is Redis
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
        if is_url(config.authority.jwks):
            raise ValueError(
                f"{config_path}: authority.jwks: an https:// trust store is not supported yet; "
                "give a file path"
            )
        store = load_trust_store(config.authority.jwks)
        for why in store.skipped:
            logger.warning("trust store %s: skipped a key: %s", store.source, why)
        revocations = load_revocations(config.revocation.file)
        log = DecisionLog(config.log.decisions, config.log.rotate_bytes)
        try:
            limiter = make_limiter(config.ratelimit)
        except ValueError as e:
            log.close()
            raise ValueError(f"{config_path}: ratelimit.backend: {e}") from e
        shared = None
        if uses_redis(config):
            shared = SharedRevocations(config.ratelimit.backend,
                                       timeout=max(config.ratelimit.timeout, 1.0))
        rt = cls(config, store, Verifier(config.authority, store), revocations, log, limiter,
                 shared, overrides=(upstream, listen))
        rt.stamps = rt._current_stamps(config_path)
        return rt

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
        if now["jwks"] != self.stamps.get("jwks"):
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
        try:
            new = load_config(source, upstream=upstream, listen=listen)
            if is_url(new.authority.jwks):
                raise ValueError(f"{source}: authority.jwks: https:// is not supported yet")
            store = load_trust_store(new.authority.jwks)
            revocations = load_revocations(new.revocation.file)
        except ValueError as e:
            logger.error("config reload failed, keeping the last good config: %s", e)
            return False
        restart = self.config.reload_requires_restart(new)
        if new.log != self.config.log:
            restart.append("log")
        if new.ratelimit != self.config.ratelimit:
            restart.append("ratelimit")
        if restart:
            logger.warning(
                "config reloaded; %s changed and take effect only after a restart",
                ", ".join(restart),
            )
            self.pending_restart = restart
        self.config = new
        self.store = store
        self.verifier = Verifier(new.authority, store)
        self.revocations = revocations
        logger.info("config reloaded from %s", source)
        return True

    def _reload_store(self) -> bool:
        try:
            store = load_trust_store(self.config.authority.jwks)
        except ValueError as e:
            logger.error("trust store reload failed, keeping the last good keys: %s", e)
            return False
        for why in store.skipped:
            logger.warning("trust store %s: skipped a key: %s", store.source, why)
        self.store = store
        self.verifier = Verifier(self.config.authority, store)
        logger.info("trust store reloaded: %d keys", len(store.keys))
        return True

    def _reload_revocations(self) -> bool:
        try:
            revocations = load_revocations(self.config.revocation.file)
        except ValueError as e:
            logger.error("revocation reload failed, keeping the last good list: %s", e)
            return False
        self.revocations = revocations
        logger.info("revocations reloaded: %d entries", len(revocations))
        return True

    # ---- the request path -------------------------------------------------------------

    def verify(self, token: str, now: float) -> Approval:
        return self.verifier.verify(token, now)

    def check_revocation(self, approval: Approval) -> None:
        """The revocation file, then the local copy of Redis's list: no I/O."""
        check_revocation(approval, self.revocations)
        if self.shared is not None:
            check_revocation(approval, self.shared.current)

    # ---- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Start what needs the event loop: the Redis revocation sync."""
        if self.shared is not None:
            await self.shared.start()

    async def aclose(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        await self.limiter.close()
        self.log.close()

    def close(self) -> None:
        """Synchronous close for when no event loop runs any more: the log only."""
        self.log.close()
