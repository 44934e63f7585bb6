"""The admin listener: health, readiness, Prometheus metrics and the audit head.

`Metrics` holds every metric the gate exports, in a registry of its own (never the global
one, so tests and two gates in one process do not collide). The proxy calls its `record_*`
and `set_*` methods; `render()` produces the Prometheus text format.

`AdminServer` serves `/healthz`, `/readyz`, `/metrics` and `/audit/head` over a deliberately
small HTTP/1.1 server on asyncio streams: GET and HEAD only, one request per connection, the
request head capped in size and in time so a slow or hostile client cannot hang it. It runs on
`admin_listen`, never on the proxy port. Nothing here imports mitmproxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cohortgate import __version__

logger = logging.getLogger("cohortgate.admin")

# Latency of a proxied request: sub-millisecond denials up to long streamed completions.
DURATION_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

MAX_COHORT_VALUES: Final = 1000
# Reason codes, phases, decisions, statuses and backends are a fixed or config-bounded
# vocabulary; the cap only stops a bug from exploding the series count.
MAX_VOCABULARY_VALUES: Final = 100
# Bounds the raw-value lookup caches, which are keyed before the caps apply.
_CACHE_LIMIT: Final = 10_000
OTHER: Final = "other"
NONE: Final = "none"

MAX_HEAD_BYTES: Final = 8 * 1024
HEAD_TIMEOUT_S: Final = 5.0
# After answering, how long (and how much) to read what the client still sends, so that
# closing with unread data does not reset the connection before the client reads the answer.
_LINGER_S: Final = 1.0
_LINGER_BYTES: Final = 1024 * 1024
ALLOWED_METHODS: Final = ("GET", "HEAD")
JSON: Final = "application/json"


class _BoundedLabel:
    """The first `limit` distinct values of one label pass; every later one reads as "other"."""

    __slots__ = ("_admitted", "_limit")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._admitted: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._admitted or value in (NONE, OTHER):
            return value
        if len(self._admitted) >= self._limit:
            return OTHER
        self._admitted.add(value)
        return value


class _ScrapeTimeCollector:
    """The metrics computed when scraped: trust store age and proxy errors."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry refuses a clash; no callback runs at registration.
        yield GaugeMetricFamily("cohortgate_trust_store_age_seconds", "")
        yield CounterMetricFamily("cohortgate_proxy_errors", "", labels=["reason"])

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "cohortgate_trust_store_age_seconds",
            "Seconds since the trust store last loaded (+Inf before the first load).",
            value=self._metrics.trust_store_age(),
        )
        errors = CounterMetricFamily(
            "cohortgate_proxy_errors",
            "Requests mitmproxy answered before any hook ran (malformed HTTP...), by reason.",
            labels=["reason"],
        )
        for reason, count in self._metrics.proxy_error_counts().items():
            errors.add_metric([reason], count)
        yield errors


