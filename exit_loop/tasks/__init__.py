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

import hashlib
import re

from exit_loop.errors import ConfigError
from exit_loop.tasks import gsm8k, math
from exit_loop.tasks.problem import (FAILURES, DataConfig, Problem, Verdict, count_failures, problem_index,
                                    subset)

TASKS = ("gsm8k", "math")

__all__ = ["FAILURES", "TASKS", "check_overlap", "count_failures", "DataConfig", "Problem", "Verdict", "load_problems",
           "problem_index", "question_key"]


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load, give ids, take the requested subset. Raises DataError naming file and line."""
    loader = math.load if cfg.task == "math" else gsm8k.load
    return subset(loader(cfg), cfg)


def question_key(question: str) -> str:
    """A question's hash after normalisation (case, whitespace, punctuation), so that a copy that
    differs only in spacing or case still counts as the same question."""
    text = re.sub(r"[^\w]+", " ", question.lower()).strip()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_overlap(train: list[Problem], held_out: list[Problem], allow: bool = False) -> int:
    """Refuse training questions that are also held-out questions (contamination: the eval would
    measure recall); returns how many there are (0, or the count when `allow`)."""
    keys = {question_key(p.question): p for p in train}
    both = [(keys[k], p) for p in held_out if (k := question_key(p.question)) in keys]
    if both and not allow:
        examples = "; ".join(f"{a.id} = {b.id}: {b.question[:60]!r}" for a, b in both[:3])
        raise ConfigError(f"{len(both)} of {len(held_out)} held-out questions are also training questions "
                          f"(e.g. {examples}); the held-out accuracy would measure recall. Use disjoint "
                          "data, or --allow_overlap to run anyway")
    return len(both)
