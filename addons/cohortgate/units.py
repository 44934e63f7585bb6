"""Durations and sizes as operators write them ("30s", "1h30m", "100MB") and as clients read them.

Pure helpers, no I/O. `parse_duration` and `parse_size` turn config text into seconds and bytes;
`format_duration` writes OpenAI's rate-limit reset format ("250ms", "7.5s", "6m0s", the format of
Go's `time.Duration`); `format_config_duration` and `format_size` write values back in the
config's own spelling, so `cohortgate check` prints what a config file would say.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = [
    "format_config_duration",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

# Largest first: a duration lists its units in this order, each at most once.
_DURATION_UNITS: dict[str, float] = {
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
# "ms" before "m" and "s", so that "5ms" is five milliseconds, not five minutes and an "s".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|w|d|h|m|s)")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ms|w|d|h|m|s))+")
_BARE_NUMBER = re.compile(r"[+-]?[0-9]*\.?[0-9]+")
_DURATION_EXAMPLES = 'e.g. "50ms", "30s", "5m", "1h30m", "30d" (units: w, d, h, m, s, ms)'

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?) ?([A-Za-z]*)")
_SIZE_EXAMPLES = 'e.g. "512B", "8KiB", "16MiB", "100MB", "1GB"'
# For format_size, largest multiplier first: the first that divides a size exactly names it.
_SIZE_SPELLINGS: tuple[tuple[str, int], ...] = tuple(
    sorted(
        (
            ("TB", 10**12),
            ("GB", 10**9),
            ("MB", 10**6),
            ("KB", 10**3),
            ("TiB", 2**40),
            ("GiB", 2**30),
            ("MiB", 2**20),
            ("KiB", 2**10),
        ),
        key=lambda spelling: spelling[1],
        reverse=True,
    )
)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "50ms", "30s", "1h30m" or "1.5s".

    Units go from largest to smallest, each at most once. A bare number is refused: "30" could
    mean seconds or minutes, and guessing wrong in a token lifetime or a timeout is costly.
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a duration string such as "30s", got {type(text).__name__}')
    if text == "":
        raise ValueError(f"empty duration: write {_DURATION_EXAMPLES}")
    if _BARE_NUMBER.fullmatch(text):
        raise ValueError(f'"{text}" has no unit (ambiguous): write {_DURATION_EXAMPLES}')
    if not _DURATION.fullmatch(text):
        raise ValueError(f'invalid duration "{text}": write {_DURATION_EXAMPLES}')
    order = list(_DURATION_UNITS)
    last_rank = -1
    seconds = 0.0
    for number, unit in _DURATION_PART.findall(text):
        rank = order.index(unit)
        if rank <= last_rank:
            raise ValueError(
                f'invalid duration "{text}": units go from largest to smallest, each once'
            )
        last_rank = rank
        seconds += float(number) * _DURATION_UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f'duration "{text}" is too large')
    return seconds


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "100MB" (10**6), "8KiB" (1024), "512B" or "0"; an int as is.

    Unit names are case-insensitive; a string without a unit counts bytes. The result must be a
    whole number of bytes ("1.5KiB" is 1536, "0.5B" is refused).
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(
            f'expected a size such as "100MB" or an integer, got {type(text).__name__}'
        )
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f'invalid size "{text}": write {_SIZE_EXAMPLES}')
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(
            f'unknown size unit "{unit}" in "{text}": use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB'
        )
    size = Decimal(number) * multiplier
    if size != size.to_integral_value():
        raise ValueError(f'size "{text}" is not a whole number of bytes')
    return int(size)


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "250ms" under a second, "7.5s" under a minute, else "6m0s", "1h2m3s".

    Rounded up to the millisecond, so a client that waits this long finds the quota refilled.
    A negative value (a reset already passed) is "0s".
    """
    if not math.isfinite(seconds):
        raise ValueError(f"duration must be finite, got {seconds}")
    # round() first: 2.007 * 1000 is 2007.0000000000002 in floating point, not 2008 ms.
    millis = max(0, math.ceil(round(seconds * 1000, 6)))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    whole_seconds, rest_millis = divmod(millis, 1000)
    fraction = f".{rest_millis:03d}".rstrip("0") if rest_millis else ""
    minutes, secs = divmod(whole_seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}{fraction}s"
    if minutes:
        return f"{minutes}m{secs}{fraction}s"
    return f"{secs}{fraction}s"


def format_config_duration(seconds: float) -> str:
    """The config spelling of a duration ("30d", "1h30m", "50ms"): parse_duration reads it back.

    Precise to the microsecond.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and not negative, got {seconds}")
    micros = round(seconds * 1_000_000)
    if micros == 0:
        return "0s"
    days, rest = divmod(micros, 86_400_000_000)
    hours, rest = divmod(rest, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    secs, micros_left = divmod(rest, 1_000_000)
    parts = [
        f"{value}{unit}" for value, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if value
    ]
    if micros_left == 0:
        if secs:
            parts.append(f"{secs}s")
    elif secs == 0 and micros_left % 1000 == 0:
        parts.append(f"{micros_left // 1000}ms")
    else:
        parts.append(f"{secs}.{micros_left:06d}".rstrip("0") + "s")
    return "".join(parts)


def format_size(size: int) -> str:
    """The config spelling of a size: the largest unit that divides it exactly ("16MB", "8KiB")."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be an integer >= 0, got {size!r}")
    if size == 0:
        return "0"
    for unit, multiplier in _SIZE_SPELLINGS:
        if size % multiplier == 0:
            return f"{size // multiplier}{unit}"
    return f"{size}B"
