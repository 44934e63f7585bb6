"""The hash-chained decision log: one JSON line per request, its writer, rotation and verifier.

Every line is `BODY` with `,"hash":"H"}` in place of BODY's closing `}`, where BODY is the
compact, ASCII-only JSON object of every other field (FIELDS in order, then extra keys sorted,
then `seq`) and `H = sha256_hex(PREV_H + BODY)`, `PREV_H` being the previous line's `H` or
GENESIS for the first line of the chain. The chain carries on across rotated files, so a
verifier needs no JSON canonicalisation: it cuts the last 75 characters, closes BODY with `}`
and recomputes.

`DecisionLog` writes the log (one process per file, enforced by a lock on `<path>.lock`);
`verify_chain` checks it, and reports the first line that breaks the chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from typing import BinaryIO
from typing import Self

FIELDS: tuple[str, ...] = (
    "ts", "request_id", "decision", "reason", "status", "customer", "cohort", "jti", "kid",
    "phase", "method", "path", "model", "client", "stream", "upstream_status", "prompt_tokens",
    "completion_tokens", "latency_ms", "outcome", "client_request_id",
)  # fmt: skip
GENESIS = "0" * 64

MAX_STR = 256
LONG_FIELDS: Mapping[str, int] = {"path": 512, "client_request_id": 512}
TAIL_LEN = 75  # len(',"hash":"') + 64 + len('"}')

_FIELD_SET = frozenset(FIELDS)
_RESERVED = frozenset(("seq", "hash"))
_KEPT = frozenset((type(None), bool, int))  # values written as they are
_TAIL = re.compile(r',"hash":"([0-9a-f]{64})"\}')
_SEQ_GUESS = re.compile(rb'"seq":(\d{1,20})')
_MAX_LINE = 1 << 20  # a longer "line" is not ours; stop looking for its start
# One encoder, built once (json.dumps() with arguments builds one per call); values are
# flat scalars after sanitise(), so the circular-reference bookkeeping is not needed.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False).encode


class LogInUse(RuntimeError):
    """Another process holds this log file."""


class LogError(RuntimeError):
    """The log cannot be opened (or rotated); the message names the file and why."""


class _NotChained(ValueError):
    """A line that is not a complete chained line; the message says why."""


def truncate(value: str, limit: int) -> str:
    """`value` cut to at most `limit` characters, ending in "..." when it was cut."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def sanitise(key: str, value: Any) -> Any:
    """A log value that cannot break a line or bloat it: strings truncated, scalars kept."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return truncate(value, LONG_FIELDS.get(key, MAX_STR))
    if isinstance(value, float):
        return value if math.isfinite(value) else None  # NaN is not JSON
    return truncate(str(value), LONG_FIELDS.get(key, MAX_STR))


def _parse_line(text: str) -> tuple[int, str, str]:
    """(seq, hash, BODY) of one chained line (without its newline), or _NotChained."""
    if len(text) < TAIL_LEN:
        raise _NotChained("not a chained line: too short")
    match = _TAIL.fullmatch(text, len(text) - TAIL_LEN)
    if match is None:
        raise _NotChained('not a chained line: it does not end in ,"hash":"<64 hex>"}')
    body = text[:-TAIL_LEN] + "}"
    try:
        obj = json.loads(body)
    except ValueError:
        raise _NotChained("not a chained line: not JSON") from None
    if not isinstance(obj, dict):
        raise _NotChained("not a chained line: not a JSON object")
    seq = obj.get("seq")
    if type(seq) is not int or seq < 1:
        raise _NotChained("not a chained line: no positive integer seq")
    return seq, match.group(1), body


def _read_last_line(fd: int, size: int) -> bytes:
    """The last line of an open file (with its newline, if any), read from the end."""
    chunk = 8192
    end = size
    tail = b""
    while True:
        start = max(0, end - chunk)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0:
            return tail[cut + 1 :]
        if start == 0 or len(tail) > _MAX_LINE:
            return tail
        chunk = min(chunk * 4, _MAX_LINE)


def _resume_point(path: Path) -> tuple[int, str]:
    """(seq, hash) of the last line written at `path` or, if it is empty, in the newest
    rotated sibling; (0, GENESIS) for a new log. LogError if that line is not ours."""
    for file in reversed(rotated_files(path)):
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as e:
            raise LogError(f"{file}: cannot read it to resume the chain: {e.strerror}") from e
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                continue
            raw = _read_last_line(fd, size)
        finally:
            os.close(fd)
        try:
            if not raw.endswith(b"\n"):
                raise _NotChained("a torn write: the last line has no newline")
            seq, digest, _ = _parse_line(raw[:-1].decode("ascii"))
        except (_NotChained, UnicodeDecodeError) as e:
            why = str(e) if isinstance(e, _NotChained) else "not a chained line: not ASCII"
            raise LogError(
                f"{file}: cannot continue the hash chain, the last line is broken ({why}); "
                f"run `cohortgate audit verify {file}`, then move the file aside"
            ) from None
        return seq, digest
    return 0, GENESIS


def rotated_files(path: Path) -> list[Path]:
    """The rotated siblings of `path` (`<path>.<seq:012d>`), oldest first, then `path` itself
    if it exists."""
    pattern = re.compile(re.escape(path.name) + r"\.(\d{12,})")
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    rotated = sorted(
        (int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name)) is not None
    )
    files = [path.parent / name for _, name in rotated]
    if path.exists():
        files.append(path)
    return files


class DecisionLog:
    """The decision log writer: appends chained lines to a file (or standard output).

    A file log is held by one process at a time (an flock on `<path>.lock`, kept across
    rotations), resumes the chain of an existing file and rotates at `rotate_bytes`.
    Thread-safe.

    With `background=True` (what the proxy uses) `write()` only builds and chains the line;
    a writer thread appends it, so a slow or full disk never stalls the event loop. Lines are
    written in chain order, several per system call when they queue up. When the disk
    refuses a write the thread keeps the lines, sets `failing` and retries every 0.1 s, never
    leaving half a line in the file; `head()` reports the last line actually written.
    """

    def __init__(self, path: Path | None, rotate_bytes: int = 0, *,
                 background: bool = False) -> None:
        self._path = path
        self._rotate_bytes = rotate_bytes if path is not None else 0
        self._lock = threading.Lock()
        self._closed = False
        self._fd = -1
        self._lock_fd = -1
        self._stdout: BinaryIO | None = None
        self._seq = 0
        self._hash = GENESIS
        self._size = 0
        # background writing: (seq, hash, line) waiting for the writer thread, in chain order
        self._queue: deque[tuple[int, str, bytes]] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._writer: threading.Thread | None = None
        self._stopping = False
        self.failing: str | None = None  # why the writer cannot write now, else None
        self._written = (0, GENESIS)  # seq and hash of the last line in the file
        if path is None:
            self._stdout = sys.stdout.buffer  # a fresh chain per process
            self._start_writer(background)
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._acquire(path)
        except OSError as e:
            raise LogError(f"{path}: cannot open: {e.strerror or e}") from e
        try:
            self._seq, self._hash = _resume_point(path)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._size = os.fstat(self._fd).st_size
        except OSError as e:
            self.close()
            raise LogError(f"{path}: cannot open: {e.strerror or e}") from e
        except BaseException:
            self.close()
            raise
        self._written = (self._seq, self._hash)
        self._start_writer(background)

    def _start_writer(self, background: bool) -> None:
        if background:
            self._writer = threading.Thread(target=self._write_forever, daemon=True,
                                            name="cohortgate-decision-log")
            self._writer.start()

    @staticmethod
    def _acquire(path: Path) -> int:
        """An exclusive flock on `<path>.lock`, holding our pid; LogInUse if taken."""
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LogInUse(f"{path}: in use by another process (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append one decision; returns the object written, with its seq and hash.

        `record` holds some of FIELDS (missing ones are null) and may hold extra keys, written
        after FIELDS in sorted order; "seq" and "hash" in it are ignored. Raises OSError if the
        line cannot be written (nothing of it is left in the file), LogError if the file
        cannot be rotated afterwards (the line is written; the next write tries again).
        """
        obj: dict[str, Any] = {}
        get = record.get
        for key in FIELDS:  # sanitise() inlined for the common values: this is the hot path
            value: Any = get(key)
            cls = value.__class__
            if cls in _KEPT or (cls is str and len(value) <= MAX_STR):
                obj[key] = value
            else:
                obj[key] = sanitise(key, value)
        if not _FIELD_SET.issuperset(record):
            for key in sorted(k for k in record if k not in _FIELD_SET and k not in _RESERVED):
                obj[key] = sanitise(key, record[key])
        with self._lock:
            if self._closed:
                raise ValueError("write to a closed decision log")
            seq = self._seq + 1
            obj["seq"] = seq
            body = _encode(obj)
            digest = hashlib.sha256((self._hash + body).encode("ascii")).hexdigest()
            line = (body[:-1] + ',"hash":"' + digest + '"}\n').encode("ascii")
            if self._writer is not None:
                self._queue.append((seq, digest, line))
                self._seq, self._hash = seq, digest
                self._wake.set()
                obj["hash"] = digest
                return obj
            self._append(line)
            self._seq, self._hash = seq, digest
            self._written = (seq, digest)
            if self._rotate_bytes and self._size >= self._rotate_bytes:
                self._rotate()
        obj["hash"] = digest
        return obj

    def _append(self, line: bytes) -> None:
        if self._stdout is not None:
            self._stdout.write(line)
            self._stdout.flush()
            return
        written = os.write(self._fd, line)
        if written != len(line):  # disk full, or a signal: never leave a torn line behind
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise OSError(f"{self._path}: short write ({written} of {len(line)} bytes)")
        self._size += written

    def _rotate(self) -> None:
        assert self._path is not None
        last_seq = self._written[0]  # the seq of the last line in the file being rotated
        rotated = self._path.with_name(f"{self._path.name}.{last_seq:012d}")
        try:
            os.rename(self._path, rotated)
            try:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError:
                os.rename(rotated, self._path)  # keep appending to the file we have
                raise
        except OSError as e:
            raise LogError(f"{self._path}: cannot rotate: {e.strerror or e}") from e
        os.close(self._fd)
        self._fd, self._size = fd, 0

    # ---- the background writer --------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Lines built but not yet in the file."""
        return len(self._queue)

    def _write_forever(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait()
            self._wake.clear()
            while queue:
                batch = [queue[i] for i in range(min(len(queue), 256))]
                try:
                    self._append_batch([line for _, _, line in batch])
                except OSError as e:
                    self.failing = e.strerror or str(e)
                    if self._stopping:
                        return  # close() gave up waiting; it reports what is left
                    time.sleep(0.1)
                    continue
                for _ in batch:
                    queue.popleft()
                seq, digest, _ = batch[-1]
                self._written = (seq, digest)
                self.failing = None
                if self._rotate_bytes and self._size >= self._rotate_bytes:
                    try:
                        self._rotate()
                    except LogError as e:
                        sys.stderr.write(f"cohortgate: decision log: {e}\n")
            with self._idle:
                self._idle.notify_all()
            if self._stopping and not queue:
                return

    def _append_batch(self, lines: list[bytes]) -> None:
        """Write whole lines; on a failure cut the file back to its last whole line."""
        data = b"".join(lines)
        if self._stdout is not None:
            self._stdout.write(data)
            self._stdout.flush()
            return
        start, done = self._size, 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise
        self._size = start + done

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every line built so far is in the file; False on timeout."""
        if self._writer is None:
            return True
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(left, 0.1))
        return True

    def head(self) -> dict[str, Any]:
        """The end of the chain in the file: {"file", "seq", "hash"}, as /audit/head reports
        it (lines still queued for the writer thread are not in it yet)."""
        with self._lock:
            file = str(self._path) if self._path is not None else None
            seq, digest = self._written
            return {"file": file, "seq": seq, "hash": digest}

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (waiting up to `timeout` for a failing disk), close the file
        and release the lock; idempotent."""
        writer = self._writer
        if writer is not None and writer.is_alive():
            self.flush(timeout)
            self._stopping = True
            self._wake.set()
            writer.join(timeout)
            if self._queue:
                sys.stderr.write(f"cohortgate: decision log: {len(self._queue)} lines could "
                                 f"not be written before shutdown ({self.failing})\n")
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # closing the last descriptor releases the flock
                self._lock_fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class ChainBreak:
    """The first place the chain breaks; `line` is 1-based within `file`."""

    file: str
    line: int
    seq: int | None
    why: str


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What `verify_chain` checked: lines that verified, the chain's ends, the first break."""

    files: tuple[str, ...]
    lines: int
    first_seq: int | None
    last_seq: int | None
    last_hash: str | None
    breaks: ChainBreak | None
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.breaks is None


def _first_seq(path: Path) -> int | None:
    """The seq of a file's first line, for ordering files; a best guess if it is damaged."""
    with path.open("rb") as f:
        raw = f.readline(_MAX_LINE)
    try:
        return _parse_line(raw.rstrip(b"\n").decode("ascii"))[0]
    except (_NotChained, UnicodeDecodeError):
        guesses = _SEQ_GUESS.findall(raw)
        return int(guesses[-1]) if guesses else None


class _Verifier:
    """The state of one verify_chain run, line by line across files."""

    def __init__(self, expect_head: tuple[int, str] | None) -> None:
        self.expect_head = expect_head
        self.head_seen = False
        self.lines = 0
        self.first_seq: int | None = None
        self.seq: int | None = None
        self.hash: str | None = None  # None: the first line's hash is taken on trust
        self.line_seq: int | None = None  # the seq of the line being checked, once parsed
        self.notes: list[str] = []

    def check(self, raw: bytes, first_in_file: bool) -> str | None:
        """Why `raw` breaks the chain, or None; advances the chain when it does not."""
        self.line_seq = None
        if not raw.endswith(b"\n"):
            return "torn line: no newline at the end (an interrupted write, or the file was cut)"
        try:
            text = raw[:-1].decode("ascii")
        except UnicodeDecodeError:
            return "not a chained line: not ASCII"
        try:
            seq, digest, body = _parse_line(text)
        except _NotChained as e:
            return str(e)
        self.line_seq = seq
        if self.seq is None:
            self.first_seq = seq
            if seq == 1:
                self.hash = GENESIS
            else:
                self.notes.append(f"chain starts at seq {seq}: earlier lines were not given")
        elif seq <= self.seq:
            return f"seq {seq} follows {self.seq}: seq goes backwards, lines reordered or repeated"
        elif seq != self.seq + 1:
            if first_in_file:
                return f"seq {seq} follows {self.seq}: files do not join, a file is missing"
            return f"seq {seq} follows {self.seq}: a line was removed or moved"
        if self.hash is not None:
            expected = hashlib.sha256((self.hash + body).encode("ascii")).hexdigest()
            if expected != digest:
                return "hash mismatch: line edited, or a line before it was removed"
        if self.expect_head is not None and seq == self.expect_head[0]:
            if digest != self.expect_head[1]:
                return f"recorded head seq {seq} found, but its hash differs: the log was rewritten"
            self.head_seen = True
        self.seq, self.hash = seq, digest
        self.lines += 1
        return None


def verify_chain(
    paths: Sequence[Path], *, expect_head: tuple[int, str] | None = None
) -> VerifyResult:
    """Check the hash chain through `paths`, in any order (they are ordered by the seq of
    their first line; empty files are skipped). Reports the first break, if any.

    `expect_head` is a (seq, hash) recorded earlier, e.g. from /audit/head: the chain must
    contain it, so lines cut from the end are found too. A file that cannot be read raises
    OSError.
    """
    unique = list(dict.fromkeys(paths))
    # `decisions.jsonl*` also matches the writer's lock file, which holds a pid, not lines
    locks = [p for p in unique
             if p.name.endswith(".lock") and p.with_name(p.name[: -len(".lock")]) in unique]
    unique = [p for p in unique if p not in locks]
    sizes = {p: p.stat().st_size for p in unique}
    starts = {p: _first_seq(p) for p in unique if sizes[p] > 0}
    # Files whose first seq cannot be read go last; their first line will be the break.
    ordered = sorted(starts, key=lambda p: (starts[p] is None, starts[p] or 0, str(p)))
    state = _Verifier(expect_head)
    notes = [f"{p}: empty, skipped" for p in unique if sizes[p] == 0]
    notes += [f"{p}: the log's lock file, skipped" for p in locks]
    broke: ChainBreak | None = None
    last_file, last_line = "", 0
    for path in ordered:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                why = state.check(raw, number == 1)
                if why is not None:
                    broke = ChainBreak(str(path), number, state.line_seq, why)
                    break
                last_file, last_line = str(path), number
        if broke is not None:
            break
    if broke is None and expect_head is not None and not state.head_seen:
        head_seq = expect_head[0]
        if state.first_seq is not None and head_seq < state.first_seq:
            why = (
                f"recorded head seq {head_seq} not found: it precedes the first line given "
                f"(seq {state.first_seq}); give the older files too"
            )
        else:
            why = f"recorded head seq {head_seq} not found: lines cut from the end"
        broke = ChainBreak(last_file, last_line, head_seq, why)
    if state.lines == 0 and broke is None:
        notes.append("no lines to verify")
    return VerifyResult(
        files=tuple(str(p) for p in ordered),
        lines=state.lines,
        first_seq=state.first_seq,
        last_seq=state.seq,
        last_hash=state.hash if state.seq is not None else None,
        breaks=broke,
        notes=tuple(state.notes + notes),
    )
