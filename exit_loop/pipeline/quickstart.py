"""The offline quickstart: expert iteration against its controls on a CPU, no GPU, no hub.

    make quickstart                       # installs the CPU build, then runs the line below
    exit-loop quickstart                  # or: python -m exit_loop.pipeline.quickstart
    exit-loop quickstart "seeds=[0]" rounds=2     # one seed, two rounds: a smaller run
    exit-loop quickstart --gpu            # on one GPU: a 21M-parameter student (make gpu-smoke)

The question it answers: does training on its own verified answers teach a student what its gold
data could not? The task (`exit_loop.tasks.arith`, GSM8K's format) counts things through chains of
verbs ("has", "buys", "gets", "sells", ...). The gold solutions that warm-start the student never
use two of the verbs (`warmup.held_out_verbs`: "gets", "sells"); expert iteration's questions and
the test set do. Whatever the student learns about them comes only from the verifier's verdict on
its own answers, and the `gold` arm, which keeps training on the gold solutions for as many steps,
shows what more gold data alone would have done.

From the repository root, in one process, each step skipped when its output is already there
(so running it again resumes, or just prints where the report is):

1. task: seeded train/test splits written where the config's `data.dataset` and
   `eval.data.dataset` point (`data/quickstart/`): `gold.jsonl` (the first 512 training
   questions without a held-out verb, with their solutions; `gold_sft.jsonl` the same as SFT
   rows), `train.jsonl` (the other 1,024: expert iteration's, no solution used) and `test.jsonl`,
   each test row grouped by whether it uses a held-out verb (`verbs`: report.md's accuracy by
   group) and by its number of operations (`steps`: report.md's accuracy by steps).
2. students, one per seed: a byte-level BPE tokenizer and a random two-layer Qwen2 initialised
   with the seed (`exit_loop.tiny_model`, `data/quickstart/seed_N/tiny_init/`), warm-started by
   SFT (`exit_loop.train`, TRL's SFTTrainer) on the gold solutions for `warmup.steps` (500)
   steps, the rate decaying to zero: the config's `student`, `{seed}` filled in.
3. loop: `exit-loop run configs/quickstart.yaml` (`exit_loop.pipeline.loop`), every seed: the
   `filtered` arm trains on its verified-correct traces, `unfiltered` on all of them, `gold` on
   the gold solutions, held-out greedy accuracy every round. The config sets `isolate: false`
   and this command keeps vLLM's engine in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).
4. compare: `exit-loop compare runs/quickstart` writes report.md (the claims over seeds, each
   with its paired test and interval), report.json and the plots; the last lines printed say
   where they are.

`--gpu`: the same on one CUDA GPU, with configs/quickstart_gpu.yaml (bf16, the HF backend's
CUDA-graph decoder or vLLM's CUDA build, runs/quickstart_gpu/, data/quickstart_gpu/) and the
student of `GPU_PRESET` (8 layers of 512, 21M parameters). It fails at once, before anything is
written, where no CUDA device is visible.

Overrides (`key=value`): `task.KEY` sets the task (`ArithTaskConfig`: num_train, num_test,
min_steps, max_steps, max_operand, max_start, max_total, seed), `tiny.KEY` the model's shape,
`warmup.KEY` the warm start (`WarmupConfig`: num_examples, held_out_verbs, steps,
learning_rate, lr_scheduler_type, warmup_steps, batch_size; `base`: a pretrained checkpoint to
warm-start instead of the tiny model, such as SmolLM2 from `exit-loop model fetch`); any other
key goes to the experiment config (`rounds=2`, `seeds=[0,1]`, `runs_dir=/tmp/runs`, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exit_loop.baseline import baseline_row
from exit_loop.command import config_parser
from exit_loop.report import compare
from exit_loop.config import changed_keys, load_config, to_dict
from exit_loop.console import say, stage_log, train_progress
from exit_loop.errors import ConfigError
from exit_loop.jsonl import read_jsonl, write_json, write_jsonl
from exit_loop.pipeline.loop import run_loop
from exit_loop.pipeline.run import SEED_FIELD, ExperimentConfig, seed_student
from exit_loop.rundir import MANIFEST
from exit_loop.tasks import DataConfig, load_problems
from exit_loop.tasks.arith import ADD_VERBS, SUB_VERBS, ArithTaskConfig, generate
from exit_loop.tiny_model import create_tiny_model
from exit_loop.train import TrainConfig, train

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/quickstart.yaml"
GPU_CONFIG = "configs/quickstart_gpu.yaml"
# The quickstart's own settings under --gpu (before the command line's): a student worth a GPU,
# 8 x 512 (21M parameters; head dimension 64 as always), warm-started on 1,024 gold solutions (a
# 21M student memorised the CPU quickstart's 256, bench/RESULTS.md) for 1,000 steps at 1e-3
# decaying to zero; 3,072 questions for expert iteration.
GPU_PRESET = ("tiny.hidden_size=512", "tiny.num_layers=8", "task.num_train=4096", "warmup.num_examples=1024",
              "warmup.learning_rate=1e-3", "warmup.steps=1000")

# Engine settings for a CPU run; set before vLLM is imported, and only where the caller has not.
ENV_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in this process: no spawn, no re-import
    "VLLM_CPU_KVCACHE_SPACE": "1",          # GiB; plenty for the tiny model
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class TinyConfig:
    """The student's shape (exit_loop.tiny_model): head dimension 64, so hidden_size / 64 heads.
    Each seed of the experiment initialises its own (the seed is the experiment's). `prompt_tokens`:
    the r1_zero prompt's fixed text is one token before and one after the question (the same
    text; most of a prompt's compute went to its 90 constant tokens)."""
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    prompt_tokens: bool = True


@dataclass
class WarmupConfig:
    """The warm start: SFT (TRL's SFTTrainer) on the gold solutions of `num_examples` training
    questions, none of which uses a verb of `held_out_verbs`, on a fixed schedule that decays to
    zero, long enough that more of the same gold training no longer helps (the `gold` arm of the
    run keeps training on exactly these rows, as the control). Every other training question is
    expert iteration's, with no gold solution: only the verifier's verdict on the student's own
    answers can teach it what a held-out verb does to the count."""
    num_examples: int = 512
    held_out_verbs: list[str] = field(default_factory=lambda: ["gets", "sells"])
    steps: int = 500
    learning_rate: float = 3e-3
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 10
    batch_size: int = 32
    # a pretrained checkpoint to warm-start instead of a random tiny model (tiny.* then unused), e.g.
    # `exit-loop model fetch smollm2-135m-instruct --out DIR`'s DIR; every seed starts from it
    base: str | None = None

    def __post_init__(self) -> None:
        if self.num_examples < 1 or self.steps < 1:
            raise ValueError("warmup.num_examples and warmup.steps must be at least 1")
        if self.base is not None and not (Path(self.base) / "config.json").is_file():
            raise ValueError(f"warmup.base ({self.base}): no checkpoint there (no config.json)")
        unknown = [v for v in self.held_out_verbs if v not in (*ADD_VERBS, *SUB_VERBS)]
        if unknown:
            raise ValueError(f"warmup.held_out_verbs: {unknown} are not verbs of the task "
                             f"({', '.join((*ADD_VERBS, *SUB_VERBS))})")

    def sft(self) -> dict[str, Any]:
        return {"max_steps": self.steps, "learning_rate": self.learning_rate,
                "lr_scheduler_type": self.lr_scheduler_type, "warmup_steps": self.warmup_steps,
                "per_device_train_batch_size": self.batch_size, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False, "max_length": 256, "save_strategy": "no",
                "logging_steps": 50, "disable_tqdm": True, "report_to": "none"}


@dataclass
class QuickstartConfig:
    # the gold solutions of `warmup.num_examples` of the training questions warm-start the student;
    # the rest are expert iteration's
    task: ArithTaskConfig = field(default_factory=lambda: ArithTaskConfig(num_train=1536))
    tiny: TinyConfig = field(default_factory=TinyConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


OWN_SECTIONS = ("task", "tiny", "warmup")


@dataclass
class Paths:
    """Where the quickstart's inputs go, all read from the experiment config."""
    data_dir: Path     # train.jsonl (expert iteration's questions), gold.jsonl, test.jsonl, manifest.json
    student: str       # the experiment's `student`: <dir>/ckpt, `{seed}` in it

    @classmethod
    def of(cls, exp) -> Paths:
        train, test = Path(exp.data.dataset), Path(exp.eval.data.dataset)
        if train.parent != test.parent or (train.name, test.name) != ("train.jsonl", "test.jsonl"):
            raise ConfigError(f"data.dataset ({train}) and eval.data.dataset ({test}): the quickstart "
                              "writes its task as train.jsonl and test.jsonl in one directory; name them so")
        if Path(exp.student).name != "ckpt":
            raise ConfigError(f"student ({exp.student}): the quickstart writes each warm-started student to "
                              "<dir>/ckpt (exit-loop train's layout); give a path ending in /ckpt")
        if len(exp.all_seeds) > 1 and SEED_FIELD not in exp.student:
            raise ConfigError(f"student ({exp.student}): every seed warm-starts its own student; put "
                              f"{SEED_FIELD} in the path (data/quickstart/seed_{SEED_FIELD}/student/ckpt)")
        paths = cls(train.parent, exp.student)
        for name, arm in exp.arms.items():
            if arm.data is not None and Path(arm.data.dataset) != paths.gold:
                raise ConfigError(f"arms.{name}.data.dataset ({arm.data.dataset}): the quickstart writes its gold "
                                  f"solutions to {paths.gold}, beside data.dataset; point the arm there")
        return paths

    @property
    def gold(self) -> Path:
        return self.data_dir / "gold.jsonl"

    @property
    def gold_sft(self) -> Path:
        """The gold solutions as SFT rows (prompt, canonical response): every seed's warm start."""
        return self.data_dir / "gold_sft.jsonl"

    def student_dir(self, seed: int) -> Path:
        """The warm start's output directory (its `ckpt/` is the seed's student)."""
        return Path(seed_student(self.student, seed)).parent

    def tiny_init(self, seed: int) -> Path:
        return self.student_dir(seed).parent / "tiny_init"


# --------------------------------------------------------------------------- the steps


GROUP_KEY = "verbs"  # the test rows' group: whether a held-out verb is in the question
STEPS_KEY = "steps"  # and their second grouping: how many operations the question chains


def steps_of(row: dict[str, str]) -> str:
    """How many operations a task row's question chains: its solution's lines before `#### N`."""
    return str(row["answer"].count("\n"))


def verb_group(question: str, held_out: list[str]) -> str:
    """`held-out verb` where the question uses one of `held_out` (no gold solution shows what
    it does), else `gold verbs`."""
    words = set(question.replace(".", " ").split())
    return "held-out verb" if words & set(held_out) else "gold verbs"


def split_task(cfg: QuickstartConfig) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(expert iteration's training questions, the gold questions, the test questions, each test
    row with its `verbs` group): the gold ones are the first `warmup.num_examples` training
    questions that use no held-out verb; expert iteration gets every other one (no gold question,
    so its accuracy on them is not recall)."""
    train, test = generate(cfg.task)
    w = cfg.warmup
    usable = [i for i, row in enumerate(train) if verb_group(row["question"], w.held_out_verbs) == "gold verbs"]
    if len(usable) < w.num_examples:
        raise ConfigError(f"warmup.num_examples ({w.num_examples}): the task has only {len(usable)} training "
                          f"questions without a held-out verb ({', '.join(w.held_out_verbs)}); raise task.num_train")
    gold = set(usable[:w.num_examples])
    test = [{**row, GROUP_KEY: verb_group(row["question"], w.held_out_verbs), STEPS_KEY: steps_of(row)} for row in test]
    return [r for i, r in enumerate(train) if i not in gold], [train[i] for i in sorted(gold)], test


def make_task(cfg: QuickstartConfig, paths: Paths) -> None:
    manifest = paths.data_dir / MANIFEST
    settings = {"task": cfg.task, "gold": {"num_examples": cfg.warmup.num_examples,
                                           "held_out_verbs": cfg.warmup.held_out_verbs}}
    if manifest.exists():
        diff = changed_keys(json.loads(manifest.read_text()).get("config") or {}, settings)
        if diff:
            raise ConfigError(f"{paths.data_dir} holds a task made with other settings ({', '.join(diff)}); "
                              "remove the directory (its students too) or point data.dataset elsewhere")
        say(f"quickstart: task data in {paths.data_dir} (already there)")
        test_file = paths.data_dir / "test.jsonl"
        test = read_jsonl(test_file)
        if any(STEPS_KEY not in row for row in test):  # made before the test rows had their steps
            write_jsonl(test_file, [{**row, STEPS_KEY: steps_of(row)} for row in test])
            say(f"quickstart: added each test question's `{STEPS_KEY}` to {test_file}")
        return
    train, gold, test = split_task(cfg)
    write_jsonl(paths.data_dir / "train.jsonl", train)
    write_jsonl(paths.gold, gold)
    gold_problems = load_problems(DataConfig(dataset=str(paths.gold), split="gold"))
    write_jsonl(paths.gold_sft, (baseline_row(p) for p in gold_problems))  # every seed's warm start
    write_jsonl(paths.data_dir / "test.jsonl", test)
    write_json(manifest, {"task": "arith", "config": to_dict(settings),
                          "counts": {"train": len(train), "gold": len(gold), "test": len(test)}})
    held = sum(row[GROUP_KEY] == "held-out verb" for row in test)
    say(f"quickstart: wrote {len(gold)} gold questions (none with {' or '.join(cfg.warmup.held_out_verbs)}), "
        f"{len(train)} questions for expert iteration and {len(test)} test questions ({held} with a "
        f"held-out verb) to {paths.data_dir}")


def tokenizer_texts(*files: Path) -> list[str]:
    """What the tokenizer learns from: every question as a student prompt, with its gold
    canonical response."""
    rows = [baseline_row(p) for f in files for p in load_problems(DataConfig(dataset=str(f), split=f.stem))]
    return [f"{r['prompt']} {r['response']}" for r in rows]


def make_student(cfg: QuickstartConfig, paths: Paths, seed: int) -> None:
    """Seed `seed`'s student: a random tiny model initialised with `seed` (or `warmup.base`),
    warm-started on the gold solutions with training seed `seed`."""
    out = paths.student_dir(seed)
    if (out / MANIFEST).exists():
        say(f"quickstart: seed {seed}: student in {out / 'ckpt'} (already there)")
        return
    init = Path(cfg.warmup.base) if cfg.warmup.base else paths.tiny_init(seed)
    done = init / "quickstart.json"
    if not cfg.warmup.base and not done.exists():
        t0 = time.monotonic()
        t = cfg.tiny
        with stage_log(init):
            create_tiny_model(init, tokenizer_texts(paths.data_dir / "train.jsonl", paths.gold),
                              t.vocab_size, t.hidden_size, t.num_layers, seed, prompt_tokens=t.prompt_tokens)
        write_json(done, {"tiny": to_dict(t), "seed": seed})
        say(f"quickstart: seed {seed}: tokenizer and random model in {init} ({time.monotonic() - t0:.1f}s)")
    w = cfg.warmup
    t0 = time.monotonic()
    with stage_log(out):  # other libraries' output to <student dir>/stage.log
        train(TrainConfig(data=[str(paths.gold_sft)], model=str(init), output_dir=str(out), seed=seed, sft=w.sft()),
              [train_progress()])
    say(f"quickstart: seed {seed}: warm-started the student on {w.num_examples} gold solutions, {w.steps} "
        f"steps -> {out / 'ckpt'} ({time.monotonic() - t0:.1f}s)")


def run(cfg: QuickstartConfig, config_file: str | Path = DEFAULT_CONFIG,
        overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Make the task and the student if missing, run the loop, compare; returns the report's dir."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    t0 = time.monotonic()
    exp = load_config(ExperimentConfig, config_file, list(overrides))  # fails here on a bad key
    paths = Paths.of(exp)
    make_task(cfg, paths)
    for seed in exp.all_seeds:
        make_student(cfg, paths, seed)
    root = run_loop(exp)
    out = compare([root])
    say(f"quickstart: done in {time.monotonic() - t0:.0f}s")
    say(f"quickstart: report  {out / 'report.md'}  (numbers: {out / 'report.json'})")
    say(f"quickstart: plot    {out / 'accuracy.png'}  (and {out / 'response_length.png'})")
    return out


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(the quickstart's own overrides, the experiment config's)."""
    own = [x for x in items if x.split("=", 1)[0].split(".", 1)[0] in OWN_SECTIONS]
    return own, [x for x in items if x not in own]


def resolve(argv: list[str]) -> tuple[QuickstartConfig, str, list[str], bool]:
    """The command line as (the quickstart's config, the experiment YAML, its overrides, --gpu),
    every key checked (a bad one raises ConfigError) and nothing loaded or written."""
    p = config_parser("exit-loop quickstart", __doc__, QuickstartConfig)
    p.add_argument("--config", default=None,
                   help=f"experiment YAML (default {DEFAULT_CONFIG}; with --gpu, {GPU_CONFIG})")
    p.add_argument("--gpu", action="store_true",
                   help=f"on one CUDA GPU: {GPU_CONFIG} and a bigger student ({', '.join(GPU_PRESET)})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="task.*, tiny.*, warmup.*: the quickstart's own; anything else: the experiment's")
    a = p.parse_args(argv)
    config = a.config or (GPU_CONFIG if a.gpu else DEFAULT_CONFIG)
    if not Path(config).exists():
        raise ConfigError(f"{config}: no such config; run the quickstart from the repository root "
                          "or give --config")
    own, exp_overrides = split_overrides(a.overrides)
    cfg = load_config(QuickstartConfig, None, [*(GPU_PRESET if a.gpu else ()), *own])
    Paths.of(load_config(ExperimentConfig, config, exp_overrides))  # a bad key or path fails here
    return cfg, config, exp_overrides, a.gpu


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--gpu: no CUDA device is visible here (torch.cuda.is_available() is False); "
                          "run `exit-loop quickstart` without --gpu for the CPU quickstart")


def command(argv: list[str]) -> int:
    cfg, config, exp_overrides, gpu = resolve(argv)
    if gpu:
        require_gpu()
    run(cfg, config, exp_overrides)
    return 0


if __name__ == "__main__":
    from exit_loop.cli import main

    sys.exit(main(["quickstart", *sys.argv[1:]]))
