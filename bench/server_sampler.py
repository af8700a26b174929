"""Server backend against the in-process engine: the same model and prompts through vLLM's
OpenAI-compatible server (`backend: server`, exit_loop.sample.server) and through vLLM's offline
engine in this process (`backend: vllm`, exit_loop.sample.vllm).

    VLLM_CPU_KVCACHE_SPACE=1 python bench/server_sampler.py --questions 64 --samples 4 --max_tokens 128 \\
        --concurrency 16,64 --json server_sampler.json

What it measures: the wall time of one `sample(cfg, problems, path, backend=...)` call on each
side (the whole stage: prompts, requests, rows, normalisation, JSONL writing), engine and server
start not counted, each after a warm-up call; samples/s, generated tokens/s and the ratio
server / in-process of each (goal: >= 0.9 at max_concurrency >= 64; a goal, not a test).

- Model: a randomly initialised Qwen2ForCausalLM built here (default hidden 512, 8 layers,
  intermediate 1408, 8 heads, 2 KV heads: ~23M parameters, so the figure is not all HTTP
  overhead), with `exit_loop.tiny_model`'s byte-level BPE tokenizer trained on GSM8K text, saved
  as safetensors; `--model DIR` uses an existing one instead. Nothing is downloaded.
- Problems: the first `--questions` GSM8K questions (`exit_loop.tasks.load_problems`),
  `--samples` samples each (one request with n per question on both sides), the `r1_zero`
  prompts, temperature 1.0, `ignore_eos` and no stop strings, so every sample is exactly
  `--max_tokens` tokens long on both sides (checked: every row must end with `length`).
  The same SampleConfig on both sides except `backend` (and `server` for the server).
- Engine settings, the same on both sides: float32, eager, seed 0, max_num_seqs 256,
  max_num_batched_tokens 4096 (set explicitly: vLLM's CPU defaults differ between the `LLM` class
  and the server), chunked prefill off (see ENGINE below: vLLM-CPU's server dies with it on),
  the engine core in its own process (vLLM's default on both), KV cache from
  VLLM_CPU_KVCACHE_SPACE (default here: 1 GiB).
- In-process: `start_backend`, a warm-up `sample` on a few questions, the timed `sample`, then
  `close()`, and its child processes are waited for (and killed if they linger) before the
  server starts: on a small machine the two would compete for the cores.
- Server: `python -m vllm.entrypoints.openai.api_server` as a subprocess in its own session
  (its log in the work directory), ready at GET /health == 200, a warm-up `sample`, then one
  timed `sample` per `--concurrency` value (`server.max_concurrency`). Generated tokens are the
  server's own count (`vllm:generation_tokens_total` of /metrics, before and after); the
  client's count (what `sample()` returns: for n > 1 the server backend re-tokenises the text)
  is printed beside it. The server's process group is killed at the end, also on error.

Needs the `if __name__ == "__main__":` guard (vLLM spawns its engine process). `--json PATH`
writes the figures (and the server's log beside them, PATH.server.log).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# The same on both sides. Chunked prefill off: with it, vLLM-CPU 0.32.0 kills its engine
# ("CPU Generator does not use offset", gpu_model_runner._bookkeeping_sync) when a request with a
# seed of its own (the server backend sends one per request) has its prompt's prefill split
# across steps; the offline engine's requests have no seed of their own, so only the server falls.
ENGINE = {"max_num_seqs": 256, "max_num_batched_tokens": 4096, "enable_chunked_prefill": False}
GPU_MEMORY_UTILIZATION = 0.4  # on the CPU build: the share of RAM vLLM wants free at start (VLLMBackend's CPU default)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64, help="GSM8K questions (first N of the file)")
    p.add_argument("--samples", type=int, default=4, help="samples per question (n)")
    p.add_argument("--max_tokens", type=int, default=128, help="new tokens per sample (exact: ignore_eos, no stop)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--concurrency", default="64",
                   help="server.max_concurrency values, comma-separated (e.g. 16,64); one timed run each")
    p.add_argument("--warmup_questions", type=int, default=4, help="questions in each side's warm-up call")
    p.add_argument("--gsm8k", default=str(DEFAULT_GSM8K), help="GSM8K-format JSONL (prompts and tokenizer text)")
    p.add_argument("--model", default=None, help="an existing model directory; default: build one (see below)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=1024, help="the BPE tokenizer's vocabulary")
    p.add_argument("--tokenizer_texts", type=int, default=2000, help="GSM8K rows the tokenizer trains on")
    p.add_argument("--server_timeout", type=float, default=600.0, help="seconds to wait for the server's /health")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args()
    a.concurrency = [int(x) for x in re.split(r"[,\s]+", str(a.concurrency).strip()) if x]
    if not a.concurrency or min(a.concurrency) < 1:
        p.error("--concurrency: one or more positive integers, e.g. 16,64")
    return a


# --- the model --------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, out: Path) -> tuple[str, int]:
    """A random Qwen2ForCausalLM of the requested shape with the GSM8K BPE tokenizer, saved as
    safetensors; returns the directory and the parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from exit_loop.tiny_model import gsm8k_texts, train_tokenizer

    tok = train_tokenizer(gsm8k_texts(args.gsm8k, limit=args.tokenizer_texts), args.vocab_size)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return str(out), n_params


