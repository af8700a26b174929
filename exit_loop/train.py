"""The SFT stage: fine-tune a student on one or more prompt/response splits with TRL's SFTTrainer.

    exit-loop train --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B \\
        --output_dir runs/sft_r1_correct sft.num_train_epochs=2 peft.enabled=true

Several GPUs (one process per GPU; configs for DDP, FSDP and DeepSpeed ZeRO-3 ship in
configs/accelerate/, and slurm/train_sft.sh wraps this for sbatch):

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 \\
        -m exit_loop.cli train --config configs/sft_gsm8k_r1_correct.yaml

What it does:

- Data: every row of every `--data` file needs `prompt` and `response` (the stored student
  prompt and the canonical response); the files are concatenated (accumulation across rounds),
  then `num_examples` rows are drawn at random with `seed` (data-size sweeps; all rows, with a
  warning, when there are fewer). Each row is tokenised here, not by TRL: the prompt's ids exactly
  as the sampler fed them (`exit_loop.tokens.encode_prompt`: one special-token policy), then the
  response tokenised on its own, then EOS, with a completion mask, so the loss is on the response
  and EOS only and the student trains in the context it sampled in (TRL would tokenise prompt +
  response as one string, and a byte-level BPE merges `<think>` with a following newline). A row
  longer than `max_length` tokens is dropped, not cut (a cut trace loses its answer and EOS); a
  row the sampler cut at max_tokens (the all split's `finish_reason`) is dropped too, or with
  `truncated=no_eos` trained without EOS; both are counted in the manifest (`dropped`). `train`
  checks the prepared examples before training: their labels must end in EOS.
- `use_chat_template=true` (instruct students): the prompt is the chat the sampler's `chat` style
  sends (system prompt, the question as the user turn, the generation prompt) and the completion
  `<think> {response}` and the EOS (set `sft.eos_token=<|im_end|>` where the template's end of
  turn differs from the tokenizer's EOS). The assistant turn is never rendered through the
  template, so a template that strips the reasoning (some R1 templates) cannot strip it here.
- `sft`: any `trl.SFTConfig` field, passed through on top of `SFT_DEFAULTS` (bf16 only where the
  GPU has it; a LoRA run gets learning rate 1e-4 instead of 1e-5 unless set). The SFTConfig is
  built before anything is loaded: an unknown key or a value of the wrong type fails naming it.
- LoRA (`peft.enabled=true`): the adapter is trained through peft; at the end it is merged into
  the base weights and `ckpt/` is a plain full checkpoint, so the next round's sampler (vLLM)
  loads it like any model, with no LoRA support needed in the engine and no adapter/base pairing
  to track between rounds. The adapter itself is kept in `adapter/`. Target module names are
  checked on a weightless copy of the model before training; a wrong one fails listing the names
  that exist.
- Output directory: `config.yaml` (the resolved config), `trainer/` (TRL's checkpoints: a rerun
  after a crash resumes from the last one), `ckpt/` (safetensors, tokenizer, generation config
  whose EOS is the one trained), and `manifest.json`, written last. A directory whose manifest
  exists is done: `train` returns at once. Under FSDP or ZeRO-3 the full state dict is gathered
  and only the main process writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import random
import re
import shutil
import sys
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import ConfigError, dump_yaml, load_config, to_dict
from exit_loop.console import say
from exit_loop.errors import NothingToTrain
from exit_loop.hub import check_hub, route_push, stage_checkpoint, upload
from exit_loop.jsonl import DataError, atomic_write_text, iter_jsonl, sha256_file, write_manifest
from exit_loop.prompts import question_of, teacher_prompt
from exit_loop.tokens import encode_completion, encode_prompt, without_bos

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("prompt", "response")
LORA_LEARNING_RATE = 1e-4

# Defaults for R1-style traces, under whatever `sft` sets. Long traces: a generous max_length
# (TRL's 1024 would cut the end, EOS included, off many of them); loss on the completion only;
# a small learning rate with cosine decay for full fine-tuning; checkpoints to resume from.
SFT_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 3,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "max_length": 4096,
    "completion_only_loss": True,
    "gradient_checkpointing": True,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 2,
    "report_to": "none",
}
# SFTConfig fields that TrainConfig sets from its own top-level keys.
_OWN_KEYS = ("output_dir", "seed", "trust_remote_code")


def gpu_sft_defaults() -> dict[str, Any]:
    """Speed defaults where a CUDA GPU trains, under whatever `sft` sets. They change how a step is
    computed, never what it optimises: a micro-batch is still `per_device_train_batch_size`
    examples (the CPU recipe's batch and accumulation), but TRL's padding-free collator flattens
    it into one row without padding, and each example attends only to itself through the varlen
    FlashAttention kernel in PyTorch (exit_loop.attention). Liger's fused RMSNorm/SwiGLU/RoPE
    kernels are used where `liger-kernel` is installed. No gradient checkpointing: a 1.5B
    model's activations fit; set `sft.gradient_checkpointing=true` for bigger ones. Where the
    config sets neither the batch nor the accumulation, `sft_kwargs` makes the default 8 x 2
    one micro-batch of 16 (the same examples per optimizer step; more memory: set
    `sft.per_device_train_batch_size=8 sft.gradient_accumulation_steps=2` where it runs short).

    Packing (`sft.packing=true`) stays off by default: TRL's best-fit packing makes a micro-batch
    `per_device_train_batch_size` packed rows of up to `max_length` tokens, a different (and
    varying) number of examples per optimizer step than the same config trains on a CPU.
    bench/sft_learning.py checks that these defaults learn what the plain recipe learns and
    bench/sft_throughput.py measures their speed (figures in bench/RESULTS.md)."""
    import importlib.util

    from exit_loop.attention import NAME, varlen_available

    out: dict[str, Any] = {"padding_free": True, "gradient_checkpointing": False}
    if varlen_available():
        out["model_init_kwargs"] = {"attn_implementation": NAME}
    if importlib.util.find_spec("liger_kernel") is not None:
        out["use_liger_kernel"] = True
    return out


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"  # module-name suffixes, a regex, or "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"config key 'peft.r': must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'peft.dropout': must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("config key 'peft.target_modules': empty")


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # split files: rows with `prompt` and `response`
    model: str = ""                       # hub id or path: a base model or a previous round's ckpt/
    output_dir: str | None = None         # default runs/sft/<model name>-<first split's name>
    num_examples: int | None = None       # a seeded random subset of this many rows (None: all)
    seed: int = 0                         # subsampling and training
    use_chat_template: bool = False       # instruct students: train through the chat template
    system_prompt: str | None = None      # chat template: the system message the sampler sends (None: its default)
    truncated: Literal["drop", "no_eos"] = "drop"  # rows the sampler cut at max_tokens: dropped, or trained without EOS
    dedup: bool = False                   # drop repeats of a (prompt, response) pair across the files
    max_per_question: int | None = None   # K across all the files: at most K rows per prompt (the latest files' first)
    budget_steps: int | None = None       # train exactly this many optimizer steps (sft.max_steps)
    budget_tokens: int | None = None      # train about this many tokens (prompt + response), as steps
    speed_defaults: bool = True           # on a GPU, gpu_sft_defaults() under `sft` (false: TRL's plain recipe)
    trust_remote_code: bool = False
    peft: LoraSettings = field(default_factory=LoraSettings)
    sft: dict[str, Any] = field(default_factory=dict)  # trl.SFTConfig fields, passed through

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("config key 'data': give at least one split file (--data F [F ...])")
        if not self.model:
            raise ConfigError("config key 'model': give a hub id or a checkpoint path (--model M)")
        if self.num_examples is not None and self.num_examples < 1:
            raise ConfigError(f"config key 'num_examples': must be at least 1, got {self.num_examples}")
        for key in _OWN_KEYS:
            if key in self.sft:
                raise ConfigError(f"config key 'sft.{key}': set '{key}' at the top level instead")
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / "sft" / f"{Path(self.model).name}-{Path(self.data[0]).stem}")


# --------------------------------------------------------------------------- SFTConfig


def _bf16_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _is_true(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def sft_kwargs(cfg: TrainConfig, gpu: bool | None = None) -> dict[str, Any]:
    """The keyword arguments of the run's `trl.SFTConfig`: defaults, then `cfg.sft` on top. `gpu`:
    whether the GPU speed defaults apply (None: where CUDA is available, `speed_defaults` is on and
    `sft.use_cpu` is not set)."""
    import torch

    kwargs = dict(SFT_DEFAULTS)
    kwargs["bf16"] = _bf16_available()
    if gpu is None:
        gpu = torch.cuda.is_available() and cfg.speed_defaults and not _is_true(cfg.sft.get("use_cpu", False))
    if gpu:
        kwargs.update(gpu_sft_defaults())
        if not {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(cfg.sft):
            # the default batch (8 x 2 accumulated) as one micro-batch of 16: the same examples and
            # the same loss per optimizer step (TRL normalises by the step's label tokens either
            # way), 1.6x the tokens/s on an H200 (bench/RESULTS.md); a batch or accumulation the
            # config sets is kept as it is
            kwargs["per_device_train_batch_size"] *= kwargs["gradient_accumulation_steps"]
            kwargs["gradient_accumulation_steps"] = 1
    if cfg.peft.enabled:
        kwargs["learning_rate"] = LORA_LEARNING_RATE
    init_defaults = kwargs.get("model_init_kwargs")
    kwargs.update(cfg.sft)
    if isinstance(init_defaults, dict) and isinstance(cfg.sft.get("model_init_kwargs"), dict):
        kwargs["model_init_kwargs"] = {**init_defaults, **cfg.sft["model_init_kwargs"]}
    kwargs["output_dir"] = str(Path(cfg.output_dir) / "trainer")
    kwargs["seed"] = cfg.seed
    kwargs["trust_remote_code"] = cfg.trust_remote_code
    return kwargs


NO_STRATEGY = ("save_strategy", "eval_strategy", "logging_strategy")  # fields whose choices include "no"
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _sft_value(key: str, value: Any, tp: Any) -> Any:
    """Check an `sft` value against its SFTConfig annotation (SFTConfig itself checks none). A
    string that spells a number or a boolean becomes one where the field wants it."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    kinds = {typing.get_origin(a) or a for a in args}  # dict[str, Any] -> dict
    if value is False and key in NO_STRATEGY:
        return "no"  # YAML reads `sft.save_strategy=no` as false
    if not kinds <= {bool, int, float, str, dict, list, type(None)}:
        return value  # an enum or another type that SFTConfig converts itself
    if value is None and type(None) in kinds or isinstance(value, bool) and bool in kinds:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if int in kinds and isinstance(value, int):
            return value
        if float in kinds:
            return float(value)
    if isinstance(value, str):
        text = value.strip()
        if str in kinds:
            return value
        if bool in kinds and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if int in kinds and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if float in kinds and _NUMBER.fullmatch(text):
            return float(text)
    if isinstance(value, dict) and dict in kinds or isinstance(value, list) and list in kinds:
        return value
    names = " | ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    raise ConfigError(f"config key 'sft.{key}': expected {names}, got {value!r}")


def sft_config(cfg: TrainConfig, gpu: bool | None = None):
    """Build the `trl.SFTConfig`; an unknown or bad `sft` key raises ConfigError naming it."""
    from trl import SFTConfig

    kwargs = sft_kwargs(cfg, gpu)
    valid = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    unknown = sorted(k for k in kwargs if k not in valid)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=3)
            hints.append(f"'sft.{k}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) {', '.join(hints)}: not a trl.SFTConfig field")
    annotations = typing.get_type_hints(SFTConfig)
    kwargs = {k: _sft_value(k, v, annotations[k]) for k, v in kwargs.items()}
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'sft': trl.SFTConfig rejected {cfg.sft!r}: {e}") from None


