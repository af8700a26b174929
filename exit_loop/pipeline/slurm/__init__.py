"""Run a generation or a whole ExIt run on SLURM: one sbatch job per stage, chained with afterok.

    exit-loop slurm submit configs/exit_gsm8k_qwen2.5-math-1.5b.yaml            # every round of a run
    exit-loop slurm submit configs/generate_gsm8k_qwen2.5-72b.yaml sample.num_shards=8
    exit-loop slurm submit runs/exit_gsm8k_qwen2.5-math-1.5b --dry-run           # scripts + graph only
    exit-loop slurm status runs/exit_gsm8k_qwen2.5-math-1.5b
    exit-loop slurm gpus Qwen/Qwen2.5-72B-Instruct     # prints 4: GPUs (= tensor parallel size)

`submit` reads a generation config (`exit-loop generate` keys) or an ExIt run config (`exit-loop
run` keys), whichever it is, and submits each unfinished stage as a job running the same command
`exit-loop run` or `exit-loop generate` would (`exit-loop stage ...`, `generate`, `merge`), so the
outputs are the same. ExIt: per round `rollout` (eval + sample; with sample.num_shards > 1 an
array over shards, task 0 also evaluating, then `merge`), `verify`, `filter`, `train`, each after
the one before, round after round. Generation: `generate` (an array over shards), then `merge`
(merge, verify, filter). Job names are `<experiment>-r<k>-<stage>`; scripts, logs and the job ids
(`jobs.json`) go to `<run dir>/slurm/`. Resources per stage come from the config's `slurm:`
section (`SlurmConfig`, exit_loop.pipeline.resources). With `slurm.nodes: N` (N > 1) each train
job holds N nodes and `srun` starts `accelerate launch` on every one of them, with the node count,
that node's rank (`$SLURM_NODEID`) and the first node's address from SLURM.

A server to launch (`sample.server.launch` for a generation, `teacher.server.launch` in a run:
exit_loop.sample.server) gets a job of its own, `<name>-server`, that depends on nothing and
writes its host:port to `<output_dir or run>/server/address` (removed again when it ends, and
`server/status` written); the sampling jobs run beside it and wait for that file and /health, and
`<name>-server-stop` cancels it once they have ended (afterany). With `nodes` > 1 the serve command
runs on every node through srun, with {node_rank}, {main_addr} and {headless} filled per node.

Every job is submitted with --requeue (SLURM puts a preempted job back in the queue) and
--signal=B:USR1@slurm.signal_s (near its time limit the job requeues itself); either way the
stage starts again and resumes from what is on disk. A failed stage stops the chain (its dependents never run). Submitting again continues from the
first unfinished stage: finished stages are skipped, queued and running jobs are kept (and waited
for), shards already complete are left out of the array.

`gpus`: the smallest power of two whose memory (80 GB a GPU by default) holds the bf16 weights with
40% left for the KV cache; the parameter count comes from the model name (`...-72B-...`) or, for a
local checkpoint, from its `config.json`.
"""
# The package: jobs.py (what each job runs, after which, when it is done), script.py (a job's sbatch
# script), queue.py (sbatch, squeue/sacct, jobs.json, status lines); here: the plan and the command.

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from exit_loop.config import check_unchanged, dump_yaml, load_config, read_yaml
from exit_loop.errors import ConfigError, DataError
from exit_loop.jsonl import atomic_write_text
from exit_loop.pipeline.generate import GenerateConfig
from exit_loop.pipeline.preflight import preflight
from exit_loop.pipeline.resources import SlurmConfig, gpus_for_model
from exit_loop.pipeline.run import ExperimentConfig, Run, resolve_styles
from exit_loop.pipeline.slurm.jobs import Job, exit_jobs, generate_jobs, server_jobs
from exit_loop.pipeline.slurm.queue import status_lines, submit_jobs
from exit_loop.sample import SampleConfig, launch_address


def is_generation(data: dict[str, Any], overrides: list[str]) -> bool:
    """Whether a config (its YAML data and overrides) holds only `exit-loop generate` keys."""
    keys = set(data) | {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}
    return keys <= {f.name for f in fields(GenerateConfig)}


def check_engines_fit(sample: SampleConfig, slurm: SlurmConfig) -> None:
    """An array task draws one shard on one engine; an unsharded rollout job runs
    sample.data_parallel engines at once (exit_loop.pipeline.parallel), which must fit its GPUs."""
    dp, tp = sample.data_parallel, sample.tensor_parallel_size
    gpus = slurm.resources("rollout", tp).gpus or 0
    if dp is not None and dp > 1 and sample.num_shards == 1 and dp * tp > gpus:
        raise ConfigError(f"sample.data_parallel={dp}: {dp} engines x sample.tensor_parallel_size={tp} need "
                          f"{dp * tp} GPUs, but a rollout job gets {gpus} (slurm.rollout.gpus); set "
                          f"slurm.rollout.gpus={dp * tp}, or sample.num_shards={dp} (an array of one-engine jobs) "
                          "with sample.data_parallel unset")


