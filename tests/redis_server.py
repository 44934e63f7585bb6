"""Throwaway redis-server processes for tests: one server, or a three-node Redis Cluster.

Each server listens on 127.0.0.1 on a free port (never the shared 6379), persists nothing
(`--save "" --appendonly no`), allows `DEBUG SLEEP` (to stall it on purpose), and can be stopped,
killed (SIGKILL) and started again on the same port.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from cohortgate import demo

__all__ = ["RedisCluster", "RedisServer", "free_port", "redis_cluster", "redis_server"]

_RESERVED: Final = frozenset({6379, 16379})  # the shared Redis and its cluster bus
_START_TIMEOUT: Final = 10.0


def free_port(*, cluster_bus: bool = False) -> int:
    """A port free on 127.0.0.1 now; with `cluster_bus`, port + 10000 is free too.

    Never a port this process was given before (cohortgate.demo.free_port keeps the record).
    """
    if not cluster_bus:
        return demo.free_port()
    for _ in range(1000):
        port = random.randint(20000, 55000)
        if {port, port + 10000} & _RESERVED:
            continue
        if (demo.port_is_free(port) and demo.port_is_free(port + 10000)
                and demo.claim_port(port) and demo.claim_port(port + 10000)):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) found")


def _ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis on `port` answers PING within `timeout` (a stalled one does not)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process on a fixed port, in its own directory."""

    def __init__(self, directory: Path, *, port: int | None = None, cluster: bool = False) -> None:
        self.dir = directory
        self.cluster = cluster
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _command(self) -> list[str]:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--enable-debug-command", "yes",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            command += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return command

    def start(self) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on {self.port} exited:\n{log}")
            if _ping(self.port):
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL: the server vanishes with its connections, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cli(self, *args: str) -> str:
        """Run `redis-cli -p PORT ARGS...` and return its output."""
        done = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True,
            check=True,
            timeout=30,
        )
        return done.stdout.decode()

    def stall(self, seconds: float) -> subprocess.Popen[bytes]:
        """`DEBUG SLEEP seconds` from a separate connection, in the background: the server
        accepts connections but answers nothing until it wakes."""
        proc = subprocess.Popen(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "DEBUG", "SLEEP", str(seconds)],
            stdout=subprocess.DEVNULL,
        )
        # wait until the sleep has begun: PING stops answering
        deadline = time.monotonic() + 5
        while _ping(self.port, timeout=0.05) and time.monotonic() < deadline:
            time.sleep(0.005)
        return proc


class RedisCluster:
    """Three (or more) cluster-enabled servers joined with `redis-cli --cluster create`."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(nodes)]

    @property
    def url(self) -> str:
        """A redis+cluster:// URL naming one node; the client discovers the others."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = ["redis-cli", "--cluster", "create", *addresses]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in node.cli("CLUSTER", "INFO") for node in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A started server, killed on exit."""
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def redis_cluster(directory: Path, nodes: int = 3) -> Iterator[RedisCluster]:
    """A started cluster whose state is ok, killed on exit."""
    cluster = RedisCluster(directory, nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
