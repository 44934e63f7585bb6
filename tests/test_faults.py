"""Faults that take gateways down, injected into a running gate: the decision log unwritable,
an upstream that resets or pauses inside a stream, a client that leaves. For each: the
documented behaviour, and no lost decision line."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from cohortgate.audit import verify_chain
from tests.conftest import Gate
from tests.conftest import parse_response
from tests.conftest import raw_request

MESSAGES: Any = [{"role": "user", "content": "hi"}]


def post(gate: Gate, token: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES}).encode()
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
           f"Connection: close\r\n\r\n").encode() + body
    return parse_response(raw_request(gate.port, raw))


class TestDecisionLogUnwritable:
    """Policy: a decision that cannot be recorded is not made. While the log cannot be
    written, every request is refused with 503 `audit_unavailable`, /readyz fails, and the
    lines wait in memory in chain order; when the log works again they are written first."""

    LIMIT = 40_000  # bytes any file of the gate may grow to: the log reaches it after ~60 lines

    def test_log_full_then_back(self, gate_factory: Any) -> None:
        def limit_file_size() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.LIMIT, resource.RLIM_INFINITY))

        gate: Gate = gate_factory(preexec_fn=limit_file_size)
        token = gate.authority.issue(rpm=600)
        statuses = []
        for _ in range(200):
            status, _, body = post(gate, token)
            statuses.append(status)
            if status == 503:
                assert json.loads(body)["error"]["code"] == "audit_unavailable"
                break
        assert statuses[-1] == 503, "the log never filled up"
        served = statuses.count(200)
        assert post(gate, token)[0] == 503
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(gate.admin_url + "/readyz", timeout=5)  # noqa: S310
        assert e.value.code == 503

        # the disk has room again
        resource.prlimit(gate.proc.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # the soft limit
        deadline = time.monotonic() + 5
        while post(gate, token)[0] != 200:
            assert time.monotonic() < deadline, "the gate did not recover"
            time.sleep(0.2)
        requests_made = len(statuses) + 1 + 1
        # every request has its line, the waiting ones included (the last one is written by
        # the log's thread just after its response), and the chain is whole
        lines = gate.wait_log(requests_made)
        deadline = time.monotonic() + 5
        while sum(1 for ln in lines if ln["decision"] == "allow") < served + 1:
            assert time.monotonic() < deadline, "an allowed request has no line"
            time.sleep(0.05)
            lines = gate.log_lines()
        assert verify_chain([gate.log]).ok
        assert len(gate.upstream.requests) == served + 1  # nothing served unrecorded


class FaultyUpstream:
    """A raw upstream that streams two SSE events, then pauses or resets the connection."""

    def __init__(self, mode: str, pause: float = 0.0) -> None:
        self.mode = mode
        self.pause = pause
        self.closed_by_peer = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.Server | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                asyncio.start_server(self.handle, "127.0.0.1", 0))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")

        def event(text: str) -> bytes:
            chunk = {"choices": [{"index": 0, "delta": {"content": text}}]}
            data = f"data: {json.dumps(chunk)}\n\n".encode()
            return b"%x\r\n%s\r\n" % (len(data), data)

        writer.write(event("one "))
        await writer.drain()
        if self.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        if self.mode == "pause":
            await asyncio.sleep(self.pause)
            writer.write(event("two"))
            data = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))
            await writer.drain()
            writer.close()
            return
        # "hold": keep streaming slowly until the client side goes away
        try:
            for _ in range(100):
                await asyncio.sleep(0.1)
                writer.write(event("more "))
                await writer.drain()
        except (ConnectionError, OSError):
            self.closed_by_peer.set()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def faulty() -> Iterator[Any]:
    made: list[FaultyUpstream] = []

    def make(mode: str, pause: float = 0.0) -> FaultyUpstream:
        up = FaultyUpstream(mode, pause)
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


def stream_request(gate: Gate, token: str) -> list[str]:
    client = gate.client(token)
    pieces = []
    for chunk in client.chat.completions.create(model="gpt-5.6", messages=MESSAGES,
                                                stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces


def test_upstream_reset_mid_stream_is_logged_as_upstream_error(
        gate_factory: Any, faulty: Any) -> None:
    up = faulty("reset")
    gate: Gate = gate_factory(upstream_url=up.url)
    with pytest.raises(openai.APIConnectionError):  # the SDK sees the stream cut
        stream_request(gate, gate.authority.issue())
    line = gate.wait_log(1)[-1]
    assert line["decision"] == "allow"
    assert line["outcome"] == "upstream_error"
    assert line["upstream_status"] == 200


def test_a_pause_inside_a_stream_is_not_cut(gate_factory: Any, faulty: Any) -> None:
    up = faulty("pause", pause=3.0)
    gate: Gate = gate_factory(upstream_url=up.url)
    assert stream_request(gate, gate.authority.issue()) == ["one ", "two"]
    assert gate.wait_log(1)[-1]["outcome"] == "complete"


def test_serve_does_not_cut_long_silences() -> None:
    from cohortgate.server import IDLE_TIMEOUT
    # a reasoning model may think for minutes before its next byte; mitmproxy's default is
    # 600 s, which would cut such a stream
    assert IDLE_TIMEOUT >= 3600


def test_client_leaving_closes_the_upstream_and_is_logged(gate_factory: Any,
                                                          faulty: Any) -> None:
    up = faulty("hold")
    gate: Gate = gate_factory(upstream_url=up.url)
    token = gate.authority.issue()
    body = json.dumps({"model": "gpt-5.6", "messages": MESSAGES, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", gate.port), 5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nAuthorization: Bearer "
                  + token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"one" not in received:
            received += s.recv(65536)
    assert up.closed_by_peer.wait(5), "the upstream connection stayed open"
    line = gate.wait_log(1)[-1]
    assert (line["outcome"], line["decision"]) == ("aborted", "allow")
    # the reservation was charged (no usage came): the log still has its estimate
    assert line["completion_tokens"] is not None
