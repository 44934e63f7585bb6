"""Tests for cohortgate.audit: the decision log's writer, rotation, resume, lock and verifier."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cohortgate
from cohortgate.audit import FIELDS
from cohortgate.audit import GENESIS
from cohortgate.audit import DecisionLog
from cohortgate.audit import LogError
from cohortgate.audit import LogInUse
from cohortgate.audit import rotated_files
from cohortgate.audit import sanitise
from cohortgate.audit import verify_chain

ADDONS_DIR = str(Path(cohortgate.__file__).resolve().parent.parent)


def record(n: int, **extra: Any) -> dict[str, Any]:
    """A plausible decision record; `n` makes each one different."""
    return {
        "ts": f"2026-11-01T12:00:{n % 60:02d}Z",
        "request_id": f"00000000-0000-4000-8000-{n:012d}",
        "decision": "allow" if n % 3 else "deny",
        "reason": "approved" if n % 3 else "token_expired",
        "status": 200 if n % 3 else 401,
        "customer": f"cust-{n}",
        "method": "POST",
        "path": "/v1/chat/completions",
        "model": "gpt-5.6",
        "stream": n % 2 == 0,
        "latency_ms": 12.5,
        **extra,
    }


def write_log(path: Path, count: int, rotate_bytes: int = 0) -> list[dict[str, Any]]:
    with DecisionLog(path, rotate_bytes=rotate_bytes) as log:
        return [log.write(record(n)) for n in range(1, count + 1)]


def spec_hash(prev: str, line: str) -> str:
    """The SPEC's recipe, independent of the module: cut 75 chars, close with }, sha256."""
    assert line[-75:].startswith(',"hash":"')
    assert line.endswith('"}')
    return hashlib.sha256((prev + line[:-75] + "}").encode("utf-8")).hexdigest()


def forge_line(body: dict[str, Any], prev: str) -> str:
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256((prev + text).encode()).hexdigest()
    return text[:-1] + ',"hash":"' + digest + '"}\n'


