"""Streaming: 200 concurrent SSE streams of 100 events, 20 ms apart, through the gate.

The upstream (tests/bench/sse_upstream.py, its own process) stamps every event with
time.monotonic() when it writes it; the client here (asyncio, raw HTTP/1.1, one connection per
stream, approved tokens of 200 distinct customers, `"stream": true`) notes when each event
arrives, on the same host and clock. The same client straight to the upstream gives the
baseline (the client's and the upstream's own delay on this machine); the gate's added delay is
the difference of the two distributions' percentiles. Rounds alternate direct and gate.
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
from tests.bench.common import fmt
from tests.bench.common import free_port
from tests.bench.common import median
from tests.bench.common import percentile
from tests.bench.common import start_gate
from tests.bench.common import table
from tests.bench.common import wait_listening

__all__ = ["run"]

STREAMS: Final = 200
EVENTS: Final = 100
INTERVAL: Final = 0.02
P99_TARGET_MS: Final = 25.0
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
    done: bool = False  # `data: [DONE]` arrived
    delays: list[float] = field(default_factory=list)  # seconds, one per event
    error: str | None = None


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
            stamp = json.loads(payload[at + 8 : payload.index(b"}", at) + 1])
            result.delays.append(arrived - float(stamp["t"]))
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
        await _read_body(reader, b"transfer-encoding: chunked" in head.lower(), result)
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return result


async def _all_streams(port: int, tokens: tuple[str, ...] | None) -> list[StreamResult]:
    timeout = EVENTS * INTERVAL + 60
    jobs = [one_stream(port, tokens[i] if tokens else None) for i in range(STREAMS)]
    return await asyncio.wait_for(asyncio.gather(*jobs), timeout)


def measure(port: int, tokens: tuple[str, ...] | None) -> dict[str, Any]:
    results = asyncio.run(_all_streams(port, tokens))
    delays_ms = [d * 1000 for r in results for d in r.delays]
    errors = [r.error for r in results if r.error]
    return {
        "streams": STREAMS,
        "complete": sum(1 for r in results if r.done and r.events == EVENTS),
        "events": sum(r.events for r in results),
        "expected": STREAMS * EVENTS,
        "p50_ms": percentile(delays_ms, 50),
        "p99_ms": percentile(delays_ms, 99),
        "max_ms": max(delays_ms, default=float("nan")),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def run(*, rounds: int = 3) -> dict[str, Any]:
    """Start the SSE upstream and the gate, run the rounds, print the table."""
    with tempfile.TemporaryDirectory(prefix="cohortgate-bench-") as tmp, Processes() as procs:
        workdir = Path(tmp)
        tokens = Tokens.issue(workdir, STREAMS)
        port = free_port()
        log = workdir / "sse-upstream.log"
        upstream = procs.start(
            "sse-upstream",
            [sys.executable, "-m", "tests.bench.sse_upstream", "--port", str(port),
             "--events", str(EVENTS), "--interval", str(INTERVAL)],
            log=log, cwd=REPO,
        )
        wait_listening(port, upstream, "the SSE upstream", log)
        gate = start_gate(procs, workdir, upstream_port=port, jwks=tokens.jwks)
        print(f"\n== stream: {STREAMS} concurrent SSE streams x {EVENTS} events, "
              f"{INTERVAL * 1000:g} ms apart; {rounds} rounds, direct then gate ==", flush=True)
        rows: list[list[str]] = []
        per_round: list[dict[str, Any]] = []
        for n in range(1, rounds + 1):
            direct = measure(port, None)
            time.sleep(0.5)
            gated = measure(gate.port, tokens.tokens)
            time.sleep(0.5)
            added50 = gated["p50_ms"] - direct["p50_ms"]
            added99 = gated["p99_ms"] - direct["p99_ms"]
            per_round.append({"round": n, "direct": direct, "gate": gated,
                              "added_p50_ms": added50, "added_p99_ms": added99})
            for label, m, added in (("direct", direct, ("", "")),
                                    ("gate", gated, (fmt(added50, 2), fmt(added99, 2)))):
                rows.append([str(n) if label == "direct" else "", label,
                             f"{m['events']}/{m['expected']}", f"{m['complete']}/{m['streams']}",
                             fmt(m["p50_ms"], 2), fmt(m["p99_ms"], 2), fmt(m["max_ms"], 1),
                             *added])
            for m in (direct, gated):
                if m["error_count"]:
                    print(f"  {m['error_count']} streams failed, e.g. {m['errors'][0]}")
        if gate.proc.poll() is not None:
            raise BenchError(f"the gate exited:\n{gate.stderr.read_text()[-2000:]}")
    added50 = median([r["added_p50_ms"] for r in per_round])
    added99 = median([r["added_p99_ms"] for r in per_round])
    rows.append(["median", "gate - direct", "", "", "", "", "", fmt(added50, 2), fmt(added99, 2)])
    print(table(["round", "path", "events", "complete", "p50 ms", "p99 ms", "max ms",
                 "added p50", "added p99"], rows))
    delivered = all(r["gate"]["events"] == r["gate"]["expected"] and
                    r["gate"]["complete"] == STREAMS for r in per_round)
    verdict = "met" if delivered and added99 < P99_TARGET_MS else "NOT met"
    print(f"every event delivered through the gate: {'yes' if delivered else 'NO'}; added delay "
          f"p50 {added50:.2f} ms, p99 {added99:.2f} ms (target p99 < {P99_TARGET_MS:g} ms: "
          f"{verdict})")
    return {"rounds": per_round, "all_delivered": delivered, "added_p50_ms": added50,
            "added_p99_ms": added99}
