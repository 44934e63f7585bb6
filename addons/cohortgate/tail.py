"""`cohortgate tail` and `cohortgate report`: the decision log as operators read it.

`tail` prints one readable line per decision (or, with `--json`, the log's own lines byte for
byte), filtered by customer, decision, reason and time; `-f` follows the file like `tail -F`,
across rotation (the file renamed away and a new one created, as `audit.DecisionLog` does) and
truncation, and waits for a file that does not exist yet. `report` sums a window of the log:
totals, per customer, per reason, per cohort.

Everything read from the log is untrusted: readable output escapes control and other
non-printable characters, so a hostile customer id or path cannot drive the terminal. A line
that is not a JSON object is reported on standard error (file and line number) and skipped.

This module does not import `cohortgate.cli` (which imports it); its commands print their own
errors and return the CLI's exit codes: 0 success, 2 bad usage or an unreadable file or config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any
from typing import BinaryIO
from typing import NoReturn

from cohortgate.audit import rotated_files
from cohortgate.config import ConfigError
from cohortgate.config import load_config
from cohortgate.units import parse_duration

__all__ = [
    "Filter",
    "Report",
    "add_parsers",
    "escape_text",
    "format_decision",
    "main",
    "parse_since",
    "percentile",
    "use_color",
]

DEFAULT_CONFIG = "config/cohortgate.toml"  # the same default as every other command's --config
EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130
POLL_SECONDS = 0.2
FOLLOW_DEFAULT_LINES = 10  # `tail -f` starts with the last 10 matching lines, as tail(1) does
# A rotated file whose last line is older than --since minus this is skipped unread; the slack
# covers lines logged out of timestamp order by concurrent requests.
SINCE_SLACK = timedelta(seconds=5)
_CHUNK = 1 << 16

_GREEN, _RED, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"
# Column widths of the readable line; a longer value pushes the rest right, up to its cap.
_W_REASON, _W_CUSTOMER, _W_COHORT, _W_MODEL, _W_TOKENS, _W_LATENCY = 22, 12, 11, 10, 20, 9
_CAP_SHORT, _CAP_LONG = 40, 200
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


class _Usage(Exception):
    """Bad input or an unreadable file: the command prints this and exits 2."""


# ---- untrusted values -------------------------------------------------------------------


def escape_text(text: str, cap: int = _CAP_LONG) -> str:
    """`text` safe for a terminal: every non-printable character (C0 and C1 controls such as
    ESC, CR and BEL, bidi overrides, zero-width and unassigned code points, lone surrogates)
    and the backslash written as a Python escape; cut to `cap` characters with an ellipsis."""
    if text.isprintable() and "\\" not in text:
        out = text
    else:
        out = "".join(ch if ch.isprintable() and ch != "\\" else _escape_char(ch) for ch in text)
    return out if len(out) <= cap else out[: cap - 1] + "…"


def _escape_char(ch: str) -> str:
    named = _NAMED_ESCAPES.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _shown(value: Any, cap: int = _CAP_SHORT) -> str:
    """A log value as readable text: "-" for null, escaped and capped."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return escape_text(value, cap)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return escape_text(str(value), cap)
    return escape_text(json.dumps(value, ensure_ascii=False), cap)


def _count(value: Any) -> int | None:
    """A token count from the log, or None when it is absent or not a count."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _key(value: Any) -> str | None:
    """A grouping key for report: the string itself, None for null, JSON for anything else."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def parse_ts(value: Any) -> datetime | None:
    """The `ts` of a log line as an aware UTC datetime, or None if it is not RFC 3339."""
    if not isinstance(value, str):
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return stamp.replace(tzinfo=UTC)  # the writer always says Z; read a bare time as UTC
    return stamp.astimezone(UTC)


