"""Unit tests for the filter (exit_loop/filter.py): the two splits and the summary from
hand-made verified rows, and `exit-loop filter` end to end on temporary files."""

from __future__ import annotations

import json

import pytest

from exit_loop.config import ConfigError
from exit_loop.filter import ALL_KEYS, PROVENANCE_KEYS, FilterConfig, command, filter_rows, write_splits
from exit_loop.jsonl import DataError, read_jsonl, write_jsonl
from exit_loop.prompts import student_prompt
from exit_loop.tasks import FAILURES

HEAD = ["prompt", "response", "ground_truth", "predicted", "is_correct"]


def resp(reasoning: str, answer: str) -> str:
    return f"{reasoning} </think> <answer>{answer}</answer>"


def row(qid: int, k: int, response: str, correct: bool, failure: str, ntok: int, truth: str = "7",
        predicted: str | None = "7", **extra) -> dict:
    r = {
        "problem_id": f"train-{qid}",
        "sample_index": k,
        "prompt": student_prompt(f"Question {qid}?"),
        "response": response,
        "ground_truth": truth,
        "question": f"Question {qid}?",
        "model": "teacher",
        "round": 0,
        "backend": "hf",
        "prompt_style": "r1_zero",
        "num_tokens": ntok,
        "finish_reason": "length" if failure == "truncated" else "stop",
        "predicted": predicted,
        "format_ok": failure not in ("format", "no_answer"),
        "is_correct": correct,
        "failure": failure,
    }
    r.update(extra)
    return r


A, B, C = resp("3 + 4 = 7", "7"), resp("4 + 3 = 7", "7"), resp("5 + 2 = 7", "7")

ROWS = [
    # question 0: three correct traces (one an exact duplicate) and one wrong
    row(0, 0, A, True, "none", 10),
    row(0, 1, A, True, "none", 10),
    row(0, 2, B, True, "none", 20),
    row(0, 3, resp("3 + 3 = 6", "6"), False, "wrong", 30, predicted="6"),
    # question 1: one correct, one truncated
    row(1, 0, C, True, "none", 40),
    row(1, 1, "5 + 2 is", False, "truncated", 100, predicted=None),
    # question 2: nothing correct
    row(2, 0, "no tags at all", False, "no_answer", 5, predicted=None),
    row(2, 1, "7 <answer>7</answer>", False, "format", 15),
]


def correct_of(qid: int, response: str) -> dict:
    return {"prompt": student_prompt(f"Question {qid}?"), "response": response}


# --------------------------------------------------------------------------- the splits

def test_all_split_keys_and_order():
    all_rows, correct, _, _ = filter_rows([{**r, "junk": 1} for r in ROWS], FilterConfig())
    assert len(all_rows) == len(ROWS)
    for out, src in zip(all_rows, ROWS):
        assert list(out)[:5] == HEAD
        assert list(out) == HEAD + [k for k in PROVENANCE_KEYS if k in src]
        assert {k: out[k] for k in out} == {k: src[k] for k in out}
    assert tuple(HEAD) == ALL_KEYS
    assert [r["sample_index"] for r in all_rows] == [r["sample_index"] for r in ROWS]
    for c in correct:
        assert list(c) == ["prompt", "response"]


def test_all_split_fills_missing_label_keys_with_none():
    all_rows, _, _, _ = filter_rows([{"prompt": "p", "response": "r", "is_correct": False}], FilterConfig())
    assert all_rows == [{"prompt": "p", "response": "r", "ground_truth": None, "predicted": None,
                         "is_correct": False}]


def test_correct_split_default_drops_duplicates_per_question():
    _, correct, _, summary = filter_rows(ROWS, FilterConfig())
    assert correct == [correct_of(0, A), correct_of(0, B), correct_of(1, C)]
    assert summary["correct_split_rows"] == 3
    assert summary["dropped_from_correct"] == {"duplicate": 1}


def test_dedup_is_per_question_and_can_be_turned_off():
    rows = [row(0, 0, A, True, "none", 10), row(1, 0, A, True, "none", 10), row(1, 1, A, True, "none", 10)]
    _, correct, _, _ = filter_rows(rows, FilterConfig())
    assert correct == [correct_of(0, A), correct_of(1, A)]
    _, correct, _, summary = filter_rows(ROWS, FilterConfig(dedup=False))
    assert correct == [correct_of(0, A), correct_of(0, A), correct_of(0, B), correct_of(1, C)]
    assert summary["dropped_from_correct"] == {}


@pytest.mark.parametrize("k,expected,dropped", [
    (1, [(0, A), (1, C)], {"duplicate": 1, "over_k": 1}),
    (2, [(0, A), (0, B), (1, C)], {"duplicate": 1}),
])
def test_at_most_k_correct_per_question(k, expected, dropped):
    _, correct, _, summary = filter_rows(ROWS, FilterConfig(max_correct_per_question=k))
    assert correct == [correct_of(q, r) for q, r in expected]
    assert summary["dropped_from_correct"] == dropped


def test_k_counts_kept_traces_without_dedup():
    _, correct, _, summary = filter_rows(ROWS, FilterConfig(max_correct_per_question=2, dedup=False))
    assert correct == [correct_of(0, A), correct_of(0, A), correct_of(1, C)]
    assert summary["dropped_from_correct"] == {"over_k": 1}


