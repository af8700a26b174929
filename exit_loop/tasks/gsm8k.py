"""GSM8K: its rows, its ground truth, its numbers and its verdict, in one file.

Rows (hub `openai/gsm8k`, config `main`, or a local JSONL file in the same format):
`{"question": ..., "answer": "... #### 42"}`. The ground truth is the text after `#### `,
thousands separators removed; the worked solution (calculator annotations `<<48/2=24>>` and the
`#### N` line removed) is the baseline's reasoning.

The verdict (`verify_gsm8k`): the last complete `<answer>…</answer>` of a canonical response
(`exit_loop.prompts.format_ok`) must name exactly one number (`read_answer`), which is compared
with the ground truth as an exact rational (`fractions.Fraction`); no `eval`, no sympy. Failure
classes, in this order: `truncated` (finish_reason "length" and not correct), `no_answer`,
`format`, `ambiguous` (the answer names more than one number, hedges, or holds a malformed one:
never correct), `wrong`, else `none`. It never raises on a string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from fractions import Fraction
from functools import lru_cache
from typing import Any

from exit_loop.errors import DataError
from exit_loop.tasks.problem import (DataConfig, Problem, Verdict, read_response, row_fields, row_group,
                                    source_rows, verdict)

MAX_NUMBER_TEXT = 1000  # a longer answer is not one value: ambiguous
_CALCULATOR = re.compile(r"<<.*?>>")


# --------------------------------------------------------------------------- rows


def ground_truth_from_answer(answer: str) -> str:
    """`'...\\n#### 1,234'` -> `'1234'`."""
    if "####" not in answer:
        raise ValueError("no '#### ' final-answer line")
    final = answer.rsplit("####", 1)[1].strip()
    final = final.replace(",", "").strip()
    if not final:
        raise ValueError("empty final answer after '####'")
    return final


def solution_reasoning(solution: str) -> str:
    """GSM8K's worked solution without annotations and without the `#### N` line."""
    reasoning = solution.rsplit("####", 1)[0]
    reasoning = _CALCULATOR.sub("", reasoning)
    return "\n".join(line.rstrip() for line in reasoning.strip().splitlines())


def load(cfg: DataConfig) -> list[Problem]:
    """Every GSM8K problem of `cfg.dataset` (no subset taken). Raises DataError naming the file
    and line (or hub row) of a bad row."""
    rows, where, split = source_rows(cfg, required=("question", "answer"))
    problems = []
    for i, row in enumerate(rows):
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise DataError(f"{where(i)}: missing key(s) {', '.join(map(repr, missing))}; "
                            "a GSM8K row needs 'question' and 'answer'")
        try:
            gt = ground_truth_from_answer(str(row["answer"]))
        except ValueError as e:
            raise DataError(f"{where(i)}: key 'answer': {e}") from None
        if parse_number(gt) is None:
            raise DataError(f"{where(i)}: key 'answer': the final answer after '####' is not a number: {gt!r}")
        problems.append(Problem(f"{split}-{i}", str(row["question"]), gt, str(row["answer"]),
                                **row_group(row, cfg, where(i))))
    return problems


# --------------------------------------------------------------------------- numbers

AMBIGUOUS = "ambiguous"
_FAST = re.compile(r"-?\d+(?:\.\d+)?", re.ASCII)
# \frac{a}{b}, \dfrac{a}{b}, \tfrac{a}{b}, \frac34; a digit just before is kept apart (mixed number)
_FRAC = re.compile(r"(\d?)\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))", re.ASCII)
_LATEX_SPACE = re.compile(r"\\[!,;:> ]")                 # \! \, \; ... : remove (1\,234 -> 1234)
_LATEX_CMD = re.compile(r"\\(?:[A-Za-z]+|[()\[\]])")      # \boxed \text \left \( \] ... : a space
_DELETE = str.maketrans({c: None for c in "{}$€£¥₹%\\"})
_CURRENCY_WORD = re.compile(
    r"(?<![a-z])(?:dollars?|usd|us|euros?|eur|pounds?|gbp|rupees?|inr|rs|yen|jpy)(?![a-z])\.?",
    re.IGNORECASE | re.ASCII)