# --------------------------------------------------------------------------- data


def read_splits(paths: list[str]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """All rows of all split files, in order, as {"prompt", "response"} (and the `question` an all
    split carries); per file its path, sha256 and row count. Rows with a blank response (a trace where the model wrote nothing, kept
    in an all split) are skipped, with a warning. Raises DataError naming file and line on a bad
    or empty split."""
    rows: list[dict[str, str]] = []
    files = []
    for path in paths:
        path = Path(path)
        lines = [i for i, text in enumerate(path.open(encoding="utf-8"), 1) if text.strip()] \
            if path.exists() else []
        n = blank = 0
        for lineno, row in zip(lines, iter_jsonl(path, required=REQUIRED_KEYS)):
            if isinstance(row["response"], str) and isinstance(row["prompt"], str) \
                    and row["prompt"].strip() and not row["response"].strip():
                blank += 1  # an all split keeps traces where the model wrote nothing: no text to learn
                continue
            for key in REQUIRED_KEYS:
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{path}:{lineno}: key '{key}' must be a non-empty string, "
                                    f"got {row[key]!r}")
            kept = {"prompt": row["prompt"], "response": row["response"], "source": f"{path}:{lineno}"}
            if isinstance(row.get("question"), str) and row["question"].strip():
                kept["question"] = row["question"]  # an all split carries it: no parsing it back
            if row.get("finish_reason") == "length":
                kept["finish_reason"] = "length"    # the all split says the sampler cut it short
            if isinstance(row.get("prompt_tokens"), int):
                kept["prompt_tokens"] = row["prompt_tokens"]  # the student's own sample: its context's length
            rows.append(kept)
            n += 1
        if blank:
            # expected of an all split (it keeps traces where the model wrote nothing): a note
            log.info("train: %s: skipped %d row(s) with a blank response", path, blank)
        if n == 0 and not blank:
            raise DataError(f"{path}: empty split (no rows); a split needs rows with "
                            f"{', '.join(map(repr, REQUIRED_KEYS))}")
        files.append({"path": str(path), "sha256": sha256_file(path), "rows": n})
    if not rows:
        raise NothingToTrain(f"{', '.join(map(str, paths))}: every row has a blank response; nothing to learn")
    return rows, files


