"""Baseline SFT data from GSM8K's own worked solutions: the "Original" row of the comparison.

    exit-loop baseline-data --dataset ../shared/data/gsm8k/train.jsonl \\
        --output data/gsm8k/sft_original.jsonl

Each problem becomes one row in the format of the correct split, plus its provenance:

    {"prompt": student_prompt(question),
     "response": canonical_response(reasoning, answer),   # "... </think> <answer>72</answer>"
     "problem_id": "train-0", "ground_truth": "72"}

The reasoning is the solution without its calculator annotations (`<<48/2=24>>` is removed) and
without the final `#### N` line (`exit_loop.tasks.gsm8k.solution_reasoning`), whose answer
(thousands separators removed, as in the ground truth) goes into the answer tag.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from exit_loop.config import load_config
from exit_loop.jsonl import write_jsonl
from exit_loop.prompts import canonical_response, student_prompt
from exit_loop.tasks import DataConfig, Problem, load_problems
from exit_loop.tasks.gsm8k import solution_reasoning

DEFAULT_OUTPUT = "data/gsm8k/sft_original.jsonl"


@dataclass
class BaselineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    output: str = DEFAULT_OUTPUT


def baseline_row(problem: Problem) -> dict[str, str]:
    return {
        "prompt": student_prompt(problem.question),
        "response": canonical_response(solution_reasoning(problem.solution), problem.ground_truth),
        "problem_id": problem.id,
        "ground_truth": problem.ground_truth,
    }


def baseline_data(cfg: BaselineConfig) -> Path:
    """Write one prompt/response row per problem to `cfg.output`; return its path."""
    rows = [baseline_row(p) for p in load_problems(cfg.data)]
    return write_jsonl(cfg.output, rows)


def command(argv: list[str]) -> int:
    epilog = "overrides (key=value): data.num_examples=100 data.shuffle=true data.seed=0 data.subset=main"
    parser = argparse.ArgumentParser(prog="exit-loop baseline-data", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", metavar="ID_OR_PATH",
                        help="hub id (default openai/gsm8k) or a local GSM8K-format JSONL file")
    parser.add_argument("--split", help="split of a hub data set (default train)")
    parser.add_argument("--output", metavar="F", help=f"JSONL to write (default {DEFAULT_OUTPUT})")
    parser.add_argument("--config", metavar="F", help="YAML file with BaselineConfig keys")
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    a = parser.parse_args([x for x in argv if x not in overrides])
    values = {k: v for k, v in (("data.dataset", a.dataset), ("data.split", a.split),
                                ("output", a.output)) if v is not None}
    cfg = load_config(BaselineConfig, a.config, overrides, values=values)
    path = baseline_data(cfg)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(command(sys.argv[1:]))
