"""Shared fixtures: GSM8K from the project's sibling `shared/` folder, a tiny Qwen2 model built
once per test session (no hub downloads), and a real SLURM where one answers (shared helpers:
tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import cancel_jobs, slurm_up

ROOT = Path(__file__).resolve().parents[1]
GSM8K_DIR = Path(os.environ.get("EXIT_LOOP_GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k"))

# vLLM on CPU: a small KV cache is plenty for the tiny model.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K not found at {GSM8K_DIR} (set EXIT_LOOP_GSM8K_DIR)")
    return GSM8K_DIR


@pytest.fixture(scope="session")
def gsm8k_train(gsm8k_dir: Path) -> Path:
    return gsm8k_dir / "train.jsonl"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, gsm8k_train: Path) -> Path:
    """A random-init Qwen2 model (~0.5M parameters) with a BPE tokenizer trained on GSM8K."""
    from exit_loop.tiny_model import create_tiny_model, gsm8k_texts

    out = tmp_path_factory.mktemp("tiny_model")
    return create_tiny_model(out, gsm8k_texts(gsm8k_train, limit=2000))


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    why = slurm_up()
    if why:
        pytest.skip(why)


@pytest.fixture
def cancel_after(slurm_cluster):
    """Slurm dirs whose jobs are cancelled when the test ends (a failed test leaves none running)."""
    dirs: list[Path] = []
    yield dirs
    cancel_jobs(dirs)
