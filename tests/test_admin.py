"""Tests for cohortgate.admin: the metrics registry and the admin HTTP server, over real sockets."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import socket
import time
from collections.abc import AsyncIterator
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import cohortgate
from cohortgate.admin import DURATION_BUCKETS
from cohortgate.admin import MAX_COHORT_VALUES
from cohortgate.admin import MAX_HEAD_BYTES
from cohortgate.admin import AdminServer
from cohortgate.admin import Metrics

AUDIT_HEAD = {"file": "logs/decisions.jsonl", "seq": 42, "hash": "ab" * 32}


# Reading the exposition


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a render, keyed by (sample name, labels)."""
    body, _ = metrics.render()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return scrape(metrics).get((name, frozenset(labels.items())))


def deny(metrics: Metrics, latency_s: float = 0.001, **extra: Any) -> None:
    metrics.record_decision(
        decision="deny", reason="token_expired", phase="preview", latency_s=latency_s, **extra
    )


# A client that speaks raw bytes


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_reply(data: bytes) -> Reply:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, val = line.partition(":")
        headers[name.strip().lower()] = val.strip()
    return Reply(int(status), headers, body)


async def read_all(reader: asyncio.StreamReader, within_s: float = 5.0) -> bytes:
    async with asyncio.timeout(within_s):
        return await reader.read(-1)


async def exchange(port: int, raw: bytes) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return parse_reply(await read_all(reader))
    finally:
        writer.close()


async def get(port: int, path: str, method: str = "GET") -> Reply:
    return await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())


def assert_well_formed(reply: Reply) -> None:
    """What every admin response carries."""
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.headers["content-type"]
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["connection"] == "close"


# The server under test


@dataclass
class Admin:
    server: AdminServer
    metrics: Metrics
    readiness: dict[str, Any] = field(
        default_factory=lambda: {"ready": False, "checks": {"trust_store": "no key loaded"}}
    )

    @property
    def port(self) -> int:
        return self.server.port

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return bool(self.readiness["ready"]), dict(self.readiness)


async def start_admin(head_timeout: float = 5.0, **callbacks: Any) -> Admin:
    metrics = Metrics()
    admin = Admin(server=None, metrics=metrics)  # type: ignore[arg-type]
    admin.server = AdminServer(
        "127.0.0.1",
        0,
        metrics=metrics,
        ready=callbacks.get("ready", admin.ready),
        audit_head=callbacks.get("audit_head", lambda: dict(AUDIT_HEAD)),
        head_timeout=head_timeout,
    )
    await admin.server.start()
    return admin


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    a = await start_admin()
    yield a
    await a.server.close()


