"""The offline quickstart: expert iteration visibly working on a CPU in minutes, no GPU, no hub.

    make quickstart                       # installs the CPU build, then runs the line below
    exit-loop quickstart                  # or: python -m exit_loop.pipeline.quickstart
    exit-loop quickstart rounds=2 data.num_examples=128 task.num_test=100   # a smaller run
    exit-loop quickstart --gpu            # on one GPU: a 21M-parameter student (make gpu-smoke)

From the repository root, in one process, each step skipped when its output is already there
(so running it again resumes, or just prints where the report is):

1. task: a procedurally generated arithmetic word-problem task in GSM8K's format
   (`exit_loop.tasks.arith`), seeded train/test splits written where the config's
   `data.dataset` and `eval.data.dataset` point (`data/quickstart/`).
2. student: a byte-level BPE tokenizer trained on the task's text and a random two-layer Qwen2
   model (`exit_loop.tiny_model`, in `data/quickstart/tiny_init/`), warm-started by SFT
   (`exit_loop.train`, TRL's SFTTrainer) on `warmup.num_examples` (256) gold solutions until it
   answers `warmup.target_accuracy` (60%) of 100 other training questions: it can do the task,
   unreliably. The other 1,792 training questions are expert iteration's, with no gold solution
   (only the verifier's verdict on the student's own answers). The result is the config's
   `student` (`data/quickstart/student/ckpt`; `warmup.json` beside it has the checks).
3. loop: `exit-loop run configs/quickstart.yaml` (`exit_loop.pipeline.loop`): a `filtered` arm trained
   on its correct traces and an `unfiltered` arm trained on all of them, held-out accuracy every
   round. The config sets `isolate: false` and this command keeps vLLM's engine in this process
   (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so nothing is imported or started twice.
4. compare: `exit-loop compare runs/quickstart` writes report.md, report.json and the plots;
   the last lines printed say where they are.

`--gpu`: the same on one CUDA GPU, with configs/quickstart_gpu.yaml (bf16, the HF backend's
CUDA-graph decoder or vLLM's CUDA build, runs/quickstart_gpu/, data/quickstart_gpu/) and the
student of `GPU_PRESET`: 8 layers of 512 (21M parameters), warm-started on 1,024 gold solutions (of
4,096 training questions) at learning rate 1e-3 for at most 1,500 steps. It fails at once, before anything is written, where no CUDA device is visible.

Overrides (`key=value`): `task.KEY` sets the task (`ArithTaskConfig`: num_train, num_test,
min_steps, max_steps, max_operand, max_start, max_total, seed), `tiny.KEY` the model's shape,
`warmup.KEY` the warm start (`WarmupConfig`: num_examples, target_accuracy, check_questions,
check_every, check_from, max_steps, learning_rate, batch_size); any other key goes to the
experiment config (`rounds=2`, `sample.num_samples=8`, `runs_dir=/tmp/runs`, ...).
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
from exit_loop.compare import compare
from exit_loop.config import changed_keys, load_config, to_dict
from exit_loop.console import stage_log, train_progress
from exit_loop.errors import ConfigError
from exit_loop.jsonl import write_json, write_jsonl
from exit_loop.pipeline.loop import run_loop
from exit_loop.pipeline.run import ExperimentConfig
from exit_loop.prompts import student_prompt
from exit_loop.tasks import DataConfig, load_problems
from exit_loop.tasks.arith import ArithTaskConfig, write_task
from exit_loop.tasks.gsm8k import verify_gsm8k
from exit_loop.tiny_model import create_tiny_model
from exit_loop.train import TrainConfig, train

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "configs/quickstart.yaml"
GPU_CONFIG = "configs/quickstart_gpu.yaml"
# The quickstart's own settings under --gpu (before the command line's): a student worth a GPU,
# 8 x 512 (21M parameters; head dimension 64 as always), and a warm start suited to its size: on
# the CPU quickstart's 256 gold solutions it memorised them (loss 0.12) and reached 42% of the
# check questions in 1,500 steps (bench/RESULTS.md), so it gets 1,024 of 4,096 training questions
GPU_PRESET = ("tiny.hidden_size=512", "tiny.num_layers=8", "task.num_train=4096", "warmup.num_examples=1024",
              "warmup.learning_rate=1e-3", "warmup.max_steps=1500")

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
    """The student's shape (exit_loop.tiny_model): head dimension 64, so hidden_size / 64 heads."""
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    seed: int = 0


