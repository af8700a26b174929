"""Does an SFT recipe learn? The quickstart's warm start under several `sft` recipes, side by side.

    python bench/sft_learning.py --json learning.json                      # stage defaults vs plain
    python bench/sft_learning.py --variant packed:packing=true --arms stage,packed,plain

A speed default must not change what the student learns (issue 14: packed batches through the
varlen attention under bf16 trained a student that memorised its 256 examples and answered 18-29%
of other questions). Each arm, in one process, one after the other, on the same machine:

1. the quickstart's task (`exit_loop.arith_task`, 2,048 training and 200 test questions) and its
   random two-layer Qwen2 student with its tokenizer, made once and shared by every arm;
2. the quickstart's warm start (`WarmupConfig`: 256 gold solutions, learning rate 3e-3, batch 32,
   greedy accuracy on 100 other training questions every 50 steps from step 250, stop at 60%, at
   most 800 steps) through the SFT stage (`exit_loop.train.train`) with the arm's recipe;
3. the warm-started student's greedy accuracy on the 200 test questions (the quickstart's
   round-0 held-out eval), as the verifier labels its text, with its 95% Wilson interval.

Arms: `stage` (the SFT stage's defaults: on a GPU its speed defaults), `plain` (`speed_defaults:
false`: TRL's plain recipe, padded batches, SDPA), and `--variant NAME:key=value;key=value` for
`sft` overrides on top of the stage's defaults (YAML values; the key `env`, a YAML mapping, sets
environment variables for that arm alone, as in bench/sft_throughput.py). Prints a table; `--json` writes the
checks of every arm. On a CPU the stage and plain recipes are the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    import yaml

    name, _, body = text.partition(":")
    items = [kv.split("=", 1) for kv in body.split(";") if kv.strip()]
    return name, {k.strip(): yaml.safe_load(v) for k, v in items}


def make_inputs(work: Path, a: argparse.Namespace):
    """The task, the random student and the warm-start rows, once for every arm."""
    from exit_loop.tasks.arith import ArithTaskConfig, write_task
    from exit_loop.baseline import baseline_row
    from exit_loop.jsonl import write_jsonl
    from exit_loop.tasks import DataConfig, load_problems
    from exit_loop.pipeline.quickstart import QuickstartConfig, tokenizer_texts
    from exit_loop.tiny_model import create_tiny_model

    q = QuickstartConfig()
    task = ArithTaskConfig(num_train=q.task.num_train, num_test=a.test_questions, seed=a.seed)
    write_task(task, work / "task")
    create_tiny_model(work / "init", tokenizer_texts(work / "task" / "train.jsonl"), q.tiny.vocab_size,
                      q.tiny.hidden_size, q.tiny.num_layers, a.seed)
    train = load_problems(DataConfig(dataset=str(work / "task" / "train.jsonl"), split="train"))
    test = load_problems(DataConfig(dataset=str(work / "task" / "test.jsonl"), split="test"))
    w = q.warmup
    gold = write_jsonl(work / "warmup.jsonl", (baseline_row(p) for p in train[:w.num_examples]))
    return q, gold, train[w.num_examples:][:w.check_questions], test


def run_arm(name: str, sft: dict[str, Any], speed_defaults: bool, seed: int, work: Path, a, inputs) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exit_loop.pipeline.quickstart import greedy_accuracy, stop_at_accuracy
    from exit_loop.stats import wilson
    from exit_loop.train import TrainConfig, train

    q, gold, check, test = inputs
    w = q.warmup
    env = {str(k): str(v) for k, v in (sft.get("env") or {}).items()}
    sft = {k: v for k, v in sft.items() if k != "env"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tok = AutoTokenizer.from_pretrained(work / "init")
    history: list[dict[str, Any]] = []
    out = work / f"{name}-seed{seed}"
    cfg = TrainConfig(data=[str(gold)], model=str(work / "init"), output_dir=str(out), seed=seed,
                      speed_defaults=speed_defaults, sft={**w.sft(), "max_steps": a.max_steps, **sft})
    t0 = time.monotonic()
    try:
        train(cfg, [stop_at_accuracy(w, check, tok, history)])
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    wall = time.monotonic() - t0
    manifest = json.loads((out / "manifest.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt")
    if torch.cuda.is_available():
        model = model.cuda()
    acc = greedy_accuracy(model, AutoTokenizer.from_pretrained(out / "ckpt"), test)
    k = round(acc * len(test))
    reached = next((h["step"] for h in history if h["accuracy"] >= w.target_accuracy), None)
    return {"arm": name, "train_seed": seed, "sft": sft, "env": env, "speed_defaults": speed_defaults, "checks": history,
            "target_reached_at": reached, "steps": manifest["steps"],
            "examples_per_step": manifest.get("examples_per_step"),
            "tokens_per_step": manifest.get("tokens_per_step"),
            "batch": manifest.get("batch"), "sft_args": manifest.get("sft_args"),
            "heldout_correct": k, "heldout_n": len(test), "heldout_accuracy": acc,
            "heldout_ci95": wilson(k, len(test)), "final_loss": manifest.get("final_loss"),
            "wall_s": round(wall, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="stage,plain", help="comma-separated: stage, plain and variant names")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:k=v;k=v",
                   help="an arm with these sft overrides on the stage's defaults")
    p.add_argument("--seed", type=int, default=0, help="task and student seed (the quickstart's 0)")
    p.add_argument("--train_seeds", default="0", help="comma-separated training seeds, each arm under each")
    p.add_argument("--max_steps", type=int, default=800, help="the warm start's cap (the quickstart's 800)")
    p.add_argument("--test_questions", type=int, default=200, help="held-out questions (the quickstart's 200)")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--json", metavar="PATH", help="write every arm's results here")
    a = p.parse_args()
    variants = dict(parse_variant(v) for v in a.variant)
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    unknown = [x for x in arms if x not in ("stage", "plain") and x not in variants]
    if unknown:
        p.error(f"unknown arm(s) {unknown}: give them with --variant NAME:key=value")

    import torch

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="sft_learning_"))
    inputs = make_inputs(work, a)
    results = []
    for name, seed in [(n, int(s)) for s in a.train_seeds.split(",") for n in arms]:
        sft = variants.get(name, {})
        results.append(run_arm(name, sft, name != "plain", seed, work, a, inputs))
        r = results[-1]
        print(f"{name} seed {seed}: target {'at step ' + str(r['target_reached_at']) if r['target_reached_at'] else 'not reached'}"
              f" ({r['steps']} steps); held-out {r['heldout_accuracy']:.1%} "
              f"[{r['heldout_ci95'][0]:.1%}, {r['heldout_ci95'][1]:.1%}] of {r['heldout_n']}", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"\n{device}, torch {torch.__version__}, {datetime.date.today()}")
    print("| arm | seed | examples/step | tokens/step | warm start: checks (step: acc) | target | held-out [95% CI], n |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        checks = ", ".join(f"{h['step']}: {h['accuracy']:.0%}" for h in r["checks"])
        lo, hi = r["heldout_ci95"]
        print(f"| {r['arm']} | {r['train_seed']} | {r['examples_per_step']} | {r['tokens_per_step']} | {checks} | "
              f"{r['target_reached_at'] or 'no'} | {r['heldout_accuracy']:.1%} [{lo:.1%}, {hi:.1%}], "
              f"{r['heldout_n']} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                            "date": str(datetime.date.today()), "arms": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