def count_params(model_dir: str) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                size = 1
                for d in st.get_slice(k).get_shape():
                    size *= int(d)
                n += size
    return n


# --- the machine ------------------------------------------------------------------------------

def machine_info() -> dict:
    """sampler_overhead.py's (CPU, torch, vLLM, load), with the openai client's version."""
    import openai

    from sampler_overhead import machine_info as engine_machine_info  # bench/ is on sys.path as the script's dir

    return {**engine_machine_info(), "openai": openai.__version__}


def load() -> float:
    return os.getloadavg()[0]


# --- timing one sample() call -----------------------------------------------------------------

def timed_sample(cfg, problems, out_path: Path, backend) -> dict:
    from exit_loop.jsonl import read_jsonl
    from exit_loop.sample import sample

    l0, c0, t0 = load(), time.process_time(), time.perf_counter()
    res = sample(cfg, problems, out_path, backend=backend, summary=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = read_jsonl(out_path)
    not_length = sum(r["finish_reason"] != "length" for r in rows)
    return {"seconds": dt, "client_cpu_s": cpu, "samples": len(rows), "sample_tokens": res.tokens,
            "rows_not_length": not_length, "load_before": l0, "load_after": load()}


def wait_children_gone(timeout: float = 30.0) -> list[str]:
    """Wait for this process's children (the engine core) to exit; kill those that linger.
    Returns what had to be killed."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(kids, timeout=timeout)
    killed = []
    for p in alive:
        try:
            killed.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return killed


def run_in_process(cfg, problems, warm, work: Path) -> dict:
    from exit_loop.sample import start_backend

    l0, t0 = load(), time.perf_counter()
    backend = start_backend(cfg)
    start_s = time.perf_counter() - t0
    print(f"in-process engine started in {start_s:.1f}s (load {l0:.2f})", flush=True)
    try:
        t0 = time.perf_counter()
        timed_sample(cfg, warm, work / "inproc_warmup.jsonl", backend)
        print(f"  warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        r = timed_sample(cfg, problems, work / "inproc.jsonl", backend)
    finally:
        backend.close()
        del backend
        killed = wait_children_gone()
    if killed:
        print(f"  killed lingering engine processes: {killed}", flush=True)
    r.update(engine_start_s=start_s, generated_tokens=r["sample_tokens"])  # the engine's own count
    print(f"  timed: {r['seconds']:.2f}s, {r['samples']} samples, {r['generated_tokens']} tokens "
          f"(load {r['load_before']:.2f} -> {r['load_after']:.2f})", flush=True)
    return r


# --- the server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--seed", str(seed), "--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION),
            "--max-num-seqs", str(ENGINE["max_num_seqs"]),
            "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
            "--enable-chunked-prefill" if ENGINE["enable_chunked_prefill"] else "--no-enable-chunked-prefill"]


def wait_healthy(proc: subprocess.Popen, root: str, log_path: Path, timeout: float) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready; its log:\n{tail}")
        try:
            if httpx.get(f"{root}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f}s; see {log_path}")


def generation_tokens(root: str) -> float:
    """The server's `vllm:generation_tokens_total` (summed over its label sets)."""
    import httpx

    text = httpx.get(f"{root}/metrics", timeout=10.0).text
    return sum(float(m.group(1)) for m in
               re.finditer(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.eE+-]+)$", text, re.M))


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 20 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there (engine core)
    except ProcessLookupError:
        pass
    proc.wait()


def run_server(cfg, problems, warm, work: Path, concurrency: list[int], timeout: float,
               keep_log: str | None = None) -> tuple[dict, list[dict]]:
    from dataclasses import replace

    from exit_loop.sample import ServerConfig, start_backend

    port = free_port()
    root = f"http://127.0.0.1:{port}"
    cmd = server_command(cfg.model_name, port, cfg.seed)
    log_path = work / "server.log"
    env = dict(os.environ)
    l0, t0 = load(), time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = {"command": " ".join(cmd), "log": keep_log or str(log_path)}
    runs = []
    try:
        wait_healthy(proc, root, log_path, timeout)
        info["start_s"] = time.perf_counter() - t0
        print(f"server ready in {info['start_s']:.1f}s (load {l0:.2f}), pid {proc.pid}", flush=True)
        scfg = replace(cfg, backend="server", server=ServerConfig(base_url=f"{root}/v1", max_concurrency=max(concurrency)))
        backend = start_backend(scfg)
        t0 = time.perf_counter()
        timed_sample(scfg, warm, work / "server_warmup.jsonl", backend)
        print(f"  warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        backend.close()
        for c in concurrency:
            # a backend per value: ServerBackend reads server.max_concurrency from the config it was
            # started with, not from the one handed to generate() (a client, no engine: cheap)
            ccfg = replace(scfg, server=replace(scfg.server, max_concurrency=c))
            backend = start_backend(ccfg)
            backend.tokenizer()  # loaded before the clock starts, as the in-process engine's is
            g0 = generation_tokens(root)
            r = timed_sample(ccfg, problems, work / f"server_c{c}.jsonl", backend)
            backend.close()
            r.update(concurrency=c, generated_tokens=int(round(generation_tokens(root) - g0)))
            runs.append(r)
            print(f"  max_concurrency {c}: {r['seconds']:.2f}s, {r['samples']} samples, {r['generated_tokens']} "
                  f"tokens by the server ({r['sample_tokens']} by the client's count), client CPU "
                  f"{r['client_cpu_s']:.2f}s (load {r['load_before']:.2f} -> {r['load_after']:.2f})", flush=True)
    except BaseException:
        state = "still running" if proc.poll() is None else f"exited with {proc.returncode}"
        tail = log_path.read_text(errors="replace")[-4000:]
        print(f"server error; the server process {state}; the end of its log:\n{tail}", file=sys.stderr, flush=True)
        raise
    finally:
        stop_server(proc)
        if keep_log:
            Path(keep_log).parent.mkdir(parents=True, exist_ok=True)
            Path(keep_log).write_bytes(log_path.read_bytes())
    return info, runs


# --- main -------------------------------------------------------------------------------------

def bench(args: argparse.Namespace, work: Path) -> dict:
    from exit_loop.sample import SampleConfig
    from exit_loop.tasks import DataConfig, load_problems

    l_start = load()
    if args.model is None:
        t = time.perf_counter()
        model, n_params = build_model(args, work / "model")
        print(f"built the model in {time.perf_counter() - t:.1f}s: {n_params / 1e6:.1f}M parameters -> {model}",
              flush=True)
    else:
        model, n_params = args.model, count_params(args.model)
    problems = load_problems(DataConfig(dataset=args.gsm8k, split="train", num_examples=args.questions))
    # the warm-up's questions come after the timed ones: no prompt is seen twice (prefix caching)
    warm = load_problems(DataConfig(dataset=args.gsm8k, split="train",
                                    num_examples=args.questions + args.warmup_questions))[args.questions:]
    cfg = SampleConfig(model_name=model, backend="vllm", prompt_style="r1_zero", dtype="float32",
                       enforce_eager=True, gpu_memory_utilization=GPU_MEMORY_UTILIZATION, engine=dict(ENGINE),
                       num_samples=args.samples, max_tokens=args.max_tokens, temperature=args.temperature,
                       seed=0, stop=[], sampling={"ignore_eos": True})
    expected = len(problems) * args.samples * args.max_tokens
    info = machine_info()

    inproc = run_in_process(cfg, problems, warm, work)
    server_info, server_runs = run_server(cfg, problems, warm, work, args.concurrency, args.server_timeout,
                                         f"{args.json}.server.log" if args.json else None)

    def rates(r: dict) -> dict:
        return {"samples_per_s": r["samples"] / r["seconds"], "tokens_per_s": r["generated_tokens"] / r["seconds"]}

    inproc.update(rates(inproc))
    for r in server_runs:
        r.update(rates(r))
        r["ratio"] = r["tokens_per_s"] / inproc["tokens_per_s"]
        r["ratio_samples"] = r["samples_per_s"] / inproc["samples_per_s"]

    print()
    print(f"machine: {info['cpu']}, nproc={info['nproc']}, python {info['python']}, torch {info['torch']}, "
          f"vllm {info['vllm']}, openai {info['openai']}, VLLM_CPU_KVCACHE_SPACE={info['VLLM_CPU_KVCACHE_SPACE']}")
    print(f"model: {model} ({n_params / 1e6:.1f}M parameters, float32, eager); load average at start "
          f"{l_start:.2f}, at end {load():.2f}")
    print(f"workload: {len(problems)} questions x {args.samples} samples x {args.max_tokens} tokens "
          f"(expected {expected} tokens), temperature {args.temperature}, ignore_eos, no stop; engine "
          f"start {inproc['engine_start_s']:.1f}s, server start {server_info['start_s']:.1f}s (not timed)")
    print()
    print(f"{'side':<22} {'seconds':>8} {'samples/s':>10} {'tokens/s':>9} {'ratio':>6} {'client CPU s':>12} {'load':>11}")

    def line(name: str, r: dict, ratio: str) -> None:
        print(f"{name:<22} {r['seconds']:8.2f} {r['samples_per_s']:10.2f} {r['tokens_per_s']:9.0f} {ratio:>6} "
              f"{r['client_cpu_s']:12.2f} {r['load_before']:5.2f}→{r['load_after']:<5.2f}")

    line("in-process (vllm)", inproc, "1")
    for r in server_runs:
        line(f"server, concurrency {r['concurrency']}", r, f"{r['ratio']:.3f}")
    bad = [("in-process", inproc)] + [(f"server c{r['concurrency']}", r) for r in server_runs]
    for name, r in bad:
        if r["samples"] != len(problems) * args.samples or r["generated_tokens"] != expected or r["rows_not_length"]:
            print(f"WARNING {name}: {r['samples']} samples, {r['generated_tokens']} tokens, "
                  f"{r['rows_not_length']} rows not cut at max_tokens (expected {expected} tokens)")
    print("(ratio: server tokens/s / in-process tokens/s; goal >= 0.9 at max_concurrency >= 64. client CPU s: "
          "this process's CPU time during the call; the engine core and the server are apart)")
    return {
        "benchmark": "server_sampler",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([f"VLLM_CPU_KVCACHE_SPACE={info['VLLM_CPU_KVCACHE_SPACE']}", "python", *sys.argv]),
        "machine": info, "load_start": l_start, "load_end": load(),
        "model": {"path": model, "parameters": n_params},
        "workload": {"questions": len(problems), "samples": args.samples, "max_tokens": args.max_tokens,
                     "temperature": args.temperature, "expected_tokens": expected},
        "engine": {**ENGINE, "gpu_memory_utilization": GPU_MEMORY_UTILIZATION, "dtype": "float32",
                   "enforce_eager": True},
        "in_process": inproc, "server": {**server_info, "runs": server_runs},
    }


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks stop the server
    with tempfile.TemporaryDirectory(prefix="server_sampler.") as work:
        out = bench(args, Path(work))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
