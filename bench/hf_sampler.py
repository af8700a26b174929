"""HF sampler backend: exit-loop's `hf` backend against plain `model.generate`, same prompts, same model.

    python bench/hf_sampler.py --json hf.json              # one GPU: Qwen2.5-1.5B shape, batch 256
    python bench/hf_sampler.py --shape tiny --batch 8 --prompt_len 20 --new_tokens 16   # CPU smoke

The model is built from a config with random weights (`--shape`, as in bench/sft_throughput.py:
Qwen2.5-1.5B by default) with a one-token-per-word tokenizer, so every prompt is exactly
`--prompt_len` tokens (150) and every id decodes. `--batch` prompts (256), sampling at
temperature 0.7, top_p 1.0, `--new_tokens` new tokens each (256; `min_new_tokens` equal to it in
both arms, so both produce the same number of tokens), bf16 on a GPU:

  plain    `model.generate(**batch, do_sample=True, ...)`: one left-padded batch, dynamic cache
  hf       `HFBackend.generate(requests, on_done)` on the same model (`hf_batch_size` = `--batch`):
           tokenisation, length sorting, the backend's decoding (on a GPU: static KV cache, one
           CUDA graph per token), trimming and decoding included. Its first call captures the
           graph; it is timed apart (`hf first call`), then `--repeats` timed calls.
  cb       (`--cb`) transformers' continuous batching, `model.generate_batch`, for comparison.

Tokens/s = generated tokens / wall time (synchronised). Then the greedy check: `--check_shape`
(a small model, float32) on 8 fixed prompts of different lengths (so left padding is exercised),
32 new tokens, greedy: the backend's texts must be identical to plain `generate` on the same
batch. Prints a table; `--json PATH` writes everything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sft_throughput import FIRST_WORD, SHAPES, _versions, build_model_dir, word_text  # noqa: E402


def word_prompts(n: int, length: int | list[int], vocab_size: int, seed: int = 0) -> list[str]:
    """`n` prompts of `length` words (one token each), random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [length] * n if isinstance(length, int) else length
    return [word_text(rng.integers(FIRST_WORD, vocab_size, size=m)) for m in lengths]


def _requests(prompts: list[str]):
    from exit_loop.sample.request import Request
    from exit_loop.tasks import Problem

    return [Request(Problem(str(i), "", "", ""), p, [0]) for i, p in enumerate(prompts)]


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_backend(backend, prompts: list[str], cfg) -> tuple[float, int, dict[str, str]]:
    """One `backend.generate` call: seconds, tokens generated, text by prompt id."""
    texts: dict[str, str] = {}
    tokens = 0

    def on_done(req, comps):
        nonlocal tokens
        tokens += sum(c.num_tokens for c in comps)
        texts[req.problem.id] = comps[0].text

    reqs = _requests(prompts)
    _sync()
    t0 = time.perf_counter()
    backend.generate(reqs, on_done, cfg)
    _sync()
    return time.perf_counter() - t0, tokens, texts


def run_plain(backend, prompts: list[str], gen_kwargs: dict[str, Any]) -> tuple[float, int, list[list[int]]]:
    """Plain `generate` on one left-padded batch: seconds, tokens generated, new ids per row."""
    import torch

    from exit_loop.sample.hf import as_list, trim

    tok, model = backend.tok, backend.model
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(backend.device)
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, pad_token_id=tok.pad_token_id, **gen_kwargs)
    _sync()
    dt = time.perf_counter() - t0
    eos = {tok.eos_token_id} | set(as_list(model.generation_config.eos_token_id))
    rows = [trim(ids, eos, tok.pad_token_id, gen_kwargs["max_new_tokens"])[0]
            for ids in out[:, enc["input_ids"].shape[1]:].tolist()]
    return dt, sum(len(r) for r in rows), rows


def run_cb(backend, prompts: list[str], new_tokens: int, temperature: float) -> tuple[float, int]:
    """transformers' continuous batching (`generate_batch`) on the same prompts."""
    from transformers import GenerationConfig

    tok, model = backend.tok, backend.model
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, max_new_tokens=new_tokens,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.generate_batch(ids[:8], generation_config=gen, max_new_tokens=4)  # warm-up (graphs)
    _sync()
    t0 = time.perf_counter()
    out = model.generate_batch(ids, generation_config=gen, max_new_tokens=new_tokens)
    _sync()
    return time.perf_counter() - t0, sum(len(o.generated_tokens) for o in out.values())


