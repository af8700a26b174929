"""The verifier stage: label each sampled trace against its ground truth.

    exit-loop verify --input data/gsm8k/samples.jsonl --output data/gsm8k/verified.jsonl
    exit-loop verify --task math --input data/math/samples.jsonl --output data/math/verified.jsonl math_workers=2

Every input row needs `response` (the canonical response, `{reasoning} </think>
<answer>{answer}</answer>`) and `ground_truth`; `finish_reason` is read when present. Each output
row is the input row plus four keys:

- `predicted`: the text of the last complete `<answer>...</answer>` (stripped), or None;
- `format_ok`: whether the response has the canonical form (see `format_ok`);
- `is_correct`: canonical form *and* the predicted answer equals the ground truth;
- `failure`: one of FAILURES, chosen in this order: `truncated` (finish_reason "length" and not
  correct), `no_answer` (no complete, non-empty answer tag), `format`, `timeout` (math only),
  `wrong`, else `none`.

`task` picks how answers are compared:

- `gsm8k`: as exact rationals (`fractions.Fraction`) after a light, fast normalisation
  (`parse_number`); no `eval`, no sympy.
- `math`: MATH-style answers (LaTeX, `\\boxed{}`, fractions, intervals, sets, expressions) through
  math-verify, in worker processes (`exit_loop.math_pool`), each check under a hard limit:
  `math_timeout_s` seconds of CPU time, and 3x that of wall-clock time; a check over either is
  killed and the row's failure is `timeout`. The ground truth is the reference answer's LaTeX
  (for MATH, the last `\\boxed{}` of the solution). Two shortcuts skip the workers: two integers
  of at most 15 digits are compared as integers (as math-verify would), and answer text identical
  to the ground truth is correct (math-verify agrees, unless it cannot parse the text at all).

The verifier never raises on a string: any input, however long or odd, gets a verdict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import load_config
from exit_loop.jsonl import DataError, iter_jsonl_numbered, write_jsonl
from exit_loop.math_pool import DEFAULT_TIMEOUT_S, TIMEOUT, MathPool, shared_pool
from exit_loop.prompts import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE

FAILURES = ("none", "no_answer", "format", "truncated", "wrong", "timeout")
TASKS = ("gsm8k", "math")

THINK_OPEN = "<think>"
MAX_NUMBER_TEXT = 1000  # parse_number looks at the last this-many characters only
_NUMBER_CHARS = "0123456789.,"


@dataclass
class VerifyConfig:
    input: str | None = None     # JSONL in: rows with `response` and `ground_truth`
    output: str | None = None    # JSONL out: the same rows with predicted/is_correct/format_ok/failure added
    task: Literal["gsm8k", "math"] = "gsm8k"  # answer checker: GSM8K numbers, or math-verify
    math_workers: int | None = None  # math: worker processes (default: this process's CPUs, at most 8)
    math_timeout_s: float = DEFAULT_TIMEOUT_S  # math: CPU seconds per answer check (3x that of wall clock), then `timeout`

    def __post_init__(self) -> None:
        if self.math_workers is not None and self.math_workers < 1:
            raise ValueError(f"verify.math_workers: expected at least 1, got {self.math_workers}")
        if not self.math_timeout_s > 0:
            raise ValueError(f"verify.math_timeout_s: expected seconds > 0, got {self.math_timeout_s}")


@dataclass(frozen=True)
class Verdict:
    predicted: str | None   # the extracted answer text (stripped), None if no <answer> tag
    is_correct: bool
    format_ok: bool
    failure: str            # one of FAILURES


# --------------------------------------------------------------------------- answer extraction

def _last_answer_span(response: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last complete answer pair, or None.

    Pairs are matched as a left-to-right lazy scan would (`<answer>(.*?)</answer>`): a closing tag
    closes the first opening tag after the previous closing tag. Works backwards with str.rfind, so
    the common case is a couple of C-speed scans and nothing is quadratic.
    """
    end = response.rfind(ANSWER_CLOSE)
    while end >= 0:
        prev = response.rfind(ANSWER_CLOSE, 0, end)
        lo = prev + len(ANSWER_CLOSE) if prev >= 0 else 0
        start = response.find(ANSWER_OPEN, lo, end)
        if start >= 0:
            return start + len(ANSWER_OPEN), end
        end = prev  # an orphan closing tag: try the one before
    return None


def extract_answer(response: str) -> str | None:
    """Content of the last complete `<answer>...</answer>`, stripped; None if there is none."""
    if not isinstance(response, str):
        return None
    span = _last_answer_span(response)
    return None if span is None else response[span[0]:span[1]].strip()


