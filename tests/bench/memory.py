"""Memory: the gate's resident memory after 20,000 and after 100,000 requests from 10,000
distinct customers (the issue's target: within 20%, so every per-customer cache is bounded).

The 10,000 approvals are issued once; wrk cycles through them (rotate_tokens.lua, stopping
after a count of responses), 20,000 requests per leg, and VmRSS is read from /proc after each
leg. The decision log's last `seq` gives the number of requests the gate actually decided.
"""

from __future__ import annotations

import json
import time
from typing import Any
from typing import Final

from tests.bench.common import BenchError
from tests.bench.common import Gate
from tests.bench.common import bench_setup
from tests.bench.common import check_approved
from tests.bench.common import fmt
from tests.bench.common import rss_kib
from tests.bench.common import run_wrk
from tests.bench.common import start_gate
from tests.bench.common import table

__all__ = ["run"]

CUSTOMERS: Final = 10_000
LEG: Final = 20_000
LEGS: Final = 5  # 20,000 ... 100,000
RATIO_TARGET: Final = 1.2
LEG_SECONDS_BOUND: Final = 240  # a leg that has not finished by then is cut (and reported)
CONNECTIONS: Final = 10


def decided(gate: Gate) -> int:
    """The decision log's last seq: how many requests the gate has decided."""
    with gate.decisions.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 4096))
        lines = f.read().splitlines()
    return int(json.loads(lines[-1])["seq"]) if lines else 0


def run() -> dict[str, Any]:
    print(f"\n== memory: {LEGS} x {LEG:,} requests from {CUSTOMERS:,} customers, "
          f"wrk -t1 -c{CONNECTIONS}, in-memory limiter ==", flush=True)
    with bench_setup("memory", CUSTOMERS) as bench:
        procs, tokens = bench.procs, bench.tokens
        gate = start_gate(procs, bench.workdir, upstream_port=bench.nginx_port,
                          jwks=tokens.jwks)
        check_approved(gate.url, tokens.tokens[0])
        checkpoints: list[dict[str, Any]] = [
            {"requests": decided(gate), "rss_kib": rss_kib(gate.pid), "rps": float("nan")}]
        for _ in range(LEGS):
            result = run_wrk(procs, gate.url, tokens.file, seconds=LEG_SECONDS_BOUND,
                             connections=CONNECTIONS, stop_after=LEG)
            time.sleep(1.0)  # the last responses' log lines
            if gate.proc.poll() is not None:
                raise BenchError(f"the gate exited:\n{gate.stderr.read_text()[-2000:]}")
            checkpoints.append({"requests": decided(gate), "rss_kib": rss_kib(gate.pid),
                                "rps": result.rps, "errors": result.non2xx + result.socket_errors})
            print(f"  {checkpoints[-1]['requests']:,} requests: VmRSS "
                  f"{checkpoints[-1]['rss_kib'] / 1024:.1f} MiB ({result.rps:,.0f} req/s)",
                  flush=True)
    base = checkpoints[1]["rss_kib"]
    rows = [[f"{c['requests']:,}", fmt(c["rss_kib"] / 1024), fmt(c["rss_kib"] / base, 3),
             fmt(c["rps"], 0), str(c.get("errors", ""))] for c in checkpoints]
    print(table(["requests decided", "VmRSS MiB", "vs 20,000", "req/s", "errors"], rows,
                align="rrrrr"))
    ratio = checkpoints[-1]["rss_kib"] / base
    verdict = "met" if ratio <= RATIO_TARGET else "NOT met"
    print(f"VmRSS after {checkpoints[-1]['requests']:,} / after {checkpoints[1]['requests']:,} "
          f"requests: {ratio:.3f} (target <= {RATIO_TARGET}: {verdict})")
    return {"customers": CUSTOMERS, "checkpoints": checkpoints, "ratio": ratio}
