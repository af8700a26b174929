"""Running a rollout's plan (`exit_loop.pipeline.rollout`): `run_plan` runs one engine's plan in
this process and several on all the GPUs of one node: `sample.data_parallel` engine processes at
once, each pinned to its own GPUs, each drawing its share of the shards into the same shard files a
SLURM array writes; the caller then merges them as SLURM's merge job does
(`exit_loop.pipeline.stages`).

    exit-loop generate --config configs/generate_gsm8k_qwen2.5-32b.yaml       # 8 GPUs, TP 2: 4 engines
    exit-loop run configs/exit_gsm8k_qwen2.5-math-1.5b.yaml sample.data_parallel=4

How many: `sample.data_parallel`; unset, the visible GPUs (CUDA_VISIBLE_DEVICES, else all) divided
by `sample.tensor_parallel_size`, and 1 on a machine without a GPU or with `sample.gpu_device` set.
Process w gets GPUs w*TP … w*TP+TP-1 of the visible ones as its CUDA_VISIBLE_DEVICES; on a CPU-only
machine it gets its own slice of this process's CPU cores instead (its affinity and vLLM's
VLLM_CPU_OMP_THREADS_BIND, one list per tensor-parallel rank), and without tensor parallelism
runs its engine in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0) rather than in a second
one that would compete for the same cores (and import torch and vLLM once more).

Which work: a plan, one list of draws per process (`exit_loop.pipeline.rollout.Draw`). Process w
runs its draws in order on one engine (`rollout.run_draws`), starting another only where the model
or backend changes. Draws already complete on disk are left out, and a process with none left is
not started.

Failure: the first process to fail stops the others (SIGTERM, on which a worker SIGKILLs its process
group, engine included) and the stage raises StageFailed with its exit status and the end of its log
(`<stage dir>/workers/worker-W.log`). Each process appends every finished request to its shard file
(`exit_loop.sample`), so the same command again resumes every shard from what is on disk. A worker
and its engine die with the process that started them (PR_SET_PDEATHSIG), so no orphan writes on.

    python -m exit_loop.pipeline.parallel <workers>/worker-W.json     # one process (started here)
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from exit_loop.config import to_dict
from exit_loop.console import say
from exit_loop.errors import ConfigError, StageFailed
from exit_loop.jsonl import write_json
from exit_loop.pipeline.rollout import Draw, missing, run_draws
from exit_loop.sample import SampleConfig, SamplerBackend, check_model_path
from exit_loop.tasks import Problem

STOP_GRACE_S = 10.0  # how long a stopped worker gets to end before its group is SIGKILLed
LOG_TAIL = 3000      # characters of a failed worker's log quoted in the error


@dataclass
class Slot:
    """Where one engine process runs: its environment and (CPU) its cores."""
    env: dict[str, str]
    cores: list[int] | None = None
    where: str = ""


@dataclass
class Worker:
    index: int
    draws: list[Draw]
    proc: subprocess.Popen
    log: Path
    slot: Slot = field(default_factory=lambda: Slot({}))


# --------------------------------------------------------------------------- how many, where


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs); without
    that variable, every GPU torch sees (none on a CPU build)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        out = []
        for d in env.split(","):  # CUDA stops at the first invalid entry ("-1" hides them all)
            d = d.strip()
            if not d or d.startswith("-"):
                break
            out.append(d)
        return out
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def data_parallel(cfg: SampleConfig, gpus: Sequence[str] | None = None) -> int:
    """How many engine processes `cfg` asks for on this machine (see the module docstring)."""
    if cfg.backend == "server":  # no engine here: the server's requests in flight are server.max_concurrency
        return 1
    gpus = visible_gpus() if gpus is None else gpus
    n = cfg.data_parallel
    if n is None:
        return 1 if cfg.gpu_device or not gpus else max(1, len(gpus) // cfg.tensor_parallel_size)
    if n > 1 and cfg.gpu_device:
        raise ConfigError(f"sample.data_parallel={n} with sample.gpu_device={cfg.gpu_device!r}: gpu_device "
                          "pins one engine to one GPU; unset it to spread engines over the visible GPUs")
    return n


def slots(n: int, tensor_parallel_size: int, gpus: Sequence[str], cores: Sequence[int]) -> list[Slot]:
    """Where each of `n` engine processes runs: `tensor_parallel_size` GPUs each from `gpus`, or,
    with no GPU, an equal slice of `cores` each (at least one per tensor-parallel rank)."""
    tp = tensor_parallel_size
    if gpus:
        if n * tp > len(gpus):
            raise ConfigError(f"sample.data_parallel={n} x sample.tensor_parallel_size={tp} needs {n * tp} GPUs; "
                              f"{len(gpus)} visible ({','.join(gpus)}); lower sample.data_parallel or leave it unset")
        return [Slot({"CUDA_VISIBLE_DEVICES": ",".join(gpus[w * tp:(w + 1) * tp])}, None,
                     f"GPU {','.join(gpus[w * tp:(w + 1) * tp])}") for w in range(n)]
    cores = sorted(cores)
    if n * tp > len(cores):
        raise ConfigError(f"sample.data_parallel={n} x sample.tensor_parallel_size={tp} needs {n * tp} CPU cores "
                          f"(no GPU here: one core at least per engine rank); this process may use {len(cores)}")
    per = len(cores) // n
    out = []
    for w in range(n):
        mine = cores[w * per:(w + 1) * per]
        ranks = [mine[r * per // tp:(r + 1) * per // tp] for r in range(tp)]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, r)) for r in ranks),
               "OMP_NUM_THREADS": str(per // tp)}
        if tp == 1:  # the engine in the worker's own process: no second process on the same cores
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        out.append(Slot(env, mine, f"CPU {','.join(map(str, mine))}"))
    return out


def machine_slots(n: int, cfg: SampleConfig) -> list[Slot]:
    return slots(n, cfg.tensor_parallel_size, visible_gpus(), sorted(os.sched_getaffinity(0)))


# --------------------------------------------------------------------------- a plan, here or in workers


def run_plan(plans: list[list[Draw]], problem_sets: dict[str, list[Problem]], cfg: SampleConfig,
             work_dir: Path, backend: SamplerBackend | None = None) -> dict[str, float]:
    """Run a plan: one engine's draws in this process (`run_draws`, on `backend` where given, left
    open), several engines' in engine processes at once (`run_workers`, their logs and specs in
    `work_dir`). Returns, for each draw's file, when (time.time()) it was finished."""
    if len(plans) == 1:
        return run_draws(plans[0], problem_sets, backend)
    return run_workers(plans, problem_sets, cfg, work_dir)


