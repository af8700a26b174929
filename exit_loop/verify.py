"""The verifier stage: label each sampled trace against its ground truth.

    exit-loop verify --input data/gsm8k/samples.jsonl --output data/gsm8k/verified.jsonl

Every input row needs `response` (the canonical response, `{reasoning} </think>
<answer>{answer}</answer>`) and `ground_truth`; `finish_reason` is read when present. Each output
row is the input row plus four keys:

- `predicted`: the text of the last complete `<answer>...</answer>` (stripped), or None;
- `format_ok`: whether the response has the canonical form (see `format_ok`);
- `is_correct`: canonical form *and* the predicted number equals the ground-truth number;
- `failure`: one of FAILURES, chosen in this order: `truncated` (finish_reason "length" and not
  correct), `no_answer` (no complete, non-empty answer tag), `format`, `wrong`, else `none`.

GSM8K answers are compared as exact rationals (`fractions.Fraction`) after a light, fast
normalisation (`parse_number`); no `eval`, no sympy. The verifier never raises on a string: any
input, however long or odd, gets a verdict. (`timeout` is reserved for the math-verify path.)
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
from exit_loop.jsonl import iter_jsonl, write_jsonl
from exit_loop.prompts import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE

FAILURES = ("none", "no_answer", "format", "truncated", "wrong", "timeout")

THINK_OPEN = "<think>"
MAX_NUMBER_TEXT = 1000  # parse_number looks at the last this-many characters only
_NUMBER_CHARS = "0123456789.,"


@dataclass
class VerifyConfig:
    input: str | None = None     # JSONL in: rows with `response` and `ground_truth`
    output: str | None = None    # JSONL out: the same rows with predicted/is_correct/format_ok/failure added
    task: Literal["gsm8k"] = "gsm8k"   # (math comes later via math-verify)


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


def verify_row(row: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `row` plus `predicted`, `is_correct`, `format_ok` and `failure`."""
    response = row.get("response")
    truth = row.get("ground_truth")
    v = verify_gsm8k("" if response is None else str(response),
                     None if truth is None else str(truth),  # type: ignore[arg-type]
                     row.get("finish_reason"))
    return {**row, "predicted": v.predicted, "is_correct": v.is_correct,
            "format_ok": v.format_ok, "failure": v.failure}


def verify_rows(rows: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for row in rows:
        yield verify_row(row)


def run(cfg: VerifyConfig) -> Path:
    """Stage entry: read `cfg.input`, write the labelled rows to `cfg.output` (atomically)."""
    if cfg.task != "gsm8k":
        raise ValueError(f"verify.task: expected 'gsm8k', got {cfg.task!r} (math comes later)")
    if not cfg.input:
        raise ValueError("verify.input: expected a path to a JSONL file of sampled rows")
    if not cfg.output:
        raise ValueError("verify.output: expected a path for the verified JSONL file")
    rows = iter_jsonl(cfg.input, required=("response", "ground_truth"))
    return write_jsonl(cfg.output, verify_rows(rows))


def command(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="exit-loop verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="JSONL rows with `response` and `ground_truth`")
    p.add_argument("--output", help="where the labelled rows go")
    p.add_argument("--task", choices=["gsm8k"], help="answer checker (default gsm8k)")
    p.add_argument("--config", help="YAML file with VerifyConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    values = {k: v for k, v in {"input": a.input, "output": a.output, "task": a.task}.items() if v is not None}
    cfg = load_config(VerifyConfig, a.config, a.overrides, values)
    if not cfg.input or not cfg.output:
        p.error("--input and --output are required")
    out = run(cfg)
    print(f"verify: labelled rows -> {out}")
    return 0
