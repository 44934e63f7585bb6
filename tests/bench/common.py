"""Shared machinery of the cohortgate benchmarks: processes, the nginx upstream, the gate, the
bare mitmdump, approval tokens, wrk, /proc readings and the results tables.

Everything listens on and talks to 127.0.0.1 only. Every process is started through
`Processes`, in its own session (so a Ctrl-C reaches only the benchmark, which then stops them
in order) and with a parent-death signal (so even a SIGKILLed benchmark leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from types import FrameType
from types import TracebackType
from typing import Final
from typing import Self

from cohortgate.keys import init_keys
from cohortgate.keys import issue_token
from tests.redis_server import free_port
from tests.redis_server import redis_server

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parent.parent

ISSUER: Final = "https://approvals.example.gov"
AUDIENCE: Final = "gpt-5.6"
COHORT: Final = "preview-1"
MODEL: Final = "gpt-5.6"

# What wrk sends (rotate_tokens.lua has the same default) and what nginx answers.
CHAT_REQUEST: Final = (
    '{"model":"gpt-5.6","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
)
CHAT_COMPLETION: Final = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1767225600,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
    },
    separators=(",", ":"),
)

# Limits no benchmark reaches: the limiter runs on every request but never refuses.
_HIGH_RPM: Final = 10_000_000
_HIGH_TPM: Final = 10_000_000_000

_PR_SET_PDEATHSIG: Final = 1
_LIBC: Final = ctypes.CDLL(None, use_errno=True)
_START_TIMEOUT: Final = 30.0


class BenchError(RuntimeError):
    """A benchmark cannot run or produced no valid figure; the message says why."""


# ---- tools ------------------------------------------------------------------------------------


def _which(command: str) -> str | None:
    # nginx lives in /usr/sbin, which a non-login PATH may lack
    return shutil.which(command, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_debian_packages(commands: Mapping[str, str]) -> dict[str, str]:
    """Install the Debian packages of the commands that are missing ({command: package});
    returns {command: path}. The machine is fresh every session, so this runs every time."""
    missing = sorted({pkg for cmd, pkg in commands.items() if _which(cmd) is None})
    if missing:
        if os.geteuid() != 0:
            raise BenchError(f"missing {', '.join(missing)}: as root, "
                             f"apt-get install -y {' '.join(missing)}")
        print(f"bench: installing {' '.join(missing)} (apt-get)", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            done = subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False)
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr.decode()[-2000:]}")
    paths: dict[str, str] = {}
    for cmd in commands:
        path = _which(cmd)
        if path is None:
            raise BenchError(f"{cmd} is still missing after installing {commands[cmd]}")
        paths[cmd] = path
    return paths


def venv_tool(name: str) -> Path:
    """A console script of the running interpreter's environment (mitmdump, py-spy)."""
    return Path(sys.executable).parent / name


# ---- processes --------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, however it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    """Every process a benchmark starts, stopped (SIGTERM, then SIGKILL) in reverse order on
    exit, whatever the exit: normal, an exception, Ctrl-C, SIGTERM or the run-time bound."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str | Path],
        *,
        log: Path | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`; its stdout and stderr go to `log` (or nowhere), or to pipes with
        `capture` (for short-lived tools whose output is read with communicate())."""
        out: int | None = subprocess.PIPE if capture else subprocess.DEVNULL
        with contextlib.ExitStack() as stack:
            if log is not None and not capture:
                out = stack.enter_context(log.open("ab")).fileno()
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only the main thread starts processes
            )
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM to its process group (nginx's workers too), SIGKILL if it lingers. A leader
        that has exited already is left alone: its id may belong to someone else by now."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def close(self) -> None:
        while self._procs:
            name, proc = self._procs[-1]
            try:
                self.stop(proc)
            except BaseException as e:  # keep going: the others must stop too
                print(f"bench: could not stop {name} ({proc.pid}): {e}", file=sys.stderr)
                self._procs.pop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RunTimeExceeded(BaseException):
    """The whole benchmark ran past its bound (BaseException: nothing may swallow it)."""


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise RunTimeExceeded("the benchmark ran past its time bound")


@contextlib.contextmanager
def bounded_run(seconds: int) -> Iterator[None]:
    """SIGTERM and SIGHUP exit through the cleanups (as Ctrl-C does); after `seconds` the run
    is cut with RunTimeExceeded."""
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous_alarm = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_listening(port: int, proc: subprocess.Popen[bytes], name: str,
                   log: Path | None = None, timeout: float = _START_TIMEOUT) -> None:
    """Until 127.0.0.1:`port` accepts; BenchError with the log's tail if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise BenchError(f"{name} exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


# ---- /proc ----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of `pid`, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid`, all its threads, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


