"""The trust store fetched from an https:// URL: cached, refreshed, last-known-good.

`authority.jwks` may name an https:// URL instead of a file. `RemoteJwks` fetches it once at
start, again every `refresh_interval`, and, at most once per `cooldown`, when a token names a
kid the store does not know (the authority may just have rotated). A failed fetch never costs
the keys already held: the last good store stays, `last_error` says why, and one warning is
logged per outage. `store` is None only until the first successful fetch; the proxy answers
503 `keys_unavailable` until then.

A fetch is one HTTP/1.1 GET over asyncio streams, so the event loop never blocks and a single
timeout bounds the whole exchange (name lookup, connect, TLS, headers, body). The certificate
and host name are verified, redirects are not followed, only a 200 is accepted, and a body
larger than `max_bytes` is refused before it is read. The URL is the one in the config: nothing
is ever fetched because a token asked for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.serialization import PublicFormat

from cohortgate.keys import PublicKey
from cohortgate.keys import TrustStore
from cohortgate.keys import parse_jwks

logger = logging.getLogger(__name__)

type KeySet = frozenset[tuple[str, frozenset[str], bytes]]

_MAX_LINE = 8192  # the status line, one header line, one chunk-size line
_MAX_HEADERS = 100
_MAX_INTERIM = 5  # 1xx answers skipped before the final one
_READ_SIZE = 65536

# Printable ASCII without spaces: nothing in the URL can break the request line or a header.
_URL_CHARS = re.compile(r"[!-~]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9]{2})(?: [^\r\n]*)?\r?\n")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")


class JwksFetchError(Exception):
    """One fetch of the JWKS URL failed; the message says why (never the body)."""


@dataclass(frozen=True, slots=True)
class JwksUrl:
    """An https:// JWKS URL taken apart for the request."""

    host: str  # for connecting and for the certificate's name check (no brackets)
    port: int
    authority: str  # the Host header
    target: str  # path and query, as sent in the request line
    display: str  # https://host[:port]/path: the query is left out, as it may carry a secret


def parse_https_url(url: str) -> JwksUrl:
    """Take an https:// URL apart; ValueError for any other scheme or an unusable URL."""
    if not _URL_CHARS.fullmatch(url):
        raise ValueError("the JWKS URL must be printable ASCII without spaces")
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise ValueError(f"the JWKS URL must be https://, not {parts.scheme or 'a path'}")
    if "@" in parts.netloc:
        raise ValueError("the JWKS URL must not carry credentials (user@)")
    host = parts.hostname
    if not host:
        raise ValueError("the JWKS URL has no host")
    try:
        port = parts.port or 443
    except ValueError:
        raise ValueError("the JWKS URL's port is not a number from 1 to 65535") from None
    bracketed = f"[{host}]" if ":" in host else host
    authority = bracketed if port == 443 else f"{bracketed}:{port}"
    path = parts.path or "/"
    target = f"{path}?{parts.query}" if parts.query else path
    return JwksUrl(host, port, authority, target, f"https://{authority}{path}")


def key_set(store: TrustStore) -> KeySet:
    """What decides which tokens a store verifies: each kid, its algorithms, its public key."""
    return frozenset(
        (kid, trusted.algorithms, _spki(trusted.key)) for kid, trusted in store.keys.items()
    )


