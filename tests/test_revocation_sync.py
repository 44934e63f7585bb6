"""Revocations shared through Redis: publish, pub/sub resync, periodic sync, outages, cluster.

Every test runs against real redis-server processes started here on free ports (never the
shared Redis on 6379), with persistence off so a restarted server comes back empty.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from cohortgate.demo import free_port
from cohortgate.policy import Revocations
from cohortgate.revocation_sync import CHANNEL
from cohortgate.revocation_sync import CUSTOMERS_KEY
from cohortgate.revocation_sync import JTI_KEY
from cohortgate.revocation_sync import SharedRevocations
from cohortgate.revocation_sync import _safe_url
from cohortgate.revocation_sync import publish_revocation
from cohortgate.revocation_sync import redis_client

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed")

AT = "2026-05-01T12:00:00Z"
LOGGER = "cohortgate.revocations"


# ---- throwaway redis-servers ----------------------------------------------------------------

def redis_cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, text=True, timeout=10, check=False)
    return out.stdout


class RedisServer:
    """One redis-server on a fixed port that a test may kill and start again."""

    def __init__(self, workdir: Path, port: int | None = None, *extra: str) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on {self.port} exited with {self.proc.returncode}")
            if redis_cli(self.port, "PING").strip() == "PONG":
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on {self.port} did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = []
    try:
        for i in range(3):
            workdir = tmp_path / f"node{i}"
            nodes.append(RedisServer(
                workdir, None, "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-port", str(free_port()), "--cluster-node-timeout", "2000"))
            nodes[-1].start()
        create = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in nodes), "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=30, check=False)
        assert create.returncode == 0, create.stdout + create.stderr
        deadline = time.monotonic() + 15
        while not all("cluster_state:ok" in redis_cli(n.port, "CLUSTER", "INFO") for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
async def replicas() -> AsyncIterator[list[SharedRevocations]]:
    """Collects the SharedRevocations a test makes, and closes them even when it fails."""
    made: list[SharedRevocations] = []
    yield made
    for shared in made:
        await shared.close()


async def wait_for(condition: Callable[[], bool], within: float,
                   since: float | None = None) -> float:
    """Seconds until `condition` held (from `since`, or now); fails the test after `within`."""
    start = time.monotonic() if since is None else since
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < within, f"condition not met within {within} s"
        await asyncio.sleep(0.002)
    return time.monotonic() - start


async def revoke(url: str, *, jti: str | None = None, customer: str | None = None) -> bool:
    return await publish_revocation(url, jti=jti, customer=customer, reason="test", at=AT)


# ---- helpers -------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "cluster"), [
    ("redis://127.0.0.1:6390/0", False),
    ("rediss://127.0.0.1:6390/0", False),
    ("unix:///run/redis.sock", False),
    ("redis+cluster://127.0.0.1:7000", True),
    ("rediss+cluster://127.0.0.1:7000", True),
    ("REDIS+CLUSTER://127.0.0.1:7000", True),
])
async def test_redis_client_picks_plain_or_cluster(url: str, cluster: bool) -> None:
    client = redis_client(url, timeout=0.3)
    try:
        assert isinstance(client, RedisCluster) is cluster
        if isinstance(client, redis.Redis):
            kwargs = client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == 0.3
            assert kwargs["socket_connect_timeout"] == 0.3
            assert kwargs["retry"].get_retries() == 0
            connection_class = client.connection_pool.connection_class
        else:
            assert client.retry.get_retries() == 0
            assert client.connection_kwargs["socket_timeout"] == 0.3
            assert client.connection_kwargs["socket_connect_timeout"] == 0.3
            connection_class = client.connection_kwargs["connection_class"]
        assert (connection_class is SSLConnection) is url.lower().startswith("rediss")
    finally:
        await client.aclose()


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:hunter2@db:6379/0", "redis://***@db:6379/0"),
    ("rediss://app:hunter2@db:6379/0", "rediss://app:***@db:6379/0"),
])
def test_safe_url_hides_the_password(url: str, shown: str) -> None:
    assert _safe_url(url) == shown


async def test_publish_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        await publish_revocation("redis://127.0.0.1:1/0", jti="a", customer="b",
                                 reason="x", at=AT)
    with pytest.raises(ValueError, match="exactly one"):
        await publish_revocation("redis://127.0.0.1:1/0", jti=None, customer=None,
                                 reason="x", at=AT)


async def test_publish_reports_redis_errors() -> None:
    with pytest.raises(redis.ConnectionError):
        await publish_revocation(f"redis://127.0.0.1:{free_port()}/0", jti="a", customer=None,
                                 reason="x", at=AT, timeout=0.5)


# ---- against one redis-server ----------------------------------------------------------------

async def test_publish_reaches_a_running_replica_within_a_second(
        redis_server: RedisServer, replicas: list[SharedRevocations]) -> None:
    changes: list[Revocations] = []
    # a periodic sync far away: only the pub/sub message can make it in time
    shared = SharedRevocations(redis_server.url, sync_interval=60, on_change=changes.append)
    replicas.append(shared)
    await shared.start()
    assert shared.synced
    assert len(shared.current) == 0

    # measured from the call: it includes the publisher's connect, HSETNX and PUBLISH
    started = time.monotonic()
    assert await revoke(redis_server.url, jti="tok-1")
    latency_jti = await wait_for(lambda: "tok-1" in shared.current.jti, 1.0, since=started)
    started = time.monotonic()
    assert await revoke(redis_server.url, customer="acme")
    latency_customer = await wait_for(lambda: "acme" in shared.current.customers, 1.0,
                                      since=started)
    print(f"publish-to-seen: jti {latency_jti * 1000:.1f} ms, "
          f"customer {latency_customer * 1000:.1f} ms")
    assert latency_jti < 1.0
    assert latency_customer < 1.0
    assert shared.current == Revocations(jti=frozenset({"tok-1"}),
                                         customers=frozenset({"acme"}))
    assert changes == [Revocations(jti=frozenset({"tok-1"})), shared.current]

    # already there: False, and nothing changes
    assert not await revoke(redis_server.url, jti="tok-1")
    assert not await revoke(redis_server.url, customer="acme")
    await asyncio.sleep(0.2)
    assert len(changes) == 2

    client = redis_client(redis_server.url, timeout=1.0)
    try:
        stored = await client.hget(JTI_KEY, "tok-1")
        assert stored == b'{"at": "2026-05-01T12:00:00Z", "reason": "test"}'
        assert await client.hkeys(CUSTOMERS_KEY) == [b"acme"]
    finally:
        await client.aclose()


async def test_a_replica_started_after_the_publish_sees_it_at_its_first_sync(
        redis_server: RedisServer, replicas: list[SharedRevocations]) -> None:
    assert await revoke(redis_server.url, jti="tok-early")
    assert await revoke(redis_server.url, customer="early-corp")
    changes: list[Revocations] = []
    shared = SharedRevocations(redis_server.url, sync_interval=60, on_change=changes.append)
    replicas.append(shared)
    await shared.start()  # returns once the first sync is done
    assert shared.synced
    assert shared.current == Revocations(jti=frozenset({"tok-early"}),
                                         customers=frozenset({"early-corp"}))
    assert changes == [shared.current]


async def test_a_burst_of_messages_costs_few_syncs(
        redis_server: RedisServer, replicas: list[SharedRevocations]) -> None:
    shared = SharedRevocations(redis_server.url, sync_interval=60)
    replicas.append(shared)
    await shared.start()
    syncs = 0
    real_sync = shared._sync

    async def counting_sync() -> None:
        nonlocal syncs
        syncs += 1
        await real_sync()

    shared._sync = counting_sync  # type: ignore[method-assign]
    client = redis_client(redis_server.url, timeout=1.0)
    try:
        await client.hset(JTI_KEY, mapping={f"t{i}": "{}" for i in range(50)})
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(50):
                pipe.publish(CHANNEL, JTI_KEY)
            await pipe.execute()
    finally:
        await client.aclose()
    await wait_for(lambda: len(shared.current.jti) == 50, 1.0)
    await asyncio.sleep(0.1)
    assert 1 <= syncs < 10


async def test_redis_outage_keeps_the_last_copy_and_recovers_by_itself(
        redis_server: RedisServer, replicas: list[SharedRevocations],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    shared = SharedRevocations(redis_server.url, timeout=0.5, sync_interval=0.3)
    replicas.append(shared)
    await shared.start()
    assert await revoke(redis_server.url, jti="tok-1")
    await wait_for(lambda: "tok-1" in shared.current.jti, 1.0)
    before = shared.current

    redis_server.kill()
    # long enough for several failed reconnects (backoff 50 ms doubling, capped at 1 s)
    await asyncio.sleep(1.6)
    assert shared.current == before
    assert shared.running
    lost = [r for r in caplog.records if "cannot sync" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]
    assert lost[0].levelno == logging.WARNING
    assert "keeping the last copy (1 entries)" in lost[0].getMessage()

    redis_server.start()  # same port, empty: persistence is off
    # the empty server is the truth now: the resync drops tok-1
    await wait_for(lambda: len(shared.current) == 0, 3.0)
    assert any("is back; resynced" in r.getMessage() for r in caplog.records)
    assert await revoke(redis_server.url, customer="acme")
    latency = await wait_for(lambda: "acme" in shared.current.customers, 1.0)
    assert latency < 1.0
    assert shared.running
    assert len([r for r in caplog.records if "cannot sync" in r.getMessage()]) == 1


async def test_a_stalled_redis_costs_the_task_a_timeout_not_a_hang(
        redis_server: RedisServer, replicas: list[SharedRevocations],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    shared = SharedRevocations(redis_server.url, timeout=0.3, sync_interval=0.2)
    replicas.append(shared)
    await shared.start()
    assert await revoke(redis_server.url, jti="tok-1")
    await wait_for(lambda: "tok-1" in shared.current.jti, 1.0)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        # the periodic sync times out and the task starts reconnecting
        await wait_for(lambda: "cannot sync" in caplog.text, 1.5)
        await asyncio.sleep(0.8)
        assert shared.current.jti == {"tok-1"}
        assert shared.running
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await revoke(redis_server.url, jti="tok-2")
    await wait_for(lambda: "tok-2" in shared.current.jti, 2.0)
    assert len([r for r in caplog.records if "cannot sync" in r.getMessage()]) == 1


async def test_start_never_raises_when_redis_is_down(
        tmp_path: Path, replicas: list[SharedRevocations],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = RedisServer(tmp_path / "late")  # not started yet
    shared = SharedRevocations(server.url, timeout=0.5, sync_interval=60)
    replicas.append(shared)
    started = time.monotonic()
    await shared.start()
    assert time.monotonic() - started < 0.6
    assert not shared.synced
    assert shared.running
    try:
        server.start()
        await wait_for(lambda: shared.synced, 3.0)
        assert await revoke(server.url, jti="tok-late")
        await wait_for(lambda: "tok-late" in shared.current.jti, 1.0)
    finally:
        server.kill()
    assert len([r for r in caplog.records if "cannot sync" in r.getMessage()]) == 1


async def test_an_entry_deleted_in_redis_disappears_at_the_next_periodic_sync(
        redis_server: RedisServer, replicas: list[SharedRevocations]) -> None:
    changes: list[Revocations] = []
    shared = SharedRevocations(redis_server.url, sync_interval=0.2, on_change=changes.append)
    replicas.append(shared)
    await shared.start()
    assert await revoke(redis_server.url, jti="tok-1")
    assert await revoke(redis_server.url, jti="tok-2")
    await wait_for(lambda: shared.current.jti == {"tok-1", "tok-2"}, 1.0)

    client = redis_client(redis_server.url, timeout=1.0)
    try:
        assert await client.hdel(JTI_KEY, "tok-1") == 1  # no PUBLISH: only the periodic sync
    finally:
        await client.aclose()
    await wait_for(lambda: shared.current.jti == {"tok-2"}, 1.0)
    assert changes[-1] == Revocations(jti=frozenset({"tok-2"}))
    count = len(changes)
    await asyncio.sleep(0.5)  # two more periodic syncs, nothing changed: no callback
    assert len(changes) == count


async def test_garbage_in_the_hash_still_revokes_and_is_logged(
        redis_server: RedisServer, replicas: list[SharedRevocations],
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    client = redis_client(redis_server.url, timeout=1.0)
    try:
        await client.hset(JTI_KEY, "tok-garbage", "not json {")
        await client.hset(JTI_KEY, "tok-binary", b"\xff\xfe")
        await client.hset(CUSTOMERS_KEY, "list-corp", "[1, 2]")
        await client.hset(CUSTOMERS_KEY, b"bad-\xff-id", '{"reason": "r", "at": "t"}')
    finally:
        await client.aclose()
    shared = SharedRevocations(redis_server.url, sync_interval=0.1)
    replicas.append(shared)
    await shared.start()
    assert shared.synced
    assert shared.current.jti == {"tok-garbage", "tok-binary"}
    assert "list-corp" in shared.current.customers
    assert len(shared.current.customers) == 2
    assert await revoke(redis_server.url, jti="tok-good")
    await wait_for(lambda: "tok-good" in shared.current.jti, 1.0)
    await asyncio.sleep(0.3)  # more periodic syncs: the garbage is logged once, not per sync

    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("'tok-garbage': the value is not JSON" in m for m in messages) == 1
    assert sum("'tok-binary': the value is not JSON" in m for m in messages) == 1
    assert sum("'list-corp': the value is not a JSON object" in m for m in messages) == 1
    assert not any("tok-good" in m for m in messages)


async def test_a_failing_on_change_callback_does_not_stop_the_sync(
        redis_server: RedisServer, replicas: list[SharedRevocations],
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(_: Revocations) -> None:
        raise RuntimeError("boom")

    shared = SharedRevocations(redis_server.url, sync_interval=60, on_change=broken)
    replicas.append(shared)
    await shared.start()
    assert await revoke(redis_server.url, jti="tok-1")
    await wait_for(lambda: "tok-1" in shared.current.jti, 1.0)
    assert await revoke(redis_server.url, jti="tok-2")
    await wait_for(lambda: "tok-2" in shared.current.jti, 1.0)
    assert shared.running
    assert "on_change callback failed" in caplog.text


async def test_close_is_idempotent_and_stops_the_task(redis_server: RedisServer) -> None:
    shared = SharedRevocations(redis_server.url)
    await shared.close()  # never started
    await shared.start()
    await shared.start()  # a second start starts nothing more
    assert shared.running
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "cohortgate-revocation-sync"]
    assert len(tasks) == 1
    await shared.close()
    await shared.close()
    assert not shared.running
    assert tasks[0].done()

    def connected_clients() -> int:  # counts the redis-cli asking, too
        return int(redis_cli(redis_server.port, "INFO", "clients")
                   .split("connected_clients:")[1].split()[0])

    await wait_for(lambda: connected_clients() == 1, 2.0)


# ---- against a three-node Redis Cluster -----------------------------------------------------

async def test_cluster_publish_and_sync(
        redis_cluster: list[RedisServer], replicas: list[SharedRevocations]) -> None:
    urls = [f"redis+cluster://127.0.0.1:{n.port}" for n in redis_cluster]
    early = SharedRevocations(urls[0], sync_interval=60)
    replicas.append(early)
    await early.start()
    assert early.synced

    started = time.monotonic()
    assert await revoke(urls[1], jti="tok-c")
    latency_jti = await wait_for(lambda: "tok-c" in early.current.jti, 1.0, since=started)
    started = time.monotonic()
    assert await revoke(urls[2], customer="cluster-corp")
    latency_customer = await wait_for(lambda: "cluster-corp" in early.current.customers, 1.0,
                                      since=started)
    print(f"cluster publish-to-seen: jti {latency_jti * 1000:.1f} ms, "
          f"customer {latency_customer * 1000:.1f} ms")
    assert not await revoke(urls[0], jti="tok-c")

    late = SharedRevocations(urls[2], sync_interval=60)
    replicas.append(late)
    await late.start()
    assert late.current == early.current == Revocations(
        jti=frozenset({"tok-c"}), customers=frozenset({"cluster-corp"}))

    # classic pub/sub is broadcast to every node: a PUBLISH sent straight to any node, not
    # only the subscriber's, triggers the resync (the periodic sync is a minute away)
    writer = redis_client(urls[0], timeout=1.0)
    try:
        for node in redis_cluster:
            await writer.hset(JTI_KEY, f"via-{node.port}", "{}")  # no PUBLISH
            async with redis.Redis(host="127.0.0.1", port=node.port) as direct:
                assert await direct.publish(CHANNEL, "x") >= 0
            entry = f"via-{node.port}"
            await wait_for(lambda: entry in early.current.jti, 1.0)  # noqa: B023
    finally:
        await writer.aclose()
