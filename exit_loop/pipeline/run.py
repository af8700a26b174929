"""An ExIt run on disk: its config (`ExperimentConfig`), where each stage of each arm and round
lives (`Run`), the shard files of both on-disk layouts (`shard_path`), and the command that runs
one stage in its own process (`stage_cmd`: what `exit-loop run` and the SLURM jobs launch).

    runs/<experiment>/config.yaml                 the resolved config (`check_config_change`)
    runs/<experiment>/[<arm>/]round_KK/<stage>/   eval, sample, verify, filter, train
    runs/<experiment>/shared/round_00/<stage>/    with several arms: round 0's eval, sample, verify
    .../sample/shards/shard-KKKKK-of-NNNNN.jsonl  sharded sampling (a generation: samples/shard-…)
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import check_unchanged
from exit_loop.errors import ConfigError
from exit_loop.filter import FilterConfig
from exit_loop.rundir import MANIFEST, SHARED, SHARED_STAGES, round_name, seed_name
from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.prompts import PromptStyle
from exit_loop.sample import SampleConfig, resolve_prompt_style
from exit_loop.tasks import DataConfig, Problem, load_problems
from exit_loop.train.config import LoraSettings

GROWABLE_KEYS = ("rounds",)


@dataclass
class Budget:
    """Training compute per round, the same for every arm unless an arm sets its own: optimizer
    steps, or training tokens (prompt + response, turned into steps from the round's data). Unset:
    the `sft` epochs decide, and an arm with more rows trains more."""
    steps: int | None = None
    tokens: int | None = None
    generated_tokens: int | None = None  # a grpo arm: completion tokens GRPO generates a round

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.steps, self.tokens, self.generated_tokens)) > 1:
            raise ValueError("budget: give one of steps, tokens and generated_tokens")
        for key in ("steps", "tokens", "generated_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"budget.{key}: must be at least 1, got {getattr(self, key)}")


@dataclass
class ArmConfig:
    # sft: expert iteration (sample, verify, filter, then TRL's SFTTrainer on `split`); grpo: TRL's
    # GRPOTrainer on the round's questions, the verifier as its reward (exit_loop.train.grpo)
    kind: Literal["sft", "grpo"] = "sft"
    # what the student trains on: correct traces; every trace; well-formed traces whatever their
    # answer; or the data set's own solutions (a grpo arm: none, it generates while it trains)
    split: Literal["correct", "all", "formatted", "original"] = "correct"
    num_examples: int | None = None  # training rows per round (data-size arms), seeded subset
    budget: Budget | None = None     # this arm's own training compute (default: train.budget)
    # an `original` arm: whose solutions it trains on (default: the run's `data`), e.g. the warm
    # start's own gold solutions, for a control that keeps training on them
    data: DataConfig | None = None
    rationalize: bool | None = None  # this arm's policy.rationalize (unset: the policy's)

    def __post_init__(self) -> None:
        if self.data is not None and self.split != "original":
            raise ValueError(f"arm data: only an arm with split: original trains on a data set's own "
                             f"solutions; this arm's split is {self.split!r}")
        if self.rationalize and not self.samples:
            raise ValueError("arm rationalize: only an arm with a sample stage (kind sft, a split other than "
                             "original) has samples to rationalize")
        if self.kind == "grpo" and (self.data is not None or self.num_examples is not None):
            raise ValueError("a grpo arm trains on the round's questions: arm data and num_examples are for sft arms")

    @property
    def samples(self) -> bool:
        """Whether the arm has a sample stage (and verify, filter): not a grpo arm, which generates
        while it trains, nor an `original` arm, which trains on a data set's solutions."""
        return self.kind == "sft" and self.split != "original"


@dataclass
class PolicyConfig:
    retrain_from: Literal["base", "last"] = "last"      # base: STaR / ReST-EM style
    data_window: Literal["round", "all"] = "round"      # this round's data only, or every round's
    questions: Literal["all", "unsolved", "band"] = "all"
    band: list[float] = field(default_factory=lambda: [0.0, 0.75])  # pass-rate band [lo, hi]
    # STaR rationalization: questions none of a round's samples solved are sampled again with the
    # answer as a hint; the traces the verifier accepts train with the hint removed (an arm's
    # `rationalize` overrides this); rationalize_samples per such question (unset: sample.num_samples)
    rationalize: bool = False
    rationalize_samples: int | None = None

    def __post_init__(self) -> None:
        if len(self.band) != 2 or not 0.0 <= self.band[0] <= self.band[1] <= 1.0:
            raise ValueError(f"policy.band must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.band}")
        if self.rationalize_samples is not None and self.rationalize_samples < 1:
            raise ValueError(f"policy.rationalize_samples must be at least 1, got {self.rationalize_samples}")


@dataclass
class EvalSample:
    """The eval's own sampler settings, never inherited from training's `sample:` (whose max_tokens,
    top_p or extra `sampling` keys, a repetition penalty say, would change what is measured)."""
    max_tokens: int = 1024
    temperature: float = 0.7        # of the sampled metrics; greedy pass@1 is always temperature 0
    top_p: float = 1.0
    stop: list[str] | None = None   # default: the student's prompt style's

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"eval.sample.max_tokens must be at least 1, got {self.max_tokens}")


