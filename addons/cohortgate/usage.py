"""Token counts for the tokens-per-minute limit: the reservation before, the usage after.

Pure helpers, no I/O. `reserve_tokens` estimates from a parsed request body what a request may
cost at most (a cheap, deterministic estimate that errs high), so the limiter can refuse it
before it reaches the upstream. `usage_from_json` reads the upstream's `usage` from a plain JSON
response; `SseUsage` reads it from a server-sent-events stream as the stream passes, drops the
usage-only event again for a client that did not ask for it (`request_usage` asked the upstream
for it on the client's behalf), and counts the completion itself when the upstream sends no usage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

__all__ = [
    "DEFAULT_COMPLETION_RESERVE",
    "MEDIA_PART_TOKENS",
    "Reservation",
    "SseUsage",
    "Usage",
    "request_usage",
    "reserve_tokens",
    "usage_from_json",
    "wants_usage",
]

DEFAULT_COMPLETION_RESERVE = 1024
"""Tokens reserved for the completion when the request sets no max_tokens."""

MEDIA_PART_TOKENS = 1000
"""Prompt tokens reserved for each image, audio or file part."""

_CHARS_PER_PROMPT_TOKEN = 3  # real tokenizers average about 4 for English: 3 errs high
_CHARS_PER_COMPLETION_TOKEN = 4
_TOKENS_PER_MESSAGE = 4  # the chat template's role and separators


# --- the reservation ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request may cost at most: its estimated prompt and its largest completion."""

    prompt: int
    completion: int
    # the request named its largest completion (a positive max_tokens or kin); otherwise the
    # completion part is a guess
    max_given: bool = field(default=False, compare=False)

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def reserve_tokens(body: Mapping[str, Any] | None, *, path: str | None = None) -> Reservation:
    """The tokens to reserve for a request, from its parsed JSON body.

    Covers chat/completions (`messages`), completions (`prompt`), embeddings and the responses
    API (`input`). `path` (the request path), when given, tells embeddings from the responses
    API for certain; without it an `input` body counts as embeddings only when it looks like
    one (`encoding_format`, `dimensions`, token arrays, or "embed" in the model name), else it
    is reserved as a generation, which errs high. A body without JSON (None) reserves nothing.
    Values of the wrong type are the upstream's to refuse: they count as absent here.
    """
    if not isinstance(body, Mapping):
        return Reservation(0, 0)
    tally = _Tally()
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            tally.tokens += _TOKENS_PER_MESSAGE
            if isinstance(message, Mapping):
                tally.add_content(message.get("content"))
                # earlier tool calls are part of the prompt too
                tally.add_json(message.get("tool_calls"))
                tally.add_json(message.get("function_call"))
    tally.add_prompt(body.get("prompt"))
    tally.add_input(body.get("input"))
    tally.add_text(body.get("instructions"))
    for key in ("tools", "functions", "response_format"):
        tally.add_json(body.get(key))
    prompt = max(1, tally.estimate())
    given = (
        _positive_int(body.get("max_completion_tokens"))
        or _positive_int(body.get("max_tokens"))
        or _positive_int(body.get("max_output_tokens"))
    )
    if _is_embeddings(body, path):
        return Reservation(prompt, 0, max_given=given is not None)
    # legacy completions generate best_of choices and bill them all
    choices = max(_positive_int(body.get("n")) or 1, _positive_int(body.get("best_of")) or 1)
    return Reservation(prompt, (given or DEFAULT_COMPLETION_RESERVE) * choices,
                       max_given=given is not None)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _is_embeddings(body: Mapping[str, Any], path: str | None) -> bool:
    if path is not None:
        return path.split("?", 1)[0].rstrip("/").endswith("/embeddings")
    if "input" not in body or "messages" in body or "prompt" in body:
        return False
    if "encoding_format" in body or "dimensions" in body:
        return True
    model = body.get("model")
    if isinstance(model, str) and "embed" in model.lower():
        return True
    items = body.get("input")
    # token arrays are an embeddings input; the responses API takes none
    return isinstance(items, list) and bool(items) and all(_is_token_array(i) for i in items)


