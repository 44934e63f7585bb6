"""verify.py: token extraction, one case per reason code, the order of the checks, leeway edges.

Tokens are built by hand (`jws`), so a test can put anything in the header, the payload or the
signature; `token()` makes a valid one with chosen claims changed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import get_default_algorithms

from cohortgate.config import Authority
from cohortgate.keys import PrivateKey
from cohortgate.keys import generate_key
from cohortgate.keys import parse_jwks
from cohortgate.keys import public_jwk
from cohortgate.reasons import AlgorithmNotAllowed
from cohortgate.reasons import Denial
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
from cohortgate.verify import MAX_TOKEN_BYTES
from cohortgate.verify import Approval
from cohortgate.verify import Verifier
from cohortgate.verify import extract_token

NOW = 1_800_000_000
ISSUER = "https://approvals.example.gov"
AUDIENCE = "gpt-5.6"
LEEWAY = 30
MAX_LIFETIME = 30 * 86400
ALL_ALGORITHMS = ("EdDSA", "ES256", "ES384", "RS256", "PS256")
AUTHORITY = Authority(
    issuer=ISSUER,
    audience=AUDIENCE,
    jwks="keys/jwks.json",
    algorithms=ALL_ALGORITHMS,
    leeway=float(LEEWAY),
    max_lifetime=float(MAX_LIFETIME),
)

# kid -> private key; "rsa" is published without "alg" (RS256 and PS256), "rsa-ps" pinned to PS256.
PRIVATE: dict[str, PrivateKey] = {
    "ed": generate_key("EdDSA"),
    "p256": generate_key("ES256"),
    "p384": generate_key("ES384"),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa-ps": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}
ALG = {"ed": "EdDSA", "p256": "ES256", "p384": "ES384", "rsa": "RS256", "rsa-ps": "PS256"}
JWKS = [public_jwk(PRIVATE[kid], kid, ALG[kid]) for kid in PRIVATE]
del JWKS[3]["alg"]
STORE = parse_jwks(json.dumps({"keys": JWKS}).encode(), "test")
VERIFIER = Verifier(AUTHORITY, STORE)
IMPLEMENTATIONS = get_default_algorithms()

DROP: Any = object()  # as a claim or header value: leave that member out


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signer(kid: str, alg: str | None = None) -> Callable[[bytes], bytes]:
    """Sign with the private key of `kid`, by default with its own algorithm."""
    implementation, key = IMPLEMENTATIONS[alg or ALG[kid]], PRIVATE[kid]
    return lambda message: implementation.sign(message, key)


def jws(header: Any, payload: Any, sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS of exactly these parts; bytes are used as the raw JSON text."""
    h = b64(header if isinstance(header, bytes) else json.dumps(header).encode())
    p = b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return f"{h}.{p}.{b64(sign(f'{h}.{p}'.encode()))}"


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acme",
        "cohort": "preview-1",
        "jti": "f2a9c3d4e5b6",
        "iat": NOW - 60,
        "exp": NOW + 3600,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


def header(
    kid: Any = "ed", changes: Mapping[str, Any] | None = None, **more: Any
) -> dict[str, Any]:
    """The header a token signed by `kid` has, with members changed (DROP removes one)."""
    base: dict[str, Any] = {"alg": ALG.get(kid, "EdDSA"), "kid": kid, "typ": "JWT"}
    base.update(changes or {}, **more)
    return {k: v for k, v in base.items() if v is not DROP}


def token(*, kid: str = "ed", hdr: Mapping[str, Any] | None = None, **claim_changes: Any) -> str:
    """A token signed by `kid` with its algorithm: valid unless the changes make it otherwise."""
    return jws(header(kid, hdr), claims(**claim_changes), signer(kid))


def denial(tok: str, verifier: Verifier = VERIFIER, now: float = NOW) -> Denial:
    with pytest.raises(Denial) as info:
        verifier.verify(tok, now)
    return info.value


# --- extract_token ------------------------------------------------------------------------------

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln"
BIG = "a" * MAX_TOKEN_BYTES


