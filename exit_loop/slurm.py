"""SLURM helpers: what the sbatch scripts ask Python (bash never parses YAML or model names).

    exit-loop slurm gpus Qwen/Qwen2.5-72B-Instruct     # prints 4: GPUs (= tensor parallel size)

The GPU count is the smallest power of two whose memory (80 GB a GPU by default) holds the bf16
weights with 40% left for the KV cache; the parameter count comes from the model name
(`...-72B-...`) or, for a local checkpoint, from its `config.json`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

_SIZE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
KNOWN_PARAMS_B = {"deepseek-ai/DeepSeek-R1": 671.0, "deepseek-ai/DeepSeek-V3": 671.0}


def params_billions(model: str) -> float | None:
    """Parameter count in billions from a local config.json or the model's name, else None."""
    if model in KNOWN_PARAMS_B:
        return KNOWN_PARAMS_B[model]
    cfg_path = Path(model).expanduser() / "config.json"
    if cfg_path.exists():
        c = json.loads(cfg_path.read_text())
        h, layers, vocab = c.get("hidden_size"), c.get("num_hidden_layers"), c.get("vocab_size")
        inter = c.get("intermediate_size") or (4 * h if h else None)
        if h and layers and vocab:
            per_layer = 4 * h * h + 3 * h * inter
            return (layers * per_layer + 2 * vocab * h) / 1e9
    sizes = [float(m.group(1)) for m in _SIZE.finditer(model.rsplit("/", 1)[-1])]
    return max(sizes) if sizes else None


def gpus_for_model(model: str, gpu_memory_gb: float = 80.0, max_gpus: int = 8) -> int:
    b = params_billions(model)
    if b is None:
        return 1
    need_gb = 2.0 * b / 0.6  # bf16 weights, 40% of memory left for the KV cache
    n = 1
    while n * gpu_memory_gb < need_gb and n < max_gpus:
        n *= 2
    return n


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gpus", help="print the GPU count (= tensor parallel size) a model needs")
    g.add_argument("model")
    g.add_argument("--gpu_memory_gb", type=float, default=80.0)
    g.add_argument("--max_gpus", type=int, default=8)
    a = p.parse_args(argv)
    if a.what == "gpus":
        print(gpus_for_model(a.model, a.gpu_memory_gb, a.max_gpus))
    return 0
