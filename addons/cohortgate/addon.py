"""The mitmproxy addon: thin hooks that run the gate's decision and record it.

requestheaders: extract the token, verify it, check revocation and binding, admit the
cohort of the current phase, scrub and stamp the headers. request: the checks that need the
body (model). responseheaders: stream SSE through. response / error: the log line.

The gate fails closed. A request is forwarded only when `request` finds it admitted by this
addon; any exception answers 500 `internal_error` (mitmproxy's own default would be to log the
exception and forward the request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import http
from mitmproxy.proxy import commands
from mitmproxy.proxy import events
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import ClientTLSLayer
from mitmproxy.utils import asyncio_utils

from cohortgate import errorpage
from cohortgate import http1guard
from cohortgate.config import Phase
from cohortgate.config import Quota
from cohortgate.limiter import Decision
from cohortgate.limiter import LimiterUnavailable
from cohortgate.limiter.base import DONE
from cohortgate.policy import admit_cohort
from cohortgate.policy import check_binding
from cohortgate.policy import check_model
from cohortgate.policy import limits_for
from cohortgate.policy import parse_json_body
from cohortgate.reasons import AuditUnavailable
from cohortgate.reasons import CohortNotAdmitted
from cohortgate.reasons import Denial
from cohortgate.reasons import HeadersTooLarge
from cohortgate.reasons import InternalError
from cohortgate.reasons import InvalidRequest
from cohortgate.reasons import MissingToken
from cohortgate.reasons import ModelNotApproved
from cohortgate.reasons import RateLimitedRequests
from cohortgate.reasons import RateLimitedTokens
from cohortgate.reasons import RatelimitUnavailable
from cohortgate.reasons import error_body
from cohortgate.runtime import Runtime
from cohortgate.units import format_duration
from cohortgate.usage import SseUsage
from cohortgate.usage import Usage
from cohortgate.usage import request_usage
from cohortgate.usage import reserve_tokens
from cohortgate.usage import usage_from_json
from cohortgate.usage import wants_usage
from cohortgate.verify import Approval
from cohortgate.verify import extract_token

logger = logging.getLogger("cohortgate")

META = "cohortgate"
RELOAD_INTERVAL = 0.25  # seconds between checks of the config, trust store and revocation files

# Headers whose removal would break the request's framing or routing.
_PROTECTED = frozenset({"host", "content-length", "transfer-encoding"})
# All header lines together; far above what an API client sends, far below what would let a
# client make the upstream (or the log) choke on a request the gate admitted.
MAX_HEADER_BYTES = 64 * 1024
# Visible ASCII except '%', which is escaped so that the encoding can be reversed.
_VISIBLE = frozenset(range(0x21, 0x7F)) - {ord("%")}


def header_value(text: str) -> str:
    """Percent-encode (UTF-8) every byte outside visible ASCII, and '%' itself."""
    raw = text.encode()
    if all(b in _VISIBLE for b in raw):
        return text
    return "".join(chr(b) if b in _VISIBLE else f"%{b:02X}" for b in raw)


def is_gate_header(name: str) -> bool:
    """`x-cohortgate-*` in any case, with `_` for `-` (some servers treat them alike)."""
    return name.lower().replace("_", "-").startswith("x-cohortgate-")


def headers_to_drop(names: list[str], connection: list[str], token_header: str | None) -> set[str]:
    """Lower-cased names to remove before forwarding: spoofed gate headers, the ones the client
    declared hop-by-hop in `Connection`, and the approval token."""
    drop = {n.lower() for n in names if is_gate_header(n)}
    for value in connection:
        drop.update(part.strip().lower() for part in value.split(","))
    if token_header is not None:
        drop.add(token_header.lower())
    drop.discard("")
    return drop - _PROTECTED


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for a limiter decision."""
    req, tok = decision.requests, decision.tokens
    return {
        "x-ratelimit-limit-requests": str(req.limit),
        "x-ratelimit-remaining-requests": str(req.remaining),
        "x-ratelimit-reset-requests": format_duration(req.reset),
        "x-ratelimit-limit-tokens": str(tok.limit),
        "x-ratelimit-remaining-tokens": str(tok.remaining),
        "x-ratelimit-reset-tokens": format_duration(tok.reset),
    }


def retry_headers(retry_after: float) -> dict[str, str]:
    """Retry-After in whole seconds (at least 1) and OpenAI's retry-after-ms."""
    wait = min(retry_after, 60.0)  # a request that can never fit is told a minute
    return {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
    }


