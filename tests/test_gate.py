"""The gate end to end: `cohortgate serve` between the openai SDK (or raw sockets) and the
stand-in upstream."""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from cohortgate.audit import FIELDS
from cohortgate.audit import verify_chain
from tests.conftest import Gate
from tests.conftest import parse_response
from tests.conftest import raw_request
from tests.conftest import self_signed_cert

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
MESSAGES: Any = [{"role": "user", "content": "Say hello."}]


def chat(gate: Gate, token: str, **kw: Any) -> Any:
    return gate.client(token).chat.completions.create(
        model=kw.pop("model", "gpt-5.6"), messages=MESSAGES, **kw)


def post(gate: Gate, headers: dict[str, str] | list[tuple[str, str]], body: bytes | None = None,
         path: str = "/v1/chat/completions") -> tuple[int, dict[str, str], bytes]:
    if body is None:
        body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES}).encode()
    items = headers.items() if isinstance(headers, dict) else headers
    head = "".join(f"{k}: {v}\r\n" for k, v in items)
    data = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n").encode() + body
    return parse_response(raw_request(gate.port, data))


def error_code(e: openai.APIStatusError) -> str:
    assert isinstance(e.body, dict), e.body
    code = e.body["code"]
    assert isinstance(code, str)
    return code


class TestApproved:
    def test_completion_reaches_upstream_without_the_token(self, gate: Gate) -> None:
        token = gate.authority.issue("acme-labs")
        raw = gate.client(token).chat.completions.with_raw_response.create(
            model="gpt-5.6", messages=MESSAGES)
        reply = raw.parse()
        assert reply.choices[0].message.content
        assert len(gate.upstream.requests) == 1
        seen = gate.upstream.requests[0]
        assert seen.header("authorization") is None
        assert token.split(".")[2] not in repr(seen.headers)
        assert seen.header("x-cohortgate-customer") == "acme-labs"
        assert seen.header("x-cohortgate-cohort") == "preview-1"
        assert seen.header("x-cohortgate-decision") == "approved"
        request_id = seen.header("x-request-id")
        assert request_id is not None and UUID.match(request_id)
        assert raw.headers["x-request-id"] == request_id

    def test_stream_arrives_chunk_by_chunk(self, gate: Gate) -> None:
        token = gate.authority.issue()
        pieces = [c.choices[0].delta.content or "" for c in chat(gate, token, stream=True)
                  if c.choices]
        assert "".join(pieces) == gate.upstream.reply
        line = gate.wait_log(1)[-1]
        assert line["stream"] is True and line["outcome"] == "complete"

    def test_first_sse_event_arrives_before_the_second_is_sent(self, gate: Gate) -> None:
        gate.upstream.reply = "one two three four five"
        gate.upstream.interval = 0.4
        token = gate.authority.issue()
        arrivals = []
        for chunk in chat(gate, token, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
        sent = gate.upstream.event_sent_at
        assert len(arrivals) == 5
        # the first event (role + first word) is relayed long before the upstream writes the
        # second one, 400 ms later
        assert arrivals[0] < sent[1] - 0.3
        assert arrivals[1] - arrivals[0] > 0.3  # and nothing was coalesced

    def test_client_leaving_mid_stream_is_logged_as_aborted(self, gate: Gate) -> None:
        gate.upstream.interval = 0.3
        token = gate.authority.issue()
        body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", gate.port), 5) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer "
                + token.encode()
                + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
                + body
            )
            received = b""
            while b"data: " not in received:
                received += s.recv(65536)
        line = gate.wait_log(1)[-1]
        assert (line["decision"], line["outcome"], line["status"]) == ("allow", "aborted", 200)

    def test_client_request_id_is_logged_never_trusted(self, gate: Gate) -> None:
        token = gate.authority.issue()
        status, headers, _ = post(gate, {"Authorization": f"Bearer {token}",
                                         "X-Request-Id": "client-chosen"})
        assert status == 200
        assert UUID.match(headers["x-request-id"])
        assert gate.upstream.requests[0].header_values("x-request-id") == [headers["x-request-id"]]
        line = gate.wait_log(1)[-1]
        assert line["client_request_id"] == "client-chosen"
        assert line["request_id"] == headers["x-request-id"]

    def test_lowercase_bearer_scheme(self, gate: Gate) -> None:
        status, _, _ = post(gate, {"Authorization": f"bearer {gate.authority.issue()}"})
        assert status == 200


