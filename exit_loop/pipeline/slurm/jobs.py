"""The SLURM jobs of a run or a generation (`Job`): what each runs, after which, and how to tell
it is done. `exit_jobs` (every stage of every arm and round of one seed's ExIt run),
`generate_jobs` (a generation), `server_jobs` (a launched server beside the jobs that use it).
Placeholders in a job's argv (`SHARD`, `PORT`, `NODE_RANK`, `MAIN_ADDR`) are left for the job's
shell to fill (exit_loop.pipeline.slurm.script).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from exit_loop.rundir import MANIFEST, SHARED
from exit_loop.pipeline.generate import GenerateConfig, shard_file
from exit_loop.pipeline.rollout import drawn_pairs
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.pipeline.stages import round_questions
from exit_loop.sample import LaunchConfig, launch_address, select_shard
from exit_loop.tasks import Problem, load_problems

SHARD = "{shard}"   # in a job's argv: the array task id
PORT = "{port}"     # in a job's argv: a port derived from the job id (distributed training)
NODE_RANK = "{node_rank}"  # in a job's argv: this node's rank in a multi-node job (srun sets it per node)
MAIN_ADDR = "{main_addr}"  # in a job's argv: the first node of the job (the script exports it)


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


# --------------------------------------------------------------------------- an ExIt run


def samples(run: Run, arm: str) -> bool:
    """Whether the arm samples traces (an `original` arm trains on the data set's own solutions)."""
    return run.cfg.arms[arm].samples


def job_id(run: Run, arm: str, k: int, stage: str, owner: str) -> tuple[str, str]:
    """(key in jobs.json, job name) of a stage; `owner`: the arm, or SHARED for round 0's
    jobs every arm shares."""
    cfg = run.cfg
    seed_tag = f"s{cfg.seed}" if run.several_seeds else ""
    prefix = cfg.experiment + (f"-{seed_tag}" if seed_tag else "")
    prefix = prefix if owner == SHARED or not run.multi else f"{prefix}-{arm}"
    return f"{seed_tag}/{owner}/r{k}/{stage}".lstrip("/"), f"{prefix}-r{k}-{stage}"


def train_launcher(cfg: ExperimentConfig) -> str:
    """What starts a train job's stage: train.launcher; unset, `accelerate launch` on every node
    (slurm.nodes > 1, through srun) or over the job's GPUs (more than one); else nothing."""
    if cfg.train.launcher:
        return cfg.train.launcher
    gpus = cfg.slurm.resources("train", 1).gpus or 0
    nodes = cfg.slurm.nodes
    if nodes > 1:  # one accelerate launch per node (srun)
        return (f"{shlex.quote(sys.executable)} -m accelerate.commands.launch --multi_gpu "
                f"--num_machines {nodes} --machine_rank {NODE_RANK} --main_process_ip {MAIN_ADDR} "
                f"--main_process_port {PORT} --num_processes {nodes * max(gpus, 1)}")
    if gpus > 1:
        return (f"{shlex.quote(sys.executable)} -m accelerate.commands.launch --multi_gpu "
                f"--num_processes {gpus} --main_process_port {PORT}")
    return ""


def stage_argv(run: Run, arm: str, k: int, stage: str, shard: bool = False) -> list[str]:
    """The command of a stage's job (`exit-loop stage ...`); `shard`: each array task draws its shard."""
    launcher = train_launcher(run.cfg) if stage == "train" else ""
    return run.stage_cmd(stage, arm, k, launcher) + (["--shard", SHARD] if shard else [])


def stage_job(run: Run, arm: str, k: int, stage: str, after: list[Job], owner: str,
              done: Callable[[], bool] | None = None) -> Job:
    """One stage's job after the last of `after` (none: after nothing); done once its manifest
    exists unless `done` says otherwise."""
    key, name = job_id(run, arm, k, stage, owner)
    gpus = {"rollout": run.cfg.sample.tensor_parallel_size, "train": 1}.get(stage, 0)
    return Job(key, name, stage, stage_argv(run, arm, k, stage), [after[-1].key] if after else [],
               done or partial(run.done, arm, k, stage), None, gpus)


def rollout_shards(run: Run, arm: str, k: int) -> list[int]:
    """The array tasks a sharded rollout still has to run: 0 until the eval is done (task 0 also
    evaluates), and each shard still missing samples."""
    shards = [] if run.done(arm, k, "eval") else [0]
    if not run.done(arm, k, "sample"):
        paths = [run.sample_shard(arm, k, i) for i in range(run.cfg.sample.num_shards)]
        shards += unfinished_shards(paths, partial(round_questions, run, arm, k), run.cfg.sample.num_samples)
    return sorted(set(shards))


def rollout_done(run: Run, arm: str, k: int, sampling: bool) -> bool:
    return run.done(arm, k, "eval") and (not sampling or run.done(arm, k, "sample"))


def rollout_jobs(run: Run, arm: str, k: int, after: list[Job], owner: str) -> list[Job]:
    """Round k's eval and sample: one job, or (sample.num_shards > 1, a round that samples) an
    array over the shards and the merge after it."""
    cfg = run.cfg
    sampling = samples(run, arm) and k < cfg.rounds
    if not (sampling and cfg.sample.num_shards > 1):
        return [stage_job(run, arm, k, "rollout", after, owner, partial(rollout_done, run, arm, k, sampling))]
    key, name = job_id(run, arm, k, "rollout", owner)
    merge_key, merge_name = job_id(run, arm, k, "merge", owner)
    jobs = sharded_sampling(key, name, stage_argv(run, arm, k, "rollout", shard=True), merge_key, merge_name,
                            stage_argv(run, arm, k, "merge"), [after[-1].key] if after else [],
                            partial(rollout_shards, run, arm, k), partial(run.done, arm, k, "sample"),
                            cfg.sample.tensor_parallel_size)
    if run.rationalizes(arm, k, "sample"):  # the merge then draws the hinted samples: a rollout's resources
        jobs[-1].section, jobs[-1].gpus = "rollout", cfg.sample.tensor_parallel_size
    return jobs


def shared_jobs(run: Run) -> list[Job]:
    """Round 0's eval, samples and labels of a run with several arms: made once, by an arm that
    samples (else the first), for all."""
    cfg = run.cfg
    rep = next((a for a in cfg.arms if samples(run, a)), next(iter(cfg.arms)))
    jobs = rollout_jobs(run, rep, 0, [], SHARED)
    if samples(run, rep):
        jobs.append(stage_job(run, rep, 0, "verify", jobs, SHARED))
    return jobs


def arm_jobs(run: Run, arm: str, shared: list[Job]) -> list[Job]:
    """One arm's stages, round after round, each after the one before; round 0 after `shared`
    (its shared eval, samples and labels) where the run has several arms."""
    cfg = run.cfg
    jobs: list[Job] = []
    for k in range(cfg.rounds + 1):
        if not (run.multi and k == 0):
            jobs += rollout_jobs(run, arm, k, jobs or shared, arm)
            if k == cfg.rounds:
                break
            if samples(run, arm):
                jobs.append(stage_job(run, arm, k, "verify", jobs, arm))
        for stage in ("filter", "train"):
            jobs.append(stage_job(run, arm, k, stage, jobs or shared, arm))
    return jobs


def exit_jobs(run: Run) -> list[Job]:
    """Every stage of every arm and round of an ExIt run, in submission order."""
    shared = shared_jobs(run) if run.multi else []
    return [*shared, *(j for arm in run.cfg.arms for j in arm_jobs(run, arm, shared))]


# --------------------------------------------------------------------------- a generation


def generation_done(cfg: GenerateConfig) -> bool:
    return (Path(cfg.output_dir) / MANIFEST).exists()


def generation_shards(cfg: GenerateConfig) -> list[int]:
    """The shards a sharded generation still has to draw."""
    if generation_done(cfg):
        return []
    paths = [shard_file(cfg, i) for i in range(cfg.sample.num_shards)]
    return unfinished_shards(paths, partial(load_problems, cfg.data), cfg.sample.num_samples)


def generation_sampled(cfg: GenerateConfig) -> bool:
    return not generation_shards(cfg)


def generate_jobs(cfg: GenerateConfig, config_file: Path) -> list[Job]:
    """A generation: one job, or an array over shards and a merge; with a server to launch, its
    job and the job that stops it."""
    out = Path(cfg.output_dir)
    name = out.resolve().name
    base = [sys.executable, "-m", "exit_loop.cli"]
    config = ["--config", str(config_file)]
    server = cfg.sample.backend == "server"
    gpus = 0 if server else cfg.sample.tensor_parallel_size  # a server's client needs no GPU
    done = partial(generation_done, cfg)
    if cfg.sample.num_shards == 1:
        jobs = [Job("generate", f"{name}-r0-generate", "rollout", [*base, "generate", *config], [], done, None, gpus)]
        sampled = done
    else:
        jobs = sharded_sampling("generate", f"{name}-r0-generate",
                                [*base, "generate", *config, f"sample.shard_id={SHARD}"],
                                "merge", f"{name}-r0-merge", [*base, "merge", *config], [],
                                partial(generation_shards, cfg), done, gpus)
        sampled = partial(generation_sampled, cfg)
    launch = cfg.sample.server.launch
    if server and launch and not cfg.sample.server.base_url:
        return server_jobs(launch, name, launch_address(out), ["generate"], sampled, jobs)
    return jobs


# --------------------------------------------------------------------------- a launched server


def serve_command(launch: LaunchConfig) -> str:
    """The server's command line with its placeholders filled for the job's shell (per node
    where it spans several); `--host {host} --port {port}` added where it names neither."""
    bind = launch.host or "0.0.0.0"
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
    return command


def server_jobs(launch: LaunchConfig, name: str, addr: Path, users: list[str], sampled: Callable[[], bool],
                jobs: list[Job]) -> list[Job]:
    """`jobs` with a launched server: its job first (no dependency: it runs beside the sampling
    jobs, which wait for its address file and /health), and a job that cancels it once the jobs
    `users` have ended, whatever became of them (afterany). Both are done once sampling is."""
    addr = addr.resolve()
    status = addr.with_name("status")
    bind = launch.host or "0.0.0.0"
    shown = "$(hostname)" if bind in ("0.0.0.0", "::") else shlex.quote(bind)
    port = str(launch.port) if launch.port else "$((20000 + SLURM_JOB_ID % 20000))"
    pre = [f"export SERVER_PORT={port}",
           f"ADDR_FILE={shlex.quote(str(addr))}",
           f"STATUS_FILE={shlex.quote(str(status))}",
           'mkdir -p "$(dirname "$ADDR_FILE")"; rm -f "$ADDR_FILE" "$STATUS_FILE"',
           "# the sampling jobs read host:port here and wait for /health; gone once the server's job ends",
           'trap \'rm -f "$ADDR_FILE"; echo "server job $SLURM_JOB_ID ended" > "$STATUS_FILE"\' EXIT',
           f'printf "%s:%s\\n" {shown} "$SERVER_PORT" > "$ADDR_FILE.tmp" && mv "$ADDR_FILE.tmp" "$ADDR_FILE"']
    serve = Job("server", f"{name}-server", "server", [], [], sampled, gpus=launch.gpus_per_node,
                shell=serve_command(launch), nodes=launch.nodes, pre=pre, clear=[addr, status])
    stop = Job("server-stop", f"{name}-server-stop", "merge", [], users, sampled,
               shell="scancel {jobs:server}", dependency="afterany")
    return [serve, *jobs, stop]
