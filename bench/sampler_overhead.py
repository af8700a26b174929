"""Sampler overhead: exit-loop's `sample()` against a bare `LLM.generate` on one vLLM engine.

    VLLM_CPU_KVCACHE_SPACE=2 python bench/sampler_overhead.py --num_prompts 768 --num_samples 1 --max_tokens 128

One engine (`VLLMBackend`, the tiny Qwen2 model from `exit_loop.tiny_model`, float32, eager) serves
both sides, on the same GSM8K prompts (the `r1_zero` prompts `sample()` builds) and the same
`SamplingParams` (`backend.sampling_params(n)`). `ignore_eos=True` and no stop strings make every
sample exactly `max_tokens` long, so both sides produce the same number of tokens. After one
warm-up of each, the two alternate for `--repeats` repeats (the order flips each repeat so drift
in machine load falls on both):

  bare       `backend.llm.generate(prompts, params, use_tqdm=False)`
  exit-loop  `sample(cfg, problems, <fresh temp>.jsonl, backend=backend)`: streaming, row
             building, normalisation, JSONL writing, fsync and progress bar included

Each is timed with `time.perf_counter`; output tokens/s is computed from the tokens actually
produced (for exit-loop: the `num_tokens` read back from the JSONL rows). Prints per-repeat
figures (with the front-end process's CPU time, where exit-loop's own work lands), medians and
the median ratio exit-loop/bare (1.0 = no overhead). `--json PATH` writes them.
Builds the tiny model into a temporary directory unless `--model` names one. Needs the
`if __name__ == "__main__":` guard: vLLM spawns its engine process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_prompts", type=int, default=768, help="GSM8K problems (first N of the file)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt (vLLM's n)")
    p.add_argument("--max_tokens", type=int, default=128, help="new tokens per sample (exact: ignore_eos)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each side, after one warm-up each")
    p.add_argument("--gsm8k", default=str(DEFAULT_GSM8K), help="GSM8K-format JSONL (prompts and tokenizer text)")
    p.add_argument("--model", default=None, help="an existing model directory; default: build the tiny model")
    p.add_argument("--tokenizer_texts", type=int, default=2000, help="GSM8K rows the tiny tokenizer trains on")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args()


def machine_info() -> dict:
    import torch
    import vllm

    cpu = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "")
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu or platform.processor(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "loadavg": list(os.getloadavg()),
    }


def measure(backend, cfg, problems, work: Path, repeats: int) -> tuple[dict, dict[str, list[dict]]]:
    """One warm-up of each side, then `repeats` alternating timed runs of each."""
    from exit_loop.jsonl import read_jsonl
    from exit_loop.prompts import teacher_prompt
    from exit_loop.sample import sample

    # exactly the prompts and parameters sample() gives the engine
    prompts = [teacher_prompt(p.question, cfg.prompt_style) for p in problems]
    params = backend.sampling_params(cfg.num_samples)

    def run_bare() -> tuple[float, float, int, int]:
        c0, t0 = time.process_time(), time.perf_counter()
        outs = backend.llm.generate(prompts, params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return dt, cpu, sum(len(o.token_ids) for out in outs for o in out.outputs), sum(len(out.outputs) for out in outs)

    run_id = iter(range(10**6))

    def run_exit_loop() -> tuple[float, float, int, int]:
        out_path = work / f"samples_{next(run_id)}.jsonl"  # fresh: nothing to resume
        c0, t0 = time.process_time(), time.perf_counter()
        sample(cfg, problems, out_path, backend=backend)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = read_jsonl(out_path)
        out_path.unlink()
        return dt, cpu, sum(r["num_tokens"] for r in rows), len(rows)

    sides = {"bare": run_bare, "exit_loop": run_exit_loop}
    print(f"warm-up (load average {os.getloadavg()[0]:.2f})", flush=True)
    warmup = {name: fn()[0] for name, fn in sides.items()}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            dt, cpu, toks, n = sides[name]()
            results[name].append({"repeat": r, "seconds": dt, "frontend_cpu_s": cpu, "tokens": toks,
                                  "samples": n, "tokens_per_s": toks / dt})
            print(f"  repeat {r} {name:9s} {dt:7.2f}s {toks:8d} tokens {toks / dt:9.0f} tok/s "
                  f"(frontend CPU {cpu:.2f}s)", flush=True)
    return warmup, results


def bench(args: argparse.Namespace, work: Path) -> None:
    from exit_loop.tasks import DataConfig, load_problems
    from exit_loop.sample import SampleConfig, VLLMBackend

    if args.model is None:
        from exit_loop.tiny_model import create_tiny_model, gsm8k_texts

        t = time.perf_counter()
        model = str(create_tiny_model(work / "tiny_model", gsm8k_texts(args.gsm8k, limit=args.tokenizer_texts)))
        print(f"built tiny model in {time.perf_counter() - t:.1f}s -> {model}", flush=True)
    else:
        model = args.model

    problems = load_problems(DataConfig(dataset=args.gsm8k, split="train", num_examples=args.num_prompts))
    cfg = SampleConfig(
        model_name=model, backend="vllm", prompt_style="r1_zero", enforce_eager=True, dtype="float32",
        max_tokens=args.max_tokens, num_samples=args.num_samples, temperature=args.temperature,
        seed=0, stop=[], sampling={"ignore_eos": True},
    )
    t = time.perf_counter()
    backend = VLLMBackend(cfg)
    engine_start_s = time.perf_counter() - t
    print(f"engine started in {engine_start_s:.1f}s", flush=True)

    expected = len(problems) * cfg.num_samples * cfg.max_tokens
    info = machine_info()
    try:
        warmup, results = measure(backend, cfg, problems, work, args.repeats)
    finally:
        backend.close()  # stop the engine now: left to interpreter exit, its shutdown can hang

    med = {name: statistics.median(x["tokens_per_s"] for x in rs) for name, rs in results.items()}
    ratio = med["exit_loop"] / med["bare"]
    per_repeat_ratio = [e["tokens_per_s"] / b["tokens_per_s"] for b, e in zip(results["bare"], results["exit_loop"])]
    info_after = os.getloadavg()

    print()
    print(f"machine: {info['cpu']}, nproc={info['nproc']}, python {info['python']}, "
          f"torch {info['torch']}, vllm {info['vllm']}, VLLM_CPU_KVCACHE_SPACE={info['VLLM_CPU_KVCACHE_SPACE']}")
    print(f"load average before/after: {info['loadavg'][0]:.2f} / {info_after[0]:.2f}")
    print(f"workload: {len(problems)} prompts x {cfg.num_samples} samples x {cfg.max_tokens} tokens "
          f"(expected {expected} tokens per run), temperature {cfg.temperature}, ignore_eos, no stop; "
          f"engine start {engine_start_s:.1f}s")
    print(f"warm-up: bare {warmup['bare']:.2f}s, exit-loop {warmup['exit_loop']:.2f}s")
    print()
    print(f"{'repeat':>6}  {'bare s':>8} {'bare tok/s':>11} {'cpu s':>6}  "
          f"{'exit-loop s':>11} {'exit-loop tok/s':>15} {'cpu s':>6}  {'ratio':>6}")
    for b, e, rr in zip(results["bare"], results["exit_loop"], per_repeat_ratio):
        print(f"{b['repeat']:>6}  {b['seconds']:8.2f} {b['tokens_per_s']:11.0f} {b['frontend_cpu_s']:6.2f}  "
              f"{e['seconds']:11.2f} {e['tokens_per_s']:15.0f} {e['frontend_cpu_s']:6.2f}  {rr:6.3f}")
    mid = {name: {k: statistics.median(x[k] for x in rs) for k in ("seconds", "frontend_cpu_s")}
           for name, rs in results.items()}
    print(f"{'median':>6}  {mid['bare']['seconds']:8.2f} {med['bare']:11.0f} {mid['bare']['frontend_cpu_s']:6.2f}  "
          f"{mid['exit_loop']['seconds']:11.2f} {med['exit_loop']:15.0f} {mid['exit_loop']['frontend_cpu_s']:6.2f}  "
          f"{ratio:6.3f}")
    print("(cpu s: CPU time of this, the front-end, process; the engine core and worker processes are apart)")
    toks = {name: sorted({x["tokens"] for x in rs}) for name, rs in results.items()}
    print(f"tokens per run: bare {toks['bare']}, exit-loop {toks['exit_loop']} (expected {expected})")
    print(f"ratio exit-loop/bare (median tokens/s): {ratio:.3f}")

    if args.json:
        out = {
            "benchmark": "sampler_overhead",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([f"VLLM_CPU_KVCACHE_SPACE={info['VLLM_CPU_KVCACHE_SPACE']}", "python", *sys.argv]),
            "machine": info, "loadavg_after": list(info_after),
            "workload": {"num_prompts": len(problems), "num_samples": cfg.num_samples,
                         "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
                         "expected_tokens": expected, "model": model},
            "engine_start_s": engine_start_s,
            "warmup_s": warmup,
            "repeats": results, "median_tokens_per_s": med, "per_repeat_ratio": per_repeat_ratio,
            "ratio_median": ratio,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="sampler_overhead.") as work:  # model and samples
        bench(args, Path(work))


if __name__ == "__main__":
    main()
