"""The gate's policy: config/cohortgate.toml read into frozen dataclasses, checked once at load.

Everything is validated here, so the request path does no parsing: durations are seconds, sizes
are bytes, times are timezone-aware UTC datetimes, relative paths are absolute (resolved against
the working directory, not the config file's folder). Every refusal is a `ConfigError` that names
the file, the dotted key (`ratelimit.backend`, `phases[1].cohorts`) and why, so an operator can fix
the file without reading a traceback. Unknown keys are refused at every level: a typo must never
silently fall back to a default.

Pure: no mitmproxy import, no network, and no file is opened except the config itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import time
from pathlib import Path
from typing import Any
from typing import Final
from urllib.parse import SplitResult
from urllib.parse import urlsplit
from urllib.parse import urlunsplit

from cohortgate.units import format_config_duration
from cohortgate.units import format_size
from cohortgate.units import parse_duration
from cohortgate.units import parse_size

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "Authority",
    "Config",
    "ConfigError",
    "LimitSettings",
    "LogSettings",
    "Phase",
    "Quota",
    "RateLimitSettings",
    "RevocationSettings",
    "TokenSettings",
    "describe",
    "load_config",
    "parse_config",
]

ASYMMETRIC_ALGORITHMS: Final = frozenset({"EdDSA", "ES256", "ES384", "RS256", "PS256"})


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True, slots=True)
class Quota:
    """Requests per minute and tokens per minute."""

    rpm: int
    tpm: int


@dataclass(frozen=True, slots=True)
class Phase:
    """One stage of the release: until when it applies, whom it admits, what others get."""

    name: str
    until: datetime | None  # timezone-aware UTC; None for the open-ended last phase
    cohorts: frozenset[str]  # may contain "*"
    unapproved: Quota | None  # None: callers without an admitted approval are blocked

    def admits(self, cohort: str) -> bool:
        """Whether an approval for `cohort` is admitted (byte-exact; "*" admits every cohort)."""
        return "*" in self.cohorts or cohort in self.cohorts


@dataclass(frozen=True, slots=True)
class Authority:
    """Who signs approvals, for whom, with which keys and algorithms."""

    issuer: str
    audience: str
    jwks: str  # an absolute file path, or an https:// URL
    algorithms: tuple[str, ...]
    leeway: float  # seconds
    max_lifetime: float  # seconds


@dataclass(frozen=True, slots=True)
class TokenSettings:
    """Where the approval token travels, and whether it goes on upstream."""

    header: str  # as written, e.g. "Authorization" or "X-Approval-Token"
    forward: bool

    @property
    def bearer(self) -> bool:
        """Whether the header holds "Bearer <jwt>" (Authorization) rather than the bare JWT."""
        return self.header.lower() == "authorization"


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """The quota of an approval that names none, and the ceiling on any approval's quota."""

    default: Quota
    max: Quota


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Where the buckets live and what to do when that store fails."""

    backend: str  # "memory" or a redis[s]://, redis[s]+cluster:// or unix:// URL
    on_error: str  # "local" | "open" | "closed"
    timeout: float  # seconds


@dataclass(frozen=True, slots=True)
class RevocationSettings:
    """The revocation file (absolute; a missing file revokes nothing)."""

    file: Path


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The decision log."""

    decisions: Path | None  # None: standard output ("-" in the file)
    rotate_bytes: int  # 0: never rotate