@pytest.mark.parametrize(
    ("values", "bearer", "expected"),
    [
        ([f"Bearer {JWT}"], True, JWT),
        ([f"bearer {JWT}"], True, JWT),
        ([f"BEARER {JWT}"], True, JWT),
        ([f"bEaReR {JWT}"], True, JWT),
        ([f"Bearer    {JWT}"], True, JWT),
        ([f"  Bearer {JWT}  "], True, JWT),
        ([f"Bearer {BIG}"], True, BIG),
        ([JWT], False, JWT),
        ([f" \t{JWT} "], False, JWT),
        ([BIG], False, BIG),
        # a bare-JWT header takes the value as it is; verify() then finds it malformed
        ([f"Bearer {JWT}"], False, f"Bearer {JWT}"),
    ],
)
def test_extract_token_finds_the_jwt(values: list[str], bearer: bool, expected: str) -> None:
    assert extract_token(values, bearer=bearer) == expected


@pytest.mark.parametrize(
    ("values", "bearer", "reason", "detail"),
    [
        ([JWT, JWT], True, InvalidRequest, "more than one token header"),
        ([JWT, JWT], False, InvalidRequest, "more than one token header"),
        (["", ""], True, InvalidRequest, "more than one"),
        ([BIG + "a" * 8, "x"], True, InvalidRequest, "more than one"),  # count before size
        ([f"Bearer {BIG}a"], True, TokenTooLarge, ""),
        ([f"Basic {BIG}aa"], True, TokenTooLarge, ""),  # size before the scheme
        ([BIG + "a"], False, TokenTooLarge, ""),
        ([], True, MissingToken, ""),
        ([], False, MissingToken, ""),
        ([""], True, MissingToken, ""),
        (["   "], False, MissingToken, ""),
        (["Basic dXNlcjpwYXNz"], True, MissingToken, "no Bearer token"),
        (["Digest username=x"], True, MissingToken, "no Bearer token"),
        ([f"Bearer\t{JWT}"], True, MissingToken, "no Bearer token"),
        ([f"Bearer,{JWT}"], True, MissingToken, "no Bearer token"),
        ([f"Bearerx {JWT}"], True, MissingToken, "no Bearer token"),
        ([JWT], True, MissingToken, "no Bearer token"),
        (["Bearer"], True, MissingToken, ""),
        (["bearer   "], True, MissingToken, ""),
    ],
)
def test_extract_token_refuses(
    values: list[str], bearer: bool, reason: type[Denial], detail: str
) -> None:
    with pytest.raises(reason) as info:
        extract_token(values, bearer=bearer)
    assert type(info.value) is reason
    assert detail in info.value.detail


# --- a valid token ------------------------------------------------------------------------------


def test_valid_token_gives_the_approval() -> None:
    tok = token(
        nbf=NOW - 60,
        limits={"rpm": 10, "tpm": 5000},
        models=["gpt-5.6", "gpt-5.6-mini"],
        cnf={"api_key_sha256": "AB" * 32},
        extra_claim={"anything": [1, 2]},
    )
    assert VERIFIER.verify(tok, NOW) == Approval(
        sub="acme",
        cohort="preview-1",
        jti="f2a9c3d4e5b6",
        kid="ed",
        iss=ISSUER,
        exp=NOW + 3600,
        iat=NOW - 60,
        nbf=NOW - 60,
        limit_rpm=10,
        limit_tpm=5000,
        models=frozenset({"gpt-5.6", "gpt-5.6-mini"}),
        api_key_sha256="ab" * 32,
    )


def test_optional_claims_absent_are_none() -> None:
    approval = VERIFIER.verify(token(), NOW)
    assert (approval.nbf, approval.limit_rpm, approval.limit_tpm) == (None, None, None)
    assert (approval.models, approval.api_key_sha256) == (None, None)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        ({"rpm": 7}, (7, None)),
        ({"tpm": 900}, (None, 900)),
        ({"tpm": 1, "rpm": 2}, (2, 1)),
        ({"tpm": 2**53 - 1}, (None, 2**53 - 1)),
    ],
)
def test_limits_each_optional(limits: dict[str, int], expected: tuple[Any, Any]) -> None:
    approval = VERIFIER.verify(token(limits=limits), NOW)
    assert (approval.limit_rpm, approval.limit_tpm) == expected


