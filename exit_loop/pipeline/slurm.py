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

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from exit_loop.config import check_unchanged, dump_yaml, load_config, read_yaml
from exit_loop.errors import ConfigError, DataError, SlurmError
from exit_loop.jsonl import atomic_write_text, write_json
from exit_loop.pipeline.generate import GenerateConfig, shard_file
from exit_loop.pipeline.parallel import drawn_pairs
from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.hub import check_hub
from exit_loop.pipeline.run import (ExperimentConfig, Run, check_config_change, resolve_styles, seed_students,
                                    training_problems)
from exit_loop.pipeline.stages import hub_settings, round_questions
from exit_loop.sample import LaunchConfig, SampleConfig, check_model_path, launch_address, select_shard
from exit_loop.tasks import Problem, check_overlap, load_problems

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- jobs

SHARD = "{shard}"   # in a job's argv: the array task id
PORT = "{port}"     # in a job's argv: a port derived from the job id (distributed training)
NODE_RANK = "{node_rank}"  # in a job's argv: this node's rank in a multi-node job (srun sets it per node)
MAIN_ADDR = "{main_addr}"  # in a job's argv: the first node of the job (the script exports it)
_SHELL = {SHARD: '"$SLURM_ARRAY_TASK_ID"', PORT: '"$((20000 + SLURM_JOB_ID % 20000))"',
          NODE_RANK: '"$SLURM_NODEID"', MAIN_ADDR: '"$MAIN_ADDR"'}


@dataclass
class Job:
    key: str                          # its id in jobs.json: "main/r0/rollout", "shared/r0/verify", "merge"
    name: str                         # --job-name
    section: str                      # SlurmConfig section: rollout, merge, verify, filter, train
    argv: list[str]
    after: list[str]                  # keys of the jobs it waits for (afterok)
    done: Callable[[], bool]          # finished: its manifests exist
    shards: Callable[[], list[int]] | None = None  # an array job: the tasks still to run
    gpus: int = 0                     # when the config sets none
    shell: str | None = None          # a shell command line instead of argv ({jobs:KEY}: that job's ids)
    nodes: int = 1                    # train jobs: slurm.nodes instead
    pre: list[str] = field(default_factory=list)   # shell lines before the command
    dependency: str = "afterok"       # how it waits for `after` (afterany: whatever became of them)
    clear: list[Path] = field(default_factory=list)  # files removed when it is submitted anew


def unfinished_shards(paths: list[Path], problems: Callable[[], list[Problem]], num_samples: int) -> list[int]:
    """Shards (index into `paths`) still missing a (problem, sample) pair; the problems are only
    loaded when some shard file exists."""
    if not any(p.exists() for p in paths):
        return list(range(len(paths)))
    probs = problems()
    out = []
    for i, path in enumerate(paths):
        want = {(p.id, j) for p in select_shard(probs, len(paths), i) for j in range(num_samples)}
        if not want <= drawn_pairs(path):
            out.append(i)
    return out


def sharded_sampling(key: str, name: str, argv: list[str], merge_key: str, merge_name: str,
                     merge_argv: list[str], after: list[str], todo: Callable[[], list[int]],
                     merged: Callable[[], bool], gpus: int) -> list[Job]:
    """Sharded sampling as SLURM runs it: an array job over the shards still `todo` (its task id
    in place of SHARD in `argv`), then the merge job after it."""
    return [Job(key, name, "rollout", argv, after, lambda: not todo(), todo, gpus),
            Job(merge_key, merge_name, "merge", merge_argv, [key], merged)]


