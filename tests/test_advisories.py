"""Regression tests for known JWT attacks, one per attack, against `Verifier.verify`.

Named after the advisory where one applies, as pyjwt's own tests/test_advisory.py does:
CVE-2015-9235 (alg none, HMAC with the public key), CVE-2017-11424 (PKCS1 PEM as an HMAC
secret), CVE-2022-29217 / GHSA-ffqj-6fqr-9h24 (pyjwt key confusion), CVE-2018-0114 (a key
embedded in the token trusted), CVE-2022-21449 (ECDSA "psychic signatures"), CVE-2024-53861 /
GHSA-75c5-xw7c-p5pm (pyjwt partial issuer match), CVE-2026-32597 / GHSA-752w-5fwx-jx9f (pyjwt
ignored `crit`), CVE-2025-45768 (weak RSA keys). The rest are attacks without a number:
parser differentials (duplicate members, JSON encodings), type confusion, base64 malleability.
"""

from __future__ import annotations

import base64
import builtins
import datetime
import hmac
import json
import os
import socket
import unicodedata
from collections.abc import Callable
from typing import Any
from typing import NoReturn

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from cohortgate.config import Authority
from cohortgate.keys import generate_key
from cohortgate.keys import parse_jwks
from cohortgate.keys import public_jwk
from cohortgate.reasons import AlgorithmNotAllowed
from cohortgate.reasons import Denial
from cohortgate.reasons import InvalidAudience
from cohortgate.reasons import InvalidClaim
from cohortgate.reasons import InvalidIssuer
from cohortgate.reasons import InvalidSignature
from cohortgate.reasons import LifetimeTooLong
from cohortgate.reasons import MalformedToken
from cohortgate.reasons import TokenExpired
from cohortgate.reasons import TokenNotYetValid
from cohortgate.reasons import TokenTooLarge
from cohortgate.reasons import UnknownKey
from cohortgate.verify import MAX_TOKEN_BYTES
from cohortgate.verify import Verifier
from tests.test_verify import AUDIENCE
from tests.test_verify import AUTHORITY
from tests.test_verify import DROP
from tests.test_verify import ISSUER
from tests.test_verify import JWKS
from tests.test_verify import NOW
from tests.test_verify import PRIVATE
from tests.test_verify import STORE
from tests.test_verify import VERIFIER
from tests.test_verify import b64
from tests.test_verify import claims
from tests.test_verify import header
from tests.test_verify import jws
from tests.test_verify import signer
from tests.test_verify import token

KIDS = list(PRIVATE)
ATTACKER = generate_key("EdDSA")


def refused(tok: str, verifier: Verifier = VERIFIER) -> Denial:
    with pytest.raises(Denial) as info:
        verifier.verify(tok, NOW)
    return info.value


def assert_refused(tok: str, reason: type[Denial], verifier: Verifier = VERIFIER) -> None:
    found = refused(tok, verifier)
    assert type(found) is reason, f"{found.code}: {found.detail}"


def sign_with(key: Any, alg: str) -> Callable[[bytes], bytes]:
    from jwt.algorithms import get_default_algorithms

    implementation = get_default_algorithms()[alg]
    return lambda message: implementation.sign(message, key)


def hmac_signer(secret: bytes, digest: str = "sha256") -> Callable[[bytes], bytes]:
    return lambda message: hmac.new(secret, message, digest).digest()


def replace_segment(tok: str, index: int, new: str) -> str:
    parts = tok.split(".")
    parts[index] = new
    return ".".join(parts)


def signature_bytes(tok: str) -> bytes:
    s = tok.rsplit(".", 1)[1]
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# --- algorithm confusion --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("kid", ["ed", "rsa"])
def test_cve_2015_9235_alg_none_any_case_refused(alg: str, kid: str) -> None:
    """An unsigned token: with an empty signature it is malformed, with any other refused."""
    unsigned = jws(header(kid, alg=alg), claims(), lambda message: b"")
    assert unsigned.endswith(".")
    assert_refused(unsigned, MalformedToken)
    assert_refused(jws(header(kid, alg=alg), claims(), lambda message: b"x"), AlgorithmNotAllowed)
    assert_refused(jws(header(kid, alg=alg), claims(), signer(kid)), AlgorithmNotAllowed)