class TestEndpoints:
    async def test_healthz(self, admin: Admin) -> None:
        reply = await get(admin.port, "/healthz")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        assert json.loads(reply.body) == {"status": "ok"}
        assert_well_formed(reply)

    async def test_readyz_follows_the_callable(self, admin: Admin) -> None:
        reply = await get(admin.port, "/readyz")
        assert reply.status == 503
        assert reply.headers["content-type"] == "application/json"
        assert json.loads(reply.body) == {
            "ready": False,
            "checks": {"trust_store": "no key loaded"},
        }
        assert_well_formed(reply)

        admin.readiness = {"ready": True, "checks": {"trust_store": "ok", "ratelimit": "ok"}}
        reply = await get(admin.port, "/readyz")
        assert reply.status == 200
        assert json.loads(reply.body) == admin.readiness

        admin.readiness = {"ready": False, "checks": {"ratelimit": "redis down"}}
        assert (await get(admin.port, "/readyz")).status == 503

    async def test_audit_head(self, admin: Admin) -> None:
        reply = await get(admin.port, "/audit/head")
        assert reply.status == 200
        assert reply.headers["content-type"] == "application/json"
        assert json.loads(reply.body) == AUDIT_HEAD
        assert_well_formed(reply)

    async def test_metrics(self, admin: Admin) -> None:
        reply = await get(admin.port, "/metrics")
        assert reply.status == 200
        assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert_well_formed(reply)
        families = {f.name for f in text_string_to_metric_families(reply.body.decode())}
        assert {
            "cohortgate_decisions",
            "cohortgate_request_duration_seconds",
            "cohortgate_upstream_responses",
            "cohortgate_tokens",
            "cohortgate_limiter_errors",
            "cohortgate_limiter_fallback_active",
            "cohortgate_trust_store_keys",
            "cohortgate_trust_store_age_seconds",
            "cohortgate_revocations",
            "cohortgate_proxy_errors",
            "cohortgate_log_write_errors",
            "cohortgate_info",
        } <= families

    async def test_metrics_count_a_denial_after_it_happens(self, admin: Admin) -> None:
        line = b'cohortgate_decisions_total{decision="deny",phase="preview",reason="token_expired"}'
        assert line not in (await get(admin.port, "/metrics")).body
        deny(admin.metrics)
        assert line + b" 1.0\n" in (await get(admin.port, "/metrics")).body

    async def test_query_string_is_ignored(self, admin: Admin) -> None:
        assert (await get(admin.port, "/healthz?verbose=1")).status == 200

    @pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/audit/head"])
    async def test_head_sends_the_headers_of_get_and_no_body(self, admin: Admin, path: str) -> None:
        admin.readiness = {"ready": True}
        full = await get(admin.port, path)
        head = await get(admin.port, path, method="HEAD")
        assert head.status == full.status == 200
        assert head.body == b""
        assert head.headers["content-type"] == full.headers["content-type"]
        assert head.headers["cache-control"] == "no-store"
        # /metrics carries a _created timestamp per series that is the same across scrapes.
        assert int(head.headers["content-length"]) == len(full.body)

    @pytest.mark.parametrize("path", ["/", "/metrics/", "/healthz/extra", "/admin", "/readyz.json"])
    async def test_unknown_path_is_404(self, admin: Admin, path: str) -> None:
        reply = await get(admin.port, path)
        assert reply.status == 404
        assert reply.headers["content-type"] == "application/json"
        assert "error" in json.loads(reply.body)
        assert_well_formed(reply)

    @pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
    async def test_other_methods_are_405_with_allow(self, admin: Admin, method: str) -> None:
        reply = await get(admin.port, "/healthz", method=method)
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD"
        assert "error" in json.loads(reply.body)
        assert_well_formed(reply)

    async def test_405_with_a_request_body_still_reaches_the_client(self, admin: Admin) -> None:
        # More than asyncio buffers on its own: closing with it unread would reset the connection.
        body = b"x" * 600_000
        raw = b"POST /metrics HTTP/1.1\r\nContent-Length: 600000\r\n\r\n" + body
        assert (await exchange(admin.port, raw)).status == 405

    @pytest.mark.parametrize(
        "request_line",
        [
            b"GET /healthz\r\n\r\n",
            b"GET /healthz HTTP/2.0\r\n\r\n",
            b"get /healthz HTTP/1.1\r\n\r\n",
            b"GET  /healthz HTTP/1.1\r\n\r\n",
            b"GET /h\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",
        ],
    )
    async def test_malformed_request_line_is_400(self, admin: Admin, request_line: bytes) -> None:
        reply = await exchange(admin.port, request_line)
        assert reply.status == 400
        assert_well_formed(reply)

    async def test_bare_lf_line_endings_are_accepted(self, admin: Admin) -> None:
        assert (await exchange(admin.port, b"GET /healthz HTTP/1.0\nHost: a\n\n")).status == 200

    async def test_failing_handler_is_500_and_the_server_keeps_running(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        def broken() -> dict[str, Any]:
            raise OSError("audit log unreadable")

        a = await start_admin(audit_head=broken)
        try:
            with caplog.at_level(logging.ERROR, logger="cohortgate.admin"):
                reply = await get(a.port, "/audit/head")
            assert reply.status == 500
            assert reply.headers["content-type"] == "application/json"
            assert "audit log unreadable" not in reply.body.decode()
            assert_well_formed(reply)
            assert any("/audit/head" in r.getMessage() and r.exc_info for r in caplog.records)
            assert (await get(a.port, "/healthz")).status == 200
        finally:
            await a.server.close()

    async def test_readiness_probe_failure_is_500(self) -> None:
        a = await start_admin(ready=lambda: (True, {"since": object()}))
        try:
            # default=str renders odd values instead of failing
            assert (await get(a.port, "/readyz")).status == 200
        finally:
            await a.server.close()

        def raising() -> tuple[bool, dict[str, Any]]:
            raise RuntimeError("limiter probe crashed")

        a = await start_admin(ready=raising)
        try:
            assert (await get(a.port, "/readyz")).status == 500
        finally:
            await a.server.close()


class TestSlowAndHostileClients:
    async def test_request_sent_byte_by_byte_is_answered(self) -> None:
        a = await start_admin(head_timeout=3.0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for byte in b"GET /audit/head HTTP/1.1\r\nHost: admin\r\n\r\n":
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.01)
            reply = parse_reply(await read_all(reader))
            writer.close()
            assert reply.status == 200
            assert json.loads(reply.body) == AUDIT_HEAD
        finally:
            await a.server.close()

    async def test_stalled_client_is_dropped_without_blocking_others(self) -> None:
        timeout = 0.5
        a = await start_admin(head_timeout=timeout)
        try:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: adm")
            await writer.drain()

            # Other clients are answered while the stalled one waits.
            replies = await asyncio.gather(*(get(a.port, "/healthz") for _ in range(5)))
            assert [r.status for r in replies] == [200] * 5
            assert time.monotonic() - started < timeout

            data = await read_all(reader, within_s=timeout + 3.0)
            elapsed = time.monotonic() - started
            writer.close()
            assert data == b""  # dropped, not answered
            assert timeout * 0.9 <= elapsed < timeout + 2.0
        finally:
            await a.server.close()

    async def test_close_drops_open_connections_promptly(self) -> None:
        a = await start_admin(head_timeout=30.0)
        port = a.port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await a.server.close()
        assert time.monotonic() - started < 2.0
        assert await read_all(reader) == b""
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(
                b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
                id="headers-end-past-the-cap",
            ),
            pytest.param(
                b"GET /healthz HTTP/1.1\r\n" + b"X-Many: b\r\n" * 2000,
                id="headers-never-end",
            ),
            pytest.param(
                b"GET /" + b"c" * (2 * MAX_HEAD_BYTES) + b" HTTP/1.1\r\n\r\n", id="long-line"
            ),
        ],
    )
    async def test_oversized_head_is_431(self, admin: Admin, raw: bytes) -> None:
        reply = await exchange(admin.port, raw)
        assert reply.status == 431
        assert reply.headers["content-type"] == "application/json"
        assert_well_formed(reply)

    async def test_head_just_under_the_cap_is_served(self, admin: Admin) -> None:
        prefix = b"GET /healthz HTTP/1.1\r\nX-Big: "
        raw = prefix + b"a" * (MAX_HEAD_BYTES - len(prefix)) + b"\r\n\r\n"
        assert len(raw) - 4 == MAX_HEAD_BYTES
        assert (await exchange(admin.port, raw)).status == 200
        over = prefix + b"a" * (MAX_HEAD_BYTES - len(prefix) + 1) + b"\r\n\r\n"
        assert (await exchange(admin.port, over)).status == 431

    async def test_client_that_closes_silently_does_not_break_the_server(
        self, admin: Admin
    ) -> None:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", admin.port)
            writer.write(b"GET /hea")
            writer.close()
        assert (await get(admin.port, "/healthz")).status == 200

    async def test_start_twice_and_port_before_start(self) -> None:
        server = AdminServer(
            "127.0.0.1", 0, metrics=Metrics(), ready=lambda: (True, {}), audit_head=dict
        )
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.start()
        try:
            assert server.port > 0
            with pytest.raises(RuntimeError):
                await server.start()
        finally:
            await server.close()
        await server.close()  # idempotent