class TestDenied:
    def test_cohort_not_admitted_is_403_and_never_forwarded(self, gate: Gate) -> None:
        token = gate.authority.issue("globex", cohort="general-wave")
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(gate, token)
        assert error_code(e.value) == "cohort_not_admitted"
        assert gate.upstream.requests == []
        assert gate.upstream.connections == 0  # lazy: no upstream connection either

    @pytest.mark.parametrize(("mutate", "code"), [
        (lambda t: t[:-3] + ("AAA" if t[-3:] != "AAA" else "BBB"), "invalid_signature"),
        (lambda t: "not-a-jwt", "malformed_token"),
        (lambda t: t.split(".")[0] + "." + t.split(".")[1], "malformed_token"),
    ])
    def test_bad_token_is_401(self, gate: Gate, mutate: Any, code: str) -> None:
        with pytest.raises(openai.AuthenticationError) as e:
            chat(gate, mutate(gate.authority.issue()))
        assert error_code(e.value) == code
        assert gate.upstream.requests == []

    def test_expired_token(self, gate: Gate) -> None:
        token = gate.authority.issue(ttl=60, now=time.time() - 3600)
        with pytest.raises(openai.AuthenticationError) as e:
            chat(gate, token)
        assert error_code(e.value) == "token_expired"

    def test_wrong_audience(self, gate: Gate) -> None:
        with pytest.raises(openai.AuthenticationError) as e:
            chat(gate, gate.authority.issue(audience="another-model"))
        assert error_code(e.value) == "invalid_audience"

    def test_token_from_an_unknown_authority_key(self, gate: Gate, tmp_path: Path) -> None:
        from cohortgate.keys import init_keys
        from cohortgate.keys import issue_token
        pem, _ = init_keys(tmp_path / "other")
        token = issue_token(pem, issuer="https://approvals.example.gov", audience="gpt-5.6",
                            customer="mallory", cohort="preview-1", ttl=600)
        with pytest.raises(openai.AuthenticationError) as e:
            chat(gate, token)
        assert error_code(e.value) == "unknown_key"

    def test_missing_token_challenge_has_no_error(self, gate: Gate) -> None:
        status, headers, body = post(gate, {})
        assert status == 401
        assert headers["www-authenticate"] == 'Bearer realm="cohortgate"'
        assert headers["x-should-retry"] == "false"
        err = json.loads(body)["error"]
        assert err["code"] == "missing_token" and err["type"] == "authentication_error"
        assert err["param"] is None and err["message"]

    def test_invalid_token_challenge(self, gate: Gate) -> None:
        status, headers, _ = post(gate, {"Authorization": "Bearer a.b.c"})
        assert status == 401
        assert headers["www-authenticate"] == 'Bearer realm="cohortgate", error="invalid_token"'

    def test_two_token_headers_is_400(self, gate: Gate) -> None:
        token = gate.authority.issue()
        status, _, body = post(gate, [("Authorization", f"Bearer {token}"),
                                      ("Authorization", f"Bearer {token}")])
        assert status == 400
        assert json.loads(body)["error"]["code"] == "invalid_request"
        assert gate.upstream.requests == []

    def test_oversized_token_is_431(self, gate: Gate) -> None:
        status, _, body = post(gate, {"Authorization": "Bearer " + "a" * 9000})
        assert status == 431
        assert json.loads(body)["error"]["code"] == "token_too_large"

    def test_token_only_in_query_string_is_missing(self, gate: Gate) -> None:
        token = gate.authority.issue()
        status, _, body = post(gate, {}, path=f"/v1/chat/completions?access_token={token}")
        assert status == 401
        assert json.loads(body)["error"]["code"] == "missing_token"
        assert gate.wait_log(1)[-1]["path"] == "/v1/chat/completions"
        assert token not in gate.log.read_text()

    def test_model_outside_the_approval(self, gate: Gate) -> None:
        token = gate.authority.issue(models=["gpt-5.6"])
        assert chat(gate, token).choices
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(gate, token, model="gpt-5.6-mini")
        assert error_code(e.value) == "model_not_approved"
        assert len(gate.upstream.requests) == 1

    def test_duplicate_json_members_are_400(self, gate: Gate) -> None:
        token = gate.authority.issue(models=["gpt-5.6"])
        body = b'{"model":"gpt-5.6","model":"gpt-5.6-mini","messages":[]}'
        status, _, resp = post(gate, {"Authorization": f"Bearer {token}"}, body)
        assert status == 400
        assert json.loads(resp)["error"]["code"] == "invalid_request"
        assert gate.upstream.requests == []


