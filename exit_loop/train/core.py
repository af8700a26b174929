"""The SFT stage's entry: `train(cfg)` reads prepare -> build -> check -> fit -> save -> manifest
(what each step does: the package doc, `exit_loop.train`), and `command`, the `exit-loop train`
command line.

    exit-loop train --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exit_loop.command import config_parser
from exit_loop.config import ConfigError, dump_yaml, load_config, to_dict
from exit_loop.console import say
from exit_loop.hub import check_hub, route_push, stage_checkpoint, upload
from exit_loop.jsonl import atomic_write_text, write_manifest
from exit_loop.rundir import MANIFEST
from exit_loop.train.checkpoint import last_complete_checkpoint, save
from exit_loop.train.config import TrainConfig, sft_config, sft_kwargs
from exit_loop.train.data import apply_rules, read_splits, subsample
from exit_loop.train.trainer import budget_steps, build_trainer, check_prepared

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What `prepare` read and checked, before any weights load."""
    args: Any                       # the run's trl.SFTConfig
    rows: list[dict[str, str]]      # the rows that train, after the rules and the subset
    files: list[dict[str, Any]]     # per split file: path, sha256, rows
    ruled_out: Counter              # rows `apply_rules` dropped, by rule


def prepare(cfg: TrainConfig) -> Prepared:
    """Everything that can be wrong with the config or the data fails here: the SFTConfig, the
    splits, the rules across them, the seeded subset."""
    args = sft_config(cfg)
    rows, files = read_splits(cfg.data)
    rows, ruled_out = apply_rules(rows, cfg.dedup, cfg.max_per_question)
    rows = subsample(rows, cfg.num_examples, cfg.seed)
    if cfg.budget_steps is not None:
        args.max_steps = cfg.budget_steps
    return Prepared(args, rows, files, ruled_out)


def keep_config(cfg: TrainConfig, out: Path, is_main_process: bool) -> None:
    """`out/config.yaml`, the resolved config; a directory holding another config is refused."""
    resolved = dump_yaml(cfg)
    old = out / "config.yaml"
    if old.exists() and old.read_text(encoding="utf-8") != resolved:
        raise ConfigError(f"{out} holds a run with a different config ({old}); "
                          "use another output_dir or remove it")
    if is_main_process:
        atomic_write_text(old, resolved)


def check(trainer, cfg: TrainConfig, data: Prepared) -> dict[str, int]:
    """`check_prepared`'s counts, and a warning for each kind of row the tokenising dropped."""
    counts = check_prepared(trainer, cfg)
    if trainer.dropped["too_long"]:
        log.warning("train: dropped %d of %d examples longer than max_length=%s tokens (not cut: a cut "
                    "trace loses its answer and EOS); raise sft.max_length to keep them",
                    trainer.dropped["too_long"], len(data.rows), data.args.max_length)
    if trainer.dropped["truncated"]:
        log.warning("train: dropped %d of %d examples the sampler cut at max_tokens (truncated=no_eos "
                    "trains them without EOS)", trainer.dropped["truncated"], len(data.rows))
    return counts


def fit(trainer, cfg: TrainConfig, data: Prepared, counts: dict[str, int], num_processes: int) -> str | None:
    """Train (a token budget becomes steps first), resuming from the last whole checkpoint in
    `trainer/`; returns that checkpoint, or None."""
    if cfg.budget_tokens is not None:  # tokens -> steps, from this round's prepared data
        trainer.args.max_steps = budget_steps(cfg.budget_tokens, counts, data.args, num_processes)
    resume = last_complete_checkpoint(Path(data.args.output_dir))
    trainer.train(resume_from_checkpoint=resume)
    return resume


def manifest_fields(cfg: TrainConfig, trainer, data: Prepared, counts: dict[str, int], ckpt: Path,
                    resume: str | None, num_processes: int) -> dict[str, Any]:
    """The train manifest's fields (`jsonl.write_manifest` adds the stage, timings and environment)."""
    args, state = data.args, trainer.state
    return {
        "model": cfg.model,
        "checkpoint": str(ckpt),
        "data": data.files,
        "examples": len(data.rows),             # rows drawn from the splits
        "trained_examples": counts["trained_examples"],  # fewer if TRL dropped some (all prompt)
        "tokens": counts["tokens"],             # prompt + completion tokens, one epoch
        "loss_tokens": counts["loss_tokens"],   # completion tokens (EOS included), one epoch
        "truncated_examples": counts["truncated_examples"],
        "dropped": {"too_long": trainer.dropped["too_long"], "truncated": trainer.dropped["truncated"],
                    "duplicate": data.ruled_out["duplicate"], "over_k": data.ruled_out["over_k"]},
        "budget": {"steps": cfg.budget_steps, "tokens": cfg.budget_tokens},
        "epochs": state.epoch,
        "steps": state.global_step,
        # what one optimizer step optimised, on average (the same on CPU and GPU unless packing)
        "examples_per_step": _per_step(counts["trained_examples"], state),
        "tokens_per_step": _per_step(counts["tokens"], state),
        "batch": {"per_device": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "packing": bool(args.packing), "padding_free": bool(args.padding_free),
                  "attention": trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation},
        "trained_tokens": _last_logged(state.log_history, "num_tokens"),
        "final_loss": _last_logged(state.log_history, "loss"),
        "resumed_from": resume,
        "peft": cfg.peft.enabled,
        "num_processes": num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
        "versions": _versions(),
        "config": to_dict(cfg),
        "sft_args": sft_kwargs(cfg),  # SFT_DEFAULTS + cfg.sft, as passed to trl.SFTConfig
    }