def exit_jobs(run: Run) -> list[Job]:
    """Every stage of every arm and round of an ExIt run, in submission order."""
    cfg = run.cfg
    n = cfg.sample.num_shards
    samples = {arm: a.split != "original" for arm, a in cfg.arms.items()}
    jobs: list[Job] = []

    seed_tag = f"s{cfg.seed}" if run.several_seeds else ""

    def job(arm: str, k: int, stage: str, owner: str, shard: bool = False) -> tuple[str, str, list[str]]:
        """(key, job name, argv) of a stage."""
        prefix = cfg.experiment + (f"-{seed_tag}" if seed_tag else "")
        prefix = prefix if owner == "shared" or not run.multi else f"{prefix}-{arm}"
        launcher = cfg.train.launcher if stage == "train" else ""
        train_gpus = cfg.slurm.resources("train", 1).gpus or 0
        nodes = cfg.slurm.nodes
        if stage == "train" and not launcher and nodes > 1:  # one accelerate launch per node (srun)
            launcher = (f"{shlex.quote(sys.executable)} -m accelerate.commands.launch --multi_gpu "
                        f"--num_machines {nodes} --machine_rank {NODE_RANK} --main_process_ip {MAIN_ADDR} "
                        f"--main_process_port {PORT} --num_processes {nodes * max(train_gpus, 1)}")
        elif stage == "train" and not launcher and train_gpus > 1:
            launcher = (f"{shlex.quote(sys.executable)} -m accelerate.commands.launch --multi_gpu "
                        f"--num_processes {train_gpus} --main_process_port {PORT}")
        argv = run.stage_cmd(stage, arm, k, launcher) + (["--shard", SHARD] if shard else [])
        return f"{seed_tag}/{owner}/r{k}/{stage}".lstrip("/"), f"{prefix}-r{k}-{stage}", argv

    def add(arm: str, k: int, stage: str, after: str | None, done: Callable[[], bool], owner: str = "") -> str:
        key, name, argv = job(arm, k, stage, owner or arm)
        gpus = {"rollout": cfg.sample.tensor_parallel_size, "train": 1}.get(stage, 0)
        jobs.append(Job(key, name, stage, argv, [after] if after else [], done, None, gpus))
        return key

    def rollout(arm: str, k: int, after: str | None, owner: str = "") -> str:
        sampling = samples[arm] and k < cfg.rounds
        if sampling and n > 1:
            def todo() -> list[int]:
                shards = [] if run.done(arm, k, "eval") else [0]
                if not run.done(arm, k, "sample"):
                    paths = [run.sample_shard(arm, k, i) for i in range(n)]
                    shards += unfinished_shards(paths, lambda: round_questions(run, arm, k), cfg.sample.num_samples)
                return sorted(set(shards))
            key, name, argv = job(arm, k, "rollout", owner or arm, shard=True)
            merge_key, merge_name, merge_argv = job(arm, k, "merge", owner or arm)
            jobs.extend(sharded_sampling(key, name, argv, merge_key, merge_name, merge_argv,
                                         [after] if after else [], todo, lambda: run.done(arm, k, "sample"),
                                         cfg.sample.tensor_parallel_size))
            return merge_key
        return add(arm, k, "rollout", after,
                   lambda: run.done(arm, k, "eval") and (not sampling or run.done(arm, k, "sample")), owner)

    shared_last = None
    if run.multi:  # round 0's eval, samples and labels: made once (by an arm that samples) for all
        rep = next((a for a in cfg.arms if samples[a]), next(iter(cfg.arms)))
        shared_last = rollout(rep, 0, None, "shared")
        if samples[rep]:
            shared_last = add(rep, 0, "verify", shared_last, lambda: run.done(rep, 0, "verify"), "shared")
    for arm in cfg.arms:
        prev = shared_last
        for k in range(cfg.rounds + 1):
            if not (run.multi and k == 0):
                prev = rollout(arm, k, prev)
                if k == cfg.rounds:
                    break
                if samples[arm]:
                    prev = add(arm, k, "verify", prev, lambda arm=arm, k=k: run.done(arm, k, "verify"))
            prev = add(arm, k, "filter", prev, lambda arm=arm, k=k: run.done(arm, k, "filter"))
            prev = add(arm, k, "train", prev, lambda arm=arm, k=k: run.done(arm, k, "train"))
    return jobs


