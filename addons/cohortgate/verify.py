"""Approval token extraction and verification: a header value in, an `Approval` or a Denial out.

`extract_token` finds the one JWT in the configured header; `Verifier.verify` checks it in the
order the contract fixes (syntax and JSON, alg, kid, signature, required claims, claim types,
iss, aud, lifetime, exp, nbf, iat), raising the reasons.py class of the first failure. The
header's own `jku`/`x5u`/`jwk`/`x5c` are never used, so a token cannot choose its own key.

A Denial's detail never carries token text, a signature or a key: only claim names and numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jwt.algorithms import Algorithm
from jwt.algorithms import get_default_algorithms

from cohortgate.config import Authority
from cohortgate.keys import SUPPORTED_ALGORITHMS
from cohortgate.keys import TrustStore
from cohortgate.keys import b64url_decode
from cohortgate.keys import loads_strict
from cohortgate.reasons import AlgorithmNotAllowed
from cohortgate.reasons import InvalidAudience
from cohortgate.reasons import InvalidClaim
from cohortgate.reasons import InvalidIssuer
from cohortgate.reasons import InvalidRequest
from cohortgate.reasons import InvalidSignature
from cohortgate.reasons import LifetimeTooLong
from cohortgate.reasons import MalformedToken
from cohortgate.reasons import MissingClaim
from cohortgate.reasons import MissingToken
from cohortgate.reasons import TokenExpired
from cohortgate.reasons import TokenNotYetValid
from cohortgate.reasons import TokenTooLarge
from cohortgate.reasons import UnknownKey

MAX_TOKEN_BYTES = 8192
CACHE_SIZE = 20_000  # verified tokens remembered; ~1 KB each
MAX_JSON_DEPTH = 16  # an approval nests 3 levels (claims, limits/cnf/models); JOSE headers 2
_BEARER_PREFIX = len("Bearer ")

REQUIRED_CLAIMS = ("iss", "aud", "sub", "cohort", "jti", "exp", "iat")
# Header members that change how the signature is computed; we implement neither, so refuse.
_REFUSED_HEADERS = ("crit", "b64")
_LIMIT_NAMES = frozenset({"rpm", "tpm"})
# I-JSON (RFC 7493): larger integers are not interoperable; the limiter computes in floats.
_MAX_SAFE_INTEGER = 2**53 - 1
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_ABSENT: Any = object()  # an optional claim that is not there (JSON null is not "absent")


@dataclass(frozen=True, slots=True)
class Approval:
    """The verified claims of an approval token; `sub` is exactly as signed."""

    sub: str
    cohort: str
    jti: str
    kid: str
    iss: str
    exp: int
    iat: int
    nbf: int | None
    limit_rpm: int | None
    limit_tpm: int | None
    models: frozenset[str] | None
    api_key_sha256: str | None  # lowercase hex


def extract_token(values: Sequence[str], *, bearer: bool) -> str:
    """The JWT from every value of the token header, as received.

    `bearer`: the header is Authorization and holds "Bearer <jwt>"; otherwise it holds the JWT.
    """
    if len(values) > 1:
        raise InvalidRequest("more than one token header")
    if not values:
        raise MissingToken()
    value = values[0]
    if len(value) > MAX_TOKEN_BYTES + (_BEARER_PREFIX if bearer else 0):
        raise TokenTooLarge()
    value = value.strip()
    if not value:
        raise MissingToken()
    if not bearer:
        return value
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        raise MissingToken("Authorization carries no Bearer token")
    token = token.lstrip(" ")
    if not token:
        raise MissingToken("Authorization carries Bearer without a token")
    return token


class Verifier:
    """Verifies approval tokens for one authority against one trust store.

    Everything that does not depend on the token is worked out here, once.
    """

    __slots__ = ("_allowed", "_audience", "_cache", "_cache_size", "_issuer", "_keys", "_leeway",
                 "_max_lifetime")

    def __init__(self, authority: Authority, store: TrustStore, *,
                 cache_size: int = CACHE_SIZE) -> None:
        unsupported = set(authority.algorithms) - SUPPORTED_ALGORITHMS
        if unsupported:
            # config refuses these already; a second line of defence against none/HS*.
            raise ValueError(f"algorithms not supported: {', '.join(sorted(unsupported))}")
        implementations = get_default_algorithms()
        self._allowed = frozenset(authority.algorithms)
        self._issuer = authority.issuer
        self._audience = authority.audience
        self._leeway = authority.leeway
        self._max_lifetime = authority.max_lifetime
        # kid -> alg -> (implementation, public key): steps 3, 4 and 5 are two dict lookups.
        self._keys: dict[str, dict[str, tuple[Algorithm, Any]]] = {
            kid: {alg: (implementations[alg], trusted.key) for alg in trusted.algorithms}
            for kid, trusted in store.keys.items()
        }
        # token -> (approval, valid from, valid until): a signature is checked once per token,
        # not once per request. A Verifier lives as long as one trust store and one config,
        # so a key removed from the store takes its tokens' entries with it.
        self._cache: dict[str, tuple[Approval, float, float]] = {}
        self._cache_size = cache_size

    def verify(self, token: str, now: float) -> Approval:
        """The Approval in `token` at time `now` (epoch seconds), or the first failure's Denial.

        Revocation is not a property of the token and is checked by the caller every time.
        """
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] <= now < hit[2]:
                return hit[0]
            del self._cache[token]  # out of its validity: verify again, which says why
        approval = self._verify(token, now)
        cache = self._cache
        if len(cache) >= self._cache_size:
            del cache[next(iter(cache))]  # the oldest entry
        leeway = self._leeway
        valid_from = max(approval.iat, approval.nbf or approval.iat) - leeway
        cache[token] = (approval, valid_from, approval.exp + leeway)
        return approval

    def _verify(self, token: str, now: float) -> Approval:
        header, claims, signing_input, signature = _parse_compact(token)

        alg = header.get("alg")
        if type(alg) is not str:
            raise AlgorithmNotAllowed(
                "the header has no alg" if alg is None else "alg is not a string"
            )
        if alg not in self._allowed:
            raise AlgorithmNotAllowed("alg is not in authority.algorithms")

        kid = header.get("kid")
        if type(kid) is not str:
            raise UnknownKey("the header has no kid" if kid is None else "kid is not a string")
        key_algorithms = self._keys.get(kid)
        if key_algorithms is None:
            raise UnknownKey("kid names no key in the trust store")

        entry = key_algorithms.get(alg)
        if entry is None:
            raise AlgorithmNotAllowed("alg does not fit the key that kid names")
        implementation, key = entry
        try:
            valid = implementation.verify(signing_input, key, signature)
        except ValueError:
            valid = False
        if not valid:
            raise InvalidSignature()

        # From here on the claims are the authority's own words.
        for name in REQUIRED_CLAIMS:
            if name not in claims:
                raise MissingClaim(name)
        approval = _typed_approval(claims, kid)
        aud = claims["aud"]

        if approval.iss != self._issuer:
            raise InvalidIssuer("iss is not authority.issuer")
        if not (aud == self._audience if type(aud) is str else self._audience in aud):
            raise InvalidAudience("aud does not name authority.audience")
        # The claims are unbounded ints: compare them with floats (exact in Python), but
        # subtract only ints, as a huge int minus a float overflows.
        exp, iat, nbf = approval.exp, approval.iat, approval.nbf
        if exp - iat > self._max_lifetime:
            raise LifetimeTooLong(
                f"exp - iat is {_seconds(exp - iat)}; the maximum is {_seconds(self._max_lifetime)}"
            )
        if exp <= now - self._leeway:
            raise TokenExpired(f"exp is {_seconds(int(now) - exp)} in the past")
        if nbf is not None and nbf > now + self._leeway:
            raise TokenNotYetValid(f"nbf is {_seconds(nbf - int(now))} in the future")
        if iat > now + self._leeway:
            raise TokenNotYetValid(f"iat is {_seconds(iat - int(now))} in the future")
        return approval


def _parse_compact(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, claims, signing input, signature) of a compact JWS; MalformedToken otherwise.

    The claims are parsed here but trusted only once the signature verifies.
    """
    if len(token) > MAX_TOKEN_BYTES:
        raise TokenTooLarge()
    segments = token.split(".")
    if len(segments) != 3:
        raise MalformedToken(f"{len(segments)} segments; a compact JWS has 3")
    header_b64, claims_b64, signature_b64 = segments
    header = _json_object(header_b64, "header")
    claims = _json_object(claims_b64, "payload")
    signature = _decode_segment(signature_b64, "signature")
    for name in _REFUSED_HEADERS:
        if name in header:
            raise MalformedToken(f"the header carries {name!r}, which is not supported")
    # The alphabet check above makes the first two segments ASCII.
    signing_input = token[: len(header_b64) + 1 + len(claims_b64)].encode("ascii")
    return header, claims, signing_input, signature


