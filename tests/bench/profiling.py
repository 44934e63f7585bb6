"""Profile: where the gate's CPU goes under load, mitmproxy's own layers against the addon.

The gate (full policy, 500 customers) runs in front of nginx under wrk -t1 -c10 while py-spy
samples it (`py-spy record --format raw`, installed into the venv when missing; it pauses the
process for each sample, so stacks are consistent). When py-spy cannot run, the gate runs under
cProfile instead (self time only, and heavier). The raw profile is written under
/tmp/cohortgate-bench/. Printed: the top functions by self time, and each sample assigned once
to a part: the addon's when any addon frame is on its stack (by the deepest such frame: token
verification, limiter, decision log, ...), else the part of mitmproxy or the event loop its
deepest known frame belongs to.
"""

from __future__ import annotations

import contextlib
import pstats
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from typing import Final

from tests.bench.common import BenchError
from tests.bench.common import Processes
from tests.bench.common import bench_setup
from tests.bench.common import check_approved
from tests.bench.common import cpu_seconds
from tests.bench.common import fmt
from tests.bench.common import run_wrk
from tests.bench.common import start_gate
from tests.bench.common import table
from tests.bench.common import venv_tool

__all__ = ["analyse_raw", "category", "run"]

OUT_DIR: Final = Path("/tmp/cohortgate-bench")
CUSTOMERS: Final = 500
CONNECTIONS: Final = 10
RATE: Final = 250  # samples per second
TOP: Final = 15

_VERIFY = "addon: token verification (verify, keys, pyjwt, cryptography)"
_HTTP = "mitmproxy: HTTP/1 read and assemble, headers, messages"
_LAYERS = "mitmproxy: proxy layers (HTTP state machine)"
_SERVER = "mitmproxy: connection handler, tasks"
_DISPATCH = "mitmproxy: hook dispatch (addonmanager)"
_LOOP = "asyncio event loop and sockets"
# leaf frames of a thread that waits (py-spy counts some lock waits as busy)
_WAITS: Final = ("Condition.wait (", "Event.wait (", "Thread.join (", "Queue.get (")
# not the addon: on every stack (cli, server), or mitmproxy's own work under a cohortgate
# wrapper (http1guard's HTTP/1 state, LeanAddons' hook dispatch): classified as mitmproxy's
_ENTRY: Final = ("cohortgate/cli.py", "cohortgate/server.py", "cohortgate/http1guard.py")
_DISPATCH_FUNCTIONS: Final = ("LeanAddons.", "hook_args (")
# (path fragment, part): the first that matches a frame wins
_ADDON_PARTS: Final = (
    ("cohortgate/verify.py", _VERIFY),
    ("cohortgate/keys.py", _VERIFY),
    ("cohortgate/limiter/", "addon: rate limiter"),
    ("cohortgate/audit.py", "addon: decision log write (audit)"),
    ("cohortgate/usage.py", "addon: usage and token estimate (usage)"),
    ("cohortgate/policy.py", "addon: policy (revocation, binding, cohort, model, body JSON)"),
    ("cohortgate/runtime.py", "addon: runtime (reload poll, revocation lookup)"),
    ("cohortgate/admin.py", "addon: metrics"),
    ("cohortgate/", "addon: hooks, headers, request id, log record (addon)"),
)
_OTHER_PARTS: Final = (
    ("mitmproxy/utils/typecheck.py", "mitmproxy: message field type checks (__debug__ only)"),
    ("mitmproxy/optmanager.py", "mitmproxy: option reads (a deepcopy per read)"),
    ("mitmproxy/addonmanager.py", _DISPATCH),
    ("mitmproxy/hooks.py", _DISPATCH),
    ("cohortgate/http1guard.py", _LAYERS),
    ("mitmproxy/net/", _HTTP),
    ("mitmproxy/http.py", _HTTP),
    ("mitmproxy/coretypes/", _HTTP),
    ("h11/", _HTTP),
    ("mitmproxy/proxy/layers/", _LAYERS),
    ("mitmproxy/proxy/layer.py", _LAYERS),
    ("mitmproxy/proxy/tunnel.py", _LAYERS),
    ("mitmproxy/proxy/context.py", _LAYERS),
    ("mitmproxy/proxy/commands.py", _LAYERS),
    ("mitmproxy/proxy/events.py", _LAYERS),
    ("mitmproxy/proxy/server.py", _SERVER),
    ("mitmproxy/proxy/mode_servers.py", _SERVER),
    ("mitmproxy/utils/asyncio_utils.py", _SERVER),
    ("mitmproxy/", "mitmproxy: other"),
    ("asyncio/", _LOOP),
    ("selectors.py", _LOOP),
    ("socket.py", _LOOP),
)


