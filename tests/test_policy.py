"""policy.py: revocation file, API-key binding, phases and models, request bodies."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from cohortgate.config import Phase
from cohortgate.policy import Revocations
from cohortgate.policy import add_revocation
from cohortgate.policy import admit_cohort
from cohortgate.policy import api_key_from
from cohortgate.policy import check_binding
from cohortgate.policy import check_model
from cohortgate.policy import check_revocation
from cohortgate.policy import load_revocations
from cohortgate.policy import parse_json_body
from cohortgate.policy import parse_revocations
from cohortgate.reasons import BindingMismatch
from cohortgate.reasons import CohortNotAdmitted
from cohortgate.reasons import CustomerRevoked
from cohortgate.reasons import Denial
from cohortgate.reasons import DuplicateJsonMember
from cohortgate.reasons import InvalidRequest
from cohortgate.reasons import ModelNotApproved
from cohortgate.reasons import TokenRevoked
from cohortgate.verify import Approval


def approval(**kw: Any) -> Approval:
    fields: dict[str, Any] = dict(sub="acme", cohort="preview-1", jti="j1", kid="k", iss="i",
                                  exp=2, iat=1, nbf=None, limit_rpm=None, limit_tpm=None,
                                  models=None, api_key_sha256=None)
    fields.update(kw)
    return Approval(**fields)


ENTRY = {"reason": "r", "at": "2026-11-27T00:00:00Z"}


@pytest.mark.parametrize(("doc", "jti", "customers"), [
    ({}, set(), set()),
    ({"jti": {"a": ENTRY}}, {"a"}, set()),
    ({"jti": {"a": ENTRY}, "customers": {"acme": ENTRY, "Acme": ENTRY}}, {"a"}, {"acme", "Acme"}),
])
def test_parse_revocations(doc: dict[str, Any], jti: set[str], customers: set[str]) -> None:
    revoked = parse_revocations(json.dumps(doc).encode(), "r.json")
    assert revoked.jti == jti and revoked.customers == customers


@pytest.mark.parametrize(("data", "why"), [
    (b"[]", "expected a JSON object"),
    (b'{"jti": []}', "jti"),
    (b'{"jti": {"a": "yes"}}', "jti.a"),
    (b'{"tokens": {}}', "unknown key"),
    (b'{"jti": {"a": {}}, "jti": {}}', "not valid JSON"),
    (b"{not json", "not valid JSON"),
])
def test_parse_revocations_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=r"r\.json") as e:
        parse_revocations(data, "r.json")
    assert why in str(e.value)


def test_missing_or_empty_revocation_file_revokes_nothing(tmp_path: Path) -> None:
    assert len(load_revocations(tmp_path / "absent.json")) == 0
    (tmp_path / "empty.json").write_text("  \n")
    assert len(load_revocations(tmp_path / "empty.json")) == 0


def test_add_revocation_is_atomic_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "revocations.json"
    assert add_revocation(path, jti="j1", customer=None, reason="leaked")
    assert not add_revocation(path, jti="j1", customer=None, reason="again")
    assert add_revocation(path, jti=None, customer="acme", reason="contract ended")
    doc = json.loads(path.read_text())
    assert doc["jti"]["j1"]["reason"] == "leaked"
    assert doc["customers"]["acme"]["at"].endswith("Z")
    assert load_revocations(path) == Revocations(frozenset({"j1"}), frozenset({"acme"}))


def test_concurrent_revocations_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    threads = [threading.Thread(target=add_revocation, args=(path,),
                                kwargs={"jti": f"j{i}", "customer": None, "reason": "r"})
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(load_revocations(path).jti) == 20


def test_add_revocation_refuses_to_extend_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "revocations.json"
    path.write_text('{"jti": "oops"}')
    with pytest.raises(ValueError, match="jti"):
        add_revocation(path, jti="j", customer=None, reason="r")
    assert path.read_text() == '{"jti": "oops"}'


@pytest.mark.parametrize(("revoked", "expected"), [
    (Revocations(frozenset({"j1"}), frozenset()), TokenRevoked),
    (Revocations(frozenset(), frozenset({"acme"})), CustomerRevoked),
    (Revocations(frozenset({"j1"}), frozenset({"acme"})), TokenRevoked),  # jti is checked first
])
def test_check_revocation(revoked: Revocations, expected: type[Denial]) -> None:
    with pytest.raises(expected):
        check_revocation(approval(), revoked)


def test_revocation_is_byte_exact() -> None:
    check_revocation(approval(sub="Acme"), Revocations(frozenset(), frozenset({"acme"})))


KEY = "sk-live-123"
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


@pytest.mark.parametrize(("authorization", "key"), [
    ([f"Bearer {KEY}"], KEY), ([f"bearer   {KEY} "], KEY), ([], None),
    ([f"Basic {KEY}"], None), (["Bearer "], None), ([f"Bearer {KEY}", f"Bearer {KEY}"], None),
])
def test_api_key_from(authorization: list[str], key: str | None) -> None:
    assert api_key_from(authorization) == key


@pytest.mark.parametrize(("authorization", "bearer", "ok"), [
    ([f"Bearer {KEY}"], False, True),
    ([f"Bearer {KEY}x"], False, False),
    ([], False, False),
    ([f"Bearer {KEY}"], True, False),  # the approval itself is in Authorization
])
def test_check_binding(authorization: list[str], bearer: bool, ok: bool) -> None:
    bound = approval(api_key_sha256=DIGEST)
    if ok:
        check_binding(bound, authorization, bearer=bearer)
    else:
        with pytest.raises(BindingMismatch):
            check_binding(bound, authorization, bearer=bearer)
    check_binding(approval(), [], bearer=True)  # unbound approvals need nothing


def test_admit_cohort() -> None:
    preview = Phase("preview", None, frozenset({"preview-1"}), None)
    admit_cohort(preview, approval())
    admit_cohort(Phase("general", None, frozenset({"*"}), None), approval(cohort="x"))
    for phase, cohort in ((preview, "Preview-1"), (None, "preview-1")):
        with pytest.raises(CohortNotAdmitted):
            admit_cohort(phase, approval(cohort=cohort))


@pytest.mark.parametrize(("body", "expected"), [
    (b"", None),
    (b"  ", None),
    (b'{"model": "m"}', {"model": "m"}),
])
def test_parse_json_body(body: bytes, expected: Any) -> None:
    assert parse_json_body(body) == expected


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"model": "a", "model": "b"}', DuplicateJsonMember),
    (b'{"x": {"k": 1, "k": 2}}', DuplicateJsonMember),
    (b"[1]", InvalidRequest),
    (b"{", InvalidRequest),
    (b'{"n": NaN}', InvalidRequest),
    ('{"model": "m"}'.encode("utf-16"), InvalidRequest),
    (b"[" * 100_000, InvalidRequest),
])
def test_parse_json_body_refuses(body: bytes, expected: type[Denial]) -> None:
    with pytest.raises(expected):
        parse_json_body(body)


def test_check_model() -> None:
    restricted = approval(models=frozenset({"gpt-5.6"}))
    check_model(restricted, {"model": "gpt-5.6"})
    check_model(restricted, None)  # a GET names no model and needs none
    check_model(approval(), {"model": "anything"})
    for body in ({"model": "gpt-5.6-mini"}, {}, {"model": ["gpt-5.6"]}):
        with pytest.raises(ModelNotApproved):
            check_model(restricted, body)
