"""Who may do what now: revocations, API-key binding, release phases and approved models.

Pure functions over verified approvals; each refusal is a Denial from reasons.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from cohortgate.config import LimitSettings
from cohortgate.config import Phase
from cohortgate.config import Quota
from cohortgate.keys import DuplicateMemberError
from cohortgate.keys import loads_strict
from cohortgate.reasons import BindingMismatch
from cohortgate.reasons import CohortNotAdmitted
from cohortgate.reasons import CustomerRevoked
from cohortgate.reasons import DuplicateJsonMember
from cohortgate.reasons import InvalidRequest
from cohortgate.reasons import ModelNotApproved
from cohortgate.reasons import TokenRevoked
from cohortgate.verify import Approval


@dataclass(frozen=True, slots=True)
class Revocations:
    """The revoked token ids and customers, as loaded from the revocation file."""

    jti: frozenset[str] = frozenset()
    customers: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.jti) + len(self.customers)


NO_REVOCATIONS = Revocations()


def parse_revocations(data: bytes, source: str) -> Revocations:
    """The revocation file's JSON; ValueError naming the source and the problem."""
    try:
        doc = loads_strict(data)
    except ValueError as e:
        raise ValueError(f"{source}: not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object with 'jti' and 'customers'")
    unknown = set(doc) - {"jti", "customers"}
    if unknown:
        raise ValueError(f"{source}: unknown key {sorted(unknown)[0]!r}")
    sets: dict[str, frozenset[str]] = {}
    for section in ("jti", "customers"):
        entries = doc.get(section, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{source}: {section}: expected an object of id -> {{reason, at}}")
        for ident, entry in entries.items():
            if not isinstance(entry, dict):
                raise ValueError(f"{source}: {section}.{ident}: expected {{reason, at}}")
        sets[section] = frozenset(entries)
    return Revocations(jti=sets["jti"], customers=sets["customers"])


def load_revocations(path: Path) -> Revocations:
    """A missing file revokes nothing; an unreadable or malformed one is a ValueError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return NO_REVOCATIONS
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from e
    if not data.strip():
        return NO_REVOCATIONS
    return parse_revocations(data, str(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rfc3339_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def add_revocation(path: Path, *, jti: str | None, customer: str | None, reason: str,
                   at: str | None = None) -> bool:
    """Record a revocation in the file, atomically and under a lock.

    Returns False when it was already revoked (the file is left as it was).
    """
    if (jti is None) == (customer is None):
        raise ValueError("give exactly one of a jti or a customer")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            doc = loads_strict(path.read_bytes() or b"{}")
        except FileNotFoundError:
            doc = {}
        parse_revocations(json.dumps(doc).encode(), str(path))  # refuse to extend a bad file
        section, ident = ("jti", jti) if jti is not None else ("customers", customer)
        assert ident is not None
        entries = doc.setdefault(section, {})
        if ident in entries:
            return False
        entries[ident] = {"reason": reason, "at": at or rfc3339_utc()}
        doc.setdefault("jti", {})
        doc.setdefault("customers", {})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    return True


def check_revocation(approval: Approval, revoked: Revocations) -> None:
    if approval.jti in revoked.jti:
        raise TokenRevoked()
    if approval.sub in revoked.customers:
        raise CustomerRevoked()


def api_key_from(authorization: Sequence[str]) -> str | None:
    """The customer's own API key from `Authorization: Bearer KEY`, or None."""
    if len(authorization) != 1:
        return None
    scheme, _, key = authorization[0].strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


def check_binding(approval: Approval, authorization: Sequence[str], *, bearer: bool) -> None:
    """A `cnf.api_key_sha256` approval must arrive beside the API key it names.

    `bearer` is true when the approval itself travels in Authorization: then there is no
    room for the API key, and a bound token is refused.
    """
    expected = approval.api_key_sha256
    if expected is None:
        return
    if bearer:
        raise BindingMismatch("a bound token must travel in its own header, not Authorization")
    key = api_key_from(authorization)
    if key is None:
        raise BindingMismatch("no API key in Authorization")
    actual = hashlib.sha256(key.encode()).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise BindingMismatch()


def admit_cohort(phase: Phase | None, approval: Approval) -> None:
    if phase is None:
        raise CohortNotAdmitted("no release phase applies now")
    if not phase.admits(approval.cohort):
        raise CohortNotAdmitted(f"phase {phase.name!r} does not admit this cohort")


def parse_json_body(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object, None when it is empty.

    Duplicate member names are refused: the gate and the upstream must read the same values.
    """
    if not body.strip():
        return None
    try:
        doc = loads_strict(body)
    except DuplicateMemberError as e:
        raise DuplicateJsonMember() from e
    except ValueError as e:
        raise InvalidRequest("the body is not valid UTF-8 JSON") from e
    if not isinstance(doc, dict):
        raise InvalidRequest("the body is not a JSON object")
    return doc


def check_model(approval: Approval, body: dict[str, Any] | None) -> None:
    """An approval with `models` covers only those; a body that names no model is refused."""
    if approval.models is None or body is None:
        return
    model = body.get("model")
    if not isinstance(model, str):
        raise ModelNotApproved("the request names no model")
    if model not in approval.models:
        raise ModelNotApproved(f"model {model[:80]!r} is not covered")


def limits_for(approval: Approval, limits: LimitSettings) -> Quota:
    """The approval's own limits where it names them, else the default; never above the max."""
    rpm = approval.limit_rpm if approval.limit_rpm is not None else limits.default.rpm
    tpm = approval.limit_tpm if approval.limit_tpm is not None else limits.default.tpm
    return Quota(rpm=min(rpm, limits.max.rpm), tpm=min(tpm, limits.max.tpm))