@dataclass
class EvalSection:
    data: DataConfig = field(default_factory=lambda: DataConfig(split="test"))
    k: int = 0                  # the k of pass@k and maj@k in the report
    n: int | None = None        # samples per question for the sampled metrics (None: k; n >= k)
    sample: EvalSample = field(default_factory=EvalSample)

    def __post_init__(self) -> None:
        if self.n is not None and self.n < max(self.k, 1):
            raise ValueError(f"eval.n must be at least eval.k (and 1), got n={self.n}, k={self.k}")


@dataclass
class TrainSection:
    sft: dict[str, Any] = field(default_factory=dict)   # trl.SFTConfig fields
    peft: LoraSettings = field(default_factory=LoraSettings)
    use_chat_template: bool = False  # the student samples with the `chat` style and trains through its template
    truncated: Literal["drop", "no_eos"] = "drop"  # rows the sampler cut at max_tokens (an all split's)
    budget: Budget = field(default_factory=Budget)  # training compute per round (compute-matched arms)
    launcher: str = ""   # e.g. "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8"
    hub_model_id: str | None = None  # ORG/NAME: each round's merged ckpt/ to this model repo (exit_loop.hub)
    grpo: dict[str, Any] = field(default_factory=dict)  # trl.GRPOConfig fields, for grpo arms (exit_loop.train.grpo)


# What a teacher may set of the sampler's settings, each unset (None) by default: the student's
# `sample:` value then. The rest (samples per question, seeds, shards, placement) is the run's.
TEACHER_SAMPLE_KEYS = ("system_prompt", "backend", "max_tokens", "temperature", "top_p", "stop", "dtype",
                       "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "enforce_eager",
                       "sampling", "engine", "server")


def _teacher_post_init(self) -> None:
    if not self.model:
        raise ValueError("teacher.model: give the teacher's hub id or path (or teacher: null)")
    if self.server is not None and self.backend is None:
        self.backend = "server"
    self.sample_config(SampleConfig(), "")  # SampleConfig's own checks (max_tokens >= 1, ...) at load


def _teacher_sample_config(self, student: SampleConfig, student_model: str) -> SampleConfig:
    """The sampler settings for the teacher: the student's, with the teacher's own on top; its
    rows count their responses in the student's tokens (`student_model`)."""
    own = {k: getattr(self, k) for k in ("prompt_style", *TEACHER_SAMPLE_KEYS) if getattr(self, k) is not None}
    return dataclasses.replace(student, **own, model_name=self.model, trust_remote_code=self.trust_remote_code,
                               student=student_model)