def generate_jobs(cfg: GenerateConfig, config_file: Path) -> list[Job]:
    """A generation: one job, or an array over shards and a merge; with a server to launch, its
    job and the job that stops it."""
    out = Path(cfg.output_dir)
    name = out.resolve().name
    base = [sys.executable, "-m", "exit_loop.cli"]
    config = ["--config", str(config_file)]
    n = cfg.sample.num_shards
    server = cfg.sample.backend == "server"
    gpus = 0 if server else cfg.sample.tensor_parallel_size  # a server's client needs no GPU

    def done() -> bool:
        return (out / "manifest.json").exists()

    if n == 1:
        jobs = [Job("generate", f"{name}-r0-generate", "rollout", [*base, "generate", *config], [], done, None, gpus)]
        sampled = done
    else:
        def todo() -> list[int]:
            if done():
                return []
            paths = [shard_file(cfg, i) for i in range(n)]
            return unfinished_shards(paths, lambda: load_problems(cfg.data), cfg.sample.num_samples)

        jobs = sharded_sampling("generate", f"{name}-r0-generate",
                                [*base, "generate", *config, f"sample.shard_id={SHARD}"],
                                "merge", f"{name}-r0-merge", [*base, "merge", *config], [], todo, done, gpus)

        def sampled() -> bool:
            return not todo()
    launch = cfg.sample.server.launch
    if server and launch and not cfg.sample.server.base_url:
        return server_jobs(launch, name, launch_address(out), ["generate"], sampled, jobs)
    return jobs


def server_jobs(launch: LaunchConfig, name: str, addr: Path, users: list[str], sampled: Callable[[], bool],
                jobs: list[Job]) -> list[Job]:
    """`jobs` with a launched server: its job first (no dependency: it runs beside the sampling
    jobs, which wait for its address file and /health), and a job that cancels it once the jobs
    `users` have ended, whatever became of them (afterany). Both are done once sampling is."""
    addr = addr.resolve()
    status = addr.with_name("status")
    bind = launch.host or "0.0.0.0"
    shown = "$(hostname)" if bind in ("0.0.0.0", "::") else shlex.quote(bind)
    multi = launch.nodes > 1
    fill = {"{host}": shlex.quote(bind), "{port}": '"$SERVER_PORT"', "{nodes}": str(launch.nodes),
            "{node_rank}": '"$SLURM_NODEID"' if multi else "0",
            "{main_addr}": '"$MAIN_ADDR"' if multi else "$(hostname)",
            "{headless}": '$([ "$SLURM_NODEID" = 0 ] || echo --headless)' if multi else ""}
    command = launch.command.strip()
    if "{host}" not in command and "{port}" not in command:
        command += " --host {host} --port {port}"
    for key, value in fill.items():
        command = command.replace(key, value)
    port = str(launch.port) if launch.port else "$((20000 + SLURM_JOB_ID % 20000))"
    pre = [f"export SERVER_PORT={port}",
           f"ADDR_FILE={shlex.quote(str(addr))}",
           f"STATUS_FILE={shlex.quote(str(status))}",
           'mkdir -p "$(dirname "$ADDR_FILE")"; rm -f "$ADDR_FILE" "$STATUS_FILE"',
           "# the sampling jobs read host:port here and wait for /health; gone once the server's job ends",
           'trap \'rm -f "$ADDR_FILE"; echo "server job $SLURM_JOB_ID ended" > "$STATUS_FILE"\' EXIT',
           f'printf "%s:%s\\n" {shown} "$SERVER_PORT" > "$ADDR_FILE.tmp" && mv "$ADDR_FILE.tmp" "$ADDR_FILE"']
    serve = Job("server", f"{name}-server", "server", [], [], sampled, gpus=launch.gpus_per_node, shell=command,
                nodes=launch.nodes, pre=pre, clear=[addr, status])
    stop = Job("server-stop", f"{name}-server-stop", "merge", [], users, sampled,
               shell="scancel {jobs:server}", dependency="afterany")
    return [serve, *jobs, stop]


# --------------------------------------------------------------------------- scripts


def shell_word(arg: str) -> str:
    """Quote `arg` for bash, with SHARD and PORT left for the shell to expand."""
    parts = re.split("(" + "|".join(map(re.escape, _SHELL)) + ")", arg)
    return "".join(_SHELL.get(p) or (shlex.quote(p) if p else "") for p in parts) or "''"


