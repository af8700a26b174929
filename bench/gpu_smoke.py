"""The whole loop on one GPU (issue 21): `exit-loop quickstart --gpu`, then where its time went.

    make gpu-smoke                                   # = python bench/gpu_smoke.py --json gpu_smoke.json
    python bench/gpu_smoke.py --runs_dir /tmp/runs -- rounds=2   # after --: quickstart overrides

Runs the GPU quickstart (configs/quickstart_gpu.yaml: per seed a 21M-parameter student trained
from scratch on the arithmetic task's gold solutions, then the filtered, unfiltered and gold arms,
three rounds, three seeds, report and plots) in a child process,
its output shown as it comes and kept, then reads back what the run wrote and prints:

- the time of each step: task, student (tokenizer and random model), warm start, and per arm and
  seed, arm and round the stages' own wall times from their manifests (eval, sample, verify,
  filter, train; a shared round 0 counted once), the run's total;
- the sampler's start per rollout (eval + sample of one round share one backend): the HF
  backend's model load and decoder builds (torch.compile and CUDA-graph capture), which it logs
  when it closes, against its time generating: the share of a round's sampler time that starting
  the backend anew costs;
- what starting the sampler costs, measured again after the run on its own checkpoints (seed
  0's student, then its filtered arm's first round), each a whole rollout (the 200 test questions
  greedy, then the round's 2 samples of every training question) with a fresh backend: the
  first in this process (cold: the process's first compile), then another (warm: what starting
  anew costs every later round);
- the report's held-out accuracies (95% Wilson intervals, n), the paired differences per seed
  (paired bootstrap interval, exact McNemar p) and over the seeds (every seed's difference, the
  t-interval over seeds).

`--json PATH` writes all of it. The run directory and data are under `--runs_dir` and
`--data_dir` (a fresh run each time unless `--keep`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HF_LINE = re.compile(r"hf backend: model load ([\d.]+)s, (\d+) decoder\(s\) built in ([\d.]+)s .*generating ([\d.]+)s")
STEP_LINE = re.compile(r"quickstart: (seed \d+: )?(tokenizer and random model|warm-started the student).*\(([\d.]+)s\)")


def run_quickstart(a: argparse.Namespace, log_path: Path) -> tuple[int, float]:
    gpu = ["--config", "configs/quickstart_gpu.yaml"] if a.no_gpu else ["--gpu"]
    cmd = [sys.executable, "-m", "exit_loop", "quickstart", *gpu, f"runs_dir={a.runs_dir}",
           f"data.dataset={a.data_dir}/train.jsonl", f"eval.data.dataset={a.data_dir}/test.jsonl",
           f"student={a.data_dir}/seed_{{seed}}/student/ckpt",
           f"arms={{filtered: {{split: correct}}, unfiltered: {{split: all}}, "
           f"gold: {{split: original, data: {{dataset: {a.data_dir}/gold.jsonl, split: gold}}}}}}", *a.overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        try:
            deadline = t0 + a.timeout
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                if time.monotonic() > deadline:
                    proc.kill()
                    print(f"gpu smoke: stopped after {a.timeout:.0f}s", flush=True)
                    break
        finally:
            rc = proc.wait()
    return rc, time.monotonic() - t0


def stage_times(run_root: Path) -> list[dict[str, Any]]:
    """Every finished stage's wall time from its manifest: arm (or shared, `seed_N/` before it
    where the run has several seeds), round, stage."""
    rows = []
    for manifest in sorted([*run_root.glob("*/round_*/*/manifest.json"), *run_root.glob("seed_*/*/round_*/*/manifest.json")]):
        stage_dir = manifest.parent
        if stage_dir.parent.parent.is_symlink() or stage_dir.is_symlink() or stage_dir.parent.is_symlink():
            continue  # an arm's link to the shared round 0: counted once, under shared
        data = json.loads(manifest.read_text())
        wall = (data.get("timings") or {}).get("wall_s") or data.get("wall_time_s")
        arm_dir = stage_dir.parent.parent
        arm = f"{arm_dir.parent.name}/{arm_dir.name}" if arm_dir.parent != run_root else arm_dir.name
        rows.append({"arm": arm, "round": int(stage_dir.parent.name.split("_")[1]),
                     "stage": stage_dir.name, "wall_s": wall})
    return rows


def report_figures(report: Path) -> dict[str, Any]:
    """What a report.json says, per arm (accuracy by round, intervals, n) and over seeds."""
    rep = json.loads(report.read_text())
    return {"arms": {name: {"rounds": arm.get("rounds"), "accuracy": arm.get("accuracy"),
                            "ci95": arm.get("accuracy_ci95"), "n": arm.get("n_questions")}
                     for name, arm in rep["arms"].items()},
            "paired": rep.get("paired"), "gains": rep.get("gains"), "environments": rep.get("environments")}


def start_cost(run_root: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Rollouts (eval + sample) on the run's checkpoints, each with a fresh backend: cold, warm."""
    import tempfile
    from dataclasses import replace

    sys.path.insert(0, str(ROOT))
    from exit_loop.config import load_config
    from exit_loop.pipeline.run import ExperimentConfig
    from exit_loop.sample import HFBackend, sample
    from exit_loop.tasks import load_problems

    exp = load_config(ExperimentConfig, run_root / "config.yaml")
    train, test = load_problems(exp.data), load_problems(exp.eval.data)
    arms = run_root / "seed_0" if (run_root / "seed_0").is_dir() else run_root
    ckpts = [data_dir / "seed_0" / "student" / "ckpt"] + [arms / "filtered" / f"round_{k:02d}" / "train" / "ckpt"
                                                          for k in range(exp.rounds)]
    ckpts = [c for c in ckpts if c.exists()][:2]
    out, work = [], Path(tempfile.mkdtemp(prefix="start_cost_"))
    for i, (ckpt, how) in enumerate(zip(ckpts, ("fresh, cold process", "fresh, warm process"))):
        cfg = replace(exp.sample, model_name=str(ckpt), backend="hf")
        t0 = time.monotonic()
        backend = HFBackend(cfg)
        sample(replace(cfg, temperature=0.0, num_samples=1), test, work / f"eval{i}.jsonl", backend)
        sample(cfg, train, work / f"sample{i}.jsonl", backend)
        t = dict(backend.timings)
        backend.close()
        t["rollout_s"] = round(time.monotonic() - t0, 2)
        t["start_s"] = round(t["load_s"] + t["decoder_build_s"], 2)
        t["start_share"] = round(t["start_s"] / t["rollout_s"], 3)
        out.append({"how": how, "checkpoint": str(ckpt), **t})
        print(f"start cost: {how}: load {t['load_s']:.1f}s + {t['decoders_built']} decoder(s) "
              f"{t['decoder_build_s']:.1f}s = {t['start_s']:.1f}s of a {t['rollout_s']:.1f}s rollout "
              f"({t['start_share']:.0%})", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs_dir", default="runs/gpu_smoke", help="runs_dir of the quickstart's experiment")
    p.add_argument("--data_dir", default="data/gpu_smoke", help="where the task and the student go")
    p.add_argument("--timeout", type=float, default=900, help="seconds before the run is stopped")
    p.add_argument("--keep", action="store_true", help="resume what is there instead of starting afresh")
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    p.add_argument("--no_start_cost", action="store_true", help="skip the start-cost rollouts after the run")
    p.add_argument("--no_gpu", action="store_true",
                   help="the GPU config without --gpu's check and preset (a reduced run on CPU checks this script)")
    p.add_argument("overrides", nargs="*", help="quickstart key=value overrides (after --)")
    a = p.parse_args(argv)
    run_root = ROOT / a.runs_dir / "quickstart_gpu"
    if not a.keep:
        for d in (run_root, ROOT / a.data_dir):
            shutil.rmtree(d, ignore_errors=True)
    log_path = ROOT / a.runs_dir / "gpu_smoke.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rc, total = run_quickstart(a, log_path)
    text = log_path.read_text()

    import torch

    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/gpu_smoke.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "returncode": rc, "total_s": round(total, 1),
        "steps": {f"{m.group(1) or ''}{m.group(2)}": float(m.group(3)) for m in STEP_LINE.finditer(text)},
        "stages": stage_times(run_root),
        "rollouts": [],
    }
    for m in HF_LINE.finditer(text):
        load, n, build, gen = float(m.group(1)), int(m.group(2)), float(m.group(3)), float(m.group(4))
        start = load + build
        out["rollouts"].append({"load_s": load, "decoders_built": n, "decoder_build_s": build,
                                "generate_s": gen, "sampling_s": round(gen - build, 2),
                                "start_share": round(start / (load + gen), 3) if load + gen else None})
    report = run_root / "report.json"
    if report.exists():
        out["report"] = report_figures(report)
    for name in ("report.md", "report.json", "accuracy.png"):
        if (run_root / name).exists():
            out.setdefault("files", []).append(str(run_root / name))

    print(f"\ngpu smoke: {out['device']}, return code {rc}, {total:.0f}s in all")
    for k, v in out["steps"].items():
        print(f"  {k}: {v:.1f}s")
    by: dict[str, float] = {}
    for r in out["stages"]:
        by[r["stage"]] = by.get(r["stage"], 0.0) + (r["wall_s"] or 0.0)
        print(f"  {r['arm']:<12} round {r['round']} {r['stage']:<7} {r['wall_s']}s")
    print("  stage totals: " + ", ".join(f"{k} {v:.1f}s" for k, v in by.items()))
    for i, r in enumerate(out["rollouts"]):
        print(f"  rollout {i}: load {r['load_s']:.1f}s, {r['decoders_built']} decoder(s) {r['decoder_build_s']:.1f}s, "
              f"sampling {r['sampling_s']:.1f}s: start = {r['start_share']:.0%} of the backend's time")
    if "report" in out:
        for name, arm in out["report"]["arms"].items():
            print(f"  {name:<22} " + " -> ".join(f"{100 * x:.1f}" for x in arm["accuracy"] if x is not None))
        for r in [*(out["report"]["paired"] or []), *(out["report"]["gains"] or [])]:
            if r.get("seeds"):
                what = f"{r['a']} - {r['b']}" if "a" in r else f"{r['arm']} - its round {r['from_round']}"
                t = r.get("t_ci95") or [float("nan")] * 2
                print(f"  over {r['seeds']} seeds, round {r['round']}: {what}: {100 * r['diff']:+.1f} points, "
                      f"per seed {', '.join(f'{100 * v:+.1f}' for v in r['per_seed'])}, "
                      f"95% t [{100 * t[0]:+.1f}, {100 * t[1]:+.1f}], {r['positive']}/{r['seeds']} positive")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    if not a.no_start_cost and (run_root / "config.yaml").exists():
        try:
            out["start_cost"] = start_cost(run_root, ROOT / a.data_dir)
        except Exception as e:  # noqa: BLE001 - the run's figures above stand without it
            out["start_cost"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            print(f"start cost: failed: {out['start_cost']['error']}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["returncode"] == 0 else 1)
