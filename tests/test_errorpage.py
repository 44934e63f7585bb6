"""Guards for the one mitmproxy internal cohortgate replaces (see cohortgate/errorpage.py).

If a mitmproxy upgrade renames the function or stops calling it by its module-level name,
these tests fail before a user sees an HTML 502 with the upstream's address in it.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import version

from mitmproxy.proxy.layers.http import _http1

from cohortgate import errorpage


def test_mitmproxy_is_in_the_pinned_range() -> None:
    major, minor = (int(x) for x in version("mitmproxy").split(".")[:2])
    assert (12, 2) <= (major, minor) < (12, 4)


def test_install_replaces_the_module_level_function() -> None:
    errorpage.install()
    errorpage.install()  # idempotent
    assert _http1.make_error_response is errorpage.json_error_response


def test_mitmproxy_still_calls_it_by_name_for_upstream_and_parse_errors() -> None:
    source = inspect.getsource(_http1)
    # the 502/413 path (ResponseProtocolError) and the 400 path (read_headers)
    assert source.count("make_error_response(status, event.message)") == 1
    assert source.count("make_error_response(400, str(e))") == 1


def test_json_error_response_is_openai_shaped_and_hides_the_message() -> None:
    raw = errorpage.json_error_response(502, "Connection refused to 10.1.2.3:8000")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502")
    assert b"content-type: application/json" in head.lower()
    assert b"10.1.2.3" not in raw
    err = json.loads(body)["error"]
    assert err == {"message": "The inference service is unavailable.",
                   "type": "upstream_error", "code": "upstream_unavailable", "param": None}


def test_proxy_errors_are_counted() -> None:
    before = errorpage.proxy_error_counts["invalid_request"]
    errorpage.json_error_response(400, "bad")
    assert errorpage.proxy_error_counts["invalid_request"] == before + 1