@dataclass
class WarmupConfig:
    """The warm start: SFT (TRL's SFTTrainer) on the first `num_examples` training questions' gold
    solutions until the student answers `target_accuracy` of `check_questions` other training
    questions (greedy, checked by the verifier every `check_every` steps from `check_from` on), at
    most `max_steps` steps. How many steps a tiny model needs to learn to read the numbers varies a
    lot with the seed (350 for tiny.seed=0, 800 for tiny.seed=1 here), and expert iteration barely
    moves a student below about half right (half of its correct traces are then lucky guesses, which
    the verifier cannot tell apart), so the warm start stops at a level, not at a step count."""
    num_examples: int = 256
    target_accuracy: float = 0.6
    check_questions: int = 100
    check_every: int = 50
    check_from: int = 250
    max_steps: int = 800
    learning_rate: float = 3e-3
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"warmup.target_accuracy: expected a share in (0, 1], got {self.target_accuracy}")
        if self.check_every < 1 or self.check_questions < 1:
            raise ValueError("warmup.check_every and warmup.check_questions must be at least 1")

    def sft(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "learning_rate": self.learning_rate,
                "lr_scheduler_type": "constant", "warmup_steps": 0,
                "per_device_train_batch_size": self.batch_size, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False, "max_length": 256, "save_strategy": "no",
                "logging_steps": 50, "disable_tqdm": True, "report_to": "none"}


