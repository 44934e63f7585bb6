"""Loading and validating the policy (cohortgate.config)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import time
from datetime import timedelta
from datetime import timezone
from pathlib import Path
from typing import Any

import pytest

from cohortgate.config import ASYMMETRIC_ALGORITHMS
from cohortgate.config import Config
from cohortgate.config import ConfigError
from cohortgate.config import Phase
from cohortgate.config import Quota
from cohortgate.config import TokenSettings
from cohortgate.config import describe
from cohortgate.config import load_config
from cohortgate.config import parse_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "cohortgate.toml"
DELETE = object()
EVERY_INTERFACE = "0.0.0.0"  # noqa: S104 (parsed, never bound)

MINIMAL_TOML = """\
upstream = "http://127.0.0.1:8000"

[authority]
issuer = "https://approvals.example.gov"
audience = "gpt-5.6"
jwks = "keys/jwks.json"
"""


def minimal() -> dict[str, Any]:
    """The smallest valid document: only the keys without a default."""
    return {
        "upstream": "http://127.0.0.1:8000",
        "authority": {
            "issuer": "https://approvals.example.gov",
            "audience": "gpt-5.6",
            "jwks": "keys/jwks.json",
        },
    }


def document(changes: dict[str, object]) -> dict[str, Any]:
    """minimal() with dotted keys set (tables created on the way) or removed (DELETE)."""
    data = minimal()
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        table = data
        for name in parents:
            table = table.setdefault(name, {})
        if value is DELETE:
            del table[last]
        else:
            table[last] = copy.deepcopy(value)
    return data


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def two_phases(**second: object) -> list[dict[str, object]]:
    return [
        {"name": "preview", "until": "2026-12-10T00:00:00Z", "cohorts": ["preview-1"]},
        {"name": "general", "cohorts": ["*"], **second},
    ]


# --------------------------------------------------------------------------- the example


def test_example_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    cfg = load_config(EXAMPLE)
    assert cfg.source == EXAMPLE
    assert cfg.upstream == "http://127.0.0.1:8000"
    assert cfg.listen == ("127.0.0.1", 8080)
    assert cfg.admin_listen == ("127.0.0.1", 9090)
    assert (cfg.tls_cert, cfg.tls_key) == (None, None)
    assert cfg.body_limit == 16_000_000
    assert cfg.authority.issuer == "https://approvals.example.gov"
    assert cfg.authority.audience == "gpt-5.6"
    assert cfg.authority.jwks == str(REPO / "keys" / "jwks.json")
    assert cfg.authority.algorithms == ("EdDSA",)
    assert cfg.authority.leeway == 30.0
    assert cfg.authority.max_lifetime == 30 * 86400.0
    assert cfg.token == TokenSettings(header="Authorization", forward=False)
    assert cfg.token.bearer
    assert cfg.phases == (
        Phase(
            name="preview",
            until=datetime(2026, 12, 10, tzinfo=UTC),
            cohorts=frozenset({"preview-1"}),
            unapproved=None,
        ),
        Phase(name="general", until=None, cohorts=frozenset({"*"}), unapproved=Quota(5, 2000)),
    )
    assert cfg.limits.default == Quota(rpm=60, tpm=100_000)
    assert cfg.limits.max == Quota(rpm=600, tpm=1_000_000)
    assert cfg.ratelimit.backend == "memory"
    assert cfg.ratelimit.on_error == "local"
    assert cfg.ratelimit.timeout == pytest.approx(0.05)
    assert cfg.revocation.file == REPO / "config" / "revocations.json"
    assert cfg.log.decisions == REPO / "logs" / "decisions.jsonl"
    assert cfg.log.rotate_bytes == 100_000_000


def test_example_config_keeps_its_comments() -> None:
    text = EXAMPLE.read_text()
    assert "# the inference API" in text
    assert "# local | open | closed, when the backend fails" in text
    assert 'body_limit = "16MB"' in text


# --------------------------------------------------------------------------- defaults


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(minimal())
    assert cfg.source is None
    assert cfg.listen == ("127.0.0.1", 8080)
    assert cfg.admin_listen == ("127.0.0.1", 9090)
    assert (cfg.tls_cert, cfg.tls_key) == (None, None)
    assert cfg.body_limit == 16 * 10**6
    assert cfg.authority.jwks == str(tmp_path / "keys" / "jwks.json")
    assert cfg.authority.algorithms == ("EdDSA",)
    assert cfg.authority.leeway == 30.0
    assert cfg.authority.max_lifetime == 30 * 86400.0
    assert cfg.token == TokenSettings(header="Authorization", forward=False)
    assert cfg.phases == (
        Phase(name="default", until=None, cohorts=frozenset({"*"}), unapproved=None),
    )
    assert cfg.limits.default == Quota(rpm=60, tpm=100_000)
    assert cfg.limits.max == Quota(rpm=600, tpm=1_000_000)
    assert cfg.ratelimit.backend == "memory"
    assert cfg.ratelimit.on_error == "local"
    assert cfg.ratelimit.timeout == pytest.approx(0.05)
    assert cfg.revocation.file == tmp_path / "config" / "revocations.json"
    assert cfg.log.decisions == tmp_path / "logs" / "decisions.jsonl"
    assert cfg.log.rotate_bytes == 100 * 10**6


def test_phase_defaults() -> None:
    cfg = parse_config(document({"phases": [{"until": "2026-01-01T00:00:00Z"}, {}]}))
    assert [p.name for p in cfg.phases] == ["phase-0", "phase-1"]
    assert all(p.cohorts == frozenset({"*"}) and p.unapproved is None for p in cfg.phases)


def test_config_is_frozen() -> None:
    cfg = parse_config(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.upstream = "http://elsewhere:1"  # type: ignore[misc]


# --------------------------------------------------------------------------- accepted values


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        ({"upstream": "https://api.example.com"}, "upstream", "https://api.example.com"),
        ({"upstream": "HTTP://Example.com:443/"}, "upstream", "http://Example.com:443"),
        ({"upstream": "http://[::1]:8000"}, "upstream", "http://[::1]:8000"),
        ({"upstream": "http://model-server:8000"}, "upstream", "http://model-server:8000"),
        ({"listen": "[::1]:8443"}, "listen", ("::1", 8443)),
        ({"listen": "0.0.0.0:80"}, "listen", (EVERY_INTERFACE, 80)),
        ({"listen": "localhost:65535"}, "listen", ("localhost", 65535)),
        ({"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}, "listen", ("127.0.0.1", 0)),
        ({"listen": "127.0.0.1:8080", "admin_listen": "[::1]:9091"}, "admin_listen", ("::1", 9091)),
        ({"body_limit": 1048576}, "body_limit", 1048576),
        ({"body_limit": "8KiB"}, "body_limit", 8192),
    ],
)
def test_top_level_values(changes: dict[str, object], attribute: str, expected: object) -> None:
    assert getattr(parse_config(document(changes)), attribute) == expected


@pytest.mark.parametrize(
    "algorithms",
    [["EdDSA"], ["ES256", "ES384"], ["RS256", "PS256", "EdDSA"], sorted(ASYMMETRIC_ALGORITHMS)],
)
def test_asymmetric_algorithms_accepted(algorithms: list[str]) -> None:
    cfg = parse_config(document({"authority.algorithms": algorithms}))
    assert cfg.authority.algorithms == tuple(algorithms)


def test_accepted_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        document(
            {
                "tls_cert": "tls/cert.pem",
                "tls_key": "/etc/cohortgate/key.pem",
                "authority.jwks": "https://approvals.example.gov/.well-known/jwks.json",
                "authority.leeway": "5m",
                "authority.max_lifetime": "1h30m",
                "token.header": "X-Approval-Token",
                "token.forward": True,
                "limits.default": {"rpm": 600, "tpm": 1_000_000},
                "ratelimit.backend": "rediss://:secret@redis.internal:6380/2",
                "ratelimit.on_error": "closed",
                "ratelimit.timeout": "10s",
                "log.decisions": "-",
                "log.rotate_bytes": 0,
            }
        )
    )
    assert cfg.tls_cert == tmp_path / "tls" / "cert.pem"
    assert cfg.tls_key == Path("/etc/cohortgate/key.pem")
    assert cfg.authority.jwks == "https://approvals.example.gov/.well-known/jwks.json"
    assert cfg.authority.leeway == 300.0
    assert cfg.authority.max_lifetime == 5400.0
    assert cfg.token == TokenSettings(header="X-Approval-Token", forward=True)
    assert not cfg.token.bearer
    assert cfg.limits.default == cfg.limits.max
    assert cfg.ratelimit.backend == "rediss://:secret@redis.internal:6380/2"
    assert cfg.ratelimit.on_error == "closed"
    assert cfg.ratelimit.timeout == 10.0
    assert cfg.log.decisions is None
    assert cfg.log.rotate_bytes == 0


@pytest.mark.parametrize(
    "backend",
    [
        "memory",
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "unix:///run/redis.sock",
        "redis+cluster://10.0.0.1:7000",
        "rediss+cluster://:secret@redis.internal:7000/0",
    ],
)
def test_backends_accepted(backend: str) -> None:
    assert parse_config(document({"ratelimit.backend": backend})).ratelimit.backend == backend


@pytest.mark.parametrize(("header", "bearer"), [("authorization", True), ("X-Token", False)])
def test_token_bearer(header: str, bearer: bool) -> None:
    assert parse_config(document({"token.header": header})).token.bearer is bearer


@pytest.mark.parametrize(
    ("until", "expected"),
    [
        ("2026-12-10T00:00:00Z", datetime(2026, 12, 10, tzinfo=UTC)),
        ("2026-12-10t01:00:00+01:00", datetime(2026, 12, 10, tzinfo=UTC)),
        ("2026-12-09T19:00:00.5-05:00", datetime(2026, 12, 10, 0, 0, 0, 500_000, tzinfo=UTC)),
        (
            datetime(2026, 12, 10, 2, tzinfo=timezone(timedelta(hours=2))),
            datetime(2026, 12, 10, tzinfo=UTC),
        ),
    ],
)
def test_until_is_utc(until: object, expected: datetime) -> None:
    phase = parse_config(document({"phases": [{"name": "p", "until": until}]})).phases[0]
    assert phase.until == expected
    assert phase.until is not None
    assert phase.until.utcoffset() == timedelta(0)


def test_until_as_toml_datetime(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL_TOML + '\n[[phases]]\nname = "p"\nuntil = 2026-12-10T00:00:00+01:00\n')
    assert load_config(path).phases[0].until == datetime(2026, 12, 9, 23, tzinfo=UTC)


def test_relative_paths_resolve_against_cwd_not_config_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    path = tmp_path / "etc" / "gate.toml"
    path.write_text(MINIMAL_TOML + '\n[revocation]\nfile = "state/../revoked.json"\n')
    monkeypatch.chdir(tmp_path / "run")
    cfg = load_config("../etc/gate.toml")
    assert cfg.source == path
    assert cfg.revocation.file == tmp_path / "run" / "revoked.json"
    assert cfg.authority.jwks == str(tmp_path / "run" / "keys" / "jwks.json")


def test_paths_need_not_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(document({"tls_cert": "nope.pem", "tls_key": "nope.key"}))
    assert cfg.tls_cert is not None
    assert not cfg.tls_cert.exists()
    assert not cfg.revocation.file.exists()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        # unknown keys, at every level
        ({"upstrem": "http://x:1"}, "upstrem", "did you mean 'upstream'"),
        ({"ratelimit.backnd": "memory"}, "ratelimit.backnd", "unknown key"),
        ({"authority.issuers": "x"}, "authority.issuers", "unknown key"),
        ({"token.strip": True}, "token.strip", "unknown key"),
        ({"limits.burst": 5}, "limits.burst", "unknown key"),
        ({"limits.max": {"rpm": 1, "tpm": 1, "rps": 1}}, "limits.max.rps", "unknown key"),
        ({"revocation.path": "x"}, "revocation.path", "unknown key"),
        ({"log.level": "info"}, "log.level", "unknown key"),
        ({"phases": two_phases(cohort=["a"])}, "phases[1].cohort", "unknown key"),
        # required keys
        ({"upstream": DELETE}, "upstream", "required"),
        ({"authority.issuer": DELETE}, "authority.issuer", "required"),
        ({"authority.audience": DELETE}, "authority.audience", "required"),
        ({"authority.jwks": DELETE}, "authority.jwks", "required"),
        ({"authority": DELETE}, "authority.issuer", "required"),
        # strict types
        (
            {"authority": "https://approvals.example.gov"},
            "authority",
            "expected a table, got string",
        ),
        ({"token": ["Authorization"]}, "token", "expected a table, got array"),
        ({"log": []}, "log", "expected a table, got array"),
        ({"ratelimit": True}, "ratelimit", "expected a table, got boolean"),
        ({"upstream": 8000}, "upstream", "expected a string, got integer"),
        ({"listen": 8080}, "listen", "expected a string, got integer"),
        ({"token.forward": "yes"}, "token.forward", "expected true or false, got string"),
        ({"token.forward": 1}, "token.forward", "expected true or false, got integer"),
        ({"limits.default": "60"}, "limits.default", "expected a table, got string"),
        ({"limits.max": {"rpm": True, "tpm": 1}}, "limits.max.rpm", "expected an integer"),
        ({"limits.max": {"rpm": 1.0, "tpm": 1}}, "limits.max.rpm", "expected an integer"),
        # upstream
        ({"upstream": "127.0.0.1:8000"}, "upstream", "http:// or https://"),
        ({"upstream": "ftp://files.example"}, "upstream", "http:// or https://"),
        ({"upstream": "http://"}, "upstream", "no host"),
        ({"upstream": "http://h:"}, "upstream", "port must be a number from 1"),
        ({"upstream": "http://h:0"}, "upstream", "port must be a number from 1"),
        ({"upstream": "http://h:65536"}, "upstream", "port must be a number from 1"),
        ({"upstream": "http://h:80/v1"}, "upstream", "no path, query or fragment"),
        ({"upstream": "http://h:80/?"}, "upstream", "no path, query or fragment"),
        ({"upstream": "http://h:80#top"}, "upstream", "no path, query or fragment"),
        ({"upstream": "http://user:pw@h:80"}, "upstream", "credentials"),
        ({"upstream": "http://h :80"}, "upstream", "whitespace"),
        ({"upstream": "http://[::1:80"}, "upstream", "invalid URL"),
        ({"upstream": "http://::1:80"}, "upstream", "brackets"),
        ({"upstream": ""}, "upstream", "must not be empty"),
        # listen and admin_listen
        ({"listen": "127.0.0.1"}, "listen", 'expected "host:port"'),
        ({"listen": "::1:8080"}, "listen", "brackets"),
        ({"listen": "[::1]8080"}, "listen", "unexpected"),
        ({"listen": "[nothost]:8080"}, "listen", "not an IPv6 address"),
        ({"listen": ":8080"}, "listen", "no host"),
        ({"listen": "127.0.0.1:65536"}, "listen", "port must be a number from 0 to 65535"),
        ({"listen": "127.0.0.1:-1"}, "listen", "port must be a number"),
        ({"listen": "127.0.0.1:http"}, "listen", "port must be a number"),
        ({"listen": "bad host:80"}, "listen", "invalid host"),
        ({"admin_listen": "127.0.0.1:8080"}, "admin_listen", "must differ from listen"),
        ({"admin_listen": "0.0.0.0:8080"}, "admin_listen", "must differ from listen"),
        (
            {"listen": "[::]:7000", "admin_listen": "localhost:7000"},
            "admin_listen",
            "must differ from listen",
        ),
        # TLS
        ({"tls_cert": "cert.pem"}, "tls_key", "required when tls_cert is set"),
        ({"tls_key": "key.pem"}, "tls_cert", "required when tls_key is set"),
        ({"tls_cert": "", "tls_key": "k"}, "tls_cert", "must not be empty"),
        ({"tls_cert": "c\x00", "tls_key": "k"}, "tls_cert", "NUL"),
        # body_limit
        ({"body_limit": 0}, "body_limit", "greater than 0"),
        ({"body_limit": -1}, "body_limit", "negative"),
        ({"body_limit": "16 megabytes"}, "body_limit", "unknown size unit"),
        ({"body_limit": True}, "body_limit", "expected a size"),
        ({"body_limit": 1.5}, "body_limit", "expected a size"),
        # authority
        ({"authority.issuer": ""}, "authority.issuer", "must not be empty"),
        ({"authority.audience": "   "}, "authority.audience", "must not be empty"),
        ({"authority.issuer": 5}, "authority.issuer", "expected a string"),
        ({"authority.audience": ["a", "b"]}, "authority.audience", "expected a string"),
        (
            {"authority.jwks": "http://keys.example/jwks.json"},
            "authority.jwks",
            "http:// is refused",
        ),
        (
            {"authority.jwks": "HTTP://keys.example/jwks.json"},
            "authority.jwks",
            "http:// is refused",
        ),
        ({"authority.jwks": "file:///etc/jwks.json"}, "authority.jwks", "file path or an https"),
        ({"authority.jwks": "https:///jwks.json"}, "authority.jwks", "no host"),
        ({"authority.jwks": "https://h:99999/j"}, "authority.jwks", "invalid port"),
        ({"authority.jwks": ""}, "authority.jwks", "must not be empty"),
        ({"authority.algorithms": []}, "authority.algorithms", "at least one"),
        ({"authority.algorithms": "EdDSA"}, "authority.algorithms", "expected an array"),
        ({"authority.algorithms": ["none"]}, "authority.algorithms[0]", "symmetric/none"),
        ({"authority.algorithms": ["NoNe"]}, "authority.algorithms[0]", "forged with the public"),
        ({"authority.algorithms": ["EdDSA", "HS256"]}, "authority.algorithms[1]", "symmetric"),
        ({"authority.algorithms": ["HS384"]}, "authority.algorithms[0]", "symmetric/none"),
        ({"authority.algorithms": ["hs512"]}, "authority.algorithms[0]", "symmetric/none"),
        ({"authority.algorithms": ["RS512"]}, "authority.algorithms[0]", "unknown algorithm"),
        ({"authority.algorithms": ["eddsa"]}, "authority.algorithms[0]", "case-sensitive"),
        ({"authority.algorithms": [256]}, "authority.algorithms[0]", "expected a string"),
        ({"authority.algorithms": ["ES256", "ES256"]}, "authority.algorithms[1]", "twice"),
        ({"authority.leeway": "6m"}, "authority.leeway", "at most 5m"),
        ({"authority.leeway": "5m1ms"}, "authority.leeway", "at most 5m"),
        ({"authority.leeway": 30}, "authority.leeway", "expected a duration string"),
        ({"authority.leeway": "30"}, "authority.leeway", "no unit"),
        ({"authority.leeway": "-1s"}, "authority.leeway", "invalid duration"),
        ({"authority.max_lifetime": "0s"}, "authority.max_lifetime", "greater than 0"),
        ({"authority.max_lifetime": "30 days"}, "authority.max_lifetime", "invalid duration"),
        # token
        ({"token.header": "X Approval"}, "token.header", "not a valid HTTP header name"),
        ({"token.header": "X-Approval:"}, "token.header", "not a valid HTTP header name"),
        ({"token.header": "X-Äpproval"}, "token.header", "not a valid HTTP header name"),
        ({"token.header": ""}, "token.header", "must not be empty"),
        ({"token.header": 1}, "token.header", "expected a string"),
        ({"token.header": "X-Cohortgate-Token"}, "token.header", "x-cohortgate-*"),
        ({"token.header": "x_cohortgate_token"}, "token.header", "x-cohortgate-*"),
        ({"token.header": "X-COHORTGATE-Customer"}, "token.header", "x-cohortgate-*"),
        ({"token.header": "Connection"}, "token.header", "hop-by-hop"),
        ({"token.header": "host"}, "token.header", "hop-by-hop"),
        ({"token.header": "Content-Length"}, "token.header", "hop-by-hop"),
        ({"token.header": "content_length"}, "token.header", "hop-by-hop"),
        ({"token.header": "Transfer-Encoding"}, "token.header", "hop-by-hop"),
        ({"token.header": "Upgrade"}, "token.header", "hop-by-hop"),
        ({"token.header": "TE"}, "token.header", "hop-by-hop"),
        ({"token.header": "Proxy-Authorization"}, "token.header", "hop-by-hop"),
        ({"token.header": "X-Request-Id"}, "token.header", "one the gate sets"),
        # phases
        ({"phases": []}, "phases", "at least one phase"),
        ({"phases": {"name": "p"}}, "phases", "[[phases]]"),
        ({"phases": "general"}, "phases", "expected an array of tables, got string"),
        ({"phases": ["general"]}, "phases[0]", "expected a table, got string"),
        ({"phases": [{"name": ""}]}, "phases[0].name", "must not be empty"),
        ({"phases": [{"name": 1}]}, "phases[0].name", "expected a string"),
        (
            {"phases": [{"name": "a", "until": "2026-01-01T00:00:00Z"}, {"name": "a"}]},
            "phases[1].name",
            "used twice",
        ),
        ({"phases": [{"until": "2026-12-10T00:00:00"}]}, "phases[0].until", "with a timezone"),
        ({"phases": [{"until": "2026-12-10"}]}, "phases[0].until", "RFC 3339"),
        ({"phases": [{"until": "2026-12-10T00:00Z"}]}, "phases[0].until", "RFC 3339"),
        ({"phases": [{"until": "20261210T000000Z"}]}, "phases[0].until", "RFC 3339"),
        ({"phases": [{"until": "next tuesday"}]}, "phases[0].until", "RFC 3339"),
        ({"phases": [{"until": "2026-13-01T00:00:00Z"}]}, "phases[0].until", "invalid time"),
        ({"phases": [{"until": datetime(2026, 12, 10)}]}, "phases[0].until", "without a timezone"),
        ({"phases": [{"until": date(2026, 12, 10)}]}, "phases[0].until", "a date is not enough"),
        ({"phases": [{"until": time(12)}]}, "phases[0].until", "a time is not enough"),
        ({"phases": [{"until": 1796860800}]}, "phases[0].until", "got integer"),
        (
            {"phases": [{"name": "a"}, {"name": "b", "until": "2026-01-01T00:00:00Z"}]},
            "phases[0].until",
            "only the last phase may omit it",
        ),
        (
            {"phases": [{"name": "a"}, {"name": "b"}]},
            "phases[0].until",
            "only the last phase may omit it",
        ),
        (
            {
                "phases": [
                    {"name": "a", "until": "2026-06-01T00:00:00Z"},
                    {"name": "b", "until": "2026-01-01T00:00:00Z"},
                ]
            },
            "phases[1].until",
            "must be later than phases[0].until",
        ),
        (
            {
                "phases": [
                    {"name": "a", "until": "2026-06-01T02:00:00+02:00"},
                    {"name": "b", "until": "2026-06-01T00:00:00Z"},
                ]
            },
            "phases[1].until",
            "must be later",
        ),
        ({"phases": two_phases(cohorts=[])}, "phases[1].cohorts", "at least one cohort"),
        ({"phases": two_phases(cohorts="*")}, "phases[1].cohorts", "expected an array"),
        ({"phases": two_phases(cohorts=["a", ""])}, "phases[1].cohorts[1]", "must not be empty"),
        ({"phases": two_phases(cohorts=[1])}, "phases[1].cohorts[0]", "expected a string"),
        ({"phases": two_phases(unapproved="throttle")}, "phases[1].unapproved", '"block"'),
        ({"phases": two_phases(unapproved="Block")}, "phases[1].unapproved", '"block"'),
        ({"phases": two_phases(unapproved=5)}, "phases[1].unapproved", "got integer"),
        ({"phases": two_phases(unapproved=False)}, "phases[1].unapproved", "got boolean"),
        ({"phases": two_phases(unapproved={"rpm": 5})}, "phases[1].unapproved.tpm", "required"),
        (
            {"phases": two_phases(unapproved={"rpm": 0, "tpm": 10})},
            "phases[1].unapproved.rpm",
            "positive",
        ),
        (
            {"phases": two_phases(unapproved={"rpm": 5, "tpm": -10})},
            "phases[1].unapproved.tpm",
            "positive",
        ),
        (
            {"phases": two_phases(unapproved={"rpm": 5, "tpm": 1, "burst": 2})},
            "phases[1].unapproved.burst",
            "unknown key",
        ),
        # limits
        (
            {"limits.default": {"rpm": 601, "tpm": 1}},
            "limits.default.rpm",
            "exceeds limits.max.rpm",
        ),
        (
            {"limits.max": {"rpm": 60, "tpm": 99_999}},
            "limits.default.tpm",
            "exceeds limits.max.tpm (99999)",
        ),
        ({"limits.max": {"rpm": -1, "tpm": 1}}, "limits.max.rpm", "positive"),
        ({"limits.default": {"tpm": 1}}, "limits.default.rpm", "required"),
        # ratelimit
        ({"ratelimit.backend": "redis"}, "ratelimit.backend", 'expected "memory" or a redis://'),
        ({"ratelimit.backend": "Memory"}, "ratelimit.backend", 'expected "memory"'),
        ({"ratelimit.backend": "http://redis:6379"}, "ratelimit.backend", "got http://"),
        ({"ratelimit.backend": "redis://"}, "ratelimit.backend", "no host"),
        ({"ratelimit.backend": "redis://h:99999/0"}, "ratelimit.backend", "invalid port"),
        ({"ratelimit.backend": "redis://h/zero"}, "ratelimit.backend", "database number"),
        ({"ratelimit.backend": "unix://"}, "ratelimit.backend", "no socket path"),
        ({"ratelimit.backend": "redis+cluster://h:7000/1"}, "ratelimit.backend", "database 0"),
        ({"ratelimit.backend": "redis+sentinel://h"}, "ratelimit.backend", "got redis+sentinel"),
        ({"ratelimit.backend": ""}, "ratelimit.backend", "must not be empty"),
        ({"ratelimit.on_error": "fail"}, "ratelimit.on_error", "local, open, closed"),
        ({"ratelimit.on_error": 1}, "ratelimit.on_error", "expected a string"),
        ({"ratelimit.timeout": "0s"}, "ratelimit.timeout", "greater than 0"),
        ({"ratelimit.timeout": "11s"}, "ratelimit.timeout", "at most 10s"),
        ({"ratelimit.timeout": 0.05}, "ratelimit.timeout", "expected a duration string"),
        # revocation and log
        ({"revocation.file": ""}, "revocation.file", "must not be empty"),
        ({"revocation.file": 1}, "revocation.file", "expected a string"),
        ({"log.decisions": 0}, "log.decisions", "expected a string"),
        ({"log.decisions": ""}, "log.decisions", "must not be empty"),
        ({"log.rotate_bytes": -1}, "log.rotate_bytes", "negative"),
        ({"log.rotate_bytes": "1.5B"}, "log.rotate_bytes", "whole number of bytes"),
        ({"log.rotate_bytes": "lots"}, "log.rotate_bytes", "invalid size"),
    ],
)
def test_refused(changes: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(changes), file="gate.toml")
    assert caught.value.key == key
    assert fragment in caught.value.why
    assert caught.value.file == "gate.toml"


def test_top_level_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(["upstream"])  # type: ignore[arg-type]
    assert (caught.value.key, caught.value.why) == ("-", "expected a table, got array")


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"upstream": "nope"}, "upstream", "given on the command line"),
        ({"listen": "127.0.0.1"}, "listen", "given on the command line"),
        ({"listen": "127.0.0.1:9090"}, "admin_listen", "must differ from listen"),
    ],
)
def test_command_line_overrides_are_validated(
    overrides: dict[str, str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(), **overrides)
    assert caught.value.key == key
    assert fragment in caught.value.why


def test_command_line_overrides_win() -> None:
    data = document({"upstream": DELETE})
    cfg = parse_config(data, upstream="https://model.internal", listen="[::1]:0")
    assert cfg.upstream == "https://model.internal"
    assert cfg.listen == ("::1", 0)


# --------------------------------------------------------------------------- ConfigError


def test_config_error_shape() -> None:
    error = ConfigError("config/cohortgate.toml", "ratelimit.backnd", "unknown key")
    assert isinstance(error, ValueError)
    assert str(error) == "config/cohortgate.toml: ratelimit.backnd: unknown key"
    assert (error.file, error.key, error.why) == (
        "config/cohortgate.toml",
        "ratelimit.backnd",
        "unknown key",
    )
    copied = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)
    assert str(copied) == str(error)


def test_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(MINIMAL_TOML + '\n[ratelimit]\nbacknd = "memory"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: ratelimit.backnd: unknown key (did you mean 'backend'?)"


# --------------------------------------------------------------------------- load_config


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")
    assert caught.value.key == "-"
    assert "cannot read" in caught.value.why
    assert "No such file" in caught.value.why


def test_load_config_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert (caught.value.file, caught.value.key) == (str(tmp_path), "-")


def test_load_config_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text('upstream = "http://127.0.0.1:8000"\n\nlisten = 127.0.0.1:8080\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "line 3"
    assert caught.value.why.startswith("TOML syntax error: ")
    assert "line 3" in caught.value.why


def test_load_config_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_bytes(b'upstream = "http://h\xff:1"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert (caught.value.key, caught.value.why) == ("-", "not UTF-8 text (byte 20)")


def test_load_config_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(MINIMAL_TOML)
    cfg = load_config(path, upstream="https://model.internal:8443", listen="0.0.0.0:8000")
    assert cfg.upstream == "https://model.internal:8443"
    assert cfg.listen == (EVERY_INTERFACE, 8000)
    assert cfg.source == path


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize(
    ("cohorts", "cohort", "admitted"),
    [
        ({"preview-1"}, "preview-1", True),
        ({"preview-1"}, "preview-2", False),
        ({"preview-1"}, "Preview-1", False),  # byte-exact, never case-folded
        ({"preview-1"}, "preview-1 ", False),
        ({"preview-1"}, "*", False),  # a token naming cohort "*" gets no wildcard
        ({"*"}, "anything", True),
        ({"a", "*"}, "b", True),
    ],
)
def test_phase_admits(cohorts: set[str], cohort: str, admitted: bool) -> None:
    phase = Phase(name="p", until=None, cohorts=frozenset(cohorts), unapproved=None)
    assert phase.admits(cohort) is admitted


def phased_config() -> Config:
    return parse_config(
        document(
            {
                "phases": [
                    {"name": "alpha", "until": "2026-06-01T00:00:00Z", "cohorts": ["a"]},
                    {"name": "beta", "until": "2026-12-10T00:00:00Z", "cohorts": ["a", "b"]},
                    {"name": "general"},
                ]
            }
        )
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (at("2020-01-01T00:00:00+00:00").timestamp(), "alpha"),
        (at("2026-06-01T00:00:00+00:00").timestamp() - 0.001, "alpha"),
        (at("2026-06-01T00:00:00+00:00").timestamp(), "beta"),  # `until` itself is past it
        (at("2026-06-01T00:00:00+00:00").timestamp() + 1, "beta"),
        (at("2026-12-09T23:59:59+00:00").timestamp(), "beta"),
        (at("2026-12-10T00:00:00+00:00").timestamp(), "general"),
        (at("2100-01-01T00:00:00+00:00").timestamp(), "general"),
    ],
)
def test_phase_at(now: float, expected: str) -> None:
    phase = phased_config().phase_at(now)
    assert phase is not None
    assert phase.name == expected


def test_phase_at_after_the_last_until_is_none() -> None:
    cfg = parse_config(document({"phases": [{"name": "only", "until": "2026-01-01T00:00:00Z"}]}))
    boundary = at("2026-01-01T00:00:00+00:00").timestamp()
    only = cfg.phase_at(boundary - 1)
    assert only is not None
    assert only.name == "only"
    assert cfg.phase_at(boundary) is None


@pytest.mark.parametrize(
    ("changes", "restart"),
    [
        ({}, []),
        ({"limits.max": {"rpm": 1000, "tpm": 10**7}, "phases": two_phases()}, []),
        ({"authority.jwks": "other.json", "log.decisions": "-"}, []),
        ({"upstream": "http://127.0.0.1:8001"}, ["upstream"]),
        ({"listen": "127.0.0.1:8081"}, ["listen"]),
        ({"admin_listen": "127.0.0.1:9091", "token.forward": True}, ["admin_listen"]),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, ["tls_cert", "tls_key"]),
        (
            {"upstream": "https://x", "listen": "127.0.0.1:1", "admin_listen": "127.0.0.1:2"},
            ["upstream", "listen", "admin_listen"],
        ),
    ],
)
def test_reload_requires_restart(changes: dict[str, object], restart: list[str]) -> None:
    old = parse_config(minimal())
    new = parse_config(document(changes))
    assert old.reload_requires_restart(new) == restart


# --------------------------------------------------------------------------- describe


def test_describe_shows_resolved_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "gate.toml"
    path.write_text(EXAMPLE.read_text())
    monkeypatch.chdir(tmp_path)
    text = describe(load_config("gate.toml"))
    assert f"config        {path}\n" in text
    assert f"jwks          {tmp_path / 'keys' / 'jwks.json'}\n" in text
    assert f"file          {tmp_path / 'config' / 'revocations.json'}\n" in text
    assert f"decisions     {tmp_path / 'logs' / 'decisions.jsonl'}\n" in text
    assert "upstream      http://127.0.0.1:8000\n" in text
    assert "body_limit    16MB (16000000 bytes)\n" in text
    assert "leeway        30s\n" in text
    assert "max_lifetime  30d\n" in text
    assert "[0] preview: until 2026-12-10T00:00:00Z\n" in text
    assert "[1] general: open-ended\n" in text
    assert "unapproved  5 rpm, 2000 tpm" in text
    assert "cohorts     *  (every cohort)" in text
    assert "tls           off (plain HTTP only)" in text
    assert "keys/jwks.json\n" not in text.replace(str(tmp_path / "keys" / "jwks.json"), "")


def test_describe_variants(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(
        document(
            {
                "listen": "[::1]:8443",
                "tls_cert": "tls/cert.pem",
                "tls_key": "tls/key.pem",
                "token.header": "X-Approval-Token",
                "phases": [{"name": "only", "until": "2026-01-01T01:00:00+01:00"}],
                "ratelimit.backend": "redis://cg:hunter2@redis:6379/0",
                "log.decisions": "-",
                "log.rotate_bytes": 0,
            }
        )
    )
    text = describe(cfg)
    assert "config        (built in code)" in text
    assert "listen        [::1]:8443\n" in text
    assert f"tls_cert      {tmp_path / 'tls' / 'cert.pem'}\n" in text
    assert f"tls_key       {tmp_path / 'tls' / 'key.pem'}\n" in text
    assert "X-Approval-Token  (the bare JWT)" in text
    assert "[0] only: until 2026-01-01T00:00:00Z\n" in text
    assert "after 2026-01-01T00:00:00Z: no phase" in text
    assert "hunter2" not in text
    assert "backend       redis://cg:***@redis:6379/0\n" in text
    assert "decisions     - (standard output)\n" in text
    assert "rotate_bytes  0 (never rotate)" in text
