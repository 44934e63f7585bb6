"""Tests for cohortgate.tail: `cohortgate tail` (filters, readable lines, --json, -n, --since,
-f across rotation and truncation) and `cohortgate report`, on real chained logs."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import IO
from typing import Any

import pytest

from cohortgate.audit import DecisionLog
from cohortgate.audit import rotated_files
from cohortgate.audit import verify_chain
from cohortgate.tail import Filter
from cohortgate.tail import escape_text
from cohortgate.tail import format_decision
from cohortgate.tail import main
from cohortgate.tail import parse_since
from cohortgate.tail import percentile
from cohortgate.tail import use_color

RUN_MAIN = "import sys; from cohortgate.tail import main; sys.exit(main(sys.argv[1:]))"
HOSTILE = "\x1b[2J\r\x07\x9b31m\u202e"  # clear screen, carriage return, bell, C1 CSI, bidi


def decision(n: int, **fields: Any) -> dict[str, Any]:
    """A plausible decision record; `n` makes its request_id."""
    rec: dict[str, Any] = {
        "ts": f"2026-11-27T02:{n // 60:02d}:{n % 60:02d}.500Z",
        "request_id": f"req-{n}",
        "decision": "allow",
        "reason": "approved",
        "status": 200,
        "customer": "acme-labs",
        "cohort": "preview-1",
        "phase": "preview",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "gpt-5.6",
        "stream": False,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "latency_ms": 5.0,
    }
    rec.update(fields)
    return rec


# A small known log: ids 1..8, in this order.
KNOWN: list[dict[str, Any]] = [
    decision(1),
    decision(2, customer="beta", cohort="preview-2", prompt_tokens=100, completion_tokens=7,
             latency_ms=40.0),
    decision(3, decision="deny", reason="token_expired", status=401, customer=None,
             cohort=None, prompt_tokens=None, completion_tokens=None, latency_ms=0.5),
    decision(4, decision="deny", reason="rate_limited_requests", status=429,
             prompt_tokens=None, completion_tokens=None, latency_ms=1.0),
    decision(5, stream=True, latency_ms=7.0, usage_estimated=True),
    decision(6, decision="deny", reason="token_expired", status=401, customer="beta",
             cohort="preview-2", prompt_tokens=None, completion_tokens=None, latency_ms=0.7),
    decision(7, customer="beta", cohort="preview-2", prompt_tokens=1, completion_tokens=2,
             latency_ms=60.0),
    decision(8, decision="deny", reason="model_not_approved", status=403, latency_ms=2.0,
             prompt_tokens=None, completion_tokens=None, detail="model 'gpt-4' not approved"),
]


def write_log(path: Path, records: list[dict[str, Any]], rotate_bytes: int = 0) -> None:
    with DecisionLog(path, rotate_bytes) as log:
        for rec in records:
            log.write(rec)


@pytest.fixture
def known_log(tmp_path: Path) -> Path:
    path = tmp_path / "decisions.jsonl"
    write_log(path, KNOWN)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ids(out: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in out.splitlines()]


# ---- filters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], [1, 2, 3, 4, 5, 6, 7, 8]),
        (["--decision", "deny"], [3, 4, 6, 8]),
        (["--decision", "allow"], [1, 2, 5, 7]),
        (["--customer", "beta"], [2, 6, 7]),
        (["--customer", "beta", "--customer", "acme-labs"], [1, 2, 4, 5, 6, 7, 8]),
        (["--customer", "nobody"], []),
        (["--reason", "token_expired"], [3, 6]),
        (["--reason", "token_expired", "--reason", "model_not_approved"], [3, 6, 8]),
        (["--customer", "beta", "--decision", "deny"], [6]),
        (["--customer", "acme-labs", "--decision", "deny", "--reason", "token_expired"], []),
        (["--since", "2026-11-27T02:00:05Z"], [5, 6, 7, 8]),
        (["--since", "2026-11-27T03:00:05+01:00", "--decision", "allow"], [5, 7]),
        (["--since", "2026-11-28T00:00:00Z"], []),
    ],
)
def test_filters_combine(known_log: Path, capsys: pytest.CaptureFixture[str],
                         args: list[str], expected: list[int]) -> None:
    code, out, err = run(capsys, "tail", str(known_log), "--json", *args)
    assert (code, err) == (0, "")
    assert ids(out) == [f"req-{n}" for n in expected]


def test_since_duration_counts_back_from_now(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    now = datetime.now(UTC)
    stamps = [now - timedelta(minutes=m) for m in (50, 20, 10, 1)]
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(i, ts=s.isoformat().replace("+00:00", "Z"))
                     for i, s in enumerate(stamps)])
    assert ids(run(capsys, "tail", str(path), "--json", "--since", "15m")[1]) == ["req-2", "req-3"]
    assert ids(run(capsys, "tail", str(path), "--json", "--since", "1h")[1]) == [
        "req-0", "req-1", "req-2", "req-3"]


def test_filter_ignores_values_of_the_wrong_type() -> None:
    flt = Filter(customers=frozenset({"acme"}), reasons=frozenset({"approved"}),
                 since=datetime(2026, 1, 1, tzinfo=UTC))
    assert flt.matches({"customer": "acme", "reason": "approved", "ts": "2026-02-01T00:00:00Z"})
    assert not flt.matches({"customer": ["acme"], "reason": "approved",
                            "ts": "2026-02-01T00:00:00Z"})
    assert not flt.matches({"customer": "acme", "reason": {"x": 1}, "ts": "2026-02-01T00:00:00Z"})
    assert not flt.matches({"customer": "acme", "reason": "approved", "ts": "yesterday"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("15m", datetime(2026, 11, 27, 1, 45, tzinfo=UTC)),
        ("1h30m", datetime(2026, 11, 27, 0, 30, tzinfo=UTC)),
        ("2026-11-27T01:00:00Z", datetime(2026, 11, 27, 1, 0, tzinfo=UTC)),
        ("2026-11-27T03:00:00+02:00", datetime(2026, 11, 27, 1, 0, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    assert parse_since(text, datetime(2026, 11, 27, 2, 0, tzinfo=UTC)) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [("15", "has no unit"), ("yesterday", "invalid duration .* or give an RFC 3339 time"),
     ("2026-11-27T01:00:00", "time zone"), ("-5m", "invalid duration")],
)
def test_parse_since_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_since(text, datetime(2026, 11, 27, 2, 0, tzinfo=UTC))


# ---- readable lines ---------------------------------------------------------------------


def test_readable_lines_are_aligned_and_plain_when_not_a_terminal(
        known_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "tail", str(known_log))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("2026-11-27 02:00:01.500  ALLOW 200 approved              acme-labs   "
                        "preview-1  gpt-5.6   in 10 / out 20 tok     5.0 ms")
    assert lines[2] == ("2026-11-27 02:00:03.500  DENY  401 token_expired         -           "
                        "-          gpt-5.6                          0.5 ms  "
                        "POST /v1/chat/completions")
    assert lines[4].endswith("in ~10 / out ~20 tok   7.0 ms  [stream]")
    assert lines[7].endswith("POST /v1/chat/completions  (model 'gpt-4' not approved)")
    # every column starts at the same place on every line
    for column in (" ALLOW ", " DENY  ", "acme-labs", " ms"):
        assert len({line.index(column) for line in lines if column in line}) == 1, column
    assert {line.index("preview-") for line in lines if "preview-" in line} == {69}
    assert "\x1b" not in out


def test_color_always_colours_the_decision(known_log: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = run(capsys, "tail", str(known_log), "--color", "always")[1]
    lines = out.splitlines()
    assert "  \x1b[32mALLOW\x1b[0m 200 approved" in lines[0]
    assert "  \x1b[31mDENY\x1b[0m  401 token_expired" in lines[2]
    assert "\x1b" not in run(capsys, "tail", str(known_log), "--color", "never")[1]


@pytest.mark.parametrize(
    ("mode", "tty", "no_color", "expected"),
    [
        ("auto", True, None, True),
        ("auto", False, None, False),
        ("auto", True, "1", False),
        ("auto", True, "", True),  # no-color.org: an empty NO_COLOR does not count
        ("always", False, "1", True),
        ("never", True, None, False),
    ],
)
def test_color_mode(monkeypatch: pytest.MonkeyPatch, mode: str, tty: bool,
                    no_color: str | None, expected: bool) -> None:
    class Stream:
        def isatty(self) -> bool:
            return tty

    if no_color is None:
        monkeypatch.delenv("NO_COLOR", raising=False)
    else:
        monkeypatch.setenv("NO_COLOR", no_color)
    assert use_color(mode, Stream()) is expected


def test_hostile_values_cannot_reach_the_terminal(tmp_path: Path,
                                                  capsysbinary: pytest.CaptureFixture[bytes],
                                                  ) -> None:
    """Regression: terminal escape injection through logged customer ids, paths and details."""
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(1, decision="deny", reason="cohort_not_admitted", status=403,
                              customer=f"evil{HOSTILE}", cohort="c\nfake line",
                              path=f"/v1/{HOSTILE}", method="GE\x1bT",
                              detail=f"why{HOSTILE}", model=f"m{HOSTILE}")])
    for color in ("never", "always"):
        assert main(["tail", str(path), "--color", color]) == 0
        out = capsysbinary.readouterr().out
        visible = out.replace(b"\x1b[31m", b"").replace(b"\x1b[0m", b"")
        for byte in (b"\x1b", b"\r", b"\x07", b"\xc2\x9b", "\u202e".encode()):
            assert byte not in visible, (color, byte)
        assert out.count(b"\n") == 1
        assert b"evil\\x1b[2J\\r\\x07\\x9b31m\\u202e" in visible
        assert b"/v1/\\x1b[2J" in visible
        assert b"(why\\x1b[2J" in visible
        assert b"c\\nfake line" in visible


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain-id", "plain-id"),
        ("caf\u00e9", "caf\u00e9"),
        ("a\x1bb", "a\\x1bb"),
        ("back\\slash", "back\\\\slash"),
        ("\t\n\r", "\\t\\n\\r"),
        ("\x7f\x85", "\\x7f\\x85"),
        ("\u200b\u202e", "\\u200b\\u202e"),
        ("\ud800", "\\ud800"),
        ("\U000e0001", "\\U000e0001"),
    ],
)
def test_escape_text(value: str, shown: str) -> None:
    assert escape_text(value) == shown


def test_format_survives_values_of_any_type() -> None:
    line = format_decision({"ts": 5, "decision": ["x"], "status": "\x1b", "customer": {"a": 1},
                            "prompt_tokens": "many", "latency_ms": float("nan"), "stream": 1})
    assert "\x1b" not in line
    assert '{"a": 1}' in line
    assert "tok" not in line


# ---- --json -----------------------------------------------------------------------------


def test_json_round_trips_byte_for_byte(tmp_path: Path,
                                        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [*KNOWN, decision(9, customer=f"x{HOSTILE}", path="/\u00e9")])
    assert main(["tail", str(path), "--json"]) == 0
    out = capsysbinary.readouterr().out
    assert out == path.read_bytes()
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(out)
    assert verify_chain([copy]).ok


def test_json_round_trips_across_rotated_files(tmp_path: Path,
                                               capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(n) for n in range(1, 21)], rotate_bytes=1500)
    files = rotated_files(path)
    assert len(files) > 3
    assert main(["tail", str(path), "--json", "--since", "2026-01-01T00:00:00Z"]) == 0
    out = capsysbinary.readouterr().out
    assert out == b"".join(f.read_bytes() for f in files)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(out)
    result = verify_chain([copy])
    assert result.ok and result.lines == 20


def test_cli_process_shows_only_denials(known_log: Path) -> None:
    done = subprocess.run([sys.executable, "-c", RUN_MAIN, "tail", str(known_log),
                           "--decision", "deny"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    assert all(" DENY  " in line for line in lines)
    assert "\x1b" not in done.stdout  # a pipe is not a terminal


def cli_has_tail() -> bool:
    from cohortgate.cli import build_parser

    return "tail" in build_parser().format_help()


@pytest.mark.skipif(not cli_has_tail(), reason="cohortgate.cli does not register tail yet")
def test_cohortgate_command_round_trips_json(known_log: Path, tmp_path: Path) -> None:
    """The installed command, end to end: `cohortgate tail --json > copy` still verifies."""
    copy = tmp_path / "copy.jsonl"
    with copy.open("wb") as out:
        done = subprocess.run([sys.executable, "-m", "cohortgate.cli", "tail", str(known_log),
                               "--json"], stdout=out, stderr=subprocess.PIPE, timeout=60,
                              check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    assert copy.read_bytes() == known_log.read_bytes()
    verified = subprocess.run([sys.executable, "-m", "cohortgate.cli", "audit", "verify",
                               str(copy)], capture_output=True, text=True, timeout=60,
                              check=False)
    assert verified.returncode == 0, verified.stdout


# ---- damaged lines ----------------------------------------------------------------------


def test_bad_lines_are_reported_with_file_and_line_and_skipped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, KNOWN[:4])
    lines = path.read_bytes().splitlines(keepends=True)
    garbage = [b"{not json\n", b"[1, 2]\n", b"\xff\xfe\n", b"[" * 100_000 + b"\n"]
    path.write_bytes(b"".join(lines[:2] + garbage + lines[2:]))
    code, out, err = run(capsys, "tail", str(path), "--json")
    assert code == 0
    assert ids(out) == ["req-1", "req-2", "req-3", "req-4"]
    assert err.splitlines() == [
        f"cohortgate: warning: {path}:3: not valid JSON, skipped",
        f"cohortgate: warning: {path}:4: not a JSON object, skipped",
        f"cohortgate: warning: {path}:5: not UTF-8 text, skipped",
        f"cohortgate: warning: {path}:6: not valid JSON, skipped",
    ]
    # read from the end (-n), the line numbers are the same
    code, out, err = run(capsys, "tail", str(path), "--json", "-n", "3")
    assert ids(out) == ["req-2", "req-3", "req-4"]
    assert [line.split(": ")[2] for line in err.splitlines()] == [
        f"{path}:3", f"{path}:4", f"{path}:5", f"{path}:6"]


def test_incomplete_last_line_is_reported(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, KNOWN[:3])
    with path.open("ab") as f:
        f.write(b'{"ts":"2026-11-27T02:00:09Z","decision":"allow"}')
    for extra in ([], ["-n", "2"]):
        code, out, err = run(capsys, "tail", str(path), "--json", *extra)
        assert code == 0
        assert ids(out)[-1] == "req-3"
        assert err == (f"cohortgate: warning: {path}:4: incomplete last line (no newline: torn, "
                       "or still being written), skipped\n")


# ---- -n and --since ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-n", "3"], [6, 7, 8]),
        (["-n", "0"], []),
        (["-n", "100"], [1, 2, 3, 4, 5, 6, 7, 8]),
        (["-n", "2", "--decision", "allow"], [5, 7]),
        (["-n", "1", "--customer", "beta"], [7]),
    ],
)
def test_last_n_matching(known_log: Path, capsys: pytest.CaptureFixture[str],
                         args: list[str], expected: list[int]) -> None:
    code, out, _ = run(capsys, "tail", str(known_log), "--json", *args)
    assert code == 0
    assert ids(out) == [f"req-{n}" for n in expected]


def test_since_reads_rotated_files_oldest_first(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(n, customer="beta" if n % 4 == 0 else "acme")
                     for n in range(1, 31)], rotate_bytes=1500)
    assert len(rotated_files(path)) >= 6
    current = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]

    # without --since: the current file only
    assert ids(run(capsys, "tail", str(path), "--json")[1]) == current
    # with it: every rotated file in the window, in order
    out = run(capsys, "tail", str(path), "--json", "--since", "2026-11-27T02:00:07Z")[1]
    assert ids(out) == [f"req-{n}" for n in range(7, 31)]
    # -n reaches back into rotated files when the current one has too few
    out = run(capsys, "tail", str(path), "--json", "--since", "2026-11-27T02:00:00Z",
              "-n", "5", "--customer", "beta")[1]
    assert ids(out) == [f"req-{n}" for n in (12, 16, 20, 24, 28)]


def test_since_skips_rotated_files_wholly_before_the_window(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(n) for n in range(1, 31)], rotate_bytes=1500)
    oldest = rotated_files(path)[0]
    with oldest.open("r+b") as f:  # damage its first line: reading it would warn
        f.write(b"#")
    code, out, err = run(capsys, "tail", str(path), "--json", "--since", "2026-11-27T02:00:20Z")
    assert (code, err) == (0, "")
    assert ids(out) == [f"req-{n}" for n in range(20, 31)]


# ---- sources and usage errors -----------------------------------------------------------


def write_config(tmp_path: Path, decisions: str) -> Path:
    config = tmp_path / "cohortgate.toml"
    config.write_text(f"""
