"""keys.py: the trust store (JWKS parsing, skipped keys) and the authority's key tooling."""

from __future__ import annotations

import base64
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed448
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa

from cohortgate.config import Authority
from cohortgate.keys import ALG_FOR_KEY
from cohortgate.keys import DuplicateMemberError
from cohortgate.keys import PrivateKey
from cohortgate.keys import algorithm_for_private_key
from cohortgate.keys import b64url_decode
from cohortgate.keys import generate_key
from cohortgate.keys import init_keys
from cohortgate.keys import issue_token
from cohortgate.keys import load_private_key
from cohortgate.keys import load_trust_store
from cohortgate.keys import loads_strict
from cohortgate.keys import new_kid
from cohortgate.keys import parse_jwks
from cohortgate.keys import public_jwk
from cohortgate.keys import rotate_keys
from cohortgate.verify import Verifier

ISSUER = "https://approvals.example.gov"
AUDIENCE = "gpt-5.6"
NOW = 1_800_000_000
ALGS = ["EdDSA", "ES256", "ES384", "RS256", "PS256"]

RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 refused
ED = ed25519.Ed25519PrivateKey.generate()
P256 = ec.generate_private_key(ec.SECP256R1())


def authority(
    jwks: Path | str = "keys/jwks.json", algorithms: tuple[str, ...] = tuple(ALGS)
) -> Authority:
    return Authority(ISSUER, AUDIENCE, str(jwks), algorithms, 30.0, 30 * 86400.0)


def issue(pem: Path, **kw: Any) -> str:
    kw.setdefault("ttl", 3600)
    kw.setdefault("now", NOW)
    return issue_token(pem, issuer=ISSUER, audience=AUDIENCE, customer="acme", cohort="c1", **kw)


def jwks_bytes(*jwks: Any) -> bytes:
    return json.dumps({"keys": list(jwks)}).encode()


def decode_part(tok: str, index: int) -> Any:
    part = tok.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --- init, rotate ---------------------------------------------------------------------------------


def test_init_keys_writes_a_0600_pem_and_a_loadable_jwks(tmp_path: Path) -> None:
    pem, jwks = init_keys(tmp_path / "keys", kid="ak-1")
    assert pem == tmp_path / "keys" / "ak-1.pem"
    assert jwks == tmp_path / "keys" / "jwks.json"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    store = load_trust_store(jwks)
    assert list(store.keys) == ["ak-1"]
    assert store.keys["ak-1"].algorithms == frozenset({"EdDSA"})
    assert store.skipped == ()
    published = json.loads(jwks.read_text())["keys"]
    assert published == [
        {**public_jwk(load_private_key(pem)[0], "ak-1", "EdDSA")},
    ]
    assert "d" not in published[0]
    assert published[0]["use"] == "sig"


def test_init_keys_default_kid_is_dated_and_random(tmp_path: Path) -> None:
    pem, _ = init_keys(tmp_path)
    assert re.fullmatch(r"ak-\d{8}-[0-9a-f]{6}", pem.stem)
    assert re.fullmatch(r"ak-\d{8}-[0-9a-f]{6}", new_kid())
    assert len({new_kid() for _ in range(20)}) > 1


def test_init_keys_refuses_a_second_init(tmp_path: Path) -> None:
    init_keys(tmp_path, kid="first")
    before = (tmp_path / "jwks.json").read_bytes()
    with pytest.raises(ValueError, match=r"already holds 1 key.*cohortgate keys rotate"):
        init_keys(tmp_path, kid="second")
    assert (tmp_path / "jwks.json").read_bytes() == before
    assert not (tmp_path / "second.pem").exists()


