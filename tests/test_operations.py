"""What operators and the authority rely on, through a running gate: the admin listener,
metrics, the audit head, and a trust store served over https."""

from __future__ import annotations

import http.server
import json
import os
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gate
from tests.conftest import self_signed_cert

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (a test URL)
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def sample(gate: Gate, name: str, **labels: str) -> float:
    _, text = get(gate.admin_url + "/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def cohortgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cohortgate.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


class TestAdminListener:
    def test_health_and_readiness(self, gate: Gate) -> None:
        status, body = get(gate.admin_url + "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
        status, body = get(gate.admin_url + "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        # never on the proxy port
        assert gate.admin_url.rsplit(":", 1)[1] != str(gate.port)

    def test_metrics_count_a_denial_under_its_reason(self, gate: Gate) -> None:
        labels = {"decision": "deny", "reason": "token_expired", "phase": "preview"}
        before = sample(gate, "cohortgate_decisions_total", **labels)
        expired = gate.authority.issue(ttl=60, now=time.time() - 3600)
        with pytest.raises(openai.AuthenticationError):
            gate.client(expired).chat.completions.create(model="gpt-5.6", messages=MESSAGES)
        assert sample(gate, "cohortgate_decisions_total", **labels) == before + 1

    def test_metrics_count_allowed_tokens_and_upstream_status(self, gate: Gate) -> None:
        gate.client(gate.authority.issue()).chat.completions.create(model="gpt-5.6",
                                                                    messages=MESSAGES)
        assert sample(gate, "cohortgate_decisions_total", decision="allow",
                      reason="approved") == 1
        assert sample(gate, "cohortgate_upstream_responses_total", status="200") == 1
        assert sample(gate, "cohortgate_tokens_total", cohort="preview-1",
                      kind="completion") > 0
        assert sample(gate, "cohortgate_trust_store_keys") == 1
        assert sample(gate, "cohortgate_request_duration_seconds_count", decision="allow") == 1

    def test_malformed_http_is_counted(self, gate: Gate) -> None:
        from tests.conftest import raw_request
        raw_request(gate.port, b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        assert sample(gate, "cohortgate_proxy_errors_total", reason="invalid_request") >= 1

    def test_revocations_gauge_follows_the_file(self, gate: Gate) -> None:
        gate.revocations.write_text(json.dumps({"jti": {"a": {"reason": "r", "at": "x"}},
                                                "customers": {}}))
        time.sleep(0.6)
        assert sample(gate, "cohortgate_revocations", kind="jti") == 1


class TestAuditHead:
    def test_head_matches_the_log_and_catches_a_cut_tail(self, gate: Gate,
                                                         tmp_path: Path) -> None:
        token = gate.authority.issue()
        for _ in range(3):
            gate.client(token).chat.completions.create(model="gpt-5.6", messages=MESSAGES)
        lines = gate.wait_log(3)
        heads = tmp_path / "heads.jsonl"
        done = cohortgate("audit", "head", "--url", gate.admin_url, "--append", str(heads))
        assert done.returncode == 0, done.stderr
        head = json.loads(heads.read_text().splitlines()[-1])
        assert (head["seq"], head["hash"]) == (lines[-1]["seq"], lines[-1]["hash"])
        assert head["file"] == str(gate.log)

        ok = cohortgate("audit", "verify", str(gate.log), "--heads", str(heads))
        assert ok.returncode == 0, ok.stdout
        cut = tmp_path / "cut.jsonl"
        cut.write_text("".join(gate.log.read_text().splitlines(keepends=True)[:2]))
        bad = cohortgate("audit", "verify", str(cut), "--heads", str(heads))
        assert bad.returncode == 1 and "BROKEN" in bad.stdout


# ---- a trust store over https --------------------------------------------------------------


class JwksServer:
    """An https server for one JWKS document, which the test can change or take down."""

    def __init__(self, tmp: Path, document: bytes) -> None:
        self.document = document
        self.cert, key = self_signed_cert(tmp)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.document
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.httpd.server_address[1]}/jwks.json"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_https_trust_store_survives_its_server_going_down(
        gate_factory: Any, authority: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = JwksServer(tmp_path, authority.jwks.read_bytes())
    # the gate trusts the test's certificate through the standard OpenSSL variable
    monkeypatch.setenv("SSL_CERT_FILE", str(server.cert))
    assert os.environ["SSL_CERT_FILE"]
    try:
        restarted: Gate = gate_factory(jwks_url=server.url)
        # the proxy listens before its first fetch ends; /readyz says when keys are loaded
        deadline = time.monotonic() + 10
        while get(restarted.admin_url + "/readyz")[0] != 200:
            assert time.monotonic() < deadline, "the https trust store never loaded"
            time.sleep(0.05)
        token = authority.issue()
        assert restarted.client(token).chat.completions.create(model="gpt-5.6",
                                                               messages=MESSAGES).choices
        server.stop()
        time.sleep(0.3)
        assert restarted.client(token).chat.completions.create(model="gpt-5.6",
                                                               messages=MESSAGES).choices
    finally:
        server.stop()


def test_no_key_ever_loaded_is_503_keys_unavailable(
        gate_factory: Any, authority: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cohortgate.demo import free_port
    gate: Gate = gate_factory(jwks_url=f"https://127.0.0.1:{free_port()}/jwks.json")
    with pytest.raises(openai.APIStatusError) as e:
        gate.client(authority.issue()).with_options(max_retries=0).chat.completions.create(
            model="gpt-5.6", messages=MESSAGES)
    assert e.value.status_code == 503
    assert isinstance(e.value.body, dict) and e.value.body["code"] == "keys_unavailable"
    status, body = get(gate.admin_url + "/readyz")
    assert status == 503 and "trust_store" in body
