"""Token reservation and usage reading (cohortgate.usage)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from cohortgate.usage import DEFAULT_COMPLETION_RESERVE
from cohortgate.usage import MEDIA_PART_TOKENS
from cohortgate.usage import Reservation
from cohortgate.usage import SseUsage
from cohortgate.usage import Usage
from cohortgate.usage import request_usage
from cohortgate.usage import reserve_tokens
from cohortgate.usage import usage_from_json
from cohortgate.usage import wants_usage


def chars(n: int) -> str:
    return "x" * n


# --- reserve_tokens ---------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
TOOLS_SIZE = len(json.dumps(TOOLS, separators=(",", ":")))


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(None, Reservation(0, 0), id="no-body"),
        pytest.param({}, Reservation(1, DEFAULT_COMPLETION_RESERVE), id="empty-object"),
        pytest.param(
            {"model": "m", "messages": [{"role": "user", "content": chars(30)}]},
            Reservation(10 + 4, DEFAULT_COMPLETION_RESERVE),
            id="chat-no-max-tokens",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": chars(31)}], "max_tokens": 50},
            Reservation(11 + 4, 50),
            id="chat-max-tokens-rounds-up",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "system", "content": chars(6)},
                    {"role": "user", "content": chars(3)},
                ],
                "max_tokens": 50,
                "max_completion_tokens": 70,
            },
            Reservation(3 + 8, 70),
            id="max-completion-tokens-wins",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": chars(3)}], "max_tokens": 100, "n": 3},
            Reservation(1 + 4, 300),
            id="n-choices",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "hi"}], "n": 2},
            Reservation(1 + 4, 2 * DEFAULT_COMPLETION_RESERVE),
            id="n-without-max-tokens",
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": chars(9)},
                            {"type": "image_url", "image_url": {"url": "data:" + chars(9000)}},
                            {"type": "input_audio", "input_audio": {"data": chars(9000)}},
                            {"type": "text", "text": chars(3)},
                        ],
                    }
                ],
                "max_tokens": 10,
            },
            Reservation(4 + 4 + 2 * MEDIA_PART_TOKENS, 10),
            id="parts-with-image-and-audio",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "max_tokens": 5},
            Reservation(math.ceil((2 + TOOLS_SIZE) / 3) + 4, 5),
            id="tools-json-size",
        ),
        pytest.param(
            {"prompt": [chars(6), chars(3)], "max_tokens": 16},
            Reservation(3, 16),
            id="legacy-prompt-list",
        ),
        pytest.param(
            {"prompt": chars(7), "max_tokens": 16, "n": 2, "best_of": 5},
            Reservation(3, 80),
            id="legacy-best-of",
        ),
        pytest.param(
            {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 1},
            Reservation(5, 1),
            id="legacy-token-ids",
        ),
        pytest.param(
            {"model": "text-embedding-3-small", "input": [chars(30), chars(3)]},
            Reservation(11, 0),
            id="embeddings-by-model",
        ),
        pytest.param(
            {"model": "bge-m3", "input": chars(9), "encoding_format": "float"},
            Reservation(3, 0),
            id="embeddings-by-encoding-format",
        ),
        pytest.param(
            {"model": "bge-m3", "input": [[1, 2, 3], [4]]},
            Reservation(4, 0),
            id="embeddings-token-arrays",
        ),
        pytest.param(
            {"model": "gpt-5", "input": chars(9), "max_output_tokens": 300},
            Reservation(3, 300),
            id="responses-string-input",
        ),
        pytest.param(
            {
                "model": "gpt-5",
                "instructions": chars(6),
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": chars(9)}]},
                    {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
                    {"role": "assistant", "content": chars(3)},
                ],
            },
            Reservation(6 + 3 * 4 + MEDIA_PART_TOKENS, DEFAULT_COMPLETION_RESERVE),
            id="responses-items",
        ),
        pytest.param(
            {"model": "bge-m3", "input": "hi"},
            Reservation(1, DEFAULT_COMPLETION_RESERVE),
            id="ambiguous-input-errs-high",
        ),
        pytest.param(
            {
                "messages": "not a list",
                "max_tokens": "100",
                "max_completion_tokens": -5,
                "n": True,
                "prompt": 7,
                "input": None,
                "tools": None,
            },
            Reservation(1, DEFAULT_COMPLETION_RESERVE),
            id="garbage-types-are-absent",
        ),
        pytest.param(
            {"messages": [None, 3, {"content": 5}, {"content": [None, 7]}], "max_tokens": 2.5},
            Reservation(16, DEFAULT_COMPLETION_RESERVE),
            id="garbage-messages-count-4-each",
        ),
        pytest.param(
            {"max_completion_tokens": 0, "max_tokens": 9, "n": 0},
            Reservation(1, 9),
            id="zero-is-absent",
        ),
        pytest.param(
            {"max_tokens": True},
            Reservation(1, DEFAULT_COMPLETION_RESERVE),
            id="bool-is-not-int",
        ),
    ],
)
def test_reserve_tokens(body: dict[str, Any] | None, expected: Reservation) -> None:
    assert reserve_tokens(body) == expected


@pytest.mark.parametrize(
    ("path", "completion"),
    [
        ("/v1/embeddings", 0),
        ("/v1/embeddings?x=1", 0),
        ("/v1/responses", DEFAULT_COMPLETION_RESERVE),
    ],
)
def test_reserve_tokens_path_decides_embeddings(path: str, completion: int) -> None:
    body = {"model": "bge-m3", "input": "hi"}
    assert reserve_tokens(body, path=path).completion == completion


def test_reservation_total() -> None:
    assert Reservation(3, 4).total == 7


def test_reserve_counts_earlier_tool_calls() -> None:
    call = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": chars(300)}}]
    plain = reserve_tokens({"messages": [{"role": "assistant", "content": None}]})
    called = reserve_tokens({"messages": [{"role": "assistant", "tool_calls": call}]})
    assert called.prompt >= plain.prompt + 100


# --- usage_from_json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"id":"c","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,'
            b'"total_tokens":17}}',
            Usage(12, 5, estimated=False),
            id="chat",
        ),
        pytest.param(
            b'{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}',
            Usage(8, 0, estimated=False),
            id="embeddings-no-completion",
        ),
        pytest.param(
            b'{"object":"response","usage":{"input_tokens":20,"output_tokens":7,'
            b'"total_tokens":27}}',
            Usage(20, 7, estimated=False),
            id="responses-api",
        ),
        pytest.param(
            b'{"usage":{"total_tokens":30,"completion_tokens":10}}',
            Usage(20, 10, estimated=False),
            id="total-only",
        ),
        pytest.param(b'{"choices":[]}', None, id="no-usage"),
        pytest.param(b'{"usage":null}', None, id="usage-null"),
        pytest.param(b'{"usage":{}}', None, id="usage-empty"),
        pytest.param(b'{"usage":{"prompt_tokens":"12"}}', None, id="usage-string"),
        pytest.param(b'{"usage":{"prompt_tokens":-1}}', None, id="usage-negative"),
        pytest.param(b'{"usage":{"prompt_tokens":true}}', None, id="usage-bool"),
        pytest.param(
            b'{"usage":{"prompt_tokens":4,"completion_tokens":"x"}}',
            Usage(4, 0, estimated=False),
            id="bad-completion-is-zero",
        ),
        pytest.param(b'["usage"]', None, id="not-an-object"),
        pytest.param(b'{"usage": {"prompt_tokens": 1', None, id="truncated"),
        pytest.param(b"\xff\xfe usage", None, id="not-utf8"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b'{"usage":' + b"[" * 100_000 + b"}", None, id="deep-nesting"),
    ],
)
def test_usage_from_json(body: bytes, expected: Usage | None) -> None:
    assert usage_from_json(body) == expected


def test_usage_total() -> None:
    assert Usage(3, 4, estimated=True).total == 7


# --- asking for usage -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"stream": True, "stream_options": {"include_usage": True}}, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, False),
        ({"stream": True, "stream_options": {"include_usage": "true"}}, False),
        ({"stream": True, "stream_options": None}, False),
        ({"stream": True}, False),
    ],
)
def test_wants_usage(body: dict[str, Any], expected: bool) -> None:
    assert wants_usage(body) is expected


@pytest.mark.parametrize(
    ("body", "changed", "after"),
    [
        pytest.param(
            {"messages": [], "stream": True},
            True,
            {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
            id="adds-stream-options",
        ),
        pytest.param(
            {"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": False}},
            True,
            {
                "prompt": "x",
                "stream": True,
                "stream_options": {"include_obfuscation": False, "include_usage": True},
            },
            id="keeps-other-options",
        ),
        pytest.param(
            {"messages": [], "stream": True, "stream_options": {"include_usage": False}},
            True,
            {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
            id="overrides-false",
        ),
        pytest.param(
            {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
            False,
            {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
            id="client-asked-itself",
        ),
        pytest.param({"messages": []}, False, {"messages": []}, id="not-streamed"),
        pytest.param(
            {"messages": [], "stream": False},
            False,
            {"messages": [], "stream": False},
            id="stream-false",
        ),
        pytest.param(
            {"messages": [], "stream": "true"},
            False,
            {"messages": [], "stream": "true"},
            id="stream-not-bool",
        ),
        pytest.param(
            {"input": "x", "stream": True},
            False,
            {"input": "x", "stream": True},
            id="responses-api-untouched",
        ),
        pytest.param(
            {"messages": [], "stream": True, "stream_options": "x"},
            False,
            {"messages": [], "stream": True, "stream_options": "x"},
            id="garbage-options-untouched",
        ),
    ],
)
def test_request_usage(body: dict[str, Any], changed: bool, after: dict[str, Any]) -> None:
    assert request_usage(body) is changed
    assert body == after


# --- SseUsage: helpers and a realistic stream ---------------------------------------------------


def event(obj: Any, nl: bytes = b"\n") -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + nl + nl


BASE = {
    "id": "chatcmpl-abc",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_1",
}


def chunk_obj(delta: dict[str, Any], finish: str | None = None, usage: bool = True) -> Any:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    obj: dict[str, Any] = {**BASE, "choices": [choice]}
    if usage:
        obj["usage"] = None  # as OpenAI sends it once include_usage is set
    return obj


USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 3,
    "total_tokens": 22,
    "prompt_tokens_details": {"cached_tokens": 0},
}
PIECES = ["Hello", " there", "!"]


def openai_events(nl: bytes = b"\n", with_usage: bool = True) -> list[bytes]:
    events = [event(chunk_obj({"role": "assistant", "content": "", "refusal": None}), nl)]
    events += [event(chunk_obj({"content": p}), nl) for p in PIECES]
    events.append(event(chunk_obj({}, finish="stop"), nl))
    if with_usage:
        events.append(event({**BASE, "choices": [], "usage": USAGE}, nl))
    events.append(b"data: [DONE]" + nl + nl)
    return events


STREAM = b"".join(openai_events())
USAGE_EVENT = openai_events()[-2]
WITHOUT_USAGE = STREAM.replace(USAGE_EVENT, b"")
UPSTREAM_USAGE = Usage(19, 3, estimated=False)


def feed(watcher: SseUsage, chunks: Iterable[bytes], end: bool = True) -> bytes:
    out = b"".join(watcher(c) for c in chunks if c)
    if end:
        out += watcher(b"")
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- SseUsage: a whole, split and byte-by-byte stream ----------------------------------------


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("how", ["whole", "byte-by-byte"])
def test_openai_stream(drop: bool, nl: bytes, how: str) -> None:
    events = openai_events(nl)
    stream = b"".join(events)
    expected = b"".join(e for e in events if e != events[-2]) if drop else stream
    watcher = SseUsage(drop_usage_event=drop, prompt_estimate=100)
    chunks = [stream] if how == "whole" else byte_by_byte(stream)
    assert feed(watcher, chunks) == expected
    assert watcher.usage == UPSTREAM_USAGE
    assert watcher.finished


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_openai_stream_split_everywhere(drop: bool, nl: bytes) -> None:
    events = openai_events(nl)
    stream = b"".join(events)
    expected = b"".join(e for e in events if e != events[-2]) if drop else stream
    for cut in range(len(stream) + 1):
        watcher = SseUsage(drop_usage_event=drop, prompt_estimate=100)
        assert feed(watcher, split_at(stream, [cut])) == expected, cut
        assert watcher.usage == UPSTREAM_USAGE, cut


def test_complete_events_go_on_at_once() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    first, second = openai_events()[:2]
    assert watcher(first + second[:10]) == first
    assert watcher(second[10:]) == second
    assert watcher(b"") == b""


def test_usage_event_is_held_until_complete_then_dropped() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert watcher(USAGE_EVENT[:-1]) == b""
    assert watcher.usage is None
    assert watcher(USAGE_EVENT[-1:]) == b""
    assert watcher.usage == UPSTREAM_USAGE


def test_without_drop_chunks_go_on_unchanged() -> None:
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=1)
    assert watcher(USAGE_EVENT[:-1]) == USAGE_EVENT[:-1]
    assert watcher(USAGE_EVENT[-1:]) == USAGE_EVENT[-1:]
    assert watcher.usage == UPSTREAM_USAGE


@pytest.mark.parametrize("cut", [1, 2, 3], ids=["after-cr", "after-crlf", "after-crlfcr"])
def test_crlf_blank_line_split_inside(cut: int) -> None:
    head = b"data: " + json.dumps({**BASE, "choices": [], "usage": USAGE}).encode()
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    tail = b"data: [DONE]\r\n\r\n"
    out = watcher(head + b"\r\n\r\n"[:cut]) + watcher(b"\r\n\r\n"[cut:] + tail) + watcher(b"")
    assert out == tail
    assert watcher.usage == UPSTREAM_USAGE


@pytest.mark.parametrize("sep", [b"\r\r", b"\n\r", b"\r\n\r"])
def test_trailing_cr_waits_for_a_possible_lf(sep: bytes) -> None:
    # "\r" then "\n" is one line end: the LF belongs to the blank line, not to the next event
    usage_event = b"data: " + json.dumps({"choices": [], "usage": USAGE}).encode() + sep
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert watcher(usage_event) == b""
    assert watcher(b"\ndata: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert watcher.usage == UPSTREAM_USAGE


def test_trailing_cr_then_next_event() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert watcher(b"data: [DONE]\r\r") == b""
    assert watcher(b"data: x\r\r") == b"data: [DONE]\r\r"
    assert watcher(b"") == b"data: x\r\r"


# --- SseUsage: what the usage is ----------------------------------------------------------------


def test_upstream_ignores_include_usage() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=57)
    stream = b"".join(openai_events(with_usage=False))
    assert feed(watcher, byte_by_byte(stream)) == stream
    assert watcher.usage == Usage(57, len(PIECES), estimated=True)


def test_estimate_uses_characters_when_pieces_are_long() -> None:
    stream = event(chunk_obj({"content": chars(40)})) + event(chunk_obj({"content": chars(5)}))
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=3)
    feed(watcher, [stream])
    assert watcher.usage == Usage(3, math.ceil(45 / 4), estimated=True)


def test_client_abort_mid_stream_gives_estimate_so_far() -> None:
    stream = b"".join(openai_events())
    half = stream[: stream.index(b"there") + 10]  # into the third event
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=10)
    feed(watcher, [half], end=False)
    # the role chunk's empty content does not count; "Hello" does; " there" is still held
    assert watcher.usage == Usage(10, max(1, math.ceil(len("Hello") / 4)), estimated=True)
    assert not watcher.finished


def test_abort_before_any_piece_is_none() -> None:
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=10)
    feed(watcher, [openai_events()[0]], end=False)
    assert watcher.usage is None
    assert not watcher.finished


def test_empty_finished_stream_is_estimated() -> None:
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=10)
    assert watcher(b"") == b""
    assert watcher.finished
    assert watcher.usage == Usage(10, 0, estimated=True)


def test_done_finishes() -> None:
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=1)
    watcher(b"data: [DONE]\n\n")
    assert watcher.finished


def test_last_usage_wins() -> None:
    # vLLM's continuous_usage_stats: a running usage on every chunk
    stream = b"".join(
        event({"choices": [{"index": 0, "delta": {"content": "a"}}], "usage": u})
        for u in (
            {"prompt_tokens": 5, "completion_tokens": 1},
            {"prompt_tokens": 5, "completion_tokens": 2},
        )
    )
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, [stream]) == stream  # usage with choices is no usage-only event
    assert watcher.usage == Usage(5, 2, estimated=False)


@pytest.mark.parametrize(
    ("usage_event", "dropped"),
    [
        pytest.param(b'data: {"choices": [], "usage": {"prompt_tokens": 1}}\n\n', True, id="[]"),
        pytest.param(b'data: {"usage": {"prompt_tokens": 1}}\n\n', True, id="no-choices"),
        pytest.param(
            b'data: {"type": "x", "usage": {"prompt_tokens": 1}}\n\n', False, id="typed-event"
        ),
        pytest.param(
            b'data: {"choices": null, "usage": {"prompt_tokens": 1}}\n\n', False, id="null"
        ),
        pytest.param(b'data: {"choices": [], "usage": {}}\n\n', False, id="empty-usage"),
    ],
)
def test_what_is_a_usage_only_event(usage_event: bytes, dropped: bool) -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, [usage_event]) == (b"" if dropped else usage_event)


def test_usage_in_finish_chunk_is_read_and_kept() -> None:
    # llama.cpp puts the usage on the last chunk that still has a choice
    finish = {**chunk_obj({}, "stop"), "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    stream = event(chunk_obj({"content": "a"})) + event(finish) + b"data: [DONE]\n\n"
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, byte_by_byte(stream)) == stream
    assert watcher.usage == Usage(7, 2, estimated=False)


@pytest.mark.parametrize(
    ("delta", "pieces"),
    [
        ({"content": "a"}, 1),
        ({"reasoning_content": "a"}, 1),
        ({"reasoning": "a"}, 1),
        ({"content": ""}, 0),
        ({"content": None}, 0),
        ({"role": "assistant"}, 0),
        ({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}, 1),
        ({"tool_calls": [{"index": 0, "function": {"name": "f"}}]}, 0),
    ],
)
def test_pieces_counted(delta: dict[str, Any], pieces: int) -> None:
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=0)
    feed(watcher, [event(chunk_obj(delta))])
    assert watcher.usage == Usage(0, pieces, estimated=True)


def test_legacy_completions_text_counted() -> None:
    stream = b"".join(
        event({"object": "text_completion", "choices": [{"index": 0, "text": t}]})
        for t in ["a", "b", ""]
    )
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=0)
    feed(watcher, [stream])
    assert watcher.usage == Usage(0, 2, estimated=True)


def test_responses_api_stream() -> None:
    def sse(kind: str, obj: dict[str, Any]) -> bytes:
        return f"event: {kind}\n".encode() + event({"type": kind, **obj})

    stream = (
        sse("response.created", {"response": {"id": "r", "usage": None}})
        + sse("response.output_text.delta", {"delta": "Hel"})
        + sse("response.output_text.delta", {"delta": "lo"})
        + sse(
            "response.completed",
            {"response": {"id": "r", "usage": {"input_tokens": 9, "output_tokens": 2}}},
        )
    )
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, byte_by_byte(stream)) == stream
    assert watcher.usage == Usage(9, 2, estimated=False)


def test_responses_api_abort_estimates_deltas() -> None:
    stream = event({"type": "response.output_text.delta", "delta": "Hel"}) * 3
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=4)
    feed(watcher, [stream], end=False)
    assert watcher.usage == Usage(4, 3, estimated=True)


# --- SseUsage: odd streams -------------------------------------------------------------------


ODD_EVENTS = [
    b": keep-alive\n\n",
    b":\n\n",
    b"event: ping\ndata: {}\n\n",
    b"id: 7\nretry: 100\n\n",
    b"data:\n\n",
    b"data\n\n",
    b"data: \n\n",
    b"data: not json\n\n",
    b"data: {not json\n\n",
    b'data: {"choices": [], "usage": "nope"}\n\n',
    b'data: {"choices": [], "usage": null}\n\n',
    b'data: {"choices": "x", "usage": 5}\n\n',
    b'data: {"choices": [null, 3, {"delta": 5}, {"delta": {"content": 9}}]}\n\n',
    b"data: [1, 2]\n\n",
    b"data: " + b"[" * 50_000 + b"\n\n",
    b'data: {"a":' + b"[" * 50_000 + b"\n\n",
    b"data: \xff\xfe\n\n",
    b"dataX: {}\n\n",
    b"\n\n",
    b"garbage without a field\n\n",
]


@pytest.mark.parametrize("drop", [False, True])
def test_odd_events_pass_through(drop: bool) -> None:
    odd = b"".join(ODD_EVENTS)
    stream = odd + USAGE_EVENT + odd + b"data: [DONE]\n\n"
    expected = stream.replace(USAGE_EVENT, b"") if drop else stream
    for chunks in ([stream], byte_by_byte(stream)):
        watcher = SseUsage(drop_usage_event=drop, prompt_estimate=1)
        assert feed(watcher, chunks) == expected
        assert watcher.usage == UPSTREAM_USAGE


def test_odd_events_count_nothing() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=5)
    feed(watcher, [b"".join(ODD_EVENTS)], end=False)
    assert watcher.usage is None


def test_data_over_several_lines_is_joined() -> None:
    text = json.dumps({"choices": [], "usage": USAGE}, indent=1)
    usage_event = "".join(f"data: {line}\n" for line in text.split("\n")).encode() + b"\n"
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, [b": hi\n\n", usage_event, b"data: [DONE]\n\n"]) == (
        b": hi\n\ndata: [DONE]\n\n"
    )
    assert watcher.usage == UPSTREAM_USAGE


@pytest.mark.parametrize(
    ("inner", "last"),
    [(b"\r", b"\n\n"), (b"\r\n", b"\n\n"), (b"\n", b"\r\n\r\n"), (b"\r", b"\r\r")],
)
def test_data_lines_with_mixed_line_ends(inner: bytes, last: bytes) -> None:
    usage_event = b'data: {"choices": [],' + inner + b'data: "usage": {"prompt_tokens": 19,'
    usage_event += inner + b'data: "completion_tokens": 3}}' + last
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, [usage_event, b"data: [DONE]\n\n"]) == b"data: [DONE]\n\n"
    assert watcher.usage == UPSTREAM_USAGE


def test_data_without_space_after_colon() -> None:
    usage_event = b"data:" + json.dumps({"choices": [], "usage": USAGE}).encode() + b"\n\n"
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert feed(watcher, [usage_event]) == b""
    assert watcher.usage == UPSTREAM_USAGE


def test_byte_order_mark_before_first_event() -> None:
    stream = b"\xef\xbb\xbf" + USAGE_EVENT
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=1)
    assert feed(watcher, [stream]) == stream
    assert watcher.usage == UPSTREAM_USAGE


def test_trailing_event_without_blank_line_is_flushed() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    assert watcher(b"data: [DONE]\n\ndata: partial") == b"data: [DONE]\n\n"
    assert watcher(b"") == b"data: partial"


def test_long_event_split_over_many_chunks() -> None:
    long_event = event(chunk_obj({"content": chars(300_000)}))
    stream = long_event + USAGE_EVENT + b"data: [DONE]\n\n"
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    chunks = split_at(stream, range(0, len(stream), 1000))
    assert feed(watcher, chunks) == long_event + b"data: [DONE]\n\n"
    assert watcher.usage == UPSTREAM_USAGE


def test_long_event_estimate() -> None:
    long_event = event(chunk_obj({"content": chars(300_000)}))
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    feed(watcher, split_at(long_event, range(0, len(long_event), 1000)))
    assert watcher.usage == Usage(1, 75_000, estimated=True)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_oversized_event_goes_on_unread(drop: bool, nl: bytes) -> None:
    big = event(chunk_obj({"content": chars(5000)}), nl)
    stream = event(chunk_obj({"content": "a"}), nl) + big + USAGE_EVENT + b"data: [DONE]\n\n"
    expected = stream.replace(USAGE_EVENT, b"") if drop else stream
    for step in (1, 7, 1000, 4096):
        watcher = SseUsage(drop_usage_event=drop, prompt_estimate=1, max_event_bytes=1000)
        assert feed(watcher, split_at(stream, range(0, len(stream), step))) == expected, step
        assert watcher.usage == UPSTREAM_USAGE


@pytest.mark.parametrize("nl", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("back", [1, 2, 3])
def test_oversized_event_split_inside_its_blank_line(nl: bytes, back: int) -> None:
    big = event(chunk_obj({"content": chars(5000)}), nl)
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1, max_event_bytes=1000)
    out = watcher(big[:-back]) + watcher(big[-back:] + USAGE_EVENT) + watcher(b"")
    assert out == big
    assert watcher.usage == UPSTREAM_USAGE


def test_oversized_event_not_counted() -> None:
    big = event(chunk_obj({"content": chars(5000)}))
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1, max_event_bytes=1000)
    assert feed(watcher, [big[:3000], big[3000:]]) == big
    assert watcher.usage == Usage(1, 0, estimated=True)


def test_oversized_event_is_not_held() -> None:
    big = event(chunk_obj({"content": chars(5000)}))
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1, max_event_bytes=1000)
    assert watcher(big[:3000]) == big[:3000]
    assert watcher(big[3000:4000]) == big[3000:4000]


def test_after_end_chunks_pass() -> None:
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=1)
    feed(watcher, [STREAM])
    assert watcher(b"data: x\n\n") == b"data: x\n\n"


# --- SseUsage: any stream, split anywhere (hypothesis) -----------------------------------------

LINE_ENDS = [b"\n", b"\r\n", b"\r"]
SAFE_TEXT = st.text(st.characters(blacklist_characters="\r\n", codec="utf-8"), max_size=12)


@st.composite
def sse_event(draw: st.DrawFn) -> tuple[bytes, dict[str, Any] | None, str | None, bool]:
    """One event: its bytes, the usage it carries, its completion text, whether usage-only."""
    kind = draw(
        st.sampled_from(
            [
                *("content", "role", "finish", "usage", "usage-null", "usage-with-choice"),
                *("comment", "ping", "id", "empty", "garbage", "done", "multiline", "text"),
            ]
        )
    )
    usage: dict[str, Any] | None = None
    text: str | None = None
    usage_only = False
    lines: list[bytes]
    if kind == "content":
        text = draw(SAFE_TEXT)
        lines = [b"data: " + json.dumps(chunk_obj({"content": text})).encode()]
    elif kind == "text":
        text = draw(SAFE_TEXT)
        legacy = {"choices": [{"text": text, "index": 0}]}
        lines = [b"data:" + json.dumps(legacy, ensure_ascii=False).encode()]
    elif kind == "role":
        lines = [b"data: " + json.dumps(chunk_obj({"role": "assistant"})).encode()]
    elif kind == "finish":
        lines = [b"data: " + json.dumps(chunk_obj({}, "stop")).encode()]
    elif kind in ("usage", "usage-with-choice", "multiline"):
        usage = {
            "prompt_tokens": draw(st.integers(0, 10**6)),
            "completion_tokens": draw(st.integers(0, 10**6)),
        }
        if kind == "usage-with-choice":
            obj = {**chunk_obj({}, "stop"), "usage": usage}
        else:
            obj = {**BASE, "choices": [], "usage": usage}
            usage_only = True
        body = json.dumps(obj, indent=1 if kind == "multiline" else None).encode()
        lines = [b"data: " + line for line in body.split(b"\n")]
        if draw(st.booleans()):
            lines.insert(0, b"id: " + str(draw(st.integers(0, 99))).encode())
    elif kind == "usage-null":
        lines = [b"data: " + json.dumps({**BASE, "choices": [], "usage": None}).encode()]
    elif kind == "comment":
        lines = [b": " + draw(SAFE_TEXT).encode()]
    elif kind == "ping":
        lines = [b"event: ping", b"data: {}"]
    elif kind == "id":
        lines = [b"id: 1", b"retry: 10"]
    elif kind == "empty":
        lines = [b"data:"]
    elif kind == "garbage":
        lines = [b"data: " + draw(SAFE_TEXT).encode()]
    else:
        lines = [b"data: [DONE]"]
    raw = b""
    end = b"\n"
    for line in lines:
        end = draw(st.sampled_from(LINE_ENDS))
        raw += line + end
    # a CR then an LF would be one line end, not a blank line
    raw += draw(st.sampled_from([b"\r", b"\r\n"] if end == b"\r" else LINE_ENDS))
    return raw, usage, text, usage_only


@st.composite
def sse_stream(
    draw: st.DrawFn,
) -> tuple[list[tuple[bytes, dict[str, Any] | None, str | None, bool]], list[bytes]]:
    events = draw(st.lists(sse_event(), max_size=12))
    raw = b"".join(e[0] for e in events)
    cuts = draw(st.lists(st.integers(0, len(raw)), max_size=16))
    return events, split_at(raw, cuts)


def expected_usage(
    events: list[tuple[bytes, dict[str, Any] | None, str | None, bool]], prompt: int
) -> Usage:
    usages = [u for _, u, _, _ in events if u is not None]
    if usages:
        return Usage(usages[-1]["prompt_tokens"], usages[-1]["completion_tokens"], False)
    texts = [t for _, _, t, _ in events if t]
    chars = sum(len(t) for t in texts)
    return Usage(prompt, max(len(texts), math.ceil(chars / 4)), estimated=True)


@given(sse_stream())
@settings(max_examples=400, deadline=None)
def test_any_split_passes_stream_unchanged(
    stream: tuple[list[tuple[bytes, dict[str, Any] | None, str | None, bool]], list[bytes]],
) -> None:
    events, chunks = stream
    watcher = SseUsage(drop_usage_event=False, prompt_estimate=42)
    assert feed(watcher, chunks) == b"".join(e[0] for e in events)
    assert watcher.usage == expected_usage(events, 42)
    assert watcher.finished


@given(sse_stream())
@settings(max_examples=400, deadline=None)
def test_any_split_drops_exactly_the_usage_event(
    stream: tuple[list[tuple[bytes, dict[str, Any] | None, str | None, bool]], list[bytes]],
) -> None:
    events, chunks = stream
    watcher = SseUsage(drop_usage_event=True, prompt_estimate=42)
    assert feed(watcher, chunks) == b"".join(raw for raw, _, _, only in events if not only)
    assert watcher.usage == expected_usage(events, 42)


@given(st.lists(st.binary(max_size=64), max_size=20), st.booleans())
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(chunks: list[bytes], drop: bool) -> None:
    watcher = SseUsage(drop_usage_event=drop, prompt_estimate=1)
    out = feed(watcher, chunks)
    if not drop:
        assert out == b"".join(chunks)
    assert watcher.finished


@pytest.mark.parametrize(("body", "given"), [
    ({"messages": [], "max_tokens": 5}, True),
    ({"messages": [], "max_completion_tokens": 5}, True),
    ({"input": "x", "max_output_tokens": 5}, True),
    ({"messages": []}, False),
    ({"messages": [], "max_tokens": -5}, False),  # not a limit: the reserve is a guess
    ({"messages": [], "max_tokens": True}, False),
    ({"input": "x", "encoding_format": "float"}, False),
])
def test_reservation_says_whether_the_request_named_its_maximum(
        body: dict[str, Any], given: bool) -> None:
    assert reserve_tokens(body).max_given is given
