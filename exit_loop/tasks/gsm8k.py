"""GSM8K: its rows, its ground truth, its numbers and its verdict, in one file.

Rows (hub `openai/gsm8k`, config `main`, or a local JSONL file in the same format):
`{"question": ..., "answer": "... #### 42"}`. The ground truth is the text after `#### `,
thousands separators removed; the worked solution (calculator annotations `<<48/2=24>>` and the
`#### N` line removed) is the baseline's reasoning.

The verdict (`verify_gsm8k`): the last complete `<answer>…</answer>` of a canonical response
(`exit_loop.prompts.format_ok`), compared with the ground truth as exact rationals
(`fractions.Fraction`) after a light, fast normalisation (`parse_number`); no `eval`, no sympy.
Failure classes, in this order: `truncated` (finish_reason "length" and not correct),
`no_answer`, `format`, `wrong`, else `none`. It never raises on a string.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from exit_loop.errors import DataError
from exit_loop.tasks.problem import DataConfig, Problem, Verdict, read_response, source_rows, verdict

MAX_NUMBER_TEXT = 1000  # parse_number looks at the last this-many characters only
_NUMBER_CHARS = "0123456789.,"
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
        problems.append(Problem(f"{split}-{i}", str(row["question"]), gt, str(row["answer"])))
    return problems


# --------------------------------------------------------------------------- numbers

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


def clear_number_cache() -> None:
    """Forget the parsed short texts (`parse_number` caches them), e.g. between benchmark runs."""
    _parse_short.cache_clear()


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



# --------------------------------------------------------------------------- the verdict

def verify_gsm8k(response: str, ground_truth: str, finish_reason: str | None = None) -> Verdict:
    """Label one GSM8K response; see the module docstring for the failure classes."""
    predicted, ok, failure, truth = read_response(response, ground_truth)
    if failure is None:
        truth_value = parse_number(truth) if truth is not None else None
        value = parse_number(predicted)  # type: ignore[arg-type] - not None when failure is None
        failure = "none" if truth_value is not None and value is not None and value == truth_value else "wrong"
    return verdict(predicted, ok, failure, finish_reason)
