"""The GPU speed defaults' one micro-batch of 16 (issue 23): where the config sets neither the
batch nor the accumulation, the default 8 examples x 2 accumulated become one micro-batch of 16,
and an optimizer step is the same step: the same examples, the same gradient (TRL divides the
summed loss by the step's label tokens either way). Checked here on a CPU with the real
`SFTTrainer` (SGD at learning rate 1, so the step is minus the gradient); the speed is in
bench/RESULTS.md."""

from __future__ import annotations

import pytest

from exit_loop.prompts import canonical_response, student_prompt
from exit_loop.train import SFT_DEFAULTS, TrainConfig, sft_kwargs


def _cfg(tmp_path, **sft):
    return TrainConfig(data=["unused"], model="unused", output_dir=str(tmp_path), sft=sft)


def test_the_default_batch_is_merged_on_gpu_only_and_never_a_configured_one(tmp_path):
    bs, ga = SFT_DEFAULTS["per_device_train_batch_size"], SFT_DEFAULTS["gradient_accumulation_steps"]
    assert ga > 1
    cpu, gpu = sft_kwargs(_cfg(tmp_path), gpu=False), sft_kwargs(_cfg(tmp_path), gpu=True)
    assert (cpu["per_device_train_batch_size"], cpu["gradient_accumulation_steps"]) == (bs, ga)
    assert (gpu["per_device_train_batch_size"], gpu["gradient_accumulation_steps"]) == (bs * ga, 1)
    for sft in ({"per_device_train_batch_size": 4}, {"gradient_accumulation_steps": 4},
                {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3}):
        for gpu_on in (False, True):
            kw = sft_kwargs(_cfg(tmp_path, **sft), gpu=gpu_on)
            want = {"per_device_train_batch_size": bs, "gradient_accumulation_steps": ga, **sft}
            assert {k: kw[k] for k in want} == want, (sft, gpu_on)


@pytest.mark.engine
def test_one_micro_batch_of_16_takes_the_same_step_as_8_accumulated_twice(tmp_path, tiny_model_dir):
    from exit_loop.train import build_trainer, sft_config

    rows = [{"prompt": student_prompt(f"What is {i} plus {i % 5}?"),
             "response": canonical_response(" ".join(["add"] * (1 + i % 7)) + f" {i}+{i % 5}={i + i % 5}.",
                                            str(i + i % 5))} for i in range(16)]
    common = {"max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant",
              "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 0.0, "save_strategy": "no",
              "disable_tqdm": True, "logging_steps": 1}
    steps = {}
    for name, sft in (("merged", {}), ("accumulated", {"per_device_train_batch_size": 8,
                                                        "gradient_accumulation_steps": 2})):
        cfg = TrainConfig(data=["unused"], model=str(tiny_model_dir), output_dir=str(tmp_path / name), seed=0,
                          sft={**common, **sft})
        args = sft_config(cfg, gpu=True)  # the GPU defaults, on this CPU (padding-free, sdpa fallback)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == \
            ((16, 1) if name == "merged" else (8, 2))
        trainer = build_trainer(cfg, rows, args)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        steps[name] = {n: (p.detach() - before[n]) for n, p in trainer.model.named_parameters()}
    worst = max(((steps["merged"][n] - d).norm() / d.norm().clamp(min=1e-12)).item()
                for n, d in steps["accumulated"].items())
    assert sum(d.norm().item() for d in steps["merged"].values()) > 0  # a step was taken
    assert worst < 1e-4, f"the merged micro-batch's step differs by {worst:.2e} (relative)"