# ---- the upstream and the proxies ----------------------------------------------------------------


def start_nginx(procs: Processes, workdir: Path, nginx: str = "nginx") -> int:
    """nginx returning CHAT_COMPLETION, one worker, its own prefix in `workdir`; the port."""
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = (BENCH_DIR / "nginx.conf").read_text()
    conf = conf.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
    conf = conf.replace("@BODY@", CHAT_COMPLETION)
    (prefix / "nginx.conf").write_text(conf)
    log = prefix / "stderr.log"
    argv: list[str | Path] = [nginx, "-p", prefix, "-c", prefix / "nginx.conf",
                              "-e", prefix / "error.log"]
    proc = procs.start("nginx", argv, log=log)
    wait_listening(port, proc, "nginx", log)
    return port


@dataclass(frozen=True)
class Tokens:
    """Approval tokens for distinct customers, and the JWKS that verifies them."""

    jwks: Path
    file: Path  # one token a line, for rotate_tokens.lua
    tokens: tuple[str, ...]

    @classmethod
    def issue(cls, workdir: Path, customers: int) -> Tokens:
        """One EdDSA approval for each of `customers` customers (cohort preview-1, the
        benchmark's model, a day long), issued once with cohortgate.keys."""
        pem, jwks = init_keys(workdir / "keys")
        tokens = tuple(
            issue_token(pem, issuer=ISSUER, audience=AUDIENCE, customer=f"bench-{i:06d}",
                        cohort=COHORT, ttl=86_400, models=[MODEL])
            for i in range(customers)
        )
        file = workdir / f"tokens-{customers}.txt"
        file.write_text("\n".join(tokens) + "\n")
        return cls(jwks, file, tokens)


def _revocations(path: Path) -> None:
    """A revocation list of realistic size that revokes none of the benchmark's customers."""
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc = {
        "jti": {f"{i:032x}": {"reason": "bench", "at": at} for i in range(200)},
        "customers": {f"revoked-{i}": {"reason": "bench", "at": at} for i in range(20)},
    }
    path.write_text(json.dumps(doc))


def gate_config(*, workdir: Path, port: int, upstream_port: int, jwks: Path,
                backend: str = "memory") -> str:
    """The full policy: phases and cohorts, models, revocations, the limiter, the log."""
    return f"""
upstream = "http://127.0.0.1:{upstream_port}"
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{free_port()}"

[authority]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks = "{jwks}"
algorithms = ["EdDSA"]
leeway = "30s"
max_lifetime = "30d"

[token]
header = "Authorization"
forward = false

[[phases]]
name = "preview"
until = "2099-01-01T00:00:00Z"
cohorts = ["{COHORT}"]
unapproved = "block"

[[phases]]
name = "general"
cohorts = ["*"]
unapproved = "block"

[limits]
default = {{ rpm = {_HIGH_RPM}, tpm = {_HIGH_TPM} }}
max = {{ rpm = {_HIGH_RPM}, tpm = {_HIGH_TPM} }}

[ratelimit]
backend = "{backend}"
on_error = "local"
timeout = "50ms"

[revocation]
file = "{workdir / "revocations.json"}"

[log]
decisions = "{workdir / "decisions.jsonl"}"
rotate_bytes = "1GB"
"""


@dataclass(frozen=True)
class Gate:
    """A running `cohortgate serve`."""

    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def decisions(self) -> Path:
        return self.workdir / "decisions.jsonl"

    @property
    def stderr(self) -> Path:
        return self.workdir / "gate.log"


def start_gate(procs: Processes, workdir: Path, *, upstream_port: int, jwks: Path,
               backend: str = "memory", name: str = "gate",
               python_args: Sequence[str] = ()) -> Gate:
    """`cohortgate serve` (the lean master) with the full policy in front of the upstream;
    `python_args` go to the interpreter before `-m cohortgate.cli` (e.g. -m cProfile -o F)."""
    gatedir = workdir / name
    gatedir.mkdir(parents=True)
    port = free_port()
    _revocations(gatedir / "revocations.json")
    config = gatedir / "cohortgate.toml"
    config.write_text(gate_config(workdir=gatedir, port=port, upstream_port=upstream_port,
                                  jwks=jwks, backend=backend))
    log = gatedir / "gate.log"
    argv: list[str | Path] = [sys.executable, *python_args, "-m", "cohortgate.cli", "serve",
                              "--config", config]
    proc = procs.start(name, argv, log=log, cwd=gatedir)
    wait_listening(port, proc, name, log)
    return Gate(port, proc, gatedir)


