"""`cohortgate serve`: a lean mitmproxy master running the gate in reverse-proxy mode.

Only the addons a gate needs are loaded (core, proxy server, layer selection, TLS, startup
error check, the gate): stock mitmdump walks some thirty built-in addons on every hook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from mitmproxy import options
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
        master = Master(proxy_options(runtime, Path(confdir)))
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