def test_init_keys_accepts_an_empty_jwks(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    init_keys(tmp_path, kid="k")
    assert list(load_trust_store(tmp_path / "jwks.json").keys) == ["k"]


def test_private_key_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("precious")
    with pytest.raises(ValueError, match="never overwritten"):
        init_keys(tmp_path, kid="k")
    assert (tmp_path / "k.pem").read_text() == "precious"
    assert not (tmp_path / "jwks.json").exists()


@pytest.mark.parametrize(
    "kid", ["../evil", "a/b", ".hidden", "", "x" * 65, "k y", "k\n", "-leading", "ké"]
)
def test_kid_must_be_a_safe_file_name(tmp_path: Path, kid: str) -> None:
    with pytest.raises(ValueError, match="kid"):
        init_keys(tmp_path / "keys", kid=kid)
    assert list((tmp_path / "keys").glob("*.pem")) == []
    assert list(tmp_path.glob("*.pem")) == []


@pytest.mark.parametrize("alg", ["HS256", "none", "RS384", "ES512", "eddsa"])
def test_unsupported_algorithms_refused(tmp_path: Path, alg: str) -> None:
    with pytest.raises(ValueError, match="not supported"):
        init_keys(tmp_path, alg=alg)
    with pytest.raises(ValueError, match="not supported"):
        generate_key(alg)
    assert list(tmp_path.glob("*.pem")) == []


def test_rotate_keeps_old_keys_and_their_tokens(tmp_path: Path) -> None:
    old_pem, jwks = init_keys(tmp_path, kid="old")
    old_token = issue(old_pem)
    new_pem, same_jwks = rotate_keys(tmp_path, kid="new")
    assert same_jwks == jwks
    assert stat.S_IMODE(new_pem.stat().st_mode) == 0o600
    store = load_trust_store(jwks)
    assert list(store.keys) == ["old", "new"]
    verifier = Verifier(authority(jwks), store)
    assert verifier.verify(old_token, NOW).kid == "old"
    assert verifier.verify(issue(new_pem), NOW).kid == "new"


def test_rotate_keeps_unknown_members_of_the_document(tmp_path: Path) -> None:
    init_keys(tmp_path, kid="old")
    document = json.loads((tmp_path / "jwks.json").read_text())
    document["keys"][0]["x-note"] = "kept"
    document["x-owner"] = "approvals office"
    (tmp_path / "jwks.json").write_text(json.dumps(document))
    rotate_keys(tmp_path, kid="new")
    rotated = json.loads((tmp_path / "jwks.json").read_text())
    assert rotated["x-owner"] == "approvals office"
    assert rotated["keys"][0]["x-note"] == "kept"
    assert [k["kid"] for k in rotated["keys"]] == ["old", "new"]


@pytest.mark.parametrize(
    ("first", "then"), [("ES384", "ES384"), ("EdDSA", "EdDSA"), ("ES256", "ES256")]
)
def test_rotate_defaults_to_the_newest_keys_alg(tmp_path: Path, first: str, then: str) -> None:
    init_keys(tmp_path, alg=first, kid="a")
    rotate_keys(tmp_path, kid="b")
    assert load_trust_store(tmp_path / "jwks.json").keys["b"].algorithms == frozenset({then})


def test_rotate_to_another_alg_then_default_follows_the_newest(tmp_path: Path) -> None:
    init_keys(tmp_path, alg="EdDSA", kid="a")
    rotate_keys(tmp_path, alg="ES256", kid="b")
    rotate_keys(tmp_path, kid="c")
    keys = load_trust_store(tmp_path / "jwks.json").keys
    assert [keys[k].algorithms for k in "abc"] == [
        frozenset({"EdDSA"}),
        frozenset({"ES256"}),
        frozenset({"ES256"}),
    ]


def test_rotate_refuses_without_init_or_with_a_used_kid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keys init"):
        rotate_keys(tmp_path)
    init_keys(tmp_path, kid="a")
    with pytest.raises(ValueError, match="already has a key with kid 'a'"):
        rotate_keys(tmp_path, kid="a")


def test_jwks_is_replaced_atomically_without_leftovers(tmp_path: Path) -> None:
    init_keys(tmp_path, kid="a")
    rotate_keys(tmp_path, kid="b")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.pem",
        "b.pem",
        "jwks.json",
    ]
    assert stat.S_IMODE((tmp_path / "jwks.json").stat().st_mode) == 0o644


# --- every key type round-trips -------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_each_key_type_round_trips(tmp_path: Path, alg: str) -> None:
    pem, jwks = init_keys(tmp_path, alg=alg, kid=f"k-{alg.lower()}")
    _, kid, loaded_alg = load_private_key(pem)
    assert (kid, loaded_alg) == (f"k-{alg.lower()}", alg)
    tok = issue(pem, rpm=10, tpm=2000, models=["gpt-5.6"], bind_api_key="sk-test")
    assert decode_part(tok, 0) == {"alg": alg, "kid": kid, "typ": "JWT"}
    approval = Verifier(authority(jwks), load_trust_store(jwks)).verify(tok, NOW + 5)
    assert (approval.sub, approval.cohort, approval.kid, approval.iss) == (
        "acme",
        "c1",
        kid,
        ISSUER,
    )
    assert (approval.limit_rpm, approval.limit_tpm) == (10, 2000)
    assert approval.models == frozenset({"gpt-5.6"})