def _teacher_config() -> type:
    """TeacherConfig: the model, its prompt style, and SampleConfig's TEACHER_SAMPLE_KEYS as
    optional overrides (their types and comments SampleConfig's own, so the one loader checks them
    and `--help` explains them as it does the student's: `COMMENTS_FROM`)."""
    hints = typing.get_type_hints(SampleConfig)
    overrides = [(k, hints[k] | None, field(default=None)) for k in TEACHER_SAMPLE_KEYS]
    at = TEACHER_SAMPLE_KEYS.index("sampling")  # trust_remote_code where config.yaml has always had it
    cls = dataclasses.make_dataclass("TeacherConfig", [
        ("model", str, field(default="", metadata={"comment": "the teacher's hub id or path"})),
        ("prompt_style", PromptStyle | Literal["auto"],
         field(default="auto", metadata={"comment": "auto: from the teacher's name, resolved at start"})),
        *overrides[:at],
        ("trust_remote_code", bool, field(default=False)),  # never the student's: off unless asked
        *overrides[at:],
    ], namespace={"SHORTHAND": "model", "COMMENTS_FROM": SampleConfig, "__post_init__": _teacher_post_init, "sample_config": _teacher_sample_config,
                  "__doc__": "Who samples round 0 when it is not the student, and how: its own model, prompt style "
                             "and sampler settings; a key left unset (null) takes the student's `sample:` value. "
                             "In YAML, `teacher: MODEL` is short for `teacher: {model: MODEL}`."})
    cls.__module__ = __name__
    return cls


TeacherConfig = _teacher_config()


@dataclass
class ExperimentConfig:
    experiment: str = "exit"
    runs_dir: str = "runs"
    rounds: int = 3
    student: str = ""                 # the base model every arm starts from; `{seed}` in it: each seed's own
    teacher: TeacherConfig | None = None  # round 0 samples from it when set (else from the student)
    seed: int = 0
    seeds: list[int] | None = None    # run every arm under each seed (None: `seed` alone)
    data: DataConfig = field(default_factory=DataConfig)        # training questions
    eval: EvalSection = field(default_factory=EvalSection)      # held-out questions
    sample: SampleConfig = field(default_factory=SampleConfig)  # G = sample.num_samples
    filter: FilterConfig = field(default_factory=FilterConfig)  # K = filter.max_correct_per_question
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    train: TrainSection = field(default_factory=TrainSection)
    arms: dict[str, ArmConfig] = field(default_factory=lambda: {"main": ArmConfig()})
    isolate: bool = True              # heavy stages in their own process (false: here; on CPU vLLM engine too)
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
            if name == SHARED or name.startswith("seed_") \
                    or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"arms: {name!r} is not a usable arm name")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds: give distinct seeds (or leave it unset for `seed` alone), got {self.seeds}")
        for name, arm in self.arms.items():
            budget = arm.budget or self.train.budget
            if arm.kind == "sft" and budget.generated_tokens is not None:
                raise ValueError(f"arms.{name}: budget.generated_tokens is a grpo arm's budget (an sft arm generates "
                                 "in its sample stage: sample.num_samples x the round's questions); give the grpo "
                                 "arm its own budget")
            if arm.kind == "grpo" and budget.tokens is not None:
                raise ValueError(f"arms.{name}: a grpo arm's budget is steps or generated_tokens (tokens are an sft "
                                 "arm's training tokens)")
        if self.sample.hint:
            raise ValueError("sample.hint: a run would evaluate and sample with the answers in the prompt; "
                             "policy.rationalize (or an arm's rationalize) draws hinted samples where they belong")

    @property
    def all_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]


SEED_FIELD = "{seed}"


def seed_student(student: str, seed: int) -> str:
    """The base student of one seed: `student` with `{seed}` replaced (a student per seed, e.g. the
    quickstart's, each with its own initialisation and warm start); as it is without the field."""
    return student.replace(SEED_FIELD, str(seed))


def seed_students(cfg: ExperimentConfig) -> list[str]:
    """Every seed's base student, each once."""
    return list(dict.fromkeys(seed_student(cfg.student, s) for s in cfg.all_seeds))


def training_problems(cfg: ExperimentConfig) -> list[Problem]:
    """Every question a run trains from: its data (`data`) and any arm's own gold solutions, each
    data set once (the held-out set must share no question with any of them)."""
    sets = [cfg.data]
    for arm in cfg.arms.values():
        if arm.data is not None and arm.data not in sets:
            sets.append(arm.data)
    return [p for data in sets for p in load_problems(data)]


