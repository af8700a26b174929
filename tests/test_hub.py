"""Hub settings (exit_loop/hub.py): a run that needs the hub fails at start, before any model is
loaded, naming the setting; the folders staged for upload hold what the hub gets (the dataset
folder is opened with `datasets` itself, by config and split; the checkpoint folder holds the
merged weights and the generation config). The upload call itself needs the hub and is not run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exit_loop.config import ConfigError, load_config
from exit_loop.hub import check_hub, route_push, stage_checkpoint, stage_splits
from exit_loop.jsonl import write_jsonl
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.pipeline.stages import hub_name, hub_settings

ROOT = Path(__file__).resolve().parents[1]


def run_config(tmp: Path, gsm8k_dir: Path, **extra) -> Path:
    cfg = {"experiment": "hubbed", "runs_dir": str(tmp / "runs"), "rounds": 1, "student": "org/base",
           "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": 4},
           "eval": {"data": {"dataset": str(gsm8k_dir / "test.jsonl"), "split": "test", "num_examples": 4}},
           **extra}
    path = tmp / "hubbed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(config: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT")}
    return subprocess.run([sys.executable, "-m", "exit_loop", "run", str(config)], env={**base, **env},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_a_run_that_needs_the_hub_fails_at_start_naming_the_setting(tmp_path: Path, gsm8k_dir: Path):
    cfg = run_config(tmp_path, gsm8k_dir, filter={"push_to_hub": "my-org/traces"},
                     train={"sft": {"push_to_hub": True, "hub_model_id": "my-org/student"}})
    res = run_cli(cfg)  # no token
    assert res.returncode == 2
    assert ("filter.push_to_hub=my-org/traces, train.hub_model_id=my-org/student needs the hub: set HF_TOKEN"
            in res.stderr), res.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started: no run directory
    res = run_cli(cfg, HF_TOKEN="hf_secret_value", HF_HUB_OFFLINE="1")
    assert res.returncode == 2 and "needs the hub, but HF_HUB_OFFLINE is set" in res.stderr
    res = run_cli(cfg, HF_TOKEN="hf_secret_value", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    assert res.returncode == 2 and "needs the hub, which did not answer" in res.stderr, res.stderr
    assert "hf_secret_value" not in res.stdout + res.stderr
    assert not (tmp_path / "runs").exists()


def test_hub_setting_errors(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    check_hub({"filter.push_to_hub": None, "train.hub_model_id": None})  # nothing asks for the hub
    with pytest.raises(ConfigError, match="config key 'train.hub_model_id': expected a repository id ORG/NAME"):
        check_hub({"train.hub_model_id": "no-org"})
    with pytest.raises(ConfigError, match="sft.push_to_hub': set sft.hub_model_id"):
        route_push({"push_to_hub": True}, None)
    with pytest.raises(ConfigError, match="'sft.hub_token': a token does not belong in a config.*HF_TOKEN"):
        route_push({"hub_token": "hf_x"}, "org/a")


def test_sft_push_to_hub_is_routed_to_the_merged_checkpoint(tmp_path: Path):
    cfg = load_config(ExperimentConfig, None, [f"runs_dir={tmp_path}", "student=org/base",
                                               "train.sft={push_to_hub: true, hub_model_id: org/student, max_steps: 3}"])
    assert hub_settings(cfg) == {"filter.push_to_hub": None, "train.hub_model_id": "org/student"}
    sft, repo = route_push(cfg.train.sft, cfg.train.hub_model_id)
    assert sft == {"max_steps": 3} and repo == "org/student"  # TRL gets no push_to_hub: trainer/ stays local
    assert route_push({"push_to_hub": True, "hub_model_id": "org/a"}, "org/b") == ({}, "org/b")
    assert route_push({"max_steps": 3}, None) == ({"max_steps": 3}, None)


def test_staged_dataset_opens_with_datasets_by_round_and_split(tmp_path: Path):
    from datasets import load_dataset

    run = Run(load_config(ExperimentConfig, None, [f"runs_dir={tmp_path}", "student=org/base",
                                                   "arms={filtered: {}, unfiltered: {split: all}}"]))
    staging = tmp_path / "hub" / "traces"
    for k in range(2):
        d = tmp_path / f"round_{k}"
        correct = write_jsonl(d / "sft_r1_correct.jsonl", [{"prompt": f"q{k}", "response": "r </think> <answer>1</answer>"}])
        all_split = write_jsonl(d / "sft_r1_all.jsonl", [
            {"prompt": f"q{k}", "response": "r </think> <answer>1</answer>", "ground_truth": "1", "is_correct": True},
            {"prompt": f"q{k}", "response": "x", "ground_truth": "1", "is_correct": False}])
        stage_splits(staging, hub_name(run, "filtered", k), correct, all_split)
    assert hub_name(run, "filtered", 1) == "filtered_round_01" and hub_name(run, "filtered", 1, "-") == "filtered-round_01"
    assert sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()) == [
        "README.md", "filtered_round_00/all_traces.jsonl", "filtered_round_00/correct.jsonl",
        "filtered_round_01/all_traces.jsonl", "filtered_round_01/correct.jsonl"]
    card = yaml.safe_load((staging / "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in card["configs"]] == ["filtered_round_00", "filtered_round_00-all",
                                                           "filtered_round_01", "filtered_round_01-all"]
    rows = load_dataset(str(staging), "filtered_round_01-all", split="all_traces")
    assert rows["is_correct"] == [True, False] and rows["prompt"] == ["q1", "q1"]
    assert load_dataset(str(staging), "filtered_round_00", split="correct")["prompt"] == ["q0"]


def test_staged_checkpoint_holds_the_merged_weights_and_generation_config(tmp_path: Path):
    ckpt = tmp_path / "train" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    staged = stage_checkpoint(tmp_path / "hub" / "main-round_00", ckpt, "org/base", "main-round_00")
    assert sorted(p.name for p in staged.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                        "model.safetensors", "tokenizer.json"]
    assert json.loads((staged / "generation_config.json").read_text())["eos_token_id"] == 7
    assert (staged / "model.safetensors").read_bytes() == b"weights"
    assert "base_model: org/base" in (staged / "README.md").read_text()
    (ckpt / "generation_config.json").unlink()
    with pytest.raises(ConfigError, match="no generation_config.json"):
        stage_checkpoint(tmp_path / "hub" / "again", ckpt, "org/base", "main-round_00")


def test_a_runs_filter_stage_stages_its_round_for_the_dataset_repo(tmp_path: Path, monkeypatch):
    """The filter stage of a run with filter.push_to_hub, up to the upload: what it staged is the
    round's splits, as written; the upload (the hub's side) is replaced by one that reads the
    staged folder back as `datasets` would."""
    from datasets import load_dataset

    import exit_loop.pipeline.stages as stages

    run = Run(load_config(ExperimentConfig, None, [f"runs_dir={tmp_path}", "student=org/base",
                                                   "filter.push_to_hub=my-org/traces"]))
    rows = [{"problem_id": f"q{i}", "prompt": f"p{i}", "response": f"r{i} </think> <answer>{i}</answer>",
             "ground_truth": "1", "predicted": str(i), "is_correct": i == 1, "failure": "none" if i == 1 else "wrong"}
            for i in range(3)]
    write_jsonl(run.real_dir("main", 0, "verify") / "verified.jsonl", rows)
    seen = {}

    def hub_side(staged: Path, repo_id: str, repo_type: str, message: str, revision=None) -> str:
        seen.update(repo=(repo_id, repo_type, revision),
                    correct=load_dataset(str(staged), "round_00", split="correct").to_list(),
                    all=load_dataset(str(staged), "round_00-all", split="all_traces")["problem_id"])
        return f"https://huggingface.co/datasets/{repo_id}/commit/0"

    monkeypatch.setattr(stages, "upload", hub_side)
    stages.filter_stage(run, "main", 0)
    assert seen["repo"] == ("my-org/traces", "dataset", None)
    assert seen["correct"] == [{"prompt": "p1", "response": "r1 </think> <answer>1</answer>"}]
    assert seen["all"] == ["q0", "q1", "q2"]
    assert (run.root / "hub" / "traces" / "round_00" / "correct.jsonl").exists()
