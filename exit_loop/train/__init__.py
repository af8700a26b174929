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

The package: `config` (TrainConfig, LoraSettings, the SFT defaults and the trl.SFTConfig built from
them), `data` (the splits read, the rules, the subset, the tokenising), `trainer` (the SFTTrainer
built and its prepared data checked), `checkpoint` (the resume point, the LoRA merge, the saved
`ckpt/`), `attention` (the varlen attention packed batches use on a GPU) and `core` (`train`,
`command`). `python -m exit_loop.train` is `exit-loop train`.
"""

from exit_loop.train.checkpoint import last_complete_checkpoint, merge_adapter
from exit_loop.train.config import (LORA_LEARNING_RATE, SFT_DEFAULTS, LoraSettings, TrainConfig, gpu_sft_defaults,
                                    sft_config, sft_kwargs)
from exit_loop.train.core import command, train
from exit_loop.train.data import apply_rules, prompt_and_completion, read_splits, subsample, tokenize_rows
from exit_loop.train.trainer import budget_steps, build_trainer, check_prepared, eos_id_of

__all__ = ["LORA_LEARNING_RATE", "SFT_DEFAULTS", "LoraSettings", "TrainConfig", "apply_rules", "budget_steps",
           "build_trainer", "check_prepared", "command", "eos_id_of", "gpu_sft_defaults", "last_complete_checkpoint",
           "merge_adapter", "prompt_and_completion", "read_splits", "sft_config", "sft_kwargs", "subsample",
           "tokenize_rows", "train"]
