"""Throughput and latency, A B A B in one run: (A) `cohortgate serve` with the full policy
against (B) a bare `mitmdump` in reverse mode, both in front of the same nginx.

A runs every check: EdDSA approvals of 500 distinct customers (round robin, one per request),
phases and cohorts, revocations, the model check, the rate limiter (in memory, or a throwaway
redis-server with --redis; limits too high to refuse) and the hash-chained decision log to a
file. B is stock mitmdump with no addon, given the same requests. Both processes stay up for
the whole run and take turns under wrk, so a noisy machine shifts both; the figure to read is
the ratio within each round, and its median over the rounds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Final

from tests.bench.common import BenchError
from tests.bench.common import Processes
from tests.bench.common import Tokens
from tests.bench.common import WrkResult
from tests.bench.common import bench_setup
from tests.bench.common import check_approved
from tests.bench.common import cpu_seconds
from tests.bench.common import fmt
from tests.bench.common import median
from tests.bench.common import run_wrk
from tests.bench.common import start_bare_mitmdump
from tests.bench.common import start_gate
from tests.bench.common import table

__all__ = ["LATENCY", "THROUGHPUT", "Mode", "run"]

CUSTOMERS: Final = 500
WARMUP_SECONDS: Final = 3
PAUSE: Final = 0.5  # between runs: let the previous run's connections close


@dataclass(frozen=True)
class Mode:
    """A load shape: wrk's connections and threads, and which ratio is the target."""

    name: str
    connections: int
    threads: int


THROUGHPUT: Final = Mode("throughput", connections=10, threads=1)
LATENCY: Final = Mode("latency", connections=1, threads=1)

# The targets: A/B requests per second (memory, redis), A/B median latency at one
# connection.
RPS_TARGET: Final = {"memory": 1.25, "redis": 1.1}
P50_TARGET: Final = 1.0


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    pid: int


@dataclass(frozen=True)
class Measured:
    """One wrk run against one target, with the proxy's CPU time per request."""

    wrk: WrkResult
    cpu_ms_per_request: float


def measure(procs: Processes, target: Target, tokens: Tokens, mode: Mode,
            seconds: float) -> Measured:
    before = cpu_seconds(target.pid)
    result = run_wrk(procs, target.url, tokens.file, seconds=seconds,
                     connections=mode.connections, threads=mode.threads)
    used = cpu_seconds(target.pid) - before
    time.sleep(PAUSE)
    per_request = used * 1000 / result.requests if result.requests else float("nan")
    return Measured(result, per_request)


def _row(round_no: str, label: str, m: Measured, ratios: Sequence[str] = ("", "")) -> list[str]:
    w = m.wrk
    return [round_no, label, fmt(w.rps), fmt(w.p50_ms, 2), fmt(w.p90_ms, 2), fmt(w.p99_ms, 2),
            fmt(m.cpu_ms_per_request, 2), str(w.non2xx + w.socket_errors), *ratios]