def apply_rules(rows: list[dict[str, str]], dedup: bool, k: int | None) -> tuple[list[dict[str, str]], Counter]:
    """The rows that train of all the files together: repeats of a (prompt, response) pair
    dropped (`dedup`), at most `k` rows per prompt (a question) across every file, the latest
    files' rows first (the newest policy's traces); order otherwise kept. Returns what each rule
    dropped."""
    dropped: Counter = Counter()
    if not dedup and k is None:
        return rows, dropped
    files = list(dict.fromkeys(r.get("source", "").rsplit(":", 1)[0] for r in rows))
    rank = {f: i for i, f in enumerate(reversed(files))}
    order = sorted(range(len(rows)), key=lambda i: rank[rows[i].get("source", "").rsplit(":", 1)[0]])
    seen: set[tuple[str, str]] = set()
    per_q: Counter[str] = Counter()
    keep: set[int] = set()
    for i in order:
        r = rows[i]
        if dedup and (r["prompt"], r["response"]) in seen:
            dropped["duplicate"] += 1
            continue
        if k is not None and per_q[r["prompt"]] >= k:
            dropped["over_k"] += 1
            continue
        seen.add((r["prompt"], r["response"]))
        per_q[r["prompt"]] += 1
        keep.add(i)
    return [r for i, r in enumerate(rows) if i in keep], dropped


