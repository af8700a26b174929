"""The SFT stage's trainer: `build_trainer` makes the `trl.SFTTrainer` for the prepared rows
(LoRA target modules checked on a weightless copy first), `check_prepared` looks at the data as
TRL prepared it before a step is taken, `budget_steps` turns a token budget into steps.

    trainer = build_trainer(cfg, rows, sft_config(cfg))
    counts = check_prepared(trainer, cfg)
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from exit_loop.config import ConfigError
from exit_loop.errors import NothingToTrain
from exit_loop.train.attention import NAME, register_varlen_attention
from exit_loop.train.config import LoraSettings, TrainConfig, sft_config
from exit_loop.train.data import tokenize_rows


def _skeleton(model: str, trust_remote_code: bool = False):
    """`model` built on the meta device: its modules, no weights loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def check_target_modules(cfg: TrainConfig) -> None:
    """Fail (ConfigError) on a `peft.target_modules` entry that names no module of the model,
    listing the model's linear layers."""
    import torch

    targets = cfg.peft.target_modules
    if targets == "all-linear":
        return
    modules = dict(_skeleton(cfg.model, cfg.trust_remote_code).named_modules())
    if isinstance(targets, str):  # peft reads a string as a regex over full module names
        bad = [] if any(re.fullmatch(targets, n) for n in modules) else [targets]
    else:
        bad = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if bad:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"config key 'peft.target_modules': {', '.join(map(repr, bad))} matches no module of "
            f"{cfg.model}; its linear layers are: {', '.join(linear)} (or use 'all-linear')")


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, task_type="CAUSAL_LM")


def _segments(ex: dict[str, Any]) -> list[tuple[list[int], list[int]]]:
    """The (input_ids, labels) of each example in a prepared row: a packed row (`seq_lengths`)
    holds several, one after the other; an unpacked row is one."""
    ids, labels = ex["input_ids"], ex["labels"]
    out, start = [], 0
    for n in ex.get("seq_lengths") or [len(ids)]:
        out.append((ids[start:start + n], labels[start:start + n]))
        start += n
    return out


def check_prepared(trainer, cfg: TrainConfig) -> dict[str, int]:
    """Look at the data as TRL prepared it (labelled, maybe packed) before training: every
    example that was not cut at max_length (and not kept without EOS: `truncated=no_eos`) must
    end its labels with EOS. Returns counts for the manifest."""
    tok = trainer.processing_class
    eos = eos_id_of(tok, trainer.args)
    ds = trainer.train_dataset
    max_length = trainer.args.max_length
    tokens = loss_tokens = truncated = examples = 0
    for ex in ds:
        for ids, labels in _segments(ex):
            tokens += len(ids)
            loss_tokens += sum(1 for t in labels if t != -100)
            if max_length is not None and len(ids) >= max_length:
                truncated += 1
            elif labels[-1] != eos and cfg.truncated != "no_eos":
                raise RuntimeError(f"prepared example {examples} does not end its labels with EOS "
                                   f"{tok.convert_ids_to_tokens(eos)!r} (last label {labels[-1]}): the "
                                   "student would never learn to stop")
            examples += 1
    return {"tokens": tokens, "loss_tokens": loss_tokens, "truncated_examples": truncated,
            "trained_examples": examples}


# --------------------------------------------------------------------------- the trainer


def truncate_prepared(dataset, max_length: int, mode: str = "keep_start"):
    """Cut TRL-prepared rows (`input_ids`, `labels`) at `max_length` tokens and drop rows left
    with no trained token: what TRL's own preparation does, which it refuses to do for padding-free
    batches without packing (it would leave `max_length` unenforced)."""
    sl = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    dataset = dataset.map(lambda ex: {"input_ids": ex["input_ids"][sl], "labels": ex["labels"][sl]})
    return dataset.filter(lambda ex: any(t != -100 for t in ex["labels"]))


def eos_id_of(tokenizer: Any, args) -> int:
    """The id of the EOS a completion ends with: `sft.eos_token` where set, else the tokenizer's."""
    if args.eos_token is None:
        return tokenizer.eos_token_id
    if args.eos_token not in tokenizer.get_vocab():
        raise ConfigError(f"config key 'sft.eos_token': {args.eos_token!r} is not a token of the tokenizer")
    return tokenizer.convert_tokens_to_ids(args.eos_token)


def budget_steps(tokens: int, counts: dict[str, int], args, num_processes: int = 1) -> int:
    """The optimizer steps that train about `tokens` tokens: one step takes `per_device x
    accumulation x processes` examples (unpacked) or packed rows of up to max_length tokens."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
    if args.packing and args.max_length:
        tokens_per_step = per_step * args.max_length
    else:
        tokens_per_step = per_step * counts["tokens"] / max(counts["trained_examples"], 1)
    return max(1, round(tokens / tokens_per_step))


def build_trainer(cfg: TrainConfig, rows: list[dict[str, str]], args=None, dataset=None, callbacks=None):
    """The `trl.SFTTrainer` for `rows`, tokenised here (`tokenize_rows`; the counts of rows
    dropped are the trainer's `dropped` attribute), or for a `datasets.Dataset` TRL takes as it is
    (bench/sft_throughput.py passes pre-tokenised rows). `callbacks`: transformers
    `TrainerCallback`s, passed through. Padding-free batches without packing (the GPU defaults)
    are cut at `max_length` here, after TRL prepared them (none is longer when `rows` are given)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    args = args if args is not None else sft_config(cfg)
    if (args.model_init_kwargs or {}).get("attn_implementation") == NAME:
        register_varlen_attention()
    if cfg.peft.enabled:
        check_target_modules(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.use_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"use_chat_template=true but the tokenizer of {cfg.model} has no chat template")
    dropped: Counter = Counter()
    if dataset is None:
        tokenized, dropped = tokenize_rows(rows, cfg, tokenizer, eos_id_of(tokenizer, args), args.max_length)
        if not tokenized:
            raise NothingToTrain(f"no row of {', '.join(cfg.data)} is left to train on (dropped: "
                                 f"{dict(dropped)}); raise sft.max_length or set truncated=no_eos")
        dataset = Dataset.from_list(tokenized)
    cut = args.max_length if args.padding_free and not args.packing else None
    trainer = SFTTrainer(
        model=cfg.model,
        args=dataclasses.replace(args, max_length=None) if cut else args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.peft) if cfg.peft.enabled else None,
        callbacks=callbacks,
    )
    if cut:
        trainer.train_dataset = truncate_prepared(trainer.train_dataset, cut, args.truncation_mode)
        trainer.args.max_length = cut
    trainer.dropped = dropped
    return trainer