def compare(procs: Processes, a: Target, b: Target, tokens: Tokens, mode: Mode, *,
            rounds: int, seconds: float, backend: str) -> dict[str, Any]:
    """`rounds` rounds of A then B; prints the table and returns the figures."""
    print(f"\n== {mode.name}: wrk -t{mode.threads} -c{mode.connections}, {seconds:g} s per run, "
          f"{rounds} rounds A B A B, {backend} limiter ==", flush=True)
    rows: list[list[str]] = []
    per_round: list[dict[str, Any]] = []
    for n in range(1, rounds + 1):
        ma = measure(procs, a, tokens, mode, seconds)
        mb = measure(procs, b, tokens, mode, seconds)
        rps_ratio = ma.wrk.rps / mb.wrk.rps if mb.wrk.rps else float("nan")
        p50_ratio = ma.wrk.p50_ms / mb.wrk.p50_ms if mb.wrk.p50_ms else float("nan")
        rows.append(_row(str(n), a.label, ma))
        rows.append(_row("", b.label, mb, (fmt(rps_ratio, 2), fmt(p50_ratio, 2))))
        per_round.append({"round": n, "a": _figures(ma), "b": _figures(mb),
                          "rps_ratio": rps_ratio, "p50_ratio": p50_ratio})
        print(f"  round {n}: A {ma.wrk.rps:,.0f} req/s, B {mb.wrk.rps:,.0f} req/s, "
              f"A/B {rps_ratio:.2f}; p50 A {ma.wrk.p50_ms:.2f} ms, B {mb.wrk.p50_ms:.2f} ms",
              flush=True)
    med_a = median([r["a"]["rps"] for r in per_round])
    med_b = median([r["b"]["rps"] for r in per_round])
    rps_ratio = median([r["rps_ratio"] for r in per_round])
    p50_ratio = median([r["p50_ratio"] for r in per_round])
    for side, proxy in (("a", a), ("b", b)):
        rows.append(["median", proxy.label, fmt(med_a if side == "a" else med_b), *(
            fmt(median([r[side][key] for r in per_round]), 2)
            for key in ("p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_request")), "",
            *(("", "") if side == "a" else (fmt(rps_ratio, 2), fmt(p50_ratio, 2)))])
    print(table(["round", "side", "req/s", "p50 ms", "p90 ms", "p99 ms", "CPU ms/req",
                 "errors", "A/B req/s", "A/B p50"], rows, align="llrrrrrrrr"))
    errors = sum(r["a"]["errors"] + r["b"]["errors"] for r in per_round)
    if mode is LATENCY:
        verdict = "met" if p50_ratio <= P50_TARGET else "NOT met"
        print(f"median latency A/B {p50_ratio:.2f} (target <= {P50_TARGET:.2f}: {verdict}); "
              f"requests/s A/B {rps_ratio:.2f}")
    else:
        target = RPS_TARGET.get(backend, RPS_TARGET["memory"])
        verdict = "met" if rps_ratio >= target else "NOT met"
        print(f"requests/s A/B {rps_ratio:.2f} (median of the rounds' ratios; target >= "
              f"{target:.2f}: {verdict}); median latency A/B {p50_ratio:.2f}")
    if errors:
        print(f"WARNING: {errors} non-2xx responses or socket errors: the figures are suspect")
    return {"mode": mode.name, "backend": backend, "connections": mode.connections,
            "threads": mode.threads, "seconds": seconds, "rounds": per_round,
            "median_a_rps": med_a, "median_b_rps": med_b, "rps_ratio": rps_ratio,
            "p50_ratio": p50_ratio, "errors": errors}


def _figures(m: Measured) -> dict[str, float]:
    w = m.wrk
    return {"rps": w.rps, "requests": w.requests, "p50_ms": w.p50_ms, "p90_ms": w.p90_ms,
            "p99_ms": w.p99_ms, "mean_ms": w.mean_ms, "cpu_ms_per_request": m.cpu_ms_per_request,
            "errors": w.non2xx + w.socket_errors}


def run(*, backend: str, modes: Sequence[Mode], rounds: int,
        seconds: float) -> list[dict[str, Any]]:
    """Start nginx, the gate and the bare mitmdump (and redis-server for backend "redis"),
    then compare them in each mode. Everything started is stopped before returning."""
    with bench_setup(backend, CUSTOMERS) as bench:
        procs, tokens = bench.procs, bench.tokens
        gate = start_gate(procs, bench.workdir, upstream_port=bench.nginx_port,
                          jwks=tokens.jwks, backend=bench.limiter)
        bare_port, bare = start_bare_mitmdump(procs, bench.workdir, bench.nginx_port)
        a = Target("A cohortgate serve", gate.url, gate.pid)
        b = Target("B bare mitmdump", f"http://127.0.0.1:{bare_port}", bare.pid)
        check_approved(a.url, tokens.tokens[0], a.label)
        check_approved(b.url, tokens.tokens[0], b.label)
        for target in (a, b):  # warm both: connections, caches, the CA mitmdump generated
            measure(procs, target, tokens, THROUGHPUT, WARMUP_SECONDS)
        results = [compare(procs, a, b, tokens, mode, rounds=rounds, seconds=seconds,
                           backend=backend) for mode in modes]
        if gate.proc.poll() is not None:
            raise BenchError(f"the gate exited during the run:\n{gate.stderr.read_text()[-2000:]}")
        return results
