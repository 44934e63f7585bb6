"""server.py: the lean master's settings, and the one mitmproxy debug hook it turns off."""

from __future__ import annotations

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from cohortgate import server


def test_mitmproxy_still_has_the_debug_type_check_we_skip() -> None:
    # if an upgrade moves it, skip_debug_type_checks() silently does nothing: notice it here
    assert "__post_init__" in vars(http.MessageData)


def test_skipping_the_debug_checks_keeps_messages_working(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http.MessageData, "__post_init__", http.MessageData.__post_init__)
    with pytest.raises(TypeError):  # the check is on: a str where bytes belong
        http.Request("example.com", 80, b"GET", b"http", b"example.com", b"/", b"HTTP/1.1",
                     http.Headers(), b"", None, "not a float", None)  # type: ignore[arg-type]
    server.skip_debug_type_checks()
    request = tutils.treq()
    request.headers["x-a"] = "b"
    assert request.headers["x-a"] == "b"
    response = http.Response.make(200, b"{}", {"content-type": "application/json"})
    assert response.content == b"{}"


def test_idle_timeout_outlasts_a_long_reasoning_pause() -> None:
    assert server.IDLE_TIMEOUT >= 3600