def _is_token_array(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


class _Tally:
    """Characters of prompt text, plus tokens counted directly (token ids, media, overheads)."""

    __slots__ = ("chars", "tokens")

    def __init__(self) -> None:
        self.chars = 0
        self.tokens = 0

    def estimate(self) -> int:
        return -(-self.chars // _CHARS_PER_PROMPT_TOKEN) + self.tokens

    def add_text(self, value: Any) -> None:
        if isinstance(value, str):
            self.chars += len(value)

    def add_json(self, value: Any) -> None:
        if value is not None:
            self.chars += _json_size(value)

    def add_content(self, content: Any) -> None:
        """A message's content: a string, or a list of parts (text, image, audio, file)."""
        if isinstance(content, str):
            self.chars += len(content)
        elif isinstance(content, list):
            for part in content:
                self.add_part(part)

    def add_part(self, part: Any) -> None:
        if isinstance(part, str):
            self.chars += len(part)
        elif isinstance(part, Mapping):
            text = part.get("text")
            kind = part.get("type")
            if isinstance(text, str):
                self.chars += len(text)
            elif isinstance(kind, str) and _is_media(kind):
                self.tokens += MEDIA_PART_TOKENS
            else:  # a refusal or a part type we do not know: its JSON size errs high
                self.chars += _json_size(part)

    def add_prompt(self, prompt: Any) -> None:
        """Legacy completions `prompt`: a string, strings, token ids or lists of token ids."""
        if isinstance(prompt, str):
            self.chars += len(prompt)
        elif isinstance(prompt, list):
            for item in prompt:
                self.add_prompt_item(item)

    def add_prompt_item(self, item: Any) -> None:
        if isinstance(item, str):
            self.chars += len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            self.tokens += 1
        elif isinstance(item, list):
            for token in item:
                if isinstance(token, int) and not isinstance(token, bool):
                    self.tokens += 1

    def add_input(self, value: Any) -> None:
        """Embeddings or responses API `input`: a string, or a list of strings, token ids or
        items (messages with content, tool calls and their outputs)."""
        if isinstance(value, str):
            self.chars += len(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    self.tokens += _TOKENS_PER_MESSAGE
                    if "content" in item:
                        self.add_content(item.get("content"))
                    else:  # function_call, function_call_output, reasoning, ...
                        self.chars += _json_size(item)
                else:
                    self.add_prompt_item(item)


def _is_media(kind: str) -> bool:
    return "image" in kind or "audio" in kind or "file" in kind


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


# --- streamed requests: asking for the usage ------------------------------------------------


def wants_usage(body: Mapping[str, Any]) -> bool:
    """Whether the client itself asked for a streamed usage chunk."""
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


def request_usage(body: dict[str, Any]) -> bool:
    """Ask the upstream for a usage chunk at the end of a streamed chat or completions request.

    Sets `stream_options.include_usage = true`, keeping the other stream options; returns True
    when the body was changed, that is when the client did not ask for usage itself, so the
    result is also whether to drop the usage event again (`SseUsage(drop_usage_event=...)`).
    Plain requests, the responses API (its stream always carries usage) and a `stream_options`
    that is not an object (the upstream's to refuse) are left alone.
    """
    if body.get("stream") is not True or ("messages" not in body and "prompt" not in body):
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


# --- the usage of a response ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a response used; `estimated` when counted here because the upstream sent none."""

    prompt_tokens: int
    completion_tokens: int
    estimated: bool

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_from_json(body: bytes) -> Usage | None:
    """The `usage` of a plain (not streamed) JSON response; None if absent or unreadable.

    Reads chat, completions and embeddings usage (`prompt_tokens`, `completion_tokens`) and the
    responses API's (`input_tokens`, `output_tokens`). Never raises.
    """
    try:
        if b'"usage"' not in body:  # most error bodies: skip the parse
            return None
        doc = json.loads(body)
    except Exception:
        return None
    return _read_usage(doc.get("usage")) if isinstance(doc, dict) else None


def _read_usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    completion = _count(usage, "completion_tokens", "output_tokens") or 0
    if prompt is None:
        total = _count(usage, "total_tokens")
        if total is None:
            return None
        prompt = max(0, total - completion)
    return Usage(prompt, completion, estimated=False)


def _count(usage: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = usage.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


# --- the usage of a streamed response ---------------------------------------------------------

_LINE_END = rb"(?:\r\n|\n|\r(?!\n))"  # a lone CR ends a line only if no LF follows it
# The blank line that ends an event: two line ends in a row.
_EVENT_END = re.compile(_LINE_END + rb"(?:\r\n|\n|\r)")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_MAX_EVENT_BYTES = 1 << 20
_CR = 0x0D
_BOM = b"\xef\xbb\xbf"


class SseUsage:
    """Watches a server-sent-events response as it passes and finds its usage.

    Used as mitmproxy's `flow.response.stream` callable: called with each chunk received (the
    boundaries are arbitrary) and once with b"" at the end, it returns the bytes to send on.
    Without `drop_usage_event` every chunk goes on unchanged at once and is only read. With it,
    each complete event goes on as soon as its blank line arrives, except the usage-only event
    (a usage with `"choices": []`, or with no choices at all), which is left out; only an
    incomplete trailing event is held back, and b"" flushes it. An event larger than
    `max_event_bytes` goes on unread rather than held.

    Events that are not what we expect (comments, other fields, data that is not JSON or not
    a chunk) pass through and count for nothing. Nothing here raises: should reading fail
    itself, the rest of the stream passes through unread.
    """

    __slots__ = (
        "_buf",
        "_chars",
        "_drop",
        "_finished",
        "_max_event",
        "_passthrough",
        "_pieces",
        "_prompt_estimate",
        "_skipping",
        "_started",
        "_usage",
    )

    def __init__(
        self,
        *,
        drop_usage_event: bool,
        prompt_estimate: int,
        max_event_bytes: int = _MAX_EVENT_BYTES,
    ) -> None:
        self._drop = drop_usage_event
        self._prompt_estimate = prompt_estimate
        self._max_event = max_event_bytes
        self._buf = bytearray()  # the incomplete trailing event
        self._skipping = False  # inside an oversized event, already sent on, not read
        self._passthrough = False  # something went wrong: send everything on, read nothing
        self._started = False
        self._finished = False
        self._usage: Usage | None = None
        self._pieces = 0
        self._chars = 0

    @property
    def usage(self) -> Usage | None:
        """The upstream's usage if one was seen (the last one wins), else our estimate.

        The estimate counts each choice delta with text as one completion token, or one per 4
        characters if that is more, and takes the caller's `prompt_estimate`. Mid-stream (the
        client went away) it is the estimate so far, with `finished` still False. None while
        neither a usage nor any completion text was seen and the stream has not finished.
        """
        if self._usage is not None:
            return self._usage
        if self._pieces or self._finished:
            completion = max(self._pieces, -(-self._chars // _CHARS_PER_COMPLETION_TOKEN))
            return Usage(self._prompt_estimate, completion, estimated=True)
        return None

    @property
    def finished(self) -> bool:
        """The stream ended: "[DONE]" was seen or b"" received."""
        return self._finished

    def __call__(self, chunk: bytes) -> bytes:
        if self._passthrough:
            if not chunk:
                self._finished = True
            return chunk
        try:
            out = self._feed(chunk)
        except Exception:  # a bug here must not break the response (_feed tries not to get here)
            self._passthrough = True
            self._finished = self._finished or not chunk
            return chunk
        return out if self._drop else chunk

    def _feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return self._end()
        out: list[bytes] = []  # what goes on, in order
        if self._skipping:
            start = self._skip(chunk, out)
            if self._skipping:
                return b"".join(out)
            chunk = chunk[start:]
        buf = self._buf
        data: bytes | bytearray
        if buf:
            # A blank line ending in the new bytes starts at most 3 bytes before them.
            search = max(0, len(buf) - 3)
            buf += chunk
            data = buf
        else:  # the usual case: the chunk starts an event, read it without a copy
            search = 0
            data = chunk
        pos = 0  # where the held event starts; out holds what came before it
        try:
            while (end := _event_end(data, search)) != -1:
                event = bytes(data[pos:end])
                if self._keep(event) and self._drop:
                    out.append(event)
                pos = search = end
        except Exception:
            out.append(bytes(data[pos:]))
            buf.clear()
            self._passthrough = True
            return b"".join(out)
        if data is buf:
            del buf[:pos]
        else:
            buf += data[pos:]
        if len(buf) > self._max_event:
            # too large to hold back: send it on unread, and the rest of it as it comes
            out.append(bytes(buf))
            del buf[:-3]
            self._skipping = True
        return b"".join(out)

    def _skip(self, chunk: bytes, out: list[bytes]) -> int:
        """Send on the rest of an oversized event; returns where in `chunk` the next begins."""
        tail = bytes(self._buf)  # its last bytes, already sent, to find a blank line across
        end = _event_end(tail + chunk, 0)
        if end == -1:
            out.append(chunk)
            self._buf[:] = (tail + chunk)[-3:]
            return len(chunk)
        start = max(0, end - len(tail))
        out.append(chunk[:start])
        self._buf.clear()
        self._skipping = False
        return start

    def _end(self) -> bytes:
        self._finished = True
        if self._skipping or not self._buf:
            self._buf.clear()
            return b""
        event = bytes(self._buf)  # no blank line after it: SSE clients ignore it, we read it
        self._buf.clear()
        return event if self._keep(event) else b""

    def _keep(self, event: bytes) -> bool:
        """Read one event; False if it is the usage-only event to drop."""
        try:
            return self._read_event(event)
        except Exception:  # odd data: keep the event, count nothing from it
            return True

    def _read_event(self, event: bytes) -> bool:
        if not self._started:
            self._started = True
            if event.startswith(_BOM):
                event = event[len(_BOM) :]
        data = _event_data(event)
        if data is None:
            return True
        if data == b"[DONE]":
            self._finished = True
            return True
        if data[:1] != b"{" and data.lstrip()[:1] != b"{":
            return True
        doc = json.loads(data)
        if not isinstance(doc, dict):
            return True
        usage = _read_usage(doc.get("usage"))
        choices = doc.get("choices")
        if isinstance(choices, list):
            self._count_choices(choices)
        else:
            self._count_response_event(doc)
        if usage is None:
            return True
        self._usage = usage
        usage_only = choices == [] or ("choices" not in doc and "type" not in doc)
        return not (self._drop and usage_only)

    def _count_choices(self, choices: list[Any]) -> None:
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            chars = 0
            delta = choice.get("delta")
            if isinstance(delta, dict):
                for key in ("content", "reasoning_content", "reasoning", "refusal"):
                    value = delta.get(key)
                    if isinstance(value, str):
                        chars += len(value)
                calls = delta.get("tool_calls")
                if isinstance(calls, list):
                    chars += _tool_call_chars(calls)
            text = choice.get("text")
            if isinstance(text, str):
                chars += len(text)
            if chars:
                self._pieces += 1
                self._chars += chars

    def _count_response_event(self, doc: dict[str, Any]) -> None:
        """The responses API: usage in `response.completed`, text in `*.delta` events."""
        response = doc.get("response")
        if isinstance(response, dict):
            usage = _read_usage(response.get("usage"))
            if usage is not None:
                self._usage = usage
        kind = doc.get("type")
        delta = doc.get("delta")
        if isinstance(kind, str) and kind.endswith(".delta") and isinstance(delta, str) and delta:
            self._pieces += 1
            self._chars += len(delta)


def _event_end(buf: bytes | bytearray, start: int) -> int:
    """Where the first event ending after `start` ends, its blank line included; -1 if none yet."""
    if buf.find(b"\r", start) == -1:  # the usual case, found without the regex
        end = buf.find(b"\n\n", start)
        return -1 if end == -1 else end + 2
    match = _EVENT_END.search(buf, start)
    if match is None:
        return -1
    end = match.end()
    if end == len(buf) and buf[end - 1] == _CR:
        return -1  # the CR may be half of a CRLF still to come
    return end


def _tool_call_chars(calls: list[Any]) -> int:
    chars = 0
    for call in calls:
        if isinstance(call, dict):
            function = call.get("function")
            if isinstance(function, dict):
                arguments = function.get("arguments")
                if isinstance(arguments, str):
                    chars += len(arguments)
    return chars


def _event_data(event: bytes) -> bytes | None:
    """An event's data: its `data:` lines joined by "\\n"; None if it has none."""
    if (  # the usual event: one data line and the blank line
        event.startswith(b"data: ")
        and event.find(b"\n", 6) == len(event) - 2
        and event.endswith(b"\n\n")
        and b"\r" not in event
    ):
        return event[6:-2]
    lines = _LINE_BREAK.split(event) if b"\r" in event else event.split(b"\n")
    data: list[bytes] | None = None
    for line in lines:
        if not line.startswith(b"data"):
            continue
        if len(line) == 4:
            value = b""
        elif line[4] == 0x3A:  # ":"
            value = line[6:] if line[5:6] == b" " else line[5:]
        else:
            continue  # another field whose name starts with "data"
        if data is None:
            data = [value]
        else:
            data.append(value)
    if data is None:
        return None
    return data[0] if len(data) == 1 else b"\n".join(data)