def greedy_accuracy(model, tokenizer, problems: list, max_new_tokens: int = 48) -> float:
    """Share of `problems` the model answers right, greedy, as the verifier labels its text."""
    import torch

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([student_prompt(p.question) for p in problems], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(verify_gsm8k(t, p.ground_truth).is_correct for t, p in zip(texts, problems)) / len(problems)


def stop_at_accuracy(cfg: WarmupConfig, problems: list, tokenizer, history: list):
    """A TrainerCallback that ends training once `greedy_accuracy` on `problems` reaches the target."""
    from transformers import TrainerCallback

    class StopAtAccuracy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if step < cfg.check_from or step % cfg.check_every:
                return
            acc = greedy_accuracy(model, tokenizer, problems)
            history.append({"step": step, "accuracy": acc})
            log.debug("quickstart: warm start step %d: %.0f%% of %d other training questions right "
                      "(target %.0f%%)", step, 100 * acc, len(problems), 100 * cfg.target_accuracy)
            if acc >= cfg.target_accuracy:
                control.should_training_stop = True

    return StopAtAccuracy()


@dataclass
class QuickstartConfig:
    # 2048 training questions: the warm start sees 256 gold solutions; expert iteration has the
    # rest to learn from, unlabelled but for what the verifier says of the student's own answers
    task: ArithTaskConfig = field(default_factory=lambda: ArithTaskConfig(num_train=2048))
    tiny: TinyConfig = field(default_factory=TinyConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)


OWN_SECTIONS = ("task", "tiny", "warmup")


@dataclass
class Paths:
    """Where the quickstart's inputs go, all read from the experiment config."""
    data_dir: Path     # train.jsonl, test.jsonl, manifest.json
    tiny_init: Path    # the random model and its tokenizer
    warmup_data: Path  # the gold rows the student is warm-started on
    student: Path      # <warm-start output dir>/ckpt: the experiment's `student`

    @classmethod
    def of(cls, exp) -> Paths:
        train, test = Path(exp.data.dataset), Path(exp.eval.data.dataset)
        if train.parent != test.parent or (train.name, test.name) != ("train.jsonl", "test.jsonl"):
            raise ConfigError(f"data.dataset ({train}) and eval.data.dataset ({test}): the quickstart "
                              "writes its task as train.jsonl and test.jsonl in one directory; name them so")
        student = Path(exp.student)
        if student.name != "ckpt":
            raise ConfigError(f"student ({student}): the quickstart writes the warm-started student to "
                              "<dir>/ckpt (exit-loop train's layout); give a path ending in /ckpt")
        return cls(train.parent, train.parent / "tiny_init", train.parent / "warmup.jsonl", student)


# --------------------------------------------------------------------------- the steps


def make_task(cfg: ArithTaskConfig, paths: Paths) -> None:
    manifest = paths.data_dir / "manifest.json"
    if manifest.exists():
        diff = changed_keys(json.loads(manifest.read_text()).get("config") or {}, cfg)
        if diff:
            raise ConfigError(f"{paths.data_dir} holds a task made with other settings (task.{', task.'.join(diff)}); "
                              "remove the directory (its student too) or point data.dataset elsewhere")
        print(f"quickstart: task data in {paths.data_dir} (already there)", flush=True)
        return
    write_task(cfg, paths.data_dir)
    print(f"quickstart: wrote {cfg.num_train} training and {cfg.num_test} test questions to "
          f"{paths.data_dir}", flush=True)


def tokenizer_texts(train_jsonl: Path) -> list[str]:
    """What the tokenizer learns from: every training question as a student prompt, with its gold
    canonical response."""
    rows = [baseline_row(p) for p in load_problems(DataConfig(dataset=str(train_jsonl), split="train"))]
    return [f"{r['prompt']} {r['response']}" for r in rows]


def make_student(cfg: QuickstartConfig, paths: Paths) -> None:
    if (paths.student.parent / "manifest.json").exists():
        print(f"quickstart: student in {paths.student} (already there)", flush=True)
        return
    done = paths.tiny_init / "quickstart.json"
    if not done.exists():
        t0 = time.monotonic()
        with stage_log(paths.tiny_init):
            create_tiny_model(paths.tiny_init, tokenizer_texts(paths.data_dir / "train.jsonl"),
                              cfg.tiny.vocab_size, cfg.tiny.hidden_size, cfg.tiny.num_layers, cfg.tiny.seed)
        write_json(done, {"tiny": to_dict(cfg.tiny)})
        print(f"quickstart: tokenizer and random model in {paths.tiny_init} "
              f"({time.monotonic() - t0:.1f}s)", flush=True)
    from transformers import AutoTokenizer

    w = cfg.warmup
    train_problems = load_problems(DataConfig(dataset=str(paths.data_dir / "train.jsonl"), split="train"))
    problems, check = train_problems[:w.num_examples], train_problems[w.num_examples:][:w.check_questions]
    if not check:
        raise ConfigError(f"warmup.num_examples ({w.num_examples}): the task has only {len(train_problems)} "
                          "training questions, none left to check the warm start on; raise task.num_train")
    write_jsonl(paths.warmup_data, (baseline_row(p) for p in problems))
    t0 = time.monotonic()
    history: list[dict[str, Any]] = []
    callback = stop_at_accuracy(w, check, AutoTokenizer.from_pretrained(paths.tiny_init), history)
    with stage_log(paths.student.parent):  # other libraries' output to <student dir>/stage.log
        train(TrainConfig(data=[str(paths.warmup_data)], model=str(paths.tiny_init),
                          output_dir=str(paths.student.parent), seed=cfg.tiny.seed, sft=w.sft()),
              [callback, train_progress()])
    reached = history[-1]["accuracy"] if history else None
    write_json(paths.student.parent / "warmup.json", {"warmup": to_dict(w), "checks": history})
    checked = f", {reached:.0%} of {len(check)} other questions right at step {history[-1]['step']}" if history else ""
    print(f"quickstart: warm-started the student on {len(problems)} gold solutions{checked} -> {paths.student} "
          f"({time.monotonic() - t0:.1f}s)", flush=True)
    if reached is None or reached < w.target_accuracy:
        log.warning("quickstart: the warm start ended at %s steps below its target (%s); expert iteration "
                    "may gain little from this student (raise warmup.max_steps or change tiny.seed)",
                    w.max_steps, reached if reached is not None else "never checked")


def run(cfg: QuickstartConfig, config_file: str | Path = DEFAULT_CONFIG,
        overrides: list[str] | tuple[str, ...] = ()) -> Path:
    """Make the task and the student if missing, run the loop, compare; returns the report's dir."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    t0 = time.monotonic()
    exp = load_config(ExperimentConfig, config_file, list(overrides))  # fails here on a bad key
    paths = Paths.of(exp)
    make_task(cfg.task, paths)
    make_student(cfg, paths)
    root = run_loop(exp)
    out = compare([root])
    print(f"quickstart: done in {time.monotonic() - t0:.0f}s", flush=True)
    print(f"quickstart: report  {out / 'report.md'}  (numbers: {out / 'report.json'})")
    print(f"quickstart: plot    {out / 'accuracy.png'}  (and {out / 'response_length.png'})")
    return out


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(the quickstart's own overrides, the experiment config's)."""
    own = [x for x in items if x.split("=", 1)[0].split(".", 1)[0] in OWN_SECTIONS]
    return own, [x for x in items if x not in own]


def resolve(argv: list[str]) -> tuple[QuickstartConfig, str, list[str], bool]:
    """The command line as (the quickstart's config, the experiment YAML, its overrides, --gpu),
    every key checked (a bad one raises ConfigError) and nothing loaded or written."""
    p = argparse.ArgumentParser(prog="exit-loop quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