def parse_variant(text: str) -> dict[str, Any]:
    """`default`, or decoder settings such as `c1b128`: compile on (c1) or off (c0), KV bucket 128
    slots (b0: the whole cache in every step)."""
    if text == "default":
        return {}
    m = re.fullmatch(r"c([01])b(\d+)", text)
    if not m:
        raise SystemExit(f"--variants: {text!r} is not 'default' or c<0|1>b<slots> (e.g. c1b128)")
    return {"hf_compile": m[1] == "1", "hf_kv_bucket": int(m[2])}


def breakdown(backend, prompts: list[str], profile_to: str | None, tag: str = "") -> dict[str, Any]:
    """Prefill time, and the time of one decoding step through each of the decoder's graphs."""
    import torch

    d = backend.decoder
    enc = backend.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(backend.device)
    out: dict[str, Any] = {}
    with torch.no_grad(), d.attending():
        _sync()
        t0 = time.perf_counter()
        d.prefill(enc["input_ids"], enc["attention_mask"])
        _sync()
        out["prefill_s"] = round(time.perf_counter() - t0, 4)
        for limit, graph in d.graphs.items():
            d.prefill(enc["input_ids"], enc["attention_mask"])
            graph.replay()
            _sync()
            t0 = time.perf_counter()
            for _ in range(16):
                graph.replay()
            _sync()
            out[f"step_ms_kv{limit}"] = round((time.perf_counter() - t0) / 16 * 1e3, 3)
        if profile_to:  # the kernels of one step through the last graph, and of one eager step
            from torch.profiler import ProfilerActivity, profile

            table = {}
            for name, fn in (("graph", lambda: graph.replay()), ("eager", d.step)):
                d.prefill(enc["input_ids"], enc["attention_mask"])
                with d.attention.decode_kv_limit(limit), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(4):
                        fn()
                    _sync()
                table[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            Path(profile_to).with_suffix(f".{tag.replace(' ', '_')}.prof.txt").write_text(
                "\n\n".join(f"{k} (4 steps)\n{v}" for k, v in table.items()))
    return out


def greedy_check(a: argparse.Namespace, work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Backend vs plain generate, greedy, on 8 fixed prompts of different lengths (float32)."""
    from exit_loop.sample import HFBackend, SampleConfig

    model_dir = build_model_dir(a.check_shape, work / "check_model", a.seed)
    vocab = SHAPES[a.check_shape]["vocab_size"]
    lengths = [20, 90, 35, 64, 48, 77, 25, 56] if a.check_shape != "tiny" else [6, 14, 9, 11, 7, 13, 8, 10]
    prompts = word_prompts(8, lengths, vocab, seed=a.seed + 1)
    cfg = SampleConfig(model_name=str(model_dir), backend="hf", temperature=0.0, max_tokens=32, stop=[],
                       dtype="float32", hf_batch_size=a.batch, seed=a.seed, **settings)
    backend = HFBackend(cfg)
    try:
        _, _, texts = run_backend(backend, prompts, cfg)
        order = sorted(range(8), key=lambda i: -lengths[i])  # the backend's batch order
        _, _, rows = run_plain(backend, [prompts[i] for i in order],
                               dict(max_new_tokens=32, do_sample=False, temperature=None, top_p=None, top_k=None))
        plain = {str(i): backend.tok.decode(r, skip_special_tokens=True) for i, r in zip(order, rows)}
        same = [texts[str(i)] == plain[str(i)] for i in range(8)]
        return {"identical": all(same), "prompts": 8, "new_tokens": 32, "dtype": "float32",
                "shape": a.check_shape, "graphs": backend.graphs, "per_prompt": same}
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default qwen2.5-1.5b (GPU), tiny (CPU)")
    p.add_argument("--check_shape", default=None, choices=sorted(SHAPES), help="greedy check model (small / tiny)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=150)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=1, help="timed calls of each arm after the warm-up")
    p.add_argument("--variants", default="default",
                   help="comma-separated decoder settings to time: default, or c<0|1>b<slots> "
                        "(compile off/on, KV bucket; b0 = whole cache), e.g. c0b0,c1b128")
    p.add_argument("--profile", action="store_true", help="with --json: kernel tables of one step per variant")
    p.add_argument("--cb", action="store_true", help="also time transformers' continuous batching")
    p.add_argument("--skip_plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)

    import torch

    from exit_loop.sample import HFBackend, SampleConfig

    cuda = torch.cuda.is_available()
    a.shape = a.shape or ("qwen2.5-1.5b" if cuda else "tiny")
    a.check_shape = a.check_shape or ("small" if cuda else "tiny")
    work = Path(tempfile.mkdtemp(prefix="hf_bench_"))
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/hf_sampler.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "versions": _versions(), "shape": a.shape, "batch": a.batch, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens, "temperature": a.temperature, "arms": {}, "greedy_check": {},
    }
    model_dir = build_model_dir(a.shape, work / "model", a.seed)
    prompts = word_prompts(a.batch, a.prompt_len, SHAPES[a.shape]["vocab_size"], a.seed)
    cfg = SampleConfig(model_name=str(model_dir), backend="hf", temperature=a.temperature, top_p=1.0,
                       max_tokens=a.new_tokens, stop=[], hf_batch_size=a.batch, seed=a.seed,
                       sampling={"min_tokens": a.new_tokens})
    backend = HFBackend(cfg)
    gen_kwargs = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=True,
                      temperature=a.temperature, top_p=1.0)

    def record(name: str, runs: list[tuple[float, int]], **more):
        tps = [n / dt for dt, n in runs]
        report["arms"][name] = {"tokens_per_s": statistics.median(tps), "runs": [
            {"seconds": round(dt, 3), "tokens": n} for dt, n in runs], **more}
        print(f"{name:<22} {statistics.median(tps):>10.0f} tokens/s  "
              f"({', '.join(f'{n} in {dt:.1f}s' for dt, n in runs)})", flush=True)
        if a.json:  # after every arm, so a run cut short keeps what it measured
            Path(a.json).write_text(json.dumps(report, indent=1))

    try:
        run_plain(backend, prompts[:8], {**gen_kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # CUDA warm-up
        if not a.skip_plain:
            record("plain", [run_plain(backend, prompts, gen_kwargs)[:2] for _ in range(a.repeats)])
        for variant in a.variants.split(","):
            settings = parse_variant(variant)
            vcfg = replace(cfg, **settings)
            tag = "hf" if variant == "default" else f"hf {variant}"
            dt, n, first = run_backend(backend, prompts, vcfg)
            record(f"{tag} first call", [(dt, n)],
                   note="includes compiling and capturing the CUDA graphs" if backend.graphs else "")
            runs = [run_backend(backend, prompts, vcfg) for _ in range(a.repeats)]
            record(tag, [r[:2] for r in runs], graphs=backend.graphs, compiled=backend.graphs and vcfg.hf_compile
                   and backend.compile_ok, kv_bucket=vcfg.hf_kv_bucket,
                   calls_differ=first != runs[0][2])  # sampling: fresh draws in every call
            if backend.graphs and backend.decoder is not None:
                report["arms"][tag]["breakdown"] = breakdown(backend, prompts, a.profile and a.json, tag)
                print(f"{tag} breakdown: {report['arms'][tag]['breakdown']}", flush=True)
            report["greedy_check"][variant] = check = greedy_check(a, work, settings)
            print(f"{tag} greedy check: {check}", flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps(report, indent=1))
        if cuda:
            report["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        hf = [r for k, r in report["arms"].items() if k.startswith("hf") and "first call" not in k]
        if "plain" in report["arms"]:
            report["speedup"] = max(r["tokens_per_s"] for r in hf) / report["arms"]["plain"]["tokens_per_s"]
            print(f"hf / plain: {report['speedup']:.1f}x", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        if a.cb:
            try:
                record("cb", [run_cb(backend, prompts, a.new_tokens, a.temperature) for _ in range(a.repeats)])
            except Exception as e:  # noqa: BLE001 - an optional comparison
                report["arms"]["cb"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
                print(f"cb failed: {report['arms']['cb']['error']}", flush=True)
    finally:
        backend.close()

    print(f"\n{report['device']}  shape {a.shape}  batch {a.batch}  prompt {a.prompt_len}  new {a.new_tokens}  "
          f"{report['versions']}")
    for name, r in report["arms"].items():
        print(f"{name:<22} {r.get('tokens_per_s', float('nan')):>10.0f} tokens/s")
    if "speedup" in report:
        print(f"hf / plain: {report['speedup']:.1f}x")
    print(f"greedy check: {report['greedy_check']}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