def subsample(rows: list[dict[str, str]], n: int | None, seed: int) -> list[dict[str, str]]:
    """A seeded random `n` of `rows`, kept in their original order: all of them when n is None,
    or when the splits hold fewer than n (a warning says so; the manifest counts what was used)."""
    if n is None:
        return rows
    if n > len(rows):
        log.warning("train: num_examples=%d but the splits hold only %d rows; using all of them", n, len(rows))
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def prompt_and_completion(row: dict[str, str], cfg: TrainConfig, tokenizer: Any) -> tuple[str, str]:
    """The text the student was prompted with when it sampled, and the text it is to write: the
    stored `r1_zero` prompt and response, or, through the chat template, the chat the sampler's
    `chat` style sends and `<think> {response}`."""
    if not cfg.use_chat_template:
        return row["prompt"], row["response"]
    question = row.get("question") or question_of(row["prompt"])
    return teacher_prompt(question, "chat", tokenizer, cfg.system_prompt), f"<think> {row['response']}"


def tokenize_rows(rows: list[dict[str, str]], cfg: TrainConfig, tokenizer: Any, eos_id: int,
                  max_length: int | None) -> tuple[list[dict[str, list[int]]], Counter]:
    """Our rows as TRL's pre-tokenised rows (`input_ids`, `completion_mask`): the prompt's ids as
    the sampler fed them (`exit_loop.tokens.encode_prompt`), then the response tokenised on its
    own, then EOS. Tokenising prompt + response as one string (what TRL does with text) can merge
    the prompt's last token with the response's first (`<think>` + newline in a byte-level BPE),
    moving the boundary: the student would train on a context it never sampled in.

    Rows are dropped, not cut, and counted (the Counter's keys): `too_long` (more than
    `max_length` tokens with the EOS: a cut would train a trace with its answer and EOS cut off)
    and `truncated` (the sampler hit max_tokens, per the all split's `finish_reason`: an EOS
    would teach stopping mid-reasoning; `cfg.truncated="no_eos"` trains them without one).
    Raises DataError naming the row whose text does not survive tokenisation."""
    out: list[dict[str, list[int]]] = []
    dropped: Counter = Counter()
    for i, row in enumerate(rows):
        cut_short = row.get("finish_reason") == "length"
        if cut_short and cfg.truncated == "drop":
            dropped["truncated"] += 1
            continue
        prompt, completion = prompt_and_completion(row, cfg, tokenizer)
        p_ids = encode_prompt(tokenizer, prompt)
        c_ids = encode_completion(tokenizer, completion)
        for what, text, ids in (("prompt", prompt, without_bos(tokenizer, p_ids, prompt)), ("response", completion, c_ids)):
            back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            if back != text:
                where = row.get("source", f"row {i}")
                raise DataError(
                    f"{where}: the {what} does not survive {cfg.model}'s tokenizer (its ids decode to "
                    f"{back[:80]!r}..., not {text[:80]!r}...): the ids trained on would not be the ones sampled")
        fed = row.get("prompt_tokens")
        if fed is not None and fed != len(p_ids) and not cfg.use_chat_template:
            raise DataError(
                f"{row.get('source', f'row {i}')}: the sampler fed {fed} prompt tokens, but {cfg.model}'s "
                f"tokenizer makes {len(p_ids)} of this prompt: the student would train in a context it did "
                "not sample in (another tokenizer, or another special-token policy)")
        ids = p_ids + c_ids + ([] if cut_short else [eos_id])
        if max_length is not None and len(ids) > max_length:
            dropped["too_long"] += 1
            continue
        out.append({"input_ids": ids, "completion_mask": [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))})
    return out, dropped