class TestHeaderHygiene:
    def test_spoofed_identity_headers_are_removed(self, gate: Gate) -> None:
        token = gate.authority.issue("acme")
        status, _, _ = post(gate, [
            ("Authorization", f"Bearer {token}"),
            ("X-Cohortgate-Customer", "root"),
            ("x-cohortgate-cohort", "everyone"),
            ("X_Cohortgate_Decision", "approved"),
            ("X-COHORTGATE-Admin", "1"),
            ("Connection", "X-Hop, close"),
            ("X-Hop", "secret"),
            ("X-Other", "kept"),
        ])
        assert status == 200
        seen = gate.upstream.requests[0]
        assert seen.header_values("x-cohortgate-customer") == ["acme"]
        assert seen.header_values("x-cohortgate-cohort") == ["preview-1"]
        names = [n.lower().replace("_", "-") for n, _ in seen.headers]
        assert names.count("x-cohortgate-decision") == 1
        assert "x-cohortgate-admin" not in names
        assert "x-hop" not in names
        assert seen.header("x-other") == "kept"

    def test_non_ascii_customer_is_percent_encoded(self, gate: Gate) -> None:
        token = gate.authority.issue("Zoë 100%")
        assert chat(gate, token).choices
        assert gate.upstream.requests[0].header("x-cohortgate-customer") == "Zo%C3%AB%20100%25"


class TestRevocationAndReload:
    def test_revoked_jti_is_refused_within_a_second(self, gate: Gate) -> None:
        token = gate.authority.issue()
        assert chat(gate, token).choices
        jti = gate.wait_log(1)[-1]["jti"]
        done = subprocess.run(
            [sys.executable, "-m", "cohortgate.cli", "revoke", "--jti", jti,
             "--config", str(gate.config), "--reason", "test"],
            capture_output=True, text=True, cwd=gate.workdir, check=False)
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()
        code = None
        while time.monotonic() - revoked_at < 1.0:
            try:
                chat(gate, token)
            except openai.AuthenticationError as e:
                code = error_code(e)
                break
            time.sleep(0.05)
        assert code == "token_revoked"

    def test_revoked_customer_is_403(self, gate: Gate) -> None:
        gate.revocations.write_text(json.dumps(
            {"jti": {}, "customers": {"acme": {"reason": "r", "at": "2026-11-27T00:00:00Z"}}}))
        time.sleep(0.6)
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(gate, gate.authority.issue("acme"))
        assert error_code(e.value) == "customer_revoked"
        assert chat(gate, gate.authority.issue("other")).choices

    def test_bad_revocation_edit_keeps_the_last_good_list(self, gate: Gate) -> None:
        token = gate.authority.issue()
        jti = json.loads(_payload(token))["jti"]
        gate.revocations.write_text(json.dumps(
            {"jti": {jti: {"reason": "r", "at": "2026-11-27T00:00:00Z"}}, "customers": {}}))
        time.sleep(0.6)
        gate.revocations.write_text("{not json")
        time.sleep(0.6)
        with pytest.raises(openai.AuthenticationError):
            chat(gate, token)

    def test_config_edit_takes_effect_and_a_bad_edit_is_ignored(self, gate: Gate) -> None:
        token = gate.authority.issue("globex", cohort="wave-2")
        with pytest.raises(openai.PermissionDeniedError):
            chat(gate, token)
        text = gate.config.read_text()
        gate.config.write_text(text.replace('cohorts = ["preview-1"]',
                                            'cohorts = ["preview-1", "wave-2"]'))
        time.sleep(0.6)
        assert chat(gate, token).choices
        gate.config.write_text(text.replace("[authority]", "[authority]\nbogus = 1"))
        time.sleep(0.6)
        assert chat(gate, token).choices  # still the last good config
        assert gate.proc.poll() is None

    def test_trust_store_garbage_keeps_keys_and_rotation_adds(self, gate: Gate) -> None:
        from cohortgate.keys import rotate_keys
        token = gate.authority.issue()
        good = gate.authority.jwks.read_bytes()
        gate.authority.jwks.write_text("garbage")
        time.sleep(0.6)
        assert chat(gate, token).choices
        gate.authority.jwks.write_bytes(good)
        new_pem, _ = rotate_keys(gate.authority.dir)
        time.sleep(0.6)
        from cohortgate.keys import issue_token
        new_token = issue_token(new_pem, issuer="https://approvals.example.gov",
                                audience="gpt-5.6", customer="acme", cohort="preview-1",
                                ttl=600)
        assert chat(gate, new_token).choices
        assert chat(gate, token).choices