class Metrics:
    """Every metric the gate exports, in its own CollectorRegistry.

    `record_decision` runs once per request: it looks label children up in small caches
    instead of resolving labels through prometheus_client each time. `clock` (default
    `time.time`) is what the trust store age is measured against.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        r = self.registry
        self.decisions = Counter(
            "cohortgate_decisions",
            "Requests decided by the gate, by decision, reason code and release phase.",
            ["decision", "phase", "reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cohortgate_request_duration_seconds",
            "Time from the request reaching the gate to its decision (denials) or end (allowed).",
            ["decision"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_responses = Counter(
            "cohortgate_upstream_responses",
            "Responses from the upstream, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.tokens = Counter(
            "cohortgate_tokens",
            "Tokens consumed, from the upstream's usage, by cohort and kind (prompt|completion).",
            ["cohort", "kind"],
            registry=r,
        )
        self.limiter_errors = Counter(
            "cohortgate_limiter_errors",
            "Rate limiter backend failures, by backend.",
            ["backend"],
            registry=r,
        )
        self.limiter_fallback_active = Gauge(
            "cohortgate_limiter_fallback_active",
            "1 while the rate limiter runs on its local fallback, else 0.",
            registry=r,
        )
        self.trust_store_keys = Gauge(
            "cohortgate_trust_store_keys",
            "Keys in the trust store as last loaded.",
            registry=r,
        )
        self.revocations = Gauge(
            "cohortgate_revocations",
            "Revocations in force, by kind (jti|customer).",
            ["kind"],
            registry=r,
        )
        self.log_write_errors = Counter(
            "cohortgate_log_write_errors",
            "Decision log lines that could not be written.",
            registry=r,
        )
        self.info = Gauge(
            "cohortgate_info", "cohortgate build information.", ["version"], registry=r
        )
        self.info.labels(__version__).set(1)
        r.register(_ScrapeTimeCollector(self))

        self._trust_store_loaded_at: float | None = None
        self._proxy_error_source: Callable[[], Mapping[str, int]] | None = None
        self._proxy_error_snapshot: dict[str, float] = {}

        self._cohort_label = _BoundedLabel(MAX_COHORT_VALUES)
        self._decision_label = _BoundedLabel(MAX_VOCABULARY_VALUES)
        self._phase_label = _BoundedLabel(MAX_VOCABULARY_VALUES)
        self._reason_label = _BoundedLabel(MAX_VOCABULARY_VALUES)
        self._status_label = _BoundedLabel(MAX_VOCABULARY_VALUES)
        self._backend_label = _BoundedLabel(MAX_VOCABULARY_VALUES)
        self._proxy_error_label = _BoundedLabel(MAX_VOCABULARY_VALUES)

        self._decision_children: dict[tuple[str, str, str | None], tuple[Counter, Histogram]] = {}
        self._status_children: dict[int, Counter] = {}
        self._token_children: dict[str | None, tuple[Counter, Counter]] = {}
        self._revocation_jti = self.revocations.labels(kind="jti")
        self._revocation_customer = self.revocations.labels(kind="customer")
        # Both decisions appear (at zero) from the first scrape, so rate() has a baseline.
        for decision in ("allow", "deny"):
            self.request_duration.labels(decision=decision)

    # The request path

    def record_decision(
        self,
        *,
        decision: str,
        reason: str,
        phase: str | None,
        latency_s: float,
        upstream_status: int | None = None,
        cohort: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """Count one decided request; `phase` and `cohort` None read as "none"."""
        key = (decision, reason, phase)
        children = self._decision_children.get(key)
        if children is None:
            children = self._resolve_decision(key)
        count, duration = children
        count.inc()
        duration.observe(latency_s if latency_s > 0.0 else 0.0)
        if upstream_status is not None:
            status = self._status_children.get(upstream_status)
            if status is None:
                status = self._resolve_status(upstream_status)
            status.inc()
        if prompt_tokens or completion_tokens:
            tokens = self._token_children.get(cohort)
            if tokens is None:
                tokens = self._resolve_tokens(cohort)
            # A counter only goes up; a negative count is a caller's bug, not usage.
            if prompt_tokens and prompt_tokens > 0:
                tokens[0].inc(prompt_tokens)
            if completion_tokens and completion_tokens > 0:
                tokens[1].inc(completion_tokens)

    def _resolve_decision(self, key: tuple[str, str, str | None]) -> tuple[Counter, Histogram]:
        decision, reason, phase = key
        decision_label = self._decision_label(decision)
        children = (
            self.decisions.labels(
                decision=decision_label,
                phase=self._phase_label(NONE if phase is None else phase),
                reason=self._reason_label(reason),
            ),
            self.request_duration.labels(decision=decision_label),
        )
        if len(self._decision_children) < _CACHE_LIMIT:
            self._decision_children[key] = children
        return children

    def _resolve_status(self, status: int) -> Counter:
        child = self.upstream_responses.labels(status=self._status_label(str(status)))
        if len(self._status_children) < _CACHE_LIMIT:
            self._status_children[status] = child
        return child

    def _resolve_tokens(self, cohort: str | None) -> tuple[Counter, Counter]:
        label = self._cohort_label(NONE if cohort is None else cohort)
        children = (
            self.tokens.labels(cohort=label, kind="prompt"),
            self.tokens.labels(cohort=label, kind="completion"),
        )
        if len(self._token_children) < _CACHE_LIMIT:
            self._token_children[cohort] = children
        return children

    # State changes reported by the gate's components

    def limiter_error(self, backend: str) -> None:
        """Count one failed call to the rate limiter backend (e.g. "redis")."""
        self.limiter_errors.labels(backend=self._backend_label(backend)).inc()

    def set_fallback(self, active: bool) -> None:
        """Whether the limiter currently runs on its local fallback."""
        self.limiter_fallback_active.set(1 if active else 0)

    def trust_store_loaded(self, keys: int, at: float) -> None:
        """The trust store (re)loaded `keys` keys at `at` (a `time.time()` value)."""
        self.trust_store_keys.set(keys)
        self._trust_store_loaded_at = at

    def set_revocations(self, jti: int, customers: int) -> None:
        """The number of revoked token ids and revoked customers now in force."""
        self._revocation_jti.set(jti)
        self._revocation_customer.set(customers)

    def log_write_error(self) -> None:
        """Count one decision log line that could not be written."""
        self.log_write_errors.inc()

    def set_proxy_error_source(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Read proxy error counts, by reason, from `counts()` at every scrape."""
        self._proxy_error_source = counts

    # Scrape time

    def trust_store_age(self) -> float:
        """Seconds since the trust store last loaded; +Inf if it never has."""
        if self._trust_store_loaded_at is None:
            return math.inf
        return max(0.0, self._clock() - self._trust_store_loaded_at)

    def proxy_error_counts(self) -> dict[str, float]:
        """The proxy error counts with the label cap applied; the last good read on failure."""
        source = self._proxy_error_source
        if source is None:
            return self._proxy_error_snapshot
        try:
            snapshot: dict[str, float] = {}
            # Insertion order keeps the same reasons under the cap from scrape to scrape.
            for reason, count in list(source().items()):
                label = self._proxy_error_label(str(reason))
                snapshot[label] = snapshot.get(label, 0.0) + float(count)
        except Exception:
            logger.exception("admin: reading the proxy error counts failed; serving the last read")
            return self._proxy_error_snapshot
        self._proxy_error_snapshot = snapshot
        return snapshot

    def render(self) -> tuple[bytes, str]:
        """The body and content type of a /metrics response (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


# The admin HTTP server

_STATUS_PHRASES: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Response:
    """One admin response; every one carries a type, a length and no-store."""

    status: int
    content_type: str
    body: bytes
    headers: Headers = ()

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {_STATUS_PHRASES.get(self.status, 'Unknown')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        return head if head_only else head + self.body


def json_response(status: int, payload: Mapping[str, Any]) -> Response:
    return Response(status, JSON, json.dumps(payload, default=str).encode())


def error_response(status: int, message: str, headers: Headers = ()) -> Response:
    return Response(status, JSON, json.dumps({"error": message}).encode(), headers)


class HeadTooLarge(Exception):
    """The request line and headers exceed MAX_HEAD_BYTES."""


class BadRequest(Exception):
    """The request line is not `METHOD target HTTP/1.x`."""


def _head_end(buf: bytes | bytearray, start: int) -> int:
    """Where the blank line ending the head begins, searching from `start`; -1 if not yet."""
    crlf = buf.find(b"\r\n\r\n", start)
    lf = buf.find(b"\n\n", start)
    if crlf == -1:
        return lf
    if lf == -1:
        return crlf
    return min(crlf, lf)


async def read_head(reader: asyncio.StreamReader, limit: int = MAX_HEAD_BYTES) -> bytes | None:
    """The request line and headers, without the blank line; None if the client went away."""
    buf = bytearray()
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            return None
        # The terminator may straddle the previous chunk.
        start = max(0, len(buf) - 3)
        buf += chunk
        end = _head_end(buf, start)
        if end != -1:
            if end > limit:
                raise HeadTooLarge
            return bytes(buf[:end])
        if len(buf) > limit + 3:
            raise HeadTooLarge


def parse_request_line(head: bytes) -> tuple[str, str]:
    """(method, path without its query) from the first line of a request head."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest from e
    if not method.isalpha() or not method.isupper() or version not in ("HTTP/1.0", "HTTP/1.1"):
        raise BadRequest
    return method, target.split("?", 1)[0]


