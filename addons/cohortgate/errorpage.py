"""JSON error responses for the errors mitmproxy answers itself, before or after any hook.

mitmproxy writes an HTML page for an unreachable upstream (502), a body over the size limit
(413) and HTTP it cannot parse (400), from `mitmproxy.proxy.layers.http._http1
.make_error_response`, after the `error` hook and with no hook to replace it. An OpenAI client
needs the OpenAI error shape, and the page must not reveal the upstream's address, so we
replace that one function. It is a private name: the mitmproxy version range is pinned in
pyproject.toml and tests/test_errorpage.py fails if an upgrade stops calling it. The listener
never offers HTTP/2 (whose error path is a different function), see server.py.
"""

from __future__ import annotations

import logging
from collections import Counter

from mitmproxy import http
from mitmproxy import version
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from cohortgate.reasons import error_body

logger = logging.getLogger(__name__)

#: status -> (reason code, message). Nothing taken from the request or the upstream is echoed.
PROXY_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request", "The request is not valid HTTP/1.1."),
    413: ("body_too_large", "The request body exceeds the gateway's size limit."),
    431: ("headers_too_large", "The request headers exceed the gateway's size limit."),
    502: ("upstream_unavailable", "The inference service is unavailable."),
}

#: How many error pages of each reason the proxy wrote itself (malformed HTTP has no identity
#: to log, so this is its only record). Read by the metrics.
proxy_error_counts: Counter[str] = Counter()


def json_error_response(status_code: int, message: str = "") -> bytes:
    """Drop-in for `_http1.make_error_response`: the same response, as OpenAI-shaped JSON."""
    code, text = PROXY_ERRORS.get(status_code, ("internal_error", "The gateway failed."))
    proxy_error_counts[code] += 1
    logger.debug("proxy error page %d %s: %s", status_code, code, message)
    resp = http.Response.make(
        status_code,
        error_body(code, status_code, text),
        http.Headers(
            Server="cohortgate",
            Connection="close",
            Content_Type="application/json",
            # SPEC: only 429 and 503 invite a retry; the SDK retries other 5xx by default.
            X_Should_Retry="false",
        ),
    )
    raw: bytes = http1.assemble_response(resp)
    return raw


def install() -> None:
    """Replace mitmproxy's HTML error page; idempotent. Fails loudly on an unknown mitmproxy."""
    current = getattr(_http1, "make_error_response", None)
    if current is None:
        raise RuntimeError(
            f"mitmproxy {version.VERSION} has no _http1.make_error_response: cohortgate "
            "cannot answer upstream errors in JSON; install the mitmproxy version pinned "
            "in pyproject.toml"
        )
    if current is not json_error_response:
        _http1.make_error_response = json_error_response
