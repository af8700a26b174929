"""The quiet console (exit_loop/console.py): inside a stage's log, what other libraries, native
code and child processes write goes to stage.log at the file-descriptor level, the project's own
lines (summaries, its warnings: once each) stay on the console, and a failure shows the log's
tail. Plus `exit-loop verify`'s progress bar and summary line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from exit_loop.cli import main, setup_logging
from exit_loop.console import say, stage_log, stream
from exit_loop.jsonl import write_jsonl


@pytest.fixture()
def info_level():
    setup_logging("info")
    yield
    setup_logging("info")


def test_other_output_goes_to_the_stage_log_and_the_projects_to_the_console(tmp_path, capfd, info_level):
    with stage_log(tmp_path / "verify") as path:
        print("a library's print")
        sys.stderr.write("a library's stderr\n")
        logging.getLogger("transformers.fake").warning("a library's logged warning")
        handler = logging.StreamHandler(sys.stdout)  # as a library configuring its logging here would
        subprocess.run([sys.executable, "-c", "import os; os.write(1, b'child fd 1\\n'); os.write(2, b'child fd 2\\n')"],
                       check=True)
        logging.getLogger("exit_loop.fake").warning("the project's warning")
        say("verify: 3 rows in 0.1s")
        print("progress 50%", file=stream())
    out, err = capfd.readouterr()
    assert path == tmp_path / "verify" / "stage.log"
    log = path.read_text()
    for line in ("a library's print", "a library's stderr", "child fd 1", "child fd 2"):
        assert line in log and line not in out + err, line
    assert "a library's logged warning" not in out + err
    assert out.splitlines() == ["exit-loop: warning: the project's warning", "verify: 3 rows in 0.1s",
                                "progress 50%"]
    assert err == "" and "the project's" not in log
    print("after")  # fds are back
    handler.stream.write("a handler made inside, writing after\n")
    handler.stream.flush()
    assert capfd.readouterr().out == "after\na handler made inside, writing after\n"


def test_a_failure_shows_the_logs_tail(tmp_path, capfd, info_level):
    with pytest.raises(RuntimeError, match="boom"):
        with stage_log(tmp_path / "train"):
            for i in range(100):
                print(f"line {i}")
            raise RuntimeError("boom")
    out, err = capfd.readouterr()
    assert out == ""
    assert f"last 40 lines of {tmp_path / 'train' / 'stage.log'}" in err
    assert "line 99" in err and "line 60" in err and "line 59" not in err


def test_debug_level_redirects_nothing(tmp_path, capfd):
    setup_logging("debug")
    try:
        with stage_log(tmp_path / "eval"):
            print("shown")
    finally:
        setup_logging("info")
    assert capfd.readouterr().out == "shown\n"
    assert not (tmp_path / "eval" / "stage.log").exists()


def test_verify_command_shows_a_bar_and_one_summary_line(tmp_path, capfd, info_level):
    rows = [{"prompt": "p", "response": "r </think> <answer>4</answer>", "ground_truth": "4"},
            {"prompt": "p", "response": "r </think> <answer>5</answer>", "ground_truth": "4"},
            {"prompt": "p", "response": "no tags", "ground_truth": "4"}]
    write_jsonl(tmp_path / "s.jsonl", rows)
    assert main(["verify", "--input", str(tmp_path / "s.jsonl"), "--output", str(tmp_path / "v.jsonl")]) == 0
    out, err = capfd.readouterr()
    lines = [ln.rsplit("\r", 1)[-1] for ln in out.splitlines()]
    assert any(ln.startswith("verify: 100%") and "3/3" in ln for ln in lines), out
    (summary,) = [ln for ln in lines if ln.startswith("verify: 3 rows in ")]
    assert "rows/s" in summary and str(tmp_path / "v.jsonl") in summary
    assert json.loads(summary.split("failures ", 1)[1].split(" -> ")[0]) == {"none": 1, "wrong": 1, "no_answer": 1}


SCRIPT = """
import logging, os, sys, warnings
from exit_loop.cli import setup_logging
from exit_loop.console import say, stage_log
setup_logging("info")
with stage_log(sys.argv[1]):
    warnings.warn("a library's FutureWarning", FutureWarning)
    logging.getLogger("vllm.fake").addHandler(logging.StreamHandler(sys.stdout))
    logging.getLogger("vllm.fake").warning("a library's handler on stdout")
    logging.getLogger("exit_loop.fake").warning("the project's warning")
    os.system("echo native chatter; echo native stderr >&2")
    say("eval: accuracy 50.0%")
"""


def test_in_a_plain_process_only_the_projects_lines_reach_the_terminal(tmp_path):
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "eval")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["exit-loop: warning: the project's warning", "eval: accuracy 50.0%"]
    assert res.stderr == ""
    log = (tmp_path / "eval" / "stage.log").read_text()
    for line in ("FutureWarning: a library's FutureWarning", "a library's handler on stdout", "native chatter",
                 "native stderr"):
        assert line in log, line