def format_ok(response: str) -> bool:
    """True for the canonical response `{reasoning} </think> <answer>{answer}</answer>`:

    exactly one `</think>`, non-empty reasoning before it (with no `<think>`: the prompt carries
    the opening tag), exactly one space and then `<answer>`, exactly one answer pair holding a
    non-empty answer, and nothing after `</answer>` but whitespace. Whitespace before `</think>`
    and inside the answer tags is not checked.
    """
    if not isinstance(response, str):
        return False
    if response.count(THINK_CLOSE) != 1 or response.count(ANSWER_OPEN) != 1 \
            or response.count(ANSWER_CLOSE) != 1 or THINK_OPEN in response:
        return False
    reasoning, _, after = response.partition(THINK_CLOSE)
    if not reasoning.strip() or not after.startswith(" " + ANSWER_OPEN):
        return False
    answer, sep, tail = after[1 + len(ANSWER_OPEN):].partition(ANSWER_CLOSE)
    return bool(sep) and bool(answer.strip()) and not tail.strip()


# --------------------------------------------------------------------------- number parsing

_FAST = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b}, \frac34; a digit just before is kept apart (mixed number)
_FRAC = re.compile(r"(\d?)\\[dt]?frac\s*(?:\{([^{}]*)\}\s*\{([^{}]*)\}|(\d)(\d))", re.ASCII)
_LATEX_SPACE = re.compile(r"\\[!,;:> ]")                 # \! \, \; ... : remove (1\,234 -> 1234)
_LATEX_CMD = re.compile(r"\\(?:[A-Za-z]+|[()\[\]])")      # \boxed \text \left \( \] ... : a space
_DELETE = str.maketrans({c: None for c in "{}$€£¥₹%\\"})
_CURRENCY_WORD = re.compile(
    r"(?<![a-z])(?:dollars?|usd|us|euros?|eur|pounds?|gbp|rupees?|inr|rs|yen|jpy)(?![a-z])\.?",
    re.IGNORECASE | re.ASCII)
_UNIT_POWER = re.compile(r"(?<=[A-Za-z])\^\d+", re.ASCII)  # cm^2 -> cm
_MIXED = re.compile(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)", re.ASCII)
# One number: a minus only where it cannot be subtraction or a hyphen; digits with comma groups of
# exactly three ("1,234,567", never "3, 4" or "3,4"); optional decimals; an optional "/ denominator".
# A number glued to a letter, a dot or a slash ("cm2", "x/2") is not taken.
_NUMBER = re.compile(
    r"(?:(?<![A-Za-z0-9_.)/])(-)|(?<![A-Za-z0-9_./]))"
    r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(\d+(?:\.\d+)?))?",
    re.ASCII,
)


def _frac_repl(m: re.Match[str]) -> str:
    num, den = (m[2], m[3]) if m[2] is not None else (m[4], m[5])
    return (m[1] + " " if m[1] else "") + num.strip() + "/" + den.strip()


def _clean(text: str) -> str:
    s = text
    if len(s) > MAX_NUMBER_TEXT:  # only the tail matters (the last number); never half a number
        s = s[-MAX_NUMBER_TEXT:]
        if text[-MAX_NUMBER_TEXT - 1] in _NUMBER_CHARS:
            s = s.lstrip(_NUMBER_CHARS)
    s = s.replace("\u2212", "-")  # unicode minus
    if "\\" in s:
        if "frac" in s:
            s = _FRAC.sub(_frac_repl, s)
        s = _LATEX_SPACE.sub("", s)
        s = _LATEX_CMD.sub(" ", s)
    s = s.translate(_DELETE)
    if "^" in s:
        s = _UNIT_POWER.sub("", s)
    return _CURRENCY_WORD.sub(" ", s).strip()


def _ratio(num: str, den: str | None, neg: bool) -> Fraction | None:
    value = Fraction(num.replace(",", ""))
    if den is not None:
        d = Fraction(den)
        if d == 0:
            return None
        value /= d
    return -value if neg else value


def _parse(text: str) -> Fraction | None:
    s = text.strip()
    if _FAST.fullmatch(s):  # the common case: a bare integer or decimal
        return Fraction(s)
    s = _clean(s)
    m = _MIXED.fullmatch(s)
    if m:
        den = int(m[4])
        if den == 0:
            return None
        value = int(m[2]) + Fraction(int(m[3]), den)
        return -value if m[1] else value
    last = None
    for last in _NUMBER.finditer(s):
        pass
    if last is None:
        return None
    return _ratio(last[2], last[3], last[1] is not None)


