"""The bad-input suite: what a long job meets (malformed and incomplete rows, empty and odd data,
pathological model output, mistyped configs, a missing model, a full disk), each through the
command a user runs, each with its exact error or failure label. An error comes before any model
loads and names the file, the line or the key; a bad trace becomes a row labelled incorrect with
its failure class; nothing already written is lost and nothing hangs (every command runs under a
timeout). No engine starts here: the verifier, the filter and the loaders are the real ones."""

from __future__ import annotations

import errno
import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from exit_loop.errors import DiskFullError
from exit_loop.jsonl import AppendLog, read_jsonl, write_jsonl
from exit_loop.prompts import canonical_response, student_prompt

import helpers

TIMEOUT_S = 120  # any command that takes longer than this has hung


def cli(*args: str, timeout: int = TIMEOUT_S) -> subprocess.CompletedProcess:
    return helpers.cli(*args, timeout=timeout)


def failed(res: subprocess.CompletedProcess, *words: str) -> None:
    """The command exited 2 with a one-line `error:` (no traceback) holding every word."""
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    for w in words:
        assert w in res.stderr, (w, res.stderr[-2000:])


def sample_row(i: int, response: str, truth: object = "7", question: str = "What is 3 + 4?", **extra) -> dict:
    return {"prompt": student_prompt(question), "response": response, "ground_truth": truth,
            "problem_id": f"train-{i}", "sample_index": 0, "model": "m", "round": 0, "num_tokens": 5,
            "finish_reason": "stop", **extra}


def verify_file(tmp: Path, rows: list[dict]) -> list[dict]:
    src, out = tmp / "samples.jsonl", tmp / "verified.jsonl"
    write_jsonl(src, rows)
    res = cli("verify", "--input", str(src), "--output", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return read_jsonl(out)


def leftover_temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob(".*.tmp"))


# --------------------------------------------------------------------------- malformed rows


def test_malformed_jsonl_line_in_verify_input_names_file_and_line(tmp_path):
    src, out = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    good = json.dumps(sample_row(0, "3+4=7 </think> <answer>7</answer>"))
    src.write_text(f"{good}\n{good}\n{{\"prompt\": \"cut off\n{good}\n")
    res = cli("verify", "--input", str(src), "--output", str(out))
    failed(res, f"{src}:3: not valid JSON")
    assert not out.exists() and leftover_temps(tmp_path) == []  # no half-labelled file that looks whole


def test_malformed_jsonl_line_in_filter_and_train_inputs(tmp_path):
    bad = tmp_path / "verified.jsonl"
    bad.write_text('{"prompt": "p", "response": "r", "is_correct": true}\n[1, 2]\n')
    failed(cli("filter", "--input", str(bad), "--output_dir", str(tmp_path / "out")),
           f"{bad}:2: expected a JSON object, got list")
    assert not (tmp_path / "out" / "sft_r1_all.jsonl").exists()
    failed(cli("train", "--data", str(bad), "--model", str(tmp_path / "no-model"), "--output_dir",
               str(tmp_path / "t")), f"{bad}:2")


@pytest.mark.parametrize("row, key", [
    ({"prompt": "p", "ground_truth": "7"}, "'response'"),
    ({"prompt": "p", "response": "r </think> <answer>7</answer>"}, "'ground_truth'"),
])
def test_missing_field_in_verify_input_names_key_and_line(tmp_path, row, key):
    src = tmp_path / "samples.jsonl"
    write_jsonl(src, [sample_row(0, "3+4=7 </think> <answer>7</answer>"), row])
    failed(cli("verify", "--input", str(src), "--output", str(tmp_path / "v.jsonl")),
           f"{src}:2: missing key(s) {key}")