def shard_path(directory: Path, shard: int, num_shards: int) -> Path:
    """Shard `shard` of `num_shards` in `directory`: `shard-KKKKK-of-NNNNN.jsonl`. A run keeps its
    shards in `<sample dir>/shards/`, a generation in `<output_dir>/samples/`."""
    return Path(directory) / f"shard-{shard:05d}-of-{num_shards:05d}.jsonl"


def stage_cmd(run_dir: Path, name: str, arm: str, k: int, launcher: str = "", seed: int | None = None) -> list[str]:
    """The command that runs one stage of a run in its own process (`exit-loop stage ...`);
    `seed`: which seed's run, where the experiment has several."""
    base = ["-m", "exit_loop.cli", "stage", name, str(run_dir), "--arm", arm, "--round", str(k)]
    if seed is not None:
        base += ["--seed", str(seed)]
    if launcher:
        return [*shlex.split(launcher), *base]
    return [sys.executable, *base]


class Run:
    """Where each stage of each arm and round of one seed lives. `top` is the experiment's
    directory (its config.yaml); `root` is the seed's (`top/seed_<s>/` when the experiment has
    several seeds, else `top`), and `cfg.seed` is that seed."""

    def __init__(self, cfg: ExperimentConfig, seed: int | None = None):
        seeds = cfg.all_seeds
        seed = seeds[0] if seed is None else seed
        if seed not in seeds:
            raise ConfigError(f"--seed {seed}: not a seed of this run; seeds: {', '.join(map(str, seeds))}")
        self.top_cfg = cfg  # as written to config.yaml (every seed)
        self.cfg = dataclasses.replace(cfg, seed=seed, student=seed_student(cfg.student, seed))
        self.top = Path(cfg.runs_dir) / cfg.experiment
        self.several_seeds = len(seeds) > 1
        self.root = self.top / seed_name(seed) if self.several_seeds else self.top
        self.multi = len(cfg.arms) > 1

    @classmethod
    def every_seed(cls, cfg: ExperimentConfig) -> list[Run]:
        return [cls(cfg, s) for s in cfg.all_seeds]

    def stage_cmd(self, name: str, arm: str, k: int, launcher: str = "") -> list[str]:
        return stage_cmd(self.top, name, arm, k, launcher, self.cfg.seed if self.several_seeds else None)

    def arm_dir(self, arm: str) -> Path:
        return self.root / arm if self.multi else self.root

    def round_dir(self, arm: str, k: int) -> Path:
        return self.arm_dir(arm) / round_name(k)

    def stage_dir(self, arm: str, k: int, stage: str) -> Path:
        return self.round_dir(arm, k) / stage

    def shared(self, arm: str, k: int, stage: str) -> bool:
        """Round 0's eval, sample and verify are the same for every arm: made once (its samples and
        labels shared by the arms that have a sample stage: not a grpo or an `original` arm)."""
        return self.multi and k == 0 and stage in SHARED_STAGES and (stage == "eval" or self.cfg.arms[arm].samples)

    def real_dir(self, arm: str, k: int, stage: str) -> Path:
        if self.shared(arm, k, stage):
            return self.root / SHARED / round_name(k) / stage
        return self.stage_dir(arm, k, stage)

    def sample_shard(self, arm: str, k: int, shard: int) -> Path:
        return shard_path(self.real_dir(arm, k, "sample") / "shards", shard, self.cfg.sample.num_shards)

    def done(self, arm: str, k: int, stage: str) -> bool:
        return (self.real_dir(arm, k, stage) / MANIFEST).exists()

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

    def rationalizes(self, arm: str, k: int, stage: str) -> bool:
        """Whether round k's `stage` of `arm` works with hinted samples (STaR rationalization;
        policy.rationalize, an arm's own `rationalize` over it): a shared round 0's sample stage
        draws them where any arm rationalizes, and each arm's filter takes them only where that arm
        does."""
        arms = self.cfg.arms if self.shared(arm, k, stage) else {arm: self.cfg.arms[arm]}
        return any(self.cfg.policy.rationalize if a.rationalize is None else a.rationalize for a in arms.values()
                   if a.samples)

    def policy(self, arm: str, k: int) -> str:
        """The model that round k evaluates and samples with: the base student, then each ckpt."""
        if k == 0:
            return self.cfg.student
        return str(self.stage_dir(arm, k - 1, "train") / "ckpt")

    def sampler_model(self, arm: str, k: int) -> str:
        return self.cfg.teacher.model if (k == 0 and self.cfg.teacher) else self.policy(arm, k)

    def sampler_config(self, arm: str, k: int) -> SampleConfig:
        """Round k's sampler settings: the teacher's in round 0 where one is set, else the policy's
        under `sample:`. Prompt styles are the ones `resolve_styles` fixed at the run's start. A
        teacher's server that `exit-loop slurm submit` launches is found through its address file."""
        base = dataclasses.replace(self.cfg.sample, seed=self.cfg.seed + k, round=k)
        if k == 0 and self.cfg.teacher:
            scfg = dataclasses.replace(self.cfg.teacher.sample_config(base, self.cfg.student), round=k)
            if scfg.backend == "server":  # one launched server for every seed: its address file in `top`
                scfg.server = scfg.server.launched_from(self.top)
            return scfg
        return dataclasses.replace(base, model_name=self.policy(arm, k))


