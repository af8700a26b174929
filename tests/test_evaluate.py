"""The eval stage's scoring (pure): greedy accuracy, pass@k, maj@k, format errors."""

import pytest

from exit_loop.evaluate import EvalConfig, majority_correct, metrics
from exit_loop.jsonl import DataError
from exit_loop.verify import verify_row


def row(pid: str, k: int, answer: str, gt: str, fmt: bool = True, tokens: int = 10) -> dict:
    response = f"r </think> <answer>{answer}</answer>" if fmt else f"r <answer>{answer}</answer>"
    return verify_row({"problem_id": pid, "sample_index": k, "response": response,
                       "ground_truth": gt, "num_tokens": tokens})


def test_metrics_numbers():
    greedy = [row("a", 0, "1", "1"), row("b", 0, "5", "2"), row("c", 0, "3", "3", fmt=False, tokens=30)]
    sampled = [row("a", 0, "1", "1"), row("a", 1, "7", "1"), row("a", 2, "7", "1"),   # pass, maj wrong
               row("b", 0, "2", "2"), row("b", 1, "2.0", "2"), row("b", 2, "9", "2"),  # pass, maj right
               row("c", 0, "4", "3"), row("c", 1, "5", "3"), row("c", 2, "3", "3", fmt=False)]  # neither
    m = metrics(greedy, sampled, 3)
    assert m["n"] == 3 and m["accuracy"] == round(1 / 3, 4)
    assert m["format_error_rate"] == round(1 / 3, 4)
    assert m["mean_response_tokens"] == round(50 / 3, 2)
    assert m["pass@k"] == round(2 / 3, 4) and m["maj@k"] == round(1 / 3, 4)
    assert m["failures"] == {"none": 1, "no_answer": 0, "format": 1, "truncated": 0, "ambiguous": 0,
                             "wrong": 1, "timeout": 0}


def test_greedy_only_has_no_pass_at_k():
    m = metrics([row("a", 0, "1", "1")], [], 0)
    assert m["accuracy"] == 1.0 and m["pass@k"] is None and m["maj@k"] is None and m["k"] is None


def test_majority_ties_go_to_the_earliest_answer():
    assert majority_correct([row("a", 0, "1", "1"), row("a", 1, "2", "1")])
    assert not majority_correct([row("a", 0, "2", "1"), row("a", 1, "1", "1")])
    assert not majority_correct([row("a", 0, "1", "1", fmt=False)])  # malformed answers don't vote


def test_no_generations_is_a_clear_error():
    with pytest.raises(DataError, match="no greedy generations"):
        metrics([], [], 0)


def test_k_of_one_is_refused():
    with pytest.raises(ValueError, match="k must be 0"):
        EvalConfig(k=1)


def test_maj_at_k_groups_math_answers_by_equivalence_not_by_their_last_number():
    """2, 2\\pi, \\sqrt{2} and (1,2) are four values (the GSM8K number parser once put them in one
    group); \\frac{1}{2} and 0.5 are one."""
    from exit_loop.evaluate import majority_correct
    from exit_loop.tasks.math import same_answer as math_equivalent

    def r(i, answer, ok):
        return {"sample_index": i, "format_ok": True, "predicted": answer, "is_correct": ok, "failure": "none" if ok else "wrong"}

    rows = [r(0, "2", False), r(1, r"2\pi", True), r(2, r"\sqrt{2}", False), r(3, "(1,2)", False),
            r(4, r"2\pi", True)]
    assert majority_correct(rows, math_equivalent)      # 2\pi twice wins
    assert not majority_correct(rows[:4] + [r(4, "2.0", False)], math_equivalent)  # 2 and 2.0 win
    half = [r(0, "7", False), r(1, r"\frac{1}{2}", True), r(2, "0.5", True)]
    assert majority_correct(half, math_equivalent)
    ambiguous = [r(0, "3 or 4", False) | {"failure": "ambiguous"}, r(1, "3 or 4", False) | {"failure": "ambiguous"},
                 r(2, "5", True)]
    assert majority_correct(ambiguous)                  # hedges get no vote
