"""`cohortgate demo`: the main job end to end, on throwaway keys and embedded defaults.

It plays all three parts: the authority (keys, two approvals), the operator (a stand-in
OpenAI-compatible upstream and `cohortgate serve` in front of it) and the customers (the
official `openai` SDK). Then it leaves the gate serving with a ready-to-paste curl line.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

from cohortgate.keys import init_keys
from cohortgate.keys import issue_token
from cohortgate.standin import StandinThread

ISSUER = "https://approvals.example.gov"
AUDIENCE = "gpt-5.6"
MODEL = "gpt-5.6"


_handed_out: set[tuple[str, int]] = set()


def claim_port(port: int, host: str = "127.0.0.1") -> bool:
    """Record `port` as given out by this process; False when it was given out before."""
    if (host, port) in _handed_out:
        return False
    _handed_out.add((host, port))
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never one this process was given before.

    The kernel may hand the same free port to two `bind(port 0)` calls in a row (a config
    would then name one port for both `listen` and `admin_listen`), so ports already given
    out are skipped.
    """
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if claim_port(port, host):
            return port
    raise RuntimeError(f"no free port on {host} that this process has not used already")


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cohortgate serve exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"cohortgate serve did not listen on {port} within {timeout:.0f} s")


def demo_config(workdir: Path, upstream: str, port: int, jwks: Path) -> str:
    until = (datetime.now(UTC) + timedelta(days=14)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"""\
# Written by `cohortgate demo`: a two-phase staged release.
upstream = "{upstream}"
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{free_port()}"

[authority]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "{jwks}"
algorithms = ["EdDSA"]

[[phases]]
name = "preview"
until = "{until}"
cohorts = ["preview-1"]
unapproved = "block"

[[phases]]
name = "general"
cohorts = ["*"]
unapproved = "block"

[revocation]
file = "{workdir / "revocations.json"}"

[log]
decisions = "{workdir / "decisions.jsonl"}"
"""


def last_log_line(path: Path) -> dict[str, Any]:
    lines = path.read_text().splitlines()
    record: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return record


def show_log(path: Path) -> None:
    rec = last_log_line(path)
    keep = ("decision", "reason", "status", "customer", "cohort", "phase", "model", "stream",
            "latency_ms", "seq")
    print("    log: " + json.dumps({k: rec.get(k) for k in keep}))


def step(title: str) -> None:
    print(f"\n== {title}")


def call(label: str, fn: Callable[[], str], log: Path) -> None:
    import openai

    print(f"  {label}")
    try:
        print(f"    -> {fn()}")
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        print(f"    -> {type(e).__name__} {e.status_code} code={body.get('code')!r}: "
              f"{body.get('message')}")
    time.sleep(0.1)  # the line is written when the response ends
    show_log(log)


def main(*, keep_serving: bool = True, port: int = 8080) -> int:
    try:
        import openai
    except ImportError:
        print("cohortgate demo needs the openai SDK: pip install 'cohortgate[test]'",
              file=sys.stderr)
        return 2
    if port == 0 or not port_is_free(port):
        wanted, port = port, free_port()
        if wanted:
            print(f"port {wanted} is busy; using {port}")
    workdir = Path(tempfile.mkdtemp(prefix="cohortgate-demo-"))

    step("The authority makes a signing key and approves one customer")
    pem, jwks = init_keys(workdir / "keys")
    print(f"  private key {pem}\n  trust store {jwks}")
    approved = issue_token(pem, issuer=ISSUER, audience=AUDIENCE, customer="acme-labs",
                           cohort="preview-1", ttl=14 * 86400, models=[MODEL])
    later = issue_token(pem, issuer=ISSUER, audience=AUDIENCE, customer="globex",
                        cohort="general-wave", ttl=14 * 86400)
    sig = approved.rsplit(".", 1)[1]
    forged = approved[: -len(sig)] + ("A" if sig[0] != "A" else "B") + sig[1:]
    print("  acme-labs approved into cohort preview-1; globex into general-wave (not yet)")

    with StandinThread() as upstream:
        step(f"The operator runs the gate on :{port} in front of the model at {upstream.url}")
        config = workdir / "cohortgate.toml"
        config.write_text(demo_config(workdir, upstream.url, port, jwks))
        log = workdir / "decisions.jsonl"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cohortgate.cli", "serve", "--config", str(config)],
            stderr=subprocess.DEVNULL if not keep_serving else None,
        )
        try:
            wait_for_port(port, proc)
            base = f"http://127.0.0.1:{port}/v1"
            messages: Any = [{"role": "user", "content": "Say hello."}]

            def client(token: str) -> openai.OpenAI:
                return openai.OpenAI(base_url=base, api_key=token, max_retries=0)

            def complete(token: str) -> Callable[[], str]:
                def run() -> str:
                    r = client(token).chat.completions.create(model=MODEL, messages=messages)
                    return f"200 {r.choices[0].message.content!r}"
                return run

            def stream(token: str) -> Callable[[], str]:
                def run() -> str:
                    pieces = [
                        chunk.choices[0].delta.content or ""
                        for chunk in client(token).chat.completions.create(
                            model=MODEL, messages=messages, stream=True)
                        if chunk.choices
                    ]
                    return f"200 streamed {len(pieces)} chunks: {''.join(pieces)!r}"
                return run

            step("Customers call it with the openai SDK")
            call("acme-labs (approved, preview-1): chat completion", complete(approved), log)
            call("acme-labs: streamed", stream(approved), log)
            call("globex (cohort not in this phase)", complete(later), log)
            call("a forged token (signature changed)", complete(forged), log)
            print(f"\n  upstream saw {len(upstream.requests)} requests "
                  "(the denied ones never reached it)")
            print(f"  decision log: {log}\n  verify it:    cohortgate audit verify {log}")

            if not keep_serving:
                return 0
            body = json.dumps({"model": MODEL, "messages": messages})
            step("The gate keeps serving; try it (Ctrl-C to stop)")
            print(f"curl -s {base}/chat/completions -H 'Authorization: Bearer {approved}' "
                  f"-H 'Content-Type: application/json' -d {shlex.quote(body)}")
            print(f"tail -f {log}")
            with contextlib.suppress(KeyboardInterrupt):
                proc.wait()
            return 0
        finally:
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
            if proc.poll() is None:
                proc.kill()
