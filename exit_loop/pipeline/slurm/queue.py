"""The jobs in SLURM's queue: submitting them (`submit_jobs`, through sbatch, each after the jobs
it waits for), what became of them (`job_states`: squeue, else sacct), the record of every
submission (`Book`: `<run dir>/slurm/jobs.json`), and one status line per stage (`status_lines`).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from exit_loop.errors import SlurmError
from exit_loop.jsonl import atomic_write_text, write_json
from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.pipeline.slurm.jobs import Job
from exit_loop.pipeline.slurm.script import array_ranges, render

log = logging.getLogger(__name__)

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


def kept_jobs(job: Job, book: Book, states: dict[str, tuple[str, str]], stale: bool,
              dry_run: bool) -> list[tuple[Any, str]]:
    """(task, job id) of the job's last submissions still queued or running; a pending one whose
    upstream is submitted anew (`stale`) or that can never start is cancelled instead."""
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
    return active


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
        active = kept_jobs(job, book, states, any(a in renewed for a in job.after), dry_run)
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


def in_states(found: dict[str, tuple[str, str]], group: set[str]) -> list[str]:
    """The job ids of `found` (id -> state, reason) in one of the states of `group`."""
    return [j for j, (st, _) in found.items() if st in group]


def stage_word(job: Job, found: dict[str, tuple[str, str]]) -> tuple[str, list[str]]:
    """What became of a stage (done, failed, running, ...) and the job ids that say so."""
    kinds = {st for st, _ in found.values()}
    if job.done():
        return "done", list(found)
    if not found:
        return "not submitted", []
    if kinds & FAILED:
        return "failed", in_states(found, FAILED)
    if "CANCELLED" in kinds:
        return "cancelled", in_states(found, {"CANCELLED"})
    if kinds & RUNNING:
        return "running", in_states(found, ACTIVE)
    if kinds & ACTIVE:
        return "pending", in_states(found, ACTIVE)
    if "COMPLETED" in kinds:
        return "incomplete", list(found)
    return "unknown", list(found)


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
        word, chosen = stage_word(job, found)
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