def test_cve_2015_9235_alg_none_cannot_be_configured() -> None:
    with pytest.raises(ValueError, match="none"):
        Verifier(Authority(ISSUER, AUDIENCE, "k", ("EdDSA", "none"), 30.0, 3600.0), STORE)


def public_key_encodings(kid: str) -> dict[str, bytes]:
    """Every form of `kid`'s public key an attacker might use as an HMAC secret."""
    jwk = next(j for j in JWKS if j["kid"] == kid)
    return key_spellings(PRIVATE[kid].public_key(), jwk, json.dumps({"keys": JWKS}).encode())


def key_spellings(public: Any, jwk: dict[str, Any], jwks: bytes) -> dict[str, bytes]:
    """Every spelling of a public key (with its JWK and the trust store's JWKS document) that
    an attacker might use as an HMAC secret."""
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forms = {
        "pem": pem,
        "pem_crlf": pem.replace(b"\n", b"\r\n"),
        "pem_no_final_newline": pem.rstrip(b"\n"),
        "pem_trailing_spaces": pem.replace(b"\n", b" \n"),
        "pem_body_only": b"".join(pem.splitlines()[1:-1]),
        "der": public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "openssh": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "jwk_json": json.dumps(jwk).encode(),
        "jwk_json_compact_sorted": json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode(),
        "jwks_json": jwks,
    }
    if isinstance(public, rsa.RSAPublicKey):
        # CVE-2017-11424: "-----BEGIN RSA PUBLIC KEY-----" slipped past pyjwt's PEM blocklist
        forms["pkcs1_pem"] = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
        )
    elif isinstance(public, ed25519.Ed25519PublicKey):
        forms["raw"] = public.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    elif isinstance(public, ec.EllipticCurvePublicKey):
        forms["x962_point"] = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return forms


KEY_CONFUSION = [
    (kid, form, secret) for kid in KIDS for form, secret in public_key_encodings(kid).items()
]


@pytest.mark.parametrize(
    ("kid", "secret"),
    [(kid, secret) for kid, _, secret in KEY_CONFUSION],
    ids=[f"{kid}-{form}" for kid, form, _ in KEY_CONFUSION],
)
@pytest.mark.parametrize(
    ("alg", "digest"), [("HS256", "sha256"), ("HS384", "sha384"), ("HS512", "sha512")]
)
def test_cve_2022_29217_hs256_signed_with_public_key_refused(
    kid: str, secret: bytes, alg: str, digest: str
) -> None:
    """CVE-2015-9235 / CVE-2017-11424 / GHSA-ffqj-6fqr-9h24: HMAC keyed with the public key."""
    forged = jws(header(kid, alg=alg), claims(sub="attacker"), hmac_signer(secret, digest))
    assert_refused(forged, AlgorithmNotAllowed)


@pytest.mark.parametrize(
    ("kid", "alg", "signed_by", "signed_alg"),
    [
        ("ed", "ES256", "p256", "ES256"),
        ("ed", "RS256", "rsa", "RS256"),
        ("p256", "ES384", "p384", "ES384"),
        ("p384", "ES256", "p256", "ES256"),
        ("p256", "EdDSA", "ed", "EdDSA"),
        ("p256", "PS256", "rsa", "PS256"),
        ("rsa", "EdDSA", "ed", "EdDSA"),
        ("rsa", "ES256", "p256", "ES256"),
        ("rsa-ps", "RS256", "rsa-ps", "RS256"),  # the JWK pins PS256: PKCS#1 v1.5 refused
        ("rsa-ps", "EdDSA", "ed", "EdDSA"),
    ],
)
def test_alg_swapped_to_other_family(kid: str, alg: str, signed_by: str, signed_alg: str) -> None:
    """The header names a key of one type and an algorithm of another."""
    forged = jws(header(kid, alg=alg), claims(), signer(signed_by, signed_alg))
    found = refused(forged)
    assert type(found) is AlgorithmNotAllowed
    assert "key" in found.detail


@pytest.mark.parametrize(
    ("kid", "alg"),
    [("ed", "eddsa"), ("ed", "EDDSA"), ("ed", "Ed25519"), ("p256", "es256"), ("rsa", "rs256")],
)
def test_alg_case_variants_refused(kid: str, alg: str) -> None:
    forged = jws(header(kid, alg=alg), claims(), signer(kid))
    assert_refused(forged, AlgorithmNotAllowed)


