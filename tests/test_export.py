"""`exit-loop export SPLIT --format trl` (exit_loop/export.py): the written directory is opened
with `datasets.load_dataset(dir)` as `trl sft --dataset_name dir` opens it, and TRL's own
SFTTrainer prepares it on the tiny model: the prompt's tokens are exactly the tokens before the
completion, and the completion keeps its leading whitespace."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from exit_loop.cli import main
from exit_loop.jsonl import write_jsonl
from exit_loop.prompts import student_prompt

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 12 eggs. How many eggs are in 5 boxes?",
             "Sara reads 20 pages a day. How many pages does she read in 3 days?"]
RESPONSES = ["\n3 + 4 = 7 </think> <answer>7</answer>",        # a student's own trace: a newline first
             "  12 * 5 = 60 </think> <answer>60</answer>",      # two spaces
             " 20 * 3 = 60 </think> <answer>60</answer>"]


@pytest.fixture()
def split(tmp_path: Path) -> Path:
    rows = [{"prompt": student_prompt(q), "response": r} for q, r in zip(QUESTIONS, RESPONSES)]
    rows.append({"prompt": student_prompt("blank?"), "response": " "})  # an all split's empty trace: skipped
    return write_jsonl(tmp_path / "sft_r1_correct.jsonl", rows)


def prepared(data_dir: Path, model: Path, tmp: Path):
    """The data set as `trl sft --dataset_name data_dir` loads it, prepared by TRL's SFTTrainer."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    dataset = load_dataset(str(data_dir))["train"]
    tok = AutoTokenizer.from_pretrained(model)
    args = SFTConfig(output_dir=str(tmp / "trainer"), report_to="none", use_cpu=True, max_length=None)
    trainer = SFTTrainer(model=str(model), args=args, train_dataset=dataset, processing_class=tok)
    return dataset, trainer.train_dataset, tok


@pytest.mark.engine
def test_prompt_completion_export_is_read_by_trl_as_it_is(split: Path, tmp_path: Path, tiny_model_dir: Path, capfd):
    assert main(["export", str(split), "--format", "trl"]) == 0
    out = tmp_path / "sft_r1_correct_trl"
    assert f"3 prompt-completion rows -> {out / 'train.jsonl'}" in capfd.readouterr().out
    rows = [json.loads(line) for line in (out / "train.jsonl").open()]
    assert rows == [{"prompt": student_prompt(q), "completion": r} for q, r in zip(QUESTIONS, RESPONSES)]

    dataset, ds, tok = prepared(out, tiny_model_dir, tmp_path)
    assert dataset.column_names == ["prompt", "completion"]
    for row, ex in zip(rows, ds):
        prompt_ids = tok(row["prompt"])["input_ids"]
        n_prompt = next(i for i, label in enumerate(ex["labels"]) if label != -100)
        assert n_prompt == len(prompt_ids)                          # the prompt's tokens, all of them
        assert ex["input_ids"][:n_prompt] == prompt_ids
        completion = ex["input_ids"][n_prompt:]
        assert completion[-1] == tok.eos_token_id                   # TRL appended the EOS
        assert tok.decode(completion[:-1]) == row["completion"]     # leading whitespace kept


@pytest.mark.engine
def test_chat_export_is_conversational(split: Path, tmp_path: Path, tiny_model_dir: Path):
    out = tmp_path / "chat"
    assert main(["export", str(split), "--chat", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "train.jsonl").open()]
    assert len(rows) == 3
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert rows[0]["prompt"][1]["content"] == QUESTIONS[0]
    assert rows[0]["completion"] == [{"role": "assistant", "content": f"<think> {RESPONSES[0]}"}]
    _, ds, tok = prepared(out, tiny_model_dir, tmp_path)
    trained = tok.decode([t for t in ds[1]["labels"] if t != -100])
    assert "12 * 5 = 60 </think> <answer>60</answer>" in trained and "<think>" in trained


def test_export_errors_name_the_file_and_line(tmp_path: Path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    assert main(["export", str(bad)]) == 2
    assert f"{bad}:1: missing key(s) 'response'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(bad), "--format", "messages"])
    assert e.value.code == 2 and "invalid choice: 'messages'" in capsys.readouterr().err


def all_split(tmp_path: Path) -> Path:
    """An all split: question 0 with two correct and three wrong traces, question 1 only wrong ones."""
    rows = []
    for i, (answer, ok) in enumerate([("7", True), ("8", False), ("7", True), ("6", False), ("5", False)]):
        rows.append({"prompt": student_prompt(QUESTIONS[0]), "response": f" 3 + 4 = {answer} </think> <answer>{answer}</answer>",
                     "is_correct": ok, "problem_id": "train-0", "sample_index": i})
    rows += [{"prompt": student_prompt(QUESTIONS[1]), "response": " 12 * 5 = 50 </think> <answer>50</answer>",
              "is_correct": False, "problem_id": "train-1", "sample_index": 0}]
    return write_jsonl(tmp_path / "sft_r1_all.jsonl", rows)


def test_preference_pairs_pair_a_correct_and_a_wrong_trace_of_one_question(tmp_path: Path, capsys):
    from exit_loop.export import preference_pairs

    path = all_split(tmp_path)
    pairs = preference_pairs(path, per_question=5)
    assert len(pairs) == 2  # min(2 correct, 3 wrong); the question with no correct trace gives none
    assert all(p["prompt"] == student_prompt(QUESTIONS[0]) and "<answer>7</answer>" in p["chosen"]
               and "<answer>7</answer>" not in p["rejected"] for p in pairs)
    assert len({p["rejected"] for p in pairs}) == 2  # each trace in one pair at most
    assert len(preference_pairs(path)) == 1 and preference_pairs(path, seed=3) == preference_pairs(path, seed=3)
    chat = preference_pairs(path, chat=True)[0]
    assert chat["prompt"][1] == {"role": "user", "content": QUESTIONS[0]}
    assert chat["chosen"][0]["role"] == "assistant" and chat["chosen"][0]["content"].startswith("<think> ")
    only_wrong = write_jsonl(tmp_path / "only_wrong.jsonl", [{"prompt": "p", "response": "r", "is_correct": False}])
    assert main(["export", str(only_wrong), "--format", "dpo"]) == 2
    assert "only_wrong.jsonl: no question with both a correct and a wrong trace" in capsys.readouterr().err


@pytest.mark.engine
def test_dpo_pairs_are_read_and_trained_by_trls_dpo_trainer(tmp_path: Path, tiny_model_dir: Path):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    assert main(["export", str(all_split(tmp_path)), "--format", "dpo", "--pairs_per_question", "2"]) == 0
    dataset = load_dataset(str(tmp_path / "sft_r1_all_dpo"))["train"]
    assert dataset.column_names == ["prompt", "chosen", "rejected"] and len(dataset) == 2
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to="none", use_cpu=True, max_steps=1,
                     per_device_train_batch_size=2, save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=dataset, processing_class=tok)
    row = trainer.train_dataset[0]
    # TRL tokenised the prompt as it is, and the two traces apart, each ending in the EOS
    assert row["prompt_ids"] == tok(dataset[0]["prompt"])["input_ids"]
    assert row["chosen_ids"] != row["rejected_ids"] and row["chosen_ids"][-1] == row["rejected_ids"][-1] == tok.eos_token_id
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss)
