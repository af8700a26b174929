"""`exit-loop audit`: counts per failure class, answer forms, and a seeded sample of accepted
traces (unusual forms first), on a single file and on a run directory; and the Wilson interval
it quotes (exit_loop.stats)."""

from __future__ import annotations

import pytest

from exit_loop.audit import answer_form, audit, read_rows
from exit_loop.cli import main
from exit_loop.jsonl import write_jsonl
from exit_loop.stats import wilson
from exit_loop.verify import verify_row


def test_wilson_against_hand_worked_values():
    # k=0, n=10: centre z^2/(2n)/(1+z^2/n) = 0.19208/1.38415 = 0.13877, half the same: [0, 0.27753]
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    # k=140, n=200: z^2/n = 0.0192073; centre (0.7 + 0.0096036) / 1.0192073 = 0.696231;
    # half 1.959964 * sqrt(0.21/200 + 3.841459/160000) / 1.0192073 = 0.063021 -> [0.63321, 0.75925]
    lo, hi = wilson(140, 200)
    assert (lo, hi) == (pytest.approx(0.63321, abs=1e-5), pytest.approx(0.75925, abs=1e-5))
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


@pytest.mark.parametrize("text,form", [
    ("18", "integer"), ("1,200", "integer"), ("-3", "negative"), ("0.5", "decimal"), ("3/4", "fraction"),
    (r"\frac{3}{4}", "fraction"), ("2 1/2", "mixed number"), (r"1.8 \times 10^{1}", "scientific"),
    ("$18", "with units or currency"), ("18 apples", "with units or currency"), ("x = 18", "equation"),
    (r"\sqrt{2}", "latex"), ("eighteen", "words"), ("", "empty"), (None, "empty"), ("a" * 60, "long text"),
])
def test_answer_forms(text, form):
    assert answer_form(text) == form


def _verified(answers: list[str], truth: str = "18") -> list[dict]:
    return [verify_row({"problem_id": f"train-{i}", "response": f"r </think> <answer>{a}</answer>",
                        "ground_truth": truth}) for i, a in enumerate(answers)]


def test_audit_counts_and_puts_unusual_accepted_forms_first():
    rows = _verified(["18"] * 30 + ["$18", "18.0", "x = 18", "17 or 18", "17", "eighteen"])
    for r in rows:
        r["_where"] = "f:1"
    result = audit(rows, n=5, seed=1)
    assert result["rows"] == 36 and result["accepted"] == 33
    assert result["failures"]["ambiguous"] == 1 and result["failures"]["wrong"] == 2
    assert [form for form, _ in result["sample"][:3]] != ["integer"] * 3
    assert {form for form, _ in result["sample"][:3]} == {"with units or currency", "decimal", "equation"}
    assert all(r["is_correct"] for _, r in result["sample"])
    again = audit(rows, n=5, seed=1)
    assert [r["problem_id"] for _, r in again["sample"]] == [r["problem_id"] for _, r in result["sample"]]


def test_audit_a_file_and_a_run_directory(tmp_path, capsys):
    one = write_jsonl(tmp_path / "gen" / "verified.jsonl", _verified(["18", "$18", "17 or 18"]))
    assert main(["audit", str(one), "--n", "2"]) == 0
    text = (tmp_path / "gen" / "audit.md").read_text()
    assert "| ambiguous | 1 |" in text and "| none | 2 |" in text and "$18" in text
    assert "audit: wrote" in capsys.readouterr().out

    run = tmp_path / "runs" / "exp"
    write_jsonl(run / "round_00" / "verify" / "verified.jsonl", _verified(["18", "17"]))
    write_jsonl(run / "filtered" / "round_01" / "verify" / "verified.jsonl", _verified(["18", "18 18"]))
    assert main(["audit", str(run), "--seed", "3"]) == 0
    text = (run / "audit.md").read_text()
    assert "4 rows, 2 accepted" in text and "round_01" in text
    assert len(read_rows([one])) == 3


def test_audit_errors_name_the_path(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "nowhere")]) != 0
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["audit", str(tmp_path / "empty")]) != 0
    assert "verified.jsonl" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"response": "x"}])
    assert main(["audit", str(bad)]) != 0
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_clopper_pearson_against_closed_forms():
    from exit_loop.stats import clopper_pearson

    # k = 0: the upper end solves (1 - p)^n = 0.025; k = n: the lower end solves p^n = 0.025
    assert clopper_pearson(0, 50) == (0.0, pytest.approx(1 - 0.025 ** (1 / 50), abs=1e-9))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** (1 / 10), abs=1e-9), 1.0)
    lo, hi = clopper_pearson(5, 10)  # the textbook value: [0.1871, 0.8129]
    assert (lo, hi) == (pytest.approx(0.18709, abs=1e-5), pytest.approx(0.81291, abs=1e-5))
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_a_readers_verdicts_give_the_false_positive_rate_with_its_exact_interval(tmp_path, capsys):
    import json

    from exit_loop.audit import ask, read_labels

    f = write_jsonl(tmp_path / "gen" / "verified.jsonl", _verified(["18"] * 40 + ["17"] * 10))
    assert main(["audit", str(f), "--n", "20"]) == 0
    labels = tmp_path / "gen" / "audit_labels.jsonl"
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 20 and all(r["verdict"] is None and r["where"].startswith(str(f)) for r in rows)
    assert "False-positive rate" not in (tmp_path / "gen" / "audit.md").read_text()  # nothing read yet

    for i, r in enumerate(rows):  # the reader marks 2 of the 20 wrong and leaves none unread
        r["verdict"] = "wrong" if i < 2 else "right"
    write_jsonl(labels, rows)
    assert main(["audit", str(f), "--n", "20"]) == 0
    text = (tmp_path / "gen" / "audit.md").read_text()
    # 2 of 20: 10.0%, exact [1.2%, 31.7%]; of 40 accepted rows about 4 [0, 13] likely wrong
    assert "2 of 20 accepted traces read are wrong: 10.0%, exact 95% interval [1.2%, 31.7%]" in text
    assert "Of the 40 accepted rows, about 4 [0, 13] are likely wrong" in text
    assert read_labels(labels) == rows  # read, never overwritten

    rows[0]["verdict"] = "maybe"
    write_jsonl(labels, rows)
    assert main(["audit", str(f)]) != 0
    assert "audit_labels.jsonl:1: key 'verdict'" in capsys.readouterr().err

    # --interactive's questions: y, n, an unknown answer asked again, skip, then the input closes
    marks = [{"where": f"f:{i}", "predicted": "18", "ground_truth": "18", "response": "r", "verdict": None}
             for i in range(5)]
    answers = iter(["y", "n", "what", "s"])

    def answer(prompt: str) -> str:
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    ask(marks, answer, show=lambda text: None)
    assert [m["verdict"] for m in marks] == ["right", "wrong", None, None, None]