@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE], ["other", AUDIENCE], [AUDIENCE, AUDIENCE]])
def test_aud_string_or_list_containing_the_audience(aud: Any) -> None:
    assert VERIFIER.verify(token(aud=aud), NOW).sub == "acme"


@pytest.mark.parametrize("kid", ["ed", "p256", "p384", "rsa", "rsa-ps"])
def test_every_key_type_verifies(kid: str) -> None:
    assert VERIFIER.verify(token(kid=kid), NOW).kid == kid


def test_unpinned_rsa_key_verifies_rs256_and_ps256() -> None:
    for alg in ("RS256", "PS256"):
        tok = jws(header("rsa", alg=alg), claims(), signer("rsa", alg))
        assert VERIFIER.verify(tok, NOW).kid == "rsa"


# --- one case per reason code ---------------------------------------------------------------------

BAD_SIGNATURE = jws(header("ed"), claims(), signer("p256", "ES256"))[:-8] + "AAAAAAAA"

REASONS: list[tuple[str, str, type[Denial], str]] = [
    ("too_large", "a" * (MAX_TOKEN_BYTES + 1), TokenTooLarge, ""),
    ("malformed_segments", "a.b", MalformedToken, "2 segments"),
    ("malformed_base64", token() + "=", MalformedToken, "base64url"),
    ("malformed_json", jws(b"{", claims(), signer("ed")), MalformedToken, "header"),
    ("malformed_not_object", jws(header(), [1], signer("ed")), MalformedToken, "payload"),
    ("alg_missing", token(hdr={"alg": DROP}), AlgorithmNotAllowed, "no alg"),
    ("alg_not_string", token(hdr={"alg": 256}), AlgorithmNotAllowed, "not a string"),
    ("alg_not_in_authority", token(hdr={"alg": "RS384"}), AlgorithmNotAllowed, "authority"),
    ("alg_not_for_key", token(hdr={"alg": "ES256"}), AlgorithmNotAllowed, "key"),
    ("kid_missing", token(hdr={"kid": DROP}), UnknownKey, "no kid"),
    ("kid_not_string", token(hdr={"kid": 7}), UnknownKey, "not a string"),
    ("kid_unknown", token(hdr={"kid": "nope"}), UnknownKey, "trust store"),
    ("bad_signature", BAD_SIGNATURE, InvalidSignature, ""),
    ("missing_iss", token(iss=DROP), MissingClaim, "iss"),
    ("missing_aud", token(aud=DROP), MissingClaim, "aud"),
    ("missing_sub", token(sub=DROP), MissingClaim, "sub"),
    ("missing_cohort", token(cohort=DROP), MissingClaim, "cohort"),
    ("missing_jti", token(jti=DROP), MissingClaim, "jti"),
    ("missing_exp", token(exp=DROP), MissingClaim, "exp"),
    ("missing_iat", token(iat=DROP), MissingClaim, "iat"),
    ("iss_empty", token(iss=""), InvalidClaim, "iss"),
    ("iss_list", token(iss=[ISSUER]), InvalidClaim, "iss"),
    ("aud_number", token(aud=5), InvalidClaim, "aud"),
    ("aud_empty_list", token(aud=[]), InvalidClaim, "aud"),
    ("aud_list_of_non_str", token(aud=[AUDIENCE, 1]), InvalidClaim, "aud"),
    ("sub_empty", token(sub=""), InvalidClaim, "sub"),
    ("sub_number", token(sub=42), InvalidClaim, "sub"),
    ("sub_null", token(sub=None), InvalidClaim, "sub"),
    ("cohort_object", token(cohort={"a": 1}), InvalidClaim, "cohort"),
    ("jti_empty", token(jti=""), InvalidClaim, "jti"),
    ("exp_string", token(exp=str(NOW + 3600)), InvalidClaim, "exp"),
    ("exp_float", token(exp=NOW + 3600.0), InvalidClaim, "exp"),
    ("exp_bool", token(exp=True), InvalidClaim, "exp"),
    ("iat_float", token(iat=NOW - 0.5), InvalidClaim, "iat"),
    ("nbf_string", token(nbf="0"), InvalidClaim, "nbf"),
    ("nbf_null", token(nbf=None), InvalidClaim, "nbf"),
    ("limits_list", token(limits=[10, 100]), InvalidClaim, "limits"),
    ("limits_empty", token(limits={}), InvalidClaim, "limits"),
    ("limits_unknown_member", token(limits={"rpm": 1, "rpd": 2}), InvalidClaim, "limits"),
    ("limits_zero", token(limits={"rpm": 0}), InvalidClaim, "limits"),
    ("limits_negative", token(limits={"tpm": -5}), InvalidClaim, "limits"),
    ("limits_float", token(limits={"rpm": 1.5}), InvalidClaim, "limits"),
    ("limits_bool", token(limits={"rpm": True}), InvalidClaim, "limits"),
    ("limits_null", token(limits=None), InvalidClaim, "limits"),
    ("limits_beyond_ijson", token(limits={"tpm": 2**53}), InvalidClaim, "limits"),
    ("models_string", token(models="gpt-5.6"), InvalidClaim, "models"),
    ("models_empty", token(models=[]), InvalidClaim, "models"),
    ("models_empty_name", token(models=["gpt-5.6", ""]), InvalidClaim, "models"),
    ("models_number", token(models=[5]), InvalidClaim, "models"),
    ("cnf_string", token(cnf="ab" * 32), InvalidClaim, "cnf"),
    ("cnf_short_hash", token(cnf={"api_key_sha256": "ab" * 31}), InvalidClaim, "cnf"),
    ("cnf_not_hex", token(cnf={"api_key_sha256": "zz" * 32}), InvalidClaim, "cnf"),
    ("cnf_other_method", token(cnf={"jkt": "abc"}), InvalidClaim, "cnf"),
    (
        "cnf_extra_member",
        token(cnf={"api_key_sha256": "ab" * 32, "jkt": "abc"}),
        InvalidClaim,
        "cnf",
    ),
    ("wrong_issuer", token(iss="https://evil.example"), InvalidIssuer, "iss"),
    ("wrong_audience", token(aud="gpt-4"), InvalidAudience, "aud"),
    ("wrong_audience_list", token(aud=["gpt-4", "gpt-5"]), InvalidAudience, "aud"),
    ("lifetime", token(iat=NOW, exp=NOW + MAX_LIFETIME + 1), LifetimeTooLong, "exp - iat"),
    ("expired", token(exp=NOW - 120), TokenExpired, "120 s in the past"),
    ("nbf_future", token(nbf=NOW + 600), TokenNotYetValid, "nbf is 600 s"),
    ("iat_future", token(iat=NOW + 600), TokenNotYetValid, "iat is 600 s"),
]


