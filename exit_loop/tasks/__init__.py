"""Tasks: one file per task, each with its rows, its ground truth and its verdict.

    from exit_loop.tasks import DataConfig, load_problems
    problems = load_problems(DataConfig(dataset="../shared/data/gsm8k/train.jsonl", num_examples=100))

- `gsm8k` (`exit_loop.tasks.gsm8k`): GSM8K rows, `#### N` ground truths, exact numbers.
- `math` (`exit_loop.tasks.math`): MATH-style rows, `\\boxed{}` ground truths, math-verify in
  worker processes (`exit_loop.tasks.math_pool`).
- `arith` (`exit_loop.tasks.arith`): the quickstart's generated arithmetic task, written in
  GSM8K's format (so it loads and is checked as `gsm8k`).

`load_problems` picks the task from `DataConfig.task`, gives each problem its stable id
(`<split>-<index>`) and takes the requested subset; `exit_loop.tasks.problem` holds what the
tasks share (DataConfig, Problem, Verdict).
"""

from __future__ import annotations

from exit_loop.tasks import gsm8k, math
from exit_loop.tasks.problem import FAILURES, DataConfig, count_failures, Problem, Verdict, problem_index, subset

TASKS = ("gsm8k", "math")

__all__ = ["FAILURES", "TASKS", "count_failures", "DataConfig", "Problem", "Verdict", "load_problems", "problem_index"]


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load, give ids, take the requested subset. Raises DataError naming file and line."""
    loader = math.load if cfg.task == "math" else gsm8k.load
    return subset(loader(cfg), cfg)
