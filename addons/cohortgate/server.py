"""`cohortgate serve`: a lean mitmproxy master running the gate in reverse-proxy mode.

Only the addons a gate needs are loaded (core, proxy server, layer selection, TLS, startup
error check, the gate): stock mitmdump walks some thirty built-in addons on every hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import exceptions
from mitmproxy import flow
from mitmproxy import hooks
from mitmproxy import options
from mitmproxy.addonmanager import AddonManager
from mitmproxy.addonmanager import traverse
from mitmproxy.addons import core
from mitmproxy.addons import errorcheck
from mitmproxy.addons import next_layer
from mitmproxy.addons import proxyserver
from mitmproxy.addons import tlsconfig
from mitmproxy.master import Master

from cohortgate.addon import CohortGate
from cohortgate.runtime import Runtime

logger = logging.getLogger("cohortgate")

# A reasoning model can think for minutes before its first byte; mitmproxy's default idle
# timeout (600 s) would cut such a stream.
IDLE_TIMEOUT = 3600


def skip_debug_type_checks() -> None:
    """mitmproxy type-checks every field of every request and response it builds, inside
    `if __debug__:` (what `python -O` removes): about 6% of the CPU per request. `serve` does
    without it; mitmdump running the addon keeps it. tests/test_server.py guards the name."""
    from mitmproxy.http import MessageData

    if "__post_init__" in vars(MessageData):
        # a no-op, not a deletion: the dataclasses' generated __init__ calls the hook
        MessageData.__post_init__ = _no_post_init  # type: ignore[method-assign]


def _no_post_init(self: object) -> None:
    return None


class LeanAddons(AddonManager):
    """mitmproxy's AddonManager with each hook's handlers looked up once, not on every event.

    The stock manager walks every addon for every hook of every flow (a generator, a
    `getattr`, a `safecall` context manager and a coroutine per addon, twice: the hook and
    an `update` hook after it), most of them without a handler: ~15% of the gate's CPU.
    Here a hook's handlers are found once per chain change; errors are logged as the stock
    `safecall` logs them and `AddonHalt` still stops the chain. Synchronous `trigger` and the
    lifecycle events (load, configure, done) are the stock ones.
    """

    def __init__(self, master: Any) -> None:
        super().__init__(master)  # type: ignore[no-untyped-call]
        self._handlers: dict[str, list[tuple[Callable[..., Any], bool]]] = {}

    def handlers(self, name: str) -> list[tuple[Callable[..., Any], bool]]:
        """(handler, is a coroutine function) of every addon in the chain that has `name`."""
        found = self._handlers.get(name)
        if found is None:
            found = []
            for addon in traverse(self.chain):
                func = getattr(addon, name, None)
                if func is not None and callable(func):
                    found.append((func, inspect.iscoroutinefunction(func)))
            self._handlers[name] = found
        return found

    def register(self, addon: Any) -> Any:
        self._handlers.clear()
        return super().register(addon)  # type: ignore[no-untyped-call]

    def add(self, *addons: Any) -> None:
        super().add(*addons)  # type: ignore[no-untyped-call]
        self._handlers.clear()

    def remove(self, addon: Any) -> None:
        super().remove(addon)  # type: ignore[no-untyped-call]
        self._handlers.clear()

    def clear(self) -> None:
        super().clear()  # type: ignore[no-untyped-call]
        self._handlers.clear()

    async def trigger_event(self, event: hooks.Hook) -> None:
        found = self.handlers(event.name)
        if not found:
            return
        args = hook_args(event)
        for func, is_async in found:
            try:
                if is_async:
                    await func(*args)
                else:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                logging.getLogger("mitmproxy.addonmanager").error(
                    f"Addon error: {e}", exc_info=True)

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        await self.trigger_event(event)
        if self.handlers(hooks.UpdateHook.name):
            message = hook_args(event)[0]
            if isinstance(message, flow.Flow):
                await self.trigger_event(hooks.UpdateHook([message]))


_HOOK_FIELDS: dict[type[hooks.Hook], tuple[str, ...]] = {}


def hook_args(event: hooks.Hook) -> list[Any]:
    """`event.args()` without calling dataclasses.fields() on every event."""
    names = _HOOK_FIELDS.get(type(event))
    if names is None:
        names = _HOOK_FIELDS[type(event)] = tuple(
            f.name for f in dataclasses.fields(event))  # type: ignore[arg-type]
    return [getattr(event, name) for name in names]


def lean_master(opts: options.Options) -> Master:
    """A mitmproxy Master whose addon manager is LeanAddons."""
    master = Master(opts)
    stock = master.addons
    opts.changed.disconnect(stock._configure_all)
    master.addons = LeanAddons(master)
    return master


def proxy_options(runtime: Runtime, confdir: Path) -> options.Options:
    cfg = runtime.config
    host, port = cfg.listen
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return options.Options(
        mode=[f"reverse:{cfg.upstream}@{listen}"],
        confdir=str(confdir),
    )


def settings(runtime: Runtime, confdir: Path) -> dict[str, object]:
    """The mitmproxy options the gate relies on (applied after the addons declared them)."""
    cfg = runtime.config
    values: dict[str, object] = {
        # nothing reaches the upstream before the gate has decided
        "connection_strategy": "lazy",
        "body_size_limit": str(cfg.body_limit),
        # an HTTP/2 listener would answer upstream errors with mitmproxy's own page
        "http2": False,
        "tcp_timeout": IDLE_TIMEOUT,
    }
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        values["certs"] = [f"*={combined_pem(cfg.tls_cert, cfg.tls_key, confdir)}"]
    return values


def combined_pem(cert: Path, key: Path, confdir: Path) -> Path:
    """mitmproxy wants the key and the chain in one PEM file: write it into its private,
    temporary confdir (0700), which is removed when the server stops."""
    try:
        data = key.read_bytes() + b"\n" + cert.read_bytes()
    except OSError as e:
        raise ValueError(f"{e.filename}: cannot read: {e.strerror}") from e
    path = confdir / "listener.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


async def run(runtime: Runtime) -> int:
    """Serve until SIGINT or SIGTERM. Returns the process exit code."""
    skip_debug_type_checks()
    with tempfile.TemporaryDirectory(prefix="cohortgate-mitmproxy-") as confdir:
        master = lean_master(proxy_options(runtime, Path(confdir)))
        master.addons.add(
            core.Core(),
            proxyserver.Proxyserver(),
            next_layer.NextLayer(),
            tlsconfig.TlsConfig(),
            errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
            CohortGate(runtime),
        )
        master.options.update(**settings(runtime, Path(confdir)))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, master.shutdown)
        cfg = runtime.config
        logger.info(
            "cohortgate serving %s://%s:%d -> %s (decision log: %s)",
            "https" if cfg.tls_cert else "http",
            *cfg.listen,
            cfg.upstream,
            cfg.log.decisions or "stdout",
        )
        await master.run()
    return 0


def _not_shutdown_noise(record: logging.LogRecord) -> bool:
    """Python 3.12's asyncio logs a CancelledError for every connection still open when the
    server stops; that is the shutdown working, not an error."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, asyncio.CancelledError)


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_not_shutdown_noise)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # mitmproxy logs every connection at INFO: noise, and a cost per request
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