def check_header_fields(fields: Sequence[tuple[bytes, bytes]]) -> None:
    """Refuse what an upstream could read differently from the gate: a CR, LF or NUL inside a
    header (an obs-fold continuation line arrives as CRLF + SP inside the value), and header
    sections too large to be an API call."""
    total = 0
    for name, value in fields:
        total += len(name) + len(value) + 4
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise InvalidRequest("a header value holds a line break or NUL (obs-fold?)")
    if total > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"{total} bytes of headers; the limit is {MAX_HEADER_BYTES}")


def chunks_to_send(sse: SseUsage) -> Callable[[bytes], list[bytes]]:
    """The stream callable for mitmproxy. It must never hand back an empty chunk: mitmproxy
    writes it as a zero-length HTTP/1.1 chunk, which ends the chunked body early and leaves
    the rest of the stream on the connection as garbage."""

    def relay(chunk: bytes) -> list[bytes]:
        data = sse(chunk)
        return [data] if data else []

    return relay


def rfc3339_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def path_without_query(path: str) -> str:
    """The query string is never logged: a client may have put a token there."""
    return path.split("?", 1)[0]


@dataclass(slots=True)
class FlowRecord:
    """What the gate learnt about one request, kept in `flow.metadata[META]`."""

    request_id: str
    started: float
    client_request_id: str | None
    approval: Approval | None = None
    phase: str | None = None
    admitted: bool = False  # the header checks passed
    forwarded: bool = False  # every check passed; the request went upstream
    logged: bool = False
    model: str | None = None
    stream: bool | None = None
    # rate limiting: who is charged, under which quota, and what was reserved
    limit_key: str | None = None
    quota: Quota | None = None
    unapproved: bool = False  # admitted under the phase's quota for callers without approval
    reserved: int = 0
    prompt_estimate: int = 0
    decision: Decision | None = None
    hide_usage: bool = False  # we asked a stream for its usage; the client did not
    sse: SseUsage | None = None


async def _settled(pending: Awaitable[object], delta: int) -> None:
    """Wait for a queued correction; a failure is logged (the limiter counts its own errors)."""
    try:
        await pending
    except Exception as e:  # settling is best effort; the request is already served
        logger.warning("cohortgate: could not settle %d tokens: %s", delta, e)


class RefuseTls(layer.Layer):
    """Closes a connection that opens with a TLS ClientHello on a plain-HTTP listener.

    Otherwise mitmproxy would answer it with a certificate from its own CA.
    """

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.Log("cohortgate: TLS refused on a plain-HTTP listener", logging.INFO)
            yield commands.CloseConnection(self.context.client)


