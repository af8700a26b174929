"""SFT throughput: the project's SFT stage with its default configuration against plain TRL.

    python bench/sft_throughput.py --json sft.json                  # one GPU: Qwen2.5-1.5B shape
    python bench/sft_throughput.py --shape tiny --steps 3 --warmup 1  # CPU smoke (tests/test_bench_smoke.py)

Same model, same data, one command. The model is built from a config with random weights
(`--shape`: the Qwen2.5-1.5B shape by default: hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151,936, tied embeddings) and saved once; the data are synthetic
pre-tokenised prompt/completion rows of R1-like lengths (prompt 100-200 tokens, response
400 +- 150, EOS last; tokens drawn from a Zipf law with a bigram rule, so the loss has something
to learn). Arms, each trained for `--warmup` + `--steps` optimizer steps:

  trl     `trl.SFTTrainer` with `SFTConfig` defaults (batch 8, max_length 1024, gradient
          checkpointing, SDPA attention, padded batches, bf16 autocast over fp32 weights)
  stage   the SFT stage: `exit_loop.train.build_trainer` with the stage's defaults
          (`SFT_DEFAULTS`, and on a GPU `gpu_sft_defaults()`), checked by `check_prepared`
  NAME    `--variant NAME:key=value;key=value`: the stage with these `sft` overrides (YAML values);
          the key `env` (a YAML mapping) sets environment variables for that arm alone, e.g.
          `env={ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION: "1"}` with `torch_compile=true`
          (accelerate then compiles each decoder layer, not the whole model)

Only what cannot change speed is set equal in every arm: `max_steps`, no saving, and one
optimisation schedule for the loss curves (`--lr`, constant, no warm-up). The
trl arm accumulates gradients over enough batches (`--trl_ga auto`) that its optimizer steps
see about as many tokens as the stage's, so the two loss curves, plotted against tokens, are
comparable.

Measured per arm: tokens/s (prompt + completion tokens, padding excluded, over the timed steps:
wall time between the ends of the first and last timed optimizer steps, after `--warmup`
steps, the GPU synchronised at both ends only), MFU = tokens/s x FLOPs per token / peak, with
FLOPs per token = 6 x parameters + 6 x layers x hidden x mean sequence length (the sequence length that attention spans: one
example, packed or not) and peak = `--peak_tflops` (989 TFLOP/s: H100 SXM dense bf16), the peak
GPU memory allocated, and the loss of every optimizer step (summed from what `training_step`
returns, read after training). On a GPU each arm runs in its own process.
Prints a table; `--json PATH` writes everything, loss curves included. `--profile ARM` runs
one more optimizer step of that arm, after the timed window, under `torch.profiler`, and prints
and saves the operators that took the most GPU time.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "small": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=128, vocab_size=2048, tie_word_embeddings=True,
                 max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6),
}
EOS, PAD = "<|endoftext|>", "<|pad|>"


# --------------------------------------------------------------------------- model and data


FIRST_WORD = 29  # ids 0, 1: EOS, PAD; 2..28: the bytes ' ' (as 'Ġ') and 'a'..'z'; words from here


def word(i: int) -> str:
    """The word of token id `i` >= FIRST_WORD: all 1-letter words, then all 2-letter words, ..."""
    k, n = i - FIRST_WORD, 1
    while k >= 26 ** n:
        k, n = k - 26 ** n, n + 1
    out = ""
    for _ in range(n):
        k, r = divmod(k, 26)
        out = chr(97 + r) + out
    return out


def word_text(ids) -> str:
    """The text that the word tokenizer encodes to exactly `ids` (each >= FIRST_WORD)."""
    return "".join(" " + word(int(i)) for i in ids)


def word_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with one token per id: `<|endoftext|>` (0), `<|pad|>` (1), the
    bytes, then ' ' + word(i) for every id i from FIRST_WORD up (its merges build each word from
    its prefix), so N words of `word_text` are N tokens and every id decodes. BPE with Qwen2's
    byte-level pre-tokenizer, since transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    g = "\u0120"  # the byte-level form of ' '
    vocab = {EOS: 0, PAD: 1, g: 2, **{chr(97 + k): 3 + k for k in range(26)}}
    merges = []
    for i in range(FIRST_WORD, vocab_size):
        w = word(i)
        vocab[g + w] = i
        merges.append((g + w[:-1], w[-1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.model_max_length = 1 << 20
    return fast


def build_model_dir(shape: str, out: Path, seed: int = 0, device: str | None = None) -> Path:
    """A random-init Qwen2 model of `shape` and its word tokenizer, saved (bf16 safetensors) to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = word_tokenizer(SHAPES[shape]["vocab_size"])
    config = Qwen2Config(**SHAPES[shape], head_dim=SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"],
                         bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 1
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    del model
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(out)
    ids = [FIRST_WORD, FIRST_WORD + 1, 60, 700, config.vocab_size - 1]
    if back(word_text(ids), add_special_tokens=False).input_ids != ids:
        raise RuntimeError(f"the word tokenizer does not round-trip once loaded as {type(back).__name__}")
    return out


def synthetic_rows(n: int, vocab_size: int, prompt: tuple[int, int], response: tuple[int, int],
                   seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` pre-tokenised rows {input_ids, completion_mask}: prompt length uniform in `prompt`,
    response length normal(mean, sd) = `response` (at least 8), EOS (id 0) last."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = min(vocab_size - 2, 32000)
    p = np.arange(1, k + 1, dtype=np.float64) ** -1.1
    p /= p.sum()
    ids_by_rank = rng.permutation(vocab_size - 2)[:k] + 2
    successor = rng.integers(2, vocab_size, size=vocab_size)
    rows = []
    for _ in range(n):
        n_prompt = int(rng.integers(prompt[0], prompt[1] + 1))
        n_resp = max(8, int(round(rng.normal(response[0], response[1]))))
        toks = ids_by_rank[rng.choice(k, size=n_prompt + n_resp, p=p)]
        follow = rng.random(n_prompt + n_resp) < 0.5
        for i in range(1, len(toks)):
            if follow[i]:
                toks[i] = successor[toks[i - 1]]
        ids = toks.tolist() + [0]
        rows.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (n_resp + 1)})
    return rows


# --------------------------------------------------------------------------- one arm


def _sft_overrides(a: argparse.Namespace) -> dict[str, Any]:
    """What every arm gets: step count, logging, no saving, one optimisation schedule."""
    return {"max_steps": a.warmup + a.steps, "save_strategy": "no", "report_to": "none",
            "learning_rate": a.lr, "lr_scheduler_type": "constant", "warmup_steps": 0, "disable_tqdm": True}


def stage_sft(a: argparse.Namespace, model_dir: str, out_dir: str, extra: dict[str, Any]):
    from exit_loop.train import TrainConfig, sft_kwargs

    cfg = TrainConfig(data=["<synthetic>"], model=model_dir, output_dir=out_dir, seed=a.seed,
                      sft={**_sft_overrides(a), **extra})
    return cfg, sft_kwargs(cfg)


def stage_tokens_per_step(a: argparse.Namespace, model_dir: str, mean_len: float) -> float:
    _, kw = stage_sft(a, model_dir, tempfile.gettempdir(), {})
    rows = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"]
    return rows * (kw["max_length"] if kw.get("packing") else mean_len)


def run_arm(a: argparse.Namespace, name: str, extra: dict[str, Any], model_dir: str, data_file: str,
            trl_ga: int) -> dict[str, Any]:
    env = {str(k): str(v) for k, v in (extra.get("env") or {}).items()}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _run_arm(a, name, {k: v for k, v in extra.items() if k != "env"}, model_dir, data_file, trl_ga, env)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_arm(a: argparse.Namespace, name: str, extra: dict[str, Any], model_dir: str, data_file: str,
             trl_ga: int, env: dict[str, str]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    rows = json.loads(Path(data_file).read_text())
    dataset = Dataset.from_list(rows)
    mean_len = statistics.fmean(len(r["input_ids"]) for r in rows)
    cuda = torch.cuda.is_available()
    out_dir = tempfile.mkdtemp(prefix=f"sft_{name}_")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    if name == "trl":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=out_dir, seed=a.seed, bf16=cuda, gradient_accumulation_steps=trl_ga,
                         use_cpu=not cuda, **_sft_overrides(a))
        trainer = SFTTrainer(model=model_dir, args=args, train_dataset=dataset,
                             processing_class=AutoTokenizer.from_pretrained(model_dir))
        prepared = None
    else:
        from exit_loop.train import build_trainer, check_prepared

        cfg, _ = stage_sft(a, model_dir, out_dir, extra)
        trainer = build_trainer(cfg, [], dataset=dataset)
        prepared = check_prepared(trainer, cfg)
    build_s = time.perf_counter() - t_build
    args = trainer.args

    # Tokens: counted by the collator (real tokens, no padding), consumed in order by training_step.
    # Losses: what training_step returns, kept on the GPU (no sync) and summed per optimizer step.
    produced: list[int] = []
    consumed = {"i": 0, "tokens": 0}
    micro_losses: list[Any] = []
    step_losses: list[Any] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        produced.append(sum(len(ex["input_ids"]) for ex in examples))
        return collate(examples)

    trainer.data_collator = counting_collator
    step = trainer.training_step

    profile = a.profile == name
    if profile:  # one more step after the timed window, under the profiler
        trainer.args.max_steps += 1

    def counting_step(*args_, **kwargs_):
        consumed["tokens"] += produced[consumed["i"]]
        consumed["i"] += 1
        loss = step(*args_, **kwargs_)
        micro_losses.append(loss.detach())
        return loss

    trainer.training_step = counting_step
    ends: list[tuple[float, int]] = []  # (time, tokens consumed) at each optimizer step's end
    last_step = a.warmup + a.steps
    prof: dict[str, Any] = {}

    class Clock(TrainerCallback):
        """Synchronises only where the timed window opens and closes: a sync every step would
        leave the GPU idle while the host prepares the next batch."""

        def on_step_begin(self, args_, state, control, **kwargs_):
            if profile and state.global_step == last_step:
                from torch.profiler import ProfilerActivity, profile as profiler

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                prof["p"] = profiler(activities=acts)
                prof["p"].__enter__()

        def on_step_end(self, args_, state, control, **kwargs_):
            if "p" in prof and state.global_step == last_step + 1:
                if cuda:
                    torch.cuda.synchronize()
                prof["p"].__exit__(None, None, None)
                prof["table"] = prof.pop("p").key_averages().table(
                    sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=30, max_name_column_width=60)
                return
            step_losses.append(torch.stack(micro_losses).sum())
            micro_losses.clear()
            if cuda and state.global_step in (a.warmup, last_step):
                torch.cuda.synchronize()
            ends.append((time.perf_counter(), consumed["tokens"]))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0

    compiled = sum(type(m).__name__ == "OptimizedModule" for m in trainer.model_wrapped.modules())
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = sum(p.numel() for p in model.parameters())
    cfg_m = model.config
    flops_per_token = 6 * params + 6 * cfg_m.num_hidden_layers * cfg_m.hidden_size * mean_len
    if "table" in prof:
        print(f"profile of arm {name}, one optimizer step after the timed window:\n{prof['table']}", flush=True)
    timed = ends[a.warmup - 1:] if a.warmup >= 1 else [(t0, 0)] + ends
    dt = timed[-1][0] - timed[0][0]
    tokens = timed[-1][1] - timed[0][1]
    tps = tokens / dt if dt > 0 else float("nan")
    step_times = [t1 - t0_ for (t0_, _), (t1, _) in zip(timed, timed[1:])]
    losses = [float(x) for x in step_losses]
    cum = [n for _, n in ends]
    attn = getattr(cfg_m, "_attn_implementation", None)
    result = {
        "arm": name,
        "overrides": extra,
        "tokens_per_s": tps,
        "mfu": tps * flops_per_token / (a.peak_tflops * 1e12) if cuda else None,
        "step_time_median_s": statistics.median(step_times) if step_times else None,  # host clock
        "tokens_per_step": tokens / max(len(step_times), 1),
        "timed_steps": len(step_times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "params": params,
        "flops_per_token": flops_per_token,
        "mean_seq_len": mean_len,
        "build_s": round(build_s, 2),
        "train_s": round(train_s, 2),
        "loss": losses,
        "tokens_cum": cum[:len(losses)],
        "prepared": prepared,
        "env": env,
        "profile": prof.get("table"),
        "settings": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "max_length": args.max_length, "packing": args.packing, "padding_free": args.padding_free,
            "gradient_checkpointing": args.gradient_checkpointing, "attn_implementation": attn,
            "use_liger_kernel": args.use_liger_kernel, "bf16": args.bf16, "optim": str(args.optim),
            "torch_compile": args.torch_compile, "compiled_modules": compiled,
        },
    }
    del trainer, model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


# --------------------------------------------------------------------------- checks and driver


def check_varlen_attention() -> dict[str, float]:
    """The varlen kernel against SDPA over a dense block-causal mask: forward and gradients,
    bf16, GQA 12/2 heads, five packed sequences of random lengths. Relative errors."""
    import torch
    import torch.nn.functional as F

    from exit_loop.train.attention import varlen_attention_forward

    torch.manual_seed(0)
    lens = [513, 77, 1024, 300, 130]
    total, h, hk, d = sum(lens), 12, 2, 128
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(1, h, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hk, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hk, total, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    module = type("M", (), {"is_causal": True, "num_key_value_groups": h // hk})()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=d ** -0.5, cu_seq_lens_q=cu,
                                      cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens))
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).cuda()
    mask = (seg[:, None] == seg[None, :]) & torch.ones(total, total, dtype=torch.bool, device="cuda").tril()
    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf.repeat_interleave(h // hk, 1), vf.repeat_interleave(h // hk, 1),
                                         attn_mask=mask, scale=d ** -0.5).transpose(1, 2)
    g = torch.randn_like(ref)
    out.backward(g.to(out.dtype))
    ref.backward(g)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):  # float32 in (RoPE without Liger)
        out32, _ = varlen_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=d ** -0.5,
                                            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens),
                                            max_length_k=max(lens))
    return {"out": rel(out, ref), "dq": rel(q.grad, qf.grad), "dk": rel(k.grad, kf.grad), "dv": rel(v.grad, vf.grad),
            "out_fp32_autocast": rel(out32, ref)}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    import yaml

    name, _, body = text.partition(":")
    extra = {}
    for item in filter(None, (s.strip() for s in body.split(";"))):
        key, _, value = item.partition("=")
        extra[key.strip()] = yaml.safe_load(value)
    return name.strip(), extra


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="model shape (default qwen2.5-1.5b on a GPU, tiny on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm")
    p.add_argument("--warmup", type=int, default=4, help="untimed optimizer steps first")
    p.add_argument("--lr", type=float, default=2e-4, help="constant learning rate of every arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default="trl,stage", help="comma-separated: trl, stage and variant names")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:k=v;k=v",
                   help="a stage arm with these sft overrides (YAML values)")
    p.add_argument("--trl_ga", default="auto", help="gradient accumulation of the trl arm (auto: match tokens)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)")
    p.add_argument("--prompt_len", default="100,200", help="prompt length range (tiny shape: 10,20)")
    p.add_argument("--response_len", default="400,150", help="response length mean,sd (tiny: 40,15)")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="each arm in its own process (auto: on a GPU)")
    p.add_argument("--arm_timeout", type=float, default=420, help="seconds an isolated arm may take")
    p.add_argument("--json", metavar="PATH", help="write all results here")
    p.add_argument("--profile", metavar="ARM", help="profile one extra step of this arm (torch.profiler)")
    p.add_argument("--_arm", help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    a.shape = a.shape or ("qwen2.5-1.5b" if cuda else "tiny")
    variants = dict(parse_variant(v) for v in a.variant)

    if a._arm:  # child process: one arm
        work = Path(a._work)
        meta = json.loads((work / "meta.json").read_text())
        res = run_arm(a, a._arm, variants.get(a._arm, {}), meta["model_dir"], meta["data_file"], meta["trl_ga"])
        (work / f"{a._arm}.json").write_text(json.dumps(res))
        return res

    if a.shape == "tiny" and a.prompt_len == "100,200":
        a.prompt_len, a.response_len = "10,20", "40,15"
    prompt = tuple(int(x) for x in a.prompt_len.split(","))
    response = tuple(float(x) for x in a.response_len.split(","))
    work = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    t0 = time.perf_counter()
    model_dir = str(build_model_dir(a.shape, work / "model", a.seed))
    if cuda:
        torch.cuda.empty_cache()  # the arms' processes get the whole card
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    mean_len = prompt[0] / 2 + prompt[1] / 2 + response[0] + 1
    stage_tps = stage_tokens_per_step(a, model_dir, mean_len)
    trl_ga = max(1, round(stage_tps / (8 * mean_len))) if a.trl_ga == "auto" else int(a.trl_ga)
    per_step = max(stage_tps, 8 * trl_ga * mean_len)
    for name, extra in variants.items():
        _, kw = stage_sft(a, model_dir, str(work), {k: v for k, v in extra.items() if k != "env"})
        rows_ = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"]
        per_step = max(per_step, rows_ * (kw["max_length"] if kw.get("packing") else mean_len))
    n_rows = int(per_step * (a.warmup + a.steps) / mean_len * 1.15) + 16
    rows = synthetic_rows(n_rows, SHAPES[a.shape]["vocab_size"], prompt, response, a.seed)
    data_file = work / "data.json"
    data_file.write_text(json.dumps(rows))
    (work / "meta.json").write_text(json.dumps({"model_dir": model_dir, "data_file": str(data_file),
                                                "trl_ga": trl_ga}))
    setup_s = time.perf_counter() - t0
    print(f"sft bench: shape {a.shape}, {n_rows} rows (mean {statistics.fmean(len(r['input_ids']) for r in rows):.0f} "
          f"tokens), trl arm gradient accumulation {trl_ga}, setup {setup_s:.0f}s", flush=True)

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/sft_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": _versions(), "shape": a.shape, "rows": n_rows, "trl_ga": trl_ga,
        "peak_tflops": a.peak_tflops, "arms": {},
    }
    if cuda:
        try:
            report["varlen_check"] = check_varlen_attention()
            print(f"varlen attention vs float64 SDPA, relative error: {report['varlen_check']}", flush=True)
        except Exception as e:  # noqa: BLE001 - report and go on: the stage falls back to sdpa
            report["varlen_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"varlen attention check failed: {report['varlen_check']}", flush=True)
        torch.cuda.empty_cache()
    isolate = a.isolate == "yes" or a.isolate == "auto" and cuda
    for name in arms:
        if name not in ("trl", "stage") and name not in variants:
            raise SystemExit(f"--arms: unknown arm {name!r} (give it with --variant {name}:...)")
        t_arm = time.perf_counter()
        try:
            if isolate:
                cmd = [sys.executable, __file__, "--_arm", name, "--_work", str(work), "--shape", a.shape,
                       "--steps", str(a.steps), "--warmup", str(a.warmup), "--lr", str(a.lr),
                       "--seed", str(a.seed), "--peak_tflops", str(a.peak_tflops)]
                if a.profile:
                    cmd += ["--profile", a.profile]
                for v in a.variant:
                    cmd += ["--variant", v]
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.arm_timeout)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-3000:])
                if a.profile == name:
                    print(proc.stdout[proc.stdout.find("profile of arm"):], flush=True)
                res = json.loads((work / f"{name}.json").read_text())
            else:
                res = run_arm(a, name, variants.get(name, {}), model_dir, str(data_file), trl_ga)
        except Exception as e:  # noqa: BLE001 - one failing arm must not lose the others
            res = {"arm": name, "error": f"{type(e).__name__}: {e}"[-3000:]}
            print(f"arm {name} failed:\n{res['error']}", flush=True)
        res["wall_s"] = round(time.perf_counter() - t_arm, 1)
        report["arms"][name] = res
        if "error" not in res:
            print(_row(res), flush=True)
        if a.json:  # after every arm, so a run cut short keeps what it measured
            Path(a.json).write_text(json.dumps(report, indent=1))
    print_table(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "trl", "datasets", "liger-kernel", "accelerate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def _row(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
    st = r["settings"]
    last = statistics.fmean(r["loss"][-5:]) if r["loss"] else float("nan")
    return (f"{r['arm']:<14} {r['tokens_per_s']:>10.0f} {mfu:>7} {mem:>8} {r['tokens_per_step']:>9.0f} "
            f"{r['step_time_median_s']:>7.3f} {r['loss'][0]:>7.3f} {last:>7.3f}  "
            f"bs={st['per_device_train_batch_size']} ga={st['gradient_accumulation_steps']} "
            f"len={st['max_length']} pack={st['packing']} ckpt={st['gradient_checkpointing']} "
            f"attn={st['attn_implementation']} liger={st['use_liger_kernel']}")


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}  shape {report['shape']}  {report['versions']}")
    print(f"{'arm':<14} {'tokens/s':>10} {'MFU':>7} {'mem GiB':>8} {'tok/step':>9} {'step s':>7} "
          f"{'loss0':>7} {'loss-5':>7}  settings")
    for r in report["arms"].values():
        print(_row(r) if "error" not in r else f"{r['arm']:<14} failed: {r['error'].splitlines()[-1][:150]}")
    trl, stage = report["arms"].get("trl", {}), report["arms"].get("stage", {})
    if "tokens_per_s" in trl and "tokens_per_s" in stage:
        print(f"stage / trl tokens/s: {stage['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
        print("loss at matching token counts (trl vs stage):", _loss_pairs(trl, stage))


def _loss_pairs(x: dict[str, Any], y: dict[str, Any], n: int = 5) -> list[tuple[int, float, float]]:
    """Loss of both curves at a few token counts (each curve's step ending nearest below)."""
    import bisect

    top = min(x["tokens_cum"][-1], y["tokens_cum"][-1])
    out = []
    for i in range(1, n + 1):
        t = top * i / n
        xi = max(0, bisect.bisect_right(x["tokens_cum"], t) - 1)
        yi = max(0, bisect.bisect_right(y["tokens_cum"], t) - 1)
        out.append((int(t), round(x["loss"][xi], 3), round(y["loss"][yi], 3)))
    return out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