def test_generated_rsa_keys_are_3072_bits() -> None:
    key = generate_key("PS256")
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072


def test_ps256_key_signs_ps256_even_though_rsa_defaults_to_rs256(tmp_path: Path) -> None:
    """The alg comes from the published JWK; without one an RSA key signs RS256."""
    pem, jwks = init_keys(tmp_path, alg="PS256", kid="ps")
    assert algorithm_for_private_key(load_private_key(pem)[0]) == "RS256"
    assert load_private_key(pem)[2] == "PS256"
    jwks.unlink()
    assert load_private_key(pem)[2] == "RS256"


# --- issue_token ----------------------------------------------------------------------------------


def test_issue_token_claims(tmp_path: Path) -> None:
    pem, _ = init_keys(tmp_path, kid="k")
    tok = issue(pem, ttl=86400.9, rpm=5, models=["a", "b", "a"], bind_api_key="abc")
    payload = decode_part(tok, 1)
    jti = payload.pop("jti")
    assert re.fullmatch(r"[0-9a-f]{32}", jti)
    assert payload == {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acme",
        "cohort": "c1",
        "iat": NOW,
        "exp": NOW + 86400,
        "limits": {"rpm": 5},
        "models": ["a", "b"],
        "cnf": {
            "api_key_sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        },
    }


def test_issue_token_minimal_and_unique(tmp_path: Path) -> None:
    pem, _ = init_keys(tmp_path, kid="k")
    first, second = issue(pem, now=NOW + 0.7), issue(pem, now=NOW + 0.7)
    payload = decode_part(first, 1)
    assert set(payload) == {"iss", "aud", "sub", "cohort", "jti", "iat", "exp"}
    assert type(payload["iat"]) is int and type(payload["exp"]) is int
    assert payload["jti"] != decode_part(second, 1)["jti"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ttl": 0}, "ttl"),
        ({"ttl": 0.5}, "ttl"),
        ({"ttl": -5}, "ttl"),
        ({"ttl": float("inf")}, "ttl"),
        ({"ttl": float("nan")}, "ttl"),
        ({"rpm": 0}, "rpm"),
        ({"tpm": -1}, "tpm"),
        ({"rpm": True}, "rpm"),
        ({"models": ["ok", ""]}, "models"),
        ({"models": "gpt-5.6"}, "models"),
        ({"bind_api_key": ""}, "bind_api_key"),
        ({"customer": ""}, "customer"),
        ({"cohort": ""}, "cohort"),
        ({"issuer": ""}, "issuer"),
        ({"audience": ""}, "audience"),
    ],
)
def test_issue_token_refuses_bad_input(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    pem, _ = init_keys(tmp_path, kid="k")
    kw: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "customer": "acme",
        "cohort": "c1",
        "ttl": 3600,
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        issue_token(pem, **kw)


# --- load_private_key -----------------------------------------------------------------------------


def pem_of(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"", "not a PEM private key"),
        (b"garbage", "not a PEM private key"),
        (
            P256.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "public key",
        ),
        (
            P256.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "encrypted",
        ),
        (pem_of(ec.generate_private_key(ec.SECP521R1())), "secp521r1 is not supported"),
        (pem_of(ed448.Ed448PrivateKey.generate()), "Ed448PrivateKey is not a supported"),
        (pem_of(RSA1024), "1024 bits"),
    ],
    ids=["missing", "empty", "garbage", "public", "encrypted", "p521", "ed448", "rsa1024"],
)
def test_load_private_key_refuses(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "k.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        load_private_key(path)
    assert str(info.value).startswith(str(path))


def test_load_private_key_refuses_a_key_that_is_not_the_published_one(tmp_path: Path) -> None:
    pem, _ = init_keys(tmp_path, kid="k")
    pem.chmod(0o600)
    pem.unlink()
    pem.write_bytes(pem_of(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ValueError, match="does not match the public key published for kid 'k'"):
        load_private_key(pem)


@pytest.mark.parametrize(
    ("key", "alg"),
    [(ED, "EdDSA"), (P256, "ES256"), (generate_key("ES384"), "ES384"), (RSA2048, "RS256")],
)
def test_algorithm_for_private_key(key: PrivateKey, alg: str) -> None:
    assert algorithm_for_private_key(key) == alg


@pytest.mark.parametrize(
    "key", [RSA1024, ED.public_key(), "a key", ed448.Ed448PrivateKey.generate()]
)
def test_algorithm_for_private_key_refuses(key: Any) -> None:
    with pytest.raises(ValueError, match=r"not a supported|1024 bits"):
        algorithm_for_private_key(key)


@pytest.mark.parametrize(
    ("key", "alg"), [(ED, "ES256"), (P256, "EdDSA"), (RSA2048, "ES256"), (P256, "ES384")]
)
def test_public_jwk_refuses_an_alg_that_does_not_fit(key: PrivateKey, alg: str) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        public_jwk(key, "k", alg)


# --- the trust store ------------------------------------------------------------------------------

GOOD = public_jwk(ED, "good", "EdDSA")


def rsa_jwk(key: rsa.RSAPrivateKey, **extra: Any) -> dict[str, Any]:
    jwk = public_jwk(RSA2048, "r", "RS256") if key is RSA2048 else {}
    if key is not RSA2048:
        numbers = key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        jwk = {
            "kty": "RSA",
            "kid": "r",
            "n": base64.urlsafe_b64encode(n).rstrip(b"=").decode(),
            "e": "AQAB",
        }
    jwk.pop("alg", None)
    return {**jwk, **extra}


def test_jwk_alg_pins_the_key_and_absent_alg_allows_the_type() -> None:
    store = parse_jwks(
        jwks_bytes(rsa_jwk(RSA2048, kid="any"), rsa_jwk(RSA2048, kid="ps", alg="PS256"), GOOD), "t"
    )
    assert store.keys["any"].algorithms == ALG_FOR_KEY["RSA"] == frozenset({"RS256", "PS256"})
    assert store.keys["ps"].algorithms == frozenset({"PS256"})
    assert store.keys["good"].algorithms == frozenset({"EdDSA"})
    assert store.source == "t"


BAD_JWKS: list[tuple[str, Any, str]] = [
    ("not_object", ["kty", "OKP"], "not a JSON object"),
    ("no_kid", {k: v for k, v in GOOD.items() if k != "kid"}, "has no kid"),
    ("empty_kid", {**GOOD, "kid": ""}, "has no kid"),
    ("numeric_kid", {**GOOD, "kid": 7}, "has no kid"),
    ("private_okp", {**GOOD, "kid": "p", "d": "AAAA"}, "private key material ('d')"),
    ("private_rsa", rsa_jwk(RSA2048, kid="p", p="AQAB"), "private key material ('p')"),
    ("symmetric", {"kty": "oct", "kid": "s", "k": "c2VjcmV0"}, "symmetric"),
    ("weak_rsa", rsa_jwk(RSA1024, kid="w"), "1024 bits"),
    ("unknown_kty", {"kty": "XYZ", "kid": "u"}, "kty"),
    ("ed448", {"kty": "OKP", "crv": "Ed448", "kid": "e", "x": "AAAA"}, "not Ed25519"),
    ("p521", {**public_jwk(P256, "c", "ES256"), "crv": "P-521"}, "P-256 or P-384"),
    ("short_x", {**GOOD, "kid": "x", "x": "AAAA"}, "32 bytes"),
    ("x_not_base64url", {**GOOD, "kid": "x", "x": GOOD["x"] + "="}, "not base64url"),
    ("x_missing", {k: v for k, v in GOOD.items() if k != "x"}, "'x' is missing"),
    (
        "point_not_on_curve",
        {**public_jwk(P256, "c", "ES256"), "y": public_jwk(P256, "c", "ES256")["x"]},
        "",
    ),
    ("alg_mismatch", {**GOOD, "kid": "m", "alg": "ES256"}, "does not fit a Ed25519 key"),
    ("alg_hs256", {**GOOD, "kid": "m", "alg": "HS256"}, "does not fit"),
    ("alg_not_string", {**GOOD, "kid": "m", "alg": ["EdDSA"]}, "does not fit"),
    ("use_enc", {**GOOD, "kid": "e", "use": "enc"}, "use is not 'sig'"),
    ("key_ops_sign_only", {**GOOD, "kid": "o", "key_ops": ["sign"]}, "key_ops"),
]


@pytest.mark.parametrize(("jwk", "reason"), [c[1:] for c in BAD_JWKS], ids=[c[0] for c in BAD_JWKS])
def test_bad_jwk_skipped_with_a_reason(jwk: Any, reason: str) -> None:
    store = parse_jwks(jwks_bytes(GOOD, jwk), "jwks.json")
    assert list(store.keys) == ["good"]
    assert len(store.skipped) == 1
    assert store.skipped[0].startswith("keys[1]")
    assert reason in store.skipped[0]


def test_skip_reasons_never_carry_key_material() -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ"
    store = parse_jwks(
        jwks_bytes(
            GOOD, {"kty": "oct", "kid": "s", "k": secret}, {**GOOD, "kid": "p", "d": secret}
        ),
        "t",
    )
    assert len(store.skipped) == 2
    assert all(secret not in reason for reason in store.skipped)


def test_duplicate_kid_keeps_the_first_and_skips_the_rest() -> None:
    other = public_jwk(ed25519.Ed25519PrivateKey.generate(), "good", "EdDSA")
    store = parse_jwks(jwks_bytes(GOOD, other, other), "t")
    assert list(store.keys) == ["good"]
    first = ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(GOOD["x"]))
    assert store.keys["good"].key.public_bytes_raw() == first.public_bytes_raw()
    assert [reason[:7] for reason in store.skipped] == ["keys[1]", "keys[2]"]
    assert all("repeats the kid" in reason for reason in store.skipped)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"", "not a valid JWKS JSON"),
        (b"not json", "not a valid JWKS JSON"),
        (b"\xff\xfe{}", "not a valid JWKS JSON"),
        (json.dumps({"keys": []}).encode("utf-16"), "not a valid JWKS JSON"),
        (b'{"keys": [], "keys": []}', "not a valid JWKS JSON"),
        (b'{"keys": [{"kty": "OKP", "kty": "RSA"}]}', "not a valid JWKS JSON"),
        (b"[]", 'an object with a "keys" list'),
        (b"{}", 'an object with a "keys" list'),
        (b'{"keys": {}}', 'an object with a "keys" list'),
        (b'{"keys": []}', "no usable key (the keys list is empty)"),
        (jwks_bytes({"kty": "oct", "kid": "s", "k": "AAAA"}), "no usable key (keys[0]"),
        (b'{"keys": [NaN]}', "not a valid JWKS JSON"),
        (b"[" * 100_000, "not a valid JWKS JSON"),
    ],
    ids=[
        "missing",
        "empty",
        "garbage",
        "bad_utf8",
        "utf16",
        "duplicate_keys",
        "duplicate_member_in_jwk",
        "array",
        "no_keys",
        "keys_not_list",
        "empty_keys",
        "all_skipped",
        "nan",
        "deep",
    ],
)
def test_load_trust_store_fails_clearly(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        load_trust_store(path)
    assert str(info.value).startswith(f"{path}: ")


def test_load_trust_store_accepts_str_paths(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_bytes(jwks_bytes(GOOD))
    assert load_trust_store(str(tmp_path / "jwks.json")).source == str(tmp_path / "jwks.json")


# --- strict encodings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", b""), ("YQ", b"a"), ("YWI", b"ab"), ("YWJj", b"abc"), ("-_8", b"\xfb\xff")],
)
def test_b64url_decode(text: str, expected: bytes) -> None:
    assert b64url_decode(text) == expected


@pytest.mark.parametrize("text", ["YQ==", "YQ=", "Y", "YR", "YWJ", "a+b/", "YW J", "YWI\n", "é"])
def test_b64url_decode_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="base64url"):
        b64url_decode(text)


@pytest.mark.parametrize(
    "data",
    [b'{"a":1,"a":2}', b'{"a":{"b":1,"b":1}}', b"NaN", b"[Infinity]", b"\xff", b"[" * 5000],
)
def test_loads_strict_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 json, codec and our own errors alike
        loads_strict(data)


def test_loads_strict_names_duplicates() -> None:
    with pytest.raises(DuplicateMemberError):
        loads_strict('[{"k": 1, "k": 1}]')
    assert loads_strict('{"k": [1, {"j": null}]}') == {"k": [1, {"j": None}]}
