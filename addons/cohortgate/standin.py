"""A stand-in OpenAI-compatible upstream, for the demo and the tests.

A small HTTP/1.1 server on `asyncio.start_server`, stdlib only (it ships in the runtime
package, so it adds no dependency). It speaks just enough of the OpenAI API for the official
`openai` SDK and curl to work against it:

- `GET /v1/models`, `GET /v1/models/{id}`
- `POST /v1/chat/completions` and `POST /v1/completions`, plain or streamed (server-sent
  events, chunked), with `usage`; `stream_options.include_usage` adds a usage chunk unless
  `honour_include_usage` is off (to imitate upstreams that ignore it)
- anything else: 404; a body that is not a JSON object: 400; both in OpenAI's error shape.

The reply is always `reply`, cut into word pieces (one piece is one "completion token");
`max_tokens` / `max_completion_tokens` cap the number of pieces. Keep-alive is the HTTP/1.1
default and `Connection: close` is honoured; request bodies come by Content-Length or chunked.

Every request is appended to `requests` once its body has been read. The server runs on one
event loop; with `StandinThread` that loop is in another thread, and the test thread may read
`requests`, `connections` and `event_sent_at` (take a copy, e.g. `list(upstream.requests)`)
and set the plain settings (`reply`, `models`, `interval`, `honour_include_usage`) while it
runs: single list appends and attribute stores are atomic in CPython.

    python -m cohortgate.standin --port 8000 [--interval 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any

DEFAULT_REPLY = "Hello from the stand-in model: your request reached the upstream."
_MAX_HEADERS = 100


@dataclass
class RecordedRequest:
    """One request as the stand-in received it (`path` is the request target, query included)."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        """Every value of header `name` (any case), in the order received."""
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


class _BadRequest(Exception):
    """Unparseable HTTP: answered with a 400, then the connection is closed."""


def _error(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "code": code,
            "param": param,
        }
    }


def _text_chars(content: Any) -> int:
    """Characters of a message content: a string, or a list of parts with `text`."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(_text_chars(p.get("text") if isinstance(p, dict) else p) for p in content)
    return 0