def run_workers(plans: list[list[Draw]], problem_sets: dict[str, list[Problem]], cfg: SampleConfig,
                work_dir: Path) -> dict[str, float]:
    """Run plan w in engine process w (pinned as `machine_slots` says), all at once, and wait for
    them. Returns, for each draw's file, when (time.time()) it was finished; a draw complete on disk
    already counts as finished now. Every draw's file exists afterwards. Raises StageFailed (the
    others stopped) when a process fails."""
    where = machine_slots(len(plans), cfg)
    work_dir.mkdir(parents=True, exist_ok=True)
    finished: dict[str, float] = {}
    workers: list[Worker] = []
    try:
        for w, plan in enumerate(plans):
            todo = []
            for d in plan:
                if missing(d, problem_sets[d.problems]):
                    todo.append(d)
                else:  # nothing to draw: the (perhaps empty) file is all the merge needs
                    d.path.parent.mkdir(parents=True, exist_ok=True)
                    d.path.touch()
                    finished[str(d.path)] = time.time()
            if todo:
                workers.append(start_worker(w, todo, problem_sets, where[w], work_dir))
        if not workers:
            return finished
        wait(workers)
    finally:
        stop([x for x in workers if x.proc.poll() is None])
    for x in workers:
        done = json.loads((work_dir / f"worker-{x.index}.done.json").read_text())
        finished.update(done["finished"])
    return finished


