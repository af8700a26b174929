"""The `grpo` arm (exit_loop/train/grpo.py): TRL's GRPOTrainer with this project's verifier as
its reward. Unit tests of the config and of the reward against the verifier on hand-made
completions; one engine test of a tiny CPU run with arms filtered, unfiltered and grpo (HF
generation inside GRPO, the real vLLM engine for the rest), SIGKILLed in the GRPO stage, resumed,
and compared in one report, the stored GRPO rollouts' rewards equal to the verifier's verdicts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exit_loop.config import ConfigError, load_config
from exit_loop.jsonl import read_jsonl
from exit_loop.pipeline.preflight import preflight
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.train.grpo import VerifierReward
from exit_loop.verify import verify_rows

from helpers import cli, env, tiny_run, write_yaml


def config(tmp: Path, *extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [f"runs_dir={tmp}", "student=x/y", *extra])


def test_grpo_arms_are_configured_like_the_others_and_refuse_what_they_cannot_do(tmp_path: Path):
    cfg = config(tmp_path, "arms={rl: {kind: grpo, budget: {generated_tokens: 5000}}, f: {split: correct}}")
    run = Run(cfg)
    assert not cfg.arms["rl"].samples and cfg.arms["f"].samples
    assert run.real_dir("rl", 0, "eval") == run.real_dir("f", 0, "eval")       # one round-0 eval for all
    assert run.real_dir("rl", 0, "sample") != run.real_dir("f", 0, "sample")   # the shared samples are not its
    with pytest.raises(ConfigError, match="arms.f: budget.generated_tokens"):
        config(tmp_path, "arms={rl: {kind: grpo}, f: {split: correct}}", "train.budget={generated_tokens: 10}")
    with pytest.raises(ConfigError, match="grpo arm's budget"):
        config(tmp_path, "arms={rl: {kind: grpo, budget: {tokens: 10}}}")
    with pytest.raises(ConfigError, match="grpo arm trains on the round's questions"):
        config(tmp_path, "arms={rl: {kind: grpo, num_examples: 3}}")
    with pytest.raises(ConfigError, match="arms.rl.kind"):
        config(tmp_path, "arms={rl: {kind: ppo}}")
    bad = config(tmp_path, "arms={rl: {kind: grpo}}", "train.grpo={num_generationz: 4}")
    with pytest.raises(ConfigError, match=r"train.grpo.num_generationz.*num_generations"):
        preflight(bad, allow_overlap=True)  # at the start, before any stage


def test_the_reward_is_the_verifiers_verdict_on_the_canonical_response(tmp_path: Path):
    reward = VerifierReward("gsm8k", max_completion_length=8, stop_ids={9}, path=tmp_path / "rollouts.jsonl")
    completions = [" 3 + 4 = 7 </think> <answer>7</answer>",        # correct, stopped on </answer>
                   " 3 + 4 = 7 </think>   <answer> 7 </answer>",    # canonical after normalising: correct
                   " 3 + 4 = 8 </think> <answer>8</answer>",        # wrong
                   " 3 + 4 = 7 </think> <answer>7 or 8</answer>",   # a hedge: never correct
                   " 3 + 4 = 7 and then",                          # cut at max_completion_length
                   " <answer>7</answer>"]                           # no </think>
    ids = [[1, 9], [1, 2, 9], [1, 9], [1, 9], list(range(8)), [1, 9]]
    got = reward(prompts=["p"] * 6, completions=completions, completion_ids=ids, problem_id=["q"] * 6,
                 ground_truth=["7"] * 6)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    rows = read_jsonl(tmp_path / "rollouts.jsonl")
    again = list(verify_rows([{k: r[k] for k in ("response", "ground_truth", "finish_reason")} for r in rows]))
    assert [float(r["is_correct"]) for r in again] == got  # the filter's verifier, on the stored responses
    assert [r["finish_reason"] for r in rows][4] == "length" and rows[3]["failure"] == "ambiguous"
    assert reward.generated == sum(map(len, ids)) and reward.completions == 6 and reward.correct == 2


@pytest.mark.engine
def test_filtered_unfiltered_and_grpo_arms_resume_after_a_kill_and_share_one_report(
        tmp_path: Path, tiny_model_dir: Path, gsm8k_dir: Path):
    cfg = tiny_run(tmp_path, "rl", tiny_model_dir, gsm8k_dir, rounds=1, questions=8, max_tokens=24,
                   sft={"max_steps": 2, "gradient_accumulation_steps": 1, "logging_steps": 1},
                   arms={"filtered": {"split": "correct"}, "unfiltered": {"split": "all"},
                         "rl": {"kind": "grpo", "budget": {"steps": 3}}}, isolate=False)
    cfg["sample"]["temperature"] = 1.0
    cfg["train"]["grpo"] = {"per_device_train_batch_size": 4, "learning_rate": 1e-4}
    path = write_yaml(tmp_path / "rl.yaml", cfg)
    train_dir = tmp_path / "runs" / "rl" / "rl" / "round_00" / "train"
    proc = subprocess.Popen([sys.executable, "-m", "exit_loop", "run", str(path)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (train_dir / "rollouts.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # killed once GRPO has generated and rewarded, before its manifest
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    assert (train_dir / "rollouts.jsonl").exists() and not (train_dir / "manifest.json").exists(), log[-4000:]

    res = cli("run", str(path), timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    manifest = json.loads((train_dir / "manifest.json").read_text())
    rollouts = read_jsonl(train_dir / "rollouts.jsonl")
    assert manifest["kind"] == "grpo" and manifest["steps"] == 3
    assert len(rollouts) == manifest["counts"]["completions"] == 3 * 4  # the round again from its start, once
    assert [r["step"] for r in rollouts] == [0] * 4 + [1] * 4 + [2] * 4
    assert manifest["counts"]["tokens_generated"] == sum(r["num_tokens"] for r in rollouts)
    again = verify_rows([{k: r[k] for k in ("response", "ground_truth", "finish_reason")} for r in rollouts])
    assert [float(r["is_correct"]) for r in again] == [r["reward"] for r in rollouts]
    assert (train_dir / "ckpt" / "model.safetensors").exists()

    res = cli("compare", str(tmp_path / "runs" / "rl"), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "rl" / "report.json").read_text())
    arms = report["arms"]
    assert set(arms) == {"filtered", "unfiltered", "rl"}
    assert arms["rl"]["tokens_generated"][0] == manifest["counts"]["tokens_generated"]  # its own, not round 0's samples
    assert arms["rl"]["training_steps"][0] == 3 and arms["rl"]["accuracy"][1] is not None
    assert {(p["a"], p["b"]) for p in report["paired"]} >= {("filtered", "rl"), ("rl", "unfiltered")}
