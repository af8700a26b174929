"""STaR rationalization (`policy.rationalize`, an arm's `rationalize`): the questions none of a
round's samples solved are drawn again with the answer as a hint; the hint reaches the sampler but
never a stored prompt, the eval or an arm that does not rationalize; hinted rows are counted apart
and train in the student's context token for token. Unit tests on hand-made rows, and one engine
test of a shared round 0 (rollout, verify, filter) on the tiny model with the real vLLM engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exit_loop.config import ConfigError, load_config
from exit_loop.evaluate import EvalConfig, evaluate
from exit_loop.filter import FilterConfig, filter_rows
from exit_loop.jsonl import read_jsonl
from exit_loop.pipeline import stages
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.prompts import HINTED_CONTEXT, hinted_question, student_prompt
from exit_loop.rundir import SAMPLES_HINTED, VERIFIED_HINTED
from exit_loop.sample import SampleConfig
from exit_loop.sample.__init__ import asked
from exit_loop.tasks import Problem, load_problems
from exit_loop.tokens import encode_prompt
from exit_loop.train import TrainConfig
from exit_loop.train.data import read_splits, tokenize_rows

from helpers import cli, env, tiny_run, write_yaml


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def config(tmp: Path, *extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [f"runs_dir={tmp}", "student=x/y", *extra])


def test_the_hint_is_the_question_and_its_answer_and_only_where_asked():
    p = Problem("train-1", "  Tom has 3 apples and buys 4. How many? ", "7", "3 + 4 = 7")
    assert hinted_question(p.question, p.ground_truth) == "Tom has 3 apples and buys 4. How many?\nHint: the answer is 7."
    assert asked(p, SampleConfig(hint=True)).endswith("Hint: the answer is 7.")
    assert asked(p, SampleConfig()) == p.question


def test_rationalize_is_checked_and_resolved_per_arm_and_shared_round(tmp_path: Path):
    with pytest.raises(ConfigError, match="sample.hint"):
        config(tmp_path, "sample.hint=true")  # a run would evaluate with the answers shown
    with pytest.raises(ConfigError, match="rationalize"):
        config(tmp_path, "arms={g: {split: original, rationalize: true}}")
    with pytest.raises(ConfigError, match="rationalize_samples"):
        config(tmp_path, "policy.rationalize_samples=0")
    run = Run(config(tmp_path, "arms={plain: {split: correct}, star: {split: correct, rationalize: true}, "
                               "gold: {split: original}}"))
    assert run.rationalizes("plain", 0, "sample") and not run.rationalizes("gold", 0, "sample")  # gold never samples
    assert not run.rationalizes("plain", 0, "filter") and run.rationalizes("star", 0, "filter")
    assert not run.rationalizes("plain", 1, "sample") and run.rationalizes("star", 1, "sample")
    everyone = Run(config(tmp_path, "policy.rationalize=true", "arms={a: {split: correct}, b: {rationalize: false}}"))
    assert everyone.rationalizes("a", 1, "sample") and not everyone.rationalizes("b", 1, "filter")


def test_an_eval_with_a_hint_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match="hint"):
        evaluate(EvalConfig(output_dir=str(tmp_path), sample=SampleConfig(model_name=str(tmp_path), hint=True)))


def labelled(qid: int, k: int, correct: bool, response: str, **extra) -> dict:
    return {"problem_id": f"train-{qid}", "sample_index": k, "prompt": student_prompt(f"Question {qid}?"),
            "response": response, "ground_truth": "7", "predicted": "7" if correct else "8", "is_correct": correct,
            "format_ok": True, "failure": "none" if correct else "wrong", "num_tokens": 5, "finish_reason": "stop",
            **extra}


def test_hinted_rows_train_but_are_counted_apart_from_the_students_own():
    own = [labelled(0, 0, True, "a </think> <answer>7</answer>"), labelled(0, 1, False, "b </think> <answer>8</answer>"),
           labelled(1, 0, False, "c </think> <answer>8</answer>"), labelled(1, 1, False, "d </think> <answer>8</answer>")]
    hinted = [labelled(1, 0, True, "e </think> <answer>7</answer>", hinted=True),
              labelled(1, 1, False, "f </think> <answer>8</answer>", hinted=True)]
    plain = filter_rows(own, FilterConfig()).summary
    splits = filter_rows(own + hinted, FilterConfig())
    s = splits.summary
    for key in ("traces", "correct_traces", "trace_accuracy", "questions", "questions_solved", "failures"):
        assert s[key] == plain[key], key  # the student's own figures: the hint bought none of them
    assert s["hinted"] == {"traces": 2, "correct_traces": 1, "questions": 1, "questions_solved": 1,
                           "correct_split_rows": 1, "context": HINTED_CONTEXT}
    assert {"prompt": student_prompt("Question 1?"), "response": "e </think> <answer>7</answer>"} in splits.correct
    assert s["correct_split_rows"] == 2 and len(splits.all) == 6
    assert [r.get("hinted") for r in splits.all] == [None] * 4 + [True, True]
    assert "hinted" not in plain


@pytest.mark.engine
def test_a_shared_round_zero_draws_hinted_samples_for_the_arm_that_rationalizes(
        tmp_path: Path, tiny_model_dir: Path, gsm8k_dir: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = tiny_run(tmp_path, "star", tiny_model_dir, gsm8k_dir, rounds=1, questions=4, max_tokens=12, sft={},
                   arms={"plain": {"split": "all"}, "star": {"split": "all", "rationalize": True}},
                   isolate=False)
    cfg["policy"] = {"rationalize_samples": 1}
    run = Run(load_config(ExperimentConfig, write_yaml(tmp_path / "star.yaml", cfg)))
    asked_prompts: list[str] = []  # what the real engine was given, request by request
    start = stages.start_backend

    def recording(scfg):
        backend = start(scfg)
        generate = backend.generate

        def generate_and_record(requests, on_done, c):
            asked_prompts.extend(r.prompt for r in requests)
            return generate(requests, on_done, c)

        backend.generate = generate_and_record
        return backend

    monkeypatch.setattr(stages, "start_backend", recording)
    for name in ("rollout", "verify"):
        stages.run_stage(run, name, "plain", 0)
    for arm in ("plain", "star"):
        stages.run_stage(run, "filter", arm, 0)

    sample_dir = run.real_dir("plain", 0, "sample")
    own = read_jsonl(sample_dir / "samples.jsonl")
    hinted = read_jsonl(sample_dir / SAMPLES_HINTED)
    questions = {p.id: p for p in load_problems(run.cfg.data)}
    assert len(own) == 8 and all(not r.get("hinted") and isinstance(r["prompt_tokens"], int) for r in own)
    unsolved = {r["problem_id"] for r in own} - {r["problem_id"] for r in read_jsonl(
        run.real_dir("plain", 0, "verify") / "verified.jsonl") if r["is_correct"]}
    assert {r["problem_id"] for r in hinted} == unsolved and len(hinted) == len(unsolved)  # one each
    for r in hinted:  # the stored prompt is the plain one: the student never sees the hint
        q = questions[r["problem_id"]]
        assert r["hinted"] and r["prompt"] == student_prompt(q.question) and "Hint" not in r["prompt"]
        assert "prompt_tokens" not in r  # not sampled in the context it is stored with
    hint_prompts = [p for p in asked_prompts if "Hint: the answer is" in p]
    assert len(hint_prompts) == len(unsolved)  # the hint reached the engine, for hinted draws only
    assert sorted(hint_prompts) == sorted(student_prompt(hinted_question(questions[i].question,
                                                                         questions[i].ground_truth)) for i in unsolved)
    assert len(asked_prompts) == 4 + 4 + len(unsolved)  # eval (greedy), samples, hinted: never the eval

    manifest = load(sample_dir / "manifest.json")
    assert manifest["hinted"]["questions"] == len(unsolved) and manifest["hinted"]["context"] == HINTED_CONTEXT
    assert manifest["counts"]["samples"] == 8  # the student's own, apart
    assert (run.real_dir("plain", 0, "verify") / VERIFIED_HINTED).exists()

    plain_all = read_jsonl(run.stage_dir("plain", 0, "filter") / "sft_r1_all.jsonl")
    star_all = read_jsonl(run.stage_dir("star", 0, "filter") / "sft_r1_all.jsonl")
    assert not any(r.get("hinted") for r in plain_all) and len(plain_all) == 8
    assert len(star_all) == 8 + len(unsolved) and sum(bool(r.get("hinted")) for r in star_all) == len(unsolved)
    star_summary = load(run.stage_dir("star", 0, "filter") / "summary.json")
    plain_summary = load(run.stage_dir("plain", 0, "filter") / "summary.json")
    assert star_summary["traces"] == plain_summary["traces"] == 8 and star_summary["hinted"]["traces"] == len(unsolved)

    # token for token: a hinted row trains on the ids the student's sampler feeds for the plain prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tcfg = TrainConfig(data=[str(run.stage_dir("star", 0, "filter") / "sft_r1_all.jsonl")], model=str(tiny_model_dir),
                       truncated="no_eos")
    rows, _ = read_splits(tcfg.data)
    fed = {r["problem_id"]: r["prompt_tokens"] for r in own}
    for row, ids in zip(rows, tokenize_rows(rows, tcfg, tok, tok.eos_token_id, None)[0]):
        pid = next(r["problem_id"] for r in star_all if r["prompt"] == row["prompt"])
        assert ids["completion_mask"].count(0) == len(encode_prompt(tok, row["prompt"])) == fed[pid]


@pytest.mark.engine
def test_the_evals_sampled_draws_never_change_what_a_round_samples(tmp_path: Path, tiny_model_dir: Path,
                                                                    gsm8k_dir: Path):
    """eval.n draws from the engine's random stream: they come after the round's own samples on a
    shared engine, so a run with them samples exactly what it samples without them. Each run in its
    own process with the engine in it (vLLM's engine-core subprocess does not sample reproducibly
    across runs on CPU; the quickstart runs in-process too). Fails when the sampled eval draws first."""
    drawn, measured = {}, {}
    for n in (None, 3):
        cfg = tiny_run(tmp_path, f"n{n}", tiny_model_dir, gsm8k_dir, rounds=1, questions=4, max_tokens=12, sft={})
        cfg["sample"]["temperature"] = 1.0
        cfg["eval"]["n"] = n
        run = Run(load_config(ExperimentConfig, write_yaml(tmp_path / f"n{n}.yaml", cfg)))
        write_yaml(run.top / "config.yaml", cfg)  # what `exit-loop run` writes before its stages
        res = cli("stage", "rollout", str(run.top), "--arm", "main", "--round", "0", timeout=300,
                  environ=env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        drawn[n] = [r["response"] for r in read_jsonl(run.real_dir("main", 0, "sample") / "samples.jsonl")]
        measured[n] = (run.real_dir("main", 0, "eval") / "samples_k.jsonl").exists()
    assert measured == {None: False, 3: True}
    assert drawn[None] == drawn[3] and len(set(drawn[3])) > 1  # sampled (not greedy), and the same