upstream = "http://127.0.0.1:8000"
[authority]
issuer = "https://approvals.example.gov"
audience = "gpt-5.6"
jwks = "{tmp_path / "jwks.json"}"
[log]
decisions = "{decisions}"
""")
    return config


def test_config_names_the_log(known_log: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, str(known_log))
    code, out, _ = run(capsys, "tail", "--config", str(config), "--json", "--decision", "deny")
    assert code == 0
    assert ids(out) == ["req-3", "req-4", "req-6", "req-8"]
    code, out, _ = run(capsys, "report", "--config", str(config), "--json")
    assert json.loads(out)["totals"]["requests"] == 8


@pytest.mark.parametrize("command", ["tail", "report"])
def test_usage_errors_exit_2(tmp_path: Path, known_log: Path, command: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    stdout_config = write_config(tmp_path, "-")
    cases = [
        (["--config", str(stdout_config)], 'log.decisions is "-"'),
        ([str(tmp_path / "missing.jsonl")], "no such file"),
        (["--config", str(tmp_path / "missing.toml")], "cannot read"),
        ([str(known_log), "--config", str(stdout_config)], "not both"),
        ([str(known_log), "--since", "soon"], "invalid duration"),
    ]
    for args, why in cases:
        code, out, err = run(capsys, command, *args)
        assert (code, out) == (2, ""), args
        assert err.startswith("cohortgate: ") and why in err, (args, err)


# ---- -f ---------------------------------------------------------------------------------


class Follow:
    """`tail -f` in a child process; its standard output and error read line by line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", RUN_MAIN, "tail", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.out: queue.Queue[str] = queue.Queue()
        self.err: queue.Queue[str] = queue.Queue()
        for stream, q in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: IO[str] | None, q: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            q.put(line)

    def lines(self, q: queue.Queue[str], count: int, within: float = 2.0) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + within
        while len(got) < count:
            try:
                got.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(
                    f"{len(got)} of {count} lines within {within} s: {got}") from None
        return got

    def quiet(self, q: queue.Queue[str], seconds: float) -> None:
        time.sleep(seconds)
        assert q.empty(), q.get()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def follow() -> Iterator[list[Follow]]:
    started: list[Follow] = []
    yield started
    for f in started:
        f.stop()