def start_worker(w: int, draws: list[Draw], problem_sets: dict[str, list[Problem]], slot: Slot,
                 work_dir: Path) -> Worker:
    keys = {d.problems for d in draws}
    spec = work_dir / f"worker-{w}.json"
    write_json(spec, {"worker": w, "cores": slot.cores,
                      "problems": {k: [asdict(p) for p in problem_sets[k]] for k in sorted(keys)},
                      "draws": [{"cfg": to_dict(d.cfg), "problems": d.problems, "path": str(d.path)} for d in draws]})
    (work_dir / f"worker-{w}.done.json").unlink(missing_ok=True)
    log = work_dir / f"worker-{w}.log"
    with log.open("ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "exit_loop.pipeline.parallel", str(spec)],
                                env={**os.environ, **slot.env}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopped with its engine
    say(f"parallel: worker {w} (pid {proc.pid}, {slot.where}) draws {describe(draws, work_dir)}; log {log}")
    return Worker(w, draws, proc, log, slot)


def describe(draws: list[Draw], work_dir: Path) -> str:
    """The draws' files, relative to the directory above the stage's (`round_00/`, a generation's parent)."""
    return ", ".join(os.path.relpath(d.path, work_dir.parent.parent) for d in draws)


def wait(workers: list[Worker]) -> None:
    """Until every worker has exited 0; the first that does not stops the rest (StageFailed)."""
    running = list(workers)
    while running:
        for x in list(running):
            rc = x.proc.poll()
            if rc is None:
                continue
            running.remove(x)
            if rc != 0:
                stop(running)
                how = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
                tail = x.log.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL:] if x.log.exists() else ""
                raise StageFailed(f"data-parallel worker {x.index} (pid {x.proc.pid}, {x.slot.where}) failed "
                                  f"({how}) drawing {describe(x.draws, x.log.parent)}; the other workers were stopped. "
                                  f"The end of its log {x.log}:\n{tail}\n")
            say(f"parallel: worker {x.index} done")
        time.sleep(0.2)


def stop(workers: list[Worker]) -> None:
    """SIGTERM each worker's process group (its engine with it); SIGKILL what is left after a grace."""
    for x in workers:
        _signal_group(x.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for x in workers:
        try:
            x.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(x.proc.pid, signal.SIGKILL)  # the engine's processes too, if they outlived it
        x.proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- a worker


def _die_with_parent() -> None:
    """Whatever ends this worker ends its engine too: SIGTERM (from `stop`, or from Linux when the
    process that started it dies: PR_SET_PDEATHSIG) SIGKILLs its whole process group, the engine's
    processes included, so no orphan draws on into a shard file a rerun appends to."""
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(os.getpgrp(), signal.SIGKILL))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before the line above
        os.killpg(os.getpgrp(), signal.SIGKILL)


def worker_main(spec_path: str) -> None:
    """Run one worker's draws (the spec `start_worker` wrote) on its engine (`run_draws`)."""
    _die_with_parent()
    spec: dict[str, Any] = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("cores"):
        os.sched_setaffinity(0, spec["cores"])  # vLLM's engine process inherits it
    sets = {k: [Problem(**p) for p in v] for k, v in spec["problems"].items()}
    draws = [Draw(SampleConfig(**d["cfg"]), d["problems"], Path(d["path"])) for d in spec["draws"]]
    for d in draws:  # a missing checkpoint fails now, not after another model's draws
        check_model_path(d.cfg.model_name)
    finished = run_draws(draws, sets)
    write_json(Path(spec_path).with_name(f"worker-{spec['worker']}.done.json"), {"finished": finished})


if __name__ == "__main__":
    worker_main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # engines are closed, files written: skip torch/vLLM's slow interpreter teardown
