"""Tasks: one file per task, each with its rows, its ground truth and its verdict.

    from exit_loop.tasks import DataConfig, load_problems
    problems = load_problems(DataConfig(dataset="../shared/data/gsm8k/train.jsonl", num_examples=100))

- `gsm8k` (`exit_loop.tasks.gsm8k`): GSM8K rows, `#### N` ground truths, exact numbers.
- `math` (`exit_loop.tasks.math`): MATH-style rows, `\\boxed{}` ground truths, math-verify in
  worker processes (`exit_loop.tasks.math_pool`).
- `arith` (`exit_loop.tasks.arith`): the quickstart's generated arithmetic task, written in
  GSM8K's format (so it loads and is checked as `gsm8k`).

`TASK` is the table the rest of the package reads a task through (`task_of(name)`): how its rows
load, how one response and many rows are verified, which ground truths can match at all, and when
two answers are the same (maj@k).

`load_problems` picks the task from `DataConfig.task`, gives each problem its stable id
(`<split>-<index>`) and takes the requested subset; `exit_loop.tasks.problem` holds what the
tasks share (DataConfig, Problem, Verdict).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from exit_loop.errors import ConfigError
from exit_loop.tasks import gsm8k, math
from exit_loop.tasks.problem import (FAILURES, DataConfig, Problem, Verdict, count_failures, problem_index,
                                    subset)



@dataclass(frozen=True)
class Task:
    """What the package needs of a task, in one place."""
    load: Callable[[DataConfig], list[Problem]]
    # one response: (response, ground_truth, finish_reason) -> Verdict
    verify: Callable[[str, str | None, str | None], Verdict]
    # many rows, in order: (rows, workers, timeout_s) -> (row, Verdict) pairs
    verify_many: Callable[[Iterable[dict[str, Any]], int | None, float], Iterator[tuple[dict[str, Any], Verdict]]]
    truth_ok: Callable[[str], bool]     # a ground truth (stripped, non-empty) that can match at all
    truth_expected: str                 # what a bad ground truth is told it should be
    same_answer: Callable[[str, str], bool] | None  # maj@k's grouping of answers (None: the same text)


TASK = {
    "gsm8k": Task(gsm8k.load, gsm8k.verify_gsm8k, gsm8k.verify_many, lambda t: gsm8k.parse_number(t) is not None,
                  "a number", None),
    "math": Task(math.load, math.verify_math, math.verify_many, lambda t: True, "the reference answer",
                 math.same_answer),
}
TASKS = tuple(TASK)

__all__ = ["FAILURES", "TASK", "TASKS", "Task", "check_overlap", "count_failures", "DataConfig", "Problem", "Verdict",
           "load_problems", "problem_index", "question_key", "task_of"]


def task_of(name: str) -> Task:
    """The task called `name`; ValueError naming the known ones otherwise."""
    try:
        return TASK[name]
    except KeyError:
        raise ValueError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {name!r}") from None


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load, give ids, take the requested subset. Raises DataError naming file and line."""
    return subset(task_of(cfg.task).load(cfg), cfg)


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