# --------------------------------------------------------------------------- model checks


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


# --------------------------------------------------------------------------- saving


def _generation_config(model: str, tokenizer, trust_remote_code: bool):
    """The base model's generation config, with the trained EOS first among its stop tokens."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model)
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code))
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    gen.eos_token_id = [tokenizer.eos_token_id] + [e for e in eos if e != tokenizer.eos_token_id]
    if len(gen.eos_token_id) == 1:
        gen.eos_token_id = gen.eos_token_id[0]
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def merge_adapter(base: str, adapter_dir: Path, out: Path, trust_remote_code: bool) -> None:
    """Load the base model on CPU, merge the LoRA adapter into it, save full safetensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out)


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


# --------------------------------------------------------------------------- entry points


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

    from exit_loop.attention import NAME, register_varlen_attention

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


def last_complete_checkpoint(trainer_dir: Path) -> str | None:
    """The newest `checkpoint-N` in `trainer_dir` that the Trainer finished writing, or None.

    transformers writes a checkpoint in place and its `trainer_state.json` last, so a job killed
    while saving leaves a newer directory without one (or with half of it); `get_last_checkpoint`
    would resume from that. Such a directory is skipped, with a note, and overwritten later."""
    found = []
    for d in trainer_dir.glob("checkpoint-*"):  # none where the directory does not exist yet
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    for _, d in sorted(found, reverse=True):
        try:
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("train: %s is incomplete (no whole trainer_state.json: the job died while "
                        "saving it); resuming from an earlier checkpoint", d)
            continue
        return str(d)
    return None