def array_ranges(tasks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (sbatch --array)."""
    out, start = [], None
    for i, t in enumerate(tasks):
        if start is None:
            start = t
        if i + 1 == len(tasks) or tasks[i + 1] != t + 1:
            out.append(str(start) if start == t else f"{start}-{t}")
            start = None
    return ",".join(out)


def render(job: Job, cfg: SlurmConfig, slurm_dir: Path, tasks: list[int] | None = None) -> str:
    """The sbatch script of `job` (an array over `tasks` when given)."""
    r = cfg.resources(job.section, job.gpus)
    nodes = cfg.nodes if job.section == "train" else job.nodes
    log = slurm_dir.resolve() / "logs" / ("%x-%A_%a.out" if tasks is not None else "%x-%j.out")
    lines = ["#!/bin/bash",
             f"# {job.name}: written by `exit-loop slurm submit`, which submits it again when needed",
             f"#SBATCH --job-name={job.name}",
             f"#SBATCH --output={log}",
             "#SBATCH --open-mode=append",
             f"#SBATCH --chdir={os.getcwd()}",
             f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks=1" if nodes == 1 else "#SBATCH --ntasks-per-node=1",
             "#SBATCH --requeue",
             f"#SBATCH --signal=B:USR1@{cfg.signal_s}"]
    if tasks is not None:
        lines.append(f"#SBATCH --array={array_ranges(tasks)}")
    for flag, value in (("partition", r.partition), ("account", r.account), ("qos", r.qos),
                        ("gpus-per-node", r.gpus or None), ("cpus-per-task", r.cpus), ("mem", r.mem),
                        ("time", r.time)):
        if value is not None:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {x}" for x in r.extra]
    lines += ["set -uo pipefail"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in cfg.env.items()]
    lines += cfg.setup
    lines += job.pre
    command = job.shell if job.shell is not None else " ".join(shell_word(a) for a in job.argv)
    if nodes > 1:  # the launcher on every node; each expands its own $SLURM_NODEID
        lines.append('export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
        command = f"srun --nodes={nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {shlex.quote(command)}"
    lines += [
        'echo "exit-loop: $SLURM_JOB_NAME job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (task '
        '$SLURM_ARRAY_TASK_ID)} on $(hostname), restart ${SLURM_RESTART_COUNT:-0}"',
        "# USR1 (--signal: the time limit is near): requeue; the stage resumes from what is on disk",
        "trap 'echo \"exit-loop: USR1: requeueing job $SLURM_JOB_ID\"; scontrol requeue \"$SLURM_JOB_ID\"' USR1",
        f"{command} &",
        "child=$!",
        "while :; do  # a trapped signal ends `wait` early: wait again while the stage runs",
        '    wait "$child"; rc=$?',
        '    kill -0 "$child" 2>/dev/null || break',
        "done",
        'exit "$rc"',
        ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- SLURM


ACTIVE = {"PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
          "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]} not found: run this where SLURM's commands are (a login node)") from None


def job_states(ids: list[str]) -> dict[str, tuple[str, str]]:
    """State and reason of each job (array tasks as '<id>_<task>') from squeue, which lists
    finished jobs for a while (MinJobAge); for jobs it has forgotten, from sacct if accounting is on."""
    out: dict[str, tuple[str, str]] = {}
    ids = sorted(set(ids))
    if not ids:
        return out
    res = _run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    if res.returncode != 0 and "Invalid job id" not in res.stderr:
        raise SlurmError(f"squeue failed: {res.stderr.strip()}")
    for line in res.stdout.splitlines() if res.returncode == 0 else []:
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        out[jid.strip()] = (state.strip(), reason.strip())
    known = {j.split("_")[0] for j in out}
    missing = [i for i in ids if i not in known]
    if missing:
        res = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State"])
        for line in res.stdout.splitlines() if res.returncode == 0 else []:
            jid, state = (line.split("|") + [""])[:2]
            if state:
                out.setdefault(jid.strip(), (state.split()[0], ""))
    return out


def _sbatch(script: Path, deps: list[str], kind: str = "afterok") -> str:
    cmd = ["sbatch", "--parsable"]
    if deps:
        cmd.append(f"--dependency={kind}:" + ":".join(deps))
    res = _run([*cmd, str(script)])
    if res.returncode != 0:
        raise SlurmError(f"sbatch {script}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip().split(";")[0]


class Book:
    """RUN_DIR/slurm/jobs.json: every submission of every job, latest last."""

    def __init__(self, slurm_dir: Path):
        self.path = slurm_dir / "jobs.json"
        self.jobs: dict[str, list[dict[str, Any]]] = {}
        if self.path.exists():
            self.jobs = json.loads(self.path.read_text())["jobs"]

    def add(self, key: str, record: dict[str, Any]) -> None:
        self.jobs.setdefault(key, []).append(record)
        write_json(self.path, {"jobs": self.jobs})

    def ids(self) -> list[str]:
        return [r["id"] for recs in self.jobs.values() for r in recs]

    def latest(self, key: str) -> dict[Any, str]:
        """Task (None for a plain job) -> the job id that last ran it ('12', '12_3')."""
        out: dict[Any, str] = {}
        for r in self.jobs.get(key, []):
            if r.get("tasks") is None:
                out = {None: r["id"]}
            else:
                out.pop(None, None)
                out.update({t: f"{r['id']}_{t}" for t in r["tasks"]})
        return out


def submit_jobs(jobs: list[Job], cfg: SlurmConfig, slurm_dir: Path, dry_run: bool = False) -> None:
    """Submit every unfinished job after the jobs it waits for; keep the ones queued or running.
    A pending job whose upstream is submitted anew (or can never start) is cancelled and replaced."""
    book = Book(slurm_dir)
    try:
        states = job_states(book.ids())
    except SlurmError:
        if not dry_run:
            raise
        states = {}
    waits: dict[str, list[str]] = {}     # key -> what its dependents wait for ('12', '12_3')
    renewed: set[str] = set()            # keys submitted in this call
    graph = []
    for job in jobs:
        waits[job.key] = []
        if job.done():
            print(f"{job.name}: done")
            continue
        stale = any(a in renewed for a in job.after)
        active = []
        for task, jid in book.latest(job.key).items():
            state, reason = states.get(jid, ("", ""))
            if state not in ACTIVE:
                continue
            if state == "PENDING" and (stale or reason == "DependencyNeverSatisfied"):
                if not dry_run:
                    _run(["scancel", jid])
                print(f"{job.name}: cancelled pending job {jid} "
                      f"({'what it waited for is submitted anew' if stale else reason})")
                continue
            active.append((task, jid))
        waits[job.key] = [jid for _, jid in active]
        tasks: list[int] | None = None
        if job.shards is not None:
            busy = {t for t, _ in active}
            tasks = [t for t in job.shards() if t not in busy] or None
            todo = tasks is not None
        else:
            todo = not active
        if not todo:
            print(f"{job.name}: queued or running as job {' '.join(j for _, j in active)}")
            continue
        deps = [w for a in job.after for w in waits[a]]
        if job.shell is not None:  # {jobs:KEY}: the ids of that job (dry run: its name)
            job.shell = re.sub(r"\{jobs:([^}]+)\}", lambda m: " ".join(waits.get(m.group(1), [])), job.shell)
        script = render(job, cfg, slurm_dir, tasks)
        array = f" [array {array_ranges(tasks)}]" if tasks is not None else ""
        if dry_run:  # dependents name the job instead of its id
            jid = f"<{job.name}>"
            print(f"# ---- {job.name}\n{script}")
        else:
            path = slurm_dir / "scripts" / f"{job.name}.sh"
            (slurm_dir / "logs").mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, script)
            for stale_file in job.clear:
                stale_file.unlink(missing_ok=True)
            jid = _sbatch(path, deps, job.dependency)
            book.add(job.key, {"id": jid, "tasks": tasks, "name": job.name, "after": deps,
                               "script": str(path), "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"{job.name}: submitted job {jid}{array} after {', '.join(deps) or 'nothing'}")
        kind = "" if job.dependency == "afterok" else f" ({job.dependency})"
        graph.append(f"  {job.name}{array} after {', '.join(deps) or 'nothing'}{kind}")
        waits[job.key].append(jid)
        renewed.add(job.key)
    if dry_run:
        print("dependency graph (afterok; nothing submitted):\n" + ("\n".join(graph) or "  nothing to do"))


def status_lines(jobs: list[Job], slurm_dir: Path) -> list[str]:
    """One line per stage: done, running, pending, failed, cancelled, not submitted, with job ids."""
    book = Book(slurm_dir)
    try:
        states = job_states(book.ids())
    except SlurmError as e:
        log.warning("slurm status: %s; showing what the manifests say", e)
        states = {}
    width = max((len(j.name) for j in jobs), default=0)
    lines = []
    for job in jobs:
        found = {jid: states.get(jid, ("UNKNOWN", "")) for jid in book.latest(job.key).values()}
        kinds = {st for st, _ in found.values()}

        def pick(group: set[str]) -> list[str]:
            return [j for j, (st, _) in found.items() if st in group]

        if job.done():
            word, chosen = "done", list(found)
        elif not found:
            word, chosen = "not submitted", []
        elif kinds & FAILED:
            word, chosen = "failed", pick(FAILED)
        elif "CANCELLED" in kinds:
            word, chosen = "cancelled", pick({"CANCELLED"})
        elif kinds & RUNNING:
            word, chosen = "running", pick(ACTIVE)
        elif kinds & ACTIVE:
            word, chosen = "pending", pick(ACTIVE)
        elif "COMPLETED" in kinds:
            word, chosen = "incomplete", list(found)
        else:
            word, chosen = "unknown", list(found)
        detail = f"job {' '.join(chosen)}" if chosen else ""
        why = sorted({f"{found[j][0]}: {found[j][1]}" if word in ("failed", "cancelled") else found[j][1]
                      for j in chosen if word != "done"} - {"", "None", "CANCELLED: None"})
        if why:
            detail += f" ({', '.join(why)})"
        if word == "failed":
            detail += "; log " + " ".join(str(slurm_dir / "logs" / f"{job.name}-{j}.out") for j in chosen)
        elif word == "incomplete":
            detail += " completed, yet the stage is not finished: submit again"
        elif word == "unknown":
            detail += " (no longer known to squeue, and sacct is unavailable)"
        if job.shards is not None and word not in ("done", "not submitted"):
            detail += f"; shards left: {array_ranges(job.shards()) or 'none'}"
        lines.append(f"{job.name:<{width}}  {word:<13} {detail}".rstrip())
    return lines


# --------------------------------------------------------------------------- configs


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


def plan(config: str, overrides: list[str], allow_change: bool = False,
         write: bool = True, check: bool = True, allow_overlap: bool = False) -> tuple[list[Job], SlurmConfig, Path]:
    """Load a run or generation config (a YAML file or a directory already submitted), write its
    resolved config where the jobs read it, and return the jobs, the slurm section and the slurm dir.
    `check`: refuse engines that would not fit a job's GPUs (`check_engines_fit`)."""
    src = Path(config)
    if src.is_dir():
        gen_file = src / "slurm" / "config.yaml"
        src = gen_file if gen_file.exists() else src / "config.yaml"
    data, _ = read_yaml(src)
    if is_generation(data, overrides):
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
    ecfg = load_config(ExperimentConfig, src, overrides)
    resolve_styles(ecfg)
    if write:  # before anything is queued (a dry run only prints)
        check_hub(hub_settings(ecfg))
    for student in seed_students(ecfg):
        check_model_path(student)
    if ecfg.teacher:
        check_model_path(ecfg.teacher.model)
    if check:
        check_engines_fit(ecfg.sample, ecfg.slurm)
    run = Run(ecfg)
    if not allow_overlap:  # held-out questions that also train: refused before any job is queued
        check_overlap(training_problems(ecfg), load_problems(ecfg.eval.data))
    check_config_change(run, allow_change)
    if write:
        atomic_write_text(run.top / "config.yaml", dump_yaml(ecfg))
    jobs = [j for r in Run.every_seed(ecfg) for j in exit_jobs(r)]
    srv = ecfg.teacher.server if ecfg.teacher else None
    if srv and srv.launch and not srv.base_url:  # the teacher's server, for every seed's round 0
        users = [j for j in jobs if j.key.endswith("r0/rollout")]
        jobs = server_jobs(srv.launch, ecfg.experiment, launch_address(run.top), [j.key for j in users],
                           lambda: all(j.done() for j in users), jobs)
    return jobs, ecfg.slurm, run.top / "slurm"


def status_jobs(run_dir: str) -> tuple[list[Job], Path]:
    d = Path(run_dir)
    if not (d / "slurm" / "config.yaml").exists() and not (d / "config.yaml").exists():
        raise DataError(f"{d}: neither slurm/config.yaml (a generation) nor config.yaml (a run) is there")
    jobs, _, slurm_dir = plan(str(d), [], allow_change=True, write=False, check=False, allow_overlap=True)
    return jobs, slurm_dir


# --------------------------------------------------------------------------- GPU count

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