@pytest.mark.parametrize(
    ("tok", "reason", "detail"), [case[1:] for case in REASONS], ids=[case[0] for case in REASONS]
)
def test_each_reason(tok: str, reason: type[Denial], detail: str) -> None:
    found = denial(tok)
    assert type(found) is reason, found.detail
    assert detail in found.detail


def test_reason_table_covers_every_verify_reason() -> None:
    covered = {case[2] for case in REASONS}
    assert covered == {
        TokenTooLarge,
        MalformedToken,
        AlgorithmNotAllowed,
        UnknownKey,
        InvalidSignature,
        MissingClaim,
        InvalidClaim,
        InvalidIssuer,
        InvalidAudience,
        LifetimeTooLong,
        TokenExpired,
        TokenNotYetValid,
    }


@pytest.mark.parametrize("tok", [case[1] for case in REASONS], ids=[case[0] for case in REASONS])
def test_denial_detail_never_carries_token_text(tok: str) -> None:
    found = denial(tok)
    shown = f"{found.detail} {found.public_message()} {found}"
    for part in tok.split("."):
        if len(part) >= 8:
            assert part[:8] not in shown
            assert part[-8:] not in shown


# --- the order of the checks: the first failure is the reason -------------------------------------

ORDER: list[tuple[str, str, type[Denial], str]] = [
    (
        "malformed_before_alg",
        jws(b'{"alg":"none","alg":"EdDSA","kid":"ed"}', claims(), signer("ed")),
        MalformedToken,
        "",
    ),
    ("crit_before_alg", token(hdr={"crit": ["exp"], "alg": "none"}), MalformedToken, "crit"),
    (
        "bad_payload_json_before_alg",
        jws(header(alg="HS256"), b'{"sub":1,"sub":2}', signer("ed")),
        MalformedToken,
        "payload",
    ),
    ("alg_before_kid", token(hdr={"alg": "HS256", "kid": "nope"}), AlgorithmNotAllowed, ""),
    (
        "kid_before_signature",
        jws(header("nope"), claims(), signer("p256", "ES256")),
        UnknownKey,
        "",
    ),
    (
        "alg_key_fit_before_signature",
        jws(header("ed", alg="ES256"), claims(), signer("p256", "ES256")),
        AlgorithmNotAllowed,
        "key",
    ),
    (
        "signature_before_claims",
        jws(header("ed"), claims(sub=DROP, exp=NOW - 9999), signer("p256", "ES256")),
        InvalidSignature,
        "",
    ),
    ("missing_before_type", token(sub=DROP, exp="soon"), MissingClaim, "sub"),
    ("missing_in_listed_order", token(jti=DROP, iss=DROP), MissingClaim, "iss"),
    ("type_before_issuer", token(exp="soon", iss="https://evil"), InvalidClaim, "exp"),
    ("type_before_expiry", token(models=[], exp=NOW - 9999), InvalidClaim, "models"),
    ("issuer_before_audience", token(iss="x", aud="y"), InvalidIssuer, ""),
    ("issuer_before_expiry", token(iss="x", exp=NOW - 9999), InvalidIssuer, ""),
    ("audience_before_lifetime", token(aud="y", exp=NOW + MAX_LIFETIME * 2), InvalidAudience, ""),
    (
        "lifetime_before_expiry",
        token(iat=NOW - MAX_LIFETIME * 3, exp=NOW - MAX_LIFETIME),
        LifetimeTooLong,
        "",
    ),
    ("expiry_before_nbf", token(exp=NOW - 9999, nbf=NOW + 9999), TokenExpired, ""),
    ("nbf_before_iat", token(nbf=NOW + 500, iat=NOW + 900), TokenNotYetValid, "nbf"),
]