class AdminServer:
    """/healthz, /readyz, /metrics, /audit/head on the admin address (never the proxy port).

    `head_timeout` bounds the time a client has to send its request line and headers.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, dict[str, Any]]],
        audit_head: Callable[[], dict[str, Any]],
        head_timeout: float = HEAD_TIMEOUT_S,
    ) -> None:
        self._host = host
        self._port = port
        self._metrics = metrics
        self._ready = ready
        self._audit_head = audit_head
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._routes: dict[str, Callable[[], Response]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics_page,
            "/audit/head": self._audit_head_page,
        }

    async def start(self) -> None:
        """Listen on (host, port); port 0 picks a free port, read back from `port`."""
        if self._server is not None:
            raise RuntimeError("admin server already started")
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        logger.info("admin listening on %s:%d", self._host, self.port)

    @property
    def port(self) -> int:
        """The bound port (of the first socket, when a host name resolves to several)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("admin server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and drop the connections still open."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Python 3.12's wait_closed() waits for every connection: end slow clients now. Their
        # reads see end of file and the handlers return (no cancellation: 3.12.1's stream
        # callback logs a cancelled handler as an error).
        for writer in list(self._connections.values()):
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=_LINGER_S)
        await server.wait_closed()

    # One connection, one request

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections[task] = writer
        try:
            await self._answer(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or was too slow: nothing to answer
        except Exception:
            logger.exception("admin: connection failed")
        finally:
            if task is not None:
                self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            async with asyncio.timeout(self._head_timeout):
                head = await read_head(reader)
            if head is None:
                return
            method, path = parse_request_line(head)
            response = self._respond(method, path)
        except HeadTooLarge:
            response = error_response(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
        except BadRequest:
            response = error_response(400, "malformed request line")
        writer.write(response.encode(head_only=method == "HEAD"))
        await writer.drain()
        await _linger(reader, writer)

    def _respond(self, method: str, path: str) -> Response:
        route = self._routes.get(path)
        if route is None:
            return error_response(404, "not found")
        if method not in ALLOWED_METHODS:
            allow = (("Allow", ", ".join(ALLOWED_METHODS)),)
            return error_response(405, "method not allowed", allow)
        try:
            return route()
        except Exception:
            logger.exception("admin: %s failed", path)
            return error_response(500, "internal error")

    # Endpoints

    def _healthz(self) -> Response:
        return json_response(200, {"status": "ok"})

    def _readyz(self) -> Response:
        ready, detail = self._ready()
        return json_response(200 if ready else 503, detail)

    def _metrics_page(self) -> Response:
        body, content_type = self._metrics.render()
        return Response(200, content_type, body)

    def _audit_head_page(self) -> Response:
        return json_response(200, self._audit_head())


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends (bounded) before the socket closes."""
    if writer.can_write_eof():
        writer.write_eof()
    remaining = _LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_LINGER_S):
            while remaining > 0:
                chunk = await reader.read(min(remaining, 4096))
                if not chunk:
                    return
                remaining -= len(chunk)