class TestWriter:
    def test_written_log_verifies_and_follows_the_spec(self, tmp_path: Path) -> None:
        path = tmp_path / "logs" / "decisions.jsonl"  # the parent folder is created
        with DecisionLog(path) as log:
            written = [log.write(record(n, zeta="z", alpha=n)) for n in range(1, 6)]
            head = log.head()
        raw = path.read_bytes()
        assert raw.isascii()
        lines = raw.decode("ascii").splitlines(keepends=True)
        assert len(lines) == 5
        prev = GENESIS
        for n, line in enumerate(lines, start=1):
            assert line.endswith("}\n")
            assert line.count("\n") == 1
            pairs = json.loads(line, object_pairs_hook=lambda kv: kv)
            assert [k for k, _ in pairs] == [*FIELDS, "alpha", "zeta", "seq", "hash"]
            obj = dict(pairs)
            assert obj["seq"] == n
            assert obj["cohort"] is None
            assert obj["outcome"] is None
            assert obj["hash"] == spec_hash(prev, line.rstrip("\n"))
            assert obj == written[n - 1]
            prev = obj["hash"]
        assert head == {"file": str(path), "seq": 5, "hash": prev}
        result = verify_chain([path])
        assert result.ok, result.breaks
        assert (result.lines, result.first_seq, result.last_seq) == (5, 1, 5)
        assert result.last_hash == prev
        assert result.notes == ()

    def test_seq_and_hash_in_a_record_are_ignored(self, tmp_path: Path) -> None:
        with DecisionLog(tmp_path / "d.jsonl") as log:
            obj = log.write({"seq": 99, "hash": "f" * 64, "reason": "approved"})
        assert obj["seq"] == 1
        assert obj["hash"] != "f" * 64
        assert verify_chain([tmp_path / "d.jsonl"]).ok

    @pytest.mark.parametrize(
        ("key", "value", "expected"),
        [
            ("reason", "x" * 256, "x" * 256),
            ("reason", "x" * 257, "x" * 253 + "..."),
            ("path", "/" * 512, "/" * 512),
            ("path", "/" * 513, "/" * 509 + "..."),
            ("client_request_id", "r" * 600, "r" * 509 + "..."),
            ("an_extra", "e" * 300, "e" * 253 + "..."),
            ("status", 200, 200),
            ("stream", True, True),
            ("latency_ms", 1.25, 1.25),
            ("latency_ms", float("nan"), None),
            ("latency_ms", float("inf"), None),
            ("model", None, None),
            ("model", b"raw", "b'raw'"),
            ("model", ["a", "b"], "['a', 'b']"),
        ],
    )
    def test_sanitise(self, key: str, value: Any, expected: Any) -> None:
        assert sanitise(key, value) == expected

    def test_lines_are_strict_json(self, tmp_path: Path) -> None:
        def refuse(constant: str) -> None:
            raise ValueError(constant)

        path = tmp_path / "d.jsonl"
        with DecisionLog(path) as log:
            log.write(record(1, latency_ms=float("nan"), extra=float("-inf"), model=b"\xff"))
        obj = json.loads(path.read_text(), parse_constant=refuse)
        assert obj["latency_ms"] is None
        assert obj["extra"] is None
        assert obj["model"] == "b'\\xff'"

    @pytest.mark.parametrize(
        "hostile",
        [
            '/v1/chat\n{"decision":"allow"}\n',
            "/v1\r\n\r\nX-Injected: 1",
            '/v1/"quoted"/\\back\\slash\\',
            "/v1/nul\x00byte\x00",
            "/v1/ünïcødé/日本語/\u2028\u2029/🙂",
            "/v1/" + "A" * 10_000,
            "/v1/" + "\x00" * 10_000,
            "\udcff\ud83d",  # lone surrogates, as from surrogateescape
        ],
    )
    def test_hostile_strings_stay_on_one_ascii_line(self, tmp_path: Path, hostile: str) -> None:
        path = tmp_path / "d.jsonl"
        with DecisionLog(path) as log:
            log.write(record(1))
            obj = log.write(record(2, path=hostile, client=hostile, client_request_id=hostile))
            log.write(record(3))
        raw = path.read_bytes()
        assert raw.isascii()
        lines = raw.split(b"\n")
        assert len(lines) == 4
        assert lines[-1] == b""
        assert len(obj["path"]) <= 512
        assert len(obj["client"]) <= 256
        if len(hostile) > 256:
            assert obj["client"] == hostile[:253] + "..."
        decoded = json.loads(lines[1])
        assert decoded["path"] == obj["path"]
        assert decoded["client"] == obj["client"]
        assert verify_chain([path]).ok

    def test_stdout_log_chains(self, capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        log = DecisionLog(None)
        with log:
            for n in range(1, 4):
                log.write(record(n))
            assert log.head()["file"] is None
            assert log.head()["seq"] == 3
        out = capfd.readouterr().out
        assert out.count("\n") == 3
        copy = tmp_path / "stdout.jsonl"
        copy.write_text(out)
        result = verify_chain([copy])
        assert result.ok, result.breaks
        assert (result.first_seq, result.last_seq) == (1, 3)
        assert not list(tmp_path.glob("*.lock"))

    def test_stdout_lines_are_not_left_in_a_buffer(self) -> None:
        # The process dies right after write() (os._exit skips flushing): the line is out.
        code = (
            "import os\n"
            "from cohortgate.audit import DecisionLog\n"
            "DecisionLog(None).write({'reason': 'approved'})\n"
            "os._exit(0)\n"
        )
        env = {**os.environ, "PYTHONPATH": ADDONS_DIR}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["seq"] == 1

    def test_concurrent_writers_never_interleave(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        with DecisionLog(path) as log:

            def worker(base: int) -> None:
                for n in range(200):
                    log.write(record(base + n, path="/v1/" + "p" * 400))

            threads = [threading.Thread(target=worker, args=(i * 1000,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        result = verify_chain([path])
        assert result.ok, result.breaks
        assert result.lines == result.last_seq == 1600

    def test_close_is_idempotent_and_write_after_close_fails(self, tmp_path: Path) -> None:
        log = DecisionLog(tmp_path / "d.jsonl")
        log.write(record(1))
        log.close()
        log.close()
        with pytest.raises(ValueError, match="closed"):
            log.write(record(2))


Tamper = Callable[[list[str]], list[str]]


def delete_line_5(lines: list[str]) -> list[str]:
    return lines[:4] + lines[5:]


def edit_one_char_in_line_5(lines: list[str]) -> list[str]:
    assert '"customer":"cust-5"' in lines[4]
    lines[4] = lines[4].replace('"customer":"cust-5"', '"customer":"cust-6"')
    return lines


def swap_lines_5_and_6(lines: list[str]) -> list[str]:
    lines[4], lines[5] = lines[5], lines[4]
    return lines


def insert_forged_line_5(lines: list[str]) -> list[str]:
    """A well-formed line 5 whose hash is recomputed, but over the wrong previous hash; the
    following lines are renumbered so that seq alone does not give it away."""
    forged = [forge_line({**record(99), "seq": 5}, GENESIS)]
    rest = [line.replace(f'"seq":{n},', f'"seq":{n + 1},') for n, line in enumerate(lines[4:], 5)]
    return lines[:4] + forged + rest


def repeat_line_5(lines: list[str]) -> list[str]:
    return lines[:5] + lines[4:]


def truncate_last_line(lines: list[str]) -> list[str]:
    lines[-1] = lines[-1][:-20]
    return lines


def garbage_line_5(lines: list[str]) -> list[str]:
    lines[4] = "garbage\n"
    return lines


def non_ascii_in_line_5(lines: list[str]) -> list[str]:
    lines[4] = lines[4].replace("cust-5", "cüst-5")
    return lines


def replace_hash_of_line_5(lines: list[str]) -> list[str]:
    lines[4] = lines[4][:-67] + "0" * 64 + '"}\n'
    return lines


class TestVerifyTampering:
    @pytest.mark.parametrize(
        ("tamper", "line", "why"),
        [
            (delete_line_5, 5, "a line was removed"),
            (edit_one_char_in_line_5, 5, "hash mismatch"),
            (swap_lines_5_and_6, 5, "seq 6 follows 4"),
            (insert_forged_line_5, 5, "hash mismatch"),
            (repeat_line_5, 6, "seq 5 follows 5: seq goes backwards"),
            (truncate_last_line, 10, "torn line"),
            (garbage_line_5, 5, "not a chained line"),
            (non_ascii_in_line_5, 5, "not ASCII"),
            (replace_hash_of_line_5, 5, "hash mismatch"),
        ],
    )
    def test_tampering_is_found_at_the_right_line(
        self, tmp_path: Path, tamper: Tamper, line: int, why: str
    ) -> None:
        path = tmp_path / "d.jsonl"
        write_log(path, 10)
        assert verify_chain([path]).ok
        lines = path.read_text().splitlines(keepends=True)
        path.write_bytes("".join(tamper(lines)).encode("utf-8"))
        result = verify_chain([path])
        assert not result.ok
        assert result.breaks is not None
        assert result.breaks.file == str(path)
        assert result.breaks.line == line
        assert why in result.breaks.why
        assert result.lines == line - 1

    def test_seq_going_backwards(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        write_log(path, 6)
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join([*lines, lines[2]]))
        result = verify_chain([path])
        assert result.breaks is not None
        assert (result.breaks.line, result.breaks.seq) == (7, 3)
        assert "backwards" in result.breaks.why

    def test_a_later_piece_verifies_with_a_note(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        write_log(path, 10)
        piece = tmp_path / "piece.jsonl"
        piece.write_text("".join(path.read_text().splitlines(keepends=True)[6:]))
        result = verify_chain([piece])
        assert result.ok, result.breaks
        assert (result.first_seq, result.last_seq, result.lines) == (7, 10, 4)
        assert result.notes == ("chain starts at seq 7: earlier lines were not given",)

    def test_first_line_cannot_start_a_fresh_chain_midway(self, tmp_path: Path) -> None:
        # Lines 1-3 deleted and line 4 rewritten with seq 1 over GENESIS: the next line breaks.
        path = tmp_path / "d.jsonl"
        written = write_log(path, 6)
        lines = path.read_text().splitlines(keepends=True)
        fresh = {k: v for k, v in written[3].items() if k != "hash"} | {"seq": 1}
        path.write_text(forge_line(fresh, GENESIS) + "".join(lines[4:]))
        result = verify_chain([path])
        assert result.breaks is not None
        assert result.breaks.line == 2

    def test_no_files_and_empty_files(self, tmp_path: Path) -> None:
        empty = tmp_path / "empty.jsonl"
        empty.touch()
        result = verify_chain([empty])
        assert result.ok
        assert result.lines == 0
        assert result.files == ()
        assert f"{empty}: empty, skipped" in result.notes


class TestExpectHead:
    def test_lines_cut_from_the_end_are_found(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        written = write_log(path, 10)
        head = (written[7]["seq"], written[7]["hash"])
        assert verify_chain([path], expect_head=head).ok
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:7]))
        assert verify_chain([path]).ok  # without the head, a cut is invisible
        result = verify_chain([path], expect_head=head)
        assert result.breaks is not None
        assert "recorded head seq 8 not found: lines cut from the end" in result.breaks.why
        assert (result.breaks.line, result.breaks.seq) == (7, 8)

    def test_a_rewritten_head_is_found(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        written = write_log(path, 10)
        result = verify_chain([path], expect_head=(8, written[6]["hash"]))
        assert result.breaks is not None
        assert result.breaks.line == 8
        assert "hash differs" in result.breaks.why

    def test_a_head_before_the_files_given(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        written = write_log(path, 10)
        piece = tmp_path / "piece.jsonl"
        piece.write_text("".join(path.read_text().splitlines(keepends=True)[5:]))
        result = verify_chain([piece], expect_head=(2, written[1]["hash"]))
        assert result.breaks is not None
        assert "precedes the first line given" in result.breaks.why


class TestRotation:
    def test_rotation_keeps_one_chain_across_files(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        written = write_log(path, 40, rotate_bytes=1500)
        files = rotated_files(path)
        assert len(files) >= 5
        assert files[-1] == path
        assert all(f.stat().st_size < 1500 + 600 for f in files)
        seqs: list[int] = []
        for f in files:
            file_seqs = [json.loads(line)["seq"] for line in f.read_text().splitlines()]
            if f != path:  # a rotated file is named after the seq of its last line
                assert f.name == f"d.jsonl.{file_seqs[-1]:012d}"
            seqs += file_seqs
        assert seqs == list(range(1, 41))
        shuffled = files[:]
        random.Random(7).shuffle(shuffled)
        assert shuffled != files
        result = verify_chain(shuffled)
        assert result.ok, result.breaks
        assert result.files == tuple(str(f) for f in files if f.stat().st_size)
        assert (result.first_seq, result.last_seq) == (1, 40)
        assert result.last_hash == written[-1]["hash"]

    def test_a_missing_middle_file_breaks(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        write_log(path, 40, rotate_bytes=1500)
        files = rotated_files(path)
        del files[2]
        result = verify_chain(files)
        assert result.breaks is not None
        assert result.breaks.file == str(files[2])
        assert result.breaks.line == 1
        assert "files do not join" in result.breaks.why

    def test_rotated_files_ignores_other_names(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        for name in ["d.jsonl.000000000010", "d.jsonl.000000000002", "d.jsonl.lock",
                     "d.jsonl.bak", "d.jsonl.12", "x.jsonl.000000000001"]:  # fmt: skip
            (tmp_path / name).touch()
        assert rotated_files(path) == [tmp_path / "d.jsonl.000000000002",
                                       tmp_path / "d.jsonl.000000000010"]  # fmt: skip
        path.touch()
        assert rotated_files(path)[-1] == path
        assert rotated_files(tmp_path / "nowhere" / "d.jsonl") == []


class TestResume:
    def test_reopen_continues_the_chain(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        first = write_log(path, 3)
        with DecisionLog(path) as log:
            assert log.head() == {"file": str(path), "seq": 3, "hash": first[-1]["hash"]}
            assert log.write(record(4))["seq"] == 4
        result = verify_chain([path])
        assert result.ok, result.breaks
        assert result.lines == 4

    def test_reopen_after_rotation_left_an_empty_file(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        with DecisionLog(path, rotate_bytes=1) as log:  # every line rotates
            log.write(record(1))
            last = log.write(record(2))
        assert path.stat().st_size == 0
        with DecisionLog(path, rotate_bytes=0) as log:
            assert log.head()["seq"] == 2
            assert log.head()["hash"] == last["hash"]
            log.write(record(3))
        result = verify_chain(rotated_files(path))
        assert result.ok, result.breaks
        assert result.last_seq == 3

    def test_reopen_reads_only_the_end_of_a_big_file(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        path.write_bytes(b"not ours\n" * 200_000)  # a damaged start is not resume's business
        tail = forge_line({**record(1), "seq": 41}, "a" * 64)
        with path.open("ab") as f:
            f.write(tail.encode())
        with DecisionLog(path) as log:
            assert log.head()["seq"] == 41

    @pytest.mark.parametrize(
        "last",
        [
            b"garbage\n",
            b"garbage without newline",
            b'{"seq":3,"hash":"' + b"0" * 64 + b'"}',  # torn: no newline
            b'{"seq":"3"' + b',"hash":"' + b"0" * 64 + b'"}\n',  # seq not an int
            b'{"seq":3' + b',"hash":"' + b"0" * 63 + b'"}\n',  # short hash
            b"\n",
        ],
    )
    def test_a_broken_last_line_refuses_to_open(self, tmp_path: Path, last: bytes) -> None:
        path = tmp_path / "d.jsonl"
        write_log(path, 3)
        with path.open("ab") as f:
            f.write(last)
        before = path.read_bytes()
        with pytest.raises(LogError, match="audit verify") as info:
            DecisionLog(path)
        assert str(path) in str(info.value)
        assert path.read_bytes() == before  # never a new chain over an existing log
        with path.open("wb") as f:  # moved aside: now it opens, and the lock was released
            f.write(b"")
        DecisionLog(path).close()


class TestLock:
    def test_second_log_in_this_process_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        first = DecisionLog(path)
        with pytest.raises(LogInUse, match=rf"in use by another process \(pid {os.getpid()}\)"):
            DecisionLog(path)
        first.close()
        with DecisionLog(path) as second:
            second.write(record(1))

    def test_lock_survives_rotation(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        with DecisionLog(path, rotate_bytes=1) as log:
            log.write(record(1))
            log.write(record(2))
            with pytest.raises(LogInUse):
                DecisionLog(path)

    def test_another_process_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "d.jsonl"
        code = (
            "import sys\n"
            "from pathlib import Path\n"
            "from cohortgate.audit import DecisionLog, LogInUse\n"
            "try:\n"
            "    DecisionLog(Path(sys.argv[1])).close()\n"
            "except LogInUse as e:\n"
            "    print(e)\n"
            "    sys.exit(3)\n"
        )
        env = {**os.environ, "PYTHONPATH": ADDONS_DIR}
        args = [sys.executable, "-c", code, str(path)]
        with DecisionLog(path):
            held = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        assert held.returncode == 3, held.stderr
        assert f"in use by another process (pid {os.getpid()})" in held.stdout
        free = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        assert free.returncode == 0, free.stderr

    def test_unopenable_path_is_a_log_error(self, tmp_path: Path) -> None:
        (tmp_path / "file").write_text("")
        with pytest.raises(LogError, match="cannot open"):
            DecisionLog(tmp_path / "file" / "d.jsonl")


class TestBackgroundWriter:
    """background=True: the proxy's mode. Lines reach the file off the event loop, in chain
    order, survive a refusing disk, and the file never holds half a line."""

    def test_lines_are_written_in_order_and_verify(self, tmp_path: Path) -> None:
        path = tmp_path / "decisions.jsonl"
        with DecisionLog(path, rotate_bytes=4000, background=True) as log:
            for i in range(300):
                log.write({"request_id": f"r{i}", "decision": "allow"})
            assert log.flush()
            assert log.head()["seq"] == 300
        result = verify_chain(rotated_files(path))
        assert result.ok and result.lines == 300
        assert len(rotated_files(path)) > 2  # rotation happened in the writer thread

    def test_a_refusing_disk_keeps_the_lines_until_it_accepts(self, tmp_path: Path) -> None:
        path = tmp_path / "decisions.jsonl"
        log = DecisionLog(path, background=True)
        log.write({"request_id": "before"})
        assert log.flush()
        good_fd = log._fd
        log._fd = os.open(path, os.O_RDONLY)  # every write now fails with EBADF
        for i in range(5):
            log.write({"request_id": f"during-{i}"})
        deadline = time.monotonic() + 5
        while log.failing is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert log.backlog == 5 and log.head()["seq"] == 1  # the file has only the first
        assert path.read_bytes().endswith(b"}\n")
        bad_fd, log._fd = log._fd, good_fd
        os.close(bad_fd)
        assert log.flush()
        assert log.failing is None
        log.close()
        ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
        assert ids == ["before"] + [f"during-{i}" for i in range(5)]
        assert verify_chain([path]).ok