class CohortGate:
    """Admits only approved customers of the current release phase; logs every decision."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime
        self._reloader: asyncio.Task[None] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        http1guard.install()  # and errorpage's JSON pages
        loader.add_option(
            "cohortgate_config",
            str,
            "",
            """
            Path of the cohortgate TOML config. Required when the addon runs inside mitmdump
            (`cohortgate serve` passes its config directly).
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "cohortgate_config" not in updated:
            return
        path = ctx.options.cohortgate_config
        if not path:
            if self.runtime is None:
                logger.error("cohortgate_config is not set: every request is refused (500)")
            return
        if self.runtime is not None:
            self.runtime.close()  # frees the decision log's lock for the new runtime
            self.runtime = None
        try:
            self.runtime = Runtime.start(Path(path))
        except (ValueError, RuntimeError) as e:
            raise exceptions.OptionsError(f"cohortgate: {e}") from e

    async def running(self) -> None:
        if self.runtime is not None:
            # malformed HTTP is answered by mitmproxy before any hook: count it there
            self.runtime.metrics.set_proxy_error_source(lambda: errorpage.proxy_error_counts)
            await self.runtime.open()
        if self._reloader is None:
            self._reloader = asyncio_utils.create_task(
                self._reload_forever(), name="cohortgate-reload", keep_ref=True
            )

    async def done(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            self._reloader = None
        if self.runtime is not None:
            await self.runtime.aclose()

    async def _reload_forever(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            if self.runtime is not None:
                # stat() of three small files: cheap enough for the event loop
                self.runtime.poll()

    # ---- connection ------------------------------------------------------------------

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        rt = self.runtime
        if rt is not None and rt.config.tls_cert is not None:
            return
        if _stack_has_client_tls(nextlayer.layer):
            nextlayer.layer = RefuseTls(nextlayer.context)

    # ---- request ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        rec = FlowRecord(
            request_id=str(uuid.uuid4()),
            started=time.perf_counter(),
            client_request_id=flow.request.headers.get("x-request-id"),
        )
        flow.metadata[META] = rec
        try:
            self._admit_headers(flow, rec)
        except Denial as denial:
            self._deny(flow, rec, denial)
        except Exception:
            logger.exception("cohortgate: internal error in requestheaders")
            self._deny(flow, rec, InternalError())

    def _admit_headers(self, flow: http.HTTPFlow, rec: FlowRecord) -> None:
        rt = self.runtime
        if rt is None:
            raise InternalError("no configuration is loaded")
        cfg = rt.config
        headers = flow.request.headers
        now = time.time()
        phase = cfg.phase_at(now)
        rec.phase = phase.name if phase else None
        if not rt.audit_ok:
            raise AuditUnavailable()

        try:
            token = extract_token(headers.get_all(cfg.token.header), bearer=cfg.token.bearer)
        except MissingToken:
            if phase is None or phase.unapproved is None:
                raise
            peer = flow.client_conn.peername
            self._admit_unapproved(rec, phase, f"u:ip:{peer[0] if peer else '-'}")
        else:
            approval = rt.verify(token, now)
            rec.approval = approval
            rt.check_revocation(approval)
            check_binding(approval, headers.get_all("authorization"), bearer=cfg.token.bearer)
            try:
                admit_cohort(phase, approval)
            except CohortNotAdmitted:
                if phase is None or phase.unapproved is None:
                    raise
                self._admit_unapproved(rec, phase, f"u:sub:{approval.sub}")
            else:
                rec.limit_key = f"a:{approval.sub}"
                rec.quota = limits_for(approval, cfg.limits)

        check_header_fields(headers.fields)  # what is about to be forwarded
        connection = headers.get_all("connection")
        drop = headers_to_drop(
            list(headers.keys()),
            connection,
            None if cfg.token.forward else cfg.token.header,
        )
        for name in drop:
            headers.pop(name, None)
        # the client's Connection options were for this hop; forwarded, they could make the
        # next hop strip the identity headers added below (RFC 9110 7.6.1)
        headers.pop("connection", None)
        if any(option.strip().lower() == "close"
               for value in connection for option in value.split(",")):
            headers["Connection"] = "close"
        # origin-form: an absolute-form target would name another host to the upstream
        flow.request.authority = ""
        if rec.approval is not None:
            headers["X-Cohortgate-Customer"] = header_value(rec.approval.sub)
            headers["X-Cohortgate-Cohort"] = header_value(rec.approval.cohort)
        headers["X-Cohortgate-Decision"] = "unapproved_quota" if rec.unapproved else "approved"
        headers["X-Request-Id"] = rec.request_id
        rec.admitted = True

    @staticmethod
    def _admit_unapproved(rec: FlowRecord, phase: Phase, key: str) -> None:
        """A caller without an admitted approval, under a phase that throttles rather than
        blocks them: limited by its verified customer id, else by its address."""
        assert phase.unapproved is not None
        rec.unapproved = True
        rec.limit_key = key
        rec.quota = phase.unapproved

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error:
            return
        rec = flow.metadata.get(META)
        if not isinstance(rec, FlowRecord):
            # requestheaders did not run for this flow: never forward what we did not check
            rec = FlowRecord(str(uuid.uuid4()), time.perf_counter(), None)
            flow.metadata[META] = rec
        try:
            rt = self.runtime
            if not rec.admitted or rt is None or rec.limit_key is None or rec.quota is None:
                raise InternalError("the request was not admitted by the header checks")
            body = self._check_body(flow, rec)
            await self._charge(rt, rec, body, path_without_query(flow.request.path))
            rec.forwarded = True
        except Denial as denial:
            self._deny(flow, rec, denial)
        except Exception:
            logger.exception("cohortgate: internal error in request")
            self._deny(flow, rec, InternalError())

    def _check_body(self, flow: http.HTTPFlow, rec: FlowRecord) -> dict[str, Any] | None:
        """The JSON body, read once; the model check; `include_usage` for streams."""
        approval = rec.approval
        content_type = flow.request.headers.get("content-type", "")
        body: dict[str, Any] | None = None
        if "json" in content_type.lower():
            try:
                raw = flow.request.get_content(strict=True)
            except ValueError as e:
                raise InvalidRequest("the body's content-encoding does not decode") from e
            body = parse_json_body(raw or b"")
        elif approval is not None and approval.models is not None and flow.request.raw_content:
            raise ModelNotApproved("the model of a non-JSON body cannot be checked")
        if body is not None:
            model = body.get("model")
            rec.model = model if isinstance(model, str) else None
            rec.stream = body.get("stream") is True
        if approval is not None:
            check_model(approval, body)
        if body is not None and rec.stream:
            # the usage must come back to be settled; a client that did not ask for it
            # does not see it (SseUsage drops that event again)
            rec.hide_usage = not wants_usage(body)
            if request_usage(body):
                flow.request.content = json.dumps(body, separators=(",", ":")).encode()
        return body

    async def _charge(self, rt: Runtime, rec: FlowRecord, body: dict[str, Any] | None,
                      path: str) -> None:
        """Reserve the request's tokens before it is forwarded; refuse it when they do not fit."""
        assert rec.limit_key is not None and rec.quota is not None
        reservation = reserve_tokens(body, path=path)
        tokens = reservation.total
        if not reservation.max_given:
            # without a max_tokens the completion reserve is a guess: never let the guess
            # alone make a request impossible
            tokens = min(tokens, rec.quota.tpm)
        rec.prompt_estimate = reservation.prompt
        try:
            decision = await rt.limiter.acquire(rec.limit_key, rec.quota, tokens)
        except LimiterUnavailable as e:
            raise RatelimitUnavailable() from e
        rec.decision = decision
        if not decision.allowed:
            if decision.refused == "tokens":
                raise RateLimitedTokens(
                    f"{tokens} tokens reserved; {decision.tokens.remaining} left of "
                    f"{decision.tokens.limit} per minute")
            raise RateLimitedRequests(f"limit {decision.requests.limit} per minute")
        rec.reserved = tokens

    # ---- response --------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        rec = flow.metadata.get(META)
        if not isinstance(rec, FlowRecord) or flow.response is None:
            return
        headers = flow.response.headers
        headers["X-Request-Id"] = rec.request_id
        if not rec.forwarded:
            return
        if rec.decision is not None:
            for name, value in ratelimit_headers(rec.decision).items():
                headers[name] = value  # the upstream's own are replaced
        if headers.get("content-type", "").startswith("text/event-stream"):
            rec.stream = True
            rec.sse = SseUsage(drop_usage_event=rec.hide_usage,
                               prompt_estimate=rec.prompt_estimate)
            flow.response.stream = chunks_to_send(rec.sse)

    def response(self, flow: http.HTTPFlow) -> None:
        rec = flow.metadata.get(META)
        if not isinstance(rec, FlowRecord) or rec.logged or flow.response is None:
            return
        if not rec.forwarded:
            return
        try:
            status = flow.response.status_code
            if rec.sse is not None:
                usage = rec.sse.usage
            else:
                usage = usage_from_json(flow.response.content or b"")
            self._settle(rec, usage)
            self._log(flow, rec, "allow", self._allow_reason(rec), status,
                      upstream_status=status, outcome="complete", usage=usage)
        except Exception:
            logger.exception("cohortgate: internal error in response")

    def error(self, flow: http.HTTPFlow) -> None:
        rec = flow.metadata.get(META)
        if not isinstance(rec, FlowRecord) or rec.logged:
            return
        try:
            self._log_error(flow, rec)
        except Exception:
            logger.exception("cohortgate: internal error in error")

    def _log_error(self, flow: http.HTTPFlow, rec: FlowRecord) -> None:
        msg = flow.error.msg if flow.error else ""
        if not rec.forwarded:
            if "body_size_limit" in msg:
                self._log(flow, rec, "deny", "body_too_large", 413)
            else:  # the client left before the gate decided
                self._log(flow, rec, "deny", "aborted", None, outcome="aborted")
            return
        resp = flow.response
        upstream_status = resp.status_code if resp is not None else None
        reason = self._allow_reason(rec)
        if resp is None and not flow.server_conn.timestamp_tcp_setup:
            # nothing reached the upstream: give the reserved tokens back
            self._settle(rec, Usage(0, 0, estimated=False))
            self._log(flow, rec, "allow", "upstream_unavailable", 502, outcome="upstream_error")
            return
        # an abort mid-stream: the usage if the upstream sent it, else the reservation stands
        usage = rec.sse.usage if rec.sse is not None else None
        settle = usage if usage is not None and not usage.estimated else None
        self._settle(rec, settle)
        if "client" in msg.lower():
            self._log(flow, rec, "allow", reason, upstream_status,
                      upstream_status=upstream_status, outcome="aborted", usage=usage)
        else:
            self._log(flow, rec, "allow", "upstream_unavailable",
                      upstream_status if upstream_status is not None else 502,
                      upstream_status=upstream_status, outcome="upstream_error", usage=usage)

    def _settle(self, rec: FlowRecord, usage: Usage | None) -> None:
        """Charge the real usage instead of the reservation (None: the reservation stands).

        The limiter applies or queues the correction before this returns (ahead of any later
        request's decision); the response does not wait for Redis to confirm it."""
        rt, decision = self.runtime, rec.decision
        if usage is None or rt is None or decision is None or rec.limit_key is None:
            return
        delta = usage.total - rec.reserved
        if delta and rec.quota is not None:
            try:
                pending = rt.limiter.settle(rec.limit_key, rec.quota, delta, decision.backend)
            except Exception as e:  # settling is best effort; the request is already served
                logger.warning("cohortgate: could not settle %d tokens: %s", delta, e)
                return
            if pending is not DONE:
                asyncio_utils.create_task(_settled(pending, delta), name="cohortgate-settle",
                                          keep_ref=True)

    @staticmethod
    def _allow_reason(rec: FlowRecord) -> str:
        return "unapproved_quota" if rec.unapproved else "approved"

    # ---- decisions -------------------------------------------------------------------

    def _deny(self, flow: http.HTTPFlow, rec: FlowRecord, denial: Denial) -> None:
        # mitmproxy would answer `Expect: 100-continue` after this hook, inviting an upload
        # that is refused anyway
        flow.request.headers.pop("expect", None)
        headers = {"content-type": "application/json", "x-request-id": rec.request_id}
        if not denial.retryable:
            headers["x-should-retry"] = "false"
        if denial.status == 401:
            challenge = 'Bearer realm="cohortgate"'
            if not isinstance(denial, MissingToken):
                challenge += ', error="invalid_token"'
            headers["www-authenticate"] = challenge
        if isinstance(denial, (RateLimitedRequests, RateLimitedTokens)) and rec.decision:
            headers.update(ratelimit_headers(rec.decision))
            headers.update(retry_headers(rec.decision.retry_after))
            if math.isinf(rec.decision.retry_after):
                headers["x-should-retry"] = "false"  # it can never fit this quota
        flow.response = http.Response.make(
            denial.status,
            error_body(denial.code, denial.status, denial.public_message()),
            headers,
        )
        self._log(flow, rec, "deny", denial.code, denial.status, detail=denial.detail or None)

    def _log(
        self,
        flow: http.HTTPFlow,
        rec: FlowRecord,
        decision: str,
        reason: str,
        status: int | None,
        *,
        upstream_status: int | None = None,
        outcome: str | None = None,
        detail: str | None = None,
        usage: Usage | None = None,
    ) -> None:
        rec.logged = True
        rt = self.runtime
        if rt is None:
            logger.error("decision not logged (no configuration): %s %s", decision, reason)
            return
        approval = rec.approval
        peer = flow.client_conn.peername
        latency = time.perf_counter() - rec.started
        record: dict[str, Any] = {
            "ts": rfc3339_now(),
            "request_id": rec.request_id,
            "decision": decision,
            "reason": reason,
            "status": status,
            "customer": approval.sub if approval else None,
            "cohort": approval.cohort if approval else None,
            "jti": approval.jti if approval else None,
            "kid": approval.kid if approval else None,
            "phase": rec.phase,
            "method": flow.request.method,
            "path": path_without_query(flow.request.path),
            "model": rec.model,
            "client": peer[0] if peer else None,
            "stream": rec.stream,
            "upstream_status": upstream_status,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "latency_ms": round(latency * 1000, 3),
            "outcome": outcome,
            "client_request_id": rec.client_request_id,
        }
        if detail:
            record["detail"] = detail
        if usage is not None and usage.estimated:
            record["usage_estimated"] = True
        rt.record(record)
        rt.metrics.record_decision(
            decision=decision, reason=reason, phase=rec.phase, latency_s=latency,
            upstream_status=upstream_status, cohort=approval.cohort if approval else None,
            prompt_tokens=record["prompt_tokens"], completion_tokens=record["completion_tokens"])


def _stack_has_client_tls(top: layer.Layer | None) -> bool:
    current = top
    while current is not None:
        if isinstance(current, ClientTLSLayer):
            return True
        current = getattr(current, "child_layer", None)
    return False
