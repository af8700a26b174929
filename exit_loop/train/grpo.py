"""The `grpo` arm's training stage: one round of TRL's `GRPOTrainer` on the round's questions, the
reward this project's verifier (1 for a verified-correct answer, 0 else), so the RL arm and the
filter can never disagree on what is correct.

    from exit_loop.train.grpo import GRPORound, train_grpo
    train_grpo(GRPORound(model=ckpt, output_dir="runs/x/rl/round_00/train", problems=questions,
                         num_generations=4, max_completion_length=64, stop=["</answer>"]))

- Prompts: the stored student prompt (`r1_zero`) as a plain string, which TRL tokenises with the
  tokenizer's own special-token policy; checked to be the ids the sampler feeds
  (`exit_loop.tokens.encode_prompt`) before anything trains, so the arm samples in the context
  every other arm samples in.
- Stopping: TRL 1.16's GRPO cannot stop on a string, so each stop string must be one token of
  the student's vocabulary and becomes a stop token of generation (refused otherwise, naming it);
  the saved checkpoint's generation config is the base's, as the SFT stage writes it.
- Reward (`VerifierReward`): each completion normalised to the canonical response as the sampler
  stores one (`prompts.normalise_response`), labelled by `verify_rows` with the run's task (the
  filter's function), `finish_reason` "length" where it ran to `max_completion_length`. Every
  completion is appended to `rollouts.jsonl` with its verdict and reward: GRPO's samples, kept
  as the sample stage keeps an ExIt arm's.
- Budget: `budget_steps` (optimizer steps) or `budget_generated_tokens` (training stops at the end
  of the step in which the completions' tokens reach it), else one pass over the questions.
- Resume: a stage killed before its manifest starts the round again (its `trainer/` and
  `rollouts.jsonl` are cleared): buffered generations are not in TRL's checkpoints.
- `grpo`: any `trl.GRPOConfig` field on top of the defaults here; an unknown key fails naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exit_loop.config import ConfigError, to_dict
from exit_loop.console import say
from exit_loop.jsonl import write_manifest
from exit_loop.prompts import normalise_response, student_prompt
from exit_loop.rundir import MANIFEST
from exit_loop.tasks import Problem
from exit_loop.tokens import encode_prompt
from exit_loop.train.checkpoint import save
from exit_loop.train.config import LoraSettings, TrainConfig
from exit_loop.train.trainer import lora_config
from exit_loop.verify import verify_rows

log = logging.getLogger(__name__)

ROLLOUTS = "rollouts.jsonl"

# Defaults under whatever `grpo` sets: TRL's loss (dapo, no KL term: beta 0), every optimizer step
# a fresh generation of per_device_train_batch_size completions (groups of num_generations).
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-5,
    "lr_scheduler_type": "constant",
    "gradient_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class GRPORound:
    model: str = ""
    output_dir: str = ""
    problems: list[Problem] = field(default_factory=list)
    task: str = "gsm8k"
    num_generations: int = 4               # G: completions per prompt (the run's sample.num_samples)
    max_completion_length: int = 1024      # the run's sample.max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    budget_steps: int | None = None
    budget_generated_tokens: int | None = None
    grpo: dict[str, Any] = field(default_factory=dict)   # trl.GRPOConfig fields
    peft: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = False


def grpo_kwargs(cfg: GRPORound) -> dict[str, Any]:
    """The keyword arguments of the round's `trl.GRPOConfig`: defaults, the run's sampling
    settings, then `cfg.grpo` on top."""
    import torch

    gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(GRPO_DEFAULTS)
    kwargs.update(use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported(), seed=cfg.seed,
                  num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
                  temperature=cfg.temperature, top_p=cfg.top_p,
                  per_device_train_batch_size=cfg.num_generations * 4, gradient_accumulation_steps=1)
    if cfg.peft.enabled:
        kwargs["learning_rate"] = 1e-4
    kwargs.update(cfg.grpo)
    kwargs["output_dir"] = str(Path(cfg.output_dir) / "trainer")
    if cfg.budget_steps is not None:
        kwargs["max_steps"] = cfg.budget_steps
    elif cfg.budget_generated_tokens is not None and "max_steps" not in cfg.grpo:
        kwargs["max_steps"] = 1 << 30  # the callback stops it
    return kwargs


def grpo_config(cfg: GRPORound):
    """Build the `trl.GRPOConfig`; an unknown or rejected `grpo` key raises ConfigError naming it."""
    from trl import GRPOConfig

    kwargs = grpo_kwargs(cfg)
    check_grpo_keys(cfg.grpo)
    try:
        return GRPOConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'train.grpo': trl.GRPOConfig rejected {cfg.grpo!r}: {e}") from None


def check_grpo_keys(grpo: dict[str, Any]) -> None:
    """Unknown `train.grpo` keys fail, with the closest GRPOConfig fields."""
    from trl import GRPOConfig

    valid = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    unknown = sorted(k for k in grpo if k not in valid)
    if unknown:
        hints = [f"'train.grpo.{k}'" + (f" (did you mean {', '.join(c)}?)" if (c := difflib.get_close_matches(k, valid, n=3))
                                        else "") for k in unknown]
        raise ConfigError(f"unknown config key(s) {', '.join(hints)}: not a trl.GRPOConfig field")


class VerifierReward:
    """GRPO's reward function: the verifier's verdict on each completion (see the module doc);
    counts the completion tokens generated and appends every completion to `path`."""

    def __init__(self, task: str, max_completion_length: int, stop_ids: set[int], path: Path):
        self.task, self.max_len, self.stop_ids, self.path = task, max_completion_length, stop_ids, path
        self.generated = 0
        self.completions = 0
        self.correct = 0
        self.__name__ = "verifier"  # TRL names the reward's metrics after it

    def rows(self, completions: list[str], completion_ids: list[list[int]], problem_id: list[str],
             ground_truth: list[str]) -> list[dict[str, Any]]:
        out = []
        for text, ids, pid, truth in zip(completions, completion_ids, problem_id, ground_truth):
            stopped = bool(ids) and ids[-1] in self.stop_ids
            out.append({"problem_id": pid, "response": normalise_response(text, "r1_zero").response,
                        "ground_truth": truth, "finish_reason": "stop" if stopped or len(ids) < self.max_len else "length",
                        "num_tokens": len(ids)})
        return out

    def __call__(self, prompts, completions, completion_ids, problem_id, ground_truth, trainer_state=None,
                 **_: Any) -> list[float]:
        labelled = list(verify_rows(self.rows(completions, completion_ids, problem_id, ground_truth), task=self.task))
        step = trainer_state.global_step if trainer_state is not None else None
        with self.path.open("a", encoding="utf-8") as f:
            for row in labelled:
                f.write(json.dumps({**row, "step": step, "reward": float(row["is_correct"])}) + "\n")
        self.generated += sum(len(ids) for ids in completion_ids)
        self.completions += len(labelled)
        self.correct += sum(bool(r["is_correct"]) for r in labelled)
        return [float(bool(r["is_correct"])) for r in labelled]


def stop_token_ids(tokenizer: Any, stop: list[str]) -> list[int]:
    """Each stop string's one token id; ConfigError for a string the vocabulary splits."""
    ids = []
    for s in stop:
        enc = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ConfigError(f"sample.stop {s!r} is {len(enc)} tokens of this student's vocabulary: TRL's GRPO "
                              "generation stops only on tokens (no stop strings), so a grpo arm needs stop strings of "
                              "one token each (or sample.stop: [] and the model's own EOS)")
        ids.append(enc[0])
    return ids


