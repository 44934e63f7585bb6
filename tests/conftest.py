"""Fixtures that run the real thing: authority keys, the stand-in upstream, `cohortgate serve`."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import openai
import pytest
from hypothesis import settings

from cohortgate.demo import free_port
from cohortgate.keys import init_keys
from cohortgate.keys import issue_token
from cohortgate.standin import StandinThread
from cohortgate.standin import StandinUpstream

ISSUER = "https://approvals.example.gov"
AUDIENCE = "gpt-5.6"
REPO = Path(__file__).resolve().parent.parent

# No per-example deadline: a noisy CI machine can pause a pure helper past hypothesis' 200 ms
# default, which would fail a property that holds. Correctness is asserted, not speed.
settings.register_profile("cohortgate", deadline=None)
settings.load_profile("cohortgate")


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"proxy exited with {proc.returncode}:\n{out}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"proxy did not listen on {port}")


@dataclass
class Authority:
    dir: Path
    pem: Path
    jwks: Path

    def issue(self, customer: str = "acme", cohort: str = "preview-1", **kw: Any) -> str:
        kw.setdefault("ttl", 3600)
        return issue_token(self.pem, issuer=kw.pop("issuer", ISSUER),
                           audience=kw.pop("audience", AUDIENCE),
                           customer=customer, cohort=cohort, **kw)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    pem, jwks = init_keys(tmp_path / "keys")
    return Authority(tmp_path / "keys", pem, jwks)


@pytest.fixture
def upstream() -> Iterator[StandinUpstream]:
    with StandinThread() as up:
        yield up


def config_text(*, upstream: str, port: int, jwks: Path | str, workdir: Path,
                extra_top: str = "", phases: str | None = None, token: str = "",
                sections: str = "") -> str:
    if phases is None:
        phases = """
[[phases]]
name = "preview"
until = "2099-01-01T00:00:00Z"
cohorts = ["preview-1"]
unapproved = "block"

[[phases]]
name = "general"
cohorts = ["*"]
unapproved = "block"
"""
    return f"""
upstream = "{upstream}"
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{free_port()}"
{extra_top}

[authority]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "{jwks}"
algorithms = ["EdDSA"]
leeway = "30s"
max_lifetime = "30d"

{token}
{phases}

[revocation]
file = "{workdir / "revocations.json"}"

[log]
decisions = "{workdir / "decisions.jsonl"}"

{sections}
"""


@dataclass
class Gate:
    """A `cohortgate serve` subprocess and what it was started with."""

    port: int
    config: Path
    workdir: Path
    proc: subprocess.Popen[bytes]
    upstream: StandinUpstream
    authority: Authority
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        import tomllib
        host, port = tomllib.loads(self.config.read_text())["admin_listen"].rsplit(":", 1)
        return f"http://{host}:{port}"

    @property
    def log(self) -> Path:
        return self.workdir / "decisions.jsonl"

    @property
    def revocations(self) -> Path:
        return self.workdir / "revocations.json"

    def client(self, token: str, **kw: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=token, max_retries=0, **kw)

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def wait_log(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.log_lines()
            if len(lines) >= count:
                return lines
            time.sleep(0.02)
        raise AssertionError(f"expected {count} log lines, have {len(self.log_lines())}")

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read().decode() if self.proc.stderr else ""


def start_gate(tmp: Path, upstream: StandinUpstream, authority: Authority, *,
               upstream_url: str | None = None, jwks_url: str | None = None,
               preexec_fn: Any = None, **config: Any) -> Gate:
    port = free_port()
    workdir = tmp / f"gate-{port}"
    workdir.mkdir(parents=True)
    path = workdir / "cohortgate.toml"
    path.write_text(config_text(upstream=upstream_url or upstream.url, port=port,
                                jwks=jwks_url or authority.jwks, workdir=workdir, **config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cohortgate.cli", "serve", "--config", str(path)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=workdir,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=preexec_fn,
    )
    try:
        wait_listening(port, proc)
    except Exception:
        proc.kill()
        raise
    gate = Gate(port, path, workdir, proc, upstream, authority)
    wait_listening(int(gate.admin_url.rsplit(":", 1)[1]), proc)
    return gate


@pytest.fixture
def gate_factory(tmp_path: Path, upstream: StandinUpstream,
                 authority: Authority) -> Iterator[Any]:
    started: list[Gate] = []

    def make(**config: Any) -> Gate:
        g = start_gate(tmp_path, upstream, authority, **config)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()


@pytest.fixture
def gate(gate_factory: Any) -> Gate:
    g: Gate = gate_factory()
    return g


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything the proxy answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            s.settimeout(1.0)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 with its key: (cert.pem, key.pem) in tmp."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"
