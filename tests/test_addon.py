"""The addon's wiring through mitmproxy's own test harness, and its pure helpers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from cohortgate.addon import CohortGate
from cohortgate.addon import FlowRecord
from cohortgate.addon import header_value
from cohortgate.addon import headers_to_drop
from cohortgate.addon import is_gate_header
from cohortgate.runtime import Runtime
from tests.conftest import Authority
from tests.conftest import config_text


@pytest.mark.parametrize(("text", "encoded"), [
    ("acme", "acme"),
    ("a-b_c.d:e/f", "a-b_c.d:e/f"),
    ("with space", "with%20space"),
    ("100%", "100%25"),
    ("Zoë", "Zo%C3%AB"),
    ("line\r\nX-Injected: 1", "line%0D%0AX-Injected:%201"),
    ("tab\there", "tab%09here"),
    ("", ""),
])
def test_header_value(text: str, encoded: str) -> None:
    assert header_value(text) == encoded


@pytest.mark.parametrize(("name", "gate"), [
    ("X-Cohortgate-Customer", True),
    ("x-cohortgate-anything", True),
    ("X_COHORTGATE_COHORT", True),
    ("x-cohortgate_decision", True),
    ("X-Cohortgate", False),
    ("X-Cohortgatex-Customer", False),
    ("Authorization", False),
])
def test_is_gate_header(name: str, gate: bool) -> None:
    assert is_gate_header(name) is gate


@pytest.mark.parametrize(("names", "connection", "token", "dropped"), [
    (["Host", "X-Cohortgate-Customer"], [], "Authorization",
     {"x-cohortgate-customer", "authorization"}),
    (["Host"], ["X-Hop, keep-alive"], None, {"x-hop", "keep-alive"}),
    # a client may not make the gate drop what frames or routes the request
    (["Host"], ["Host, Content-Length, Transfer-Encoding"], None, set()),
    (["Host"], ["close", ""], "X-Approval-Token", {"close", "x-approval-token"}),
])
def test_headers_to_drop(names: list[str], connection: list[str], token: str | None,
                         dropped: set[str]) -> None:
    assert headers_to_drop(names, connection, token) == dropped


@pytest.fixture
def runtime(tmp_path: Path, authority: Authority) -> Iterator[Runtime]:
    path = tmp_path / "cohortgate.toml"
    path.write_text(config_text(upstream="http://127.0.0.1:9", port=8080,
                                jwks=authority.jwks, workdir=tmp_path))
    rt = Runtime.start(path)
    yield rt
    rt.close()


def flow_with(headers: dict[str, str]) -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(content=b""))
    f.request.headers.update(headers)
    f.request.headers["content-type"] = "application/json"
    return f


class TestCohortGate:
    async def test_admitted_flow_goes_on(self, runtime: Runtime, authority: Authority) -> None:
        gate = CohortGate(runtime)
        with taddons.context(gate):
            f = flow_with({"Authorization": f"Bearer {authority.issue()}"})
            gate.requestheaders(f)
            await gate.request(f)
            assert f.response is None
            assert f.metadata["cohortgate"].forwarded

    def test_exception_in_the_gate_answers_500_and_forwards_nothing(
            self, runtime: Runtime, authority: Authority, monkeypatch: pytest.MonkeyPatch) -> None:
        gate = CohortGate(runtime)

        class Broken:
            def verify(self, token: str, now: float) -> Any:
                raise RuntimeError("boom")

        monkeypatch.setattr(runtime, "verifier", Broken())
        with taddons.context(gate):
            f = flow_with({"Authorization": f"Bearer {authority.issue()}"})
            gate.requestheaders(f)
            assert f.response is not None and f.response.status_code == 500
            body = json.loads(f.response.content or b"")
            assert body["error"]["code"] == "internal_error"
            assert f.response.headers["x-should-retry"] == "false"
            assert "boom" not in (f.response.text or "")

    async def test_request_hook_refuses_a_flow_the_header_hook_never_saw(
            self, runtime: Runtime) -> None:
        gate = CohortGate(runtime)
        with taddons.context(gate):
            f = flow_with({})
            await gate.request(f)
            assert f.response is not None and f.response.status_code == 500

    async def test_request_hook_refuses_a_flow_not_admitted(self, runtime: Runtime) -> None:
        gate = CohortGate(runtime)
        with taddons.context(gate):
            f = flow_with({})
            f.metadata["cohortgate"] = FlowRecord("id", 0.0, None)
            await gate.request(f)
            assert f.response is not None and f.response.status_code == 500

    def test_unconfigured_addon_refuses_everything(self, authority: Authority) -> None:
        gate = CohortGate()
        with taddons.context(gate):
            f = flow_with({"Authorization": f"Bearer {authority.issue()}"})
            gate.requestheaders(f)
            assert f.response is not None and f.response.status_code == 500

    def test_bad_config_option_is_an_options_error(self, tmp_path: Path) -> None:
        from mitmproxy import exceptions
        bad = tmp_path / "bad.toml"
        bad.write_text('upstream = "ftp://x"\n')
        gate = CohortGate()
        with taddons.context(gate) as tctx, \
                pytest.raises(exceptions.OptionsError, match=r"bad\.toml"):
            tctx.configure(gate, cohortgate_config=str(bad))
