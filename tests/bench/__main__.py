"""`./dev bench [throughput|latency|stream|memory|profile|all] [--seconds N] [--rounds N] [--redis]`

throughput  A B A B: cohortgate serve (full policy) vs bare mitmdump, wrk -t1 -c10
latency     the same at one connection (wrk -t1 -c1): median latency A/B
stream      200 concurrent SSE streams of 100 events, 20 ms apart: delivery and added delay
memory      VmRSS after 20,000 and after 100,000 requests from 10,000 customers
profile     py-spy (or cProfile) of the gate under load: where the time goes
all         every one of them, the A/B comparisons with both limiter backends

--redis runs the A/B comparisons (and the profile) with a throwaway redis-server as the
limiter backend instead of the in-memory one. The results go to stdout as tables and, as JSON,
to --json (default /tmp/cohortgate-bench/results-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    parser.add_argument("--max-minutes", type=float, default=20.0,
                        help="cut the whole run after this long (default 20)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results as JSON")
    args = parser.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1:
        parser.error("--seconds and --rounds must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine_summary(), "started": time.time()}
    backends = ["memory", "redis"] if args.command == "all" else [
        "redis" if args.redis else "memory"]
    modes = {"throughput": [throughput.THROUGHPUT], "latency": [throughput.LATENCY],
             "all": [throughput.THROUGHPUT, throughput.LATENCY]}.get(args.command)
    if modes:
        results["ab"] = []
        for backend in backends:
            results["ab"] += throughput.run(backend=backend, modes=modes, rounds=args.rounds,
                                            seconds=args.seconds)
    if args.command in ("stream", "all"):
        results["stream"] = stream.run(rounds=args.rounds)
    if args.command in ("memory", "all"):
        results["memory"] = memory.run()
    if args.command in ("profile", "all"):
        results["profile"] = profiling.run(backend="redis" if args.redis else "memory",
                                           seconds=args.seconds)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(f"machine: {machine_summary()}", flush=True)
    started = time.monotonic()
    try:
        with bounded_run(round(args.max_minutes * 60)):
            results = run(args)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except RunTimeExceeded:
        print(f"bench: cut after {args.max_minutes:g} minutes (--max-minutes)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    results["seconds"] = time.monotonic() - started
    path = args.json or RESULTS_DIR / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nbench: done in {results['seconds']:.0f} s; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
