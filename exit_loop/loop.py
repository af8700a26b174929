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

Resume: running the same command again skips every stage whose manifest exists. A changed config
is refused, naming the keys that differ (`--allow_config_change` overrides; `rounds` may grow).
Heavy stages (eval + sample, which share one inference engine, and train) run in their own
process, so GPU memory is returned between them and a crash never takes the loop's state with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from exit_loop.baseline import baseline_row
from exit_loop.config import ConfigError, dump_yaml, load_config, read_yaml, to_dict
from exit_loop.evaluate import EvalConfig, evaluate
from exit_loop.filter import FilterConfig, format_summary, write_splits
from exit_loop.jsonl import DataError, atomic_write_text, iter_jsonl, write_json, write_jsonl
from exit_loop.problems import DataConfig, Problem, load_problems
from exit_loop.sample import SampleConfig, check_model_path, sample, start_backend
from exit_loop.slurm import SlurmConfig
from exit_loop.train import LoraSettings, TrainConfig, train
from exit_loop.verify import read_samples, verify_rows


@dataclass
class ArmConfig:
    split: Literal["correct", "all", "original"] = "correct"  # what the student trains on
    num_examples: int | None = None  # training rows per round (data-size arms), seeded subset


@dataclass
class PolicyConfig:
    retrain_from: Literal["base", "last"] = "last"      # base: STaR / ReST-EM style
    data_window: Literal["round", "all"] = "round"      # this round's data only, or every round's
    questions: Literal["all", "unsolved", "band"] = "all"
    band: list[float] = field(default_factory=lambda: [0.0, 0.75])  # pass-rate band [lo, hi]

    def __post_init__(self) -> None:
        if len(self.band) != 2 or not 0.0 <= self.band[0] <= self.band[1] <= 1.0:
            raise ValueError(f"policy.band must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.band}")


@dataclass
class EvalSection:
    data: DataConfig = field(default_factory=lambda: DataConfig(split="test"))
    k: int = 0
    k_temperature: float = 0.7


@dataclass
class TrainSection:
    sft: dict[str, Any] = field(default_factory=dict)   # trl.SFTConfig fields
    peft: LoraSettings = field(default_factory=LoraSettings)
    use_chat_template: bool = False
    launcher: str = ""   # e.g. "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8"


@dataclass
class ExperimentConfig:
    experiment: str = "exit"
    runs_dir: str = "runs"
    rounds: int = 3
    student: str = ""                 # the base model every arm starts from
    teacher: str | None = None        # round 0 samples from it when set (else from the student)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)        # training questions
    eval: EvalSection = field(default_factory=EvalSection)      # held-out questions
    sample: SampleConfig = field(default_factory=SampleConfig)  # G = sample.num_samples
    filter: FilterConfig = field(default_factory=FilterConfig)  # K = filter.max_correct_per_question
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainSection = field(default_factory=TrainSection)
    arms: dict[str, ArmConfig] = field(default_factory=lambda: {"main": ArmConfig()})
    isolate: bool = True              # heavy stages in their own process
    slurm: SlurmConfig = field(default_factory=SlurmConfig)     # `exit-loop slurm submit` resources

    def __post_init__(self) -> None:
        if not self.student:
            raise ValueError("student: give the base model (hub id or path)")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if not self.arms:
            raise ValueError("arms: declare at least one arm")
        for name in self.arms:
            if name in ("shared",) or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"arms: {name!r} is not a usable arm name")


STAGES = ("eval", "sample", "verify", "filter", "train")


class StageFailed(RuntimeError):
    """A stage's process exited non-zero; its own output above says why."""
GROWABLE_KEYS = {"rounds"}


# --------------------------------------------------------------------------- paths


