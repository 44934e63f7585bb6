"""The trust store (the authority's public keys, kid -> key) and the authority's key tooling.

The proxy side reads a JWKS document into a `TrustStore`: every usable public key under its
`kid`, with the algorithms it may verify. A JWK that cannot be trusted (private, symmetric,
weak, malformed, a repeated kid) is skipped with a reason, so one bad entry never takes the
whole store down; a file with no usable key at all is an error.

The authority side (`cohortgate keys ...`, `cohortgate token issue`) generates key pairs,
keeps the private key in a 0600 PEM file named after its kid, publishes the public half in
`jwks.json`, and signs approval tokens.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa

type PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
type PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

SUPPORTED_ALGORITHMS: frozenset[str] = frozenset({"EdDSA", "ES256", "ES384", "RS256", "PS256"})

# Key type ("Ed25519", "P-256", "P-384", "RSA") -> the algorithms a key of that type verifies.
ALG_FOR_KEY: Mapping[str, frozenset[str]] = {
    "Ed25519": frozenset({"EdDSA"}),
    "P-256": frozenset({"ES256"}),
    "P-384": frozenset({"ES384"}),
    "RSA": frozenset({"RS256", "PS256"}),
}

# The algorithm a freshly loaded private key signs with when nothing pins another one.
_DEFAULT_ALG: Mapping[str, str] = {
    "Ed25519": "EdDSA",
    "P-256": "ES256",
    "P-384": "ES384",
    "RSA": "RS256",
}

_PRIVATE_KEY_TYPES = (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)

MIN_RSA_BITS = 2048
GENERATED_RSA_BITS = 3072
JWKS_FILE = "jwks.json"

_CURVES: Mapping[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
}
_CURVE_NAMES: Mapping[str, str] = {"secp256r1": "P-256", "secp384r1": "P-384"}

# Members that only a private or symmetric JWK carries.
_SECRET_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# The last character of an unpadded segment may only carry zero bits past the data.
_CANONICAL_LAST: Mapping[int, frozenset[str]] = {
    0: frozenset(),
    2: frozenset("AQgw"),
    3: frozenset("AEIMQUYcgkosw048"),
}
# A kid becomes a file name (<dir>/<kid>.pem), so it must not be able to leave the directory.
_KID_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --- strict encodings, shared with verify.py -------------------------------------------------


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url strictly: its alphabet only, no '=', canonical final bits.

    Raises ValueError otherwise, so one byte string has exactly one accepted encoding.
    """
    rem = len(text) % 4
    if rem == 1 or not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    if rem and text[-1] not in _CANONICAL_LAST[rem]:
        raise ValueError("non-canonical base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class DuplicateMemberError(ValueError):
    """A JSON object names the same member twice (two parsers could read different values)."""


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateMemberError("a JSON object repeats a member name")
    return obj


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(data: str | bytes) -> Any:
    """Parse JSON refusing what lenient parsers disagree on.

    Bytes must be UTF-8 (json.loads would also guess UTF-16/32), duplicate member names raise
    DuplicateMemberError, NaN/Infinity and too-deep nesting raise ValueError.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    try:
        return json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# --- the trust store ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """One public key of the authority and the algorithms it may verify."""

    kid: str
    algorithms: frozenset[str]
    key: Any  # the cryptography public key object


@dataclass(frozen=True)
class TrustStore:
    """Every usable key of one JWKS document, by kid, and why the others were skipped."""

    keys: Mapping[str, TrustedKey]
    source: str
    skipped: tuple[str, ...]  # one human-readable reason per skipped JWK


def key_type(key: Any) -> str:
    """The ALG_FOR_KEY type of a public or private key; ValueError when cohortgate refuses it."""
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return "Ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        name = _CURVE_NAMES.get(key.curve.name)
        if name is None:
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256, P-384)")
        return name
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(
                f"RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} are required"
            )
        return "RSA"
    raise ValueError(f"{type(key).__name__} keys are not supported (Ed25519, EC P-256/P-384, RSA)")


def _jwk_public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a (public, asymmetric) JWK describes; ValueError with why not."""
    kty = jwk.get("kty")
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise ValueError("OKP curve is not Ed25519")
        x = _jwk_bytes(jwk, "x")
        if len(x) != 32:
            raise ValueError("Ed25519 x is not 32 bytes")
        return ed25519.Ed25519PublicKey.from_public_bytes(x)
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise ValueError("EC curve is not P-256 or P-384")
        curve, size = _CURVES[crv]
        x, y = _jwk_bytes(jwk, "x"), _jwk_bytes(jwk, "y")
        if len(x) != size or len(y) != size:
            raise ValueError(f"{crv} coordinates are not {size} bytes")
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve()
        )
        return numbers.public_key()  # ValueError when the point is not on the curve
    if kty == "RSA":
        n = int.from_bytes(_jwk_bytes(jwk, "n"), "big")
        e = int.from_bytes(_jwk_bytes(jwk, "e"), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()  # key_type() refuses a weak one
    raise ValueError("kty is not OKP, EC or RSA")


def _jwk_bytes(jwk: Mapping[str, Any], member: str) -> bytes:
    value = jwk.get(member)
    if not isinstance(value, str) or not value:
        raise ValueError(f"member {member!r} is missing")
    try:
        return b64url_decode(value)
    except ValueError:
        raise ValueError(f"member {member!r} is not base64url") from None


def _trusted_key(jwk: Any) -> TrustedKey:
    """One JWK as a TrustedKey; ValueError with the reason it cannot be trusted."""
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("has no kid")
    if jwk.get("kty") == "oct":
        raise ValueError("is a symmetric (kty oct) key; only asymmetric keys are trusted")
    secret = next((m for m in _SECRET_MEMBERS if m in jwk), None)
    if secret is not None:
        raise ValueError(f"holds private key material ({secret!r}); publish the public key only")
    if jwk.get("use", "sig") != "sig":
        raise ValueError("use is not 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and not (isinstance(key_ops, list) and "verify" in key_ops):
        raise ValueError("key_ops does not allow 'verify'")
    public_key = _jwk_public_key(jwk)
    kind = key_type(public_key)
    algorithms = ALG_FOR_KEY[kind]
    alg = jwk.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in algorithms:
            raise ValueError(f"alg {alg!r} does not fit a {kind} key")
        algorithms = frozenset({alg})
    return TrustedKey(kid=kid, algorithms=algorithms, key=public_key)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _jwks_document(data: bytes, source: str) -> dict[str, Any]:
    """The JWKS document as written (unknown members kept), checked for its shape only."""
    try:
        document = loads_strict(data)
    except ValueError as e:  # also UnicodeDecodeError and DuplicateMemberError
        raise ValueError(f"{source}: not a valid JWKS JSON document: {e}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{source}: not a JWKS document (an object with a "keys" list)')
    return document


def _trust_store(jwks: list[Any], source: str) -> TrustStore:
    keys: dict[str, TrustedKey] = {}
    skipped: list[str] = []
    for index, jwk in enumerate(jwks):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        where = f"keys[{index}]" + (f" (kid {_short(kid)})" if isinstance(kid, str) else "")
        try:
            trusted = _trusted_key(jwk)
        except ValueError as e:
            skipped.append(f"{where}: {e}")
            continue
        if trusted.kid in keys:
            skipped.append(f"{where}: repeats the kid of an earlier key; the first one is used")
            continue
        keys[trusted.kid] = trusted
    if not keys:
        why = "; ".join(skipped) if skipped else "the keys list is empty"
        raise ValueError(f"{source}: no usable key ({why})")
    return TrustStore(keys=keys, source=source, skipped=tuple(skipped))


def parse_jwks(data: bytes, source: str) -> TrustStore:
    """Read a JWKS document. ValueError("<source>: <why>") when it yields no usable key."""
    return _trust_store(_jwks_document(data, source)["keys"], source)


def load_trust_store(path: str | Path) -> TrustStore:
    """Read a JWKS file; see parse_jwks."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_jwks(data, str(path))


# --- the authority's keys ----------------------------------------------------------------------


def generate_key(alg: str) -> PrivateKey:
    """A new private key for `alg`: Ed25519, P-256, P-384, or RSA 3072 for RS256/PS256."""
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
    raise ValueError(
        f"algorithm {alg!r} is not supported ({', '.join(sorted(SUPPORTED_ALGORITHMS))})"
    )


def algorithm_for_private_key(key: Any) -> str:
    """The algorithm a private key signs with by default: EdDSA, ES256, ES384 or RS256."""
    if not isinstance(key, _PRIVATE_KEY_TYPES):
        raise ValueError(f"{type(key).__name__} is not a supported private key")
    return _DEFAULT_ALG[key_type(key)]


def public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of a (private or public) key, pinned to `alg`, for signatures."""
    kind = key_type(key)
    if alg not in ALG_FOR_KEY[kind]:
        raise ValueError(f"alg {alg!r} does not fit a {kind} key")
    public = key.public_key() if isinstance(key, _PRIVATE_KEY_TYPES) else key
    jwk: dict[str, Any]
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    elif isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = _CURVES[kind][1]
        jwk = {
            "kty": "EC",
            "crv": kind,
            "x": b64url_encode(numbers.x.to_bytes(size, "big")),
            "y": b64url_encode(numbers.y.to_bytes(size, "big")),
        }
    else:
        rsa_numbers = public.public_numbers()
        jwk = {"kty": "RSA", "n": _uint_b64(rsa_numbers.n), "e": _uint_b64(rsa_numbers.e)}
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


def _uint_b64(value: int) -> str:
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def new_kid() -> str:
    """A fresh key id: "ak-" + the UTC date + 6 random hex digits, e.g. ak-20261127-3f9a1c."""
    return f"ak-{time.strftime('%Y%m%d', time.gmtime())}-{secrets.token_hex(3)}"


def init_keys(dir: Path, alg: str = "EdDSA", kid: str | None = None) -> tuple[Path, Path]:
    """Create the authority's first key: <dir>/<kid>.pem (0600) and <dir>/jwks.json.

    Returns (private key path, jwks path). Refuses when jwks.json already holds keys.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    jwks_path = dir / JWKS_FILE
    with _locked(dir):
        document = _read_jwks_document(jwks_path)
        if document["keys"]:
            raise ValueError(
                f"{jwks_path}: already holds {len(document['keys'])} key(s); "
                "use `cohortgate keys rotate` to add one"
            )
        return _add_key(dir, document, alg, kid)


def rotate_keys(dir: Path, alg: str | None = None, kid: str | None = None) -> tuple[Path, Path]:
    """Add a new key to <dir>/jwks.json; the old public keys stay, so their tokens verify.

    `alg` defaults to that of the newest usable key. Returns (private key path, jwks path).
    """
    dir = Path(dir)
    jwks_path = dir / JWKS_FILE
    with _locked(dir):
        if not jwks_path.exists():
            raise ValueError(f"{jwks_path}: does not exist; use `cohortgate keys init` first")
        document = _read_jwks_document(jwks_path)
        store = _trust_store(document["keys"], str(jwks_path))
        if alg is None:
            newest = list(store.keys.values())[-1]
            if len(newest.algorithms) == 1:
                (alg,) = newest.algorithms
            else:
                alg = _DEFAULT_ALG[key_type(newest.key)]
        return _add_key(dir, document, alg, kid)


@contextlib.contextmanager
def _locked(dir: Path) -> Iterator[None]:
    """Serialise key operations on one directory (read-modify-write of jwks.json).

    The lock is on the directory itself, so no lock file is left among the keys.
    """
    fd = os.open(dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_jwks_document(path: Path) -> dict[str, Any]:
    """The JWKS document at `path`, or an empty one when there is no file yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {"keys": []}
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    return _jwks_document(data, str(path))


def _add_key(dir: Path, document: dict[str, Any], alg: str, kid: str | None) -> tuple[Path, Path]:
    kid = new_kid() if kid is None else kid
    if not _KID_FILE_NAME.fullmatch(kid):
        raise ValueError(
            f"kid {_short(kid)} must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    if any(isinstance(jwk, dict) and jwk.get("kid") == kid for jwk in document["keys"]):
        raise ValueError(f"{dir / JWKS_FILE}: already has a key with kid {kid!r}")
    key = generate_key(alg)  # also refuses an unsupported alg
    pem_path = dir / f"{kid}.pem"
    jwks_path = dir / JWKS_FILE
    _write_private_pem(pem_path, key)
    try:
        _write_atomically(
            jwks_path, {**document, "keys": [*document["keys"], public_jwk(key, kid, alg)]}
        )
    except BaseException:
        pem_path.unlink(missing_ok=True)  # a private key nobody can verify is only a liability
        raise
    return pem_path, jwks_path


def _write_private_pem(path: Path, key: PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise ValueError(f"{path}: already exists; a private key is never overwritten") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        f.write(pem)
        f.flush()
        os.fsync(fd)


def _write_atomically(path: Path, document: dict[str, Any]) -> None:
    """Replace `path` with the JSON document so that readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
            f.flush()
            os.fchmod(fd, 0o644)  # a public document
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_private_key(path: Path) -> tuple[Any, str, str]:
    """(key, kid, alg) from a PKCS8 PEM private key file; the kid is the file's stem.

    The alg is the one the sibling jwks.json pins for this kid (an RSA key may be PS256),
    else the key type's default. ValueError with the path and why for anything unusable.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError(
            f"{path}: the private key is encrypted; an unencrypted PEM is needed"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        if b"PUBLIC KEY-----" in data:
            raise ValueError(f"{path}: holds a public key; give the private key file") from None
        raise ValueError(f"{path}: not a PEM private key") from None
    try:
        alg = algorithm_for_private_key(key)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    kid = path.stem
    published = _published_key(path.parent / JWKS_FILE, kid)
    if published is not None:
        if not _same_public_key(published.key, key.public_key()):
            raise ValueError(
                f"{path}: does not match the public key published for kid {kid!r} "
                f"in {path.parent / JWKS_FILE}"
            )
        if len(published.algorithms) == 1:
            (alg,) = published.algorithms
    return key, kid, alg


def _published_key(jwks_path: Path, kid: str) -> TrustedKey | None:
    """The key published for `kid` next to a private key, if there is a readable jwks.json."""
    if not jwks_path.exists():
        return None
    try:
        return load_trust_store(jwks_path).keys.get(kid)
    except ValueError:
        return None  # an unusable store pins nothing; signing does not depend on it


def _same_public_key(a: Any, b: Any) -> bool:
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(a.public_bytes(encoding, fmt) == b.public_bytes(encoding, fmt))


def issue_token(
    key_path: Path,
    *,
    issuer: str,
    audience: str,
    customer: str,
    cohort: str,
    ttl: float,
    now: float | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    models: Sequence[str] = (),
    bind_api_key: str | None = None,
) -> str:
    """Sign an approval token for `customer` in `cohort`, valid for `ttl` seconds from `now`."""
    for name, value in (
        ("issuer", issuer),
        ("audience", audience),
        ("customer", customer),
        ("cohort", cohort),
    ):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if not math.isfinite(ttl) or int(ttl) < 1:
        raise ValueError("ttl must be at least 1 second")
    key, kid, alg = load_private_key(key_path)
    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": customer,
        "cohort": cohort,
        "jti": uuid.uuid4().hex,
        "iat": iat,
        "exp": iat + int(ttl),
    }
    limits: dict[str, int] = {}
    for name, limit in (("rpm", rpm), ("tpm", tpm)):
        if limit is None:
            continue
        if type(limit) is not int or limit < 1:
            raise ValueError(f"{name} must be a positive integer")
        limits[name] = limit
    if limits:
        claims["limits"] = limits
    if models:
        if isinstance(models, str) or not all(isinstance(m, str) and m for m in models):
            raise ValueError("models must be non-empty strings")
        claims["models"] = list(dict.fromkeys(models))
    if bind_api_key is not None:
        if not bind_api_key:
            raise ValueError("bind_api_key must not be empty")
        claims["cnf"] = {"api_key_sha256": hashlib.sha256(bind_api_key.encode()).hexdigest()}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})