# Changing these means new sockets or a new reverse-proxy target: a reload cannot apply them.
_RESTART_KEYS: Final = ("upstream", "listen", "admin_listen", "tls_cert", "tls_key")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective policy."""

    source: Path | None  # the file it came from; None when built in code
    upstream: str  # "http://host[:port]" or "https://host[:port]"
    listen: tuple[str, int]  # host without IPv6 brackets; port 0 means any free port
    admin_listen: tuple[str, int]
    tls_cert: Path | None
    tls_key: Path | None
    body_limit: int  # bytes
    authority: Authority
    token: TokenSettings
    phases: tuple[Phase, ...]
    limits: LimitSettings
    ratelimit: RateLimitSettings
    revocation: RevocationSettings
    log: LogSettings

    def phase_at(self, now: float) -> Phase | None:
        """The phase in force at `now` (unix seconds): the first whose `until` is after `now`."""
        for phase in self.phases:
            if phase.until is None or phase.until.timestamp() > now:
                return phase
        return None

    def reload_requires_restart(self, new: Config) -> list[str]:
        """Keys that differ in `new` and that only a restart applies."""
        return [key for key in _RESTART_KEYS if getattr(self, key) != getattr(new, key)]


class ConfigError(ValueError):
    """A config the gate refuses: `file`, the dotted `key` ("-" for the whole file) and `why`."""

    def __init__(self, file: str, key: str, why: str) -> None:
        super().__init__(file, key, why)
        self.file = file
        self.key = key
        self.why = why

    def __str__(self) -> str:
        return f"{self.file}: {self.key}: {self.why}"


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path, *, upstream: str | None = None, listen: str | None = None
) -> Config:
    """Read and validate a TOML config file; `upstream` and `listen` override the file's values.

    Every failure, an unreadable file included, is a ConfigError.
    """
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(file, "-", f"cannot read: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(file, "-", f"not UTF-8 text (byte {e.start})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        line = re.search(r"at line (\d+)", message)
        key = f"line {line.group(1)}" if line else "-"
        raise ConfigError(file, key, f"TOML syntax error: {message}") from e
    config = parse_config(data, file=file, upstream=upstream, listen=listen)
    return dataclasses.replace(config, source=_absolute(file))


def parse_config(
    data: Mapping[str, Any],
    *,
    file: str = "<config>",
    upstream: str | None = None,
    listen: str | None = None,
) -> Config:
    """Validate an already-parsed TOML document (a dict of plain values) into a Config."""
    return _Parser(file).config(data, upstream_override=upstream, listen_override=listen)


# --------------------------------------------------------------------------- defaults

_DEFAULT_LISTEN: Final = "127.0.0.1:8080"
_DEFAULT_ADMIN_LISTEN: Final = "127.0.0.1:9090"
_DEFAULT_BODY_LIMIT: Final = "16MB"
_DEFAULT_ALGORITHMS: Final = ("EdDSA",)
_DEFAULT_LEEWAY: Final = "30s"
_DEFAULT_MAX_LIFETIME: Final = "30d"
_DEFAULT_HEADER: Final = "Authorization"
_DEFAULT_LIMIT: Final = Quota(rpm=60, tpm=100_000)
_DEFAULT_MAX: Final = Quota(rpm=600, tpm=1_000_000)
_DEFAULT_BACKEND: Final = "memory"
_DEFAULT_ON_ERROR: Final = "local"
_DEFAULT_TIMEOUT: Final = "50ms"
_DEFAULT_REVOCATIONS: Final = "config/revocations.json"
_DEFAULT_DECISIONS: Final = "logs/decisions.jsonl"
_DEFAULT_ROTATE: Final = "100MB"

_MAX_LEEWAY: Final = 300.0
_MAX_TIMEOUT: Final = 10.0
_ON_ERROR_CHOICES: Final = ("local", "open", "closed")

# --------------------------------------------------------------------------- key sets

_TOP_KEYS: Final = (
    "upstream",
    "listen",
    "admin_listen",
    "tls_cert",
    "tls_key",
    "body_limit",
    "authority",
    "token",
    "phases",
    "limits",
    "ratelimit",
    "revocation",
    "log",
)
_AUTHORITY_KEYS: Final = ("issuer", "audience", "jwks", "algorithms", "leeway", "max_lifetime")
_TOKEN_KEYS: Final = ("header", "forward")
_PHASE_KEYS: Final = ("name", "until", "cohorts", "unapproved")
_LIMITS_KEYS: Final = ("default", "max")
_QUOTA_KEYS: Final = ("rpm", "tpm")
_RATELIMIT_KEYS: Final = ("backend", "on_error", "timeout")
_REVOCATION_KEYS: Final = ("file",)
_LOG_KEYS: Final = ("decisions", "rotate_bytes")

# RFC 9110 section 5.6.2: a field name is a token.
_FIELD_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# The token must not travel in a header that frames or routes the message, that the proxy
# strips or replaces (x-request-id is logged as client_request_id: a token there would leak).
_RESERVED_HEADERS: Final = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "expect",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
    }
)
_SYMMETRIC_OR_NONE: Final = re.compile(r"none|HS[0-9]*", re.IGNORECASE)
_SYMMETRIC_WHY: Final = (
    "symmetric/none algorithms are refused: a token could be forged with the public key"
)
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
_PORT: Final = re.compile(r"[0-9]{1,5}")
_REDIS_DB_PATH: Final = re.compile(r"/?(?:[0-9]+)?")

_MISSING: Final = object()


# --------------------------------------------------------------------------- the parser


def _type_name(value: object) -> str:
    """The TOML name of a Python value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, datetime):
        return "datetime"
    if isinstance(value, date):
        return "date"
    if isinstance(value, time):
        return "time"
    return type(value).__name__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _absolute(text: str) -> Path:
    """A path made absolute against the working directory, normalised, symlinks kept."""
    return Path(os.path.abspath(text))