@pytest.mark.parametrize(
    ("tok", "reason", "detail"), [case[1:] for case in ORDER], ids=[case[0] for case in ORDER]
)
def test_check_order_first_failure_wins(tok: str, reason: type[Denial], detail: str) -> None:
    found = denial(tok)
    assert type(found) is reason, found.detail
    assert detail in found.detail


def test_alg_allowed_by_key_but_not_by_authority() -> None:
    eddsa_only = Verifier(
        Authority(ISSUER, AUDIENCE, "keys/jwks.json", ("EdDSA",), 30.0, float(MAX_LIFETIME)),
        STORE,
    )
    assert eddsa_only.verify(token(), NOW).kid == "ed"
    found = denial(token(kid="p256"), eddsa_only)
    assert type(found) is AlgorithmNotAllowed
    assert "authority" in found.detail


# --- leeway and lifetime boundaries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "now", "reason"),
    [
        ({"exp": NOW - LEEWAY}, NOW, TokenExpired),
        ({"exp": NOW - LEEWAY + 1}, NOW, None),
        ({"exp": NOW - LEEWAY}, NOW - 0.5, None),
        ({"exp": NOW - LEEWAY}, NOW + 0.5, TokenExpired),
        ({"nbf": NOW + LEEWAY}, NOW, None),
        ({"nbf": NOW + LEEWAY + 1}, NOW, TokenNotYetValid),
        ({"nbf": NOW + LEEWAY}, NOW - 0.5, TokenNotYetValid),
        ({"iat": NOW + LEEWAY}, NOW, None),
        ({"iat": NOW + LEEWAY + 1}, NOW, TokenNotYetValid),
        ({"iat": NOW, "exp": NOW + MAX_LIFETIME}, NOW, None),
        ({"iat": NOW, "exp": NOW + MAX_LIFETIME + 1}, NOW, LifetimeTooLong),
    ],
)
def test_boundaries(changes: dict[str, Any], now: float, reason: type[Denial] | None) -> None:
    tok = token(**changes)
    if reason is None:
        assert VERIFIER.verify(tok, now).sub == "acme"
    else:
        assert type(denial(tok, now=now)) is reason


