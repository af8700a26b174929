"""An ExIt run on disk: its config (`ExperimentConfig`), where each stage of each arm and round
lives (`Run`), the shard files of both on-disk layouts (`shard_path`), and the command that runs
one stage in its own process (`stage_cmd`: what `exit-loop run` and the SLURM jobs launch).

    runs/<experiment>/config.yaml                 the resolved config (`check_config_change`)
    runs/<experiment>/[<arm>/]round_KK/<stage>/   eval, sample, verify, filter, train
    runs/<experiment>/shared/round_00/<stage>/    with several arms: round 0's eval, sample, verify
    .../sample/shards/shard-KKKKK-of-NNNNN.jsonl  sharded sampling (a generation: samples/shard-…)
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import check_unchanged
from exit_loop.filter import FilterConfig
from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.sample import SampleConfig
from exit_loop.tasks import DataConfig
from exit_loop.train import LoraSettings

STAGES = ("eval", "sample", "verify", "filter", "train")
GROWABLE_KEYS = ("rounds",)


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
    hub_model_id: str | None = None  # ORG/NAME: each round's merged ckpt/ to this model repo (exit_loop.hub)


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
    # round metrics and each round's SFT run to these trackers (exit_loop.pipeline.track)
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)

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


def shard_path(directory: Path, shard: int, num_shards: int) -> Path:
    """Shard `shard` of `num_shards` in `directory`: `shard-KKKKK-of-NNNNN.jsonl`. A run keeps its
    shards in `<sample dir>/shards/`, a generation in `<output_dir>/samples/`."""
    return Path(directory) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def stage_cmd(run_dir: Path, name: str, arm: str, k: int, launcher: str = "") -> list[str]:
    """The command that runs one stage of a run in its own process (`exit-loop stage ...`)."""
    base = ["-m", "exit_loop.cli", "stage", name, str(run_dir), "--arm", arm, "--round", str(k)]
    if launcher:
        return [*shlex.split(launcher), *base]
    return [sys.executable, *base]


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
        return shard_path(self.real_dir(arm, k, "sample") / "shards", shard, self.cfg.sample.num_shards)

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


def check_config_change(run: Run, allow: bool) -> None:
    """Refuse to continue a run under another config (the slurm section and the trackers may
    change, `rounds` may grow), naming the keys that differ."""
    check_unchanged(run.root / "config.yaml", run.cfg, allow, "run was made",
                    "Use another experiment name, or --allow_config_change to continue anyway",
                    ignore=("slurm", "report_to"), growable=GROWABLE_KEYS)