_UNIT_POWER = re.compile(r"(?<=[A-Za-z])\^\d+", re.ASCII)  # cm^2 -> cm
# scientific notation, read before LaTeX is stripped: 1.8 \times 10^{1}, 1.8 × 10^1, 1.8e1
_SCIENTIFIC = re.compile(
    r"(?<![\d.])(\d+(?:\.\d+)?)\s*(?:\\times|\\cdot|×|·|\*)\s*10\s*\^\s*\{?\s*([+-]?\d{1,2})\s*\}?"
    r"|(?<![\w.])(\d+(?:\.\d+)?)[eE]([+-]?\d{1,2})(?![\w.])")
_MIXED = re.compile(r"(?<![\w./-])(-?)(\d+)[ \t]+(\d+)\s*/\s*(\d+)(?![\w/]|\.\d)", re.ASCII)
# a scale word multiplies the number before it: "18 million" is 18000000
_SCALE = re.compile(r"(\d+(?:\.\d+)?)\s*(thousand|million|billion|trillion)(?![a-z])", re.IGNORECASE | re.ASCII)
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_LIST = re.compile(r"[,;]\s|;")  # a list separator before an equation's last "=": "x = 17, y = 18"
# One number: a minus only where it cannot be subtraction or a hyphen; digits with comma groups of
# exactly three ("1,234,567", never "3, 4" or "3,4"); optional decimals; an optional "/ denominator".
# A number glued to a letter, a dot or a slash ("cm2", "x/2") is not taken.
_NUMBER = re.compile(
    r"(?:(?<![A-Za-z0-9_.)/])(-)|(?<![A-Za-z0-9_./]))"
    r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(\d+(?:\.\d+)?))?",
    re.ASCII,
)
_LEAD = re.compile(r"^\s*(?:the\s+(?:final\s+)?answer\s+is|(?:final\s+)?answer)\s*[:=]?\s*", re.IGNORECASE)
# words and signs that hedge or bound a value instead of naming it
_HEDGE = re.compile(
    r"(?<![a-z])(?:or|either|maybe|perhaps|possibly|probably|between|approx(?:imately)?|about|around|"
    r"roughly|nearly|almost|at\s+(?:least|most)|more\s+than|less\s+than|up\s+to|not)(?![a-z])|[≈~±]|\+/-",
    re.IGNORECASE)


def is_hedged(text: str) -> bool:
    """Whether an answer hedges or bounds its value in words or signs ("17 or 18", "about 18",
    "at least 18", "~18", "18 ± 1"): such an answer names no one value."""
    return _HEDGE.search(text) is not None


def _scale_repl(m: re.Match[str]) -> str:
    value = Fraction(m[1]) * _SCALES[m[2].lower()]
    return f" {value.numerator}/{value.denominator} " if value.denominator != 1 else f" {value.numerator} "


def _scientific_repl(m: re.Match[str]) -> str:
    mantissa, exponent = (m[1], m[2]) if m[1] is not None else (m[3], m[4])
    value = Fraction(mantissa) * Fraction(10) ** int(exponent)
    return f" {value.numerator}/{value.denominator} " if value.denominator != 1 else f" {value.numerator} "


def _frac_repl(m: re.Match[str]) -> str:
    num, den = m[2] if m[2] is not None else m[3], m[4] if m[4] is not None else m[5]
    return (m[1] + " " if m[1] else "") + num.strip() + "/" + den.strip()


def _clean(text: str) -> str:
    s = text.replace("\u2212", "-")  # unicode minus
    if "10" in s or "e" in s or "E" in s:
        s = _SCIENTIFIC.sub(_scientific_repl, s)
    if "\\" in s:
        if "frac" in s:
            s = _FRAC.sub(_frac_repl, s)
        s = _LATEX_SPACE.sub("", s)
        s = _LATEX_CMD.sub(" ", s)
    s = s.translate(_DELETE)
    if "illion" in s or "housand" in s:
        s = _SCALE.sub(_scale_repl, s)
    if "^" in s:
        s = _UNIT_POWER.sub("", s)
    return _CURRENCY_WORD.sub(" ", s).strip()


