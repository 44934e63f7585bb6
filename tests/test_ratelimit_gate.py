"""Rate limits through the real proxy: requests and LLM tokens per customer, one replica on
the in-memory backend or several sharing a real redis-server."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Gate
from tests.conftest import parse_response
from tests.conftest import raw_request
from tests.redis_server import RedisServer
from tests.redis_server import redis_server

MESSAGES: Any = [{"role": "user", "content": "Say hello."}]
RATELIMIT_HEADERS = [f"x-ratelimit-{k}-{b}" for k in ("limit", "remaining", "reset")
                     for b in ("requests", "tokens")]


def post(gate: Gate, token: str | None, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body or {"model": "gpt-5.6", "messages": MESSAGES,
                               "max_tokens": 5}).encode()
    head = dict(headers or {})
    if token is not None:
        head["Authorization"] = f"Bearer {token}"
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(data)}\r\nConnection: close\r\n{lines}\r\n").encode() + data
    return parse_response(raw_request(gate.port, raw))


def code_of(body: bytes) -> str:
    code: str = json.loads(body)["error"]["code"]
    return code


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def redis_sections(url: str, on_error: str = "local", timeout: str = "200ms") -> str:
    return f'[ratelimit]\nbackend = "{url}"\non_error = "{on_error}"\ntimeout = "{timeout}"\n'


class TestRequestsPerMinute:
    def test_limit_from_the_token_then_429_with_headers(self, gate: Gate) -> None:
        token = gate.authority.issue(rpm=3)
        for _ in range(3):
            status, headers, _ = post(gate, token)
            assert status == 200
            assert all(h in headers for h in RATELIMIT_HEADERS)
            assert headers["x-ratelimit-limit-requests"] == "3"  # the upstream's 999999 replaced
        status, headers, body = post(gate, token)
        assert status == 429 and code_of(body) == "rate_limited_requests"
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert "x-should-retry" not in headers  # 429 invites a retry
        assert len(gate.upstream.requests) == 3
        line = gate.wait_log(4)[-1]
        assert (line["decision"], line["reason"], line["status"]) == \
            ("deny", "rate_limited_requests", 429)

    def test_sdk_sees_rate_limit_error(self, gate: Gate) -> None:
        token = gate.authority.issue(rpm=1)
        client = gate.client(token)
        client.chat.completions.create(model="gpt-5.6", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-5.6", messages=MESSAGES)
        assert isinstance(e.value.body, dict) and e.value.body["code"] == "rate_limited_requests"

    def test_token_limits_are_capped_by_limits_max(self, gate_factory: Any) -> None:
        gate: Gate = gate_factory(
            sections="[limits]\ndefault = { rpm = 2, tpm = 100000 }\n"
                     "max = { rpm = 3, tpm = 1000000 }\n")
        status, headers, _ = post(gate, gate.authority.issue(rpm=500))
        assert status == 200 and headers["x-ratelimit-limit-requests"] == "3"
        status, headers, _ = post(gate, gate.authority.issue("other"))
        assert headers["x-ratelimit-limit-requests"] == "2"

    def test_hundred_concurrent_requests_admit_exactly_the_limit(self, gate: Gate) -> None:
        token = gate.authority.issue(rpm=5)
        with ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: post(gate, token)[0], range(100)))
        assert statuses.count(200) == 5 and statuses.count(429) == 95
        assert len(gate.upstream.requests) == 5


class TestTokensPerMinute:
    def test_reservation_refused_before_the_upstream(self, gate: Gate) -> None:
        token = gate.authority.issue(tpm=1000)
        body = {"model": "gpt-5.6", "messages": MESSAGES, "max_tokens": 5000}
        status, headers, resp = post(gate, token, body)
        assert status == 429 and code_of(resp) == "rate_limited_tokens"
        assert headers["x-should-retry"] == "false"  # it can never fit 1000 tokens a minute
        assert gate.upstream.requests == []

    def test_settled_usage_passing_the_limit_refuses_the_next(self, gate: Gate) -> None:
        # no max_tokens: about 1030 tokens are reserved, but each reply uses 1500, and the
        # bucket goes below zero when the usage is settled
        gate.upstream.reply = " ".join(["word"] * 1500)
        token = gate.authority.issue(tpm=3000)
        body = {"model": "gpt-5.6", "messages": MESSAGES}
        results = [post(gate, token, body) for _ in range(3)]
        assert [status for status, _, _ in results] == [200, 200, 429]
        assert code_of(results[2][2]) == "rate_limited_tokens"
        assert int(results[1][1]["x-ratelimit-remaining-tokens"]) < 1500
        assert len(gate.upstream.requests) == 2
        allowed = [ln for ln in gate.wait_log(3) if ln["decision"] == "allow"]
        assert [ln["completion_tokens"] for ln in allowed] == [1500, 1500]

    def test_stream_usage_is_requested_settled_and_hidden(self, gate: Gate) -> None:
        token = gate.authority.issue()
        chunks = list(gate.client(token).chat.completions.create(
            model="gpt-5.6", messages=MESSAGES, stream=True))
        assert chunks and all(c.usage is None for c in chunks)  # the client did not ask
        sent = json.loads(gate.upstream.requests[0].body)
        assert sent["stream_options"] == {"include_usage": True}
        line = gate.wait_log(1)[-1]
        assert line["completion_tokens"] == len(gate.upstream.reply.split())
        assert "usage_estimated" not in line

    def test_dropped_usage_event_does_not_end_the_body_early(self, gate: Gate) -> None:
        """Regression: dropping the usage event once sent an empty chunk, which ends an
        HTTP/1.1 chunked body; the rest of the stream was left on the keep-alive connection,
        and the client's next request on it read garbage."""
        import http.client
        token = gate.authority.issue()
        conn = http.client.HTTPConnection("127.0.0.1", gate.port, timeout=10)
        body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES, "stream": True})
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", body, headers)
        streamed = conn.getresponse().read()
        assert streamed.rstrip().endswith(b"data: [DONE]")
        assert b'"choices":[]' not in streamed  # the usage event the client did not ask for
        conn.request("POST", "/v1/chat/completions", body, headers)  # same connection
        second = conn.getresponse()
        assert second.status == 200 and second.read().rstrip().endswith(b"data: [DONE]")
        conn.close()

    def test_stream_usage_shown_when_the_client_asks(self, gate: Gate) -> None:
        chunks = list(gate.client(gate.authority.issue()).chat.completions.create(
            model="gpt-5.6", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    def test_upstream_ignoring_include_usage_is_counted_and_marked(self, gate: Gate) -> None:
        gate.upstream.honour_include_usage = False
        list(gate.client(gate.authority.issue()).chat.completions.create(
            model="gpt-5.6", messages=MESSAGES, stream=True))
        line = gate.wait_log(1)[-1]
        assert line["usage_estimated"] is True
        assert line["completion_tokens"] >= len(gate.upstream.reply.split())


class TestUnapprovedQuota:
    PHASES = """
[[phases]]
name = "general"
cohorts = ["wave-1"]
unapproved = { rpm = 2, tpm = 100000 }
"""

    def test_callers_without_approval_get_the_quota(self, gate_factory: Any) -> None:
        gate: Gate = gate_factory(phases=self.PHASES)
        assert [post(gate, None)[0] for _ in range(3)] == [200, 200, 429]
        seen = gate.upstream.requests[0]
        assert seen.header("x-cohortgate-decision") == "unapproved_quota"
        assert seen.header("x-cohortgate-customer") is None
        # a valid token for a cohort not admitted now: limited by its own sub
        later = gate.authority.issue("globex", cohort="wave-2")
        assert [post(gate, later)[0] for _ in range(3)] == [200, 200, 429]
        assert gate.upstream.requests[-1].header("x-cohortgate-customer") == "globex"
        # an admitted approval is not limited by the quota
        assert post(gate, gate.authority.issue("acme", cohort="wave-1"))[0] == 200
        lines = gate.wait_log(7)
        assert lines[0]["reason"] == "unapproved_quota" and lines[0]["decision"] == "allow"

    def test_invalid_token_is_refused_never_given_the_quota(self, gate_factory: Any) -> None:
        gate: Gate = gate_factory(phases=self.PHASES)
        expired = gate.authority.issue(cohort="wave-2", ttl=60, now=time.time() - 3600)
        status, _, body = post(gate, expired)
        assert status == 401 and code_of(body) == "token_expired"
        status, _, body = post(gate, "not.a.token")
        assert status == 401
        assert gate.upstream.requests == []


class TestSharedAcrossReplicas:
    def test_two_replicas_admit_exactly_the_limit(self, gate_factory: Any,
                                                  redis: RedisServer) -> None:
        a: Gate = gate_factory(sections=redis_sections(redis.url))
        b: Gate = gate_factory(sections=redis_sections(redis.url))
        token = a.authority.issue(rpm=10)
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(lambda i: post(a if i % 2 else b, token), range(40)))
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 10 and statuses.count(429) == 30
        assert all(int(h["retry-after"]) >= 1 for s, h, _ in results if s == 429)
        assert all(code_of(body) == "rate_limited_requests" for s, _, body in results if s == 429)

    def test_revocation_reaches_every_replica_within_a_second(
            self, gate_factory: Any, redis: RedisServer, tmp_path: Path) -> None:
        import subprocess
        import sys
        a: Gate = gate_factory(sections=redis_sections(redis.url))
        b: Gate = gate_factory(sections=redis_sections(redis.url))
        token = a.authority.issue()
        assert post(a, token)[0] == 200 and post(b, token)[0] == 200
        jti = a.wait_log(1)[-1]["jti"]
        # revoke through a third config that shares only Redis (not the revocation file)
        other = tmp_path / "other.toml"
        other.write_text(a.config.read_text().replace(
            str(a.revocations), str(tmp_path / "other-revocations.json")))
        done = subprocess.run([sys.executable, "-m", "cohortgate.cli", "revoke", "--jti", jti,
                               "--config", str(other)], capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 1.0
        pending = {a.port: a, b.port: b}
        while pending and time.monotonic() < deadline:
            for port, g in list(pending.items()):
                status, _, body = post(g, token)
                if status == 401 and code_of(body) == "token_revoked":
                    del pending[port]
            time.sleep(0.05)
        assert not pending, "a replica still accepted the revoked token after 1 s"


class TestSettleOffTheResponsePath:
    def test_stream_end_does_not_wait_for_redis(self, gate_factory: Any,
                                                redis: RedisServer) -> None:
        """The correction is queued ahead of later decisions, not awaited: with Redis holding
        writes (CLIENT PAUSE), the stream still ends at once and its line is written, and the
        correction lands once Redis takes writes again."""
        gate: Gate = gate_factory(sections=redis_sections(redis.url, "closed", timeout="10s"))
        gate.upstream.interval = 0.1
        token = gate.authority.issue(tpm=100_000)
        body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES, "stream": True,
                           "max_tokens": 50_000}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        received = b""
        done_at = end_at = 0.0
        with socket.create_connection(("127.0.0.1", gate.port), 10) as s:
            s.sendall(request)
            received = s.recv(65536)  # the first event: the decision has been made
            redis.cli("CLIENT", "PAUSE", "3000", "WRITE")
            paused_until = time.monotonic() + 3.0
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, received
                received += chunk
                if not done_at and b"data: [DONE]" in received:
                    done_at = time.monotonic()
            end_at = time.monotonic()
        assert done_at and end_at - done_at < 0.5, end_at - done_at
        line = gate.wait_log(1, timeout=1.0)[-1]
        assert line["outcome"] == "complete" and line["completion_tokens"] > 0
        # once Redis takes writes again, the refund of the unused max_tokens is in force (the
        # next decision is queued behind it); unrefunded, fewer than 50,000 would be left
        time.sleep(max(0.0, paused_until + 0.2 - time.monotonic()))
        status, headers, _ = post(gate, token)
        assert status == 200 and int(headers["x-ratelimit-remaining-tokens"]) > 99_000, headers


class TestRedisFailure:
    @pytest.mark.parametrize("mode", ["closed", "local", "open"])
    def test_redis_killed_and_back(self, gate_factory: Any, redis: RedisServer,
                                   mode: str) -> None:
        gate: Gate = gate_factory(sections=redis_sections(redis.url, on_error=mode))
        token = gate.authority.issue(rpm=100)
        assert post(gate, token)[0] == 200
        redis.kill()
        started = time.monotonic()
        status, headers, body = post(gate, token)
        elapsed = time.monotonic() - started
        assert elapsed < 1.5  # the 200 ms timeout plus a proxy round trip, never a hang
        if mode == "closed":
            assert status == 503 and code_of(body) == "ratelimit_unavailable"
            assert "x-should-retry" not in headers
        else:
            assert status == 200
        redis.start()  # empty: Redis keeps nothing
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if post(gate, token)[0] == 200 and redis.cli("DBSIZE").strip() != "0":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the gate did not return to Redis after it came back")


def test_redis_flushed_mid_run_restarts_the_buckets_and_keeps_serving(
        gate_factory: Any, redis: RedisServer) -> None:
    """FLUSHALL loses the buckets: every customer starts full again (Redis keeps nothing that
    is not also elsewhere); the gate neither errors nor falls back."""
    gate: Gate = gate_factory(sections=redis_sections(redis.url, on_error="closed"))
    token = gate.authority.issue(rpm=2)
    assert [post(gate, token)[0] for _ in range(3)] == [200, 200, 429]
    assert redis.cli("DBSIZE").strip() != "0"
    redis.cli("FLUSHALL")
    assert [post(gate, token)[0] for _ in range(3)] == [200, 200, 429]
    assert all(line["reason"] != "ratelimit_unavailable" for line in gate.wait_log(6))