def budget_callback(reward: VerifierReward, budget: int | None):
    from transformers import TrainerCallback

    class GeneratedTokens(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if budget is not None and reward.generated >= budget:
                control.should_training_stop = True

    return GeneratedTokens()


def train_grpo(cfg: GRPORound, callbacks=None) -> Path:
    """One GRPO round (see the module doc); returns the output directory."""
    out = Path(cfg.output_dir)
    if (out / MANIFEST).exists():
        say(f"train: {out}/manifest.json exists; already done")
        return out
    if not cfg.problems:
        raise ConfigError(f"{out}: a grpo round needs questions; none were given")
    t0 = time.time()
    args = grpo_config(cfg)
    for stale in (out / "trainer", out / "ckpt.tmp"):  # a killed round starts again
        shutil.rmtree(stale, ignore_errors=True)
    (out / ROLLOUTS).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    tok = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    prompts = [student_prompt(p.question) for p in cfg.problems]
    if list(tok(text=[prompts[0]])["input_ids"][0]) != encode_prompt(tok, prompts[0]):
        raise ConfigError(f"{cfg.model}: GRPO would tokenise the prompt with another special-token policy than the "
                          "sampler (exit_loop.tokens.encode_prompt): the arm would sample in another context")
    stop_ids = stop_token_ids(tok, cfg.stop)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos = eos or [tok.eos_token_id]
    model.generation_config.eos_token_id = list(dict.fromkeys([*eos, *stop_ids]))
    reward = VerifierReward(cfg.task, cfg.max_completion_length, set(model.generation_config.eos_token_id), out / ROLLOUTS)
    dataset = Dataset.from_dict({"prompt": prompts, "problem_id": [p.id for p in cfg.problems],
                                 "ground_truth": [p.ground_truth for p in cfg.problems]})
    if "max_steps" not in cfg.grpo and cfg.budget_steps is None and cfg.budget_generated_tokens is None:
        args.max_steps = math.ceil(len(prompts) * cfg.num_generations / args.generation_batch_size)  # one pass
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          peft_config=lora_config(cfg.peft) if cfg.peft.enabled else None,
                          callbacks=[budget_callback(reward, cfg.budget_generated_tokens), *(callbacks or [])])
    trainer.train()
    state = PartialState()
    tcfg = TrainConfig(data=[str(out / ROLLOUTS)], model=cfg.model, output_dir=str(out), peft=cfg.peft,
                       trust_remote_code=cfg.trust_remote_code)  # what `save` reads: the base, LoRA, trust
    ckpt = save(trainer, tcfg, out, state)  # the base's generation config, not the stop tokens added here
    if state.is_main_process:
        st = trainer.state
        wall_s = round(time.time() - t0, 2)
        write_manifest(out, "train", {"wall_s": wall_s}, kind="grpo", model=cfg.model, checkpoint=str(ckpt),
                       questions=len(cfg.problems), steps=st.global_step, epochs=st.epoch,
                       trained_examples=reward.completions, tokens=st.num_input_tokens_seen,
                       counts={"completions": reward.completions, "correct": reward.correct,
                               "tokens_generated": reward.generated},
                       reward_mean=round(reward.correct / reward.completions, 4) if reward.completions else None,
                       budget={"steps": cfg.budget_steps, "generated_tokens": cfg.budget_generated_tokens},
                       rollouts=str(out / ROLLOUTS), stop_token_ids=stop_ids,
                       config={**to_dict(cfg), "problems": len(cfg.problems)}, grpo_args=grpo_kwargs(cfg))
        say(f"train: grpo {st.global_step} optimizer steps, {reward.completions} completions "
            f"({reward.correct} verified correct), {reward.generated} tokens generated, {wall_s:.1f}s -> {ckpt}")
    state.wait_for_everyone()
    return out
