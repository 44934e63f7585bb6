"""Property tests of token extraction and verification, through the real proxy.

Whatever a client puts in the token header, the gate answers it itself: a 4xx with a reason
code from the SPEC's table (and that code's status), never a 5xx, never a forwarded request or
even an upstream connection, and exactly one decision line per request. Requests are written
on raw sockets, so the values reach the gate as generated (visible ASCII, spaces and tabs: a
CR or LF would end the header, not test the gate).
"""

from __future__ import annotations

import string
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import assume
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from cohortgate.standin import StandinThread
from cohortgate.standin import StandinUpstream
from tests.conftest import AUDIENCE
from tests.conftest import ISSUER
from tests.conftest import Gate
from tests.test_attacks import REASONS
from tests.test_attacks import Exchange
from tests.test_attacks import Keys
from tests.test_attacks import exchange
from tests.test_attacks import make_keys
from tests.test_attacks import request_bytes
from tests.test_attacks import segments
from tests.test_attacks import start_shared_gate
from tests.test_verify import DROP
from tests.test_verify import b64

PROPERTY = settings(max_examples=200, deadline=None)

HEADER_VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=300)
VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
B64URL = string.ascii_letters + string.digits + "-_"
SEGMENT = st.text(st.sampled_from(B64URL), max_size=120)
# A segment that is almost base64url: now and then a character from outside the alphabet.
NEAR_SEGMENT = st.text(st.sampled_from(B64URL) | st.sampled_from("+/=.~%* "), max_size=120)
# Canonical base64url of some bytes: what a signature looks like, so the check runs.
SIGNATURE = st.binary(max_size=600).map(b64)
NOW = int(time.time())
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)
# Values a claim might plausibly hold, right or wrong: they get past the type checks.
PLAUSIBLE = (
    st.sampled_from([ISSUER, AUDIENCE, [AUDIENCE, "other"], "preview-1", "general",
                     ["gpt-5.6"], ["gpt-5.6-mini"], {"rpm": 1}, {"tpm": 10**6}])
    | st.text(max_size=30)
    | st.integers(min_value=NOW - 2 * 86400, max_value=NOW + 40 * 86400)
)
CLAIMS = ["iss", "aud", "sub", "cohort", "jti", "exp", "iat", "nbf", "limits", "models", "cnf",
          "extra"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("authority"))


@pytest.fixture(scope="module")
def gate(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Gate]:
    """One gate for every example (this module's `gate` shadows conftest's)."""
    upstream: StandinUpstream
    with StandinThread() as upstream:
        g = start_shared_gate(tmp_path_factory.mktemp("gate"), upstream, keys)
        yield g
        g.stop()


def assert_refused_by_the_gate(ex: Exchange) -> None:
    """A listed 4xx with its own status, nothing forwarded, one deny line with that reason."""
    event(f"{ex.status} {ex.code}")  # the spread of reasons, in --hypothesis-show-statistics
    assert 400 <= ex.status < 500, ex.raw[:600]
    assert ex.code in REASONS, ex.raw[:600]
    assert REASONS[ex.code] == ex.status
    assert ex.forwarded == [] and ex.upstream_connections == 0
    assert len(ex.log_text) == 1, ex.log_text
    (line,) = ex.decisions
    assert (line["decision"], line["reason"], line["status"]) == ("deny", ex.code, ex.status)


@PROPERTY
@given(value=HEADER_VALUE)
def test_any_authorization_value_is_refused_with_a_listed_reason(gate: Gate,
                                                                  value: str) -> None:
    assert_refused_by_the_gate(exchange(gate, request_bytes([("Authorization", value)])))


@PROPERTY
@given(value=HEADER_VALUE)
def test_any_bearer_credential_is_refused_with_a_listed_reason(gate: Gate, value: str) -> None:
    assert_refused_by_the_gate(exchange(gate, request_bytes([("Authorization",
                                                              f"Bearer {value}")])))


ANY_SEGMENT = SEGMENT | NEAR_SEGMENT | SIGNATURE


@PROPERTY
@given(shape=st.sampled_from(["random", "real_header", "real_header_and_payload"]),
       first=ANY_SEGMENT, second=ANY_SEGMENT, signature=ANY_SEGMENT,
       extra=st.lists(ANY_SEGMENT, max_size=2))
def test_any_token_shaped_string_is_refused(gate: Gate, keys: Keys, shape: str, first: str,
                                            second: str, signature: str,
                                            extra: list[str]) -> None:
    """Random segments, alone or after the authority's real header (and payload), so that
    the examples reach the signature check too."""
    header, payload, _ = segments(keys.token())
    if shape != "random":
        first = header
    if shape == "real_header_and_payload":
        second = payload
    token = ".".join([first, second, signature, *extra])
    assume(token.strip())
    assert_refused_by_the_gate(exchange(gate, request_bytes(token=token)))


EDITS = st.lists(
    st.tuples(st.sampled_from(["replace", "insert", "delete", "flip", "cut", "swap"]),
              st.integers(min_value=0), VISIBLE, st.integers(min_value=0, max_value=6)),
    min_size=1, max_size=4)


def mutate(token: str, edits: list[tuple[str, int, str, int]]) -> str:
    """Apply byte edits to a token, keeping every byte visible ASCII."""
    text = token
    for kind, position, char, bit in edits:
        i = position % (len(text) + (kind == "insert")) if text or kind == "insert" else 0
        if kind == "replace" and text:
            text = text[:i] + char + text[i + 1:]
        elif kind == "insert":
            text = text[:i] + char + text[i:]
        elif kind == "delete" and text:
            text = text[:i] + text[i + 1:]
        elif kind == "flip" and text:
            flipped = chr(ord(text[i]) ^ (1 << bit))
            if "!" <= flipped <= "~":
                text = text[:i] + flipped + text[i + 1:]
        elif kind == "cut":
            text = text[:i]
        elif kind == "swap":
            parts = text.split(".")
            if len(parts) > 1:
                j = position % len(parts)
                parts[j], parts[j - 1] = parts[j - 1], parts[j]
                text = ".".join(parts)
    return text


@PROPERTY
@given(edits=EDITS)
def test_any_mutation_of_a_valid_token_is_refused(gate: Gate, keys: Keys,
                                                  edits: list[tuple[str, int, str, int]]) -> None:
    token = keys.token(sub="mutated")
    mutated = mutate(token, edits)
    assume(mutated != token and mutated.strip())
    assert_refused_by_the_gate(exchange(gate, request_bytes(token=mutated)))


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(CLAIMS), PLAUSIBLE | JSON_VALUES | st.just(DROP),
                               max_size=4))
def test_any_claims_signed_by_the_authority_are_admitted_or_refused_never_failed(
        gate: Gate, keys: Keys, changes: dict[str, Any]) -> None:
    """Real signatures over claims of any type: forwarded exactly when admitted, and a
    refusal is a listed 4xx, never a 5xx (a crash in the claim checks would be a 500)."""
    changes.setdefault("sub", f"claims-{uuid.uuid4().hex[:8]}")
    ex = exchange(gate, request_bytes(token=keys.token(**changes)))
    if ex.status == 200:
        event("200 approved")
        assert len(ex.forwarded) == 1 and ex.forwarded[0].header("authorization") is None
        (line,) = ex.decisions
        assert (line["decision"], line["reason"]) == ("allow", "approved")
    else:
        assert_refused_by_the_gate(ex)