def _decode_segment(segment: str, what: str) -> bytes:
    if not segment:
        raise MalformedToken(f"the {what} is empty")
    try:
        return b64url_decode(segment)
    except ValueError:
        raise MalformedToken(f"the {what} is not unpadded canonical base64url") from None


def _json_object(segment: str, what: str) -> dict[str, Any]:
    raw = _decode_segment(segment, what)
    try:
        value = loads_strict(raw)
    except ValueError:  # bad UTF-8, bad JSON, duplicate members, NaN, nesting too deep
        raise MalformedToken(f"the {what} is not strict UTF-8 JSON") from None
    if type(value) is not dict:
        raise MalformedToken(f"the {what} is not a JSON object")
    if _too_deep(value):
        raise MalformedToken(f"the {what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _too_deep(value: dict[str, Any]) -> bool:
    """Whether JSON nests past MAX_JSON_DEPTH. The parser's own limit is Python's recursion
    limit, which differs between versions (3.13 parses 2500 levels); ours does not."""
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) is dict or type(child) is list
        ]
        if not level:
            return False
    return True


def _text(value: object) -> bool:
    """A non-empty string that can be encoded as UTF-8 (JSON allows lone surrogates)."""
    if type(value) is not str or not value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _typed_approval(claims: dict[str, Any], kid: str) -> Approval:
    """The claims as an Approval, or InvalidClaim(name) for the first of the wrong type."""
    iss, aud, sub, cohort, jti = (claims[n] for n in ("iss", "aud", "sub", "cohort", "jti"))
    if not _text(iss):
        raise InvalidClaim("iss")
    if not (type(aud) is str or (type(aud) is list and aud and all(type(a) is str for a in aud))):
        raise InvalidClaim("aud")
    for name, value in (("sub", sub), ("cohort", cohort), ("jti", jti)):
        if not _text(value):
            raise InvalidClaim(name)
    exp, iat = claims["exp"], claims["iat"]
    nbf = claims.get("nbf", _ABSENT)
    # type() rather than isinstance(): bool is an int subclass, and true is not a time.
    if type(exp) is not int:
        raise InvalidClaim("exp")
    if type(iat) is not int:
        raise InvalidClaim("iat")
    if nbf is not _ABSENT and type(nbf) is not int:
        raise InvalidClaim("nbf")
    limit_rpm, limit_tpm = _limits(claims.get("limits", _ABSENT))
    return Approval(
        sub=sub,
        cohort=cohort,
        jti=jti,
        kid=kid,
        iss=iss,
        exp=exp,
        iat=iat,
        nbf=None if nbf is _ABSENT else nbf,
        limit_rpm=limit_rpm,
        limit_tpm=limit_tpm,
        models=_models(claims.get("models", _ABSENT)),
        api_key_sha256=_api_key_sha256(claims.get("cnf", _ABSENT)),
    )