def resolve_styles(cfg: ExperimentConfig) -> None:
    """Fix every prompt style once, when a run starts (written to its config.yaml, never derived
    again from a checkpoint's directory name): the student's follows how it trains (`chat` through
    its chat template, else `r1_zero`); the teacher's `auto` is chosen from the teacher's name.
    Refuses a student whose sampling and training contexts would differ."""
    chat = cfg.train.use_chat_template
    if cfg.sample.prompt_style == "auto":
        cfg.sample.prompt_style = "chat" if chat else "r1_zero"
    style = cfg.sample.prompt_style
    if style == "reasoning":
        raise ConfigError("sample.prompt_style: 'reasoning' is a teacher's style; a student samples with "
                          "'r1_zero' (a base model) or 'chat' (train.use_chat_template=true)")
    if chat != (style == "chat"):
        raise ConfigError(
            f"sample.prompt_style={style} with train.use_chat_template={str(chat).lower()}: the student "
            f"would sample in one context ({'its chat template' if style == 'chat' else 'the raw r1_zero prompt'}) "
            f"and train in another ({'its chat template' if chat else 'the raw r1_zero prompt'}); "
            "set both for the chat template, or neither")
    if cfg.teacher and cfg.teacher.prompt_style == "auto":
        cfg.teacher.prompt_style = resolve_prompt_style(cfg.teacher.model)
    if cfg.sample.backend == "server":
        raise ConfigError("sample.backend=server: the student evaluates and samples in this process (its "
                          "checkpoints change every round); a server samples a teacher: teacher.backend: server "
                          "with teacher.server.base_url")


def policy_warnings(cfg: ExperimentConfig) -> list[str]:
    """Policy combinations that run but rarely do what was meant, each with its reason."""
    out = []
    if cfg.policy.questions == "unsolved" and cfg.policy.data_window == "round" and cfg.rounds > 1:
        out.append("policy.questions=unsolved with policy.data_window=round: from round 1 on, each round "
                   "trains only on questions no earlier round solved (the hardest ones), and nothing of "
                   "the easier ones it learned before; data_window=all keeps them")
    return out


def check_config_change(run: Run, allow: bool) -> None:
    """Refuse to continue a run under another config (the slurm section, the trackers, the
    number of engine processes, sample.data_parallel, and where a server runs, sample.server and
    teacher.server, may change; `rounds` may grow), naming the keys that differ."""
    check_unchanged(run.top / "config.yaml", run.top_cfg, allow, "run was made",
                    "Use another experiment name, or --allow_config_change to continue anyway",
                    ignore=("slurm", "report_to", "sample.data_parallel", "sample.server", "teacher.server"),
                    growable=GROWABLE_KEYS)
