"""`exit-loop generate` end to end on a tiny model: the real vLLM engine (CPU build) and the HF
backend, resume after SIGKILL, fallback, and the errors a user meets first."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from exit_loop.filter import ALL_KEYS
from exit_loop.jsonl import read_jsonl
from exit_loop.tokens import count_tokens

from helpers import env, exit_loop_cmd

N_PROBLEMS, N_SAMPLES = 32, 4
CORRECT_KEYS = {"prompt", "response"}


def generate_args(model: Path, data: Path, out: Path, backend: str, *extra: str) -> list[str]:
    return exit_loop_cmd("generate", "--model_name", str(model), "--dataset", str(data),
               "--num_examples", str(N_PROBLEMS), "--num_samples", str(N_SAMPLES),
               "--backend", backend, "--output_dir", str(out),
               "sample.max_tokens=96", "sample.dtype=float32", "sample.enforce_eager=true",
               "sample.temperature=1.0", *extra)


@functools.cache
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def check_splits(out: Path) -> list[dict]:
    all_rows = read_jsonl(out / "sft_r1_all.jsonl")
    assert len(all_rows) == N_PROBLEMS * N_SAMPLES
    pairs = [(r["problem_id"], r["sample_index"]) for r in all_rows]
    assert len(set(pairs)) == len(pairs), "a (problem, sample) pair appears twice"
    assert set(pairs) == {(f"train-{i}", k) for i in range(N_PROBLEMS) for k in range(N_SAMPLES)}
    for r in all_rows:
        assert tuple(r)[: len(ALL_KEYS)] == ALL_KEYS
        assert r["prompt"].endswith("Assistant: <think>")
        assert r["failure"] in {"none", "no_answer", "format", "truncated", "wrong"}
        # the stored response in the student's tokens (here the sampler's own tokenizer): what SFT
        # will see, which may differ from the tokens generated (a cut byte sequence re-tokenises)
        assert r["num_tokens"] == count_tokens(_tokenizer(r["model"]), r["response"])
        assert r["finish_reason"] in {"stop", "length"}
        assert (r["failure"] == "none") == r["is_correct"]
    correct = read_jsonl(out / "sft_r1_correct.jsonl")
    assert all(set(r) == CORRECT_KEYS for r in correct)
    assert len(correct) == sum(r["is_correct"] for r in all_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["traces"] == N_PROBLEMS * N_SAMPLES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["traces"] == N_PROBLEMS * N_SAMPLES
    return all_rows


@pytest.mark.engine
def test_vllm_generate_killed_midway_then_resumed(tiny_model_dir: Path, gsm8k_train: Path, tmp_path: Path):
    """SIGKILL `exit-loop generate` (vLLM backend) once samples have started to land; the same
    command again completes with exactly N x n rows, none twice, none missing."""
    out = tmp_path / "gen"
    samples = out / "samples.jsonl"
    # a small batch makes requests finish in waves, so there is a moment to kill mid-run
    args = generate_args(tiny_model_dir, gsm8k_train, out, "vllm", 'sample.engine={"max_num_seqs": 4}')
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while count_lines(samples) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate()[0].decode(errors="replace")
    killed_at = count_lines(samples)
    assert 0 < killed_at < N_PROBLEMS * N_SAMPLES, f"not killed mid-run ({killed_at} rows)\n{log[-3000:]}"
    assert not (out / "manifest.json").exists()

    res = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = check_splits(out)
    assert {r["backend"] for r in rows} == {"vllm"}
    assert count_lines(samples) == N_PROBLEMS * N_SAMPLES

    # a third run has nothing left to sample and starts no engine
    res = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    assert "already complete" in res.stdout
    assert "EngineCore" not in res.stdout + res.stderr


@pytest.mark.engine
def test_hf_backend_generate(tiny_model_dir: Path, gsm8k_train: Path, tmp_path: Path):
    out = tmp_path / "gen_hf"
    res = subprocess.run(generate_args(tiny_model_dir, gsm8k_train, out, "hf", "sample.hf_batch_size=32"),
                         env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = check_splits(out)
    assert {r["backend"] for r in rows} == {"hf"}


@pytest.mark.engine
def test_auto_falls_back_to_hf_when_vllm_fails(tiny_model_dir: Path, gsm8k_train: Path, tmp_path: Path):
    """vLLM really fails to start here (a context longer than the model allows); `auto` says why
    and finishes the job with HF."""
    out = tmp_path / "gen_auto"
    res = subprocess.run(
        exit_loop_cmd("generate", "--model_name", str(tiny_model_dir), "--dataset", str(gsm8k_train),
            "--num_examples", "4", "--num_samples", "2", "--output_dir", str(out),
            "sample.max_tokens=16", "sample.max_model_len=1000000"),
        env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "vLLM unavailable" in res.stdout and "falling back to the HF backend" in res.stdout
    assert "max_model_len" in res.stdout  # the reason is named
    rows = read_jsonl(out / "sft_r1_all.jsonl")
    assert len(rows) == 8 and {r["backend"] for r in rows} == {"hf"}


# --------------------------------------------------------------------------- errors, before any engine


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(exit_loop_cmd(*args), env=env(), capture_output=True, text=True, timeout=120)


def test_missing_model_path_fails_before_engine(tmp_path: Path, gsm8k_train: Path):
    res = run_cli("generate", "--model_name", str(tmp_path / "no_such_model"), "--dataset", str(gsm8k_train),
                  "--output_dir", str(tmp_path / "o"))
    assert res.returncode == 2
    assert f"model path {tmp_path / 'no_such_model'} does not exist" in res.stderr
    assert "vllm" not in (res.stdout + res.stderr).lower()  # nothing of vLLM was even imported


def test_unknown_config_key_is_named(tmp_path: Path):
    res = run_cli("generate", "--model_name", "x/y", "sample.temprature=0.5")
    assert res.returncode == 2
    assert "unknown config key 'sample.temprature'" in res.stderr
    assert "temperature" in res.stderr and "top_p" in res.stderr  # the valid keys are listed


def test_unknown_key_in_yaml_names_file_and_line(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: x\nsample:\n  model_name: a/b\n  max_tokenz: 5\n")
    res = run_cli("generate", "--config", str(cfg))
    assert res.returncode == 2
    assert "unknown config key 'sample.max_tokenz'" in res.stderr and f"{cfg}:4" in res.stderr


def test_malformed_dataset_line_names_file_and_line(tmp_path: Path, tiny_model_dir: Path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    res = run_cli("generate", "--model_name", str(tiny_model_dir), "--dataset", str(data),
                  "--output_dir", str(tmp_path / "o"))
    assert res.returncode == 2
    assert f"{data}:2: not valid JSON" in res.stderr


def test_wrong_type_is_named(tmp_path: Path):
    res = run_cli("generate", "--model_name", "x/y", "sample.num_samples=many")
    assert res.returncode == 2
    assert "config key 'sample.num_samples'" in res.stderr and "expected int" in res.stderr


def test_a_changed_config_is_refused_before_anything_is_drawn(tmp_path: Path, tiny_model_dir: Path, gsm8k_train: Path):
    """Continuing a generation under other sampling settings would mix them in one samples.jsonl
    under a config.yaml that names only the last: refused, naming the keys, nothing touched. More
    problems or more samples may be asked for, and are recorded; --allow_config_change forces."""
    from exit_loop.config import dump_yaml, load_config
    from exit_loop.errors import ConfigError
    from exit_loop.pipeline.generate import GenerateConfig, check_generation_config

    out = tmp_path / "gen"
    base = [f"output_dir={out}", f"sample.model_name={tiny_model_dir}", f"data.dataset={gsm8k_train}",
            "data.num_examples=8", "sample.num_samples=2", "sample.temperature=0.7", "sample.prompt_style=r1_zero"]
    first = load_config(GenerateConfig, None, base)
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(first))
    (out / "samples.jsonl").write_text('{"problem_id": "train-0", "sample_index": 0}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = run_cli("generate", "--model_name", str(tiny_model_dir), "--dataset", str(gsm8k_train),
                  "--num_examples", "8", "--num_samples", "4", "--output_dir", str(out),
                  "sample.temperature=1.3", "sample.prompt_style=r1_zero")
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{out / 'config.yaml'}: this generation was made with another config" in res.stderr
    assert "sample.temperature (0.7 -> 1.3)" in res.stderr and "num_samples" not in res.stderr.split("(only")[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # nothing written
    grown = load_config(GenerateConfig, None, [*base, "sample.num_samples=4", "data.num_examples=null",
                                               "sample.data_parallel=2"])
    check_generation_config(grown, out, allow=False)                   # more samples, all problems: fine
    [change] = read_jsonl(out / "config_changes.jsonl")
    assert change["changed"] == {"sample.num_samples": [2, 4], "data.num_examples": [8, None]}
    assert change["forced"] is False
    with pytest.raises(ConfigError, match=r"sample.num_samples \(2 -> 1\)"):
        check_generation_config(load_config(GenerateConfig, None, [*base, "sample.num_samples=1"]), out, allow=False)
    hotter = load_config(GenerateConfig, None, [*base, "sample.temperature=1.3"])
    check_generation_config(hotter, out, allow=True)
    assert read_jsonl(out / "config_changes.jsonl")[-1]["forced"] is True
