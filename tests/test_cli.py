"""The `cohortgate` commands as the authority and operators run them: real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from cohortgate.demo import free_port
from cohortgate.standin import StandinUpstream
from tests.conftest import AUDIENCE
from tests.conftest import ISSUER
from tests.conftest import REPO
from tests.conftest import Authority
from tests.conftest import Gate
from tests.conftest import config_text
from tests.conftest import wait_listening

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def cohortgate(*args: str, cwd: Path | None = None, stdin: str | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cohortgate.cli", *args], capture_output=True,
                          text=True, cwd=cwd, input=stdin, timeout=120, check=False)


def test_keys_init_and_token_issue_work_with_a_running_gate(
        tmp_path: Path, gate_factory: Any) -> None:
    keys = tmp_path / "authority-keys"
    done = cohortgate("keys", "init", "--dir", str(keys), "--kid", "office-2026")
    assert done.returncode == 0, done.stderr
    pem = keys / "office-2026.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    assert json.loads((keys / "jwks.json").read_text())["keys"][0]["kid"] == "office-2026"
    assert "already" in cohortgate("keys", "init", "--dir", str(keys)).stderr

    issued = cohortgate("token", "issue", "--key", str(pem), "--issuer", ISSUER,
                        "--audience", AUDIENCE, "--customer", "acme", "--cohort", "preview-1",
                        "--ttl", "7d", "--model", "gpt-5.6", "--rpm", "30")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()

    authority = Authority(keys, pem, keys / "jwks.json")
    gate: Gate = gate_factory()
    gate.authority.jwks.write_bytes(authority.jwks.read_bytes())  # the gate trusts this office
    import time
    time.sleep(0.6)
    reply = gate.client(token).chat.completions.create(model="gpt-5.6", messages=MESSAGES)
    assert reply.choices[0].message.content


def test_token_issue_refuses_bad_input(authority: Authority) -> None:
    done = cohortgate("token", "issue", "--key", str(authority.pem), "--issuer", ISSUER,
                      "--audience", AUDIENCE, "--customer", "c", "--cohort", "x", "--ttl", "soon")
    assert done.returncode == 2 and "--ttl" in done.stderr and "Traceback" not in done.stderr
    done = cohortgate("token", "issue", "--key", str(authority.dir / "missing.pem"),
                      "--issuer", ISSUER, "--audience", AUDIENCE, "--customer", "c",
                      "--cohort", "x")
    assert done.returncode == 2 and "missing.pem" in done.stderr
    assert "Traceback" not in done.stderr


def _config(tmp_path: Path, authority: Authority) -> Path:
    path = tmp_path / "cohortgate.toml"
    path.write_text(config_text(upstream="http://127.0.0.1:9", port=free_port(),
                                jwks=authority.jwks, workdir=tmp_path))
    return path


def test_token_inspect_gives_the_verdict(tmp_path: Path, authority: Authority) -> None:
    config = _config(tmp_path, authority)
    ok = cohortgate("token", "inspect", authority.issue("acme"), "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert '"sub": "acme"' in ok.stdout and "verdict: allow" in ok.stdout
    later = cohortgate("token", "inspect", authority.issue(cohort="wave-9"),
                       "--config", str(config))
    assert later.returncode == 1 and "verdict: deny cohort_not_admitted" in later.stdout
    junk = cohortgate("token", "inspect", "-", "--config", str(config), stdin="junk\n")
    assert junk.returncode == 1 and "malformed_token" in junk.stdout


def test_revoke_then_inspect(tmp_path: Path, authority: Authority) -> None:
    config = _config(tmp_path, authority)
    token = authority.issue("acme")
    assert cohortgate("revoke", "--customer", "acme", "--config", str(config)).returncode == 0
    again = cohortgate("revoke", "--customer", "acme", "--config", str(config))
    assert again.returncode == 0 and "already revoked" in again.stdout
    done = cohortgate("token", "inspect", token, "--config", str(config))
    assert done.returncode == 1 and "customer_revoked" in done.stdout
    doc = json.loads((tmp_path / "revocations.json").read_text())
    assert set(doc["customers"]["acme"]) == {"reason", "at"}


def test_check_prints_the_policy_and_fails_clearly(tmp_path: Path, authority: Authority) -> None:
    config = _config(tmp_path, authority)
    ok = cohortgate("check", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert str(tmp_path / "decisions.jsonl") in ok.stdout and "1 key" in ok.stdout

    config.write_text(config.read_text().replace('algorithms = ["EdDSA"]',
                                                 'algorithms = ["HS256"]'))
    bad = cohortgate("check", "--config", str(config))
    assert bad.returncode == 2
    assert str(config) in bad.stderr and "authority.algorithms" in bad.stderr
    assert "Traceback" not in bad.stderr

    missing = cohortgate("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr

    config.write_text(config.read_text().replace('["HS256"]', '["EdDSA"]'))
    authority.jwks.write_text("{}")
    broken_keys = cohortgate("check", "--config", str(config))
    assert broken_keys.returncode == 1 and "jwks.json" in broken_keys.stderr


def test_audit_verify_exit_codes(gate: Gate) -> None:
    token = gate.authority.issue()
    for _ in range(3):
        gate.client(token).chat.completions.create(model="gpt-5.6", messages=MESSAGES)
    gate.wait_log(3)
    ok = cohortgate("audit", "verify", str(gate.log))
    assert ok.returncode == 0 and "3 lines" in ok.stdout
    # the README's `audit verify logs/decisions.jsonl*` also names the writer's lock file
    lock = gate.log.with_name(gate.log.name + ".lock")
    assert lock.exists()
    globbed = cohortgate("audit", "verify", *map(str, sorted(gate.log.parent.glob(
        gate.log.name + "*"))))
    assert globbed.returncode == 0 and "3 lines" in globbed.stdout, globbed.stdout
    alone = cohortgate("audit", "verify", str(lock))  # named alone, it is no log
    assert alone.returncode == 1
    lines = gate.log.read_text().splitlines(keepends=True)
    tampered = gate.workdir / "tampered.jsonl"
    tampered.write_text(lines[0] + lines[1].replace('"status":200', '"status":201') + lines[2])
    bad = cohortgate("audit", "verify", str(tampered))
    assert bad.returncode == 1 and "tampered.jsonl:2" in bad.stdout


def test_mitmdump_runs_the_same_addon(tmp_path: Path, authority: Authority,
                                      upstream: StandinUpstream) -> None:
    port = free_port()
    config = tmp_path / "cohortgate.toml"
    config.write_text(config_text(upstream=upstream.url, port=port, jwks=authority.jwks,
                                  workdir=tmp_path))
    mitmdump = Path(sys.executable).parent / "mitmdump"
    proc = subprocess.Popen(
        [str(mitmdump), "-q", "-s", str(REPO / "addons" / "gate.py"),
         "--mode", f"reverse:{upstream.url}@127.0.0.1:{port}",
         "--set", f"cohortgate_config={config}", "--set", "connection_strategy=lazy",
         "--set", f"confdir={tmp_path / 'mitm'}"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""})
    try:
        wait_listening(port, proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0,
                               api_key=authority.issue())
        assert client.chat.completions.create(model="gpt-5.6", messages=MESSAGES).choices
        with pytest.raises(openai.PermissionDeniedError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", max_retries=0,
                          api_key=authority.issue(cohort="later")
                          ).chat.completions.create(model="gpt-5.6", messages=MESSAGES)
        assert len(upstream.requests) == 1
        assert upstream.requests[0].header("authorization") is None
    finally:
        proc.terminate()
        proc.wait(10)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "cohortgate.cli", "demo", "--no-serve",
                           "--port", "0"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "200 'Hello" in out
    assert "streamed" in out
    assert "PermissionDeniedError 403 code='cohort_not_admitted'" in out
    assert "AuthenticationError 401 code='invalid_signature'" in out
    assert "upstream saw 2 requests" in out
    assert out.count('"decision": "allow"') == 2 and out.count('"decision": "deny"') == 2


def test_free_port_never_gives_the_same_port_twice() -> None:
    # CI once started a gate whose config named one port for `listen` and `admin_listen`:
    # two bind(port 0) calls in a row got the same port from the kernel.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
