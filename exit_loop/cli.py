"""The `exit-loop` command: one subcommand per stage.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100
    exit-loop verify --input samples.jsonl --output verified.jsonl
    exit-loop filter --input verified.jsonl --output_dir data/gsm8k
    exit-loop train --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B

Each subcommand lives in its stage module as `command(argv) -> int`; this file only dispatches,
so `exit-loop --help` stays fast (no torch or vLLM import).
"""

from __future__ import annotations

import importlib
import sys

from exit_loop.config import ConfigError
from exit_loop.jsonl import DataError, DiskFullError

COMMANDS = {  # name: (module, function, help)
    "generate": ("exit_loop.generate", "command", "sample with a teacher, verify, and write the two splits"),
    "merge": ("exit_loop.generate", "merge_command", "merge sharded samples, then verify and filter"),
    "verify": ("exit_loop.verify", "command", "label each row of a JSONL file against its ground truth"),
    "filter": ("exit_loop.filter", "command", "write the all and correct splits from verified rows"),
    "train": ("exit_loop.train", "command", "SFT a student on one or more splits (TRL SFTTrainer)"),
    "eval": ("exit_loop.evaluate", "command", "held-out accuracy: greedy pass@1, pass@k, maj@k"),
    "run": ("exit_loop.loop", "command", "multi-round expert iteration, with arms, resumable"),
    "quickstart": ("exit_loop.quickstart", "command", "offline demo: tiny task + student, ExIt rounds, compare report"),
    "compare": ("exit_loop.compare", "command", "report.md/json and plots across arms and runs"),
    "stage": ("exit_loop.loop", "stage_command", "run one stage of a run (used by run and SLURM jobs)"),
    "baseline-data": ("exit_loop.baseline", "command", "turn GSM8K's own solutions into prompt/response rows"),
    "slurm": ("exit_loop.slurm", "command", "submit a generation or an ExIt run to SLURM; status; GPU count"),
}


def usage() -> str:
    lines = ["usage: exit-loop COMMAND [options]  (exit-loop COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"exit-loop: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except (ConfigError, DataError, DiskFullError, FileNotFoundError) as e:
        print(f"exit-loop {name}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if type(e).__name__ != "StageFailed":
            raise
        print(f"exit-loop {name}: error: {e}; fix the cause and run the same command again to "
              "continue from this stage", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
