"""A job's sbatch script (`render`): the #SBATCH header from the `slurm:` section, the job's
command with its placeholders left for bash (`shell_word`), and the USR1 trap that requeues it;
`array_ranges` writes an array's tasks as sbatch's --array takes them.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.pipeline.slurm.jobs import MAIN_ADDR, NODE_RANK, PORT, SHARD, Job

# what bash puts in place of each placeholder of a job's argv
_SHELL = {SHARD: '"$SLURM_ARRAY_TASK_ID"', PORT: '"$((20000 + SLURM_JOB_ID % 20000))"',
          NODE_RANK: '"$SLURM_NODEID"', MAIN_ADDR: '"$MAIN_ADDR"'}


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