def test_max_response_tokens():
    _, correct, _, summary = filter_rows(ROWS, FilterConfig(max_response_tokens=20))
    assert correct == [correct_of(0, A), correct_of(0, B)]
    assert summary["dropped_from_correct"] == {"duplicate": 1, "too_long": 1}
    _, correct, _, summary = filter_rows(ROWS, FilterConfig(max_response_tokens=15, dedup=False))
    assert correct == [correct_of(0, A), correct_of(0, A)]
    assert summary["dropped_from_correct"] == {"too_long": 2}


def test_options_never_touch_the_all_split():
    all_default, _, _, _ = filter_rows(ROWS, FilterConfig())
    all_strict, correct, _, _ = filter_rows(ROWS, FilterConfig(max_correct_per_question=1, max_response_tokens=1))
    assert correct == []
    assert all_strict == all_default


# --------------------------------------------------------------------------- the summary

def test_summary_numbers():
    _, _, _, s = filter_rows(ROWS, FilterConfig())
    assert s["traces"] == 8
    assert s["correct_traces"] == 4
    assert s["trace_accuracy"] == 0.5
    assert s["questions"] == 3
    assert s["questions_solved"] == 2
    assert s["question_coverage"] == pytest.approx(0.6667)
    assert s["mean_tokens_correct"] == 20.0          # (10 + 10 + 20 + 40) / 4
    assert s["mean_tokens_incorrect"] == 37.5        # (30 + 100 + 5 + 15) / 4
    assert s["failures"] == {"none": 4, "no_answer": 1, "format": 1, "truncated": 1, "ambiguous": 0,
                             "wrong": 1, "timeout": 0}
    assert list(s["failures"]) == list(FAILURES)  # every class, zeros included, in one order


def test_summary_without_failure_or_token_keys():
    rows = [{"prompt": "p1", "response": "a", "is_correct": True},
            {"prompt": "p1", "response": "b", "is_correct": False},
            {"prompt": "p2", "response": "c", "is_correct": False}]
    _, correct, _, s = filter_rows(rows, FilterConfig())
    assert correct == [{"prompt": "p1", "response": "a"}]
    assert {k: v for k, v in s["failures"].items() if v} == {"none": 1, "wrong": 2}
    assert s["questions"] == 2 and s["questions_solved"] == 1   # questions told apart by prompt
    assert s["mean_tokens_correct"] is None and s["mean_tokens_incorrect"] is None


def test_empty_input_is_a_data_error(tmp_path):
    all_rows, correct, _, s = filter_rows([], FilterConfig())
    assert all_rows == [] and correct == [] and s["traces"] == 0 and s["trace_accuracy"] is None
    with pytest.raises(DataError, match="no rows"):
        write_splits([], FilterConfig(output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "sft_r1_all.jsonl").exists()


# --------------------------------------------------------------------------- the command

def test_command_end_to_end(tmp_path, capsys):
    src = write_jsonl(tmp_path / "verified.jsonl", ROWS)
    out = tmp_path / "out"
    assert command(["--input", str(src), "--output_dir", str(out), "max_correct_per_question=1"]) == 0
    all_rows = read_jsonl(out / "sft_r1_all.jsonl")
    correct = read_jsonl(out / "sft_r1_correct.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert len(all_rows) == 8 and all(list(r)[:5] == HEAD for r in all_rows)
    assert correct == [correct_of(0, A), correct_of(1, C)]
    assert summary["trace_accuracy"] == 0.5
    assert summary["correct_split_rows"] == 2
    assert summary["all_split"] == str(out / "sft_r1_all.jsonl")
    assert summary["correct_split"] == str(out / "sft_r1_correct.jsonl")
    printed = capsys.readouterr().out
    assert "8 traces" in printed and "2/3 questions" in printed and "2 rows in the correct split" in printed


def test_command_with_a_config_file_and_names(tmp_path):
    src = write_jsonl(tmp_path / "verified.jsonl", ROWS)
    cfg = tmp_path / "filter.yaml"
    cfg.write_text(f"input: {src}\noutput_dir: {tmp_path / 'from_yaml'}\ndedup: false\n"
                   "correct_name: correct.jsonl\n", encoding="utf-8")
    out = tmp_path / "from_flag"
    assert command(["--config", str(cfg), "--output_dir", str(out)]) == 0  # the flag beats YAML
    assert len(read_jsonl(out / "correct.jsonl")) == 4                     # dedup off
    assert (out / "sft_r1_all.jsonl").exists()
    assert not (tmp_path / "from_yaml").exists()


def test_command_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        command(["--input", str(empty), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(DataError, match="no input"):
        command(["--output_dir", str(tmp_path / "o")])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r", "is_correct": True},
                                               {"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=f"{bad}:2: missing key.*'is_correct'"):
        command(["--input", str(bad), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(ConfigError, match="max_correct_per_question"):
        command(["--input", str(bad), "max_correct_per_question=0"])
    with pytest.raises(ConfigError, match="'dedupe'.*dedup"):
        command(["--input", str(bad), "dedupe=false"])


def test_filter_rows_returns_the_three_splits_the_summary_counts():
    splits = filter_rows(ROWS, FilterConfig())
    assert len(splits.correct) == splits.summary["correct_split_rows"] >= 1
    assert len(splits.formatted) == splits.summary["formatted_split_rows"] >= len(splits.correct)
    assert all(set(r) == {"prompt", "response"} for r in splits.formatted)