class Run:
    """Where each stage of each arm and round lives."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.root = Path(cfg.runs_dir) / cfg.experiment
        self.multi = len(cfg.arms) > 1

    def arm_dir(self, arm: str) -> Path:
        return self.root / arm if self.multi else self.root

    def round_dir(self, arm: str, k: int) -> Path:
        return self.arm_dir(arm) / f"round_{k:02d}"

    def stage_dir(self, arm: str, k: int, stage: str) -> Path:
        return self.round_dir(arm, k) / stage

    def shared(self, arm: str, k: int, stage: str) -> bool:
        """Round 0's eval, sample and verify are the same for every arm: made once."""
        return self.multi and k == 0 and stage in ("eval", "sample", "verify")

    def real_dir(self, arm: str, k: int, stage: str) -> Path:
        if self.shared(arm, k, stage):
            return self.root / "shared" / f"round_{k:02d}" / stage
        return self.stage_dir(arm, k, stage)

    def sample_shard(self, arm: str, k: int, shard: int) -> Path:
        n = self.cfg.sample.num_shards
        return self.real_dir(arm, k, "sample") / "shards" / f"shard-{shard:05d}-of-{n:05d}.jsonl"

    def done(self, arm: str, k: int, stage: str) -> bool:
        return (self.real_dir(arm, k, stage) / "manifest.json").exists()

    def link(self, arm: str, k: int, stage: str) -> None:
        """Make the arm's stage dir point at the shared one (relative link)."""
        if not self.shared(arm, k, stage):
            return
        d = self.stage_dir(arm, k, stage)
        if d.is_symlink() or d.exists():
            return
        d.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(os.path.relpath(self.real_dir(arm, k, stage), d.parent), d)
        except FileExistsError:  # another process (a SLURM array task) made it first
            pass

    def policy(self, arm: str, k: int) -> str:
        """The model that round k evaluates and samples with: the base student, then each ckpt."""
        if k == 0:
            return self.cfg.student
        return str(self.stage_dir(arm, k - 1, "train") / "ckpt")

    def sampler_model(self, arm: str, k: int) -> str:
        return self.cfg.teacher if (k == 0 and self.cfg.teacher) else self.policy(arm, k)


# --------------------------------------------------------------------------- stages


def _manifest(d: Path, stage: str, t0: float, **extra: Any) -> None:
    write_json(d / "manifest.json", {"stage": stage, **extra,
                                      "timings": {"wall_s": round(time.monotonic() - t0, 3)}})


def select_questions(run: Run, arm: str, k: int, problems: list[Problem]) -> list[Problem]:
    """Which training questions round k samples, from the labels of earlier rounds."""
    pol = run.cfg.policy
    if pol.questions == "all" or k == 0:
        return problems
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    rounds = range(k) if pol.questions == "unsolved" else [k - 1]
    for j in rounds:
        path = run.real_dir(arm, j, "verify") / "verified.jsonl"
        if not path.exists():
            continue
        for row in iter_jsonl(path):
            total[row["problem_id"]] += 1
            correct[row["problem_id"]] += bool(row["is_correct"])
    if pol.questions == "unsolved":
        return [p for p in problems if correct[p.id] == 0]
    lo, hi = pol.band
    return [p for p in problems if total[p.id] == 0 or lo <= correct[p.id] / total[p.id] <= hi]


def rollout_stage(run: Run, arm: str, k: int, shard: int | None = None) -> None:
    """eval and sample of round k; one engine serves both when they use the same model. The
    engine's start and stop count in the stage that uses it first and last. With shards, every
    shard is drawn and then merged; `shard` draws only that one (shard 0 also evaluates) and
    leaves the merge to `merge_stage`."""
    cfg = run.cfg
    n = cfg.sample.num_shards
    if shard is not None and not 0 <= shard < n:
        raise ConfigError(f"--shard {shard}: sample.num_shards is {n}; expected 0 to {n - 1}")
    need_eval = not run.done(arm, k, "eval") and shard in (None, 0)
    need_sample = k < cfg.rounds and not run.done(arm, k, "sample") and cfg.arms[arm].split != "original"
    base = replace(cfg.sample, seed=cfg.seed + k, round=k)
    backend = None
    try:
        if need_eval:
            ecfg = EvalConfig(output_dir=str(run.real_dir(arm, k, "eval")), data=cfg.eval.data,
                              sample=replace(base, model_name=run.policy(arm, k)), k=cfg.eval.k,
                              k_temperature=cfg.eval.k_temperature)
            t0 = time.monotonic()
            if need_sample and run.sampler_model(arm, k) == run.policy(arm, k):
                backend = start_backend(ecfg.sample)
            evaluate(ecfg, backend, started_at=t0)
        if need_sample:
            t0 = time.monotonic()
            d = run.real_dir(arm, k, "sample")
            scfg = replace(base, model_name=run.sampler_model(arm, k))
            problems = select_questions(run, arm, k, load_problems(cfg.data))
            if problems and n > 1:  # one engine for every shard; a lone shard starts one only if needed
                if shard is None:
                    backend = backend or start_backend(scfg)
                for i in range(n) if shard is None else [shard]:
                    sample(replace(scfg, shard_id=i), problems, run.sample_shard(arm, k, i), backend)
            elif problems:
                backend = backend or start_backend(scfg)
                sample(scfg, problems, d / "samples.jsonl", backend)
            if backend is not None:
                backend.close()
                backend = None
            if n > 1:
                if shard is None:
                    merge_samples(run, arm, k, problems, t0)
                return
            rows = list(iter_jsonl(d / "samples.jsonl")) if problems else []
            write_jsonl(d / "samples.jsonl", rows)  # exists even when no question was left
            _manifest(d, "sample", t0, model=scfg.model_name, questions=len(problems),
                      counts={"samples": len(rows), "tokens_generated": sum(r["num_tokens"] for r in rows)})
    finally:
        if backend is not None:
            backend.close()