def test_follow_survives_rotation_and_truncation(tmp_path: Path, follow: list[Follow]) -> None:
    path = tmp_path / "logs" / "d.jsonl"
    f = Follow(str(path), "-f", "--json")
    follow.append(f)
    assert "does not exist yet, waiting" in f.lines(f.err, 1, within=30)[0]
    written: list[str] = []
    received: list[str] = []

    def write(log: DecisionLog, count: int, pause: float = 0.0) -> None:
        for _ in range(count):
            n = len(written) + 1
            log.write(decision(n))
            written.append(f"req-{n}")
            time.sleep(pause)
        received.extend(json.loads(line)["request_id"] for line in f.lines(f.out, count))

    with DecisionLog(path, rotate_bytes=1000) as log:
        write(log, 7, pause=0.07)  # the file appears, then rotates, one line at a time
        write(log, 11)  # a burst: several rotations between two polls
        assert len(rotated_files(path)) >= 6
        if path.stat().st_size == 0:
            write(log, 1)
        os.truncate(path, 0)
        f.lines(f.err, 1)  # "truncated, reading it from the start"
        write(log, 2)
    assert received == written
    f.quiet(f.out, 0.5)  # nothing twice


def test_follow_waits_for_a_whole_line_and_ctrl_c_exits_0(tmp_path: Path,
                                                          follow: list[Follow]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(n) for n in range(1, 15)])
    f = Follow(str(path), "-f", "--decision", "allow")
    follow.append(f)
    first = f.lines(f.out, 10, within=30)  # like tail(1): the last 10, then new ones
    assert first[0].startswith("2026-11-27 02:00:05.500  ALLOW")
    line = json.dumps(decision(99, decision="deny")) + "\n" + json.dumps(decision(100)) + "\n"
    with path.open("ab") as out:
        out.write(line[:50].encode())
        out.flush()
        f.quiet(f.out, 0.6)
        out.write(line[50:].encode())
    assert f.lines(f.out, 1)[0].startswith("2026-11-27 02:01:40.500  ALLOW 200 approved")
    f.quiet(f.out, 0.4)
    f.proc.send_signal(signal.SIGINT)
    assert f.proc.wait(timeout=10) == 0
    assert f.err.empty()


