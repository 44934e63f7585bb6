"""Streaming: 200 concurrent SSE streams of 100 events, 20 ms apart, through the gate.

The upstream (tests/bench/sse_upstream.py, its own process) stamps every event with
time.monotonic() when it writes it; the client here (asyncio, raw HTTP/1.1, one connection per
stream, approved tokens of 200 distinct customers, `"stream": true`) notes when each event
arrives, on the same host and clock. Each round runs the same client three ways, one after the
other: straight to the upstream (the baseline: the client's and the upstream's own delay on this
machine), through a bare mitmdump that streams (`stream_large_bodies=1`: what mitmproxy itself
costs) and through the gate. The added delay is the difference of the distributions'
percentiles (gate minus direct). A stream is complete when its `data: [DONE]` arrives inside
the HTTP body; bytes after the body's end are reported as a framing error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import Final

from tests.bench.common import MODEL
from tests.bench.common import REPO
from tests.bench.common import BenchError
from tests.bench.common import Processes
from tests.bench.common import Tokens
from tests.bench.common import cpu_seconds
from tests.bench.common import fmt
from tests.bench.common import median
from tests.bench.common import percentile
from tests.bench.common import start_bare_mitmdump
from tests.bench.common import start_gate
from tests.bench.common import table
from tests.bench.common import wait_listening
from tests.redis_server import free_port

__all__ = ["run"]

STREAMS: Final = 200
EVENTS: Final = 100
INTERVAL: Final = 0.02
P99_TARGET_MS: Final = 25.0
_TRAILING_WAIT: Final = 0.2  # how long to look for bytes after a body that ended early
_BODY: Final = json.dumps({
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to a hundred."}],
    "max_tokens": 200,
    "stream": True,
}).encode()


@dataclass
class StreamResult:
    """What one client stream saw."""

    status: int = 0
    events: int = 0
    done: bool = False  # `data: [DONE]` arrived within the body
    sent: list[float] = field(default_factory=list)  # the upstream's stamp, one per event
    delays: list[float] = field(default_factory=list)  # seconds, one per event
    error: str | None = None
    framing_error: bool = False  # bytes followed the end of the chunked body


def _take_events(buf: bytearray, arrived: float, result: StreamResult) -> None:
    """Consume the complete SSE events in `buf`, noting each benchmark event's delay."""
    while (end := buf.find(b"\n\n")) >= 0:
        event = bytes(buf[:end])
        del buf[: end + 2]
        for line in event.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                result.done = True
                continue
            at = payload.find(b'"bench":{')
            if at < 0:
                continue  # the usage event, when the client asked for it
            sent = float(json.loads(payload[at + 8 : payload.index(b"}", at) + 1])["t"])
            result.sent.append(sent)
            result.delays.append(arrived - sent)
            result.events += 1


async def _read_body(reader: asyncio.StreamReader, chunked: bool, result: StreamResult) -> None:
    buf = bytearray()
    while True:
        if chunked:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                return
        buf += data
        _take_events(buf, time.monotonic(), result)


async def one_stream(port: int, token: str | None) -> StreamResult:
    """One streamed chat completion to 127.0.0.1:`port`, with `token` as the approval."""
    result = StreamResult()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(
            (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
             f"Content-Type: application/json\r\nContent-Length: {len(_BODY)}\r\n\r\n").encode()
            + _BODY
        )
        head = await reader.readuntil(b"\r\n\r\n")
        result.status = int(head.split(b" ", 2)[1])
        if result.status != 200:
            result.error = head.decode(errors="replace").split("\r\n", 1)[0]
            return result
        chunked = b"transfer-encoding: chunked" in head.lower()
        await _read_body(reader, chunked, result)
        if chunked and not result.done:
            with contextlib.suppress(TimeoutError):
                extra = await asyncio.wait_for(reader.read(4096), _TRAILING_WAIT)
                if extra:
                    result.framing_error = True
                    result.error = f"the body ended before [DONE]; then came {extra[:40]!r}"
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return result


async def _all_streams(port: int, tokens: tuple[str, ...] | None,
                       streams: int) -> list[StreamResult]:
    timeout = EVENTS * INTERVAL + 60
    jobs = [one_stream(port, tokens[i] if tokens else None) for i in range(streams)]
    return await asyncio.wait_for(asyncio.gather(*jobs), timeout)


def measure(port: int, tokens: tuple[str, ...] | None, pid: int | None,
            streams: int) -> dict[str, Any]:
    """All the streams through one path; with `pid`, that proxy's CPU use meanwhile."""
    cpu_before, started = (cpu_seconds(pid) if pid else 0.0), time.monotonic()
    results = asyncio.run(_all_streams(port, tokens, streams))
    wall = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu_before if pid else float("nan")
    delays_ms = [d * 1000 for r in results for d in r.delays]
    # steady state: the events sent once every stream had begun (the connection storm is over)
    begun = max((r.sent[0] for r in results if r.sent), default=0.0)
    steady_ms = [d * 1000 for r in results for s, d in zip(r.sent, r.delays, strict=True)
                 if s > begun]
    errors = [r.error for r in results if r.error]
    return {
        "streams": streams,
        "complete": sum(1 for r in results if r.done and r.events == EVENTS),
        "events": sum(r.events for r in results),
        "expected": streams * EVENTS,
        "p50_ms": percentile(delays_ms, 50),
        "p99_ms": percentile(delays_ms, 99),
        "max_ms": max(delays_ms, default=float("nan")),
        "steady_events": len(steady_ms),
        "steady_p50_ms": percentile(steady_ms, 50),
        "steady_p99_ms": percentile(steady_ms, 99),
        "proxy_cpu_percent": cpu / wall * 100,
        # the proxy's CPU time over the run (the 200 requests included) per event relayed
        "proxy_cpu_us_per_event": cpu * 1e6 / max(1, sum(r.events for r in results)),
        "framing_errors": sum(1 for r in results if r.framing_error),
        "errors": errors[:3],
        "error_count": len(errors),
    }