def _spki(key: PublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class RemoteJwks:
    """The trust store fetched from an https:// URL: cached, refreshed, last-known-good.

    Use it on one event loop: `start()` once, `refresh_soon()` from the request path when a
    kid is unknown, `close()` at shutdown. `on_update` runs on that loop whenever the set of
    keys changes (the first load included), so the caller can rebuild its verifier.
    """

    store: TrustStore | None  # None until the first successful fetch; never set back to None
    loaded_at: float | None  # time.time() of the last successful fetch
    last_error: str | None  # why the last fetch failed; None once one succeeds

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        max_bytes: int = 1 << 20,
        refresh_interval: float = 300.0,
        cooldown: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        on_update: Callable[[TrustStore], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = parse_https_url(url)
        for name, seconds in (("timeout", timeout), ("refresh_interval", refresh_interval)):
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{name} must be a positive number of seconds")
        if not (math.isfinite(cooldown) and cooldown >= 0):
            raise ValueError("cooldown must be zero or a positive number of seconds")
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
        elif ssl_context.verify_mode != ssl.CERT_REQUIRED or not ssl_context.check_hostname:
            raise ValueError("ssl_context must verify the certificate and the host name")
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._refresh_interval = refresh_interval
        self._cooldown = cooldown
        self._ssl_context = ssl_context
        self._on_update = on_update
        self._clock = clock

        self.store = None
        self.loaded_at = None
        self.last_error = None
        self._keys: KeySet | None = None
        self._skipped: tuple[str, ...] | None = None
        self._failing = False  # in an outage: its warning has been logged
        self._last_attempt: float | None = None  # clock() when the last fetch began
        self._fetching = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._soon: set[asyncio.Task[bool]] = set()
        self._closed = False

    @property
    def source(self) -> str:
        """The URL for logs and messages, without its query."""
        return self._url.display

    async def start(self) -> None:
        """Fetch once (a failure is logged, not raised), then refresh in the background."""
        if self._poller is not None or self._closed:
            raise RuntimeError("RemoteJwks.start() may be called once, before close()")
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name=f"jwks refresh {self.source}")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop the refreshes
                logger.exception("trust store %s: refresh failed unexpectedly", self.source)

    def refresh_soon(self) -> bool:
        """Schedule a fetch now (a token named an unknown kid); never waits for it.

        Nothing is scheduled while a fetch is pending or when one began within `cooldown`, so a
        flood of unknown kids costs the authority one request per cooldown. Call it on the
        event loop. Returns whether a fetch was scheduled.
        """
        if self._closed or self._soon or self._fetching.locked():
            return False
        now = self._clock()
        if self._last_attempt is not None and now - self._last_attempt < self._cooldown:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._last_attempt = now  # before the task exists: a second call in a row is refused
        task = loop.create_task(self.refresh(), name=f"jwks refresh-soon {self.source}")
        self._soon.add(task)
        task.add_done_callback(self._soon.discard)
        return True

    async def refresh(self) -> bool:
        """Fetch now and keep the result if it is usable; True if the set of keys changed."""
        async with self._fetching:
            self._last_attempt = self._clock()
            try:
                async with asyncio.timeout(self._timeout):
                    body = await fetch_jwks(self._url, self._ssl_context, self._max_bytes)
                store = parse_jwks(body, self.source)
            except TimeoutError:
                self._failed(f"{self.source}: no complete answer within {self._timeout:g}s")
                return False
            except JwksFetchError as e:
                self._failed(f"{self.source}: {e}")
                return False
            except ValueError as e:  # parse_jwks: its message names the source already
                self._failed(str(e))
                return False
            return self._loaded(store)

    async def close(self) -> None:
        """Stop the background refreshes and any scheduled fetch."""
        self._closed = True
        tasks = [task for task in (self._poller, *self._soon) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _failed(self, why: str) -> None:
        self.last_error = why
        if self._failing:
            logger.debug("trust store fetch still failing: %s", why)
            return
        self._failing = True
        # `why` starts with the source already.
        if self.store is None:
            logger.warning(
                "trust store fetch failed, no key loaded; tokens are refused "
                "(keys_unavailable) until a fetch succeeds: %s", why,
            )
        else:
            logger.warning(
                "trust store fetch failed, keeping the %d keys last loaded: %s",
                len(self.store.keys), why,
            )

    def _loaded(self, store: TrustStore) -> bool:
        self.loaded_at = time.time()
        self.last_error = None
        if self._failing:
            self._failing = False
            logger.info("trust store %s: fetched again after a failure", self.source)
        if store.skipped != self._skipped:  # log each skipped key once, not every interval
            self._skipped = store.skipped
            for why in store.skipped:
                logger.warning("trust store %s: skipped a key: %s", self.source, why)
        keys = key_set(store)
        if keys == self._keys:
            return False
        self._keys = keys
        self.store = store
        logger.info(
            "trust store %s: %d keys loaded (%s)",
            self.source, len(store.keys), ", ".join(sorted(store.keys)),
        )
        if self._on_update is not None:
            try:
                self._on_update(store)
            except Exception:
                logger.exception("trust store %s: on_update failed", self.source)
        return True


# --- the fetch: one GET, no redirects, a capped body -----------------------------------------


async def fetch_jwks(url: JwksUrl, ssl_context: ssl.SSLContext, max_bytes: int) -> bytes:
    """The body of a 200 answer to GET `url`; JwksFetchError otherwise.

    Bound it with a timeout: this function waits as long as the server makes it.
    """
    try:
        reader, writer = await asyncio.open_connection(
            url.host, url.port, ssl=ssl_context, server_hostname=url.host, limit=_MAX_LINE
        )
    except ssl.SSLCertVerificationError as e:
        raise JwksFetchError(f"the certificate was refused: {e.verify_message}") from None
    except OSError as e:  # refused, unreachable, no such host, a TLS failure
        raise JwksFetchError(f"cannot connect: {e.strerror or e}") from None
    try:
        request = (
            f"GET {url.target} HTTP/1.1\r\n"
            f"Host: {url.authority}\r\n"
            "Accept: application/jwk-set+json, application/json\r\n"
            "User-Agent: cohortgate\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(request.encode("ascii"))
        await writer.drain()
        return await _read_response(reader, max_bytes)
    except asyncio.IncompleteReadError:
        raise JwksFetchError("the connection closed before the answer was complete") from None
    except OSError as e:
        raise JwksFetchError(f"the connection failed: {e.strerror or e}") from None
    finally:
        writer.transport.abort()  # the answer is complete or refused; no close_notify wait


async def _read_response(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    for _ in range(_MAX_INTERIM + 1):
        status = _status(await _read_line(reader))
        headers = await _read_headers(reader)
        if status >= 200 or status == 101:
            break
    else:
        raise JwksFetchError("too many interim (1xx) answers")
    if 300 <= status < 400:
        location = headers.get("location")
        where = f" to {_short(location)}" if location else ""
        raise JwksFetchError(f"HTTP {status}{where}: redirects are not followed")
    if status != 200:
        raise JwksFetchError(f"HTTP {status}; only 200 is accepted")
    coding = headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise JwksFetchError(f"content-encoding {_short(coding)} was not asked for")
    transfer = headers.get("transfer-encoding")
    if transfer is not None:
        if [c.strip().lower() for c in transfer.split(",")] != ["chunked"]:
            raise JwksFetchError(f"transfer-encoding {_short(transfer)} is not supported")
        return await _read_chunked(reader, max_bytes)
    length = headers.get("content-length")
    if length is not None:
        size = _content_length(length)
        if size > max_bytes:
            raise JwksFetchError(_too_large(f"{size} bytes", max_bytes))
        return await reader.readexactly(size)
    return await _read_to_eof(reader, max_bytes)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readline()
    except ValueError:  # the line is longer than the reader's limit
        raise JwksFetchError(f"a line of the answer is longer than {_MAX_LINE} bytes") from None
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)
    return line


def _status(line: bytes) -> int:
    match = _STATUS_LINE.fullmatch(line)
    if match is None:
        raise JwksFetchError("the answer is not HTTP/1.x")
    return int(match[1])


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    """The header fields by lower-case name; repeated fields joined with ", "."""
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        line = await _read_line(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        name, colon, value = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise JwksFetchError("a header line of the answer is malformed")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t\r\n").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    raise JwksFetchError(f"the answer has more than {_MAX_HEADERS} header lines")


def _content_length(value: str) -> int:
    # The same length repeated ("12, 12") is what a field sent twice joins into.
    sizes = {v.strip() for v in value.split(",")}
    if len(sizes) != 1 or not _CONTENT_LENGTH.fullmatch(size := sizes.pop()):
        raise JwksFetchError(f"content-length {_short(value)} is not one length")
    return int(size)


async def _read_chunked(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = bytearray()
    while True:
        match = _CHUNK_SIZE.fullmatch(await _read_line(reader))
        if match is None:
            raise JwksFetchError("a chunk size line of the answer is malformed")
        size = int(match[1], 16)
        if size == 0:
            return bytes(body)  # the trailers, if any, are of no use here
        if len(body) + size > max_bytes:
            raise JwksFetchError(_too_large(f"at least {len(body) + size} bytes", max_bytes))
        body += await reader.readexactly(size)
        if await _read_line(reader) not in (b"\r\n", b"\n"):
            raise JwksFetchError("a chunk of the answer is longer than its size")


async def _read_to_eof(reader: asyncio.StreamReader, max_bytes: int) -> bytes:
    body = bytearray()
    while chunk := await reader.read(min(_READ_SIZE, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise JwksFetchError(_too_large(f"over {max_bytes} bytes", max_bytes))
    return bytes(body)


def _too_large(size: str, max_bytes: int) -> str:
    return f"the JWKS is {size}; the limit is {max_bytes} bytes"


def _short(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