def _read(text: str) -> Fraction | str:
    """The one value `text` names, or AMBIGUOUS, or "wrong" (no number at all)."""
    s = text.strip()
    if _FAST.fullmatch(s):  # the common case: a bare integer or decimal
        return Fraction(s)
    if len(s) > MAX_NUMBER_TEXT:
        return AMBIGUOUS  # a page of text is not an answer that names one value
    s = _LEAD.sub("", _clean(s))
    if is_hedged(s):
        return AMBIGUOUS
    if "=" in s:  # an equation names the value after its last "=" (3 + 15 = 18; x = 18)
        lhs, s = s.rsplit("=", 1)
        if _LIST.search(lhs):
            return AMBIGUOUS  # several equations: "x = 17, y = 18"
    values: list[Fraction | None] = []

    def mixed(m: re.Match[str]) -> str:
        den = int(m[4])
        # an improper fractional part ("11 6/6") is no mixed number anyone writes: not read
        value = int(m[2]) + Fraction(int(m[3]), den) if 0 <= int(m[3]) < den else None
        values.append(-value if value is not None and m[1] else value)
        return " "

    def number(m: re.Match[str]) -> str:
        value: Fraction | None = Fraction(m[2].replace(",", ""))
        if m[3] is not None:
            den = Fraction(m[3])
            value = value / den if den else None
        values.append(-value if value is not None and m[1] else value)
        return " "

    rest = _NUMBER.sub(number, _MIXED.sub(mixed, s) if "/" in s else s)
    if not values:
        return "wrong"
    if len(values) > 1 or values[0] is None or any(c.isdigit() for c in rest):
        return AMBIGUOUS  # two numbers, an unevaluated expression, a malformed or glued number
    return values[0]


_read_short = lru_cache(maxsize=1 << 16)(_read)


def clear_number_cache() -> None:
    """Forget the read short texts (`read_answer` caches them), e.g. between benchmark runs."""
    _read_short.cache_clear()


def read_answer(text: str) -> Fraction | str:
    """The value an answer names, as an exact Fraction, if it names exactly one; else AMBIGUOUS
    (more than one number, a hedge, a malformed number) or "wrong" (no number). Never raises.

    After a clean-up (`\\boxed{}`, `\\(`...`\\)`, `$`...`$`, `\\text{}`, `\\!`, `\\,`, currency
    signs and words, thousands commas in groups of three, `%`, unit words, "The answer is"), one
    number is: an integer or decimal (`.5`, `0.50`, `-5`, `\u22125`), a fraction (`3/4`,
    `\\frac{3}{4}`, `\\dfrac34`), a mixed number (`2 1/2`, `2\\frac{1}{2}`), scientific notation
    (`1.8 \\times 10^{1}`, `1.8e1`), or an equation whose text after the last `=` is one number
    (`x = 18`, `3 + 15 = 18`). Alternatives ("17 or 18"), ranges, lists, unevaluated arithmetic
    (`20 - 2`), a number written twice, hedges ("about 18") and malformed numbers (`1,0000`,
    `1.2.3`) are AMBIGUOUS: never correct. A false positive is a reward the student learns to
    collect, so when in doubt this says no.
    """
    if not isinstance(text, str):
        return "wrong"
    try:
        return _read_short(text) if len(text) <= 64 else _read(text)
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. an integer past int-from-str limits
        return "wrong" if _FAST.fullmatch(text.strip()) else AMBIGUOUS  # one (absurd) number: wrong


def parse_number(text: str) -> Fraction | None:
    """The value of an answer or ground truth that names exactly one number (`read_answer`), else None."""
    value = read_answer(text)
    return value if isinstance(value, Fraction) else None


# --------------------------------------------------------------------------- the verdict

def verify_gsm8k(response: str, ground_truth: str, finish_reason: str | None = None) -> Verdict:
    """Label one GSM8K response; see the module docstring for the failure classes."""
    predicted, ok, failure, truth = read_response(response, ground_truth)
    if failure is None:
        truth_value = parse_number(truth) if truth is not None else None
        value = read_answer(predicted)  # type: ignore[arg-type] - not None when failure is None
        if value == AMBIGUOUS:
            failure = AMBIGUOUS
        else:
            failure = "none" if truth_value is not None and value == truth_value else "wrong"
    return verdict(predicted, ok, failure, finish_reason)


def verify_many(rows: Iterable[dict[str, Any]], workers: int | None = None, timeout_s: float | None = None
                ) -> Iterator[tuple[dict[str, Any], Verdict]]:
    """(row, verdict) for each row, in order (`workers` and `timeout_s` are the math task's: an
    exact GSM8K check needs neither)."""
    for row in rows:
        yield row, verify_gsm8k(*row_fields(row))  # type: ignore[arg-type]
