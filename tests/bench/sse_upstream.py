"""A small OpenAI-style SSE upstream for the streaming benchmark, run as its own process:

    python -m tests.bench.sse_upstream --port P [--events 100] [--interval 0.02]

Every POST gets a chunked `text/event-stream` of `--events` chat.completion.chunk events,
`--interval` seconds apart on a fixed schedule, then a usage event when the request asked for
one (the gate asks for it) and `data: [DONE]`. Each event carries `"bench": {"i": n, "t": T}`,
T being time.monotonic() when it was written, so a client on the same host can tell how long
the event took to arrive. Listens on 127.0.0.1 only; keeps connections alive.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from typing import Final

_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
_HIGH_WATER: Final = 64 * 1024


def _chunk(data: str) -> bytes:
    raw = data.encode()
    return b"%x\r\n%s\r\n" % (len(raw), raw)


_EVENT_START: Final = (
    'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1767225600,'
    '"model":"gpt-5.6","choices":[{"index":0,"delta":{"content":"tok'
)
_EVENT_MIDDLE: Final = ' "},"finish_reason":null}],"bench":{"i":'


def _event(i: int) -> bytes:
    stamp = f"{time.monotonic():.6f}"
    return _chunk(f'{_EVENT_START}{i}{_EVENT_MIDDLE}{i},"t":{stamp}}}}}\n\n')


def _wants_usage(body: bytes) -> bool:
    try:
        request = json.loads(body or b"{}")
    except ValueError:
        return False
    options = request.get("stream_options") if isinstance(request, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The body of the next request on the connection; None when the client is gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    try:
        return await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


async def _stream(writer: asyncio.StreamWriter, events: int, interval: float,
                  usage: bool) -> None:
    writer.write(_HEAD)
    start = time.monotonic()
    for i in range(events):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(_event(i))
        if writer.transport.get_write_buffer_size() > _HIGH_WATER:
            await writer.drain()
    if usage:
        writer.write(_chunk(
            'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1767225600,'
            '"model":"gpt-5.6","choices":[],"usage":{"prompt_tokens":11,'
            f'"completion_tokens":{events},"total_tokens":{events + 11}}}}}\n\n'))
    writer.write(_chunk("data: [DONE]\n\n"))
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def serve(port: int, events: int, interval: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (body := await _read_request(reader)) is not None:
                await _stream(writer, events, interval, _wants_usage(body))
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.02)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.events, args.interval))


if __name__ == "__main__":
    main()
