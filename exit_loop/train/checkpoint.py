"""The SFT stage's checkpoints: the resume point (`last_complete_checkpoint`: TRL's newest whole
checkpoint in `trainer/`), and the output `ckpt/` (`save`: full safetensors, the tokenizer and a
generation config whose EOS is the one trained; a LoRA adapter merged into the base first,
`merge_adapter`).

    resume = last_complete_checkpoint(Path(out) / "trainer")
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from exit_loop.train.config import TrainConfig

log = logging.getLogger(__name__)


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


def save(trainer, cfg: TrainConfig, out: Path, state) -> Path:
    """Write the trained model to `out/ckpt` (returned) through `out/ckpt.tmp`, renamed when whole.
    Every process takes part in gathering the weights (FSDP, ZeRO-3); the main one writes. LoRA:
    the adapter goes to `out/adapter` and `ckpt/` is the base with it merged in."""
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
    ckpt = out / "ckpt"
    if state.is_main_process:
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError(f"no safetensors written to {tmp}: under DeepSpeed ZeRO-3 set "
                               "zero3_save_16bit_model: true (configs/accelerate/zero3.yaml does)")
        (tmp / "training_args.bin").unlink(missing_ok=True)
        trainer.processing_class.save_pretrained(tmp)
        _generation_config(cfg.model, trainer.processing_class, cfg.trust_remote_code).save_pretrained(tmp)
        if ckpt.exists():
            shutil.rmtree(ckpt)
        os.replace(tmp, ckpt)
    return ckpt