class TestBinding:
    def test_bound_token_needs_its_api_key(self, gate_factory: Any) -> None:
        gate: Gate = gate_factory(token='[token]\nheader = "X-Approval-Token"')
        token = gate.authority.issue(bind_api_key="sk-customer-own-key")

        def call(api_key: str) -> Any:
            return gate.client(api_key, default_headers={"X-Approval-Token": token}) \
                .chat.completions.create(model="gpt-5.6", messages=MESSAGES)

        assert call("sk-customer-own-key").choices
        seen = gate.upstream.requests[0]
        assert seen.header("authorization") == "Bearer sk-customer-own-key"
        assert seen.header("x-approval-token") is None
        with pytest.raises(openai.PermissionDeniedError) as e:
            call("sk-someone-else")
        assert error_code(e.value) == "binding_mismatch"

    def test_bound_token_in_authorization_is_refused(self, gate: Gate) -> None:
        token = gate.authority.issue(bind_api_key="sk-key")
        with pytest.raises(openai.PermissionDeniedError) as e:
            chat(gate, token)
        assert error_code(e.value) == "binding_mismatch"


class TestProtocol:
    def test_unreachable_upstream_is_json_502_without_its_address(
            self, gate_factory: Any) -> None:
        from cohortgate.demo import free_port
        dead = free_port()
        gate: Gate = gate_factory(upstream_url=f"http://127.0.0.1:{dead}")
        with pytest.raises(openai.APIStatusError) as e:
            chat(gate, gate.authority.issue())
        assert e.value.status_code == 502
        assert error_code(e.value) == "upstream_unavailable"
        assert str(dead) not in e.value.response.text
        assert e.value.response.headers["content-type"] == "application/json"
        line = gate.wait_log(1)[-1]
        assert line["outcome"] == "upstream_error" and line["status"] == 502

    def test_tls_client_hello_is_refused(self, gate: Gate) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", gate.port), 5) as sock, \
                pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            context.wrap_socket(sock, server_hostname="localhost")
        assert gate.upstream.connections == 0

    @pytest.mark.parametrize("request_bytes", [
        b"GET / HTTP/1.1\r\nHost: x\r\nA header line without a colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    ], ids=["no-colon", "two-content-lengths", "bad-content-length"])
    def test_malformed_http_is_json_400(self, gate: Gate, request_bytes: bytes) -> None:
        status, headers, body = parse_response(raw_request(gate.port, request_bytes))
        assert status == 400
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "invalid_request"
        assert gate.upstream.requests == []

    def test_body_over_the_limit_is_413_json(self, gate_factory: Any) -> None:
        gate: Gate = gate_factory(extra_top='body_limit = "1KB"')
        token = gate.authority.issue()
        status, _, body = post(gate, {"Authorization": f"Bearer {token}"}, b"x" * 5000)
        assert status == 413
        assert json.loads(body)["error"]["code"] == "body_too_large"
        assert gate.upstream.requests == []


class TestDecisionLog:
    def test_every_decision_is_one_chained_line_without_secrets(self, gate: Gate) -> None:
        token = gate.authority.issue("acme")
        chat(gate, token)
        with pytest.raises(openai.PermissionDeniedError):
            chat(gate, gate.authority.issue("globex", cohort="later"))
        post(gate, {"Authorization": "Bearer x.y.z"})
        lines = gate.wait_log(3)
        for line in lines:
            assert list(line)[: len(FIELDS)] == list(FIELDS)
            assert list(line)[-2:] == ["seq", "hash"]
        allow, deny, bad = lines
        assert (allow["decision"], allow["reason"], allow["status"]) == ("allow", "approved", 200)
        assert allow["customer"] == "acme" and allow["upstream_status"] == 200
        assert allow["model"] == "gpt-5.6" and allow["phase"] == "preview"
        assert (deny["decision"], deny["reason"], deny["status"]) == \
            ("deny", "cohort_not_admitted", 403)
        assert bad["customer"] is None and bad["reason"] == "malformed_token"
        text = gate.log.read_text()
        assert token.split(".")[2] not in text and token not in text
        result = verify_chain([gate.log])
        assert result.ok and result.lines == 3

    def test_second_process_on_the_same_log_is_refused(self, gate: Gate) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "cohortgate.cli", "serve", "--config", str(gate.config),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, cwd=gate.workdir, check=False)
        assert done.returncode == 2
        assert "in use" in done.stderr and "Traceback" not in done.stderr


def _payload(token: str) -> str:
    import base64
    seg = token.split(".")[1]
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)).decode()


def test_tls_listener_serves_the_operators_certificate(gate_factory: Any,
                                                       tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    gate: Gate = gate_factory(extra_top=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    client = openai.OpenAI(base_url=f"https://localhost:{gate.port}/v1", max_retries=0,
                           api_key=gate.authority.issue(),
                           http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(
                               cafile=str(cert))))
    assert client.chat.completions.create(model="gpt-5.6", messages=MESSAGES).choices
