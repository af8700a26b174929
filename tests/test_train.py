"""The SFT stage on the tiny model with the real TRL SFTTrainer (and the real vLLM engine).

Unit tests (data, config) are fast; `engine` tests train. Training runs pin torch to one thread:
on a small, shared CPU two threads fight other processes and run ten times slower.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exit_loop.cli import setup_logging
from exit_loop.config import ConfigError, load_config
from exit_loop.jsonl import DataError, sha256_file, write_jsonl
from exit_loop.prompts import canonical_response, question_of, student_prompt, teacher_prompt
from exit_loop.train import LoraSettings, TrainConfig, build_trainer, read_splits, subsample, train

# Four short examples the tiny model can learn by heart.
FIT = [("What is 2 plus 3?", "2 + 3 = 5.", "5"),
       ("What is 4 times 6?", "4 * 6 = 24.", "24"),
       ("How many legs do 2 cats have?", "Each cat has 4 legs, 2 * 4 = 8.", "8"),
       ("Tom had 10 apples and ate 3. How many are left?", "10 - 3 = 7.", "7")]
FIT_ROWS = [{"prompt": f"User: {q}\nAssistant: <think>", "response": canonical_response(r, a)}
            for q, r, a in FIT]
ROOT = Path(__file__).resolve().parents[1]
FAST = {"gradient_checkpointing": False, "disable_tqdm": True, "logging_steps": 1,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gsm8k_split(tmp_path_factory, gsm8k_train: Path) -> Path:
    """16 GSM8K problems in the split format (prompt = student prompt, canonical response)."""
    from exit_loop.baseline import baseline_row
    from exit_loop.tasks import DataConfig, load_problems

    problems = load_problems(DataConfig(dataset=str(gsm8k_train), num_examples=16))
    return write_jsonl(tmp_path_factory.mktemp("data") / "split.jsonl", [baseline_row(p) for p in problems])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """Full fine-tuning of the tiny model on FIT until it knows the four examples by heart."""
    data = write_jsonl(tmp_path_factory.mktemp("fit") / "fit.jsonl", FIT_ROWS)
    cfg = TrainConfig(data=[str(data)], model=str(tiny_model_dir),
                      output_dir=str(tmp_path_factory.mktemp("fit_run")),
                      sft={**FAST, "max_steps": 150, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
                           "warmup_steps": 0, "save_strategy": "no", "logging_steps": 10})
    return train(cfg)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir: Path, gsm8k_split: Path) -> Path:
    """LoRA, a few steps, on two split files (accumulation) subsampled to 12 rows."""
    second = tmp_path_factory.mktemp("data2") / "round_01.jsonl"
    shutil.copy(gsm8k_split, second)
    cfg = TrainConfig(data=[str(gsm8k_split), str(second)], model=str(tiny_model_dir), num_examples=12,
                      output_dir=str(tmp_path_factory.mktemp("lora_run")),
                      peft=LoraSettings(enabled=True, r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
                      sft={**FAST, "max_steps": 3})
    return train(cfg)


# --------------------------------------------------------------------------- data and config (fast)


def test_read_splits_concatenates_and_hashes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", FIT_ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "is_correct": True} for r in FIT_ROWS[2:]])
    rows, files = read_splits([str(a), str(b)])
    assert [r.pop("source") for r in rows] == [f"{a}:1", f"{a}:2", f"{b}:1", f"{b}:2"]  # named in errors
    assert rows == FIT_ROWS
    assert [f["rows"] for f in files] == [2, 2]
    assert files[0] == {"path": str(a), "sha256": sha256_file(a), "rows": 2}


def test_split_missing_response_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FIT_ROWS[0]) + "\n\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: missing key\(s\) 'response'"):
        read_splits([str(path)])


def test_split_response_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [FIT_ROWS[0], {"prompt": "p", "response": None}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: key 'response' must be a non-empty string"):
        read_splits([str(path)])


def test_blank_responses_are_skipped(tmp_path, capsys):
    """An all split keeps traces where the model wrote nothing; they hold no text to train on."""
    path = write_jsonl(tmp_path / "all.jsonl", [FIT_ROWS[0], {"prompt": "p", "response": " "}, FIT_ROWS[1]])
    setup_logging("info")  # the console, as the CLI sets it up
    rows, files = read_splits([str(path)])
    assert [{k: v for k, v in r.items() if k != "source"} for r in rows] == FIT_ROWS[:2]
    assert files[0]["rows"] == 2
    assert capsys.readouterr().out.count("skipped 1 row(s) with a blank response") == 1


def test_empty_split_is_an_error(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", FIT_ROWS)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty split"):
        read_splits([str(good), str(empty)])


def test_subsample_is_seeded_and_keeps_order(capsys):
    rows = [{"prompt": str(i), "response": str(i)} for i in range(100)]
    a, b = subsample(rows, 10, seed=1), subsample(rows, 10, seed=1)
    assert a == b and len(a) == 10
    assert [int(r["prompt"]) for r in a] == sorted(int(r["prompt"]) for r in a)
    assert subsample(rows, 10, seed=2) != a
    assert subsample(rows, None, seed=0) is rows
    setup_logging("info")
    assert subsample(rows, 101, seed=0) == rows
    out = capsys.readouterr().out
    assert out.startswith("exit-loop: warning: train: num_examples=101 but the splits hold only 100 rows")
    assert out.count("num_examples=101") == 1  # once


def test_question_of_student_prompt():
    q = "Natalia sold 48 clips. How many?"
    assert question_of(student_prompt(q)) == q
    assert question_of("free-form prompt") == "free-form prompt"


def test_a_bad_lora_setting_names_its_key_where_it_is(tmp_path):
    from exit_loop.pipeline.run import ExperimentConfig

    with pytest.raises(ConfigError, match=r"config key 'peft.r' \(command line\): must be at least 1, got 0"):
        load_config(TrainConfig, None, ["peft.r=0"], values={"data": ["a"], "model": "m"})
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  peft:\n    dropout: 1.5\n")
    with pytest.raises(ConfigError, match=rf"config key 'train.peft.dropout' \({cfg}:3\): must be in \[0, 1\)"):
        load_config(ExperimentConfig, cfg)


def test_config_from_cli_values_and_overrides(tmp_path):
    cfg = load_config(TrainConfig, None, ["peft.enabled=true", "peft.target_modules=[q_proj,v_proj]",
                                          "sft.learning_rate=2e-5", "num_examples=100"],
                      values={"data": ["a.jsonl", "b.jsonl"], "model": "m/Qwen"})
    assert cfg.peft.enabled and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.sft == {"learning_rate": 2e-5} and cfg.num_examples == 100
    assert cfg.output_dir == "runs/sft/Qwen-a"
    with pytest.raises(ConfigError, match="'sft.output_dir': set 'output_dir' at the top level"):
        load_config(TrainConfig, None, ["sft.output_dir=x"], values={"data": ["a"], "model": "m"})
    with pytest.raises(ConfigError, match="unknown config key 'peft.rank'"):
        load_config(TrainConfig, None, ["peft.rank=8"], values={"data": ["a"], "model": "m"})


def test_unknown_sft_key_fails_before_any_model_loads(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", FIT_ROWS)
    cfg = TrainConfig(data=[str(data)], model=str(tmp_path / "no-such-model"),
                      output_dir=str(tmp_path / "out"), sft={"learning_rat": 1e-5})
    with pytest.raises(ConfigError, match=r"'sft\.learning_rat' \(did you mean learning_rate"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_sft_defaults_and_lora_learning_rate(tmp_path):
    from exit_loop.train import sft_config

    base = {"data": ["a.jsonl"], "model": "m", "output_dir": str(tmp_path)}
    args = sft_config(TrainConfig(**base))
    assert args.completion_only_loss is True and args.bf16 is False  # no GPU here
    assert args.learning_rate == 1e-5 and args.max_length == 4096
    assert args.output_dir == str(tmp_path / "trainer")
    assert sft_config(TrainConfig(**base, peft=LoraSettings(enabled=True))).learning_rate == 1e-4
    lora_set = sft_config(TrainConfig(**base, peft=LoraSettings(enabled=True), sft={"learning_rate": 5e-5}))
    assert lora_set.learning_rate == 5e-5


def test_sft_values_are_converted_to_sftconfig_types(tmp_path):
    from exit_loop.train import sft_config

    cfg = load_config(TrainConfig, None, ["sft.learning_rate=1e-5", "sft.num_train_epochs=2",
                                          "sft.gradient_checkpointing=false", "sft.max_length=null",
                                          "sft.save_strategy=no"],
                      values={"data": ["a"], "model": "m", "output_dir": str(tmp_path)})
    args = sft_config(cfg)
    assert args.learning_rate == 1e-5 and args.num_train_epochs == 2.0
    assert args.gradient_checkpointing is False and args.max_length is None
    assert args.save_strategy == "no"  # YAML's `no` is false; the field wants the word
    text = TrainConfig(data=["a"], model="m", output_dir=str(tmp_path), sft={"learning_rate": "2e-5"})
    assert sft_config(text).learning_rate == 2e-5
    bad = TrainConfig(data=["a"], model="m", output_dir=str(tmp_path), sft={"learning_rate": "fast"})
    with pytest.raises(ConfigError, match="'sft.learning_rate': expected float, got 'fast'"):
        sft_config(bad)
    bad = TrainConfig(data=["a"], model="m", output_dir=str(tmp_path), sft={"max_steps": 2.5})
    with pytest.raises(ConfigError, match="'sft.max_steps': expected int, got 2.5"):
        sft_config(bad)


def test_shipped_configs_are_valid():
    import yaml

    from exit_loop.train import sft_config

    configs = sorted((ROOT / "configs").glob("sft_*.yaml"))
    assert configs
    for path in configs:
        assert path.read_text().startswith("# ") and "exit-loop train --config" in path.read_text()
        sft_config(load_config(TrainConfig, path))
    accel = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert set(accel) == {"ddp", "fsdp", "zero3"}
    assert accel["ddp"]["distributed_type"] == "MULTI_GPU"
    assert accel["fsdp"]["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert accel["zero3"]["deepspeed_config"]["zero_stage"] == 3
    assert accel["zero3"]["deepspeed_config"]["zero3_save_16bit_model"] is True


def test_train_help_lists_overrides(capsys):
    from exit_loop.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data F [F ...]" in out and "peft.enabled=true" in out and "sft.KEY=VALUE" in out


def test_cli_reports_bad_split(tmp_path, capsys):
    from exit_loop.cli import main

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p"}) + "\n")
    assert main(["train", "--data", str(path), "--model", "m", "--output_dir", str(tmp_path / "o")]) == 2
    assert f"{path}:1: missing key(s) 'response'" in capsys.readouterr().err


def test_bad_peft_target_module_lists_the_real_ones(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", FIT_ROWS)
    cfg = TrainConfig(data=[str(data)], model=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                      peft=LoraSettings(enabled=True, target_modules=["q_proj", "qkv_proj"]))
    with pytest.raises(ConfigError) as e:
        build_trainer(cfg, FIT_ROWS)
    msg = str(e.value)
    assert "'qkv_proj' matches no module" in msg and "'q_proj'" not in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg


# --------------------------------------------------------------------------- labels (TRL's collator)


@pytest.mark.engine
def test_collated_batch_labels_are_response_plus_eos_even_when_pad_is_eos(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    model = tmp_path / "pad_is_eos"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token  # as in Qwen2.5 base models
    tok.save_pretrained(model)
    rows = FIT_ROWS
    cfg = TrainConfig(data=["unused"], model=str(model), output_dir=str(tmp_path / "out"), sft=FAST)
    trainer = build_trainer(cfg, rows)
    tok = trainer.processing_class
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert batch["input_ids"].shape[0] == len(rows)
    for row, ids, labels, mask in zip(rows, batch["input_ids"].tolist(), batch["labels"].tolist(),
                                      batch["attention_mask"].tolist()):
        prompt_ids = tok(row["prompt"]).input_ids
        response_ids = tok(row["response"], add_special_tokens=False).input_ids
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)           # right padding
        assert ids[:len(prompt_ids)] == prompt_ids
        assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids)  # no loss on the prompt
        assert labels[len(prompt_ids):n] == response_ids + [eos]     # the response, then EOS
        assert ids[len(prompt_ids):n] == response_ids + [eos]
        assert labels[n:] == [-100] * (len(mask) - n)             # padding (== EOS) is not trained
        assert ids[n:] == [eos] * (len(mask) - n)
    assert any(0 in m for m in batch["attention_mask"].tolist())  # the batch did need padding


@pytest.mark.engine
def test_chat_template_trains_the_sampled_chat_and_end_of_turn(tmp_path, tiny_model_dir):
    """Through the chat template the prompt is the chat the sampler's `chat` style sends (token
    for token) and the completion `<think> {response}` and the end-of-turn token."""
    from transformers import AutoTokenizer

    from exit_loop.tokens import encode_prompt
    from exit_loop.train import check_prepared

    rows = [{"prompt": student_prompt(q), "response": canonical_response(r, a)} for q, r, a in FIT]
    cfg = TrainConfig(data=["unused"], model=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                      use_chat_template=True, sft={**FAST, "eos_token": "<|im_end|>"})
    trainer = build_trainer(cfg, rows)
    check_prepared(trainer, cfg)
    tok = trainer.processing_class
    for row, ex, (q, _, _) in zip(rows, trainer.train_dataset, FIT):
        prompt_ids = encode_prompt(AutoTokenizer.from_pretrained(tiny_model_dir),
                                   teacher_prompt(q, "chat", tok))
        n = len(prompt_ids)
        assert ex["input_ids"][:n] == prompt_ids and set(ex["labels"][:n]) == {-100}
        assert tok.decode(ex["labels"][n:]) == f"<think> {row['response']}<|im_end|>"


@pytest.mark.engine
def test_chat_template_that_drops_reasoning_cannot_drop_it_from_training(tmp_path, tiny_model_dir):
    """A template like DeepSeek-R1-Distill's keeps only what follows </think> of an assistant
    message; the completion is not rendered through the template, so the reasoning trains."""
    from transformers import AutoTokenizer

    model = tmp_path / "r1_template"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = (
        "{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' %}"
        "{% set c = c.split('</think>')[-1] %}{% endif %}<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(model)
    cfg = TrainConfig(data=["unused"], model=str(model), output_dir=str(tmp_path / "out"),
                      use_chat_template=True, sft={**FAST, "eos_token": "<|im_end|>"})
    ex = build_trainer(cfg, FIT_ROWS).train_dataset[0]
    assert "</think>" in tok.decode([t for t in ex["labels"] if t != -100])


# --------------------------------------------------------------------------- training runs


@pytest.mark.engine
def test_fit_reproduces_examples_and_stops_at_eos(fitted: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = fitted / "ckpt"
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    assert model.generation_config.eos_token_id == tok.eos_token_id
    for row in FIT_ROWS:
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        expected = tok(row["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(expected) + 20, do_sample=False)
        # The exact response, then EOS, then nothing: generation stopped on its own.
        assert out[0, ids.shape[1]:].tolist() == expected, tok.decode(out[0, ids.shape[1]:])


@pytest.mark.engine
def test_output_dir_layout_and_manifest(fitted: Path, lora_run: Path, gsm8k_split: Path):
    for run in (fitted, lora_run):
        files = {p.name for p in (run / "ckpt").iterdir()}
        assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json"} <= files
        assert "training_args.bin" not in files and not (run / "ckpt.tmp").exists()
        gen = json.loads((run / "ckpt" / "generation_config.json").read_text())
        assert gen["eos_token_id"] == 0  # the tiny tokenizer's <|endoftext|>
        assert (run / "config.yaml").exists() and (run / "trainer").is_dir()

    m = json.loads((fitted / "manifest.json").read_text())
    assert m["examples"] == m["trained_examples"] == 4 and m["steps"] == 150 and m["peft"] is False
    assert m["sft_args"]["learning_rate"] == 3e-3 and m["sft_args"]["completion_only_loss"] is True
    assert m["final_loss"] < 0.05 and m["loss_tokens"] < m["tokens"] and m["trained_tokens"] > 0
    assert m["truncated_examples"] == 0 and m["timings"]["wall_s"] > 0

    m = json.loads((lora_run / "manifest.json").read_text())
    assert m["examples"] == 12 and m["steps"] == 3 and m["peft"] is True
    assert [f["sha256"] for f in m["data"]] == [sha256_file(gsm8k_split)] * 2
    assert [f["rows"] for f in m["data"]] == [16, 16]
    assert m["config"]["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert (lora_run / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.engine
def test_lora_is_merged_into_plain_weights(lora_run: Path, tiny_model_dir: Path):
    from safetensors import safe_open

    merged = safe_open(str(lora_run / "ckpt" / "model.safetensors"), "pt")
    base = safe_open(str(tiny_model_dir / "model.safetensors"), "pt")
    assert set(merged.keys()) == set(base.keys())  # no lora_A/lora_B, no base_model prefix
    changed = {k for k in base.keys() if not (merged.get_tensor(k) == base.get_tensor(k)).all()}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "v_proj")}


@pytest.mark.engine
def test_done_run_is_skipped_and_crashed_run_resumes(tmp_path, tiny_model_dir, gsm8k_split):
    cfg = TrainConfig(data=[str(gsm8k_split)], model=str(tiny_model_dir), output_dir=str(tmp_path / "run"),
                      sft={**FAST, "max_steps": 4, "save_steps": 2})
    out = train(cfg)
    manifest = out / "manifest.json"
    first = json.loads(manifest.read_text())
    assert first["resumed_from"] is None and first["steps"] == 4
    stamp = manifest.stat().st_mtime_ns
    assert train(cfg) == out and manifest.stat().st_mtime_ns == stamp  # done: skipped

    # A crash after step 2: no manifest, no ckpt, only TRL's checkpoint-2.
    manifest.unlink()
    shutil.rmtree(out / "ckpt")
    shutil.rmtree(out / "trainer" / "checkpoint-4")
    assert train(cfg) == out
    again = json.loads(manifest.read_text())
    assert again["resumed_from"].endswith("checkpoint-2") and again["steps"] == 4

    # A crash while TRL wrote checkpoint-4: its weights cut short, no trainer_state.json yet.
    # The resume must take checkpoint-2, not the newest directory.
    manifest.unlink()
    shutil.rmtree(out / "ckpt")
    torn = out / "trainer" / "checkpoint-4"
    (torn / "trainer_state.json").unlink()
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert train(cfg) == out
    again = json.loads(manifest.read_text())
    assert again["resumed_from"].endswith("checkpoint-2") and again["steps"] == 4

    other = TrainConfig(data=cfg.data, model=cfg.model, output_dir=cfg.output_dir, seed=1, sft=cfg.sft)
    manifest.unlink()
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        train(other)


def test_last_complete_checkpoint_skips_one_torn_while_saving(tmp_path, capsys):
    from exit_loop.train import last_complete_checkpoint

    trainer = tmp_path / "trainer"
    assert last_complete_checkpoint(trainer) is None  # no directory yet
    for step, state in ((2, '{"global_step": 2}'), (10, '{"global_step": 10}'), (12, None), (14, '{"glo')):
        d = trainer / f"checkpoint-{step}"
        d.mkdir(parents=True)
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    (trainer / "checkpoint-99.tmp").mkdir()
    setup_logging("info")
    assert last_complete_checkpoint(trainer) == str(trainer / "checkpoint-10")  # by number, not by name
    err = capsys.readouterr().out
    assert "checkpoint-14 is incomplete" in err and "checkpoint-12 is incomplete" in err


@pytest.mark.engine
def test_vllm_loads_full_and_merged_lora_checkpoints(fitted: Path, lora_run: Path):
    from vllm import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=64)

    def generate(ckpt: Path, prompts: list[str]):
        llm = LLM(model=str(ckpt), enforce_eager=True, seed=0, dtype="float32")
        try:
            return [o.outputs[0] for o in llm.generate(prompts, greedy)]
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm

    # The fitted student answers its four questions exactly and stops at EOS by itself.
    outs = generate(fitted / "ckpt", [r["prompt"] for r in FIT_ROWS])
    for row, out in zip(FIT_ROWS, outs):
        assert out.text == row["response"] and out.finish_reason == "stop"

    outs = generate(lora_run / "ckpt", [FIT_ROWS[0]["prompt"], student_prompt("What is 1 + 1?")])
    assert all(len(o.token_ids) > 0 for o in outs)


def _launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


TRAIN_ARGS = ["sft.use_cpu=true", "sft.max_steps=2", "sft.per_device_train_batch_size=2",
              "sft.gradient_checkpointing=false", "sft.disable_tqdm=true"]


@pytest.mark.engine
def test_two_processes_train_and_only_the_main_one_writes(tmp_path, tiny_model_dir, gsm8k_split):
    """DDP over two CPU processes (gloo); `sft.use_cpu=true` is what makes them one group on CPU."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "exit_loop.cli", "train", "--data", str(gsm8k_split), "--model", str(tiny_model_dir),
           "--output_dir", str(out), *TRAIN_ARGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_processes"] == 2 and m["distributed_type"] == "DistributedType.MULTI_CPU" and m["steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "config.yaml", "manifest.json", "trainer"]
    assert (out / "ckpt" / "model.safetensors").exists()


@pytest.mark.slurm
def test_sbatch_train_sft_runs_one_process_per_gpu(slurm_cluster, tmp_path, tiny_model_dir, gsm8k_split):
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--parsable", "--gpus-per-node=2", "--cpus-per-task=1", "--time=10", f"--output={log}",
           f"--chdir={ROOT}", str(ROOT / "slurm" / "train_sft.sh"), "--data", str(gsm8k_split),
           "--model", str(tiny_model_dir), "--output_dir", str(out), *TRAIN_ARGS]
    env = {**_launch_env(), "ACCEL": "configs/accelerate/ddp.yaml"}
    job = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    deadline = time.time() + 300  # poll (sbatch --wait sleeps up to 32 s between looks)
    while subprocess.run(["squeue", "-h", "-j", job, "-t", "PD,R,CG"], capture_output=True,
                         text=True).stdout.strip() and time.time() < deadline:
        time.sleep(1)
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    text = log.read_text() if log.exists() else ""
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, (state + text)[-3000:]
    assert "1 node(s) x 2 GPU(s), configs/accelerate/ddp.yaml" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_processes"] == 2 and m["steps"] == 2