def _file(frame: str) -> str:
    """The file of a py-spy frame `function (path)`."""
    return frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else ""


def _part(path: str, parts: Sequence[tuple[str, str]]) -> str | None:
    return next((label for fragment, label in parts if fragment in path), None)


def category(frames: Sequence[str]) -> str:
    """The part one sampled stack (root first) belongs to."""
    files = [_file(f) for f in frames]
    for path in reversed(files):
        if "cohortgate/" in path and not path.endswith(_ENTRY):
            return _part(path, _ADDON_PARTS) or "addon"
    for frame, path in zip(reversed(frames), reversed(files), strict=True):
        if frame.startswith(_DISPATCH_FUNCTIONS):
            return _DISPATCH
        label = _part(path, _OTHER_PARTS)
        if label is not None:
            return label
    return "other"


def analyse_raw(text: str) -> dict[str, Any]:
    """Self time, total time and parts of the event loop's thread from py-spy's raw output
    (collapsed stacks, recorded with --threads); the other threads' samples, busy and waiting.
    """
    self_time: Counter[str] = Counter()
    total: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    busy: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        name = thread.partition(": ")[2] or thread
        threads[name] += count
        if not frames or frames[-1].startswith(_WAITS):
            continue  # py-spy takes some lock waits for work
        busy[name] += count
        if name != "MainThread":
            continue
        samples += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
        parts[category(frames)] += count
    return {"samples": samples, "self": self_time, "total": total, "parts": parts,
            "threads": threads, "busy": busy}


def _ensure_py_spy() -> Path | None:
    tool = venv_tool("py-spy")
    if not tool.exists():
        print("bench: installing py-spy into the venv (pip)", file=sys.stderr, flush=True)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"],
                           capture_output=True, timeout=300, check=False)
    return tool if tool.exists() else None


def _print_profile(top: list[list[str]], parts: Counter[str], samples: int,
                   cpu_ms_per_request: float) -> dict[str, float]:
    print(f"\ntop {TOP} functions by self time (share of the gate's busy samples)")
    print(table(["self %", "total %", "function (file)"], top, align="rrl"))
    rows = []
    shares: dict[str, float] = {}
    for label, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        share = count / samples
        shares[label] = share
        rows.append([fmt(share * 100), fmt(share * cpu_ms_per_request * 1000, 0), label])
    for prefix in ("addon", "mitmproxy"):
        share = sum(s for k, s in shares.items() if k.startswith(prefix))
        rows.append([fmt(share * 100), fmt(share * cpu_ms_per_request * 1000, 0),
                     f"= {prefix}, all parts"])
    print("\nwhere the time goes (each sample once: the addon's if an addon frame is on the "
          "stack)")
    print(table(["%", "us/req", "part"], rows, align="rrl"))
    return shares


def _py_spy(procs: Processes, tool: Path, pid: int, out: Path, seconds: float
            ) -> subprocess.Popen[bytes]:
    return procs.start("py-spy", [tool, "record", "--pid", str(pid), "--rate", str(RATE),
                                  "--duration", str(round(seconds) + 1), "--format", "raw",
                                  "--nolineno", "--threads", "--output", out], capture=True)