def test_reverify_counts_and_shows_what_a_verifier_change_moves(tmp_path, capsys):
    import json

    rows = _verified(["18", "$18", "17 or 18", "17", "18"])
    # the labels an older verifier stored: it accepted the hedge and refused "$18"
    rows[1].update(is_correct=False, failure="wrong")
    rows[2].update(is_correct=True, failure="none")
    f = write_jsonl(tmp_path / "run" / "round_01" / "verify" / "verified.jsonl", rows)
    stored = f.read_bytes()
    assert main(["reverify", str(tmp_path / "run"), "--examples", "1"]) == 0
    diff = json.loads((tmp_path / "run" / "reverify.json").read_text())
    assert (diff["rows"], diff["changed"], diff["newly_accepted"], diff["no_longer_accepted"]) == (5, 2, 1, 1)
    assert diff["changes"] == {"wrong → none": 1, "none → ambiguous": 1}
    assert (diff["accepted_before"], diff["accepted_now"]) == (3, 3)
    assert diff["examples"]["none → ambiguous"][0]["where"] == f"{f}:3"
    text = (tmp_path / "run" / "reverify.md").read_text()
    assert "| wrong → none | 1 |" in text and "17 or 18" in text
    assert "2 of 5 verdicts changed" in capsys.readouterr().out
    assert f.read_bytes() == stored  # the stored rows are only read


def test_reverify_rewrite_writes_a_generations_splits_again_and_keeps_the_old_ones(tmp_path, capsys):
    import json

    from exit_loop.jsonl import read_jsonl, sha256_file
    from exit_loop.pipeline.generate import GenerateConfig, finish

    out = tmp_path / "gen"
    rows = [{**r, "prompt": f"q{i}", "sample_index": 0} for i, r in enumerate(_verified(["18", "$18", "17 or 18", "17"]))]
    samples = write_jsonl(out / "samples.jsonl", [{k: r[k] for k in ("problem_id", "prompt", "response", "ground_truth",
                                                                     "sample_index")} for r in rows])
    cfg = GenerateConfig(output_dir=str(out))
    finish(cfg, samples, {})  # a generation as `exit-loop generate` leaves it
    all_split = read_jsonl(out / "sft_r1_all.jsonl")
    all_split[1].update(is_correct=False, failure="wrong")  # the labels an older verifier stored
    all_split[2].update(is_correct=True, failure="none")
    write_jsonl(out / "sft_r1_all.jsonl", all_split)
    write_jsonl(out / "sft_r1_correct.jsonl", [{"prompt": "q0", "response": rows[0]["response"]},
                                               {"prompt": "q2", "response": rows[2]["response"]}])
    old_correct = (out / "sft_r1_correct.jsonl").read_bytes()

    assert main(["reverify", str(out), "--rewrite"]) == 0
    assert [r["prompt"] for r in read_jsonl(out / "sft_r1_correct.jsonl")] == ["q0", "q1"]  # the hedge out, "$18" in
    assert [r["is_correct"] for r in read_jsonl(out / "sft_r1_all.jsonl")] == [True, True, False, False]
    assert (out / "sft_r1_correct.before_reverify_00.jsonl").read_bytes() == old_correct
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["sft_r1_correct.jsonl"] == sha256_file(out / "sft_r1_correct.jsonl")
    assert manifest["counts"]["correct_split_rows"] == 2
    assert manifest["reverified"][0]["changes"] == {"wrong → none": 1, "none → ambiguous": 1}
    assert json.loads((out / "summary.json").read_text())["failures"]["ambiguous"] == 1

    assert main(["reverify", str(out), "--rewrite"]) == 0  # again: nothing changes, the first backup stays
    assert (out / "sft_r1_correct.before_reverify_01.jsonl").exists()
    assert (out / "sft_r1_correct.before_reverify_00.jsonl").read_bytes() == old_correct
    assert json.loads((out / "reverify.json").read_text())["changed"] == 0
    assert main(["reverify", str(tmp_path / "nowhere"), "--rewrite"]) != 0
    assert "--rewrite takes a generation's output directory" in capsys.readouterr().err