_parse_short = lru_cache(maxsize=1 << 16)(_parse)


def parse_number(text: str) -> Fraction | None:
    """The numeric value of an answer or ground truth as an exact Fraction, or None.

    Strips LaTeX (`\\boxed{}`, `\\(`...`\\)`, `$`...`$`, `\\text{}`, `\\!`, `\\,`), currency signs
    and words, thousands commas (groups of three only), `%` and unit words; reads integers,
    decimals (`.5`, `0.50`), negatives (`-5`, `\u22125`), fractions (`3/4`, `\\frac{3}{4}`,
    `\\dfrac34`) and mixed numbers (`2 1/2`, `2\\frac{1}{2}`). Text that is not a bare number
    ("The answer is 18.") gives its last number. Never raises.
    """
    if not isinstance(text, str):
        return None
    try:
        return _parse_short(text) if len(text) <= 64 else _parse(text)
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. an integer past int-from-str limits
        return None


# --------------------------------------------------------------------------- verdicts

def verify_gsm8k(response: str, ground_truth: str, finish_reason: str | None = None) -> Verdict:
    """Label one GSM8K response; see the module docstring for the failure classes."""
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    predicted = extract_answer(response)
    ok = format_ok(response)
    correct = False
    if predicted is None or not predicted:
        failure = "no_answer"
    elif not ok:
        failure = "format"
    else:
        truth = parse_number(ground_truth) if isinstance(ground_truth, str) else None
        value = parse_number(predicted)
        correct = truth is not None and value is not None and value == truth
        failure = "none" if correct else "wrong"
    if not correct and finish_reason == "length":
        failure = "truncated"
    return Verdict(predicted=predicted, is_correct=correct, format_ok=ok, failure=failure)


def verify_row(row: dict[str, Any], task: str = "gsm8k") -> dict[str, Any]:
    """A new dict: `row` plus `predicted`, `is_correct`, `format_ok` and `failure`.

    With `task="math"` the check runs in the process-wide math pool (`shared_pool`); to verify
    many rows use `verify_rows`, which batches them through a pool of its own."""
    response = row.get("response")
    truth = row.get("ground_truth")
    response = "" if response is None else str(response)
    truth = None if truth is None else str(truth)
    if task == "gsm8k":
        v = verify_gsm8k(response, truth, row.get("finish_reason"))  # type: ignore[arg-type]
    elif task == "math":
        v = verify_math(response, truth, row.get("finish_reason"))
    else:
        raise ValueError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return _labelled(row, v)


def _labelled(row: dict[str, Any], v: Verdict) -> dict[str, Any]:
    return {**row, "predicted": v.predicted, "is_correct": v.is_correct,
            "format_ok": v.format_ok, "failure": v.failure}