def train(cfg: TrainConfig, callbacks=None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; return the output directory (see the package doc).
    `callbacks` (transformers `TrainerCallback`s) go to the trainer as they are."""
    out = Path(cfg.output_dir)
    if (out / MANIFEST).exists():
        say(f"train: {out}/manifest.json exists; already done")
        return out
    t0 = time.time()
    data = prepare(cfg)

    from accelerate import PartialState

    state = PartialState()
    keep_config(cfg, out, state.is_main_process)
    trainer = build_trainer(cfg, data.rows, data.args, callbacks=callbacks)
    counts = check(trainer, cfg, data)
    resume = fit(trainer, cfg, data, counts, state.num_processes)
    ckpt = save(trainer, cfg, out, state)
    if state.is_main_process:
        wall_s = round(time.time() - t0, 2)
        fields = manifest_fields(cfg, trainer, data, counts, ckpt, resume, state.num_processes)
        write_manifest(out, "train", {"wall_s": wall_s}, **fields)
        runtime = _last_logged(trainer.state.log_history, "train_runtime")
        speed = f", {counts['tokens'] * (trainer.state.epoch or 0) / runtime:.0f} tokens/s" if runtime else ""
        loss = fields["final_loss"]
        say(f"train: {trainer.state.global_step} optimizer steps, final loss "
            f"{'—' if loss is None else f'{loss:.4f}'}{speed}, {wall_s:.1f}s -> {ckpt}")
    state.wait_for_everyone()
    return out


def _last_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(log_history):
        if key in entry:
            return entry[key]
    return None


def _per_step(count: int, state) -> float | None:
    """`count` (per epoch) times the epochs trained, over the optimizer steps taken."""
    if not state.global_step or state.epoch is None:
        return None
    return round(count * state.epoch / state.global_step, 1)


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "peft": peft.__version__}



# --------------------------------------------------------------------------- command line


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` words (not flags) are overrides; the rest is for argparse."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def command(argv: list[str]) -> int:
    parser = config_parser(
        "exit-loop train",
        "SFT a student on one or more prompt/response splits with TRL's SFTTrainer.\n"
                    "Writes OUTPUT_DIR/ckpt (a full safetensors checkpoint that vLLM loads; LoRA is\n"
                    "merged into it), OUTPUT_DIR/config.yaml and, last, OUTPUT_DIR/manifest.json.",
        TrainConfig,
        epilog="""overrides (key=value, dotted, after the flags or anywhere):
  num_examples=1000            a seeded random subset (data-size sweeps)
  use_chat_template=true       instruct students: train through the chat template
  peft.enabled=true peft.r=16 peft.alpha=32 peft.target_modules=[q_proj,v_proj]
  sft.KEY=VALUE                any trl.SFTConfig field, e.g. sft.learning_rate=2e-5
                               sft.num_train_epochs=1 sft.per_device_train_batch_size=4
                               sft.packing=true sft.max_length=8192 sft.report_to=wandb

examples:
  exit-loop train --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B
  exit-loop train --data round_00/sft_correct.jsonl round_01/sft_correct.jsonl \\
      --model runs/x/round_01/train/ckpt --output_dir runs/x/round_02/train peft.enabled=true
  accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 8 \\
      -m exit_loop.cli train --config configs/sft_gsm8k_r1_correct.yaml

A directory that holds manifest.json is done and is skipped; one with TRL checkpoints in
OUTPUT_DIR/trainer resumes from the last one.""")
    parser.add_argument("--data", nargs="+", metavar="F", help="split file(s) with prompt/response rows")
    parser.add_argument("--model", metavar="M", help="hub id or path: a base model or a previous ckpt/")
    parser.add_argument("--output_dir", metavar="D",
                        help="where to write (default runs/sft/<model name>-<first split's name>)")
    parser.add_argument("--config", metavar="F", help="YAML file with TrainConfig keys")
    parser.add_argument("--num_examples", type=int, metavar="N", help="train on a seeded random N rows")
    parser.add_argument("--seed", type=int, help="seed for subsampling and training (default 0)")
    rest, overrides = _split_overrides(argv)
    a = parser.parse_args(rest)
    values = {k: v for k, v in (("data", a.data), ("model", a.model), ("output_dir", a.output_dir),
                                ("num_examples", a.num_examples), ("seed", a.seed)) if v is not None}
    cfg = load_config(TrainConfig, a.config, overrides, values=values)
    cfg.sft, repo = route_push(cfg.sft, None)  # sft.push_to_hub: the merged ckpt/, not TRL's trainer/
    check_hub({"sft.push_to_hub": repo})
    out = train(cfg)
    if repo:
        staged = stage_checkpoint(out / "hub", out / "ckpt", cfg.model, "main")
        say(f"train: pushed the checkpoint to {upload(staged, repo, 'model', 'exit-loop train')}")
    return 0
