"""`./dev bench [throughput|latency|stream|memory|profile|all] [--seconds N] [--rounds N] [--redis]
[--streams N] [--json FILE] [--max-minutes M]`

throughput  A B A B: cohortgate serve (full policy) vs bare mitmdump, wrk -t1 -c10
latency     the same at one connection (wrk -t1 -c1): median latency A/B
stream      200 concurrent SSE streams of 100 events, 20 ms apart: delivery and added delay
memory      VmRSS after 20,000 and after 100,000 requests from 10,000 customers
profile     py-spy (or cProfile) of the gate under load: where the time goes
all         every one of them, the A/B comparisons with both limiter backends (~8.5 min)

--redis runs the A/B comparisons (and the profile) with a throwaway redis-server as the
limiter backend instead of the in-memory one. The results go to stdout as tables and, as JSON,
to --json (default /tmp/cohortgate-bench/results-<time>.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any
from typing import Final

from tests.bench import memory
from tests.bench import profiling
from tests.bench import stream
from tests.bench import throughput
from tests.bench.common import BenchError
from tests.bench.common import RunTimeExceeded
from tests.bench.common import bounded_run
from tests.bench.common import machine_summary

COMMANDS: Final = ("throughput", "latency", "stream", "memory", "profile", "all")
RESULTS_DIR: Final = Path("/tmp/cohortgate-bench")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="./dev bench", description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="all", choices=COMMANDS)
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of each measured wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="A B rounds per comparison (default 3)")
    parser.add_argument("--redis", action="store_true",
                        help="the limiter backend is a throwaway redis-server")
    parser.add_argument("--streams", type=int, default=stream.STREAMS,
                        help=f"concurrent SSE streams (default {stream.STREAMS})")
    parser.add_argument("--max-minutes", type=float, default=20.0,
                        help="cut the whole run after this long (default 20)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results as JSON")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.streams < 1:
        parser.error("--seconds, --rounds and --streams must be at least 1")
    return args


def parts(args: argparse.Namespace) -> list[tuple[str, Callable[[], Any]]]:
    """The benchmarks the command asks for, in order, as (name, run)."""
    chosen: list[tuple[str, Callable[[], Any]]] = []
    backends = ["memory", "redis"] if args.command == "all" else [
        "redis" if args.redis else "memory"]
    modes = {"throughput": [throughput.THROUGHPUT], "latency": [throughput.LATENCY],
             "all": [throughput.THROUGHPUT, throughput.LATENCY]}.get(args.command)
    for backend in backends if modes else []:
        chosen.append((f"ab-{backend}", functools.partial(
            throughput.run, backend=backend, modes=modes or [], rounds=args.rounds,
            seconds=args.seconds)))
    if args.command in ("stream", "all"):
        chosen.append(("stream", functools.partial(stream.run, rounds=args.rounds,
                                                   streams=args.streams)))
    if args.command in ("memory", "all"):
        chosen.append(("memory", memory.run))
    if args.command in ("profile", "all"):
        chosen.append(("profile", functools.partial(
            profiling.run, backend="redis" if args.redis else "memory", seconds=args.seconds)))
    return chosen


def run(args: argparse.Namespace, results: dict[str, Any]) -> bool:
    """Run the parts into `results`; a part that fails is reported and the others still run.
    Returns whether every part ran."""
    ok = True
    for name, part in parts(args):
        try:
            results[name] = part()
        except (BenchError, OSError, ValueError, RuntimeError) as e:
            ok = False
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"\nbench: {name} failed: {e}", file=sys.stderr, flush=True)
            if not isinstance(e, BenchError):
                traceback.print_exc()
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    machine = machine_summary()
    print(f"machine: {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "command": args.command,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    started = time.monotonic()
    code = 0
    try:
        with bounded_run(round(args.max_minutes * 60)):
            code = 0 if run(args, results) else 1
    except RunTimeExceeded:
        print(f"bench: cut after {args.max_minutes:g} minutes (--max-minutes)", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        code = 130
    results["seconds"] = time.monotonic() - started
    path = args.json or RESULTS_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nbench: {'done' if code == 0 else 'stopped'} in {results['seconds']:.0f} s; "
          f"results in {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