@pytest.mark.parametrize(
    "alg", [DROP, None, 256, True, ["EdDSA"], {"EdDSA": 1}, "", " EdDSA", "EdDSA\u0000", "EdDSA "]
)
def test_missing_or_non_string_alg(alg: Any) -> None:
    forged = jws(header("ed", alg=alg), claims(), signer("ed"))
    assert_refused(forged, AlgorithmNotAllowed)


# --- kid: a lookup, never a path or a query -------------------------------------------------------


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../etc/passwd",
        "../keys/ed",
        "/dev/null",
        "ed/../ed",
        "./ed",
        "' OR '1'='1",
        "ed' --",
        "ed\u0000",
        "ED",
        "Ed",
        "ed ",
        " ed",
        "ed\n",
        "",
        "%65d",
        "\uff45\uff44",  # fullwidth "ed"
        None,
        0,
        1.5,
        True,
        ["ed"],
        {"kid": "ed"},
    ],
)
def test_kid_path_traversal_and_sql_unknown_key(kid: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any kid but an exact trust-store name is unknown, and no file is opened for it."""
    forged = jws(header("ed", {"kid": kid}), claims(), signer("ed"))

    def no_files(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("verify() opened a file")

    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "open", no_files)
    assert_refused(forged, UnknownKey)


def test_signature_by_another_trusted_key_refused() -> None:
    """kid names one trusted key, another (also trusted, same algorithm) signed."""
    other_p256 = generate_key("ES256")
    assert_refused(jws(header("p256"), claims(), sign_with(other_p256, "ES256")), InvalidSignature)
    assert_refused(jws(header("rsa", alg="PS256"), claims(), signer("rsa-ps")), InvalidSignature)


# --- keys carried in the token are never used ---------------------------------------------------


def attacker_jwk() -> dict[str, Any]:
    return public_jwk(ATTACKER, "attacker", "EdDSA")


def attacker_certificate() -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "approvals.example.gov")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ATTACKER.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(ATTACKER, None)
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("verify() touched the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


EMBEDDED: dict[str, Callable[[], dict[str, Any]]] = {
    "jwk": lambda: {"jwk": attacker_jwk()},
    "jku": lambda: {"jku": "https://attacker.example/jwks.json"},
    "x5u": lambda: {"x5u": "https://attacker.example/cert.pem"},
    "x5c": lambda: {"x5c": [attacker_certificate()]},
    "all": lambda: {
        "jwk": attacker_jwk(),
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": [attacker_certificate()],
    },
}


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("where", list(EMBEDDED))
def test_cve_2018_0114_embedded_jwk_jku_x5u_x5c_ignored(where: str) -> None:
    extra = EMBEDDED[where]()
    attacker = sign_with(ATTACKER, "EdDSA")
    # the attacker's own kid: not in the trust store
    assert_refused(
        jws(header("attacker", {"alg": "EdDSA", **extra}), claims(), attacker), UnknownKey
    )
    # a trusted kid, signed by the embedded key: verified with the trusted key, and fails
    assert_refused(jws(header("ed", extra), claims(), attacker), InvalidSignature)
    # the members are ignored, not refused: the authority's own token still verifies
    assert VERIFIER.verify(jws(header("ed", extra), claims(), signer("ed")), NOW).kid == "ed"


# --- header extensions ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"crit": ["exp"]},
        {"crit": ["mfa"], "mfa": True},
        {"crit": []},
        {"crit": "exp"},
        {"crit": None},
    ],
)
def test_cve_2026_32597_crit_refused(changes: dict[str, Any]) -> None:
    """GHSA-752w-5fwx-jx9f: a `crit` extension we do not implement must not be ignored."""
    found = refused(token(hdr=changes))
    assert type(found) is MalformedToken
    assert "crit" in found.detail


@pytest.mark.parametrize(
    "changes", [{"b64": False, "crit": ["b64"]}, {"b64": False}, {"b64": True}]
)
def test_b64_false_refused(changes: dict[str, Any]) -> None:
    """RFC 7797 unencoded payloads change what is signed; cohortgate implements none of it."""
    hdr = header("ed", changes)
    h = b64(json.dumps(hdr).encode())
    payload = json.dumps(claims())
    unencoded = signer("ed")(f"{h}.{payload}".encode())
    assert_refused(f"{h}.{b64(payload.encode())}.{b64(unencoded)}", MalformedToken)
    assert_refused(jws(hdr, claims(), signer("ed")), MalformedToken)


# --- compact serialisation ------------------------------------------------------------------------

GOOD = token()
H, P, S = GOOD.split(".")


@pytest.mark.parametrize(
    "tok",
    [
        H,
        f"{H}.{P}",
        f"{H}.{P}.{S}.{S}",
        f"{H}.{P}.{S}.{S}.{S}",  # the JWE shape
        "",
        ".",
        "..",
        "...",
        "....",
    ],
    ids=["1", "2", "4", "5", "empty", "dot", "dots2", "dots3", "dots4"],
)
def test_segment_count_refused(tok: str) -> None:
    assert_refused(tok, MalformedToken)


@pytest.mark.parametrize(
    "tok", [f".{P}.{S}", f"{H}..{S}", f"{H}.{P}.", "..", f"{H}.{P}.."], ids=str
)
def test_empty_segment_refused(tok: str) -> None:
    """An empty signature is malformed, never 'unsigned'."""
    assert_refused(tok, MalformedToken)


@pytest.mark.parametrize("kid", KIDS)
@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_flipped_signature_bit_refused(kid: str, position: str) -> None:
    tok = token(kid=kid)
    sig = bytearray(signature_bytes(tok))
    index = {"first": 0, "middle": len(sig) // 2, "last": len(sig) - 1}[position]
    sig[index] ^= 0x01
    assert_refused(replace_segment(tok, 2, b64(bytes(sig))), InvalidSignature)


@pytest.mark.parametrize("kid", KIDS)
def test_truncated_or_extended_signature_refused(kid: str) -> None:
    tok = token(kid=kid)
    sig = signature_bytes(tok)
    for changed in (sig[:-1], sig + b"\x00", sig[: len(sig) // 2], sig * 2):
        assert_refused(replace_segment(tok, 2, b64(changed)), InvalidSignature)


@pytest.mark.parametrize("kid", KIDS)
def test_signed_parts_tampered_refused(kid: str) -> None:
    tok = token(kid=kid)
    admin = b64(json.dumps(claims(sub="admin")).encode())
    assert_refused(replace_segment(tok, 1, admin), InvalidSignature)
    retyped = b64(json.dumps(header(kid, typ="at+jwt")).encode())
    assert_refused(replace_segment(tok, 0, retyped), InvalidSignature)


@pytest.mark.parametrize(("kid", "size"), [("p256", 32), ("p384", 48)])
def test_cve_2022_21449_ecdsa_zero_signature_refused(kid: str, size: int) -> None:
    """'Psychic signatures': r = s = 0 verified for any message in Java 15-18."""
    assert_refused(jws(header(kid), claims(), lambda message: bytes(2 * size)), InvalidSignature)
    order_p256 = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    if kid == "p256":
        n = order_p256.to_bytes(32, "big")
        assert_refused(jws(header(kid), claims(), lambda message: n + n), InvalidSignature)


@pytest.mark.parametrize(("kid", "size"), [("p256", 32), ("p384", 48)])
def test_ecdsa_der_signature_refused(kid: str, size: int) -> None:
    """JWS ECDSA signatures are raw r||s; the ASN.1 DER form of the same signature is refused."""
    raw = signature_bytes(token(kid=kid))
    r, s = int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    der = encode_dss_signature(r, s)
    assert_refused(replace_segment(token(kid=kid), 2, b64(der)), InvalidSignature)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("char", ["+", "/", "=", " ", "\n", "%", "*", "\u00e9", "\u0000", "\uff41"])
def test_non_base64url_chars_refused(index: int, char: str) -> None:
    parts = GOOD.split(".")
    middle = len(parts[index]) // 2
    parts[index] = parts[index][:middle] + char + parts[index][middle + 1 :]
    assert_refused(".".join(parts), MalformedToken)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("padding", ["=", "==", "==="])
def test_padding_appended_refused(index: int, padding: str) -> None:
    parts = GOOD.split(".")
    parts[index] += padding
    assert_refused(".".join(parts), MalformedToken)


def test_standard_base64_of_the_same_bytes_refused() -> None:
    """The same signature in the standard (+/) alphabet, padded."""
    for _ in range(64):  # find a signature whose encodings differ
        tok = token(jti=os.urandom(8).hex())
        standard = base64.b64encode(signature_bytes(tok)).decode()
        if "+" in standard or "/" in standard:
            break
    assert_refused(replace_segment(tok, 2, standard), MalformedToken)
    assert_refused(replace_segment(tok, 2, standard.rstrip("=")), MalformedToken)


def test_non_canonical_base64url_trailing_bits_refused() -> None:
    """A second spelling of the same signature (unused low bits set) is not the token signed."""
    sig = S
    assert len(sig) % 4 == 2  # an Ed25519 signature: 64 bytes, 86 characters, 4 spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + alphabet[alphabet.index(sig[-1]) + 1]
    assert base64.urlsafe_b64decode(twin + "==") == base64.urlsafe_b64decode(sig + "==")
    assert_refused(replace_segment(GOOD, 2, twin), MalformedToken)
    assert_refused(replace_segment(GOOD, 2, sig + "AAA"), MalformedToken)  # a length no data has


# --- JSON parser differentials --------------------------------------------------------------------


@pytest.mark.parametrize("value", [[], [1], "header", 1, None, True])
@pytest.mark.parametrize("part", ["header", "payload"])
def test_header_or_payload_not_an_object(part: str, value: Any) -> None:
    hdr, body = (value, claims()) if part == "header" else (header("ed"), value)
    found = refused(jws(hdr, body, signer("ed")))
    assert type(found) is MalformedToken
    assert part in found.detail


@pytest.mark.parametrize("part", ["header", "payload"])
@pytest.mark.parametrize("depth", [1500, 2500])
def test_json_nesting_bomb_refused(part: str, depth: int) -> None:
    bomb = b'{"x":' + b"[" * depth + b"]" * depth + b"}"
    if part == "header":
        hdr = json.dumps(header("ed"))[:-1].encode() + b', "x":' + bomb + b"}"
        tok = jws(hdr, claims(), signer("ed"))
    else:
        tok = jws(
            header("ed"), json.dumps(claims())[:-1].encode() + b', "x":' + bomb + b"}", signer("ed")
        )
    assert len(tok) <= MAX_TOKEN_BYTES
    assert_refused(tok, MalformedToken)


def test_oversized_token_refused_before_parsing() -> None:
    bomb = b"[" * 10_000 + b"]" * 10_000
    assert_refused(jws(header("ed"), bomb, signer("ed")), TokenTooLarge)


DUPLICATES = {
    "header_alg_none_last": (b'{"alg":"EdDSA","kid":"ed","alg":"none"}', None),
    "header_alg_none_first": (b'{"alg":"none","kid":"ed","alg":"EdDSA"}', None),
    "header_kid": (b'{"alg":"EdDSA","kid":"ed","kid":"attacker"}', None),
    "sub_admin_last": (None, '"sub":"acme","sub":"admin"'),
    "sub_admin_first": (None, '"sub":"admin","sub":"acme"'),
    "exp": (None, f'"exp":{NOW + 60},"exp":{NOW + 10**9}'),
    "cohort": (None, '"cohort":"preview-1","cohort":"general"'),
    "nested_limits": (None, '"limits":{"rpm":1,"rpm":100000}'),
    "nested_cnf": (None, '"cnf":{"api_key_sha256":"' + "a" * 64 + '","api_key_sha256":"x"}'),
    "unknown_claim": (None, '"note":1,"note":2'),
    "deep": (None, '"extra":[{"a":{"b":1,"b":2}}]'),
}


def payload_with(members: str) -> bytes:
    base = {k: v for k, v in claims().items() if f'"{k}"' not in members}
    return ("{" + members + "," + json.dumps(base)[1:]).encode()


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_duplicate_member_names_refused(case: str) -> None:
    """Two parsers must never read two different tokens: repeated names are malformed."""
    raw_header, members = DUPLICATES[case]
    hdr: Any = raw_header if raw_header is not None else header("ed")
    body: Any = payload_with(members) if members is not None else claims()
    found = refused(jws(hdr, body, signer("ed")))
    assert type(found) is MalformedToken


def test_payload_helper_builds_a_valid_token_without_duplicates() -> None:
    """The duplicate cases above differ from a valid token only by the repeated member."""
    assert VERIFIER.verify(jws(header("ed"), payload_with('"sub":"acme"'), signer("ed")), NOW)


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(claims()).encode("utf-16"),
        json.dumps(claims()).encode("utf-32"),
        b"\xef\xbb\xbf" + json.dumps(claims()).encode(),  # UTF-8 BOM
        json.dumps(claims()).encode()[:-1] + b',"x":"\xff"}',  # invalid UTF-8
        json.dumps(claims()).encode()[:-1] + b',"x":"\xed\xa0\x80"}',  # encoded surrogate
        json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": NaN').encode(),
        json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": Infinity').encode(),
        json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": -Infinity').encode(),
        json.dumps(claims()).encode() + b"x",
        json.dumps(claims()).encode() * 2,
        b"{'sub': 'acme'}",
        json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": ' + "9" * 5000).encode(),
    ],
    ids=[
        "utf16",
        "utf32",
        "bom",
        "bad_utf8",
        "encoded_surrogate",
        "nan",
        "infinity",
        "minus_infinity",
        "trailing_garbage",
        "two_objects",
        "single_quotes",
        "int_too_long_to_parse",
    ],
)
def test_json_encoding_tricks_refused(raw: bytes) -> None:
    tok = jws(header("ed"), raw, signer("ed"))
    assert len(tok) <= MAX_TOKEN_BYTES
    assert_refused(tok, MalformedToken)


# --- claim type confusion -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["exp", "iat", "nbf"])
@pytest.mark.parametrize(
    "value",
    [
        str(NOW + 60),
        f"{NOW + 60}",
        1e300,
        float(NOW + 60),
        True,
        False,
        None,
        [NOW + 60],
        {"$gt": 0},
    ],
    ids=["numeric_string", "f_string", "1e300", "float", "true", "false", "null", "list", "object"],
)
def test_numeric_date_type_confusion_refused(name: str, value: Any) -> None:
    changes: dict[str, Any] = {name: value}
    found = refused(token(**changes))
    assert type(found) is InvalidClaim
    assert found.detail == name


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": 10**400},
        {"iat": -(10**400)},
        {"iat": NOW, "exp": NOW + 10**300},
    ],
    ids=["exp_huge", "iat_huge_negative", "exp_1e300_as_integer"],
)
def test_huge_integer_dates_are_too_long_not_a_crash(changes: dict[str, Any]) -> None:
    found = refused(token(**changes))
    assert type(found) is LifetimeTooLong
    assert len(found.detail) < 100


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"exp": -(10**400), "iat": -(10**400) - 60}, TokenExpired),
        ({"nbf": 10**400}, TokenNotYetValid),
        ({"iat": 10**400, "exp": 10**400 + 60}, TokenNotYetValid),
        ({"exp": -(2**1100), "iat": -(2**1100) - 60}, TokenExpired),
    ],
    ids=["exp_huge_negative", "nbf_huge", "iat_huge", "exp_beyond_float"],
)
def test_huge_integer_dates_do_not_overflow_the_detail(
    changes: dict[str, Any], reason: type[Denial]
) -> None:
    """A huge int minus a float raises OverflowError; that would be a 500, not a 401."""
    found = refused(token(**changes))
    assert type(found) is reason
    assert "more than 10^12 s" in found.detail


@pytest.mark.parametrize(
    "iss",
    [
        "https://approvals.example",  # a prefix
        "approvals.example.gov",  # a substring
        "https",
        "https://approvals.example.gov/",
        "https://approvals.example.gov.evil.com",
        "https://approvals.example.gov@evil.com",
        "HTTPS://approvals.example.gov",
        "https://Approvals.example.gov",
        " https://approvals.example.gov",
        "https://approvals.example.gov\u200b",
        "https://approvals\uff0eexample.gov",  # fullwidth dot
    ],
)
def test_cve_2024_53861_iss_must_match_exactly(iss: str) -> None:
    """GHSA-75c5-xw7c-p5pm: pyjwt 2.10.0 accepted any iss contained in the expected issuer."""
    assert_refused(token(iss=iss), InvalidIssuer)


@pytest.mark.parametrize("iss", [[ISSUER], {"iss": ISSUER}, 1, None, ""])
def test_iss_of_another_type_refused(iss: Any) -> None:
    found = refused(token(iss=iss))
    assert type(found) is InvalidClaim
    assert found.detail == "iss"


@pytest.mark.parametrize(
    "aud",
    [
        "gpt-5",
        "gpt-5.6-mini",
        "GPT-5.6",
        " gpt-5.6",
        "gpt-5.6 ",
        "gpt-5.6,other",
        "",
        [""],
        ["gpt-5", ".6"],
        ["gpt-5.6-mini", "GPT-5.6"],
    ],
)
def test_aud_substring_or_variant_refused(aud: Any) -> None:
    assert_refused(token(aud=aud), InvalidAudience)


@pytest.mark.parametrize("aud", [[], [[AUDIENCE]], {AUDIENCE: True}, None, 5, [AUDIENCE, None]])
def test_aud_empty_list_or_other_type_refused(aud: Any) -> None:
    found = refused(token(aud=aud))
    assert type(found) is InvalidClaim
    assert found.detail == "aud"


SUBS = [
    "acme",
    "Acme",
    "ACME",
    "acme ",
    " acme",
    unicodedata.normalize("NFC", "caf\u00e9"),
    unicodedata.normalize("NFD", "caf\u00e9"),
    "\uff41\uff43\uff4d\uff45",  # fullwidth
    "acme\u200b",  # zero-width space
    "\ufb01nance",  # "fi" ligature
    "\u0130stanbul",  # dotted capital I
    "acme\u0000",
]


@pytest.mark.parametrize("sub", SUBS, ids=[s.encode("unicode_escape").decode() for s in SUBS])
def test_sub_returned_byte_exact(sub: str) -> None:
    """A customer differing by case or Unicode normalisation is a different customer."""
    approval = VERIFIER.verify(token(sub=sub), NOW)
    assert approval.sub.encode("utf-8") == sub.encode("utf-8")


def test_sub_normalisation_variants_are_different_customers() -> None:
    seen = {VERIFIER.verify(token(sub=sub), NOW).sub for sub in SUBS}
    assert len(seen) == len(SUBS)


@pytest.mark.parametrize("name", ["sub", "cohort", "jti", "iss"])
def test_lone_surrogate_claim_refused(name: str) -> None:
    """JSON may escape half a surrogate pair; such a string cannot be logged or sent as UTF-8."""
    changes: dict[str, Any] = {name: "acme\ud800"}
    found = refused(token(**changes))
    assert type(found) is InvalidClaim
    assert found.detail == name


# --- keys the trust store never holds -------------------------------------------------------------


def test_cve_2025_45768_weak_rsa_key_never_trusted() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 the attack
    weak_jwk = {
        "kty": "RSA",
        "kid": "weak",
        "n": b64(weak.public_key().public_numbers().n.to_bytes(128, "big")),
        "e": "AQAB",
    }
    store = parse_jwks(json.dumps({"keys": [*JWKS, weak_jwk]}).encode(), "test")
    assert "weak" not in store.keys
    assert any("1024 bits" in reason for reason in store.skipped)
    verifier = Verifier(AUTHORITY, store)
    assert_refused(
        jws(header("weak", alg="RS256"), claims(), sign_with(weak, "RS256")), UnknownKey, verifier
    )


def test_symmetric_jwk_never_trusted_so_hs256_with_its_secret_refused() -> None:
    secret = b"a shared secret the authority once published by mistake"
    oct_jwk = {"kty": "oct", "kid": "shared", "k": b64(secret), "alg": "HS256"}
    store = parse_jwks(json.dumps({"keys": [*JWKS, oct_jwk]}).encode(), "test")
    assert "shared" not in store.keys
    verifier = Verifier(AUTHORITY, store)
    forged = jws(header("shared", alg="HS256"), claims(), hmac_signer(secret))
    assert_refused(forged, AlgorithmNotAllowed, verifier)
    forged = jws(header("shared", alg="EdDSA"), claims(), hmac_signer(secret))
    assert_refused(forged, UnknownKey, verifier)


def test_rsa_pss_with_other_hash_refused() -> None:
    """PS384/PS512 are not in the algorithm list even though the key could verify them."""
    assert_refused(
        jws(header("rsa", alg="PS512"), claims(), signer("rsa", "PS512")), AlgorithmNotAllowed
    )
