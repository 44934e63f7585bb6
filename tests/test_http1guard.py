"""Guards for the mitmproxy internals http1guard.py wraps (see its docstring).

The behaviour is tested through the running proxy in tests/test_attacks.py
(TestOversizedRequests); these tests fail first, and say why, when a mitmproxy upgrade moves
what the wrappers stand on.
"""

from __future__ import annotations

import inspect

from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1

from cohortgate import errorpage
from cohortgate import http1guard


def test_install_patches_both_and_is_idempotent() -> None:
    http1guard.install()
    http1guard.install()
    stream, server = http_layers.HttpStream, _http1.Http1Server
    assert stream.state_wait_for_request_headers is http1guard._answer_before_body
    assert server.read_headers is http1guard._bounded_read_headers
    assert server.wait is http1guard._bounded_wait
    # the originals kept are mitmproxy's, not a wrapper wrapping itself
    original = http1guard._ORIGINAL["state_wait_for_request_headers"]
    assert original is not http1guard._answer_before_body
    assert http1guard._ORIGINAL["read_headers"] is not http1guard._bounded_read_headers
    assert _http1.make_error_response is errorpage.json_error_response


def test_mitmproxy_still_buffers_the_body_after_requestheaders() -> None:
    """The wrapper relies on the original leaving `client_state` at
    state_consume_request_body when the body is still to come, and on the body then being
    read through `request_body_buf`."""
    source = inspect.getsource(http1guard._ORIGINAL["state_wait_for_request_headers"])
    assert "self.client_state = self.state_consume_request_body" in source
    assert "yield HttpRequestHeadersHook(self.flow)" in source
    consume = inspect.getsource(http_layers.HttpStream.state_consume_request_body)
    assert "self.request_body_buf += event.data" in consume


def test_mitmproxy_still_reads_the_head_unbounded() -> None:
    """When mitmproxy bounds the head itself (its FIXME), this wrapper can go."""
    source = inspect.getsource(http1guard._ORIGINAL["read_headers"])
    assert "self.buf.maybe_extract_lines()" in source
    assert "FIXME: protect against header size DoS" in source


def test_mitmproxy_still_keeps_what_arrives_while_it_waits() -> None:
    """The wait wrapper relies on the bytes being appended to `buf` before `wait` runs, and
    on `wait` dropping nothing of them (they are the next request)."""
    handle = inspect.getsource(_http1.Http1Connection._handle_event)
    assert "self.buf += event.data" in handle
    wait = inspect.getsource(http1guard._ORIGINAL["wait"])
    assert "if isinstance(event, events.DataReceived):\n            return" in wait


def test_431_page_is_json_and_counted() -> None:
    before = errorpage.proxy_error_counts["headers_too_large"]
    raw = errorpage.json_error_response(431, "head over the limit")
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert b'"code":"headers_too_large"' in raw.replace(b" ", b"")
    assert errorpage.proxy_error_counts["headers_too_large"] == before + 1


def test_the_head_limit_leaves_room_for_the_fields_limit() -> None:
    from cohortgate.addon import MAX_HEADER_BYTES
    assert http1guard.MAX_HEAD_BYTES > MAX_HEADER_BYTES
