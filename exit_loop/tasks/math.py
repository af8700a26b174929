"""MATH: its rows, its ground truth and its verdict, in one file.

Rows (MATH, MATH-500, MATH-lighteval, from the hub with `subset`, e.g. `default` for
`HuggingFaceH4/MATH-500`, or a local JSONL file): `{"problem": ..., "solution": "...
\\boxed{\\frac{1}{2}}."}`. The ground truth is the row's `answer` when it has one, else the
content of the last `\\boxed{}` (or `\\fbox{}`) of the solution (`exit_loop.prompts.last_boxed`,
the project's one boxed parser).

The verdict (`verify_math`): MATH-style answers (LaTeX, `\\boxed{}`, fractions, intervals, sets,
expressions) through math-verify, in worker processes (`exit_loop.tasks.math_pool`), each check
under a hard limit: `timeout_s` seconds of CPU time, and 3x that of wall-clock time; a check over
either is killed and the failure is `timeout`. What needs no math-verify is decided in the parent
(`precheck`): answer text identical to the ground truth is correct; hedges and several boxed
values are `ambiguous`; two plain numbers (integers, decimals, fractions, mixed numbers,
scientific notation) are compared exactly, or within a relative 1e-9 where one is a decimal
literal (math-verify rounds to 6 decimals).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from exit_loop.errors import DataError
from exit_loop.prompts import last_boxed
from exit_loop.tasks.gsm8k import AMBIGUOUS, is_hedged, read_answer
from exit_loop.tasks.math_pool import DECIMAL_LITERAL, DEFAULT_TIMEOUT_S, REL_TOL, TIMEOUT, MathPool, shared_pool
from exit_loop.tasks.problem import DataConfig, Problem, Verdict, read_response, row_group, source_rows, verdict

_INTEGER = re.compile(r"-?\d{1,15}", re.ASCII)
# what a plain number may hold once its LaTeX is set aside: digits, signs, separators, braces
_LATEX_NUMBER = re.compile(r"\\(?:[dt]?frac|times|cdot|boxed|[!,;: %]|\$)|[$%]")
_SCALE_WORD = re.compile(r"(?<=[\d\s])(?:thousand|million|billion|trillion)(?![a-z])", re.IGNORECASE)
_ELLIPSIS = re.compile(r"\\l?dots|\\cdots|\.\.\.")
_PLAIN = re.compile(r"[\d\s.,/{}^+\-×·*eE]*\d[\d\s.,/{}^+\-×·*eE]*", re.ASCII)


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
        problems.append(Problem(f"{split}-{i}", str(row["problem"]), truth, solution, **row_group(row, cfg, where(i))))
    return problems


@dataclass(frozen=True)
class MathCheck:
    """A verdict math-verify has to decide: the answer against the gold."""
    predicted: str
    format_ok: bool
    gold: str
    finish_reason: str | None
    predicted_text: str | None = None  # what math-verify reads in place of `predicted`, if not it

    @property
    def pair(self) -> tuple[str, str]:
        """(gold, predicted) as math-verify gets them."""
        return self.gold, self.predicted_text or self.predicted


def precheck(response: str, ground_truth: str | None, finish_reason: str | None) -> Verdict | MathCheck:
    """A verdict that needs no math-verify, or the check that decides it."""
    predicted, ok, failure, truth = read_response(response, ground_truth)
    if failure is None:
        gold = truth.strip() if truth else ""
        if not gold:
            failure = "wrong"
        elif predicted == gold:
            failure = "none"
        elif is_hedged(predicted) or predicted.count("\\boxed") > 1:  # type: ignore[union-attr]
            failure = AMBIGUOUS  # "3 or 5", "about 2", two boxed values: no one answer
        elif _ELLIPSIS.search(predicted + gold):  # type: ignore[operator]
            failure = "wrong"  # "1, 3, 5, \\ldots": a pattern, not a value; only the same text counts
        else:
            value, truth_value = (_plain_number(x) for x in (predicted, gold))
            decimal = DECIMAL_LITERAL.search(predicted) is not None  # type: ignore[arg-type]
            if value is not None and truth_value is not None:
                failure = "none" if _same_number(value, truth_value, decimal or bool(DECIMAL_LITERAL.search(gold))) \
                    else "wrong"
            else:  # math-verify reads no 1.8e1 and no 2 1/2: where the answer is a plain number, give it the value
                text = _as_text(value, decimal) if value is not None else None
                return MathCheck(predicted, ok, gold, finish_reason, text)  # type: ignore[arg-type]
    return verdict(predicted, ok, failure, finish_reason)


def _same_number(a: Fraction, b: Fraction, decimal: bool) -> bool:
    """Exactly equal, or within REL_TOL of the larger where one side is a decimal literal (the
    rule math_pool applies to what math-verify parses)."""
    return a == b or decimal and abs(a - b) <= REL_TOL * max(abs(a), abs(b))


def _as_text(value: Fraction, decimal: bool) -> str:
    """`value` as math-verify reads it: a decimal literal where the answer was one (so the
    relative tolerance applies), else an exact integer or `\\frac{p}{q}`."""
    if decimal:
        if value.denominator == 1:
            return f"{value.numerator}.0"
        with localcontext() as ctx:
            ctx.prec = 60
            return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    return str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _plain_number(text: str) -> Fraction | None:
    """The exact value of an answer written as a plain number (integer, decimal, fraction, mixed
    number, scientific notation, in LaTeX or not), else None (math-verify decides). Exact, where
    math-verify rounds to 6 decimals; and it reads `2\\frac{1}{2}` as 5/2, not 1."""
    if _INTEGER.fullmatch(text):
        return Fraction(int(text))
    if not _PLAIN.fullmatch(_SCALE_WORD.sub(" ", _LATEX_NUMBER.sub(" ", text))):
        return None
    value = read_answer(text)
    return value if isinstance(value, Fraction) else None


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
    return checked(pre, (pool or shared_pool()).check(*pre.pair))


def verify_rows_math(rows: Iterable[dict[str, Any]], pool: MathPool
                     ) -> Iterator[tuple[dict[str, Any], Verdict]]:
    """(row, verdict) for each row, in order, the checks shared out over `pool`'s workers."""
    def jobs() -> Iterator[tuple[tuple[dict[str, Any], Verdict | MathCheck], tuple[str, str] | None]]:
        for row in rows:
            pre = precheck(row.get("response"), row.get("ground_truth"), row.get("finish_reason"))
            yield (row, pre), (None if isinstance(pre, Verdict) else pre.pair)

    for (row, pre), result in pool.imap(jobs()):
        yield row, pre if isinstance(pre, Verdict) else checked(pre, result)


def verify_many(rows: Iterable[dict[str, Any]], workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
                ) -> Iterator[tuple[dict[str, Any], Verdict]]:
    """(row, verdict) for each row, in order, through a pool of `workers` processes that lives as
    long as the iteration (it stops when the rows run out or the iterator is closed)."""
    with MathPool(workers, timeout_s) as pool:
        yield from verify_rows_math(rows, pool)


def same_answer(a: str, b: str) -> bool:
    """Whether math-verify (in the shared pool, under its time limit) calls two answers equal."""
    return a == b or shared_pool().check(a, b) is True