def merge_samples(run: Run, arm: str, k: int, problems: list[Problem], t0: float) -> None:
    """Round k's shard files as one samples.jsonl (by question, then sample index) and the sample
    manifest; refuses while any (question, sample) pair is missing."""
    cfg = run.cfg
    d = run.real_dir(arm, k, "sample")
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for i in range(cfg.sample.num_shards):
        path = run.sample_shard(arm, k, i)
        for row in iter_jsonl(path) if path.exists() else ():
            found.setdefault((row["problem_id"], row["sample_index"]), row)
    want = [(p.id, j) for p in problems for j in range(cfg.sample.num_samples)]
    missing = [key for key in want if key not in found]
    if missing:
        raise DataError(f"{d / 'shards'}: {len(missing)} of {len(want)} samples missing (first: "
                        f"{missing[0]}); run the unfinished shards (exit-loop stage rollout --shard I)")
    rows = [found[key] for key in want]
    write_jsonl(d / "samples.jsonl", rows)
    print(f"merge: {len(rows)} samples from {cfg.sample.num_shards} shards -> {d / 'samples.jsonl'}", flush=True)
    _manifest(d, "sample", t0, model=run.sampler_model(arm, k), questions=len(problems),
              shards=cfg.sample.num_shards,
              counts={"samples": len(rows), "tokens_generated": sum(r["num_tokens"] for r in rows)})


def merge_stage(run: Run, arm: str, k: int) -> None:
    if not run.done(arm, k, "sample"):
        t0 = time.monotonic()
        merge_samples(run, arm, k, select_questions(run, arm, k, load_problems(run.cfg.data)), t0)


def verify_stage(run: Run, arm: str, k: int) -> None:
    t0 = time.monotonic()
    d = run.real_dir(arm, k, "verify")
    src = run.real_dir(arm, k, "sample") / "samples.jsonl"
    rows = write_jsonl(d / "verified.jsonl", verify_rows(read_samples(src, run.cfg.data.task),
                                                        task=run.cfg.data.task))
    _manifest(d, "verify", t0, input=str(src), output=str(rows))


def filter_stage(run: Run, arm: str, k: int) -> None:
    t0 = time.monotonic()
    cfg = run.cfg
    d = run.stage_dir(arm, k, "filter")
    if cfg.arms[arm].split == "original":
        problems = load_problems(cfg.data)
        write_jsonl(d / "sft_original.jsonl", (baseline_row(p) for p in problems))
        _manifest(d, "filter", t0, split="original", rows=len(problems))
        return
    src = run.real_dir(arm, k, "verify") / "verified.jsonl"
    fcfg = replace(cfg.filter, input=str(src), output_dir=str(d))
    rows = list(iter_jsonl(src))
    if rows:
        write_splits(rows, fcfg)
        print(format_summary(json.loads((d / "summary.json").read_text())), flush=True)
    else:  # every question already solved: nothing new this round
        write_jsonl(d / fcfg.all_name, [])
        write_jsonl(d / fcfg.correct_name, [])
        write_json(d / "summary.json", {"traces": 0, "correct_traces": 0, "correct_split_rows": 0})
    _manifest(d, "filter", t0, split=cfg.arms[arm].split)