def _format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Parser:
    """Reads one document; every check raises ConfigError against `file`."""

    def __init__(self, file: str) -> None:
        self.file = file

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(self.file, key, why)

    # ---- generic readers

    def table(self, value: object, key: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        """`value` as a table with only `allowed` keys ("" is the document itself)."""
        if not isinstance(value, Mapping):
            raise self.error(key or "-", f"expected a table, got {_type_name(value)}")
        for name in value:
            if not isinstance(name, str):
                raise self.error(key or "-", f"keys must be strings, got {_type_name(name)}")
            if name not in allowed:
                hint = difflib.get_close_matches(name, allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.error(_join(key, name), f"unknown key{suggestion}")
        return value

    def section(
        self, data: Mapping[str, Any], name: str, allowed: Sequence[str]
    ) -> Mapping[str, Any]:
        """A top-level table; an absent one is empty, so every key takes its default."""
        return self.table(data.get(name, {}), name, allowed)

    def value(self, table: Mapping[str, Any], prefix: str, name: str, default: object) -> object:
        """The raw value, the default when absent, or "required" when there is no default."""
        if name in table:
            return table[name]
        if default is _MISSING:
            raise self.error(_join(prefix, name), "required")
        return default

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_type_name(value)}")
        return value

    def nonempty_string(self, value: object, key: str) -> str:
        text = self.string(value, key)
        if not text.strip():
            raise self.error(key, "must not be empty")
        return text

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_type_name(value)}")
        return value

    def positive_int(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_type_name(value)}")
        if value <= 0:
            raise self.error(key, f"must be a positive integer, got {value}")
        return value

    def duration(self, value: object, key: str) -> float:
        if not isinstance(value, str):
            raise self.error(
                key, f'expected a duration string such as "30s", got {_type_name(value)}'
            )
        return self.convert(parse_duration, value, key)

    def size(self, value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(
                key, f'expected a size such as "100MB" or an integer, got {_type_name(value)}'
            )
        return self.convert(parse_size, value, key)

    def convert[T, R](self, parse: Callable[[T], R], value: T, key: str) -> R:
        try:
            return parse(value)
        except ValueError as e:
            raise self.error(key, str(e)) from e

    def path(self, value: object, key: str) -> Path:
        text = self.nonempty_string(value, key)
        if "\x00" in text:
            raise self.error(key, "must not contain a NUL character")
        return _absolute(text)

    def quota(self, value: object, key: str) -> Quota:
        table = self.table(value, key, _QUOTA_KEYS)
        rpm = self.positive_int(self.value(table, key, "rpm", _MISSING), f"{key}.rpm")
        tpm = self.positive_int(self.value(table, key, "tpm", _MISSING), f"{key}.tpm")
        return Quota(rpm=rpm, tpm=tpm)

    # ---- addresses

    def host_port(self, text: str, key: str, *, min_port: int) -> tuple[str, int | None]:
        """Split "host:port", "host" or "[v6]:port"; the host is returned without brackets."""
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise self.error(key, f"unclosed '[' in {text!r}")
            host, rest = text[1:end], text[end + 1 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as e:
                raise self.error(key, f"{host!r} is not an IPv6 address") from e
            if rest and not rest.startswith(":"):
                raise self.error(key, f"unexpected {rest!r} after ']' in {text!r}")
            port_text = rest[1:] if rest else None
        else:
            if text.count(":") > 1:
                raise self.error(
                    key, f"write an IPv6 address in brackets, e.g. [::1]:8080: {text!r}"
                )
            host, colon, port_part = text.partition(":")
            port_text = port_part if colon else None
            if not host:
                raise self.error(key, f"no host in {text!r}")
            if not _HOSTNAME.fullmatch(host):
                raise self.error(key, f"invalid host {host!r}")
        if port_text is None:
            return host, None
        if not _PORT.fullmatch(port_text) or not min_port <= int(port_text) <= 65535:
            raise self.error(key, f"port must be a number from {min_port} to 65535: {text!r}")
        return host, int(port_text)

    def listen_address(self, value: object, key: str, source: str = "") -> tuple[str, int]:
        text = self.nonempty_string(value, key)
        host, port = self.host_port(text, key, min_port=0)
        if port is None:
            raise self.error(key, f'expected "host:port", e.g. "127.0.0.1:8080"{source}: {text!r}')
        return host, port

    def upstream(self, value: object, source: str = "") -> str:
        key = "upstream"
        text = self.nonempty_string(value, key)
        if "://" not in text:
            raise self.error(
                key, f'expected an http:// or https:// URL such as "http://127.0.0.1:8000"{source}'
            )
        if any(c.isspace() or not c.isprintable() for c in text):
            raise self.error(key, f"must not contain whitespace or control characters{source}")
        parts = self.split_url(text, key)
        if parts.scheme.lower() not in ("http", "https"):
            raise self.error(key, f'expected an http:// or https:// URL{source}: "{text}"')
        if "@" in parts.netloc:
            raise self.error(key, f"must not contain credentials{source}")
        host, port = self.host_port(parts.netloc, key, min_port=1)
        if "?" in text or "#" in text or parts.path not in ("", "/"):
            raise self.error(
                key, f"only scheme, host and port are allowed, no path, query or fragment{source}"
            )
        host_text = f"[{host}]" if ":" in host else host
        port_text = f":{port}" if port is not None else ""
        return f"{parts.scheme.lower()}://{host_text}{port_text}"

    def split_url(self, text: str, key: str) -> SplitResult:
        try:
            parts = urlsplit(text)
        except ValueError as e:
            raise self.error(key, f"invalid URL: {e}") from e
        if not parts.scheme or not text.lower().startswith(parts.scheme.lower() + "://"):
            raise self.error(key, f'expected a URL such as "scheme://host": "{text}"')
        return parts

    # ---- sections

    def config(
        self,
        data: Mapping[str, Any],
        *,
        upstream_override: str | None,
        listen_override: str | None,
    ) -> Config:
        root = self.table(data, "", _TOP_KEYS)

        if upstream_override is not None:
            upstream = self.upstream(upstream_override, " (given on the command line)")
        else:
            upstream = self.upstream(self.value(root, "", "upstream", _MISSING))

        if listen_override is not None:
            listen = self.listen_address(listen_override, "listen", " (given on the command line)")
        else:
            listen = self.listen_address(root.get("listen", _DEFAULT_LISTEN), "listen")
        admin_listen = self.listen_address(
            root.get("admin_listen", _DEFAULT_ADMIN_LISTEN), "admin_listen"
        )
        if _same_socket(listen, admin_listen):
            raise self.error(
                "admin_listen",
                f"must differ from listen ({_format_hostport(*listen)}): "
                "the admin endpoints never share the proxy port",
            )

        tls_cert = self.path(root["tls_cert"], "tls_cert") if "tls_cert" in root else None
        tls_key = self.path(root["tls_key"], "tls_key") if "tls_key" in root else None
        if tls_cert is not None and tls_key is None:
            raise self.error("tls_key", "required when tls_cert is set")
        if tls_key is not None and tls_cert is None:
            raise self.error("tls_cert", "required when tls_key is set")

        body_limit = self.size(root.get("body_limit", _DEFAULT_BODY_LIMIT), "body_limit")
        if body_limit == 0:
            raise self.error("body_limit", "must be greater than 0")

        return Config(
            source=None,
            upstream=upstream,
            listen=listen,
            admin_listen=admin_listen,
            tls_cert=tls_cert,
            tls_key=tls_key,
            body_limit=body_limit,
            authority=self.authority(self.section(root, "authority", _AUTHORITY_KEYS)),
            token=self.token(self.section(root, "token", _TOKEN_KEYS)),
            phases=self.phases(root),
            limits=self.limits(self.section(root, "limits", _LIMITS_KEYS)),
            ratelimit=self.ratelimit(self.section(root, "ratelimit", _RATELIMIT_KEYS)),
            revocation=self.revocation(self.section(root, "revocation", _REVOCATION_KEYS)),
            log=self.log(self.section(root, "log", _LOG_KEYS)),
        )

    def authority(self, table: Mapping[str, Any]) -> Authority:
        p = "authority"
        issuer = self.nonempty_string(self.value(table, p, "issuer", _MISSING), f"{p}.issuer")
        audience = self.nonempty_string(self.value(table, p, "audience", _MISSING), f"{p}.audience")
        jwks = self.jwks(self.value(table, p, "jwks", _MISSING), f"{p}.jwks")
        algorithms = self.algorithms(
            self.value(table, p, "algorithms", list(_DEFAULT_ALGORITHMS)), f"{p}.algorithms"
        )
        leeway = self.duration(table.get("leeway", _DEFAULT_LEEWAY), f"{p}.leeway")
        if leeway > _MAX_LEEWAY:
            raise self.error(
                f"{p}.leeway", f"must be at most 5m, got {format_config_duration(leeway)}"
            )
        max_lifetime = self.duration(
            table.get("max_lifetime", _DEFAULT_MAX_LIFETIME), f"{p}.max_lifetime"
        )
        if max_lifetime <= 0:
            raise self.error(f"{p}.max_lifetime", "must be greater than 0")
        return Authority(
            issuer=issuer,
            audience=audience,
            jwks=jwks,
            algorithms=algorithms,
            leeway=leeway,
            max_lifetime=max_lifetime,
        )

    def jwks(self, value: object, key: str) -> str:
        text = self.nonempty_string(value, key)
        if "://" not in text:
            return str(self.path(text, key))
        parts = self.split_url(text, key)
        scheme = parts.scheme.lower()
        if scheme == "http":
            raise self.error(
                key, "http:// is refused: the trust store must come over https:// or from a file"
            )
        if scheme != "https":
            raise self.error(key, f"expected a file path or an https:// URL, got {scheme}://")
        if not parts.hostname:
            raise self.error(key, f'no host in "{text}"')
        try:
            _ = parts.port
        except ValueError as e:
            raise self.error(key, f"invalid port in {text!r}") from e
        if any(c.isspace() for c in text):
            raise self.error(key, "must not contain whitespace")
        return text

    def algorithms(self, value: object, key: str) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise self.error(key, f"expected an array of strings, got {_type_name(value)}")
        if not value:
            raise self.error(key, "must list at least one algorithm")
        seen: list[str] = []
        for index, item in enumerate(value):
            item_key = f"{key}[{index}]"
            name = self.string(item, item_key)
            if _SYMMETRIC_OR_NONE.fullmatch(name):
                raise self.error(item_key, f"{name!r}: {_SYMMETRIC_WHY}")
            if name not in ASYMMETRIC_ALGORITHMS:
                raise self.error(
                    item_key,
                    f"unknown algorithm {name!r} (names are case-sensitive); "
                    f"use one of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}",
                )
            if name in seen:
                raise self.error(item_key, f"{name} is listed twice")
            seen.append(name)
        return tuple(seen)

    def token(self, table: Mapping[str, Any]) -> TokenSettings:
        key = "token.header"
        header = self.nonempty_string(table.get("header", _DEFAULT_HEADER), key)
        if not _FIELD_NAME.fullmatch(header):
            raise self.error(key, f"{header!r} is not a valid HTTP header name")
        # Servers and proxies may treat "_" like "-": compare both spellings.
        folded = header.lower().replace("_", "-")
        if folded.startswith("x-cohortgate-"):
            raise self.error(
                key, f"{header!r}: x-cohortgate-* headers are the gate's own and are stripped"
            )
        if folded in _RESERVED_HEADERS:
            raise self.error(
                key, f"{header!r} is a hop-by-hop or message-framing header, or one the gate sets"
            )
        forward = self.boolean(table.get("forward", False), "token.forward")
        return TokenSettings(header=header, forward=forward)

    def phases(self, root: Mapping[str, Any]) -> tuple[Phase, ...]:
        if "phases" not in root:
            return (Phase(name="default", until=None, cohorts=frozenset({"*"}), unapproved=None),)
        value = root["phases"]
        if isinstance(value, Mapping):
            raise self.error("phases", "expected an array of tables ([[phases]]), got a table")
        if not isinstance(value, list | tuple):
            raise self.error("phases", f"expected an array of tables, got {_type_name(value)}")
        if not value:
            raise self.error("phases", "at least one phase is required")
        phases: list[Phase] = []
        for index, item in enumerate(value):
            phase = self.phase(item, f"phases[{index}]", index)
            previous = phases[-1] if phases else None
            if previous is not None and previous.until is None:
                raise self.error(
                    f"phases[{index - 1}].until",
                    f"required: only the last phase may omit it ({previous.name!r} is not last)",
                )
            if (
                previous is not None
                and previous.until is not None
                and phase.until is not None
                and phase.until <= previous.until
            ):
                raise self.error(
                    f"phases[{index}].until",
                    f"must be later than phases[{index - 1}].until "
                    f"({_format_time(previous.until)}): phases are listed in increasing until",
                )
            if any(p.name == phase.name for p in phases):
                raise self.error(f"phases[{index}].name", f"{phase.name!r} is used twice")
            phases.append(phase)
        return tuple(phases)

    def phase(self, value: object, key: str, index: int) -> Phase:
        table = self.table(value, key, _PHASE_KEYS)
        name = self.nonempty_string(table.get("name", f"phase-{index}"), f"{key}.name")
        until = self.until(table["until"], f"{key}.until") if "until" in table else None
        cohorts = self.cohorts(table.get("cohorts", ["*"]), f"{key}.cohorts")
        unapproved_value = table.get("unapproved", "block")
        unapproved: Quota | None
        if isinstance(unapproved_value, str):
            if unapproved_value != "block":
                raise self.error(
                    f"{key}.unapproved",
                    f'expected "block" or a table {{rpm, tpm}}, got "{unapproved_value}"',
                )
            unapproved = None
        elif isinstance(unapproved_value, Mapping):
            unapproved = self.quota(unapproved_value, f"{key}.unapproved")
        else:
            raise self.error(
                f"{key}.unapproved",
                f'expected "block" or a table {{rpm, tpm}}, got {_type_name(unapproved_value)}',
            )
        return Phase(name=name, until=until, cohorts=cohorts, unapproved=unapproved)

    def until(self, value: object, key: str) -> datetime:
        if isinstance(value, datetime):
            moment = value
        elif isinstance(value, date | time):
            raise self.error(
                key, f"a {_type_name(value)} is not enough: write e.g. 2026-12-10T00:00:00Z"
            )
        elif isinstance(value, str):
            if not _RFC3339.fullmatch(value):
                raise self.error(
                    key,
                    f'expected an RFC 3339 time with a timezone, e.g. "2026-12-10T00:00:00Z", '
                    f'got "{value}"',
                )
            try:
                moment = datetime.fromisoformat(value.upper())
            except ValueError as e:
                raise self.error(key, f'invalid time "{value}": {e}') from e
        else:
            raise self.error(
                key, f"expected an RFC 3339 time string or datetime, got {_type_name(value)}"
            )
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise self.error(
                key, "a time without a timezone is ambiguous: add Z or an offset such as +01:00"
            )
        return moment.astimezone(UTC)

    def cohorts(self, value: object, key: str) -> frozenset[str]:
        if not isinstance(value, list | tuple):
            raise self.error(key, f"expected an array of strings, got {_type_name(value)}")
        if not value:
            raise self.error(key, 'must list at least one cohort ("*" admits every cohort)')
        return frozenset(
            self.nonempty_string(item, f"{key}[{index}]") for index, item in enumerate(value)
        )

    def limits(self, table: Mapping[str, Any]) -> LimitSettings:
        default = (
            self.quota(table["default"], "limits.default") if "default" in table else _DEFAULT_LIMIT
        )
        ceiling = self.quota(table["max"], "limits.max") if "max" in table else _DEFAULT_MAX
        for name in _QUOTA_KEYS:
            wanted, allowed = getattr(default, name), getattr(ceiling, name)
            if wanted > allowed:
                raise self.error(
                    f"limits.default.{name}", f"{wanted} exceeds limits.max.{name} ({allowed})"
                )
        return LimitSettings(default=default, max=ceiling)

    def ratelimit(self, table: Mapping[str, Any]) -> RateLimitSettings:
        backend = self.backend(table.get("backend", _DEFAULT_BACKEND), "ratelimit.backend")
        on_error = self.string(table.get("on_error", _DEFAULT_ON_ERROR), "ratelimit.on_error")
        if on_error not in _ON_ERROR_CHOICES:
            raise self.error(
                "ratelimit.on_error",
                f'expected one of {", ".join(_ON_ERROR_CHOICES)}, got "{on_error}"',
            )
        timeout = self.duration(table.get("timeout", _DEFAULT_TIMEOUT), "ratelimit.timeout")
        if not 0 < timeout <= _MAX_TIMEOUT:
            raise self.error(
                "ratelimit.timeout",
                f"must be greater than 0 and at most 10s, got {format_config_duration(timeout)}",
            )
        return RateLimitSettings(backend=backend, on_error=on_error, timeout=timeout)

    def backend(self, value: object, key: str) -> str:
        text = self.nonempty_string(value, key)
        if text == "memory":
            return text
        expected = (
            'expected "memory" or a redis://, rediss://, unix://, redis+cluster:// or'
            " rediss+cluster:// URL"
        )
        if "://" not in text:
            raise self.error(key, f'{expected}, got "{text}"')
        parts = self.split_url(text, key)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise self.error(key, f"{expected}, got {scheme}://")
        if any(c.isspace() for c in text):
            raise self.error(key, "must not contain whitespace")
        if scheme == "unix":
            if not parts.path or parts.path == "/":
                raise self.error(key, 'no socket path: write e.g. "unix:///run/redis.sock"')
            return text
        if not parts.hostname:
            raise self.error(key, f'no host: write e.g. "{scheme}://127.0.0.1:6379/0"')
        try:
            _ = parts.port
        except ValueError as e:
            raise self.error(key, "invalid port") from e
        if not _REDIS_DB_PATH.fullmatch(parts.path):
            raise self.error(
                key, f"the path must be a database number, e.g. /0, got {parts.path!r}"
            )
        # Redis Cluster has database 0 only.
        if scheme.endswith("+cluster") and parts.path.strip("/") not in ("", "0"):
            raise self.error(key, f"Redis Cluster has database 0 only, got {parts.path!r}")
        return text

    def revocation(self, table: Mapping[str, Any]) -> RevocationSettings:
        return RevocationSettings(
            file=self.path(table.get("file", _DEFAULT_REVOCATIONS), "revocation.file")
        )

    def log(self, table: Mapping[str, Any]) -> LogSettings:
        decisions_value = table.get("decisions", _DEFAULT_DECISIONS)
        decisions = None if decisions_value == "-" else self.path(decisions_value, "log.decisions")
        rotate_bytes = self.size(table.get("rotate_bytes", _DEFAULT_ROTATE), "log.rotate_bytes")
        return LogSettings(decisions=decisions, rotate_bytes=rotate_bytes)


_ANY_HOST: Final = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (compared, never bound)


def _same_socket(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two listen addresses would collide (port 0 picks a free port: never collides)."""
    if a[1] != b[1] or a[1] == 0:
        return False
    return a[0].lower() == b[0].lower() or a[0] in _ANY_HOST or b[0] in _ANY_HOST


# --------------------------------------------------------------------------- describe


def _format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _format_quota(quota: Quota) -> str:
    return f"{quota.rpm} rpm, {quota.tpm} tpm"


def _redact_url(url: str) -> str:
    """The URL with any password replaced, so `check` output can be pasted into a ticket."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def describe(cfg: Config) -> str:
    """The effective policy in plain text, every default filled in and every path absolute."""
    auth = cfg.authority
    lines = [
        f"config        {cfg.source if cfg.source is not None else '(built in code)'}",
        f"upstream      {cfg.upstream}",
        f"listen        {_format_hostport(*cfg.listen)}",
        f"admin_listen  {_format_hostport(*cfg.admin_listen)}",
    ]
    if cfg.tls_cert is not None and cfg.tls_key is not None:
        lines.append(f"tls_cert      {cfg.tls_cert}")
        lines.append(f"tls_key       {cfg.tls_key}")
    else:
        lines.append("tls           off (plain HTTP only)")
    lines += [
        f"body_limit    {format_size(cfg.body_limit)} ({cfg.body_limit} bytes)",
        "",
        "[authority]",
        f"  issuer        {auth.issuer}",
        f"  audience      {auth.audience}",
        f"  jwks          {auth.jwks}",
        f"  algorithms    {', '.join(auth.algorithms)}",
        f"  leeway        {format_config_duration(auth.leeway)}",
        f"  max_lifetime  {format_config_duration(auth.max_lifetime)}",
        "",
        "[token]",
        f"  header        {cfg.token.header}"
        + ("  (Bearer <jwt>)" if cfg.token.bearer else "  (the bare JWT)"),
        f"  forward       {'yes' if cfg.token.forward else 'no (removed before forwarding)'}",
        "",
        "[phases]  (the first whose until is in the future applies)",
    ]
    for number, phase in enumerate(cfg.phases):
        until = f"until {_format_time(phase.until)}" if phase.until else "open-ended"
        cohorts = ", ".join(sorted(phase.cohorts))
        if "*" in phase.cohorts:
            cohorts += "  (every cohort)"
        unapproved = "block" if phase.unapproved is None else _format_quota(phase.unapproved)
        lines += [
            f"  [{number}] {phase.name}: {until}",
            f"      cohorts     {cohorts}",
            f"      unapproved  {unapproved}",
        ]
    if cfg.phases[-1].until is not None:
        lines.append(
            f"  after {_format_time(cfg.phases[-1].until)}: no phase, every approval is refused"
        )
    rotate = (
        "0 (never rotate)"
        if cfg.log.rotate_bytes == 0
        else f"{format_size(cfg.log.rotate_bytes)} ({cfg.log.rotate_bytes} bytes)"
    )
    lines += [
        "",
        "[limits]",
        f"  default       {_format_quota(cfg.limits.default)}",
        f"  max           {_format_quota(cfg.limits.max)}",
        "",
        "[ratelimit]",
        f"  backend       {_redact_url(cfg.ratelimit.backend)}",
        f"  on_error      {cfg.ratelimit.on_error}",
        f"  timeout       {format_config_duration(cfg.ratelimit.timeout)}",
        "",
        "[revocation]",
        f"  file          {cfg.revocation.file}",
        "",
        "[log]",
        f"  decisions     {cfg.log.decisions if cfg.log.decisions else '- (standard output)'}",
        f"  rotate_bytes  {rotate}",
    ]
    return "\n".join(lines)