# ---- report -----------------------------------------------------------------------------


def test_report_counts(known_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "report", str(known_log), "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert set(report) == {"window", "totals", "customers", "reasons", "cohorts",
                           "skipped_lines"}
    assert report["window"] == {"since": None, "first": "2026-11-27T02:00:01.500Z",
                                "last": "2026-11-27T02:00:08.500Z", "files": [str(known_log)]}
    assert report["totals"] == {
        "requests": 8, "allowed": 4, "denied": 4, "deny_rate": 0.5, "prompt_tokens": 121,
        "completion_tokens": 49, "tokens_estimated": 1, "latency_ms_p50": 2.0,
        "latency_ms_p95": 60.0,
    }
    assert report["customers"] == [
        {"customer": "acme-labs", "requests": 4, "allowed": 2, "denied": 2,
         "prompt_tokens": 20, "completion_tokens": 40, "tokens_estimated": 1,
         "latency_ms_p50": 2.0, "latency_ms_p95": 7.0},
        {"customer": "beta", "requests": 3, "allowed": 2, "denied": 1, "prompt_tokens": 101,
         "completion_tokens": 9, "tokens_estimated": 0, "latency_ms_p50": 40.0,
         "latency_ms_p95": 60.0},
        {"customer": None, "requests": 1, "allowed": 0, "denied": 1, "prompt_tokens": 0,
         "completion_tokens": 0, "tokens_estimated": 0, "latency_ms_p50": 0.5,
         "latency_ms_p95": 0.5},
    ]
    assert report["reasons"] == [
        {"reason": "approved", "count": 4}, {"reason": "token_expired", "count": 2},
        {"reason": "model_not_approved", "count": 1},
        {"reason": "rate_limited_requests", "count": 1},
    ]
    assert [(c["cohort"], c["requests"]) for c in report["cohorts"]] == [
        ("preview-1", 4), ("preview-2", 3), (None, 1)]
    assert report["skipped_lines"] == 0