class TestMetrics:
    def test_decision_is_counted_under_its_reason_and_phase(self) -> None:
        m = Metrics()
        deny(m)
        body, content_type = m.render()
        assert content_type.startswith("text/plain; version=0.0.4")
        line = b'cohortgate_decisions_total{decision="deny",phase="preview",reason="token_expired"}'
        assert line + b" 1.0\n" in body
        deny(m)
        m.record_decision(decision="allow", reason="approved", phase="preview", latency_s=0.2)
        labels = {"decision": "deny", "phase": "preview", "reason": "token_expired"}
        assert value(m, "cohortgate_decisions_total", **labels) == 2.0
        allowed = {"decision": "allow", "phase": "preview", "reason": "approved"}
        assert value(m, "cohortgate_decisions_total", **allowed) == 1.0

    def test_no_phase_reads_none(self) -> None:
        m = Metrics()
        m.record_decision(decision="deny", reason="cohort_not_admitted", phase=None, latency_s=0.0)
        labels = {"decision": "deny", "phase": "none", "reason": "cohort_not_admitted"}
        assert value(m, "cohortgate_decisions_total", **labels) == 1.0

    def test_latency_histogram(self) -> None:
        m = Metrics()
        for latency in (0.0003, 0.02, 0.02, 45.0, 700.0):
            deny(m, latency_s=latency)
        m.record_decision(decision="allow", reason="approved", phase="general", latency_s=3.0)
        name = "cohortgate_request_duration_seconds"
        expected = {"0.0005": 1, "0.025": 3, "10.0": 3, "60.0": 4, "600.0": 4, "+Inf": 5}
        for le, count in expected.items():
            assert value(m, f"{name}_bucket", decision="deny", le=le) == count, le
        assert value(m, f"{name}_count", decision="deny") == 5
        assert value(m, f"{name}_sum", decision="deny") == pytest.approx(745.0403)
        assert value(m, f"{name}_count", decision="allow") == 1
        assert value(m, f"{name}_bucket", decision="allow", le="2.5") == 0
        assert value(m, f"{name}_bucket", decision="allow", le="5.0") == 1

    def test_histogram_buckets_span_a_proxy_and_long_streams(self) -> None:
        assert DURATION_BUCKETS[0] == 0.0005
        assert 10.0 in DURATION_BUCKETS
        assert DURATION_BUCKETS[-1] == 600.0
        assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)

    def test_both_decisions_exported_before_any_request(self) -> None:
        m = Metrics()
        name = "cohortgate_request_duration_seconds_count"
        assert value(m, name, decision="allow") == 0
        assert value(m, name, decision="deny") == 0

    def test_upstream_statuses(self) -> None:
        m = Metrics()
        for status in (200, 200, 502, None):
            m.record_decision(
                decision="allow",
                reason="approved",
                phase="general",
                latency_s=0.1,
                upstream_status=status,
            )
        assert value(m, "cohortgate_upstream_responses_total", status="200") == 2
        assert value(m, "cohortgate_upstream_responses_total", status="502") == 1
        statuses = {
            dict(labels)["status"]
            for (name, labels) in scrape(m)
            if name == "cohortgate_upstream_responses_total"
        }
        assert statuses == {"200", "502"}

    def test_tokens_by_cohort(self) -> None:
        m = Metrics()

        def allow(cohort: str | None, prompt: int | None, completion: int | None) -> None:
            m.record_decision(
                decision="allow",
                reason="approved",
                phase="preview",
                latency_s=0.5,
                cohort=cohort,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )

        allow("preview-1", 100, 20)
        allow("preview-1", 50, 5)
        allow("preview-2", 7, None)
        allow(None, 3, 4)  # an unapproved caller under a quota
        name = "cohortgate_tokens_total"
        assert value(m, name, cohort="preview-1", kind="prompt") == 150
        assert value(m, name, cohort="preview-1", kind="completion") == 25
        assert value(m, name, cohort="preview-2", kind="prompt") == 7
        assert value(m, name, cohort="preview-2", kind="completion") == 0
        assert value(m, name, cohort="none", kind="prompt") == 3
        assert value(m, name, cohort="none", kind="completion") == 4

    def test_negative_token_counts_are_ignored(self) -> None:
        m = Metrics()
        deny(m, cohort="c", prompt_tokens=-5, completion_tokens=2)
        assert value(m, "cohortgate_tokens_total", cohort="c", kind="prompt") == 0
        assert value(m, "cohortgate_tokens_total", cohort="c", kind="completion") == 2

    def test_trust_store_age_grows(self) -> None:
        now = [1_000.0]
        m = Metrics(clock=lambda: now[0])
        assert value(m, "cohortgate_trust_store_age_seconds") == math.inf
        m.trust_store_loaded(keys=2, at=1_000.0)
        assert value(m, "cohortgate_trust_store_age_seconds") == 0.0
        assert value(m, "cohortgate_trust_store_keys") == 2
        now[0] = 1_030.5
        assert value(m, "cohortgate_trust_store_age_seconds") == 30.5
        m.trust_store_loaded(keys=3, at=1_030.0)
        assert value(m, "cohortgate_trust_store_age_seconds") == 0.5
        assert value(m, "cohortgate_trust_store_keys") == 3

    def test_trust_store_age_on_the_real_clock(self) -> None:
        m = Metrics()
        m.trust_store_loaded(keys=1, at=time.time() - 60)
        age = value(m, "cohortgate_trust_store_age_seconds")
        assert age is not None and 60 <= age < 70

    def test_proxy_errors_are_read_from_the_callback_at_scrape_time(self) -> None:
        m = Metrics()
        name = "cohortgate_proxy_errors_total"
        assert not [k for k in scrape(m) if k[0] == name]
        errors: collections.Counter[str] = collections.Counter()
        m.set_proxy_error_source(lambda: errors)
        errors["malformed_http"] += 2
        assert value(m, name, reason="malformed_http") == 2
        errors["malformed_http"] += 1
        errors["tls_refused"] += 1
        assert value(m, name, reason="malformed_http") == 3
        assert value(m, name, reason="tls_refused") == 1

    def test_failing_proxy_error_callback_keeps_the_last_read(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        m = Metrics()
        counts = {"malformed_http": 4}
        fail = [False]

        def source() -> Mapping[str, int]:
            if fail[0]:
                raise RuntimeError("counter gone")
            return counts

        m.set_proxy_error_source(source)
        assert value(m, "cohortgate_proxy_errors_total", reason="malformed_http") == 4
        fail[0] = True
        with caplog.at_level(logging.ERROR, logger="cohortgate.admin"):
            assert value(m, "cohortgate_proxy_errors_total", reason="malformed_http") == 4
        assert caplog.records

    def test_cohort_label_cardinality_is_capped(self) -> None:
        m = Metrics()
        extra = 5
        for i in range(MAX_COHORT_VALUES + extra):
            deny(m, cohort=f"cohort-{i}", prompt_tokens=1)
        deny(m, cohort="cohort-0", prompt_tokens=1)  # admitted earlier: keeps its own label
        cohorts = {
            dict(labels)["cohort"]
            for (name, labels) in scrape(m)
            if name == "cohortgate_tokens_total"
        }
        assert len(cohorts) == MAX_COHORT_VALUES + 1
        assert "other" in cohorts
        assert f"cohort-{MAX_COHORT_VALUES}" not in cohorts
        name = "cohortgate_tokens_total"
        assert value(m, name, cohort="other", kind="prompt") == extra
        assert value(m, name, cohort="cohort-0", kind="prompt") == 2

    def test_other_labels_are_capped_too(self) -> None:
        m = Metrics()
        for i in range(500):
            m.record_decision(
                decision="deny", reason=f"bogus_{i}", phase=f"p{i}", latency_s=0.0,
                upstream_status=1000 + i,
            )  # fmt: skip
        samples = scrape(m)
        decisions = [k for k in samples if k[0] == "cohortgate_decisions_total"]
        statuses = [k for k in samples if k[0] == "cohortgate_upstream_responses_total"]
        assert len(decisions) == 101  # 100 (reason, phase) pairs, then other/other
        assert len(statuses) == 101

    def test_two_instances_do_not_share_values(self) -> None:
        a, b = Metrics(), Metrics()
        deny(a, cohort="c", prompt_tokens=10, upstream_status=200)
        a.log_write_error()
        a.trust_store_loaded(keys=5, at=time.time())
        labels = {"decision": "deny", "phase": "preview", "reason": "token_expired"}
        assert value(a, "cohortgate_decisions_total", **labels) == 1
        assert value(b, "cohortgate_decisions_total", **labels) is None
        assert value(b, "cohortgate_tokens_total", cohort="c", kind="prompt") is None
        assert value(b, "cohortgate_log_write_errors_total") == 0
        assert value(b, "cohortgate_trust_store_keys") == 0
        assert a.registry is not b.registry

    def test_limiter_revocations_log_errors_and_info(self) -> None:
        m = Metrics()
        assert value(m, "cohortgate_limiter_fallback_active") == 0
        m.limiter_error("redis")
        m.limiter_error("redis")
        m.set_fallback(True)
        assert value(m, "cohortgate_limiter_errors_total", backend="redis") == 2
        assert value(m, "cohortgate_limiter_fallback_active") == 1
        m.set_fallback(False)
        assert value(m, "cohortgate_limiter_fallback_active") == 0

        assert value(m, "cohortgate_revocations", kind="jti") == 0
        m.set_revocations(jti=3, customers=1)
        assert value(m, "cohortgate_revocations", kind="jti") == 3
        assert value(m, "cohortgate_revocations", kind="customer") == 1

        m.log_write_error()
        assert value(m, "cohortgate_log_write_errors_total") == 1
        assert value(m, "cohortgate_info", version=cohortgate.__version__) == 1