def train_split(run: Run, arm: str, k: int) -> Path:
    d = run.stage_dir(arm, k, "filter")
    split = run.cfg.arms[arm].split
    if split == "original":
        return d / "sft_original.jsonl"
    return d / (run.cfg.filter.correct_name if split == "correct" else run.cfg.filter.all_name)


def train_config(run: Run, arm: str, k: int) -> TrainConfig:
    cfg = run.cfg
    rounds = range(k + 1) if cfg.policy.data_window == "all" else [k]
    data = [str(train_split(run, arm, j)) for j in rounds]
    data = [p for p in data if Path(p).stat().st_size > 0]
    model = cfg.student if cfg.policy.retrain_from == "base" else run.policy(arm, k)
    return TrainConfig(data=data or [str(train_split(run, arm, k))], model=model,
                       output_dir=str(run.stage_dir(arm, k, "train")),
                       num_examples=cfg.arms[arm].num_examples, seed=cfg.seed,
                       use_chat_template=cfg.train.use_chat_template, peft=cfg.train.peft,
                       sft=dict(cfg.train.sft), trust_remote_code=cfg.sample.trust_remote_code)


def train_stage(run: Run, arm: str, k: int) -> None:
    tcfg = train_config(run, arm, k)
    if all(Path(p).stat().st_size == 0 for p in tcfg.data):
        # no correct trace at all: the policy carries over unchanged (recorded, not hidden)
        out = Path(tcfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if (out / "ckpt").exists() or (out / "ckpt").is_symlink():
            (out / "ckpt").unlink()
        os.symlink(os.path.abspath(tcfg.model), out / "ckpt")
        write_json(out / "manifest.json", {"stage": "train", "skipped": "no training rows",
                                           "model": tcfg.model, "examples": 0, "tokens": 0})
        print(f"train: no training rows in round {k}; the policy carries over", flush=True)
        return
    train(tcfg)


# --------------------------------------------------------------------------- orchestration


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def check_config_change(run: Run, allow: bool) -> None:
    path = run.root / "config.yaml"
    if not path.exists():
        return
    old, _ = read_yaml(path)
    a, b = _flatten(old), _flatten(to_dict(run.cfg))
    changed = sorted(k for k in set(a) | set(b)
                     if a.get(k) != b.get(k) and k not in GROWABLE_KEYS and not k.startswith("slurm."))
    if "rounds" in a and b["rounds"] < a["rounds"]:
        changed.append("rounds (fewer than before)")
    if changed and not allow:
        raise ConfigError(f"{path}: this run was made with another config; differing keys: "
                          f"{', '.join(changed)}. Use another experiment name, or "
                          f"--allow_config_change to continue anyway")


class Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)

    def add(self, key: str, seconds: float) -> None:
        self.t[key] += seconds


def _stage_cmd(run_dir: Path, name: str, arm: str, k: int, launcher: str = "") -> list[str]:
    base = ["-m", "exit_loop.cli", "stage", name, str(run_dir), "--arm", arm, "--round", str(k)]
    if launcher:
        return [*shlex.split(launcher), *base]
    return [sys.executable, *base]


def run_stage(run: Run, name: str, arm: str, k: int, shard: int | None = None) -> None:
    """Run one stage in this process (the `exit-loop stage` command and the cheap stages)."""
    if name == "rollout":
        rollout_stage(run, arm, k, shard)
    elif name == "merge":
        merge_stage(run, arm, k)
    elif name == "verify":
        if not run.done(arm, k, "verify"):
            verify_stage(run, arm, k)
    elif name == "filter":
        if not run.done(arm, k, "filter"):
            filter_stage(run, arm, k)
    elif name == "train":
        train_stage(run, arm, k)
    else:
        raise ValueError(f"unknown stage {name!r}")
    for stage in STAGES:
        run.link(arm, k, stage)


def _launch(run: Run, name: str, arm: str, k: int, launcher: str = "") -> None:
    if not run.cfg.isolate:
        run_stage(run, name, arm, k)
        return
    cmd = _stage_cmd(run.root, name, arm, k, launcher)
    res = subprocess.run(cmd)
    if res.returncode != 0:
        raise StageFailed(f"stage {name} of {arm} round {k} failed (exit {res.returncode}): "
                           f"{shlex.join(cmd)}")