def parse_since(text: str, now: datetime) -> datetime:
    """The start of a window: `now` minus a duration ("15m", "1h30m"), or an RFC 3339 time
    with its offset ("2026-11-27T02:00:00Z"). ValueError says which forms are accepted."""
    try:
        return now - timedelta(seconds=parse_duration(text))
    except ValueError as e:
        not_duration = str(e)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        stamp = None
    if stamp is None:
        raise ValueError(
            f'--since "{text}": {not_duration}; or give an RFC 3339 time '
            '("2026-11-27T02:00:00Z")'
        )
    if stamp.tzinfo is None:
        raise ValueError(
            f'--since "{text}": give the time zone ("Z" for UTC, or an offset such as "+01:00")'
        )
    return stamp.astimezone(UTC)


def _format_ts(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + f".{stamp.microsecond // 1000:03d}"


def _rfc3339(stamp: datetime) -> str:
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---- selecting lines --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """Which decisions to show; every condition given must hold (AND). Within `customers` and
    `reasons`, any one value matches."""

    customers: frozenset[str] | None = None
    decision: str | None = None
    reasons: frozenset[str] | None = None
    since: datetime | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.decision is not None and record.get("decision") != self.decision:
            return False
        if self.customers is not None:
            customer = record.get("customer")
            if not isinstance(customer, str) or customer not in self.customers:
                return False
        if self.reasons is not None:
            reason = record.get("reason")
            if not isinstance(reason, str) or reason not in self.reasons:
                return False
        if self.since is not None:
            stamp = parse_ts(record.get("ts"))
            if stamp is None or stamp < self.since:
                return False
        return True


def decode_line(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object on this line, "") or (None, why it is not one)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(value, dict):
        return None, "not a JSON object"
    return value, ""


Warn = Callable[[str, int, str], None]


def _warn_stderr(file: str, line: int, why: str) -> None:
    print(f"cohortgate: warning: {file}:{line}: {why}, skipped", file=sys.stderr, flush=True)


@dataclass(slots=True)
class _Selector:
    """Decodes raw lines and keeps the decisions the filter selects, warning about the rest."""

    filter: Filter
    warn: Warn

    def select(self, raw: bytes, file: str, line: int | Callable[[], int]) -> dict[str, Any] | None:
        if not raw.endswith(b"\n"):
            self.warn(file, line if isinstance(line, int) else line(),
                      "incomplete last line (no newline: torn, or still being written)")
            return None
        record, why = decode_line(raw)
        if record is None:
            self.warn(file, line if isinstance(line, int) else line(), why)
            return None
        return record if self.filter.matches(record) else None


def _forward(path: Path, selector: _Selector) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """The selected lines of a file, first to last."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            record = selector.select(raw, str(path), number)
            if record is not None:
                yield raw, record


def _reversed_lines(fd: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line with its newline) of the lines in bytes [0, end) of a file, last first;
    `end` is 0 or just after a newline."""
    pos = end
    # pending[:limit] is bytes [pos, pos + limit) not yet yielded: whole lines, the first
    # perhaps cut short (its start is in an earlier chunk). Indexes, not slices: no copying.
    pending, limit = b"", 0
    while pos > 0 or limit:
        if pos > 0:
            start = max(0, pos - _CHUNK)
            pending = os.pread(fd, pos - start, start) + pending[:limit]
            limit = len(pending)
            pos = start
        while limit:
            cut = pending.rfind(b"\n", 0, limit - 1)
            if cut < 0:
                if pos > 0:
                    break  # read the chunk before
                yield 0, pending[:limit]
                limit = 0
                break
            yield pos + cut + 1, pending[cut + 1 : limit]
            limit = cut + 1


def _line_numbers(fd: int, offsets: Iterable[int]) -> dict[int, int]:
    """The 1-based line number of each line starting at one of `offsets`, in one pass."""
    numbers: dict[int, int] = {}
    pos, newlines = 0, 0
    for offset in sorted(set(offsets)):
        while pos < offset:
            data = os.pread(fd, min(_CHUNK, offset - pos), pos)
            if not data:
                break
            newlines += data.count(b"\n")
            pos += len(data)
        numbers[offset] = newlines + 1
    return numbers


def _complete_end(fd: int, size: int) -> int:
    """The offset just after the last newline in bytes [0, size), or 0."""
    pos = size
    while pos > 0:
        start = max(0, pos - _CHUNK)
        cut = os.pread(fd, pos - start, start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def _last_selected(
    fd: int, end: int, file: str, selector: _Selector, want: int
) -> list[tuple[bytes, dict[str, Any]]]:
    """Up to `want` selected lines of bytes [0, end) of a file, read from its end; the result
    in file order. Warnings for the lines read come out in file order too."""
    found: list[tuple[bytes, dict[str, Any]]] = []
    bad: list[tuple[int, str]] = []
    quiet = _Selector(selector.filter, lambda _file, offset, why: bad.append((offset, why)))
    if want > 0:
        for offset, raw in _reversed_lines(fd, end):
            record = quiet.select(raw, file, offset)  # "line" is the offset, numbered below
            if record is not None:
                found.append((raw, record))
                if len(found) == want:
                    break
    if bad:
        numbers = _line_numbers(fd, (offset for offset, _ in bad))
        for offset, why in sorted(bad):
            selector.warn(file, numbers[offset], why)
    found.reverse()
    return found


def _last_ts(path: Path) -> datetime | None:
    """The timestamp of a file's last complete line, if it has one."""
    with path.open("rb") as f:
        fd = f.fileno()
        end = _complete_end(fd, os.fstat(fd).st_size)
        for _, raw in _reversed_lines(fd, end):
            record, _why = decode_line(raw)
            return parse_ts(record.get("ts")) if record is not None else None
    return None


def _older_files(path: Path, since: datetime | None, exclude: tuple[int, int] | None) -> list[Path]:
    """The rotated siblings of `path` that may hold lines at or after `since`, oldest first
    (none without `since`); `exclude` is the (st_dev, st_ino) of a file read another way."""
    if since is None:
        return []
    chosen = []
    for file in rotated_files(path):
        if file == path:
            continue
        try:
            st = file.stat()
            if exclude is not None and (st.st_dev, st.st_ino) == exclude:
                continue
            last = _last_ts(file)
        except FileNotFoundError:
            continue  # removed since the listing
        except OSError as e:
            raise _Usage(f"{file}: cannot read: {e.strerror or e}") from e
        if last is not None and last < since - SINCE_SLACK:
            continue
        chosen.append(file)
    return chosen


# ---- output -----------------------------------------------------------------------------


def format_decision(record: Mapping[str, Any], *, color: bool = False) -> str:
    """One decision as an aligned, readable line (no newline); every value escaped."""
    stamp = parse_ts(record.get("ts"))
    when = _format_ts(stamp) if stamp is not None else _shown(record.get("ts"), 23).ljust(23)
    decision = record.get("decision")
    word = decision.upper() if decision in ("allow", "deny") else _shown(decision, 5)
    padded = word.ljust(5)
    if color and decision in ("allow", "deny"):
        padded = (_GREEN if decision == "allow" else _RED) + word + _RESET + padded[len(word) :]
    status = record.get("status")
    status_text = _shown(status, 5).rjust(3)
    estimated = "~" if record.get("usage_estimated") is True else ""
    prompt = _count(record.get("prompt_tokens"))
    completion = _count(record.get("completion_tokens"))
    parts = []
    if prompt is not None:
        parts.append(f"in {estimated}{prompt}")
    if completion is not None:
        parts.append(f"out {estimated}{completion}")
    tokens = " / ".join(parts) + " tok" if parts else ""
    latency = _number(record.get("latency_ms"))
    latency_text = f"{latency:.1f} ms" if latency is not None else "-"
    line = (
        f"{when}  {padded} {status_text} "
        f"{_shown(record.get('reason')).ljust(_W_REASON - 1)} "
        f"{_shown(record.get('customer')).ljust(_W_CUSTOMER - 1)} "
        f"{_shown(record.get('cohort')).ljust(_W_COHORT - 1)} "
        f"{_shown(record.get('model')).ljust(_W_MODEL - 1)} "
        f"{tokens.ljust(_W_TOKENS)}"
        f"{latency_text.rjust(_W_LATENCY)}"
    )
    if record.get("stream") is True:
        line += "  [stream]"
    if decision != "allow":
        path = record.get("path")
        if path is not None:
            method = record.get("method")
            where = f"{_shown(method, 10)} " if method is not None else ""
            line += f"  {where}{_shown(path, _CAP_LONG)}"
        detail = record.get("detail")
        if detail is not None:
            line += f"  ({_shown(detail, _CAP_LONG)})"
    return line.rstrip()


def use_color(mode: str, stream: Any) -> bool:
    """Whether to colour: "always", "never", or "auto" (a terminal, and NO_COLOR unset)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    if os.environ.get("NO_COLOR"):  # https://no-color.org: set and not empty
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class _Printer:
    """Writes selected lines to standard output: raw bytes (--json) or readable text."""

    def __init__(self, raw: bool, color: bool) -> None:
        sys.stdout.flush()
        self._out: BinaryIO = sys.stdout.buffer
        self._encoding = sys.stdout.encoding or "utf-8"
        self._raw = raw
        self._color = color

    def line(self, raw: bytes, record: Mapping[str, Any]) -> None:
        if self._raw:
            self._out.write(raw)
        else:
            text = format_decision(record, color=self._color) + "\n"
            self._out.write(text.encode(self._encoding, "backslashreplace"))

    def flush(self) -> None:
        self._out.flush()


# ---- following a file -------------------------------------------------------------------


@dataclass(slots=True)
class _Open:
    """A file being read: its descriptor, identity, read position and unfinished line."""

    path: Path
    fd: int
    ident: tuple[int, int]
    offset: int = 0  # bytes read so far, `pending` included
    pending: bytes = b""
    base: int = 0  # the offset from which `lines` counts complete lines
    lines: int = 0
    base_number: int | None = 0  # line number of the line starting at `base`, minus one

    @classmethod
    def at(cls, path: Path) -> _Open | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        st = os.fstat(fd)
        return cls(path, fd, (st.st_dev, st.st_ino))

    def line_number(self) -> int:
        """The line number of the next complete line this file yields."""
        if self.base_number is None:
            self.base_number = _line_numbers(self.fd, (self.base,))[self.base] - 1
        return self.base_number + self.lines + 1

    def start_at(self, offset: int) -> None:
        """Read on from `offset` (a line start); line numbers are counted when needed."""
        self.offset, self.pending, self.base, self.lines = offset, b"", offset, 0
        self.base_number = 0 if offset == 0 else None

    def complete_lines(self) -> Iterator[tuple[bytes, int | Callable[[], int]]]:
        """The complete lines appended since the last call, with their line numbers."""
        while True:
            data = os.pread(self.fd, _CHUNK, self.offset)
            if not data:
                return
            self.offset += len(data)
            chunk = self.pending + data
            start = 0
            while (cut := chunk.find(b"\n", start)) >= 0:
                number: int | Callable[[], int] = (
                    self.base_number + self.lines + 1
                    if self.base_number is not None
                    else self.line_number
                )
                yield chunk[start : cut + 1], number
                self.lines += 1
                start = cut + 1
            self.pending = chunk[start:]

    def close(self) -> None:
        os.close(self.fd)


class _Follower:
    """Follows a log path like `tail -F`: new lines as they are appended, on through rotation
    (finishing the renamed file, then any rotated siblings written in between, then the new
    file from its start), truncation (from the start again) and a file not there yet."""

    def __init__(self, path: Path, selector: _Selector, printer: _Printer, *,
                 started_with: _Open | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.selector = selector
        self.printer = printer
        self.sleep = sleep
        self.current = started_with
        # Without a file yet, the rotated siblings already there are history: when the file
        # appears, only siblings rotated since then (a burst between two polls) are read.
        self._history = set() if started_with is not None else self._sibling_idents()
        self._said_waiting = False

    def _sibling_idents(self) -> set[tuple[int, int]]:
        idents = set()
        for file in rotated_files(self.path):
            with contextlib.suppress(FileNotFoundError):
                st = file.stat()
                idents.add((st.st_dev, st.st_ino))
        return idents

    def run(self) -> NoReturn:
        while True:
            if self.current is not None:
                self._drain(self.current)
            self._check_path()
            self.printer.flush()
            self.sleep(POLL_SECONDS)

    def _drain(self, file: _Open) -> None:
        name = str(file.path)
        for raw, number in file.complete_lines():
            record = self.selector.select(raw, name, number)
            if record is not None:
                self.printer.line(raw, record)

    def _finish(self, file: _Open) -> None:
        """Read a file that will not grow any more to its end, then close it."""
        self._drain(file)
        if file.pending:
            self.selector.select(file.pending, str(file.path), file.line_number())
        file.close()

    def _check_path(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None  # renamed away and not yet replaced, or not created yet: wait
        current = self.current
        if current is None:
            if st is None:
                if not self._said_waiting:
                    print(f"cohortgate: {self.path}: does not exist yet, waiting for it",
                          file=sys.stderr, flush=True)
                    self._said_waiting = True
                return
            self._switch_to_new(None)
            return
        if st is not None and (st.st_dev, st.st_ino) != current.ident:
            self._switch_to_new(current)
            return
        if os.fstat(current.fd).st_size < current.offset:
            print(f"cohortgate: {self.path}: truncated, reading it from the start",
                  file=sys.stderr, flush=True)
            current.start_at(0)
            self._drain(current)

    def _switch_to_new(self, old: _Open | None) -> None:
        """The file at the path is a new one: finish `old`, read the rotated siblings written
        after it (several rotations may fall between two polls), then the new file."""
        new = _Open.at(self.path)
        if new is None:
            return  # gone again; look next time
        if old is not None:
            self._finish(old)
        for sibling in self._rotated_after(old.ident if old else None, new.ident):
            with contextlib.suppress(FileNotFoundError):
                for raw, record in _forward(sibling, self.selector):
                    self.printer.line(raw, record)
        self.current = new
        self._drain(new)

    def _rotated_after(self, old: tuple[int, int] | None, new: tuple[int, int]) -> list[Path]:
        """The rotated siblings written after `old` (after the history seen at start when
        there is no `old`), oldest first, leaving out `new`: it may have been rotated already,
        and is read as the current file."""
        siblings = []
        seen_old = old is None
        for file in rotated_files(self.path):
            if file == self.path:
                continue
            try:
                st = file.stat()
            except FileNotFoundError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident == old:
                seen_old = True
            elif seen_old and ident != new and ident not in self._history:
                siblings.append(file)
        return siblings


# ---- the commands -----------------------------------------------------------------------


def _log_path(args: argparse.Namespace) -> Path:
    """The log file a command reads: FILE, or the config's `log.decisions`."""
    if args.file is not None:
        if args.config is not None:
            raise _Usage("give FILE or --config, not both")
        return Path(args.file)
    config = args.config or DEFAULT_CONFIG
    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise _Usage(str(e)) from e
    if cfg.log.decisions is None:
        raise _Usage(
            f'{config}: log.decisions is "-": the log goes to standard output, so there is no '
            "file to read; read it where standard output is collected, or give FILE"
        )
    return cfg.log.decisions


def _filter(args: argparse.Namespace, since: datetime | None) -> Filter:
    customers = getattr(args, "customer", None)
    reasons = getattr(args, "reason", None)
    return Filter(
        customers=frozenset(customers) if customers else None,
        decision=getattr(args, "decision", None),
        reasons=frozenset(reasons) if reasons else None,
        since=since,
    )


def _since(args: argparse.Namespace) -> datetime | None:
    if args.since is None:
        return None
    try:
        return parse_since(args.since, datetime.now(UTC))
    except ValueError as e:
        raise _Usage(str(e)) from e


def _tail(args: argparse.Namespace) -> int:
    path = _log_path(args)
    since = _since(args)
    selector = _Selector(_filter(args, since), _warn_stderr)
    printer = _Printer(args.json, use_color(args.color, sys.stdout))
    want: int | None = args.lines
    if want is None and args.follow:
        want = FOLLOW_DEFAULT_LINES
    try:
        current = _Open.at(path)
    except OSError as e:
        raise _Usage(f"{path}: cannot read: {e.strerror or e}") from e
    if current is None and not args.follow:
        raise _Usage(f"{path}: no such file")
    try:
        if current is not None:
            fd = current.fd
            size = os.fstat(fd).st_size
            end = _complete_end(fd, size)
            older = _older_files(path, since, current.ident)
            _print_existing(older, current, end, selector, printer, want)
            if not args.follow and size > end:  # a last line without its newline: say so
                selector.select(os.pread(fd, size - end, end), str(path),
                                lambda: _line_numbers(fd, (end,))[end])
            current.start_at(end)
        printer.flush()
        if not args.follow:
            return EXIT_OK
        follower = _Follower(path, selector, printer, started_with=current)
        current = None  # the follower owns it now
        follower.run()
    finally:
        if current is not None:
            current.close()


def _print_existing(older: Sequence[Path], current: _Open, end: int, selector: _Selector,
                    printer: _Printer, want: int | None) -> None:
    """The selected lines already written: in the rotated `older` files and in bytes [0, end)
    of the current file; only the last `want` of them when `want` is given."""
    name = str(current.path)
    if want is None:
        for file in older:
            for raw, record in _forward(file, selector):
                printer.line(raw, record)
        for raw, number in _bounded_lines(current.fd, end):
            selected = selector.select(raw, name, number)
            if selected is not None:
                printer.line(raw, selected)
        return
    batches: deque[list[tuple[bytes, dict[str, Any]]]] = deque()
    found = _last_selected(current.fd, end, name, selector, want)
    batches.appendleft(found)
    missing = want - len(found)
    for file in reversed(older):
        if missing <= 0:
            break
        with file.open("rb") as f:
            fd = f.fileno()
            found = _last_selected(fd, _complete_end(fd, os.fstat(fd).st_size), str(file),
                                   selector, missing)
        batches.appendleft(found)
        missing -= len(found)
    for batch in batches:
        for raw, record in batch:
            printer.line(raw, record)


def _bounded_lines(fd: int, end: int) -> Iterator[tuple[bytes, int]]:
    """(line, line number) of the lines in bytes [0, end) of a file, first to last."""
    pos, number, pending = 0, 0, b""
    while pos < end:
        data = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not data:
            break
        pos += len(data)
        chunk = pending + data
        start = 0
        while (cut := chunk.find(b"\n", start)) >= 0:
            number += 1
            yield chunk[start : cut + 1], number
            start = cut + 1
        pending = chunk[start:]


# ---- report -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0  # requests whose token counts are estimates
    latencies: list[float] = field(default_factory=list)

    def add(self, record: Mapping[str, Any]) -> None:
        self.requests += 1
        decision = record.get("decision")
        if decision == "allow":
            self.allowed += 1
        elif decision == "deny":
            self.denied += 1
        self.prompt_tokens += _count(record.get("prompt_tokens")) or 0
        self.completion_tokens += _count(record.get("completion_tokens")) or 0
        if record.get("usage_estimated") is True:
            self.estimated += 1
        latency = _number(record.get("latency_ms"))
        if latency is not None:
            self.latencies.append(latency)

    def summary(self, *, latency: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "allowed": self.allowed,
            "denied": self.denied,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens_estimated": self.estimated,
        }
        if latency:
            ordered = sorted(self.latencies)
            out["latency_ms_p50"] = percentile(ordered, 50)
            out["latency_ms_p95"] = percentile(ordered, 95)
        return out


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The nearest-rank `p`th percentile of sorted values; None when there are none."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _by_count(groups: Mapping[str | None, _Tally]) -> list[tuple[str | None, _Tally]]:
    """Largest count first; ties by name, null last."""
    return sorted(groups.items(), key=lambda kv: (-kv[1].requests, kv[0] is None, kv[0] or ""))


@dataclass(slots=True)
class Report:
    """A summary of the decisions in a window of the log."""

    since: datetime | None = None
    files: list[str] = field(default_factory=list)
    total: _Tally = field(default_factory=_Tally)
    customers: dict[str | None, _Tally] = field(default_factory=dict)
    reasons: dict[str | None, _Tally] = field(default_factory=dict)
    cohorts: dict[str | None, _Tally] = field(default_factory=dict)
    first: datetime | None = None
    last: datetime | None = None
    skipped: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.total.add(record)
        for groups, name in ((self.customers, "customer"), (self.reasons, "reason"),
                             (self.cohorts, "cohort")):
            key = _key(record.get(name))
            tally = groups.get(key)
            if tally is None:
                tally = groups[key] = _Tally()
            tally.add(record)
        stamp = parse_ts(record.get("ts"))
        if stamp is not None:
            self.first = stamp if self.first is None else min(self.first, stamp)
            self.last = stamp if self.last is None else max(self.last, stamp)

    def as_json(self) -> dict[str, Any]:
        total = self.total.summary(latency=True)
        total["deny_rate"] = round(self.total.denied / self.total.requests, 4) \
            if self.total.requests else 0.0
        return {
            "window": {
                "since": _rfc3339(self.since) if self.since else None,
                "first": _rfc3339(self.first) if self.first else None,
                "last": _rfc3339(self.last) if self.last else None,
                "files": self.files,
            },
            "totals": total,
            "customers": [{"customer": key, **tally.summary(latency=True)}
                          for key, tally in _by_count(self.customers)],
            "reasons": [{"reason": key, "count": tally.requests}
                        for key, tally in _by_count(self.reasons)],
            "cohorts": [{"cohort": key, **tally.summary(latency=False)}
                        for key, tally in _by_count(self.cohorts)],
            "skipped_lines": self.skipped,
        }

    def as_text(self) -> str:
        data = self.as_json()
        window = data["window"]
        totals = data["totals"]
        lines = [
            f"window: {window['since'] or 'everything'} .. now; decisions from "
            f"{window['first'] or '-'} to {window['last'] or '-'} in {len(self.files)} file(s)",
            f"requests {totals['requests']}  allowed {totals['allowed']}  denied "
            f"{totals['denied']}  deny rate {totals['deny_rate'] * 100:.1f}%  tokens in "
            f"{totals['prompt_tokens']} / out {totals['completion_tokens']}",
        ]
        if self.skipped:
            lines.append(f"skipped {self.skipped} line(s) that are not decisions")
        lines.append("")
        lines += _table(
            ("customer", "requests", "allowed", "denied", "tokens in", "tokens out",
             "p50 ms", "p95 ms"),
            [(_shown(c["customer"]), c["requests"], c["allowed"], c["denied"],
              c["prompt_tokens"], c["completion_tokens"], _ms(c["latency_ms_p50"]),
              _ms(c["latency_ms_p95"])) for c in data["customers"]],
        )
        lines.append("")
        lines += _table(("reason", "count"),
                        [(_shown(r["reason"]), r["count"]) for r in data["reasons"]])
        lines.append("")
        lines += _table(
            ("cohort", "requests", "allowed", "denied", "tokens in", "tokens out"),
            [(_shown(c["cohort"]), c["requests"], c["allowed"], c["denied"],
              c["prompt_tokens"], c["completion_tokens"]) for c in data["cohorts"]],
        )
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Text columns: the first left-aligned, the others right-aligned."""
    cells = [list(header)] + [[str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = "  ".join(v.rjust(w) for v, w in zip(row[1:], widths[1:], strict=True))
        out.append(f"{first}  {rest}".rstrip())
    return out


def _report(args: argparse.Namespace) -> int:
    path = _log_path(args)
    since = _since(args)
    if since is None:
        files = rotated_files(path)  # no window: the whole log
    else:
        files = [*_older_files(path, since, None), *([path] if path.exists() else [])]
    if not files:
        raise _Usage(f"{path}: no such file")
    report = Report(since=since, files=[str(f) for f in files])

    def count_skipped(file: str, line: int, why: str) -> None:
        report.skipped += 1
        _warn_stderr(file, line, why)

    selector = _Selector(_filter(args, since), count_skipped)
    for file in files:
        try:
            for _raw, record in _forward(file, selector):
                report.add(record)
        except FileNotFoundError:
            continue  # rotated away and removed while we read
        except OSError as e:
            raise _Usage(f"{file}: cannot read: {e.strerror or e}") from e
    if args.json:
        print(json.dumps(report.as_json()))
    else:
        print(report.as_text())
    return EXIT_OK


def _run(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command, turning its errors into the CLI's exit codes."""
    try:
        return command(args)
    except _Usage as e:
        print(f"cohortgate: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # e.g. `| head`: the reader has had enough
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        print(f"cohortgate: {e.filename or ''}: cannot read: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK if getattr(args, "follow", False) else EXIT_INTERRUPTED


def cmd_tail(args: argparse.Namespace) -> int:
    return _run(_tail, args)


def cmd_report(args: argparse.Namespace) -> int:
    return _run(_report, args)


# ---- parsers ----------------------------------------------------------------------------


def _line_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", metavar="FILE",
                   help="the decision log (default: the config's log.decisions)")
    p.add_argument("--config", help=f"read log.decisions from this config (default "
                                    f"{DEFAULT_CONFIG})")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `tail` and `report` on the `cohortgate` command's subparsers."""
    t = sub.add_parser(
        "tail", help="show the decision log, one readable line per decision",
        description="Show the decision log, one readable line per decision; -f follows it "
                    "across rotation and truncation.",
    )
    _add_source(t)
    t.add_argument("-f", "--follow", action="store_true",
                   help="keep printing decisions as they are logged (Ctrl-C to stop)")
    t.add_argument("--customer", action="append", metavar="S",
                   help="only this customer (repeatable: any of them)")
    t.add_argument("--decision", choices=["allow", "deny"])
    t.add_argument("--reason", action="append", metavar="CODE",
                   help="only this reason code (repeatable: any of them)")
    t.add_argument("--since", metavar="DURATION|RFC3339",
                   help='only decisions from this long ago ("15m") or this time '
                        '("2026-11-27T02:00:00Z"); reads rotated files too')
    t.add_argument("--json", action="store_true",
                   help="the log's own lines, byte for byte (they still verify)")
    t.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the decision (auto: when standard output is a terminal and "
                        "NO_COLOR is not set)")
    t.add_argument("-n", "--lines", type=_line_count, metavar="N",
                   help=f"only the last N matching lines (with -f, default "
                        f"{FOLLOW_DEFAULT_LINES})")
    t.set_defaults(func=cmd_tail)

    r = sub.add_parser(
        "report", help="sum the decision log: per customer, per reason, per cohort",
        description="Sum a window of the decision log: totals, and per customer, reason "
                    "and cohort, largest first.",
    )
    _add_source(r)
    r.add_argument("--since", metavar="DURATION|RFC3339",
                   help='the window: from this long ago ("1h") or this time; default: the '
                        "whole log, rotated files included")
    r.add_argument("--json", action="store_true", help="one JSON object")
    r.set_defaults(func=cmd_report)


def main(argv: Sequence[str]) -> int:
    """`tail ...` or `report ...` as the `cohortgate` command would run them."""
    parser = argparse.ArgumentParser(prog="cohortgate")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    args = parser.parse_args(list(argv))
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