def train(cfg: TrainConfig, callbacks=None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data`; return the output directory (see the module doc).
    `callbacks` (transformers `TrainerCallback`s) go to the trainer as they are."""
    out = Path(cfg.output_dir)
    if (out / "manifest.json").exists():
        say(f"train: {out}/manifest.json exists; already done")
        return out
    t0 = time.time()

    # Everything that can be wrong with the config or the data fails here, before any weights load.
    args = sft_config(cfg)
    rows, files = read_splits(cfg.data)
    rows, ruled_out = apply_rules(rows, cfg.dedup, cfg.max_per_question)
    rows = subsample(rows, cfg.num_examples, cfg.seed)
    if cfg.budget_steps is not None:
        args.max_steps = cfg.budget_steps

    from accelerate import PartialState

    state = PartialState()
    resolved = dump_yaml(cfg)
    old = out / "config.yaml"
    if old.exists() and old.read_text(encoding="utf-8") != resolved:
        raise ConfigError(f"{out} holds a run with a different config ({old}); "
                          "use another output_dir or remove it")
    if state.is_main_process:
        atomic_write_text(old, resolved)

    trainer = build_trainer(cfg, rows, args, callbacks=callbacks)
    tokenizer = trainer.processing_class
    counts = check_prepared(trainer, cfg)
    if trainer.dropped["too_long"]:
        log.warning("train: dropped %d of %d examples longer than max_length=%s tokens (not cut: a cut "
                    "trace loses its answer and EOS); raise sft.max_length to keep them",
                    trainer.dropped["too_long"], len(rows), args.max_length)
    if trainer.dropped["truncated"]:
        log.warning("train: dropped %d of %d examples the sampler cut at max_tokens (truncated=no_eos "
                    "trains them without EOS)", trainer.dropped["truncated"], len(rows))

    if cfg.budget_tokens is not None:  # tokens -> steps, from this round's prepared data
        trainer.args.max_steps = budget_steps(cfg.budget_tokens, counts, args, state.num_processes)
    trainer_dir = Path(args.output_dir)
    resume = last_complete_checkpoint(trainer_dir)
    trainer.train(resume_from_checkpoint=resume)

    # Save: every process takes part in gathering the weights (FSDP, ZeRO-3); the main one writes.
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    tmp = out / "ckpt.tmp"
    if state.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    state.wait_for_everyone()
    if cfg.peft.enabled:
        adapter_dir = out / "adapter"
        trainer.save_model(str(adapter_dir))
        if state.is_main_process:
            merge_adapter(cfg.model, adapter_dir, tmp, cfg.trust_remote_code)
    else:
        trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True
        trainer.save_model(str(tmp))
    if state.is_main_process:
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"no safetensors written to {tmp}: under DeepSpeed ZeRO-3 set "
                               "zero3_save_16bit_model: true (configs/accelerate/zero3.yaml does)")
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        _generation_config(cfg.model, tokenizer, cfg.trust_remote_code).save_pretrained(tmp)
        ckpt = out / "ckpt"
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(tmp, ckpt)
        wall_s = round(time.time() - t0, 2)
        manifest = {
            "model": cfg.model,
            "checkpoint": str(ckpt),
            "data": files,
            "examples": len(rows),                  # rows drawn from the splits
            "trained_examples": counts["trained_examples"],  # fewer if TRL dropped some (all prompt)
            "tokens": counts["tokens"],             # prompt + completion tokens, one epoch
            "loss_tokens": counts["loss_tokens"],   # completion tokens (EOS included), one epoch
            "truncated_examples": counts["truncated_examples"],
            "dropped": {"too_long": trainer.dropped["too_long"], "truncated": trainer.dropped["truncated"],
                        "duplicate": ruled_out["duplicate"], "over_k": ruled_out["over_k"]},
            "budget": {"steps": cfg.budget_steps, "tokens": cfg.budget_tokens},
            "epochs": trainer.state.epoch,
            "steps": trainer.state.global_step,
            # what one optimizer step optimised, on average (the same on CPU and GPU unless packing)
            "examples_per_step": _per_step(counts["trained_examples"], trainer.state),
            "tokens_per_step": _per_step(counts["tokens"], trainer.state),
            "batch": {"per_device": args.per_device_train_batch_size,
                      "gradient_accumulation_steps": args.gradient_accumulation_steps,
                      "packing": bool(args.packing), "padding_free": bool(args.padding_free),
                      "attention": trainer.accelerator.unwrap_model(trainer.model).config._attn_implementation},
            "trained_tokens": _last_logged(trainer.state.log_history, "num_tokens"),
            "final_loss": _last_logged(trainer.state.log_history, "loss"),
            "resumed_from": resume,
            "peft": cfg.peft.enabled,
            "num_processes": state.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "mixed_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "no",
            "versions": _versions(),
            "config": to_dict(cfg),
            "sft_args": sft_kwargs(cfg),  # SFT_DEFAULTS + cfg.sft, as passed to trl.SFTConfig
        }
        write_manifest(out, "train", {"wall_s": wall_s}, **manifest)
        runtime = _last_logged(trainer.state.log_history, "train_runtime")
        speed = f", {counts['tokens'] * (trainer.state.epoch or 0) / runtime:.0f} tokens/s" if runtime else ""
        loss = manifest["final_loss"]
        say(f"train: {trainer.state.global_step} optimizer steps, final loss "
            f"{'—' if loss is None else f'{loss:.4f}'}{speed}, {wall_s:.1f}s -> {ckpt}")
    state.wait_for_everyone()
    return out


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` words (not flags) are overrides; the rest is for argparse."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="exit-loop train",
        description="SFT a student on one or more prompt/response splits with TRL's SFTTrainer.\n"
                    "Writes OUTPUT_DIR/ckpt (a full safetensors checkpoint that vLLM loads; LoRA is\n"
                    "merged into it), OUTPUT_DIR/config.yaml and, last, OUTPUT_DIR/manifest.json.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


if __name__ == "__main__":
    sys.exit(command(sys.argv[1:]))