def run_loop(cfg: ExperimentConfig, allow_config_change: bool = False) -> Path:
    """Run (or resume) every arm's rounds; returns the experiment directory."""
    run = Run(cfg)
    check_model_path(cfg.student)
    if cfg.teacher:
        check_model_path(cfg.teacher)
    for data in (cfg.data, cfg.eval.data):  # a bad or empty data set fails now, not rounds later
        load_problems(data)
    check_config_change(run, allow_config_change)
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.root / "config.yaml", dump_yaml(cfg))
    t_start = time.monotonic()
    for arm in cfg.arms:
        timer = Timer()
        t_arm = time.monotonic()
        run.arm_dir(arm).mkdir(parents=True, exist_ok=True)
        for k in range(cfg.rounds + 1):
            last = k == cfg.rounds
            todo_rollout = not run.done(arm, k, "eval") or (
                not last and cfg.arms[arm].split != "original" and not run.done(arm, k, "sample"))
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
                break
            if cfg.arms[arm].split != "original" and not run.done(arm, k, "verify"):
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
            print(f"== {cfg.experiment}/{arm} round {k}: {summary_line(run, arm, k)}", flush=True)
        write_run_json(run, arm, timer, time.monotonic() - t_arm)
    print(f"run: {cfg.experiment} done in {time.monotonic() - t_start:.1f}s -> {run.root}", flush=True)
    return run.root


def summary_line(run: Run, arm: str, k: int) -> str:
    parts = []
    e = run.stage_dir(arm, k, "eval") / "eval.json"
    if e.exists():
        parts.append(f"held-out accuracy {json.loads(e.read_text())['accuracy']:.1%}")
    s = run.stage_dir(arm, k, "filter") / "summary.json"
    if s.exists():
        sm = json.loads(s.read_text())
        if sm.get("traces"):
            parts.append(f"trace accuracy {sm['trace_accuracy']:.1%}, {sm['correct_split_rows']} correct rows")
    return "; ".join(parts)


def _stage_wall(stage_dir: Path) -> float:
    """A finished stage's own wall time (engine start and model loading included) from its manifest."""
    m = stage_dir / "manifest.json"
    if not m.exists():
        return 0.0
    data = json.loads(m.read_text())
    return float(data.get("timings", {}).get("wall_s") or data.get("wall_time_s") or 0.0)


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
    write_json(run.arm_dir(arm) / "run.json", {"experiment": run.cfg.experiment, "arm": arm,
                                              "rounds": run.cfg.rounds, "timings": timings})
    print(f"run: {arm}: {total:.1f}s in all; eval {t['eval_s']:.1f}s, sample {t['sample_s']:.1f}s, "
          f"train {t['train_s']:.1f}s; loop overhead {timings['overhead_s']:.1f}s "
          f"({timings['overhead_share']:.1%}: stage processes starting, verify "
          f"{t['verify_s']:.1f}s, filter {t['filter_s']:.1f}s)", flush=True)


# --------------------------------------------------------------------------- command line


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise DataError(f"{run_dir}: no config.yaml; not a run directory")
    return load_config(ExperimentConfig, path)


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML (configs/exit_*.yaml), or an existing run dir")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=4 sample.num_samples=8")
    p.add_argument("--allow_config_change", action="store_true",
                   help="continue a run whose config differs from the one it was made with")
    a = p.parse_args(argv)
    src = Path(a.config)
    cfg_file = src / "config.yaml" if src.is_dir() else src
    run_loop(load_config(ExperimentConfig, cfg_file, a.overrides), a.allow_config_change)
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
    a = p.parse_args(argv)
    cfg = load_run_config(Path(a.run_dir))
    if a.arm not in cfg.arms:
        raise ConfigError(f"--arm {a.arm!r}: not an arm of this run; arms: {', '.join(cfg.arms)}")
    run = Run(cfg)
    run_stage(run, a.name, a.arm, a.round, a.shard)
    # Everything is written (atomically, fsynced) and engines are closed: skip the interpreter's
    # slow teardown of torch/vLLM modules, which would only add to the loop's overhead.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
