"""Duration and size parsing and formatting (cohortgate.units)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohortgate.units import format_config_duration
from cohortgate.units import format_duration
from cohortgate.units import format_size
from cohortgate.units import parse_duration
from cohortgate.units import parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("50ms", 0.05),
        ("0ms", 0.0),
        ("0s", 0.0),
        ("1s", 1.0),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h0m1s", 3601.0),
        ("30d", 30 * 86400.0),
        ("2w", 14 * 86400.0),
        ("1w2d3h4m5s6ms", 7 * 86400 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5 + 0.006),
        ("0.5ms", 0.0005),
        ("1m30s", 90.0),
        ("5ms", 0.005),  # milliseconds, not five minutes and a stray "s"
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("30", "no unit"),
        ("0", "no unit"),
        ("1.5", "no unit"),
        ("-5", "no unit"),
        ("", "empty duration"),
        ("-5s", "invalid duration"),
        ("5 s", "invalid duration"),
        (" 5s", "invalid duration"),
        ("5S", "invalid duration"),
        ("5sec", "invalid duration"),
        ("5y", "invalid duration"),
        (".5s", "invalid duration"),
        ("5.s", "invalid duration"),
        ("1h2", "invalid duration"),
        ("s", "invalid duration"),
        ("inf s", "invalid duration"),
        ("nans", "invalid duration"),
        ("٣s", "invalid duration"),  # a non-ASCII digit
        ("30m1h", "largest to smallest"),
        ("1m1m", "largest to smallest"),
        ("1s1ms1s", "largest to smallest"),
        ("9" * 400 + "w", "too large"),
    ],
)
def test_parse_duration_refuses(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize("value", [30, 1.5, None, True])
def test_parse_duration_refuses_non_strings(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration string"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("100MB", 100 * 10**6),
        ("16MB", 16_000_000),
        ("1GB", 10**9),
        ("2TB", 2 * 10**12),
        ("1KB", 1000),
        ("8KiB", 8192),
        ("16MiB", 16 * 2**20),
        ("1GiB", 2**30),
        ("1TiB", 2**40),
        ("100mb", 100 * 10**6),
        ("8kib", 8192),
        ("1.5KiB", 1536),
        ("1.5MB", 1_500_000),
        ("100 MB", 100 * 10**6),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (-1, "negative"),
        ("-1MB", "invalid size"),
        ("", "invalid size"),
        ("MB", "invalid size"),
        ("1.5", "whole number of bytes"),
        ("0.5B", "whole number of bytes"),
        ("1.0001KB", "whole number of bytes"),
        ("10 megabytes", "unknown size unit"),
        ("5M", "unknown size unit"),
        ("5PB", "unknown size unit"),
        ("1e6", "invalid size"),
        ("100  MB", "invalid size"),
        ("1,000", "invalid size"),
    ],
)
def test_parse_size_refuses(text: str | int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


@pytest.mark.parametrize("value", [True, False, 1.5, None, [1]])
def test_parse_size_refuses_other_types(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "250ms"),
        (0.001, "1ms"),
        (0.1, "100ms"),
        (2.007, "2.007s"),  # 2.007 * 1000 is 2007.0000000000002: not rounded up to 2.008
        (0.0004, "1ms"),  # rounded up: never tell a client to come back too early
        (0.2501, "251ms"),
        (0.9995, "1s"),
        (0.0, "0s"),
        (-3.0, "0s"),
        (1.0, "1s"),
        (7.5, "7.5s"),
        (7.25, "7.25s"),
        (7.125, "7.125s"),
        (59.9, "59.9s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (90.5, "1m30.5s"),
        (3599.0, "59m59s"),
        (3600.0, "1h0m0s"),
        (3723.0, "1h2m3s"),
        (90000.0, "25h0m0s"),  # like Go's time.Duration: no days
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_duration_refuses_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.05, "50ms"),
        (1.5, "1.5s"),
        (30.0, "30s"),
        (300.0, "5m"),
        (5400.0, "1h30m"),
        (3601.0, "1h1s"),
        (30 * 86400.0, "30d"),
        (14 * 86400.0, "14d"),
        (60.5, "1m500ms"),
        (0.0005, "0.0005s"),
    ],
)
def test_format_config_duration(seconds: float, text: str) -> None:
    assert format_config_duration(seconds) == text


@given(st.integers(min_value=0, max_value=400 * 86400 * 10**6))
def test_format_config_duration_round_trips(micros: int) -> None:
    seconds = micros / 10**6
    assert parse_duration(format_config_duration(seconds)) == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0"),
        (1, "1B"),
        (512, "512B"),
        (1000, "1KB"),
        (1024, "1KiB"),
        (16_000_000, "16MB"),
        (16 * 2**20, "16MiB"),
        (100 * 10**6, "100MB"),
        (1536, "1536B"),  # 1.5KiB: no unit divides it, and fractions are not written
        (10**12, "1TB"),
        (2**40, "1TiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=10**15))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


@pytest.mark.parametrize("value", [-1, True, 1.5])
def test_format_size_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="integer >= 0"):
        format_size(value)  # type: ignore[arg-type]