def generation_plan(src: Path, overrides: list[str], allow_change: bool, write: bool,
                    check: bool) -> tuple[list[Job], SlurmConfig, Path]:
    """`plan` of a generation config."""
    gcfg = load_config(GenerateConfig, src, overrides)
    if gcfg.sample.shard_id != 0:
        raise ConfigError("sample.shard_id: leave it unset; each array task sets its own")
    if check:
        check_engines_fit(gcfg.sample, gcfg.slurm)
    slurm_dir = Path(gcfg.output_dir) / "slurm"
    cfg_file = slurm_dir / "config.yaml"
    check_unchanged(cfg_file, gcfg, allow_change, "generation was submitted",
                    "Use another output_dir, or --allow_config_change", ignore=("slurm", "sample.server"))
    if write:
        atomic_write_text(cfg_file, dump_yaml(gcfg))
    return generate_jobs(gcfg, cfg_file.resolve()), gcfg.slurm, slurm_dir


def run_plan(src: Path, overrides: list[str], allow_change: bool, write: bool, check: bool,
             allow_overlap: bool) -> tuple[list[Job], SlurmConfig, Path]:
    """`plan` of an ExIt run config: the checks `exit-loop run` makes first (`preflight`; the hub
    only when jobs are queued: a dry run only prints), then whether its engines fit the jobs."""
    ecfg = load_config(ExperimentConfig, src, overrides)
    if check:
        run = preflight(ecfg, allow_change, allow_overlap, hub=write)
        check_engines_fit(ecfg.sample, ecfg.slurm)
    else:  # the status of what was submitted: its jobs, nothing checked again
        resolve_styles(ecfg)
        run = Run(ecfg)
    if write:
        atomic_write_text(run.top / "config.yaml", dump_yaml(ecfg))
    jobs = [j for r in Run.every_seed(ecfg) for j in exit_jobs(r)]
    srv = ecfg.teacher.server if ecfg.teacher else None
    if srv and srv.launch and not srv.base_url:  # the teacher's server, for every seed's round 0
        users = [j for j in jobs if j.key.endswith("r0/rollout")]
        jobs = server_jobs(srv.launch, ecfg.experiment, launch_address(run.top), [j.key for j in users],
                           lambda: all(j.done() for j in users), jobs)
    return jobs, ecfg.slurm, run.top / "slurm"


def plan(config: str, overrides: list[str], allow_change: bool = False,
         write: bool = True, check: bool = True, allow_overlap: bool = False) -> tuple[list[Job], SlurmConfig, Path]:
    """Load a run or generation config (a YAML file or a directory already submitted), write its
    resolved config where the jobs read it, and return the jobs, the slurm section and the slurm dir.
    `check`: a run's `preflight`, and refuse engines that would not fit a job's GPUs
    (`check_engines_fit`); off for `status`, which only reads what was submitted."""
    src = Path(config)
    if src.is_dir():
        gen_file = src / "slurm" / "config.yaml"
        src = gen_file if gen_file.exists() else src / "config.yaml"
    data, _ = read_yaml(src)
    if is_generation(data, overrides):
        return generation_plan(src, overrides, allow_change, write, check)
    return run_plan(src, overrides, allow_change, write, check, allow_overlap)


def status_jobs(run_dir: str) -> tuple[list[Job], Path]:
    """The jobs of a run or generation already submitted (its directory) and its slurm dir."""
    d = Path(run_dir)
    if not (d / "slurm" / "config.yaml").exists() and not (d / "config.yaml").exists():
        raise DataError(f"{d}: neither slurm/config.yaml (a generation) nor config.yaml (a run) is there")
    jobs, _, slurm_dir = plan(str(d), [], allow_change=True, write=False, check=False)
    return jobs, slurm_dir


# --------------------------------------------------------------------------- command line


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("submit", help="submit a generation or an ExIt run (or what is left of it)")
    s.add_argument("config", help="generation or run YAML, or a run / output dir already submitted")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. rounds=4 slurm.train.gpus=8")
    s.add_argument("--dry-run", action="store_true", help="print the scripts and the dependency graph only")
    s.add_argument("--allow_config_change", action="store_true",
                   help="continue a run whose config differs from the one it was made with")
    s.add_argument("--allow_overlap", action="store_true",
                   help="submit even though some held-out questions are also training questions")
    st = sub.add_parser("status", help="one line per stage: done, running, pending, failed, with job ids")
    st.add_argument("run_dir")
    g = sub.add_parser("gpus", help="print the GPU count (= tensor parallel size) a model needs")
    g.add_argument("model")
    g.add_argument("--gpu_memory_gb", type=float, default=80.0)
    g.add_argument("--max_gpus", type=int, default=8)
    a, rest = p.parse_known_args(argv)  # key=value may also come after --dry-run
    if rest and (a.what != "submit" or any(r.startswith("-") or "=" not in r for r in rest)):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        a.overrides += rest
    if a.what == "submit":
        jobs, cfg, slurm_dir = plan(a.config, a.overrides, a.allow_config_change, write=not a.dry_run,
                                    allow_overlap=a.allow_overlap)
        submit_jobs(jobs, cfg, slurm_dir, a.dry_run)
        if not a.dry_run:
            print(f"exit-loop slurm status {slurm_dir.parent}")
    elif a.what == "status":
        jobs, slurm_dir = status_jobs(a.run_dir)
        print("\n".join(status_lines(jobs, slurm_dir)))
    elif a.what == "gpus":
        print(gpus_for_model(a.model, a.gpu_memory_gb, a.max_gpus))
    return 0