def test_report_text(known_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", str(known_log))
    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith("requests 8  allowed 4  denied 4  deny rate 50.0%")
    assert lines[3].split() == ["customer", "requests", "allowed", "denied", "tokens", "in",
                                "tokens", "out", "p50", "ms", "p95", "ms"]
    assert lines[4].split() == ["acme-labs", "4", "2", "2", "20", "40", "2.0", "7.0"]
    assert lines[6].split() == ["-", "1", "0", "1", "0", "0", "0.5", "0.5"]
    assert lines[-10:-4] == ["reason                 count", "approved                   4",
                             "token_expired              2", "model_not_approved         1",
                             "rate_limited_requests      1", ""]


def test_report_window_reads_rotated_files(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.jsonl"
    write_log(path, [decision(n, prompt_tokens=n) for n in range(1, 31)], rotate_bytes=1500)
    with path.open("ab") as f:
        f.write(b"garbage\n")
    everything = json.loads(run(capsys, "report", str(path), "--json")[1])
    assert everything["totals"]["requests"] == 30
    assert everything["totals"]["prompt_tokens"] == sum(range(1, 31))
    assert everything["skipped_lines"] == 1
    code, out, err = run(capsys, "report", str(path), "--json",
                         "--since", "2026-11-27T02:00:21Z")
    assert code == 0
    window = json.loads(out)
    assert window["totals"]["requests"] == 10
    assert window["totals"]["prompt_tokens"] == sum(range(21, 31))
    assert window["window"]["since"] == "2026-11-27T02:00:21.000Z"
    assert len(window["window"]["files"]) < len(everything["window"]["files"])
    assert err.startswith(f"cohortgate: warning: {path}:") and "not valid JSON" in err


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [([], 50, None), ([3.0], 95, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
     ([float(n) for n in range(1, 101)], 95, 95.0), ([1.0, 2.0], 0, 1.0)],
)
def test_percentile_nearest_rank(values: list[float], p: float, expected: float | None) -> None:
    assert percentile(values, p) == expected
