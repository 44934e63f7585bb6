"""Soak: a mixed load against `cohortgate serve` for a configurable time, reporting resident
memory over time, open file descriptors and event-loop lag.

    .venv/bin/python -m tests.bench.soak --minutes 10 [--concurrency 16] [--customers 200]

The load mixes JSON completions, streams, denials (bad and unapproved tokens) and clients that
abort mid-stream. The gate runs as a subprocess in front of the stand-in upstream (in this
process, on its own thread). Every 10 s it samples the gate's VmRSS (/proc/PID/status), its
open descriptors (/proc/PID/fd) and the time /healthz takes on the admin listener, which runs
on the gate's event loop (so it measures the loop's lag). At the end: the samples, RSS growth
over the second half, descriptors against the baseline, and the decision log (every rotated
file, its hash chain verified) against the requests sent: one line each. Traffic goes to
127.0.0.1 only; the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from cohortgate.audit import rotated_files
from cohortgate.audit import verify_chain
from cohortgate.keys import init_keys
from cohortgate.standin import StandinThread
from tests.conftest import Authority
from tests.conftest import start_gate

CHAT = {"model": "gpt-5.6", "messages": [{"role": "user", "content": "Say hello, briefly."}],
        "max_tokens": 16}


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def loop_lag_ms(admin_url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(admin_url + "/healthz", timeout=10) as resp:  # noqa: S310
        resp.read()
    return (time.perf_counter() - started) * 1000


async def one_request(port: int, token: str | None, *, stream: bool, abort: bool) -> str:
    body = json.dumps({**CHAT, "stream": stream}).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await reader.readline()
        status = status_line.split(b" ")[1].decode() if status_line else "none"
        if abort:
            await reader.read(200)
            return f"{status}-aborted"
        while await reader.read(65536):
            pass
        return status
    finally:
        writer.close()
        await writer.wait_closed()


async def load(port: int, tokens: list[str], bad: list[str], until: float,
               concurrency: int, counts: Counter[str]) -> None:
    rng = random.Random(7)

    async def worker() -> None:
        while time.monotonic() < until:
            kind = rng.random()
            try:
                if kind < 0.45:
                    result = await one_request(port, rng.choice(tokens), stream=False, abort=False)
                elif kind < 0.75:
                    result = await one_request(port, rng.choice(tokens), stream=True, abort=False)
                elif kind < 0.85:
                    result = await one_request(port, rng.choice(tokens), stream=True, abort=True)
                else:
                    result = await one_request(port, rng.choice(bad), stream=False, abort=False)
            except OSError as e:
                result = f"error-{type(e).__name__}"
            counts[result] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--sample-every", type=float, default=10.0)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="cohortgate-soak-"))
    pem, jwks = init_keys(tmp / "keys")
    authority = Authority(tmp / "keys", pem, jwks)
    tokens = [authority.issue(f"customer-{i}", rpm=100_000, tpm=100_000_000, ttl=86400)
              for i in range(args.customers)]
    bad = ["not.a.token", authority.issue("later", cohort="wave-9", ttl=86400),
           tokens[0][:-4] + "AAAA"]
    with StandinThread(interval=0.005) as upstream:
        gate = start_gate(tmp, upstream, authority,
                          sections="[limits]\nmax = { rpm = 100000, tpm = 100000000 }\n")
        pid = gate.proc.pid
        try:
            time.sleep(1.0)
            base_fds = open_fds(pid)
            samples: list[tuple[float, int, int, float]] = []
            counts: Counter[str] = Counter()
            started = time.monotonic()
            until = started + args.minutes * 60

            async def run() -> None:
                task = asyncio.create_task(
                    load(gate.port, tokens, bad, until, args.concurrency, counts))
                while not task.done():
                    await asyncio.sleep(min(args.sample_every, max(0.1, until - time.monotonic())))
                    lag = await asyncio.to_thread(loop_lag_ms, gate.admin_url)
                    sample = (time.monotonic() - started, vm_rss_kib(pid), open_fds(pid), lag)
                    samples.append(sample)
                    print(f"t={sample[0]:6.0f}s rss={sample[1] / 1024:7.1f} MiB "
                          f"fds={sample[2]:4d} loop_lag={sample[3]:6.1f} ms "
                          f"requests={sum(counts.values())}", flush=True)
                await task

            asyncio.run(run())
            time.sleep(2.0)  # let aborted streams finish on the gate's side
            end_fds = open_fds(pid)
        finally:
            gate.stop()

    half = [s for s in samples if s[0] >= samples[-1][0] / 2]
    rss = [s[1] for s in half]
    growth = (max(rss) - min(rss)) / min(rss) if rss else 0.0
    lags = sorted(s[3] for s in samples)
    print("\n== soak summary")
    print(f"duration {samples[-1][0]:.0f} s, {sum(counts.values())} requests, "
          f"{sum(counts.values()) / samples[-1][0]:.0f} req/s, concurrency {args.concurrency}")
    print("outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"rss: first {samples[0][1] / 1024:.1f} MiB, last {samples[-1][1] / 1024:.1f} MiB, "
          f"second-half spread {growth * 100:.1f}% (target <= 10%)")
    print(f"fds: baseline {base_fds}, end {end_fds} (target: back to baseline)")
    print(f"loop lag: median {statistics.median(lags):.1f} ms, max {lags[-1]:.1f} ms")
    files = rotated_files(gate.log)
    chain = verify_chain(files)
    requests = sum(counts.values())
    print(f"decision log: {chain.lines} lines in {len(files)} files (rotated at "
          f"rotate_bytes) for {requests} requests; chain "
          + ("verified" if chain.ok else f"BROKEN: {chain.breaks}"))
    ok = (growth <= 0.10 and end_fds <= base_fds + 2 and chain.ok
          and chain.lines == requests)
    print("RESULT: " + ("flat" if ok else "NOT flat"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
