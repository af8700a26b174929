"""MATH: its rows, its ground truth and its verdict, in one file.

Rows (MATH, MATH-500, MATH-lighteval, from the hub with `subset`, e.g. `default` for
`HuggingFaceH4/MATH-500`, or a local JSONL file): `{"problem": ..., "solution": "...
\\boxed{\\frac{1}{2}}."}`. The ground truth is the row's `answer` when it has one, else the
content of the last `\\boxed{}` (or `\\fbox{}`) of the solution (`exit_loop.prompts.last_boxed`,
the project's one boxed parser).

The verdict (`verify_math`): MATH-style answers (LaTeX, `\\boxed{}`, fractions, intervals, sets,
expressions) through math-verify, in worker processes (`exit_loop.tasks.math_pool`), each check
under a hard limit: `timeout_s` seconds of CPU time, and 3x that of wall-clock time; a check over
either is killed and the failure is `timeout`. Two shortcuts skip the workers (`precheck`): two
integers of at most 15 digits are compared as integers (as math-verify would), and answer text
identical to the ground truth is correct (math-verify agrees, unless it cannot parse the text).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from exit_loop.errors import DataError
from exit_loop.prompts import last_boxed
from exit_loop.tasks.math_pool import TIMEOUT, MathPool, shared_pool
from exit_loop.tasks.problem import DataConfig, Problem, Verdict, read_response, source_rows, verdict

_INTEGER = re.compile(r"-?\d{1,15}", re.ASCII)


def load(cfg: DataConfig) -> list[Problem]:
    """Every MATH-style problem of `cfg.dataset` (no subset taken). Raises DataError naming the
    file and line (or hub row) of a row without a problem or an answer."""
    rows, where, split = source_rows(cfg)
    problems = []
    for i, row in enumerate(rows):
        if "problem" not in row or not ("solution" in row or "answer" in row):
            hint = " (this looks like GSM8K: set data.task=gsm8k)" if "question" in row else ""
            raise DataError(f"{where(i)}: a MATH row needs 'problem' and 'solution' (or 'answer'); "
                            f"found keys {sorted(row)}{hint}")
        solution = str(row.get("solution") or "")
        answer = row.get("answer")
        truth = str(answer).strip() if answer is not None and str(answer).strip() else None
        if truth is None:
            truth = last_boxed(solution)
        if not truth:
            raise DataError(f"{where(i)}: key 'solution': no \\boxed{{...}} answer in it (and no 'answer' key)")
        problems.append(Problem(f"{split}-{i}", str(row["problem"]), truth, solution))
    return problems


@dataclass(frozen=True)
class MathCheck:
    """A verdict math-verify has to decide: the answer against the gold."""
    predicted: str
    format_ok: bool
    gold: str
    finish_reason: str | None


def precheck(response: str, ground_truth: str | None, finish_reason: str | None) -> Verdict | MathCheck:
    """A verdict that needs no math-verify, or the check that decides it."""
    predicted, ok, failure, truth = read_response(response, ground_truth)
    if failure is None:
        gold = truth.strip() if truth else ""
        if not gold:
            failure = "wrong"
        elif predicted == gold:
            failure = "none"
        elif _INTEGER.fullmatch(predicted) and _INTEGER.fullmatch(gold):  # type: ignore[arg-type]
            failure = "none" if int(predicted) == int(gold) else "wrong"  # type: ignore[arg-type]
        else:
            return MathCheck(predicted, ok, gold, finish_reason)  # type: ignore[arg-type]
    return verdict(predicted, ok, failure, finish_reason)


def checked(job: MathCheck, result: bool | str | None) -> Verdict:
    """The verdict of a check's result (True, False or TIMEOUT)."""
    failure = "timeout" if result == TIMEOUT else "none" if result is True else "wrong"
    return verdict(job.predicted, job.format_ok, failure, job.finish_reason)


def verify_math(response: str, ground_truth: str | None, finish_reason: str | None = None, *,
                pool: MathPool | None = None) -> Verdict:
    """Label one MATH-style response (math-verify under `pool`'s time limit; by default the
    process-wide `shared_pool()`). Works from any thread; never raises on a string."""
    pre = precheck(response, ground_truth, finish_reason)
    if isinstance(pre, Verdict):
        return pre
    return checked(pre, (pool or shared_pool()).check(pre.gold, pre.predicted))


def verify_rows_math(rows: Iterable[dict[str, Any]], pool: MathPool
                     ) -> Iterator[tuple[dict[str, Any], Verdict]]:
    """(row, verdict) for each row, in order, the checks shared out over `pool`'s workers."""
    def jobs() -> Iterator[tuple[tuple[dict[str, Any], Verdict | MathCheck], tuple[str, str] | None]]:
        for row in rows:
            pre = precheck(row.get("response"), row.get("ground_truth"), row.get("finish_reason"))
            yield (row, pre), (None if isinstance(pre, Verdict) else (pre.gold, pre.predicted))

    for (row, pre), result in pool.imap(jobs()):
        yield row, pre if isinstance(pre, Verdict) else checked(pre, result)
