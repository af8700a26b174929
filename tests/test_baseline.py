"""`exit-loop baseline-data`: GSM8K's own solutions as prompt/response SFT rows."""

from __future__ import annotations

import json
from pathlib import Path

from exit_loop.baseline import BaselineConfig, baseline_data, baseline_row
from exit_loop.jsonl import read_jsonl
from exit_loop.tasks import DataConfig, Problem
from exit_loop.tasks.gsm8k import solution_reasoning
from exit_loop.prompts import student_prompt


def test_first_gsm8k_row_exactly(tmp_path, gsm8k_train: Path):
    out = baseline_data(BaselineConfig(data=DataConfig(dataset=str(gsm8k_train), num_examples=3),
                                       output=str(tmp_path / "sft_original.jsonl")))
    rows = read_jsonl(out)
    assert len(rows) == 3
    assert rows[0] == {
        "prompt": student_prompt("Natalia sold clips to 48 of her friends in April, and then she sold half "
                                 "as many clips in May. How many clips did Natalia sell altogether in April "
                                 "and May?"),
        "response": "Natalia sold 48/2 = 24 clips in May.\n"
                    "Natalia sold 48+24 = 72 clips altogether in April and May. </think> <answer>72</answer>",
        "problem_id": "train-0",
        "ground_truth": "72",
    }
    assert rows[0]["prompt"].endswith("\nAssistant: <think>")


def test_annotations_removed_and_answer_tagged(gsm8k_train: Path):
    from exit_loop.tasks import load_problems

    for p in load_problems(DataConfig(dataset=str(gsm8k_train), num_examples=200)):
        r = baseline_row(p)["response"]
        assert "<<" not in r and ">>" not in r and "####" not in r
        assert r.endswith(f" </think> <answer>{p.ground_truth}</answer>")
        assert r.count("</think>") == 1


def test_thousands_separator_and_odd_annotations():
    p = Problem("train-9", " How much? ", "1234",
                "It costs 1,000+234 = <<1000+234=1234>>1,234 dollars.  \nSo <<2*3=6>>6 <<odd>>left.\n#### 1,234")
    row = baseline_row(p)
    assert row["response"] == "It costs 1,000+234 = 1,234 dollars.\nSo 6 left. </think> <answer>1234</answer>"
    assert row["prompt"] == student_prompt("How much?")
    assert solution_reasoning("no annotations\n#### 5") == "no annotations"


def test_cli_writes_the_output(tmp_path, gsm8k_train: Path, capsys):
    from exit_loop.cli import main

    out = tmp_path / "data" / "sft_original.jsonl"
    assert main(["baseline-data", "--dataset", str(gsm8k_train), "--output", str(out),
                 "data.num_examples=5"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["problem_id"] for r in rows] == [f"train-{i}" for i in range(5)]
    assert all(set(r) == {"prompt", "response", "problem_id", "ground_truth"} for r in rows)


def test_cli_bad_dataset_is_a_clear_error(tmp_path, capsys):
    from exit_loop.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    assert main(["baseline-data", "--dataset", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:1: key 'answer'" in capsys.readouterr().err