def _frame(data: bytes) -> bytes:
    """One chunk of a chunked response body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class StandinUpstream:
    """The stand-in server. Settings are plain attributes, read afresh for every request."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        reply: str = DEFAULT_REPLY,
        models: Sequence[str] = ("gpt-5.6", "gpt-5.6-mini"),
        interval: float = 0.0,
        honour_include_usage: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.reply = reply
        self.models = models
        self.interval = interval
        self.honour_include_usage = honour_include_usage
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self.event_sent_at: list[float] = []
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> int:
        """Bind and listen; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every open client connection."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        tasks = list(self._clients)
        for task, writer in self._clients.items():
            writer.close()
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # -- HTTP/1.1 ---------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._clients[task] = writer
        try:
            while await self._serve_one(reader, writer):
                pass
        except _BadRequest as exc:
            with contextlib.suppress(ConnectionError):
                await self._send_json(writer, 400, _error(str(exc), "bad_request"), close=True)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            del self._clients[task]
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; returns whether the connection stays open."""
        line = await self._readline(reader)
        if not line:
            return False
        if not line.strip():
            return True  # a stray CRLF between requests
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest("malformed request line")
        method, target, version = parts
        headers: list[tuple[str, str]] = []
        while (hline := await self._readline(reader)).strip():
            name, sep, value = hline.decode("latin-1").partition(":")
            if not sep or not name.strip() or len(headers) >= _MAX_HEADERS:
                raise _BadRequest("malformed header")
            headers.append((name.strip(), value.strip()))
        if not hline:
            raise asyncio.IncompleteReadError(b"", None)
        request = RecordedRequest(method, target, headers, b"")
        tokens = {
            t.strip().lower() for t in ",".join(request.header_values("connection")).split(",")
        }
        keep_alive = "close" not in tokens and (version != "HTTP/1.0" or "keep-alive" in tokens)
        if (request.header("expect") or "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.body = await self._read_body(reader, request)
        self.requests.append(request)
        await self._route(request, writer, keep_alive)
        return keep_alive

    @staticmethod
    async def _readline(reader: asyncio.StreamReader) -> bytes:
        try:
            return await reader.readline()
        except ValueError as exc:  # longer than the stream limit
            raise _BadRequest("line too long") from exc

    async def _read_body(self, reader: asyncio.StreamReader, request: RecordedRequest) -> bytes:
        if "chunked" in (request.header("transfer-encoding") or "").lower():
            body = bytearray()
            while True:
                size_line = await self._readline(reader)
                try:
                    size = int(size_line.split(b";")[0].strip(), 16)
                except ValueError as exc:
                    raise _BadRequest("malformed chunk size") from exc
                if size == 0:
                    break
                body += await reader.readexactly(size)
                if (await self._readline(reader)).strip():
                    raise _BadRequest("malformed chunk")
            while (await self._readline(reader)).strip():  # trailers, ignored
                pass
            return bytes(body)
        length = request.header("content-length")
        if length is None:
            return b""
        if not length.isdigit():
            raise _BadRequest("malformed Content-Length")
        return await reader.readexactly(int(length))

    @staticmethod
    def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
        headers = [
            *headers,
            ("x-ratelimit-limit-requests", "999999"),
            ("x-ratelimit-remaining-requests", "999998"),
            ("x-standin", "1"),
        ]
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, payload: Any, *, close: bool
    ) -> None:
        body = json.dumps(payload).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        if close:
            headers.append(("connection", "close"))
        writer.write(self._head(status, headers) + body)
        await writer.drain()

    # -- the API ----------------------------------------------------------------------------

    async def _route(
        self, request: RecordedRequest, writer: asyncio.StreamWriter, keep_alive: bool
    ) -> None:
        path = request.path.partition("?")[0]
        close = not keep_alive
        models = {
            m: {"id": m, "object": "model", "created": 1767225600, "owned_by": "standin"}
            for m in self.models
        }
        if request.method == "GET" and path == "/v1/models":
            payload = {"object": "list", "data": list(models.values())}
            return await self._send_json(writer, 200, payload, close=close)
        if request.method == "GET" and path.startswith("/v1/models/") and path[11:] in models:
            return await self._send_json(writer, 200, models[path[11:]], close=close)
        if request.method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            message = f"Unknown request URL: {request.method} {path}."
            return await self._send_json(writer, 404, _error(message, "not_found"), close=close)
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            return await self._send_json(writer, 400, _error(message, "invalid_json"), close=close)
        if not isinstance(body.get("model"), str):
            error = _error("you must provide a model parameter", "missing_model", "model")
            return await self._send_json(writer, 400, error, close=close)
        await self._complete(writer, body, chat=path.endswith("/chat/completions"), close=close)

    def _pieces(self, body: dict[str, Any]) -> list[str]:
        """The reply as word pieces (each with its leading space), capped by max_tokens."""
        pieces = re.findall(r"\s*\S+|\s+$", self.reply)
        for key in ("max_completion_tokens", "max_tokens"):
            cap = body.get(key)
            if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
                pieces = pieces[:cap]
        return pieces

    async def _complete(
        self, writer: asyncio.StreamWriter, body: dict[str, Any], *, chat: bool, close: bool
    ) -> None:
        pieces = self._pieces(body)
        if chat:
            messages = body.get("messages")
            contents = (
                [m.get("content") for m in messages if isinstance(m, dict)]
                if isinstance(messages, list)
                else []
            )
        else:
            contents = [body.get("prompt")]
        usage = {
            "prompt_tokens": max(1, _text_chars(contents) // 4),
            "completion_tokens": len(pieces),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        base: dict[str, Any] = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body["model"],
        }
        done: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "stop"}

        if body.get("stream") is not True:
            text = "".join(pieces)
            if chat:
                done["message"] = {"role": "assistant", "content": text, "refusal": None}
            else:
                done["text"] = text
            payload = {**base, "choices": [done], "usage": usage}
            return await self._send_json(writer, 200, payload, close=close)

        if chat:
            base["object"] = "chat.completion.chunk"
            deltas = [{"content": p} for p in pieces or [""]]
            deltas[0] = {"role": "assistant", **deltas[0]}
            choices: list[dict[str, Any]] = [
                {"index": 0, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas
            ]
            done["delta"] = {}
        else:
            choices = [
                {"index": 0, "text": p, "logprobs": None, "finish_reason": None} for p in pieces
            ]
            done["text"] = ""
        events = [{**base, "choices": [c]} for c in [*choices, done]]
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        if wants_usage and self.honour_include_usage:
            for event in events:
                event["usage"] = None  # as OpenAI does
            events.append({**base, "choices": [], "usage": usage})
        frames = [
            b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events
        ]
        frames.append(b"data: [DONE]\n\n")

        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
        ]
        if close:
            headers.append(("connection", "close"))
        writer.write(self._head(200, headers))
        await writer.drain()
        self.event_sent_at = sent_at = []
        for i, frame in enumerate(frames):
            if i and self.interval > 0:
                await asyncio.sleep(self.interval)
            writer.write(_frame(frame))
            await writer.drain()
            sent_at.append(time.monotonic())
        writer.write(b"0\r\n\r\n")
        await writer.drain()


class StandinThread:
    """Runs a StandinUpstream on its own event loop in a daemon thread, for synchronous tests
    and the demo. `with StandinThread(interval=0.1) as upstream: ...` gives the started server.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.upstream = StandinUpstream(**kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StandinUpstream:
        """Start the loop thread and the server; returns once the port is known."""
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="standin", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.start(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise
        return self.upstream

    def stop(self) -> None:
        """Stop the server, then the loop; joins the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    def __enter__(self) -> StandinUpstream:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`python -m cohortgate.standin`: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m cohortgate.standin",
        description="A stand-in OpenAI-compatible upstream for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--reply", default=DEFAULT_REPLY)
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model name to list (repeatable)",
    )
    parser.add_argument(
        "--ignore-include-usage",
        action="store_true",
        help="imitate an upstream that ignores stream_options.include_usage",
    )
    args = parser.parse_args(argv)
    upstream = StandinUpstream(
        args.host,
        args.port,
        reply=args.reply,
        models=args.models or ("gpt-5.6", "gpt-5.6-mini"),
        interval=args.interval,
        honour_include_usage=not args.ignore_include_usage,
    )

    async def serve() -> None:
        await upstream.start()
        print(f"stand-in upstream listening on {upstream.url}  (Ctrl-C stops)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await upstream.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        parser.exit(2, f"standin: cannot listen on {args.host}:{args.port}: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