def run(*, backend: str = "memory", seconds: float = 10.0) -> dict[str, Any]:
    tool = _ensure_py_spy()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with bench_setup(backend, CUSTOMERS) as bench:
        procs, tokens = bench.procs, bench.tokens
        cprofile_out = OUT_DIR / f"profile-{stamp}.prof"
        prefix = () if tool else ("-m", "cProfile", "-o", str(cprofile_out))
        gate = start_gate(procs, bench.workdir, upstream_port=bench.nginx_port,
                          jwks=tokens.jwks, backend=bench.limiter, python_args=prefix)
        check_approved(gate.url, tokens.tokens[0])
        run_wrk(procs, gate.url, tokens.file, seconds=3, connections=CONNECTIONS)  # warm up
        raw_out = OUT_DIR / f"profile-{stamp}.txt"
        spy = _py_spy(procs, tool, gate.pid, raw_out, seconds) if tool else None
        time.sleep(0.3)  # attached
        before = cpu_seconds(gate.pid)
        result = run_wrk(procs, gate.url, tokens.file, seconds=seconds, connections=CONNECTIONS)
        cpu_ms = (cpu_seconds(gate.pid) - before) * 1000 / max(1, result.requests)
        profiler = "cProfile"
        if spy is not None:
            try:
                _, err = spy.communicate(timeout=seconds + 30)
            finally:
                procs.stop(spy)
            if spy.returncode != 0 or not raw_out.exists():
                raise BenchError(f"py-spy failed ({spy.returncode}): {err.decode()[-1000:]}")
            profiler = f"py-spy {RATE} Hz"
        else:
            procs.stop(gate.proc, timeout=30)  # cProfile writes its file at exit
        print(f"\n== profile: {profiler}, {seconds:g} s of wrk -t1 -c{CONNECTIONS} on the gate "
              f"({backend} limiter, {CUSTOMERS} customers) ==")
        print(f"under the profiler: {result.rps:,.0f} req/s, gate CPU {cpu_ms:.2f} ms/request")
    if spy is not None:
        profile = analyse_raw(raw_out.read_text())
        samples = profile["samples"]
        if not samples:
            raise BenchError(f"py-spy recorded no sample ({raw_out})")
        self_time: Counter[str] = profile["self"]
        top = [[fmt(n / samples * 100), fmt(profile["total"][f] / samples * 100), f]
               for f, n in self_time.most_common(TOP)]
        print(f"{samples} samples of the event loop's thread ({samples / (RATE * seconds):.0%} "
              f"of the run busy); raw stacks (flamegraph.pl input) in {raw_out}")
        for name, count in profile["threads"].items():
            if name != "MainThread":
                print(f"thread {name}: {profile['busy'][name]} busy samples of {count} "
                      f"(the rest waiting)")
        shares = _print_profile(top, profile["parts"], samples, cpu_ms)
        addon = [[fmt(n / samples * 100), fmt(n / samples * cpu_ms * 1000, 0), f]
                 for f, n in profile["total"].most_common()
                 if "cohortgate/" in _file(f) and not _file(f).endswith(_ENTRY)][:TOP]
        print("\nthe addon's functions by total time (their callees included)")
        print(table(["total %", "us/req", "function (file)"], addon, align="rrl"))
        return {"profiler": profiler, "file": str(raw_out), "rps": result.rps,
                "cpu_ms_per_request": cpu_ms, "samples": samples, "top": top, "parts": shares,
                "addon": addon}
    return _cprofile_report(cprofile_out, result.rps, cpu_ms)


def _cprofile_report(path: Path, rps: float, cpu_ms: float) -> dict[str, Any]:
    """The fallback: self time by function and by part, from cProfile's statistics."""
    stats = pstats.Stats(str(path))
    entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    busy = sum(entry[2] for entry in entries.values())
    ranked = sorted(entries.items(), key=lambda kv: -kv[1][2])[:TOP]
    top = [[fmt(e[2] / busy * 100), fmt(e[3] / busy * 100), f"{fn} ({file}:{line})"]
           for (file, line, fn), e in ranked]
    parts: Counter[str] = Counter()
    for (file, _, _), entry in entries.items():
        if "cohortgate/" in file and not file.endswith(_ENTRY):
            label = _part(file, _ADDON_PARTS) or "addon"
        else:
            label = _part(file, _OTHER_PARTS) or "other"
        parts[label] += round(entry[2] * 1e6)
    print(f"cProfile statistics in {path} (self time only: a part is its own functions)")
    shares = _print_profile(top, parts, max(1, sum(parts.values())), cpu_ms)
    return {"profiler": "cProfile", "file": str(path), "rps": rps, "cpu_ms_per_request": cpu_ms,
            "top": top, "parts": shares}
