"""The SFT stage's configuration: `TrainConfig` (with `LoraSettings`), the SFT defaults under
whatever `sft` sets (`SFT_DEFAULTS`, `gpu_sft_defaults`), and the `trl.SFTConfig` built from
them (`sft_kwargs`, `sft_config`), checked before anything is loaded.

    from exit_loop.train.config import TrainConfig, sft_config
    args = sft_config(TrainConfig(data=["sft_r1_correct.jsonl"], model="Qwen/Qwen2.5-Math-1.5B"))
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import ConfigError
from exit_loop.train.attention import NAME, varlen_available

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
    FlashAttention kernel in PyTorch (exit_loop.train.attention). Liger's fused RMSNorm/SwiGLU/RoPE
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
        # "<field>: ...": the loader names the key where it is (peft.r for `exit-loop train`, train.peft.r in a run)
        if self.r < 1:
            raise ValueError(f"r: must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: empty")


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
