"""server.py: the lean master's settings, the one mitmproxy debug hook it turns off, and its
addon manager (checked against mitmproxy's own)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from mitmproxy import addonmanager
from mitmproxy import exceptions
from mitmproxy import hooks
from mitmproxy import http
from mitmproxy import options
from mitmproxy.master import Master
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.test import tflow
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


# --- LeanAddons: the stock AddonManager's behaviour, with the handlers looked up once -------


class Recorder:
    """An addon that notes each hook it sees, in the order the chain calls them."""

    def __init__(self, name: str, calls: list[str], *, fail: bool = False,
                 halt: bool = False) -> None:
        self.name = name
        self.calls = calls
        self.fail = fail
        self.halt = halt

    def requestheaders(self, f: Any) -> None:
        self.calls.append(f"{self.name}.requestheaders")
        if self.fail:
            raise ValueError("boom")
        if self.halt:
            raise exceptions.AddonHalt()

    async def request(self, f: Any) -> None:
        await asyncio.sleep(0)
        self.calls.append(f"{self.name}.request")

    def response(self, f: Any) -> Any:
        async def later() -> None:
            self.calls.append(f"{self.name}.response")
        return later()  # a sync handler that hands back an awaitable


class Updates:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def update(self, flows: list[Any]) -> None:
        self.calls.append(f"update {len(flows)}")


def run_hooks(manager_factory: Callable[[Any], Any], addons: Callable[[list[str]], list[Any]],
              hooks_to_run: list[Callable[[Any], hooks.Hook]]) -> list[str]:
    calls: list[str] = []

    async def go() -> None:
        master = Master(options.Options())
        try:
            master.addons = manager_factory(master)
            master.addons.add(*addons(calls))
            f = tflow.tflow()
            for make in hooks_to_run:
                await master.addons.handle_lifecycle(make(f))
        finally:
            await master.done()  # removes its log handler, bound to this event loop

    asyncio.run(go())
    return calls


HOOKS: list[Callable[[Any], hooks.Hook]] = [
    http_hooks.HttpRequestHeadersHook, http_hooks.HttpRequestHook,
    http_hooks.HttpResponseHook]


@pytest.mark.parametrize("chain", [
    pytest.param(lambda c: [Recorder("a", c), Recorder("b", c)], id="two"),
    pytest.param(lambda c: [Recorder("a", c, fail=True), Recorder("b", c)], id="error-logged"),
    pytest.param(lambda c: [Recorder("a", c, halt=True), Recorder("b", c)], id="halt"),
    pytest.param(lambda c: [Recorder("a", c), Updates(c)], id="update-hook"),
    pytest.param(lambda c: [Updates(c)], id="update-only"),
])
def test_lean_addons_call_what_the_stock_manager_calls(chain: Any) -> None:
    stock = run_hooks(addonmanager.AddonManager, chain, HOOKS)
    lean = run_hooks(server.LeanAddons, chain, HOOKS)
    assert lean == stock
    assert stock  # the table exercises something


def test_lean_addons_log_a_handler_error_and_go_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = run_hooks(server.LeanAddons,
                      lambda c: [Recorder("a", c, fail=True), Recorder("b", c)], HOOKS[:1])
    assert calls == ["a.requestheaders", "b.requestheaders"]
    assert "Addon error: boom" in caplog.text


def test_lean_addons_see_an_addon_added_later() -> None:
    calls: list[str] = []

    async def go() -> None:
        master = server.lean_master(options.Options())
        master.addons.add(Recorder("a", calls))
        f = tflow.tflow()
        await master.addons.handle_lifecycle(http_hooks.HttpRequestHeadersHook(f))
        late = Recorder("late", calls)
        master.addons.add(late)
        await master.addons.handle_lifecycle(http_hooks.HttpRequestHeadersHook(f))
        master.addons.remove(late)
        await master.addons.handle_lifecycle(http_hooks.HttpRequestHeadersHook(f))
        await master.done()

    asyncio.run(go())
    assert calls == ["a.requestheaders", "a.requestheaders", "late.requestheaders",
                     "a.requestheaders"]


def test_lean_master_configures_through_the_lean_manager_only() -> None:
    seen: list[set[str]] = []

    class Configured:
        def configure(self, updated: set[str]) -> None:
            seen.append(updated)

    async def go() -> None:
        master = server.lean_master(options.Options())
        assert isinstance(master.addons, server.LeanAddons)
        master.addons.add(Configured())
        seen.clear()
        master.options.update(listen_port=8123)
        await master.done()

    asyncio.run(go())
    assert seen == [{"listen_port"}]


@pytest.mark.parametrize("make", [
    lambda f: http_hooks.HttpRequestHeadersHook(f),
    lambda f: hooks.UpdateHook([f]),
    lambda f: hooks.ConfigureHook({"x"}),
])
def test_hook_args_match_mitmproxys(make: Callable[[Any], hooks.Hook]) -> None:
    event = make(tflow.tflow())
    assert server.hook_args(event) == event.args()
