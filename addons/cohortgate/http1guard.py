"""Three limits mitmproxy's HTTP/1 server lacks, added where they must act: before the body.

1. A request refused in `requestheaders` is answered at once. mitmproxy writes a response set
   in that hook only after it has read, and buffered, the whole request body (up to
   body_limit): a client without a token could make the proxy hold 16 MB per request, and a
   client that sent `Expect: 100-continue` would wait for a 401 until it gave up and uploaded
   the body anyway. Here the answer goes out as soon as the hook has run; the rest of the body
   is read and dropped (the connection stays usable) and never stored; after `Expect:
   100-continue` (the client may never send the body) the answer says `Connection: close`.
2. A request head is cut off at MAX_HEAD_BYTES. mitmproxy reads a head of any size before any
   hook runs (its source says "FIXME: protect against header size DoS"): a 64 MB header line
   cost ~200 MB of memory. Longer heads get the JSON 431 of errorpage.py and the connection
   is closed; like malformed HTTP, such a request has no identity to log and is counted in the
   metrics. The 64 KiB limit of the header fields (addon.check_header_fields, with a decision
   line) still applies below this one.
3. What a client sends on its connection while its response is pending (mitmproxy does not
   pipeline, it keeps the bytes for later) is bounded by one more request (MAX_HEAD_BYTES +
   body_limit): past that the connection is closed, and the pending request ends as a client
   that left (`outcome: aborted`). Unbounded, a slow stream and a fast sender grew the proxy by
   the 200 MB sent.

All three wrap private methods of mitmproxy (`HttpStream.state_wait_for_request_headers`,
`Http1Server.read_headers`, `Http1Server.wait`), like errorpage.py: the version is pinned in
pyproject.toml and tests/test_http1guard.py fails if an upgrade renames them or changes the
states they rely on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Generator
from typing import Any

from h11._receivebuffer import ReceiveBuffer
from mitmproxy import version
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._events import RequestData
from mitmproxy.proxy.layers.http._events import RequestEndOfMessage
from mitmproxy.proxy.layers.http._events import RequestHeaders
from mitmproxy.proxy.layers.http._events import RequestTrailers
from mitmproxy.proxy.layers.http._hooks import HttpResponseHeadersHook
from mitmproxy.proxy.utils import expect
from mitmproxy.utils import human

from cohortgate import errorpage

#: The largest request head (request line and header fields) read before the gate answers
#: 431 and closes: the header fields' 64 KiB limit plus room for a long request line.
MAX_HEAD_BYTES = 64 * 1024 + 8 * 1024

_Commands = Generator[Any, Any, None]
_Stream = http_layers.HttpStream
_Server = _http1.Http1Server

_ORIGINAL: dict[str, Callable[..., _Commands]] = {}


def _answer_before_body(self: Any, event: RequestHeaders) -> _Commands:
    """state_wait_for_request_headers, then: a response set by the hook while the request
    body is still to come is sent now, and the body is dropped as it arrives."""
    expects_continue = event.request.headers.get("expect", "").lower() == "100-continue"
    yield from _ORIGINAL["state_wait_for_request_headers"](self, event)
    flow = self.flow
    if (flow.response is None or flow.error is not None or event.end_stream
            or self.client_state != self.state_consume_request_body):
        return
    self.client_state = self.state_discard_request_body
    if expects_continue:
        # no 100 was sent, so the client may never send the body it announced
        flow.response.headers["connection"] = "close"
    flow.response.timestamp_start = time.time()
    yield HttpResponseHeadersHook(flow)
    if (yield from self.check_killed(True)):
        return
    yield from self.send_response()


def _discard_request_body(self: Any, event: events.Event) -> _Commands:
    """The body of a request that was already answered: read, never kept; a body longer than
    body_limit (chunked, endless) closes the connection."""
    if isinstance(event, RequestData):
        self.discarded_bytes = getattr(self, "discarded_bytes", 0) + len(event.data)
        limit = human.parse_size(self.context.options.body_size_limit)
        if limit is not None and self.discarded_bytes > limit:
            yield commands.CloseConnection(self.context.client)
            self.client_state = self.state_errored
    elif isinstance(event, RequestEndOfMessage):
        self.flow.request.timestamp_end = time.time()
        self.client_state = self.state_done
        if self.server_state == self.state_done:
            yield from self.flow_done()


def _bounded_read_headers(self: Any, event: events.ConnectionEvent) -> _Commands:
    """Http1Server.read_headers with a limit on the head still being read."""
    yield from _ORIGINAL["read_headers"](self, event)
    if (isinstance(event, events.DataReceived) and self.state == self.read_headers
            and len(self.buf) > MAX_HEAD_BYTES):
        yield commands.SendData(self.conn, errorpage.json_error_response(
            431, f"request head over {MAX_HEAD_BYTES} bytes"))
        yield commands.CloseConnection(self.conn)
        self.state = self.done


def _bounded_wait(self: Any, event: events.Event) -> _Commands:
    """Http1Server.wait (request read, response pending) with a limit on what piles up."""
    yield from _ORIGINAL["wait"](self, event)
    if isinstance(event, events.DataReceived) and self.state == self.wait:
        body_limit = human.parse_size(self.context.options.body_size_limit)
        if len(self.buf) > MAX_HEAD_BYTES + (body_limit or 0):
            self.buf = ReceiveBuffer()  # freed now, not when the connection is collected
            yield commands.CloseConnection(self.conn)


def install() -> None:
    """Patch mitmproxy's HTTP/1 server; idempotent. Fails loudly on an unknown mitmproxy."""
    errorpage.install()  # the 431 page is errorpage's
    if _ORIGINAL:
        return
    missing = [f"{cls.__name__}.{name}" for cls, name in (
        (_Stream, "state_wait_for_request_headers"), (_Stream, "state_consume_request_body"),
        (_Stream, "send_response"), (_Stream, "flow_done"), (_Stream, "check_killed"),
        (_Server, "read_headers"), (_Server, "wait"), (_Server, "done"))
        if not callable(getattr(cls, name, None))]
    if missing:
        raise RuntimeError(
            f"mitmproxy {version.VERSION} lacks {', '.join(missing)}: cohortgate cannot answer "
            "refused requests before their body; install the mitmproxy version pinned in "
            "pyproject.toml")
    _ORIGINAL["state_wait_for_request_headers"] = _Stream.state_wait_for_request_headers
    _ORIGINAL["read_headers"] = _Server.read_headers
    _ORIGINAL["wait"] = _Server.wait
    _Stream.state_wait_for_request_headers = _answer_before_body  # type: ignore[method-assign]
    discard = expect(RequestData, RequestTrailers, RequestEndOfMessage)(_discard_request_body)
    _Stream.state_discard_request_body = discard  # type: ignore[attr-defined]
    _Server.read_headers = _bounded_read_headers  # type: ignore[method-assign]
    _Server.wait = _bounded_wait  # type: ignore[method-assign]
