"""How long a vLLM engine takes to start and stop in the quickstart's process, with the heap
frozen while it starts (what `exit_loop.sample.vllm.VLLMBackend` does) and without, side by side.

    python bench/engine_start.py [--repeats 4] [--model DIR]

The quickstart keeps every stage in one process (`isolate: false`), so torch, transformers, TRL
and datasets are imported before each engine starts, and vLLM's `gc.collect()` calls during
start-up each walk the whole heap. The bench imports the same libraries, builds a tiny model
(exit_loop.tiny_model) unless --model is given, then alternates the two ways `--repeats` times
after one warm-up each, and prints each start's and stop's seconds, the medians and the
environment (exit_loop.environment).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--model", default=None, help="a model directory (default: a tiny model built here)")
    a = p.parse_args()
    import datasets  # noqa: F401  the quickstart's heap
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from exit_loop.environment import describe, environment
    from exit_loop.sample import vllm as backend
    from exit_loop.sample.request import SampleConfig

    model = a.model
    if model is None:
        from exit_loop.tiny_model import create_tiny_model

        model = tempfile.mkdtemp(prefix="engine_start_")
        create_tiny_model(model, [f"Ava has {i} apples and buys {i + 1} more." for i in range(300)], 512)
    cfg = SampleConfig(model_name=model, dtype="float32", enforce_eager=True, max_model_len=512)
    frozen = backend.frozen_heap
    ways = {"frozen heap (shipped)": frozen, "plain": contextlib.nullcontext}
    times: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    for i in range(a.repeats + 1):
        for way, ctx in ways.items():
            backend.frozen_heap = ctx
            gc.collect()
            t0 = time.perf_counter()
            b = backend.VLLMBackend(cfg)
            t1 = time.perf_counter()
            b.close()
            del b
            t2 = time.perf_counter()
            if i:  # the first of each is the warm-up (imports, compiled kernels)
                times[way].append((t1 - t0, t2 - t1))
    backend.frozen_heap = frozen
    print(f"objects tracked by the collector: {len(gc.get_objects()):,}")
    for way, ts in times.items():
        starts, stops = [s for s, _ in ts], [s for _, s in ts]
        print(f"{way:22s} start {' '.join(f'{s:.2f}' for s in starts)}  median {statistics.median(starts):.2f} s;"
              f"  stop median {statistics.median(stops):.2f} s")
    print("environment:", describe(environment()))


if __name__ == "__main__":
    main()