def run(*, rounds: int = 3, streams: int = STREAMS) -> dict[str, Any]:
    """Start the SSE upstream, a streaming bare mitmdump and the gate; run the rounds."""
    with tempfile.TemporaryDirectory(prefix="cohortgate-bench-") as tmp, Processes() as procs:
        workdir = Path(tmp)
        tokens = Tokens.issue(workdir, streams)
        port = free_port()
        log = workdir / "sse-upstream.log"
        upstream = procs.start(
            "sse-upstream",
            [sys.executable, "-m", "tests.bench.sse_upstream", "--port", str(port),
             "--events", str(EVENTS), "--interval", str(INTERVAL)],
            log=log, cwd=REPO,
        )
        wait_listening(port, upstream, "the SSE upstream", log)
        bare_port, bare = start_bare_mitmdump(procs, workdir, port, "stream_large_bodies=1")
        gate = start_gate(procs, workdir, upstream_port=port, jwks=tokens.jwks)
        paths = (("direct", port, None, None), ("mitmdump", bare_port, None, bare.pid),
                 ("gate", gate.port, tokens.tokens, gate.pid))
        print(f"\n== stream: {streams} concurrent SSE streams x {EVENTS} events, "
              f"{INTERVAL * 1000:g} ms apart; {rounds} rounds of direct, bare mitmdump "
              f"(stream_large_bodies=1), gate ==", flush=True)
        rows: list[list[str]] = []
        per_round: list[dict[str, Any]] = []
        for n in range(1, rounds + 1):
            measured: dict[str, dict[str, Any]] = {}
            for name, p, toks, pid in paths:
                measured[name] = measure(p, toks, pid, streams)
                time.sleep(0.5)
            direct = measured["direct"]
            for name, m in measured.items():
                for key in ("p50_ms", "p99_ms", "steady_p50_ms", "steady_p99_ms"):
                    m[f"added_{key}"] = m[key] - direct[key]
                added = [("" if name == "direct" else fmt(m[f"added_{key}"], 1))
                         for key in ("p50_ms", "p99_ms", "steady_p50_ms", "steady_p99_ms")]
                rows.append([
                    str(n) if name == "direct" else "", name,
                    f"{m['events']}/{m['expected']}", f"{m['complete']}/{m['streams']}",
                    str(m["framing_errors"]), fmt(m["p50_ms"], 1), fmt(m["p99_ms"], 1),
                    fmt(m["steady_p50_ms"], 1), fmt(m["steady_p99_ms"], 1), *added,
                    fmt(m["proxy_cpu_us_per_event"], 0), fmt(m["proxy_cpu_percent"], 0),
                ])
                if m["error_count"]:
                    print(f"  round {n}, {name}: {m['error_count']} streams with an error, "
                          f"e.g. {m['errors'][0]}")
            per_round.append({"round": n, **measured})
        if gate.proc.poll() is not None:
            raise BenchError(f"the gate exited:\n{gate.stderr.read_text()[-2000:]}")
    summary: dict[str, Any] = {"streams": streams, "rounds": per_round}
    for name in ("mitmdump", "gate"):
        cells = []
        for key in ("p50_ms", "p99_ms", "steady_p50_ms", "steady_p99_ms"):
            summary[f"{name}_added_{key}"] = median([r[name][f"added_{key}"] for r in per_round])
            cells.append(fmt(summary[f"{name}_added_{key}"], 1))
        rows.append(["median", f"{name} - direct", "", "", "", "", "", "", "", *cells, "", ""])
    print(table(["round", "path", "events", "complete", "framing", "p50", "p99",
                 "steady p50", "steady p99", "+p50", "+p99", "+steady p50", "+steady p99",
                 "CPU us/event", "CPU %"], rows, align="ll" + "r" * 13))
    print("delays in ms from the upstream's write to the client's read; + is the path's "
          "percentile minus direct's; steady: events sent after every stream had begun; CPU: the "
          "proxy's, over the run, per event relayed and as a share of one core")
    delivered = all(r["gate"]["events"] == r["gate"]["expected"] for r in per_round)
    complete = all(r["gate"]["complete"] == streams for r in per_round)
    added99 = summary["gate_added_p99_ms"]
    verdict = "met" if delivered and complete and added99 < P99_TARGET_MS else "NOT met"
    print(f"through the gate: every event delivered: {'yes' if delivered else 'NO'}; every "
          f"stream complete ([DONE] inside the body): {'yes' if complete else 'NO'}; added "
          f"delay p50 {summary['gate_added_p50_ms']:.1f} ms, p99 {added99:.1f} ms; steady "
          f"state p50 {summary['gate_added_steady_p50_ms']:.1f} ms, p99 "
          f"{summary['gate_added_steady_p99_ms']:.1f} ms (target: all delivered, p99 < "
          f"{P99_TARGET_MS:g} ms: {verdict})")
    summary.update(all_delivered=delivered, all_complete=complete)
    return summary
