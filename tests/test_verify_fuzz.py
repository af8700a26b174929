"""Property-based fuzz of the verifier (hypothesis) over pathological strings: every call returns
a well-formed verdict within 2 s and no exception escapes. The GSM8K path gets a few hundred
examples; the math path (real math-verify in the worker pool) a bounded few, with a pool whose
limits (0.5 s of CPU, 1.5 s of wall-clock time) stop any one check well inside 2 s, and the
nastiest shapes once more through verify_row and the shared pool at default settings."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exit_loop.prompts import extract_answer, format_ok
from exit_loop.tasks import FAILURES, Verdict
from exit_loop.tasks.gsm8k import parse_number, verify_gsm8k
from exit_loop.tasks.math import verify_math
from exit_loop.tasks.math_pool import DEFAULT_TIMEOUT_S, WALL_FACTOR, MathPool, shared_pool
from exit_loop.verify import verify_row

LIMIT_S = 2.0

# pieces that the verifier's parsers treat specially, and ones that have broken parsers before
TOKENS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "</answer", "<", ">", " ", "\n", "\t",
    "\\boxed{", "\\fbox{", "{", "}", "\\frac", "\\dfrac", "\\frac{", "}{", "\\sqrt{", "\\left(", "\\right)",
    "\\(", "\\)", "\\[", "\\]", "$", "\\$", "\\", "\\\\", "\\!", "\\,", "\\text{", "\\infty", "\\cup",
    "\\pi", "^", "_", "0", "1", "7", "9", "42", "-", "+", "*", "/", ".", ",", "1,234", "%", "(", ")",
    "[", "]", "=", "x", "e", "E", "i", "nan", "inf", "1e308", "10**10**10", "2^{2^{2^{2^{9}}}}",
    "\u2212", "\u00a0", "\u200b", "\u0663", "\u00bd", "\u2155", "\ufeff", "\x00", "\ud800", "€", "£",
    "dollars", "USD", "cm^2",
]
_repeat = st.builds(lambda t, n: t * n, st.sampled_from(TOKENS + ["9", "1,", "(", "{", "-", "\\frac{1}{"]),
                    st.integers(1, 20_000))
_piece = st.one_of(st.sampled_from(TOKENS), st.text(max_size=12), _repeat)
pathological = st.lists(_piece, max_size=40).map("".join)
# any JSON value a row could carry where a string is expected
json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), pathological,
                        st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
FINISH = st.sampled_from([None, "stop", "length", "abort", ""])


def _check(v: Verdict) -> None:
    assert isinstance(v, Verdict)
    assert v.predicted is None or isinstance(v.predicted, str)
    assert isinstance(v.is_correct, bool) and isinstance(v.format_ok, bool)
    assert v.failure in FAILURES
    assert v.is_correct == (v.failure == "none")


def _check_row(row: dict, out: dict) -> None:
    assert {k: out[k] for k in row} == row
    _check(Verdict(out["predicted"], out["is_correct"], out["format_ok"], out["failure"]))


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    took = time.perf_counter() - t0
    assert took < LIMIT_S, f"{fn.__name__} took {took:.2f} s"
    return out


FAST = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(response=pathological, truth=pathological, finish=FINISH)
def test_gsm8k_fuzz(response, truth, finish):
    _check(_timed(verify_gsm8k, response, truth, finish))
    _check(_timed(verify_gsm8k, f"r </think> <answer>{response}</answer>", truth, finish))
    _timed(parse_number, response)
    _timed(extract_answer, response)
    _timed(format_ok, response)


@FAST
@given(response=json_values, truth=json_values, finish=FINISH)
def test_verify_row_fuzz_any_json_values(response, truth, finish):
    row = {"response": response, "ground_truth": truth, "finish_reason": finish, "id": 1}
    _check_row(row, _timed(verify_row, row))


def test_one_megabyte_responses():
    for body in ("9" * (1 << 20), "<answer>" * (1 << 17), "</answer>" * (1 << 17),
                 "x </think> <answer>" + "1," * (1 << 19) + "</answer>"):
        _check(_timed(verify_gsm8k, body, "42"))
        _check(_timed(verify_gsm8k, "r </think> <answer>" + body + "</answer>", body))


# --------------------------------------------------------------------------- math path

@pytest.fixture(scope="module")
def math_pool():
    """A pool whose limits bound every call under LIMIT_S, however crowded the machine: 0.5 s of
    CPU, at most WALL_FACTOR (3) x 0.5 s of wall-clock time. Started before any clock runs."""
    with MathPool(workers=1, timeout_s=0.5) as pool:
        pool.check("1", "1.0")
        yield pool


_answer = pathological.map(lambda s: s.replace("<answer>", "").replace("</answer>", "").replace("</think>", "")
                           .replace("<think>", ""))


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(answer=_answer, truth=st.one_of(_answer, json_values), finish=FINISH)
def test_math_fuzz(math_pool, answer, truth, finish):
    # the answer sits in a canonical response, so it reaches math-verify rather than stopping at
    # the format check
    response = f"reasoning </think> <answer>{answer}</answer>"
    _check(_timed(verify_math, response, truth, finish, pool=math_pool))


def test_math_row_fuzz_examples_through_the_shared_pool():
    """verify_row(task="math") on the nastiest shapes above, default settings (1.5 s of CPU)."""
    shared_pool().check("1", "1.0")  # start-up is not a verifier call
    for answer in ("(" + "1," * 3000 + ")", "\\frac{" * 500, "2^{2^{2^{2^{9}}}}", "10**10**10", "\ud800",
                   "9" * 100_000):
        row = {"response": f"r </think> <answer>{answer}</answer>", "ground_truth": answer + "1"}
        t0 = time.perf_counter()
        out = verify_row(row, task="math")
        assert time.perf_counter() - t0 < WALL_FACTOR * DEFAULT_TIMEOUT_S + 0.5
        _check_row(row, out)