def verify_rows(rows: Iterable[dict[str, Any]], task: str = "gsm8k", *,
                math_workers: int | None = None,
                math_timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """Label rows lazily, in order. `task="math"` runs a pool of `math_workers` processes for
    as long as the iteration lasts (it stops when the rows run out or the iterator is closed)."""
    if task == "gsm8k":
        for row in rows:
            yield verify_row(row)
    elif task == "math":
        with MathPool(math_workers, math_timeout_s) as pool:
            yield from _verify_rows_math(rows, pool)
    else:
        raise ValueError(f"task: expected one of {', '.join(map(repr, TASKS))}, got {task!r}")


# --------------------------------------------------------------------------- MATH (math-verify)

_INTEGER = re.compile(r"-?\d{1,15}", re.ASCII)


@dataclass(frozen=True)
class _MathJob:
    predicted: str
    format_ok: bool
    gold: str
    finish_reason: str | None


def _math_precheck(response: str, ground_truth: str | None,
                   finish_reason: str | None) -> Verdict | _MathJob:
    """A verdict that needs no math-verify, or the check that decides it."""
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    predicted = extract_answer(response)
    ok = format_ok(response)
    if not predicted:
        failure = "no_answer"
    elif not ok:
        failure = "format"
    else:
        gold = ground_truth.strip() if ground_truth else ""
        if not gold:
            failure = "wrong"
        elif predicted == gold:
            failure = "none"
        elif _INTEGER.fullmatch(predicted) and _INTEGER.fullmatch(gold):
            failure = "none" if int(predicted) == int(gold) else "wrong"
        else:
            return _MathJob(predicted, ok, gold, finish_reason)
    return _math_verdict(predicted, ok, failure, finish_reason)


def _math_verdict(predicted: str | None, ok: bool, failure: str, finish_reason: str | None) -> Verdict:
    correct = failure == "none"
    if not correct and finish_reason == "length":
        failure = "truncated"
    return Verdict(predicted=predicted, is_correct=correct, format_ok=ok, failure=failure)


def _math_result(job: _MathJob, result: bool | str | None) -> Verdict:
    failure = "timeout" if result == TIMEOUT else "none" if result is True else "wrong"
    return _math_verdict(job.predicted, job.format_ok, failure, job.finish_reason)


def verify_math(response: str, ground_truth: str | None, finish_reason: str | None = None, *,
                pool: MathPool | None = None) -> Verdict:
    """Label one MATH-style response (math-verify under `pool`'s time limit; by default the
    process-wide `shared_pool()`). Works from any thread; never raises on a string."""
    pre = _math_precheck(response, ground_truth, finish_reason)
    if isinstance(pre, Verdict):
        return pre
    return _math_result(pre, (pool or shared_pool()).check(pre.gold, pre.predicted))


def _verify_rows_math(rows: Iterable[dict[str, Any]], pool: MathPool) -> Iterator[dict[str, Any]]:
    def jobs() -> Iterator[tuple[tuple[dict[str, Any], Verdict | _MathJob], tuple[str, str] | None]]:
        for row in rows:
            response, truth = row.get("response"), row.get("ground_truth")
            pre = _math_precheck("" if response is None else str(response),
                                 None if truth is None else str(truth), row.get("finish_reason"))
            yield (row, pre), (None if isinstance(pre, Verdict) else (pre.gold, pre.predicted))

    for (row, pre), result in pool.imap(jobs()):
        yield _labelled(row, pre if isinstance(pre, Verdict) else _math_result(pre, result))


# --------------------------------------------------------------------------- stage entry

def read_samples(path: str | Path, task: str = "gsm8k") -> Iterator[dict[str, Any]]:
    """Stream the rows to verify from `path`: each needs `response` and `ground_truth`, and for
    GSM8K a ground truth that is a number; a row without raises DataError naming its line (a
    ground truth that cannot match would label every trace of its question wrong, silently)."""
    good: set[str] = set()  # ground truths already checked: a question's samples share one
    for lineno, row in iter_jsonl_numbered(path, required=("response", "ground_truth")):
        truth = row["ground_truth"]
        if truth not in good:
            text = "" if truth is None or isinstance(truth, bool) else str(truth).strip()
            if not text or (task == "gsm8k" and parse_number(text) is None):
                expected = "a number" if task == "gsm8k" else "the reference answer"
                raise DataError(f"{path}:{lineno}: key 'ground_truth': expected {expected}, got {truth!r}")
            if isinstance(truth, str):
                if len(good) >= 1 << 16:  # memory stays bounded on a file of distinct answers
                    good.clear()
                good.add(truth)
        yield row


def run(cfg: VerifyConfig) -> Path:
    """Stage entry: read `cfg.input`, write the labelled rows to `cfg.output` (atomically).
    Rows stream through: memory stays bounded whatever the file's size."""
    if cfg.task not in TASKS:
        raise ValueError(f"verify.task: expected one of {', '.join(map(repr, TASKS))}, got {cfg.task!r}")
    if not cfg.input:
        raise ValueError("verify.input: expected a path to a JSONL file of sampled rows")
    if not cfg.output:
        raise ValueError("verify.output: expected a path for the verified JSONL file")
    return write_jsonl(cfg.output, verify_rows(read_samples(cfg.input, cfg.task), cfg.task,
                                               math_workers=cfg.math_workers,
                                               math_timeout_s=cfg.math_timeout_s))


def command(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="exit-loop verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="JSONL rows with `response` and `ground_truth`")
    p.add_argument("--output", help="where the labelled rows go")
    p.add_argument("--task", choices=list(TASKS),
                   help="answer checker: gsm8k (numbers, default) or math (math-verify)")
    p.add_argument("--config", help="YAML file with VerifyConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any VerifyConfig key, e.g. math_workers=4 math_timeout_s=3")
    a = p.parse_args(argv)
    values = {k: v for k, v in {"input": a.input, "output": a.output, "task": a.task}.items() if v is not None}
    cfg = load_config(VerifyConfig, a.config, a.overrides, values)
    if not cfg.input or not cfg.output:
        p.error("--input and --output are required")
    out = run(cfg)
    print(f"verify: labelled rows -> {out}")
    return 0