def start_bare_mitmdump(procs: Processes, workdir: Path, upstream_port: int,
                        *settings: str) -> tuple[int, subprocess.Popen[bytes]]:
    """Stock mitmdump in reverse mode with no addon of ours: `-q` (flow_detail 0, termlog
    errors only, the least work a stock mitmdump does per flow) and connection_strategy=lazy as
    the gate has it, plus `settings` ("name=value"); its CA goes into its own confdir, not
    ~/.mitmproxy."""
    port = free_port()
    confdir = workdir / f"mitmdump-{port}"
    confdir.mkdir(parents=True)
    log = confdir / "mitmdump.log"
    argv: list[str | Path] = [
        venv_tool("mitmdump"),
        "--mode", f"reverse:http://127.0.0.1:{upstream_port}@127.0.0.1:{port}",
        "-q",
        "--set", "connection_strategy=lazy",
        "--set", f"confdir={confdir}",
    ]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    proc = procs.start("mitmdump", argv, log=log)
    wait_listening(port, proc, "mitmdump", log)
    return port, proc


def probe(url: str, token: str, body: str = CHAT_REQUEST) -> tuple[int, str]:
    """One chat completion through `url`: (status, body), to fail early with the reason."""
    request = urllib.request.Request(  # noqa: S310 (an http:// URL of ours, on loopback)
        url + "/v1/chat/completions", data=body.encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def check_approved(url: str, token: str, label: str = "the gate") -> None:
    """Fail early, with the answer, when `url` does not serve an approved request."""
    status, body = probe(url, token)
    if status != 200:
        raise BenchError(f"{label} refused an approved request ({status}): {body[:500]}")


# ---- wrk --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, from rotate_tokens.lua's done() line."""

    requests: int
    seconds: float
    non2xx: int
    socket_errors: int  # connect, read, write and timeouts
    mean_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run_wrk(procs: Processes, url: str, tokens_file: Path, *, seconds: float,
            connections: int, threads: int = 1, stop_after: int = 0,
            body: str | None = None) -> WrkResult:
    """wrk against `url` (POST /v1/chat/completions) for `seconds`, or until each thread has
    `stop_after` responses; the run is bounded by `seconds` plus a margin either way."""
    duration = max(1, round(seconds))
    argv: list[str | Path] = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "--latency", "-s", BENCH_DIR / "rotate_tokens.lua",
        url + "/v1/chat/completions", "--", tokens_file, str(stop_after),
    ]  # fmt: skip
    if body is not None:
        argv.append(body)
    proc = procs.start("wrk", argv, capture=True)
    try:
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        procs.stop(proc)
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("BENCH-JSON "):
            data = json.loads(line.removeprefix("BENCH-JSON "))
            break
    else:
        raise BenchError(f"wrk printed no result (exit {proc.returncode}):\n{text}\n"
                         f"{err.decode(errors='replace')}")
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non2xx=data["status_errors"],
        socket_errors=sum(data[k] for k in ("connect_errors", "read_errors", "write_errors",
                                            "timeouts")),
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )


# ---- figures ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value != value else f"{value:,.{digits}f}"  # NaN prints as "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """Columns padded to their widest cell, aligned as `align` says per column ("l" or "r";
    by default the first left, the others right)."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def machine_summary() -> str:
    """The machine the figures come from, and how busy it was at the start."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        from importlib.metadata import version

        mitmproxy = version("mitmproxy")
    except Exception:
        mitmproxy = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} vCPU, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, mitmproxy {mitmproxy}; load average {load}")


@dataclass(frozen=True)
class Bench:
    """What a gate benchmark runs against: see `bench_setup`."""

    workdir: Path
    procs: Processes
    tokens: Tokens
    nginx_port: int
    limiter: str  # "memory", or the URL of the redis-server started for the run


@contextlib.contextmanager
def bench_setup(backend: str, customers: int) -> Iterator[Bench]:
    """Install nginx and wrk (and redis-server for backend "redis") where missing, then in a
    scratch folder: tokens for `customers`, nginx serving the fixed completion, and for
    "redis" a redis-server of the run's own. Everything started is stopped on exit."""
    ensure_debian_packages({"nginx": "nginx-light", "wrk": "wrk"})
    if backend == "redis":
        ensure_debian_packages({"redis-server": "redis-server"})
    with tempfile.TemporaryDirectory(prefix="cohortgate-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        procs = stack.enter_context(Processes())
        tokens = Tokens.issue(workdir, customers)
        nginx_port = start_nginx(procs, workdir)
        limiter = "memory"
        if backend == "redis":
            limiter = stack.enter_context(redis_server(workdir / "redis")).url
        yield Bench(workdir, procs, tokens, nginx_port, limiter)
