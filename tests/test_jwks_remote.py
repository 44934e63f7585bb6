"""jwks_remote.py: the https:// trust store, against a real local HTTPS server.

The server runs in its own thread with a self-signed certificate that only these tests trust
(through `ssl_context`), so a blocked event loop in the client would show, and each test can
make it fail, redirect, stall, trickle, oversize or rotate its keys.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from typing import cast

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cohortgate.config import Authority
from cohortgate.jwks_remote import RemoteJwks
from cohortgate.jwks_remote import parse_https_url
from cohortgate.keys import PrivateKey
from cohortgate.keys import TrustStore
from cohortgate.keys import generate_key
from cohortgate.keys import public_jwk
from cohortgate.reasons import UnknownKey
from cohortgate.verify import Verifier

ISSUER = "https://approvals.example.gov"
AUDIENCE = "gpt-5.6"
LOGGER = "cohortgate.jwks_remote"

KEY_A = generate_key("EdDSA")
KEY_B = generate_key("EdDSA")


def jwks_of(*keys: tuple[str, PrivateKey], extra: list[Any] | None = None) -> bytes:
    jwk_list = [*(extra or []), *(public_jwk(key, kid, "EdDSA") for kid, key in keys)]
    return json.dumps({"keys": jwk_list}).encode()


def issue(kid: str, key: PrivateKey) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "cohort": "preview-1",
              "jti": uuid.uuid4().hex, "iat": now, "exp": now + 600}
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def verifier(store: TrustStore) -> Verifier:
    authority = Authority(ISSUER, AUDIENCE, "https://keys.test/jwks.json", ("EdDSA",), 30.0,
                          86400.0)
    return Verifier(authority, store)


# --- the test's own HTTPS server ---------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """Trusts the test certificate, and nothing else."""
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1 and jwks.test (not for localhost)."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cohortgate test JWKS")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("jwks.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Tls(cert_path, key_path)


Behaviour = Callable[["_Handler"], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    jwks: JwksServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that refuses our certificate or hangs up is what several tests do


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def jwks(self) -> JwksServer:
        return cast(_Server, self.server).jwks

    def do_GET(self) -> None:
        self.jwks.requests.append(self.path)
        self.jwks.routes.get(self.path, serve(b"not found", status=404))(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class JwksServer:
    """A threaded HTTPS server; `routes` maps a path to what it answers, `requests` logs paths."""

    def __init__(self, tls: Tls) -> None:
        self.routes: dict[str, Behaviour] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # ends every stall
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.jwks = self
        # The handshake happens in the handler's thread, so a stalled client stalls nothing else.
        self._httpd.socket = tls.server_context().wrap_socket(
            self._httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        self.running = True

    def url(self, path: str = "/jwks.json", host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}{path}"

    def stop(self) -> None:
        """Stop listening: from now on a connection is refused."""
        self.release.set()
        if self.running:
            self.running = False
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)


def serve(body: bytes, *, status: int = 200, framing: str = "length",
          headers: dict[str, str] | None = None) -> Behaviour:
    """Answer with `body`, framed by Content-Length, chunked, or the end of the connection."""

    def behave(h: _Handler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        if framing == "length":
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif framing == "chunked":
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i in range(0, len(body), 100):
                piece = body[i : i + 100]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            h.wfile.write(b"0\r\n\r\n")
        else:
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(body)
            h.close_connection = True

    return behave


def redirect(location: str) -> Behaviour:
    def behave(h: _Handler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return behave


def stall(h: _Handler) -> None:
    """Read the request, never answer."""
    h.jwks.release.wait(10)


def trickle(h: _Handler) -> None:
    """A plausible length, then one byte every 50 ms: each read succeeds, none finishes it."""
    h.send_response(200)
    h.send_header("Content-Length", "50000")
    h.end_headers()
    while not h.jwks.release.wait(0.05):
        try:
            h.wfile.write(b" ")
        except OSError:
            return


def declare_then_stall(head: bytes) -> Behaviour:
    """Send raw header lines (and a first byte of body), then wait: reading on would hang."""

    def behave(h: _Handler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\n" + head)
        h.jwks.release.wait(10)

    return behave


def truncated(body: bytes) -> Behaviour:
    def behave(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body) + 10))
        h.end_headers()
        h.wfile.write(body)
        h.close_connection = True

    return behave


@pytest.fixture
def server(tls: Tls) -> Iterator[JwksServer]:
    jwks_server = JwksServer(tls)
    jwks_server.routes["/jwks.json"] = serve(jwks_of(("a", KEY_A)))
    yield jwks_server
    jwks_server.stop()


Make = Callable[..., RemoteJwks]


@pytest.fixture
async def make_remote(server: JwksServer, tls: Tls) -> AsyncIterator[Make]:
    """RemoteJwks on the test server, trusting its certificate; closed after the test."""
    made: list[RemoteJwks] = []

    def make(url: str | None = None, **kw: Any) -> RemoteJwks:
        kw.setdefault("ssl_context", tls.client_context())
        kw.setdefault("timeout", 2.0)
        kw.setdefault("refresh_interval", 3600.0)
        remote = RemoteJwks(url or server.url(), **kw)
        made.append(remote)
        return remote

    yield make
    for remote in made:
        await remote.close()


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- loading, verifying, failing ---------------------------------------------------------------


class TestRemoteJwks:
    async def test_first_fetch_loads_keys_that_verify_tokens(self, make_remote: Make) -> None:
        remote = make_remote()
        assert remote.store is None
        await remote.start()
        assert remote.store is not None
        assert set(remote.store.keys) == {"a"}
        assert remote.last_error is None
        assert remote.loaded_at == pytest.approx(time.time(), abs=5)
        approval = verifier(remote.store).verify(issue("a", KEY_A), time.time())
        assert approval.sub == "acme"
        assert approval.kid == "a"

    async def test_server_down_after_first_fetch_keeps_store_and_warns_once(
        self, make_remote: Make, server: JwksServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        remote = make_remote()
        await remote.start()
        store, loaded_at = remote.store, remote.loaded_at
        server.stop()
        caplog.set_level(logging.DEBUG, logger=LOGGER)
        for _ in range(3):
            assert await remote.refresh() is False
        assert remote.store is store
        assert remote.loaded_at == loaded_at
        assert remote.last_error is not None
        assert "cannot connect" in remote.last_error
        warnings = warnings_from(caplog)
        assert len(warnings) == 1, warnings
        assert "keeping the 1 keys" in warnings[0]
        assert store is not None
        verifier(store).verify(issue("a", KEY_A), time.time())  # tokens keep verifying

    async def test_a_new_outage_warns_again_after_a_recovery(
        self, make_remote: Make, server: JwksServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        remote = make_remote()
        await remote.start()
        good = server.routes["/jwks.json"]
        caplog.set_level(logging.INFO, logger=LOGGER)
        server.routes["/jwks.json"] = serve(b"oops", status=500)
        await remote.refresh()
        await remote.refresh()
        server.routes["/jwks.json"] = good
        await remote.refresh()
        assert remote.last_error is None
        server.routes["/jwks.json"] = serve(b"oops", status=500)
        await remote.refresh()
        assert len(warnings_from(caplog)) == 2

    @pytest.mark.parametrize("loaded_first", [False, True], ids=["never-loaded", "loaded"])
    async def test_redirect_is_not_followed(
        self, make_remote: Make, server: JwksServer, loaded_first: bool
    ) -> None:
        server.routes["/real.json"] = serve(jwks_of(("b", KEY_B)))
        remote = make_remote()
        if loaded_first:
            await remote.start()
            assert remote.store is not None
        before = remote.store
        server.routes["/jwks.json"] = redirect("/real.json")
        assert await remote.refresh() is False
        assert remote.store is before
        assert remote.last_error is not None
        assert "HTTP 302 to '/real.json': redirects are not followed" in remote.last_error
        assert "/real.json" not in server.requests

    @pytest.mark.parametrize("framing", ["length", "chunked", "close"])
    async def test_body_over_max_bytes_is_refused(
        self, make_remote: Make, server: JwksServer, framing: str
    ) -> None:
        body = jwks_of(("a", KEY_A))
        server.routes["/jwks.json"] = serve(body, framing=framing)
        too_small = make_remote(max_bytes=len(body) - 1)
        assert await too_small.refresh() is False
        assert too_small.store is None
        assert too_small.last_error is not None
        assert f"the limit is {len(body) - 1} bytes" in too_small.last_error
        exact = make_remote(max_bytes=len(body))  # the same answer at the limit is fine
        assert await exact.refresh() is True
        assert exact.store is not None
        assert set(exact.store.keys) == {"a"}

    @pytest.mark.parametrize(
        ("head", "size"),
        [
            (b"Content-Length: 10000000000\r\n\r\n{", "10000000000 bytes"),
            (b"Transfer-Encoding: chunked\r\n\r\nffffffff\r\n{", "at least 4294967295 bytes"),
        ],
        ids=["content-length", "chunk-size"],
    )
    async def test_declared_size_over_max_bytes_is_refused_without_reading(
        self, make_remote: Make, server: JwksServer, head: bytes, size: str
    ) -> None:
        server.routes["/jwks.json"] = declare_then_stall(head)
        remote = make_remote(timeout=3.0)
        started = time.monotonic()
        assert await remote.refresh() is False
        assert time.monotonic() - started < 1.0  # reading the body would have hit the timeout
        assert remote.last_error is not None
        assert f"the JWKS is {size}" in remote.last_error

    @pytest.mark.parametrize("where", ["handshake", "answer", "trickle"])
    async def test_stalled_server_costs_at_most_the_timeout(
        self, make_remote: Make, server: JwksServer, where: str
    ) -> None:
        with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never reads
            url = server.url()
            if where == "handshake":
                url = f"https://127.0.0.1:{silent.getsockname()[1]}/jwks.json"
            else:
                server.routes["/jwks.json"] = stall if where == "answer" else trickle
            remote = make_remote(url, timeout=0.5)
            gaps: list[float] = []

            async def tick() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            started = time.monotonic()
            assert await remote.refresh() is False
            elapsed = time.monotonic() - started
            ticker.cancel()
        assert 0.45 < elapsed < 1.0
        assert remote.last_error is not None
        assert "no complete answer within 0.5s" in remote.last_error
        assert len(gaps) > 20
        assert max(gaps) < 0.2  # the event loop kept running the whole time

    async def test_rotation_is_picked_up_at_the_next_refresh(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        loop = asyncio.get_running_loop()
        updates: list[TrustStore] = []

        def on_update(store: TrustStore) -> None:
            assert asyncio.get_running_loop() is loop
            updates.append(store)

        remote = make_remote(on_update=on_update)
        await remote.start()
        assert len(updates) == 1
        server.routes["/jwks.json"] = serve(jwks_of(("a", KEY_A), ("b", KEY_B)))
        assert await remote.refresh() is True
        assert len(updates) == 2
        assert updates[-1] is remote.store
        both = verifier(updates[-1])
        both.verify(issue("a", KEY_A), time.time())  # the overlap: old and new tokens verify
        both.verify(issue("b", KEY_B), time.time())
        assert await remote.refresh() is False  # the same keys again: no update
        # Same keys, other bytes (order, indentation): still not a change.
        server.routes["/jwks.json"] = serve(
            json.dumps({"keys": [public_jwk(KEY_B, "b", "EdDSA"), public_jwk(KEY_A, "a", "EdDSA")]},
                       indent=2).encode()
        )
        assert await remote.refresh() is False
        assert len(updates) == 2
        server.routes["/jwks.json"] = serve(jwks_of(("b", KEY_B)))  # the old key retired
        assert await remote.refresh() is True
        assert len(updates) == 3
        with pytest.raises(UnknownKey):
            verifier(updates[-1]).verify(issue("a", KEY_A), time.time())

    async def test_a_key_replaced_under_the_same_kid_is_a_change(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        updates: list[TrustStore] = []
        remote = make_remote(on_update=updates.append)
        await remote.start()
        server.routes["/jwks.json"] = serve(jwks_of(("a", KEY_B)))
        assert await remote.refresh() is True
        assert len(updates) == 2
        verifier(updates[-1]).verify(issue("a", KEY_B), time.time())

    async def test_background_refresh_runs_every_interval_until_closed(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        remote = make_remote(refresh_interval=0.1)
        await remote.start()
        assert server.requests == ["/jwks.json"]
        server.routes["/jwks.json"] = serve(jwks_of(("b", KEY_B)))
        await until(lambda: remote.store is not None and "b" in remote.store.keys)
        await until(lambda: len(server.requests) >= 4)
        await remote.close()
        count = len(server.requests)
        await asyncio.sleep(0.3)
        assert len(server.requests) == count

    async def test_start_is_called_once(self, make_remote: Make) -> None:
        remote = make_remote()
        await remote.start()
        with pytest.raises(RuntimeError, match="once"):
            await remote.start()

    async def test_refresh_soon_runs_at_most_once_per_cooldown(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        now = [1000.0]
        remote = make_remote(cooldown=30.0, clock=lambda: now[0])
        await remote.start()
        assert len(server.requests) == 1
        assert remote.refresh_soon() is False  # the start's fetch began within the cooldown
        now[0] += 31
        server.routes["/jwks.json"] = serve(jwks_of(("a", KEY_A), ("b", KEY_B)))
        assert remote.refresh_soon() is True
        assert remote.refresh_soon() is False
        await until(lambda: remote.store is not None and "b" in remote.store.keys)
        await asyncio.sleep(0.1)
        assert len(server.requests) == 2
        now[0] += 29
        assert remote.refresh_soon() is False
        now[0] += 2
        assert remote.refresh_soon() is True
        await until(lambda: len(server.requests) == 3)

    async def test_refresh_soon_never_waits_for_the_fetch(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        server.routes["/jwks.json"] = stall
        remote = make_remote(cooldown=0.0)
        started = time.monotonic()
        assert remote.refresh_soon() is True
        assert remote.refresh_soon() is False  # one is running already
        assert time.monotonic() - started < 0.2  # the stalled fetch would never answer
        await until(lambda: server.requests == ["/jwks.json"])

    async def test_malformed_key_is_skipped_and_the_good_one_used(
        self, make_remote: Make, server: JwksServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        broken = {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AA", "y": "AA"}
        server.routes["/jwks.json"] = serve(jwks_of(("a", KEY_A), extra=[broken]))
        caplog.set_level(logging.WARNING, logger=LOGGER)
        remote = make_remote()
        await remote.start()
        assert remote.store is not None
        assert set(remote.store.keys) == {"a"}
        verifier(remote.store).verify(issue("a", KEY_A), time.time())
        await remote.refresh()
        warnings = warnings_from(caplog)
        assert len(warnings) == 1, warnings  # logged once, not at every refresh
        assert "skipped a key: keys[0] (kid 'broken')" in warnings[0]

    async def test_untrusted_certificate_is_refused(
        self, server: JwksServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        remote = RemoteJwks(server.url(), timeout=2.0)  # the default context: system CAs
        caplog.set_level(logging.WARNING, logger=LOGGER)
        try:
            await remote.start()
        finally:
            await remote.close()
        assert remote.store is None
        assert remote.last_error is not None
        assert "the certificate was refused: self-signed certificate" in remote.last_error
        assert server.requests == []
        assert len(warnings_from(caplog)) == 1

    async def test_certificate_for_another_name_is_refused(
        self, make_remote: Make, server: JwksServer
    ) -> None:
        remote = make_remote(server.url(host="localhost"))  # the certificate names 127.0.0.1
        assert await remote.refresh() is False
        assert remote.store is None
        assert remote.last_error is not None
        assert "certificate was refused: Hostname mismatch" in remote.last_error
        assert server.requests == []

    async def test_no_key_ever_loaded_leaves_the_store_empty(
        self, make_remote: Make, server: JwksServer, caplog: pytest.LogCaptureFixture
    ) -> None:
        server.routes["/jwks.json"] = serve(b"down for maintenance", status=503)
        caplog.set_level(logging.WARNING, logger=LOGGER)
        remote = make_remote()
        await remote.start()  # does not raise
        assert remote.store is None
        assert remote.loaded_at is None
        assert remote.last_error is not None
        assert "HTTP 503; only 200 is accepted" in remote.last_error
        assert "no key loaded" in warnings_from(caplog)[0]

    @pytest.mark.parametrize(
        ("behaviour", "why"),
        [
            (serve(b"{}", status=404), "HTTP 404"),
            (serve(b"<html>", status=200), "not a valid JWKS JSON document"),
            (serve(b'{"keys": [], "keys": ' + json.dumps([public_jwk(KEY_B, "b", "EdDSA")])
                   .encode() + b"}"), "repeats a member name"),
            (serve(b'{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}'),
             "no usable key"),
            (serve(jwks_of(("b", KEY_B)), headers={"Content-Encoding": "gzip"}),
             "content-encoding 'gzip'"),
            (truncated(jwks_of(("b", KEY_B))), "closed before the answer was complete"),
        ],
        ids=["404", "not-json", "duplicate-member", "no-usable-key", "gzip", "truncated"],
    )
    async def test_a_bad_answer_keeps_the_last_good_store(
        self, make_remote: Make, server: JwksServer, behaviour: Behaviour, why: str
    ) -> None:
        remote = make_remote()
        await remote.start()
        store = remote.store
        server.routes["/jwks.json"] = behaviour
        assert await remote.refresh() is False
        assert remote.store is store
        assert remote.last_error is not None
        assert why in remote.last_error


# --- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://keys.example/jwks.json", "must be https://, not http"),
        ("file:///etc/jwks.json", "must be https://, not file"),
        ("keys/jwks.json", "must be https://, not a path"),
        ("https:///jwks.json", "has no host"),
        ("https://user:pw@keys.example/jwks.json", "credentials"),
        ("https://keys.example:99999/jwks.json", "port"),
        ("https://keys.example/a b", "printable ASCII"),
        ("https://keys.example/\r\nX-Injected: 1", "printable ASCII"),
    ],
)
def test_refuses_what_is_not_an_https_url(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RemoteJwks(url)


@pytest.mark.parametrize(
    ("url", "host", "port", "authority", "target", "display"),
    [
        ("https://Keys.Example/jwks.json", "keys.example", 443, "keys.example", "/jwks.json",
         "https://keys.example/jwks.json"),
        ("https://keys.example:8443", "keys.example", 8443, "keys.example:8443", "/",
         "https://keys.example:8443/"),
        ("https://[::1]:8443/k?token=s3cret#frag", "::1", 8443, "[::1]:8443", "/k?token=s3cret",
         "https://[::1]:8443/k"),
    ],
)
def test_parse_https_url(url: str, host: str, port: int, authority: str, target: str,
                         display: str) -> None:
    parsed = parse_https_url(url)
    assert (parsed.host, parsed.port, parsed.authority, parsed.target, parsed.display) == (
        host, port, authority, target, display)


@pytest.mark.parametrize(
    ("option", "value"),
    [("timeout", 0.0), ("timeout", float("inf")), ("refresh_interval", float("nan")),
     ("cooldown", -1.0), ("max_bytes", 0)],
)
def test_refuses_unusable_options(option: str, value: float) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=option):
        RemoteJwks("https://keys.example/jwks.json", **options)


def test_refuses_a_context_that_does_not_verify() -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="must verify"):
        RemoteJwks("https://keys.example/jwks.json", ssl_context=context)
