"""What the tests share, in one place: the environment `exit-loop` runs in here and a way to run
it, the tiny run config the engine and SLURM tests build on, finished runs written by hand as the
loop writes them (for the report and the trackers), and the SLURM helpers. Fixtures live in
conftest.py; tests import this module, never each other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from exit_loop.pipeline.slurm.queue import ACTIVE, Book, job_states

# what every command run here needs: a small KV cache for vLLM on CPU, no hub, lines as they come
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def env(**extra: str) -> dict[str, str]:
    """This process's environment with ENV (and `extra`) on top."""
    return {**os.environ, **ENV, **extra}


def exit_loop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "exit_loop", *args]


def cli(*args: str, timeout: int = 120, cwd: Path | None = None, environ: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    """`exit-loop ARGS` in a subprocess (output captured); `timeout` seconds at most."""
    return subprocess.run(exit_loop_cmd(*args), env=environ or env(), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_run(tmp: Path, name: str, model: Path | str, gsm8k_dir: Path, *, rounds: int, questions: int,
             max_tokens: int, sft: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """An `exit-loop run` config on the tiny model: `questions` GSM8K training and test questions,
    two greedy samples each on the vLLM engine (greedy: an interrupted run and an uninterrupted
    one write the same text), every trace trained on (`sft` on top of the few-step defaults);
    `sections` replace whole sections."""
    return {
        "experiment": name, "runs_dir": str(tmp / "runs"), "rounds": rounds, "student": str(model),
        "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": questions},
        "eval": {"data": {"dataset": str(gsm8k_dir / "test.jsonl"), "split": "test", "num_examples": questions},
                 "sample": {"max_tokens": max_tokens}},
        "sample": {"num_samples": 2, "max_tokens": max_tokens, "temperature": 0.0, "enforce_eager": True,
                   "dtype": "float32", "backend": "vllm"},
        "filter": {"dedup": False},
        "train": {"truncated": "no_eos",  # a random model's traces all run to max_tokens
                  "sft": {"per_device_train_batch_size": 4, "gradient_checkpointing": False, "save_strategy": "no",
                          "max_length": 256, "learning_rate": 1e-3, **sft}},
        "arms": {"main": {"split": "all"}},
        **sections,
    }


# --------------------------------------------------------------------------- finished runs, by hand

STAGE_S = {"sample": 40.0, "verify": 2.0, "filter": 0.5, "train": 50.0, "eval": 10.0}


def write_file(path: Path, obj: Any) -> None:
    """`obj` as JSON (a string as it is) at `path`, its directories made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def make_run(run_dir: Path, experiment: str, arm: str, accuracy: list[float], *, k: int | None = 4,
             config: bool = True, eval_config: dict | None = None) -> Path:
    """A finished run as the loop writes it: rounds 0..R-1 with every stage, round R eval only."""
    rounds = len(accuracy) - 1
    if config:
        write_file(run_dir / "config.yaml", f"experiment: {experiment}\nrounds: {rounds}\n")
    write_file(run_dir / "run.json", {
        "experiment": experiment, "arm": arm, "rounds": rounds,
        "timings": {"sample_s": 40.0 * rounds, "verify_s": 2.0 * rounds, "filter_s": 0.5 * rounds,
                    "train_s": 50.0 * rounds, "eval_s": 10.0 * (rounds + 1), "overhead_s": 2.5,
                    "total_s": 102.5 * rounds + 10.0 + 2.5}})
    for r, acc in enumerate(accuracy):
        d = run_dir / f"round_{r:02d}"
        write_file(d / "eval" / "eval.json", {
            "round": r, "model": f"{arm}-ckpt-{r}", "n": 200, "accuracy": acc,
            "pass@k": min(1.0, acc + 0.2) if k else None, "maj@k": acc + 0.05 if k else None, "k": k,
            "format_error_rate": 0.1 / (r + 1), "mean_response_tokens": 300.0 - 20 * r})
        write_file(d / "eval" / "manifest.json", {"stage": "eval", "timings": {"wall_s": STAGE_S["eval"]},
                                                  **({"config": eval_config} if eval_config else {})})
        if r == rounds:
            break
        correct = 200 + 50 * r
        write_file(d / "sample" / "manifest.json", {"stage": "sample",
                   "counts": {"samples": 800, "tokens_generated": 100_000 + r},
                   "timings": {"wall_s": STAGE_S["sample"]}})
        write_file(d / "verify" / "manifest.json", {"stage": "verify", "timings": {"wall_s": STAGE_S["verify"]}})
        write_file(d / "filter" / "summary.json", {
            "traces": 800, "correct_traces": correct, "trace_accuracy": round(correct / 800, 4),
            "questions": 200, "questions_solved": 120, "question_coverage": 0.6, "mean_tokens_correct": 250.0,
            "mean_tokens_incorrect": 320.0, "failures": {"none": correct, "wrong": 800 - correct},
            "correct_split_rows": correct - 10})
        write_file(d / "filter" / "manifest.json", {"stage": "filter", "timings": {"wall_s": STAGE_S["filter"]}})
        write_file(d / "train" / "manifest.json", {
            "stage": "train", "tokens": 50_000 + r, "examples": correct - 10, "steps": 10,
            "trained_examples": correct - 10, "epochs": 1.6, "final_loss": 0.5,
            "timings": {"wall_s": STAGE_S["train"]}})
    return run_dir


def tensorboard_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the event files in `log_dir` (not its sub-runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def report_scalars(arm: dict, k: int) -> dict[str, float]:
    """What report.json says of round k, under the trackers' names."""
    out = {f"eval/{key}": arm[key][k] for key in ("accuracy", "pass@k", "maj@k", "format_error_rate",
                                                  "mean_response_tokens")}
    out.update({"filter/yield": arm["yield"][k], "sample/tokens_generated": arm["tokens_generated"][k],
                "train/tokens": arm["training_tokens"][k], "sample/distinct_answers": arm["distinct_answers"][k],
                "sample/distinct_traces": arm["distinct_traces"][k],
                "train/repeated_share": arm["repeated_training_share"][k]})
    out.update({f"time/{stage}_s": v[k] for stage, v in arm["wall_time_s"].items()})
    return {key: v for key, v in out.items() if v is not None}


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are alive (not zombies)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


# --------------------------------------------------------------------------- SLURM

SLURM = {"cpus": 1, "mem": "3G", "time": "0:30:00", "signal_s": 60, "rollout": {"gpus": 0},
         "train": {"gpus": 0}, "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}}
# HF-backend jobs run two at a time on two cores: one torch thread each, or they fight for them
SLURM_HF = {**SLURM, "env": {**SLURM["env"], "OMP_NUM_THREADS": "1"}}


def exit_config(tmp: Path, name: str, model: Path | str, gsm8k_dir: Path, rounds: int = 2, **extra) -> Path:
    """A tiny run for SLURM (8 questions, 32 tokens, 2 optimizer steps); `sample` and `slurm` in
    `extra` update those sections, anything else replaces its section."""
    cfg = tiny_run(tmp, name, model, gsm8k_dir, rounds=rounds, questions=8, max_tokens=32, sft={"max_steps": 2},
                   slurm=SLURM)
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if key in ("sample", "slurm") else value
    return write_yaml(tmp / f"{name}.yaml", cfg)


def slurm_up() -> str:
    """Why the slurm tests cannot run here, or '' when a cluster answers."""
    if not shutil.which("sinfo") or not shutil.which("sbatch"):
        return "no SLURM commands here (sinfo/sbatch); .ci/run starts a local SLURM"
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answers"
    if res.returncode != 0:
        return f"no SLURM cluster answers (sinfo: {res.stderr.strip()[:200]}); .ci/run starts one"
    if not any(s.strip() in ("idle", "mix", "alloc") for s in res.stdout.split()):
        return f"no SLURM node is up (sinfo: {res.stdout.strip()})"
    return ""


def cancel_jobs(slurm_dirs: list[Path]) -> None:
    """scancel every job these runs submitted that is still pending or running."""
    for d in slurm_dirs:
        ids = [j for j, (st, _) in job_states(Book(d).ids()).items() if st in ACTIVE]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)


def wait_idle(slurm_dir: Path, timeout: float) -> None:
    """Until no job this run submitted is pending or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(Book(slurm_dir).ids())
        if not any(st in ACTIVE for st, _ in states.values()):
            return
        time.sleep(1)
    raise AssertionError(f"jobs still queued after {timeout}s: {job_states(Book(slurm_dir).ids())}\n"
                         + logs(slurm_dir))


def logs(slurm_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted((slurm_dir / "logs").glob("*.out")))