def test_zero_leeway_is_exact() -> None:
    strict = Verifier(
        Authority(ISSUER, AUDIENCE, "keys/jwks.json", ALL_ALGORITHMS, 0.0, float(MAX_LIFETIME)),
        STORE,
    )
    assert type(denial(token(exp=NOW), strict)) is TokenExpired
    assert strict.verify(token(exp=NOW + 1), NOW).exp == NOW + 1
    assert type(denial(token(iat=NOW + 1), strict)) is TokenNotYetValid


# --- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("EdDSA", "HS512"), ("RS384",)])
def test_verifier_refuses_algorithms_it_does_not_support(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="not supported"):
        Verifier(Authority(ISSUER, AUDIENCE, "k", algorithms, 30.0, 3600.0), STORE)


def test_verifier_does_not_follow_later_store_changes() -> None:
    """The Verifier is built for one store; a reload builds a new one."""
    keys = dict(STORE.keys)
    verifier = Verifier(AUTHORITY, type(STORE)(keys=keys, source="copy", skipped=()))
    keys.clear()
    assert verifier.verify(token(), NOW).kid == "ed"



class TestVerifiedTokenCache:
    """The cache saves signature checks; it must never admit what a fresh check would not."""

    def test_a_hit_is_the_same_approval_within_the_tokens_validity(self) -> None:
        verifier = Verifier(AUTHORITY, STORE)
        tok = token(nbf=NOW - 10)
        first = verifier.verify(tok, NOW)
        assert verifier.verify(tok, NOW + 3000) is first
        with pytest.raises(TokenExpired):
            verifier.verify(tok, NOW + 3600 + LEEWAY)
        cached = Verifier(AUTHORITY, STORE)
        cached.verify(tok, NOW)
        with pytest.raises(TokenNotYetValid):  # a clock stepped back past nbf: no stale hit
            cached.verify(tok, NOW - 10 - LEEWAY - 1)

    def test_a_refused_token_is_never_cached(self) -> None:
        verifier = Verifier(AUTHORITY, STORE)
        tok = token()
        sig = tok.rsplit(".", 1)[1]
        tampered = tok[: -len(sig)] + ("B" if sig[0] != "B" else "C") + sig[1:]
        for _ in range(2):
            with pytest.raises(Denial):
                verifier.verify(tampered, NOW)
        assert tampered not in verifier._cache

    def test_the_cache_is_bounded_oldest_first(self) -> None:
        verifier = Verifier(AUTHORITY, STORE, cache_size=3)
        tokens = [token(sub=f"c{i}") for i in range(5)]
        for tok in tokens:
            verifier.verify(tok, NOW)
        assert list(verifier._cache) == tokens[2:]

    def test_a_new_trust_store_starts_empty(self) -> None:
        verifier = Verifier(AUTHORITY, STORE)
        tok = token()
        verifier.verify(tok, NOW)
        without_ed = parse_jwks(json.dumps({"keys": JWKS[1:]}).encode(), "test")
        with pytest.raises(UnknownKey):
            Verifier(AUTHORITY, without_ed).verify(tok, NOW)
