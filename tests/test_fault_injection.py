"""Fault injection: SIGKILL `exit-loop run` at random points of a tiny CPU run (real vLLM engine,
real TRL trainer saving checkpoints as it goes), resume it, and check that every trial ends as an
uninterrupted run does: the same splits (as sets of rows), the same held-out numbers, checkpoints
that load. After every kill, before resuming, no file under its final name is half written, and
every stage whose manifest exists has whole outputs (a manifest is the only "done" a stage has).

Trials are few and bounded in time: EXIT_LOOP_FAULT_TRIALS (default 3) trials, each killed twice: once at a
random time, drawn from the i-th slice of an uninterrupted run's working span (from its engine
start to its end; so the trials spread over early, middle and late stages), and once again, after
resuming, within 0.2 s of TRL starting to write a checkpoint. EXIT_LOOP_FAULT_SEED (default: a
fresh one, printed) replays a failing draw.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from exit_loop.jsonl import read_jsonl

import helpers
from helpers import tiny_run, write_yaml

pytestmark = pytest.mark.engine

TRIALS = int(os.environ.get("EXIT_LOOP_FAULT_TRIALS", "3"))
SEED = int(os.environ.get("EXIT_LOOP_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))
ROUNDS = 1
APPEND_LOGS = {"samples.jsonl", "greedy.jsonl", "pass_k.jsonl"}  # streamed: a torn last line is allowed


def write_config(tmp: Path, name: str, model: Path, gsm8k_dir: Path) -> Path:
    cfg = tiny_run(tmp, name, model, gsm8k_dir, rounds=ROUNDS, questions=16, max_tokens=48,
                   # a checkpoint every step, so kills land while TRL writes one too
                   sft={"max_steps": 8, "gradient_accumulation_steps": 1, "logging_steps": 1,
                        "save_strategy": "steps", "save_steps": 1, "report_to": "none"},
                   isolate=False)  # one process: a kill takes the engine and the trainer with it
    cfg["sample"]["engine"] = {"distributed_executor_backend": "uni"}
    return write_yaml(tmp / f"{name}.yaml", cfg)


def env() -> dict[str, str]:
    return helpers.env(VLLM_ENABLE_V1_MULTIPROCESSING="0")


def start(cfg: Path) -> subprocess.Popen:
    """`exit-loop run CFG` in its own process group, its output appended to CFG's .log (a file,
    not a pipe: nothing blocks on a full pipe while the test watches the disk)."""
    with cfg.with_suffix(".log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "exit_loop", "run", str(cfg)], env=env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(cfg: Path, n: int = 5000) -> str:
    return cfg.with_suffix(".log").read_bytes()[-n:].decode(errors="replace")


def finish(cfg: Path, timeout: float = 600) -> tuple[float, float]:
    """Run to the end; (seconds it took, seconds until its engine served the first request)."""
    log = cfg.with_suffix(".log")
    offset = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    proc, first = start(cfg), None
    while proc.poll() is None:
        if first is None and b"sample (vllm)" in log.read_bytes()[offset:]:
            first = time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, log_tail(cfg)
        time.sleep(0.05)
    assert proc.returncode == 0, log_tail(cfg)
    return time.monotonic() - t0, first or 0.0


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_after(cfg: Path, seconds: float) -> bool:
    """Start the run and SIGKILL it after `seconds`; False if it finished first."""
    proc = start(cfg)
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        kill(proc)
        return True


def kill_while_saving(cfg: Path, root: Path, rng: random.Random, timeout: float = 600) -> bool:
    """Kill within 0.2 s of TRL starting to write a new checkpoint (the riskiest moment for a
    resume); False if the run finished first (it had no more training to do)."""
    seen = set(root.rglob("checkpoint-*"))
    proc = start(cfg)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, log_tail(cfg)
        if set(root.rglob("checkpoint-*")) - seen:
            time.sleep(rng.uniform(0.0, 0.2))
            kill(proc)
            return True
        time.sleep(0.01)
    assert proc.returncode == 0, log_tail(cfg)
    return False


def unfinished(root: Path) -> list[str]:
    """The stages begun but not done, and checkpoints TRL did not finish: where a kill landed."""
    out = [str(d.relative_to(root)) for d in sorted(root.glob("**/round_*/*"))
           if d.is_dir() and not (d / "manifest.json").exists()]
    out += [str(c.relative_to(root)) + " (incomplete)" for c in sorted(root.rglob("checkpoint-*"))
            if not (c / "trainer_state.json").exists()]
    return out


# --------------------------------------------------------------------------- what must hold


def check_whole(root: Path) -> None:
    """Nothing under its final name is half written; every stage with a manifest is whole."""
    from safetensors.torch import load_file

    for path in root.rglob("*"):
        if not path.is_file() or any(part.endswith(".tmp") for part in path.parts) or "trainer" in path.parts:
            continue  # temp files and dirs are never read; trainer/ is TRL's, checked by the resume
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".jsonl":
            text = path.read_text()
            if path.name in APPEND_LOGS and not (path.parent / "manifest.json").exists():
                text = text[: text.rfind("\n") + 1]  # a torn last line is the stream's; resume cuts it
            for line in text.splitlines():
                if line.strip():
                    json.loads(line)
    for manifest in root.rglob("manifest.json"):
        d, stage = manifest.parent, json.loads(manifest.read_text())["stage"]
        if stage == "eval":
            ev = json.loads((d / "eval.json").read_text())
            assert len(read_jsonl(d / "greedy.jsonl")) == ev["n"]
        elif stage == "sample":
            counts = json.loads(manifest.read_text())["counts"]
            assert len(read_jsonl(d / "samples.jsonl")) == counts["samples"]
        elif stage == "verify":
            rows = read_jsonl(d / "verified.jsonl")
            assert len(rows) == len(read_jsonl(d.parent / "sample" / "samples.jsonl"))
            assert all("is_correct" in r and "failure" in r for r in rows)
        elif stage == "filter":
            all_rows = read_jsonl(d / "sft_r1_all.jsonl")
            assert len(all_rows) == len(read_jsonl(d.parent / "verify" / "verified.jsonl"))
            assert len(read_jsonl(d / "sft_r1_correct.jsonl")) <= len(all_rows)
        elif stage == "train":
            assert load_file(str(d / "ckpt" / "model.safetensors"))


def final_state(root: Path) -> dict:
    state = {}
    for k in range(ROUNDS + 1):
        ev = json.loads((root / f"round_{k:02d}" / "eval" / "eval.json").read_text())
        state[f"eval{k}"] = {key: ev[key] for key in ("accuracy", "format_error_rate", "n", "failures")}
    for k in range(ROUNDS):
        for split in ("sft_r1_all.jsonl", "sft_r1_correct.jsonl"):
            rows = read_jsonl(root / f"round_{k:02d}" / "filter" / split)
            state[f"{split}{k}"] = sorted(json.dumps(r, sort_keys=True) for r in rows)
    return state


def weights(root: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(root / f"round_{ROUNDS - 1:02d}" / "train" / "ckpt" / "model.safetensors"))


# --------------------------------------------------------------------------- the test


def test_sigkill_anywhere_then_resume_ends_as_an_uninterrupted_run(tmp_path, tiny_model_dir, gsm8k_dir):
    import torch

    print(f"fault injection: seed {SEED} (EXIT_LOOP_FAULT_SEED={SEED} replays it), {TRIALS} trials")
    rng = random.Random(SEED)
    ref_cfg = write_config(tmp_path, "reference", tiny_model_dir, gsm8k_dir)
    duration, engine_up = finish(ref_cfg)
    ref_root = tmp_path / "runs" / "reference"
    check_whole(ref_root)
    ref, ref_w = final_state(ref_root), weights(ref_root)
    # kills land where the run does its work: from just before its engine serves, to its end
    lo, hi = max(engine_up - 3.0, 1.0), 0.97 * duration

    for trial in range(TRIALS):
        name = f"trial{trial}"
        cfg = write_config(tmp_path, name, tiny_model_dir, gsm8k_dir)
        root = tmp_path / "runs" / name
        at = rng.uniform(lo + (hi - lo) * trial / TRIALS, lo + (hi - lo) * (trial + 1) / TRIALS)
        killed = kill_after(cfg, at)
        print(f"{name}: killed at {at:.1f}s of {duration:.1f}s: {unfinished(root) if killed else 'no, it had finished'}")
        check_whole(root)
        killed = kill_while_saving(cfg, root, rng)
        print(f"{name}: killed while a checkpoint was written: {unfinished(root) if killed else 'no, it trained no more'}")
        check_whole(root)
        finish(cfg)
        check_whole(root)
        assert final_state(root) == ref, f"{name} (seed {SEED}) differs from the uninterrupted run"
        w = weights(root)
        assert w.keys() == ref_w.keys()
        for key in w:
            torch.testing.assert_close(w[key], ref_w[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        assert not unfinished(root), unfinished(root)
