"""CPU smoke of the GPU benchmarks (bench/sft_throughput.py, bench/hf_sampler.py) on a tiny model:
they import, build their model and data, run every arm and report. No speed thresholds: the
figures that matter come from a GPU and live in bench/RESULTS.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.engine
def test_sft_throughput_smoke(tmp_path):
    import sft_throughput

    out = tmp_path / "sft.json"
    report = sft_throughput.main([
        "--shape", "tiny", "--steps", "1", "--warmup", "1", "--isolate", "no", "--json", str(out),
        "--arms", "trl,stage,packed",
        # the GPU defaults' data path (packing, padding-free, varlen attention's CPU fallback)
        "--variant", "packed:packing=true;padding_free=true;per_device_train_batch_size=2;"
                     "gradient_accumulation_steps=1;max_length=256;gradient_checkpointing=false;"
                     "model_init_kwargs={attn_implementation: varlen_sdpa}"])
    assert json.loads(out.read_text())["arms"].keys() == {"trl", "stage", "packed"}
    for name, arm in report["arms"].items():
        assert "error" not in arm, arm.get("error")
        assert arm["tokens_per_s"] > 0 and len(arm["loss"]) == 2 and arm["timed_steps"] == 1
    packed = report["arms"]["packed"]
    assert packed["settings"]["packing"] and packed["settings"]["attn_implementation"] == "varlen_sdpa"
    assert packed["prepared"]["trained_examples"] > 0 and packed["prepared"]["truncated_examples"] == 0


@pytest.mark.engine
def test_hf_sampler_smoke(tmp_path):
    import hf_sampler

    out = tmp_path / "hf.json"
    report = hf_sampler.main(["--shape", "tiny", "--batch", "4", "--prompt_len", "8", "--new_tokens", "4",
                              "--json", str(out)])
    assert {"plain", "hf first call", "hf"} <= report["arms"].keys()
    assert report["arms"]["hf"]["runs"][0]["tokens"] == report["arms"]["plain"]["runs"][0]["tokens"] == 16
    assert report["greedy_check"]["default"]["identical"] is True
    assert json.loads(out.read_text())["greedy_check"]["default"]["identical"] is True
