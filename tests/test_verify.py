"""Unit tests for the GSM8K verifier (exit_loop/verify.py): pure, fast, no model."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from exit_loop.errors import DataError
from exit_loop.jsonl import read_jsonl
from exit_loop.prompts import extract_answer, format_ok
from exit_loop.tasks import FAILURES, Verdict
from exit_loop.tasks.gsm8k import parse_number, read_answer, verify_gsm8k
from exit_loop.verify import VerifyConfig, run, verify_row, verify_rows


def resp(answer: str, reasoning: str = "Natalia sold 48/2 = 24 clips, 48+24 = 72 in all.") -> str:
    return f"{reasoning} </think> <answer>{answer}</answer>"


# --------------------------------------------------------------------------- parse_number

# (text, a value it equals, a value it must not equal)
NORMALISATION = [
    # bare numbers (fast path)
    ("18", 18, 19),
    ("-5", -5, 5),
    ("0", 0, 1),
    # \boxed{} and LaTeX delimiters / spacing commands
    (r"\boxed{18}", 18, 1),
    (r"\boxed{\$1{,}000}", 1000, 1),
    (r"\(18\)", 18, 1),
    (r"\[ 18 \]", 18, 1),
    ("$18$", 18, 1),
    (r"\text{18}", 18, 1),
    (r"\text{18 dollars}", 18, 1),
    (r"1\!000", 1000, 1),
    (r"1\,000", 1000, 1),
    (r"90^\circ", 90, 0),
    # currency signs and words
    ("$18", 18, 1),
    ("$18.00", 18, Fraction(1800)),
    ("€5", 5, 1),
    ("£5", 5, 1),
    ("¥5", 5, 1),
    ("₹5", 5, 1),
    ("18 dollars", 18, 1),
    ("18 USD", 18, 1),
    ("USD18", 18, 1),
    ("-$5", -5, 5),
    ("$-5", -5, 5),
    # thousands commas: groups of three only
    ("1,234", 1234, 1),
    ("1,234,567", 1234567, 1234),
    ("$1,234.50", Fraction(246900, 200), 1234),
    ("It costs 1,234, which is a lot", 1234, 234),
    # unit words after the number
    ("18 apples", 18, 1),
    ("5 hours", 5, 1),
    ("12 cm", 12, 1),
    ("12 cm^2", 12, 2),
    # trailing zeros after the decimal point
    ("18.0", 18, Fraction(180)),
    ("18.00", 18, Fraction(1800)),
    # percent
    ("50%", 50, Fraction(1, 2)),
    (r"50\%", 50, Fraction(1, 2)),
    # fractions
    ("3/4", Fraction(3, 4), 34),
    ("3 / 4", Fraction(3, 4), 4),
    ("-1/2", Fraction(-1, 2), Fraction(1, 2)),
    (r"\frac{3}{4}", Fraction(3, 4), 34),
    (r"\dfrac{3}{4}", Fraction(3, 4), 34),
    (r"\tfrac{3}{4}", Fraction(3, 4), 34),
    (r"\dfrac34", Fraction(3, 4), 34),
    (r"-\frac{1}{2}", Fraction(-1, 2), Fraction(1, 2)),
    (r"\frac{1,000}{4}", 250, 1000),
    # mixed numbers
    ("2 1/2", Fraction(5, 2), Fraction(1, 2)),
    (r"2\frac{1}{2}", Fraction(5, 2), Fraction(21, 2)),
    ("-2 1/2", Fraction(-5, 2), Fraction(-3, 2)),
    # decimals
    (".5", Fraction(1, 2), 5),
    ("0.50", Fraction(1, 2), 50),
    ("0.125", Fraction(1, 8), 125),
    # negatives: ASCII and unicode minus; a hyphen between numbers is not a sign
    ("\u22125", -5, 5),
    ("The change is \u22125 degrees", -5, 5),
    # one number in a sentence; an equation names the value after its last "="
    ("The answer is 18.", 18, 1),
    ("She has 18 eggs left.", 18, 1),
    ("18 / 2 = 9", 9, 18),
    ("x = 18", 18, 1),
    ("3 + 15 = 18", 18, 15),
    # scientific notation
    (r"1.8 \times 10^{1}", 18, 1),
    ("1.8 × 10^1", 18, 1),
    ("1.8e1", 18, 1),
    ("2.5 * 10^-3", Fraction(1, 400), Fraction(25, 10)),
]

# Answers that name more than one number, hedge, or hold a malformed one: `ambiguous`, never a
# value (the last-number rule read each of these as its last number).
AMBIGUOUS_ANSWERS = [
    "17 or 18", "17-18", "17 - 18", "17 to 18", "between 17 and 18", "17, 18", "3, 4", "3,4", "17; 18",
    "20 - 2", "2 × 9", "18 = 20 - 2", "18 18", "x = 17 or x = 18", "18 (or maybe 17)", "about 18",
    "approximately 18", "18 or so", "at least 18", "~18", "18 ± 1", r"\boxed{17}\boxed{18}",
    "She has 3 boxes of 6 eggs, so 18 eggs", "5-3", "1,0000", "1,2345", "1.2.3", "12 cm2", "3:30",
    "1e400", "18/0", "10^3", "not 17 but 18", "a" * 5000 + " 18",
]


@pytest.mark.parametrize("text,equal,unequal", NORMALISATION)
def test_parse_number(text, equal, unequal):
    value = parse_number(text)
    assert value == Fraction(equal)
    assert value != Fraction(unequal)
    assert isinstance(value, Fraction)


@pytest.mark.parametrize("text", ["", "   ", "no number here", "$", r"\boxed{}", "x/2", "1/0",
                                  r"\frac{1}{0}", "e", "-", ".", "cm2", None, 42])
def test_parse_number_none(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("text", AMBIGUOUS_ANSWERS)
def test_an_answer_naming_more_than_one_number_is_ambiguous(text):
    assert read_answer(text) == "ambiguous"
    assert parse_number(text) is None
    v = verify_gsm8k(resp(text), "18")
    assert v.failure == "ambiguous" and not v.is_correct
    assert verify_gsm8k(resp(text), "17").failure == "ambiguous"


def test_no_number_is_wrong_not_ambiguous():
    assert read_answer("eighteen") == "wrong"
    assert verify_gsm8k(resp("eighteen"), "18").failure == "wrong"


def test_a_long_text_is_not_read_as_its_last_number():
    assert parse_number("x " + "1" + "0" * 2000 + "42") is None


def test_parse_number_huge_integer_does_not_raise():
    assert parse_number("9" * 100_000) is None  # beyond Python's int-from-str limit


# --------------------------------------------------------------------------- extract_answer

@pytest.mark.parametrize("response,expected", [
    (resp("72"), "72"),
    (resp("  72 "), "72"),
    ("r </think> <answer>1</answer> more <answer>2</answer>", "2"),           # last wins
    ("<answer>1</answer> r </think> <answer>2</answer> <answer>3", "2"),      # incomplete last
    ("r </think> <answer>1</answer></answer>", "1"),                          # orphan close
    ("r </think> <answer>a <answer>b</answer>", "a <answer>b"),               # nested: lazy pair
    ("r </think> no tags", None),
    ("r </think> <answer>72", None),
    ("r </think> 72</answer>", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# --------------------------------------------------------------------------- format_ok

@pytest.mark.parametrize("response", [
    resp("72"),
    resp("72") + "\n",
    resp(" 72 "),
    "Multi\nline\nreasoning.</think> <answer>72</answer>",  # no space before </think>: allowed
    "\n48/2 = 24 </think> <answer>$72</answer>",
])
def test_format_ok_positive(response):
    assert format_ok(response)


@pytest.mark.parametrize("response", [
    "<think> 48/2 = 24 </think> <answer>72</answer>",          # leading <think>: prompt carries it
    "48/2 = 24 </think><answer>72</answer>",                   # no space
    "48/2 = 24 </think>  <answer>72</answer>",                 # two spaces
    "48/2 = 24 </think>\n<answer>72</answer>",                 # newline instead of space
    " </think> <answer>72</answer>",                           # empty reasoning
    "48 </think> 24 </think> <answer>72</answer>",             # two </think>
    "48/2 = 24 <answer>72</answer>",                           # no </think>
    "48/2 = 24 </think> <answer>72</answer> done",             # text after </answer>
    "48/2 = 24 </think> <answer>72</answer><|endoftext|>",     # token after </answer>
    "48/2 = 24 </think> <answer>7</answer> <answer>72</answer>",  # two answer pairs
    "48/2 = 24 </think> <answer>a <answer>72</answer>",        # nested open tag
    "48/2 = 24 <answer>1</answer> </think> <answer>72</answer>",  # answer tag in reasoning
    "48/2 = 24 </think> <answer> </answer>",                   # empty answer
    "48/2 = 24 </think> <answer>72",                           # unclosed
    "",
])
def test_format_ok_negative(response):
    assert not format_ok(response)


# --------------------------------------------------------------------------- verify_gsm8k

@pytest.mark.parametrize("response,truth,finish,failure,predicted", [
    (resp("72"), "72", "stop", "none", "72"),
    (resp("$72.00"), "72", None, "none", "$72.00"),
    (resp("The answer is 72."), "72", None, "none", "The answer is 72."),
    (resp("1,234"), "1234", None, "none", "1,234"),
    (resp("71"), "72", "stop", "wrong", "71"),
    (resp("7,2"), "72", None, "ambiguous", "7,2"),                 # malformed grouping
    (resp("70 + 2"), "72", None, "ambiguous", "70 + 2"),           # unevaluated arithmetic
    (resp("seventy-two"), "72", None, "wrong", "seventy-two"),    # unparseable prediction
    (resp("72"), "seventy-two", None, "wrong", "72"),             # unparseable ground truth
    (resp("72"), None, None, "wrong", "72"),                      # no ground truth
    ("48/2 = 24 </think> 72", "72", "stop", "no_answer", None),
    (resp(""), "72", None, "no_answer", ""),                      # empty answer
    ("48/2 = 24 </think><answer>72</answer>", "72", None, "format", "72"),
    ("<think> r </think> <answer>72</answer>", "72", None, "format", "72"),
    ("r </think> <answer>72</answer> and more", "72", None, "format", "72"),
    ("48/2 = 24, 48+24 = 72 </think> <answer>7", "72", "length", "truncated", None),
    (resp("71"), "72", "length", "truncated", "71"),              # length + wrong -> truncated
    ("r </think><answer>72</answer>", "72", "length", "truncated", "72"),  # length + format
    (resp("72"), "72", "length", "none", "72"),                   # correct despite length
])
def test_verify_gsm8k_failures(response, truth, finish, failure, predicted):
    v = verify_gsm8k(response, truth, finish)
    assert v.failure == failure
    assert v.failure in FAILURES
    assert v.predicted == predicted
    assert v.is_correct == (failure == "none")
    assert v.format_ok == format_ok(response)


def test_every_gsm8k_failure_class_is_reachable():
    seen = {verify_gsm8k(r, "72", f).failure for r, f in [
        (resp("72"), None), (resp("1"), None), ("r </think>", None),
        ("r </think><answer>72</answer>", None), (resp("1"), "length"), (resp("71 or 72"), None)]}
    assert seen == set(FAILURES) - {"timeout"}  # timeout belongs to the math-verify path


def test_last_answer_wins():
    # a correct earlier answer does not rescue a wrong last one, and vice versa
    assert extract_answer("r </think> <answer>72</answer> <answer>71</answer>") == "71"
    assert not verify_gsm8k("r </think> <answer>72</answer> <answer>71</answer>", "72").is_correct
    assert verify_gsm8k("r </think> <answer>71</answer> <answer>72</answer>", "72").failure == "format"


def test_verdict_is_frozen():
    v = verify_gsm8k(resp("72"), "72")
    assert v == Verdict("72", True, True, "none")
    with pytest.raises(AttributeError):
        v.is_correct = False  # type: ignore[misc]


PATHOLOGICAL = {  # 1 MB inputs built inside the test, so test ids stay short
    "digits": lambda: "1" * 1_000_000,
    "closing_tags": lambda: "</answer>" * 110_000,
    "opening_tags": lambda: "<answer>" * 125_000,
    "nested_opens": lambda: "r </think> <answer>" + "<answer>" * 100_000 + "</answer>",
    "commas": lambda: "r </think> <answer>" + "1," * 500_000 + "</answer>",
    "frac_opens": lambda: "r </think> <answer>" + "\\frac{" * 100_000 + "</answer>",
    "spaced_digits": lambda: "r </think> <answer>" + "1 " * 500_000 + "</answer>",
    "minus_signs": lambda: "r </think> <answer>" + "- " * 500_000 + "1</answer>",
    "huge_number": lambda: "r </think> <answer>" + "9" * 1_000_000 + "</answer>",
    "long_reasoning": lambda: "r" * 1_000_000 + " </think> <answer>72</answer>",
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_one_megabyte_response_is_quick(name):
    response = PATHOLOGICAL[name]()
    t = time.perf_counter()
    v = verify_gsm8k(response, "72", "stop")
    assert time.perf_counter() - t < 0.5
    assert v.failure in FAILURES


def test_huge_response_with_correct_answer():
    v = verify_gsm8k("r" * 1_000_000 + " </think> <answer>72</answer>", "72")
    assert v.is_correct and v.failure == "none"


@pytest.mark.parametrize("response", [None, 72, "", "\x00", "</think>", "<answer></answer>", "\\",
                                      "\\frac{", "$", "−", "<answer>\\boxed{</answer>"])
def test_never_raises(response):
    v = verify_gsm8k(response, "72")  # type: ignore[arg-type]
    assert v.failure in FAILURES and not v.is_correct


# --------------------------------------------------------------------------- rows and run

def test_verify_row_adds_keys_and_copies():
    row = {"prompt": "p", "response": resp("72"), "ground_truth": "72", "finish_reason": "stop"}
    out = verify_row(row)
    assert out is not row and "predicted" not in row
    assert out == {**row, "predicted": "72", "is_correct": True, "format_ok": True, "failure": "none"}


@pytest.mark.parametrize("row,failure", [
    ({"response": resp("72"), "ground_truth": 72}, "none"),         # coerced to str
    ({"response": resp("72"), "ground_truth": None}, "wrong"),
    ({"response": resp("72")}, "wrong"),                            # missing ground truth
    ({"response": None, "ground_truth": "72"}, "no_answer"),
    ({"response": resp("71"), "ground_truth": "72", "finish_reason": "length"}, "truncated"),
])
def test_verify_row_coercion(row, failure):
    assert verify_row(row)["failure"] == failure


def test_verify_rows_is_lazy():
    def rows():
        yield {"response": resp("72"), "ground_truth": "72"}
        raise AssertionError("read too far")
    assert next(verify_rows(rows()))["is_correct"]


def test_run_writes_rows_with_labels(tmp_path):
    src = tmp_path / "samples.jsonl"
    rows = [
        {"id": "train-0", "response": resp("72"), "ground_truth": "72", "finish_reason": "stop"},
        {"id": "train-1", "response": resp("10"), "ground_truth": "12"},
        {"id": "train-2", "response": "r </think> 5", "ground_truth": "5", "finish_reason": "length"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    out = run(VerifyConfig(input=str(src), output=str(tmp_path / "out" / "verified.jsonl")))
    assert out == tmp_path / "out" / "verified.jsonl"
    got = read_jsonl(out)
    assert [r["id"] for r in got] == ["train-0", "train-1", "train-2"]
    for before, after in zip(rows, got):
        assert {k: after[k] for k in before} == before
        assert set(after) - set(before) == {"predicted", "is_correct", "format_ok", "failure"}
    assert [r["failure"] for r in got] == ["none", "wrong", "truncated"]
    assert [r["is_correct"] for r in got] == [True, False, False]
    assert [r["predicted"] for r in got] == ["72", "10", None]


def test_run_malformed_line_names_file_and_line(tmp_path):
    src = tmp_path / "samples.jsonl"
    src.write_text(json.dumps({"response": resp("1"), "ground_truth": "1"}) + "\n{not json\n")
    out = tmp_path / "verified.jsonl"
    with pytest.raises(DataError) as e:
        run(VerifyConfig(input=str(src), output=str(out)))
    assert str(src) in str(e.value) and ":2" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]  # no half-written output


def test_run_missing_key_names_it(tmp_path):
    src = tmp_path / "samples.jsonl"
    src.write_text(json.dumps({"response": resp("1")}) + "\n")
    with pytest.raises(DataError) as e:
        run(VerifyConfig(input=str(src), output=str(tmp_path / "verified.jsonl")))
    assert "ground_truth" in str(e.value) and f"{src}:1" in str(e.value)


@pytest.mark.parametrize("cfg,word", [
    (VerifyConfig(input=None, output="o.jsonl"), "input"),
    (VerifyConfig(input="i.jsonl", output=None), "output"),
    (VerifyConfig(input="i.jsonl", output="o.jsonl", task="algebra"), "task"),  # type: ignore[arg-type]
])
def test_run_config_errors(cfg, word):
    with pytest.raises(ValueError, match=word):
        run(cfg)
