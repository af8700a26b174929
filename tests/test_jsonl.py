"""Unit tests for JSONL I/O (exit_loop/jsonl.py): errors naming file:line, atomic writes,
and the append-only log that repairs a torn last line."""

from __future__ import annotations

import json
import os
import stat

import pytest

from exit_loop.errors import DataError
from exit_loop.jsonl import (
    AppendLog,
    atomic_write_text,
    iter_jsonl,
    iter_jsonl_numbered,
    read_jsonl,
    write_json,
    write_jsonl,
)

ROWS = [{"id": i, "text": f"row {i} — ünïcode\nnewline"} for i in range(3)]


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- reading

def test_round_trip_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert read_jsonl(path) == ROWS
    text = path.read_text(encoding="utf-8")
    assert text.count("\n") == 3 and text.endswith("\n")
    assert "ünïcode" in text                             # not \u-escaped
    path.write_text("\n" + text.replace("\n{", "\n\n  \n{"), encoding="utf-8")
    assert read_jsonl(path) == ROWS
    assert [n for n, _ in iter_jsonl_numbered(path)] == [2, 5, 8]


@pytest.mark.parametrize("lines,lineno,words", [
    (['{"a": 1}', '{"a": 2', '{"a": 3}'], 2, "not valid JSON"),
    (['{"a": 1}', "", "[1, 2]"], 3, "expected a JSON object, got list"),
    (['{"a": 1}', '"text"'], 2, "expected a JSON object, got str"),
    (['{"a": 1, "b": 2}', '{"b": 2}'], 2, "missing key(s) 'a'"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, lineno, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_jsonl(path, required=("a",))
    assert str(e.value).startswith(f"{path}:{lineno}: ")
    assert words in str(e.value)


def test_rows_before_a_bad_line_are_yielded_first(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    it = iter_jsonl(path)
    assert next(it) == {"a": 1}
    with pytest.raises(DataError, match=":2:"):
        next(it)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- atomic writes

def test_failed_write_leaves_old_file_and_no_temp_file(tmp_path):
    path = write_jsonl(tmp_path / "out.jsonl", ROWS)
    before = path.read_bytes()

    def rows():
        yield {"id": 99}
        yield {"id": 100}
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        write_jsonl(path, rows())
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_failed_first_write_leaves_nothing(tmp_path):
    def rows():
        yield {"id": 1}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(tmp_path / "sub" / "new.jsonl", rows())
    assert list((tmp_path / "sub").iterdir()) == []


def test_unserialisable_row_leaves_no_temp_file(tmp_path):
    with pytest.raises(TypeError):
        write_jsonl(tmp_path / "x.jsonl", [{"ok": 1}, {"bad": object()}])
    assert list(tmp_path.iterdir()) == []


def test_written_files_have_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        paths = [write_jsonl(tmp_path / "a.jsonl", ROWS), atomic_write_text(tmp_path / "b.txt", "hi\n"),
                 write_json(tmp_path / "c.json", {"a": 1})]
    finally:
        os.umask(old)
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode != 0o600, p
        assert mode & 0o044 == 0o044, oct(mode)       # group and others can read (umask 022)


def test_write_json_and_text(tmp_path):
    p = write_json(tmp_path / "d" / "m.json", {"a": [1, 2], "p": tmp_path})
    assert json.loads(p.read_text()) == {"a": [1, 2], "p": str(tmp_path)}
    assert p.read_text().endswith("\n")
    assert atomic_write_text(tmp_path / "t.txt", "x").read_text() == "x"
    assert atomic_write_text(tmp_path / "t.txt", "y").read_text() == "y"  # replaces


# --------------------------------------------------------------------------- AppendLog

def test_append_log_starts_empty_and_appends(tmp_path):
    path = tmp_path / "d" / "log.jsonl"
    with AppendLog(path) as log:
        assert log.rows == []
        log.write(ROWS[:2])
        log.write([])
        log.write(iter(ROWS[2:]))
    assert read_jsonl(path) == ROWS
    with AppendLog(path) as log:
        assert log.rows == ROWS
        log.write([{"id": 3}])
    assert read_jsonl(path) == ROWS + [{"id": 3}]


def test_append_log_rows_are_readable_before_close(tmp_path):
    path = tmp_path / "log.jsonl"
    log = AppendLog(path)
    log.write(ROWS[:1])
    assert read_jsonl(path) == ROWS[:1]   # each write is flushed
    log.sync()
    log.close()
    log.close()                           # closing twice is harmless


def test_append_log_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    write_jsonl(path, ROWS)
    whole = path.read_bytes()
    torn = whole + '{"id": 3, "text": "half ü'.encode()
    path.write_bytes(torn)
    with pytest.raises(DataError):        # a plain reader sees the torn line as an error
        read_jsonl(path)
    with AppendLog(path) as log:
        assert log.rows == ROWS            # the complete rows only
        assert path.read_bytes() == whole  # the torn line is cut off
        log.write([{"id": 3}, {"id": 4}])
    assert read_jsonl(path) == ROWS + [{"id": 3}, {"id": 4}]
    assert path.read_bytes() == whole + b'{"id": 3}\n{"id": 4}\n'


def test_append_log_repairs_a_file_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"id": 0, "te')
    with AppendLog(path) as log:
        assert log.rows == []
        assert path.read_bytes() == b""
        log.write([{"id": 0}])
    assert read_jsonl(path) == [{"id": 0}]


def test_append_log_keeps_a_complete_file_untouched(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", ROWS)
    before = path.read_bytes()
    with AppendLog(path) as log:
        assert log.rows == ROWS
    assert path.read_bytes() == before


def test_append_log_refuses_a_bad_complete_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": 0}\nnot json\n{"id": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:2:"):
        AppendLog(path)


def test_every_manifest_records_its_environment(tmp_path):
    """The versions and the machine a stage ran with, in its manifest: the packages that matter,
    the CPU, and (torch imported) the kernel ISA and threads; a forced ISA is said."""
    import torch

    from exit_loop.environment import describe, environment
    from exit_loop.jsonl import write_manifest

    path = write_manifest(tmp_path, "eval", {"wall_s": 1.0}, counts={"n": 3})
    m = json.loads(path.read_text())
    env = m["environment"]
    assert (m["stage"], m["counts"], m["timings"]) == ("eval", {"n": 3}, {"wall_s": 1.0})
    assert env["packages"]["torch"] == torch.__version__ and "exit-loop" in env["packages"]
    assert env["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and env["torch_threads"] >= 1
    line = describe(env)
    assert f"torch {torch.__version__}" in line and f"({env['cpu_isa']})" in line
    assert "forced" in describe({**env, "ATEN_CPU_CAPABILITY": "avx2"})
    assert "GPU H100 x 2, CUDA 12.8" in describe({**env, "gpus": ["H100", "H100"], "cuda": "12.8"})
    assert environment()["cpu"] == env["cpu"]
