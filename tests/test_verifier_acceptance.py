"""The verifier acceptance suite: 311 labelled cases (tests/data/verifier_acceptance.jsonl) run
through `exit-loop verify`, GSM8K and MATH, with zero false positives allowed.

Each case is a student response, a ground truth and the verdict under this project's strict rule
(an answer names exactly one value; exact equality where values are exact; when in doubt, not
correct), which is not always the source grader's verdict. How each source was read
(tests/data/README.md has the detail and the counts):

- lm-evaluation-harness (MIT): the GSM8K task's `strict-match` and `flexible-extract` regexes and
  issues about answer extraction; inputs they mishandle became cases, labelled by our rule.
- Math-Verify (Apache-2.0; tests/test_all.py carries an MIT header): its tests (numbers,
  fractions, mixed numbers, LaTeX, sets, intervals, relations) and issues (tiny values called
  equal, lists, percentages); its expected verdicts re-labelled where our rule is stricter.
- Qwen2.5-Math's grader (`evaluation/grader.py`, `parser.py`, Apache-2.0), PRM800K's grader
  (`grading/grader.py`, `math_normalize.py`, MIT), verl's reward functions
  (`verl/utils/reward_score/gsm8k.py`, `math.py`, Apache-2.0), open-r1's rewards and tests
  (`src/open_r1/rewards.py`, Apache-2.0), the CS336 grader (MIT), HELM and inspect_ai: normaliser
  inputs and the tolerance rules they encode (relative or absolute), turned into cases.
- this project's own earlier `tests/test_verify.py` cases and issue 16's list of holes.
- hand-written `hedging` cases: forms a student could learn to exploit a last-number grader
  (alternatives, ranges, lists, repeated numbers, unevaluated expressions ending in the truth,
  several boxes, hedging words).

Known false negatives (a correct answer not accepted) are listed below by id; the goal is none.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from exit_loop.cli import main
from exit_loop.jsonl import read_jsonl, write_jsonl

CASES = Path(__file__).parent / "data" / "verifier_acceptance.jsonl"
KNOWN_FALSE_NEGATIVES = {
    "mathverify-mix-01",  # "The answer is 4 4/9." for 40/9 on the MATH path: math-verify reads it as 16/9
}


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory) -> dict[str, dict]:
    """Every case's row after `exit-loop verify` (one run per task), by id."""
    work = tmp_path_factory.mktemp("acceptance")
    by_task = defaultdict(list)
    for case in read_jsonl(CASES):
        by_task[case["task"]].append({"id": case["id"], "response": case["response"],
                                      "ground_truth": case["ground_truth"]})
    out = {}
    for task, rows in by_task.items():
        src, dst = work / f"{task}.jsonl", work / f"{task}.verified.jsonl"
        write_jsonl(src, rows)
        args = ["verify", "--task", task, "--input", str(src), "--output", str(dst)]
        assert main(args + (["math_workers=2"] if task == "math" else [])) == 0
        out.update({r["id"]: r for r in read_jsonl(dst)})
    return out


def test_the_suite_is_well_formed():
    cases = read_jsonl(CASES)
    assert len(cases) >= 150 and len({c["id"] for c in cases}) == len(cases)
    assert {c["task"] for c in cases} == {"gsm8k", "math"}
    for c in cases:
        assert c["expected_correct"] == (c["expected_class"] == "none"), c["id"]
        assert c["source"] and c["licence"], c["id"]


def test_no_false_positives(verdicts):
    cases = {c["id"]: c for c in read_jsonl(CASES)}
    assert set(verdicts) == set(cases)
    false_positives = sorted(i for i, r in verdicts.items() if r["is_correct"] and not cases[i]["expected_correct"])
    assert not false_positives, "accepted but not correct under the strict rule:\n" + "\n".join(
        f"{i}: {cases[i]['response'][-80:]!r} vs {cases[i]['ground_truth']!r}" for i in false_positives)


def test_false_negatives_are_only_the_known_ones(verdicts):
    cases = {c["id"]: c for c in read_jsonl(CASES)}
    false_negatives = {i for i, r in verdicts.items() if not r["is_correct"] and cases[i]["expected_correct"]}
    print(f"false negatives ({len(false_negatives)}): {sorted(false_negatives)}")
    assert false_negatives <= KNOWN_FALSE_NEGATIVES, f"new false negatives: {sorted(false_negatives - KNOWN_FALSE_NEGATIVES)}"


def test_gsm8k_hedges_are_labelled_ambiguous(verdicts):
    """Every GSM8K case the suite calls ambiguous gets the `ambiguous` class (not just 'not correct')."""
    cases = [c for c in read_jsonl(CASES) if c["task"] == "gsm8k" and c["expected_class"] == "ambiguous"]
    assert len(cases) >= 50
    other = {c["id"]: verdicts[c["id"]]["failure"] for c in cases if verdicts[c["id"]]["failure"] != "ambiguous"}
    assert not other, json.dumps(other)
