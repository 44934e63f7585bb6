"""The stand-in upstream, through the official openai SDK and through raw sockets."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from cohortgate.standin import DEFAULT_REPLY
from cohortgate.standin import RecordedRequest
from cohortgate.standin import StandinThread
from cohortgate.standin import StandinUpstream

PIECES = ["Hello", " from", " the", " stand-in", " model:"]  # the first five of DEFAULT_REPLY
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},  # 9 characters
    {"role": "user", "content": "Say hello to the gate."},  # 22 characters
]


@pytest.fixture
def upstream() -> Iterator[StandinUpstream]:
    with StandinThread() as up:
        yield up


@pytest.fixture
def client(upstream: StandinUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def exchange(up: StandinUpstream, *requests: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw requests on one connection; read one response for each."""
    with socket.create_connection(("127.0.0.1", up.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        responses = []
        for raw in requests:
            sock.sendall(raw)
            responses.append(read_response(stream))
        return responses


def read_response(stream: io.BufferedReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) from a socket file."""
    status = int(stream.readline().split()[1])
    headers: dict[str, str] = {}
    while line := stream.readline().strip():
        name, _, value = line.decode().partition(":")
        headers[name.lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(stream.readline().strip(), 16):
            body += stream.read(size)
            stream.readline()
        stream.readline()
    else:
        body = stream.read(int(headers["content-length"]))
    return status, headers, body


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


CHAT = json.dumps({"model": "gpt-5.6", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["gpt-5.6", "gpt-5.6-mini"]
    model = client.models.retrieve("gpt-5.6-mini")
    assert model.owned_by == "standin"


def test_chat_completion(upstream: StandinUpstream, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-5.6-mini", messages=MESSAGES)
    assert raw.headers["x-standin"] == "1"
    assert raw.headers["x-ratelimit-limit-requests"] == "999999"
    assert raw.headers["x-ratelimit-remaining-requests"] == "999998"
    assert raw.headers["content-type"] == "application/json"
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-5.6-mini"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == DEFAULT_REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == (9 + 22) // 4
    assert completion.usage.completion_tokens == len(DEFAULT_REPLY.split())
    assert completion.usage.total_tokens == 7 + len(DEFAULT_REPLY.split())

    [request] = upstream.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.header("AUTHORIZATION") == "Bearer x"
    assert request.json()["messages"] == MESSAGES


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_caps_the_pieces(client: openai.OpenAI, cap: str) -> None:
    args = {cap: 5}
    completion = client.chat.completions.create(model="gpt-5.6", messages=MESSAGES, **args)  # type: ignore[call-overload]
    assert completion.choices[0].message.content == "".join(PIECES)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5


def test_stream_with_usage(upstream: StandinUpstream, client: openai.OpenAI) -> None:
    upstream.reply = "one two three"
    stream = client.chat.completions.create(
        model="gpt-5.6", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[:3]] == ["one", " two", " three"]
    assert chunks[3].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-5.6" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    [last] = chunks[4:]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (7, 3)
    assert last.usage.total_tokens == 10


def test_stream_usage_only_when_asked_and_honoured(
    upstream: StandinUpstream, client: openai.OpenAI
) -> None:
    chunks = list(client.chat.completions.create(model="gpt-5.6", messages=MESSAGES, stream=True))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)

    upstream.honour_include_usage = False
    stream = client.chat.completions.create(
        model="gpt-5.6", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_stream_wire_format(upstream: StandinUpstream) -> None:
    upstream.reply = "a b"
    body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
    [(status, headers, raw)] = exchange(upstream, post("/v1/chat/completions", body))
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["x-standin"] == "1"
    events = raw.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert len(events) == 2 + 1 + 1 + 1  # pieces, the finish chunk, [DONE], the tail
    assert len(upstream.event_sent_at) == 4


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-5.6", prompt="12345678", max_tokens=2)
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.choices[0].text == "Hello from"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 2)

    stream = client.completions.create(
        model="gpt-5.6", prompt="x", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_REPLY
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 1


def test_interval_spaces_the_events(upstream: StandinUpstream, client: openai.OpenAI) -> None:
    upstream.reply = "one two three"
    upstream.interval = 0.1
    list(client.chat.completions.create(model="gpt-5.6", messages=MESSAGES, stream=True))
    sent = upstream.event_sent_at
    assert len(sent) == 5  # three pieces, the finish chunk, [DONE]
    assert all(b - a >= 0.09 for a, b in itertools.pairwise(sent))


def test_not_found_shape(upstream: StandinUpstream, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="gpt-5.6", input="x")
    assert info.value.body == {
        "message": "Unknown request URL: POST /v1/embeddings.",
        "type": "invalid_request_error",
        "code": "not_found",
        "param": None,
    }
    [(status, headers, body)] = exchange(upstream, b"GET /nowhere?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
    assert headers["x-standin"] == "1"
    assert headers["x-ratelimit-limit-requests"] == "999999"
    assert json.loads(body)["error"]["code"] == "not_found"
    assert upstream.requests[-1].path == "/nowhere?q=1"


@pytest.mark.parametrize(
    "body", [b"{not json", b"[1, 2]", b"\xff\xfe", json.dumps({"messages": []}).encode()]
)
def test_bad_body_is_400(upstream: StandinUpstream, body: bytes) -> None:
    [(status, _, raw)] = exchange(upstream, post("/v1/chat/completions", body))
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "code", "param"}


def test_keep_alive_and_connection_close(upstream: StandinUpstream) -> None:
    responses = exchange(
        upstream,
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
        post("/v1/chat/completions", CHAT),
        post("/v1/chat/completions", CHAT, "Connection: close\r\n"),
    )
    assert [status for status, _, _ in responses] == [200, 200, 200]
    assert responses[2][1]["connection"] == "close"
    assert upstream.connections == 1
    assert len(upstream.requests) == 3

    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
        stream = sock.makefile("rb")
        assert read_response(stream)[0] == 200
        assert stream.read() == b""  # the server closed the connection
    assert upstream.connections == 2


def test_chunked_request_body(upstream: StandinUpstream) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\nX-Twice: 1\r\nx-twice: 2\r\n\r\n"
    )
    body = head + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (CHAT[:10], CHAT[10:]))
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(body + b"0\r\nTrailer: t\r\n\r\n")
        stream = sock.makefile("rb")
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        status, _, raw = read_response(stream)
    assert status == 200
    assert json.loads(raw)["choices"][0]["message"]["content"] == DEFAULT_REPLY
    [request] = upstream.requests
    assert request.body == CHAT
    assert request.header_values("X-TWICE") == ["1", "2"]
    assert request.header("x-twice") == "1"
    assert request.header("absent") is None


def test_recorded_request_helpers() -> None:
    request = RecordedRequest("GET", "/", [("A", "1"), ("b", "2"), ("a", "3")], b"{}")
    assert request.header("a") == "1"
    assert request.header_values("A") == ["1", "3"]
    assert request.json() == {}


async def test_stop_closes_open_connections() -> None:
    upstream = StandinUpstream(interval=10)
    port = await upstream.start()
    assert upstream.url == f"http://127.0.0.1:{port}"
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
    busy_writer.write(post("/v1/chat/completions", b'{"model": "m", "stream": true}'))
    await busy_reader.readuntil(b"data: ")  # the first event; the next is 10 s away
    await asyncio.wait_for(upstream.stop(), 2)
    assert await idle_reader.read() == b""
    assert (await busy_reader.read()).endswith(b"\r\n")
    for writer in (idle_writer, busy_writer):
        writer.close()
    assert upstream.connections == 2


def test_main_serves_until_interrupted() -> None:
    addons = str(Path(__file__).resolve().parents[1] / "addons")
    env = {**os.environ, "PYTHONPATH": addons + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cohortgate.standin", "--port", "0", "--model", "only"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[4]
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["only"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
