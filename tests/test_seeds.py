"""A tiny ExIt run with `seeds: [0, 1]` and two arms, in one process on the HF backend: every
arm runs under each seed in `seed_<s>/`, `exit-loop stage` takes `--seed`, and compare's
report.json has an interval for every accuracy, per-seed paired entries with exact McNemar
p-values and pooled entries (two-level bootstrap, p null)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from exit_loop.report import compare
from exit_loop.config import load_config
from exit_loop.pipeline.loop import run_loop
from exit_loop.pipeline.run import ExperimentConfig, Run


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory, tiny_model_dir: Path, gsm8k_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("seeds")
    cfg = {
        "experiment": "seeded", "runs_dir": str(tmp / "runs"), "rounds": 1, "student": str(tiny_model_dir),
        "seeds": [0, 1], "isolate": False,
        "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": 6},
        "eval": {"data": {"dataset": str(gsm8k_dir / "test.jsonl"), "split": "test", "num_examples": 6},
                 "sample": {"max_tokens": 16}},
        "sample": {"backend": "hf", "num_samples": 2, "max_tokens": 16, "temperature": 1.0, "dtype": "float32"},
        "train": {"truncated": "no_eos", "budget": {"steps": 1},
                  "sft": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_strategy": "no",
                          "gradient_checkpointing": False, "max_length": 512, "use_cpu": True}},
        "arms": {"filtered": {"split": "correct"}, "unfiltered": {"split": "all"}},
    }
    path = tmp / "seeded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_loop(load_config(ExperimentConfig, path))


@pytest.mark.engine
def test_every_arm_runs_under_each_seed(seeded_run: Path):
    cfg = load_config(ExperimentConfig, seeded_run / "config.yaml")
    assert sorted(p.name for p in seeded_run.iterdir() if p.is_dir()) == ["seed_0", "seed_1"]
    for seed in (0, 1):
        run = Run(cfg, seed)
        assert run.root == seeded_run / f"seed_{seed}"
        assert run.stage_cmd("train", "filtered", 0)[-2:] == ["--seed", str(seed)]
        for arm in cfg.arms:
            info = json.loads((run.arm_dir(arm) / "run.json").read_text())
            assert info["seed"] == seed and info["arm"] == arm
            assert (run.stage_dir(arm, 1, "eval") / "eval.json").exists()
            assert json.loads((run.stage_dir(arm, 0, "train") / "manifest.json").read_text())["stage"] == "train"
        samples = [json.loads(x) for x in (run.real_dir("filtered", 0, "sample") / "samples.jsonl").open()]
        assert {s["round"] for s in samples} == {0}
    # the two seeds drew their own samples (sampling seed = run seed + round)
    s0 = (seeded_run / "seed_0" / "shared" / "round_00" / "sample" / "samples.jsonl").read_text()
    s1 = (seeded_run / "seed_1" / "shared" / "round_00" / "sample" / "samples.jsonl").read_text()
    assert s0 != s1


@pytest.mark.engine
def test_report_has_per_seed_and_pooled_intervals_and_paired_tests(seeded_run: Path, tmp_path: Path):
    out = compare([seeded_run], tmp_path / "report")
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["arms"]) == ["filtered/seed_0", "filtered/seed_1", "unfiltered/seed_0", "unfiltered/seed_1"]
    for arm in report["arms"].values():
        for ci in arm["accuracy_ci95"]:
            assert len(ci) == 2 and 0 <= ci[0] <= ci[1] <= 1
    per_seed = [p for p in report["paired"] if p["seed"] is not None]
    pooled = [p for p in report["paired"] if p["seed"] is None]
    assert sorted((p["seed"], p["round"]) for p in per_seed) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(p["a"] == "filtered" and p["b"] == "unfiltered" for p in report["paired"])
    assert all(p["p_mcnemar"] is not None and 0 <= p["p_mcnemar"] <= 1 for p in per_seed)
    assert [p["round"] for p in pooled] == [0, 1] and all(p["p_mcnemar"] is None for p in pooled)
    for p in report["paired"]:
        assert set(p) >= {"a", "b", "round", "diff", "ci95", "p_mcnemar"}
        assert p["ci95"][0] <= p["ci95"][1]
    assert report["arms"]["filtered/seed_0"]["accuracy"][0] == report["arms"]["unfiltered/seed_0"]["accuracy"][0]
    assert set(report["pooled"]) == {"filtered", "unfiltered"}
    assert report["pooled"]["filtered"]["seeds"] == [0, 1]
    assert "## Pooled over seeds" in (out / "report.md").read_text()