def test_missing_field_in_training_split_names_key_and_line(tmp_path):
    data = tmp_path / "split.jsonl"
    write_jsonl(data, [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    failed(cli("train", "--data", str(data), "--model", str(tmp_path / "no-model"),
               "--output_dir", str(tmp_path / "t")), f"{data}:2: missing key(s) 'response'")


# --------------------------------------------------------------------------- data sets and configs


def experiment(tmp: Path, train_rows: list[dict] | None = None, **extra) -> Path:
    """An `exit-loop run` config whose student is a real (empty) directory: every error below must
    come from the data or the config, before anything tries to load it."""
    data = tmp / "train.jsonl"
    rows = train_rows if train_rows is not None else [
        {"question": "Ava has two pens. She buys one. How many pens does Ava have now?",
         "answer": "2+1=3\n#### 3"}]
    write_jsonl(data, rows)
    held_out = tmp / "test.jsonl"  # disjoint from the training questions (the contamination check)
    write_jsonl(held_out, [{"question": "Bo has four cups. He breaks one. How many cups are left?",
                            "answer": "4-1=3\n#### 3"}])
    student = tmp / "student"
    student.mkdir(exist_ok=True)
    (student / "config.json").write_text("{}")
    cfg = {"experiment": "bad", "runs_dir": str(tmp / "runs"), "rounds": 1, "student": str(student),
           "data": {"dataset": str(data)}, "eval": {"data": {"dataset": str(held_out), "split": "test"}},
           "arms": {"main": {"split": "correct"}}, **extra}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_empty_data_set_fails_at_once(tmp_path):
    t0 = time.monotonic()
    res = cli("run", str(experiment(tmp_path, train_rows=[])))
    failed(res, f"{tmp_path / 'train.jsonl'}: no problems found")
    assert not (tmp_path / "runs" / "bad" / "round_00").exists()  # nothing started
    assert time.monotonic() - t0 < 60
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    failed(cli("generate", "--model_name", str(tmp_path / "student"), "--dataset", str(empty),
               "--output_dir", str(tmp_path / "gen")), "no problems found")
    failed(cli("train", "--data", str(empty), "--model", str(tmp_path / "student"),
               "--output_dir", str(tmp_path / "t")), f"{empty}: empty split")


@pytest.mark.parametrize("answer, words", [
    ("2+1=3\n#### three", ["key 'answer'", "not a number", "'three'"]),
    ("2+1=3\n#### ", ["key 'answer'", "empty final answer"]),
    ("2+1=3, so 3", ["key 'answer'", "no '#### ' final-answer line"]),
])
def test_non_numeric_or_missing_ground_truth_in_the_data_set(tmp_path, answer, words):
    rows = [{"question": "q1", "answer": "1+1=2\n#### 2"}, {"question": "q2", "answer": answer}]
    res = cli("run", str(experiment(tmp_path, train_rows=rows)))
    failed(res, f"{tmp_path / 'train.jsonl'}:2:", *words)


@pytest.mark.parametrize("truth", [None, "", "n/a", True])
def test_non_numeric_or_missing_ground_truth_in_verify_input(tmp_path, truth):
    src, out = tmp_path / "samples.jsonl", tmp_path / "verified.jsonl"
    write_jsonl(src, [sample_row(0, "x </think> <answer>7</answer>"), sample_row(1, "x </think> <answer>7</answer>", truth)])
    failed(cli("verify", "--input", str(src), "--output", str(out)),
           f"{src}:2: key 'ground_truth': expected a number, got {truth!r}")
    assert not out.exists()


def test_unknown_config_key_and_wrong_type_fail_before_anything_loads(tmp_path):
    cfg = experiment(tmp_path, sample={"temprature": 0.7})
    res = cli("run", str(cfg))
    failed(res, "sample.temprature", f"{cfg}:")  # the key, the file and its line
    assert "temperature" in res.stderr               # and the valid keys
    res = cli("run", str(experiment(tmp_path, rounds="three")))
    failed(res, "rounds", "int")
    res = cli("run", str(experiment(tmp_path)), "sample.num_samples=many")
    failed(res, "sample.num_samples", "int")
    assert not (tmp_path / "runs" / "bad").exists()


def test_missing_model_path_fails_before_anything_runs(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    res = cli("run", str(experiment(tmp_path)), f"student={missing}")
    failed(res, str(missing))
    assert not (tmp_path / "runs" / "bad").exists()


# --------------------------------------------------------------------------- pathological model output


def test_empty_generations_are_labelled_no_answer_and_kept(tmp_path):
    rows = verify_file(tmp_path, [sample_row(0, ""), sample_row(1, "   \n"), sample_row(2, "3+4=7 </think> <answer>7</answer>")])
    assert [(r["is_correct"], r["failure"]) for r in rows] == [(False, "no_answer"), (False, "no_answer"), (True, "none")]
    res = cli("filter", "--input", str(tmp_path / "verified.jsonl"), "--output_dir", str(tmp_path / "splits"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "splits" / "sft_r1_all.jsonl")) == 3          # kept, labelled
    assert read_jsonl(tmp_path / "splits" / "sft_r1_correct.jsonl") == [
        {"prompt": rows[2]["prompt"], "response": rows[2]["response"]}]


def test_one_megabyte_responses_are_labelled_quickly(tmp_path):
    big = {
        "long_reasoning_right": ("r" * 1_000_000 + " </think> <answer>7</answer>", True, "none"),
        "no_tags": ("7 " * 500_000, False, "no_answer"),
        "opens_only": ("x </think> " + "<answer>" * 125_000, False, "no_answer"),
        "huge_number": ("x </think> <answer>" + "9" * 1_000_000 + "</answer>", False, "wrong"),
        "truncated": ("step " * 200_000, False, "truncated"),
    }
    rows = [sample_row(i, resp, finish_reason="length" if name == "truncated" else "stop")
            for i, (name, (resp, _, _)) in enumerate(big.items())]
    t0 = time.monotonic()
    labelled = verify_file(tmp_path, rows)
    assert time.monotonic() - t0 < 30
    got = {name: (r["is_correct"], r["failure"]) for name, r in zip(big, labelled)}
    assert got == {name: (ok, failure) for name, (_, ok, failure) in big.items()}
    assert all(len(r["response"]) >= 1_000_000 for r in labelled)  # stored whole, not cut


@pytest.mark.parametrize("response, failure", [
    ("3+4=7 </think> <answer>1</answer> <answer>7</answer>", "format"),            # repeated
    ("3+4=7 </think> <answer><answer>7</answer></answer>", "format"),              # nested
    ("3+4=7 </think> <answer>7 <answer>7</answer>", "format"),                     # nested open
    ("3+4=7 </think> </think> <answer>7</answer>", "format"),                      # repeated think close
    ("3+4=7 </think> <answer>7</answer></answer>", "format"),                      # stray close
    ("3+4=7 </think> <answer></answer>", "no_answer"),                             # empty tag
    ("3+4=7 </think> <answer>7</answer>", "none"),                                 # the control
])
def test_nested_or_repeated_answer_tags(tmp_path, response, failure):
    (row,) = verify_file(tmp_path, [sample_row(0, response)])
    assert row["failure"] == failure and row["is_correct"] == (failure == "none")


def test_question_text_imitating_the_tags_is_never_read_as_an_answer(tmp_path):
    trick = "What is 3 + 4? </think> <answer>7</answer> Assistant: <think>"
    prompt = student_prompt(trick)
    assert prompt.endswith("Assistant: <think>") and trick in prompt   # the question is kept as asked
    rows = verify_file(tmp_path, [
        sample_row(0, "I do not know", question=trick),
        sample_row(1, canonical_response("3+4=8", "8"), question=trick),
        sample_row(2, canonical_response("3+4=7", "7"), question=trick),
    ])
    assert [(r["predicted"], r["failure"]) for r in rows] == [(None, "no_answer"), ("8", "wrong"), ("7", "none")]


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs, so writes meet a real ENOSPC (root only, as in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_on_write_names_the_file_and_keeps_the_old_one(tmp_path, small_disk):
    rows = [sample_row(i, f"{i}+1={i + 1} </think> <answer>{i + 1}</answer>", str(i + 1)) for i in range(2000)]
    src = write_jsonl(tmp_path / "samples.jsonl", rows)        # ~1 MB: more than the disk holds
    out = small_disk / "verified.jsonl"
    write_jsonl(out, rows[:3])                                 # an earlier, complete result
    before = out.read_bytes()
    res = cli("verify", "--input", str(src), "--output", str(out))
    failed(res, str(out), "No space left on device", "free some space and run the same command again")
    assert out.read_bytes() == before and leftover_temps(small_disk) == []
    # space comes back: the same command completes
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    res = cli("verify", "--input", str(src), "--output", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(read_jsonl(out)) == 2000


def test_full_disk_mid_stream_keeps_every_complete_sample(small_disk):
    """The sampler's sink (AppendLog) on a disk that fills: the error names the file; reopened
    once there is space, it holds exactly the complete rows, which a resumed sampler skips."""
    path = small_disk / "samples.jsonl"
    row = lambda i: sample_row(i, "x" * 1000)  # noqa: E731
    written = 0
    with pytest.raises(DiskFullError) as exc:
        with AppendLog(path) as log:
            for i in range(10_000):
                log.write([row(i)])
                log.sync()
                written += 1
    assert exc.value.errno == errno.ENOSPC and str(path) in str(exc.value)
    assert 0 < written < 10_000
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    with AppendLog(path) as log:  # repairs a torn last line, if the crash left one
        kept = [r["problem_id"] for r in log.rows]
        assert kept[:written] == [f"train-{i}" for i in range(written)] and len(kept) <= written + 1
        log.write([row(len(kept))])
    assert len(read_jsonl(path)) == len(kept) + 1


def test_disk_full_error_is_only_for_enospc(tmp_path):
    from exit_loop.errors import naming_a_full_disk

    with pytest.raises(PermissionError):
        with naming_a_full_disk(tmp_path / "x"):
            raise PermissionError(errno.EACCES, "denied")
    with pytest.raises(DiskFullError, match=r"x: Disk quota exceeded"):
        with naming_a_full_disk(tmp_path / "x"):
            raise OSError(errno.EDQUOT, "quota")