def _limits(limits: object) -> tuple[int | None, int | None]:
    if limits is _ABSENT:
        return None, None
    if (
        type(limits) is not dict
        or not limits
        or not limits.keys() <= _LIMIT_NAMES
        or not all(type(v) is int and 0 < v <= _MAX_SAFE_INTEGER for v in limits.values())
    ):
        raise InvalidClaim("limits")
    return limits.get("rpm"), limits.get("tpm")


def _models(models: object) -> frozenset[str] | None:
    if models is _ABSENT:
        return None
    if type(models) is not list or not models or not all(_text(m) for m in models):
        raise InvalidClaim("models")
    return frozenset(models)


def _api_key_sha256(cnf: object) -> str | None:
    if cnf is _ABSENT:
        return None
    # Only the one confirmation method we enforce: an unknown one must not be silently dropped.
    if type(cnf) is not dict or cnf.keys() != {"api_key_sha256"}:
        raise InvalidClaim("cnf")
    digest = cnf["api_key_sha256"]
    if type(digest) is not str or not _SHA256_HEX.fullmatch(digest):
        raise InvalidClaim("cnf")
    return digest.lower()


def _seconds(value: float) -> str:
    """A duration for a Denial detail; a token's absurd numbers are not echoed in full."""
    return f"{value:.0f} s" if abs(value) < 1e12 else "more than 10^12 s"
