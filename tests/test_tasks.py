"""Unit tests for the tasks' problem loading (exit_loop/tasks/): local JSONL only, no network."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from exit_loop.tasks import problem as problems_mod
from exit_loop.config import ConfigError, load_config
from exit_loop.errors import DataError
from exit_loop.tasks import DataConfig, Problem, load_problems, problem_index
from exit_loop.tasks.gsm8k import ground_truth_from_answer


def write_rows(path: Path, rows: list[dict], extra_lines: dict[int, str] | None = None) -> Path:
    """One JSON row per line; `extra_lines` inserts raw lines before the given 0-based row."""
    lines = []
    for i, row in enumerate(rows):
        if extra_lines and i in extra_lines:
            lines.append(extra_lines[i])
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def gsm_rows(n: int) -> list[dict]:
    return [{"question": f"Q{i}: what is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
            for i in range(n)]


def load(path: Path, **kw) -> list[Problem]:
    return load_problems(DataConfig(dataset=str(path), **kw))


# --------------------------------------------------------------------------- ground truth

@pytest.mark.parametrize("answer,truth", [
    ("She has 3 + 4 = 7.\n#### 7", "7"),
    ("big\n#### 1,234", "1234"),
    ("bigger\n#### 1,234,567", "1234567"),
    ("#### -5", "-5"),
    ("#### 2.50 ", "2.50"),
    ("a #### b\n#### 12", "12"),           # the last marker counts
    ("no space####3", "3"),
])
def test_ground_truth_from_answer(answer, truth):
    assert ground_truth_from_answer(answer) == truth


@pytest.mark.parametrize("answer", ["42", "The answer is 42", "#### ", "####  ,  "])
def test_ground_truth_from_answer_refuses_missing_or_empty(answer):
    with pytest.raises(ValueError):
        ground_truth_from_answer(answer)


# --------------------------------------------------------------------------- local files

def test_local_jsonl_ids_ground_truth_and_solution(tmp_path):
    rows = [
        {"question": "  How many?  ", "answer": "2 + 2 = 4\n#### 4"},
        {"question": "Cost?", "answer": "1000 + 234\n#### 1,234"},
        {"question": "Left?", "answer": "#### 0", "extra": "ignored"},
    ]
    path = write_rows(tmp_path / "mini.jsonl", rows)
    ps = load(path, split="train")
    assert [p.id for p in ps] == ["train-0", "train-1", "train-2"]
    assert [p.ground_truth for p in ps] == ["4", "1234", "0"]
    assert ps[0] == Problem("train-0", "  How many?  ", "4", "2 + 2 = 4\n#### 4")
    assert ps[1].solution == "1000 + 234\n#### 1,234"
    assert [p.id for p in load(path, split="test")] == ["test-0", "test-1", "test-2"]
    assert [problem_index(p.id) for p in ps] == [0, 1, 2]


def test_first_n(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", gsm_rows(10))
    ps = load(path, num_examples=3)
    assert [p.id for p in ps] == ["train-0", "train-1", "train-2"]
    assert [p.ground_truth for p in ps] == ["0", "2", "4"]
    assert len(load(path, num_examples=100)) == 10
    assert len(load(path)) == 10


def test_seeded_random_subset(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", gsm_rows(50))
    a = load(path, num_examples=10, shuffle=True, seed=1)
    b = load(path, num_examples=10, shuffle=True, seed=1)
    c = load(path, num_examples=10, shuffle=True, seed=2)
    ids = [p.id for p in a]
    assert ids == [p.id for p in b]                          # deterministic
    assert ids != [p.id for p in c]                          # differs by seed
    assert len(set(ids)) == 10
    idx = [problem_index(i) for i in ids]
    assert idx == sorted(idx)                                # sorted by index
    assert idx != list(range(10))                            # not the first N
    for p in a:                                              # each keeps its own data
        i = problem_index(p.id)
        assert p.question.startswith(f"Q{i}:") and p.ground_truth == str(2 * i)
    assert len(load(path, num_examples=80, shuffle=True)) == 50
    assert [p.id for p in load(path, shuffle=True)] == [f"train-{i}" for i in range(50)]


def test_blank_lines_are_skipped_and_ids_count_rows(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", gsm_rows(3), extra_lines={1: ""})
    ps = load(path)
    assert [p.id for p in ps] == ["train-0", "train-1", "train-2"]
    assert [p.ground_truth for p in ps] == ["0", "2", "4"]


def test_answer_without_marker_names_file_and_line(tmp_path):
    rows = gsm_rows(4)
    rows[2]["answer"] = "The answer is 4"
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as e:
        load(path)
    assert f"{path}:3" in str(e.value)
    assert "'answer'" in str(e.value) and "####" in str(e.value)


def test_error_line_numbers_count_blank_lines(tmp_path):
    rows = gsm_rows(3)
    rows[2]["answer"] = "no marker"
    path = write_rows(tmp_path / "d.jsonl", rows, extra_lines={1: "", 2: "   "})
    with pytest.raises(DataError, match=f"{path}:5:"):
        load(path)


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(gsm_rows(1)[0]) + "\n" + '{"question": "x", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}:2: not valid JSON"):
        load(path)


def test_missing_keys_and_missing_file(tmp_path):
    path = write_rows(tmp_path / "d.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    with pytest.raises(DataError, match=f"{path}:2: missing key.*'answer'"):
        load(path)
    with pytest.raises(DataError, match="not found"):
        load(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no problems"):
        load(empty)


def test_hub_rows_with_missing_keys_name_the_row(monkeypatch):
    # the hub itself cannot be reached here; only the rows it would return are stood in for
    good = [{"question": "q", "answer": "#### 3"}, {"question": "r", "answer": "#### 1,000"}]
    monkeypatch.setattr(problems_mod, "rows_from_hub", lambda cfg: good)
    ps = load_problems(DataConfig(dataset="openai/gsm8k", split="test"))
    assert ps == [Problem("test-0", "q", "3", "#### 3"), Problem("test-1", "r", "1000", "#### 1,000")]
    monkeypatch.setattr(problems_mod, "rows_from_hub", lambda cfg: good[:1] + [{"question": "q"}])
    with pytest.raises(DataError, match=r"openai/gsm8k\[train\]\[1\].*'answer'"):
        load_problems(DataConfig(dataset="openai/gsm8k"))


def test_a_hub_data_set_that_cannot_be_reached_says_which_and_how_to_use_a_local_file(monkeypatch):
    # the hub stood in for by what `datasets` raises offline (HF_HUB_OFFLINE=1)
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match=r"'openai/gsm8k' \(subset 'main', split 'test'\).*OfflineModeIsEnabled"
                                        r".*data.dataset.*local JSONL file"):
        load_problems(DataConfig(dataset="openai/gsm8k", subset="main", split="test"))


def test_data_config_validation():
    with pytest.raises(ValueError):
        DataConfig(num_examples=0)
    with pytest.raises(ConfigError, match="num_examples"):
        load_config(DataConfig, None, ["num_examples=-1"])


# --------------------------------------------------------------------------- the real file

def test_real_gsm8k_train(gsm8k_train):
    ps = load_problems(DataConfig(dataset=str(gsm8k_train)))
    assert len(ps) == 7473
    assert ps[0].id == "train-0"
    assert ps[0].ground_truth == "72"
    assert ps[0].question.startswith("Natalia sold clips to 48 of her friends")
    assert ps[-1].id == "train-7472"
    assert len({p.id for p in ps}) == 7473
    assert all("," not in p.ground_truth and p.ground_truth for p in ps)
    sub = load_problems(DataConfig(dataset=str(gsm8k_train), num_examples=5, shuffle=True, seed=0))
    assert len(sub) == 5 and all(s == ps[problem_index(s.id)] for s in sub)


def test_group_by_names_each_question_group_and_a_missing_one(tmp_path):
    rows = [{**r, "verbs": "gold verbs" if i % 2 else "held-out verb"} for i, r in enumerate(gsm_rows(4))]
    path = write_rows(tmp_path / "g.jsonl", rows)
    assert [p.group for p in load(path, split="test", group_by="verbs")] == \
        ["held-out verb", "gold verbs", "held-out verb", "gold verbs"]
    assert [p.group for p in load(path, split="test")] == [None] * 4   # unset: no group
    del rows[2]["verbs"]
    write_rows(path, rows)
    with pytest.raises(DataError, match=rf"{path}:3: no key 'verbs' \(data.group_by\)"):
        load(path, split="test", group_by="verbs")
