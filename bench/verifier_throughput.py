"""Verifier throughput: the GSM8K path on one core, the math-verify path with 2 worker processes,
and a 1,000,000-row file verified as a stream in bounded memory.

    python bench/verifier_throughput.py
    python bench/verifier_throughput.py --gsm8k ../shared/data/gsm8k/train.jsonl --gsm8k_rows 200000 \\
        --math_problems 2500 --math_workers 2 --big_rows 1000000 --math_big_rows 50000

Prints figures only (no pass/fail). Goals (issue 7): GSM8K path >= 100,000 rows/s on one core;
math path >= 500 rows/s with 2 workers; the 1M-row file in bounded memory.

- files (run first, while this process is small): `run()` (what `exit-loop verify` calls) in a
  fresh process on a tenth of `--big_rows` and on all of them (GSM8K), and likewise for the math
  path on `--math_big_rows`; the rows are written one by one, never held in memory. Peak RSS of
  that process: resource.getrusage's ru_maxrss (on Linux it also counts this process's size at the
  fork) and /proc's VmHWM (the child's own peak). Bounded memory: the same at 10x the rows.
- GSM8K: rows built from GSM8K train (per problem: the exact answer, `$1,234`, `\\boxed{}`, a unit
  word, a wrong number, no answer tags, a broken format), verified in memory by `verify_rows`
  with this process pinned to one CPU; the number-parsing cache is cleared before each repeat.
- math: synthetic MATH-style data, since no MATH copy is on disk. "realistic": gold answers drawn
  in roughly MATH's proportions (about half integers, then fractions, radicals, expressions,
  intervals, tuples and sets, choices, pi), 8 samples a problem that cluster as a sampler's do
  (about 45% the gold text, 15% an equal form in other notation, 40% one of two wrong answers).
  "worst case": every row a distinct pair in other notation, no integers, nothing repeated, so
  every row is a fresh math-verify parse of both sides. The pool's start-up is timed apart. The
  CPU time of parent and workers also gives the rate on idle cores (this machine is shared).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- GSM8K rows

def iter_gsm8k_rows(path: Path) -> Iterator[dict]:
    """Rows for ever, cycling over the problems."""
    from exit_loop.tasks import DataConfig, load_problems

    problems = load_problems(DataConfig(dataset=str(path)))
    reasoning = "Natalia sold 48/2 = 24 clips in May, so 48 + 24 = 72 clips in all."
    while True:
        for p in problems:
            gt = p.ground_truth
            try:
                wrong, money = str(int(gt) + 1), f"${int(gt):,}"
            except ValueError:
                wrong, money = "0", gt
            for a in (gt, money, f"\\boxed{{{gt}}}", f"{gt} apples", wrong):
                yield {"prompt": "P", "response": f"{reasoning} </think> <answer>{a}</answer>",
                       "ground_truth": gt, "problem_id": p.id}
            yield {"prompt": "P", "response": reasoning + " so the answer is " + gt,
                   "ground_truth": gt, "problem_id": p.id}
            yield {"prompt": "P", "response": f"<think>{reasoning}</think><answer>{gt}</answer>",
                   "ground_truth": gt, "problem_id": p.id}


def bench_gsm8k(rows: list[dict], repeats: int) -> dict:
    from exit_loop import verify
    from exit_loop.tasks.gsm8k import clear_number_cache

    pinned = hasattr(os, "sched_setaffinity")
    if pinned:
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
    times, cpu_times = [], []
    try:
        for _ in range(repeats):
            clear_number_cache()
            t0, c0 = time.perf_counter(), time.process_time()
            n = sum(1 for _ in verify.verify_rows(rows))
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    finally:
        if pinned:
            os.sched_setaffinity(0, cpus)
    return {"rows": n, "best_rows_per_s": n / min(times), "median_rows_per_s": n / sorted(times)[len(times) // 2],
            "rows_per_cpu_s": n / min(cpu_times)}


# --------------------------------------------------------------------------- MATH-style rows

def _math_problem(rng: random.Random, integers: bool = True) -> tuple[str, list[str], list[str]]:
    """(gold, equal answers in other notation, wrong answers)."""
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    while b == a:
        b = rng.randint(2, 99)
    kinds = ["int", "frac", "sqrt", "expr", "interval", "tuple", "set", "choice", "pi", "neg_frac"]
    weights = [50, 14, 7, 6, 4, 3, 3, 5, 4, 4] if integers else [0, 14, 7, 6, 4, 3, 3, 5, 4, 4]
    kind = rng.choices(kinds, weights)[0]
    if kind == "int":
        return str(a), [f"{a}.0", f"\\boxed{{{a}}}"], [str(a + 1), str(a * 2)]
    if kind == "frac":
        return rf"\frac{{{a}}}{{{b}}}", [f"{a}/{b}", rf"\dfrac{{{a}}}{{{b}}}", rf"\frac{{{2 * a}}}{{{2 * b}}}"], \
            [rf"\frac{{{b}}}{{{a}}}", rf"\frac{{{a + 1}}}{{{b}}}"]
    if kind == "neg_frac":
        return rf"-\frac{{{a}}}{{{b}}}", [f"-{a}/{b}", rf"\frac{{-{a}}}{{{b}}}"], [f"{a}/{b}", rf"-\frac{{{b}}}{{{a}}}"]
    if kind == "sqrt":
        return rf"{b}\sqrt{{{a}}}", [rf"\sqrt{{{b * b * a}}}", rf"{b} \sqrt{{{a}}}"], [rf"{b + 1}\sqrt{{{a}}}", rf"\sqrt{{{a}}}"]
    if kind == "expr":
        return rf"{a}x+{b}", [rf"{b}+{a}x", rf"{a} x + {b}"], [rf"{a}x-{b}", rf"{b}x+{a}"]
    if kind == "interval":
        return rf"(-\infty, {a}]", [rf"(-\infty,{a}]", rf"\left(-\infty, {a}\right]"], [rf"(-\infty, {a})", rf"[{a}, \infty)"]
    if kind == "tuple":
        return f"({a}, {b})", [f"({a},{b})", rf"\left({a}, {b}\right)"], [f"({b}, {a})", f"({a}, {b + 1})"]
    if kind == "set":
        return f"{a}, {b}", [f"{b}, {a}", rf"\{{{a}, {b}\}}"], [f"{a}", f"{a}, {b + 1}"]
    if kind == "choice":
        c = rng.choice("ABCDE")
        return rf"\text{{({c})}}", [c, f"({c})"], [x for x in "ABCDE" if x != c][:2]
    return rf"{a}\pi", [rf"\pi \cdot {a}", rf"{a} \pi"], [rf"{a + 1}\pi", str(a)]


def _resp(answer: str) -> str:
    return f"Let me work it out step by step. </think> <answer>{answer}</answer>"


def iter_math_rows_realistic(samples: int = 8, seed: int = 0) -> Iterator[dict]:
    rng = random.Random(seed)
    for i in itertools.count():
        gold, equal, wrong = _math_problem(rng)
        for k in range(samples):
            u = rng.random()
            answer = gold if u < 0.45 else rng.choice(equal) if u < 0.60 else rng.choice(wrong)
            yield {"problem_id": f"test-{i}", "sample_index": k, "response": _resp(answer),
                   "ground_truth": gold}


def math_rows_worst(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        gold, equal, wrong = _math_problem(rng, integers=False)
        answer = rng.choice(equal + wrong)
        if answer == gold or (gold, answer) in seen:
            continue
        seen.add((gold, answer))
        rows.append({"problem_id": f"test-{len(rows)}", "response": _resp(answer), "ground_truth": gold})
    return rows


def _vmhwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")


def bench_math(rows: list[dict], workers: int, timeout_s: float) -> dict:
    """Through the pool `verify_rows(rows, task="math")` uses, timed after its start-up (timed
    apart), with the CPU time of the parent and of the workers."""
    from exit_loop.tasks.math import verify_rows_math
    from exit_loop.tasks.math_pool import MathPool

    failures: dict[str, int] = {}
    with MathPool(workers, timeout_s) as pool:
        t0 = time.perf_counter()
        list(pool.imap((i, ("1", "1.0")) for i in range(workers)))  # start every worker
        startup = time.perf_counter() - t0
        cpu0 = {id(w): w.cpu_now() or 0.0 for w in pool.live_workers()}
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _, verdict in verify_rows_math(rows, pool):
            failures[verdict.failure] = failures.get(verdict.failure, 0) + 1
        dt = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        live = pool.live_workers()
        worker_cpu = sum((w.cpu_now() or 0.0) - cpu0.get(id(w), 0.0) for w in live)
        worker_hwm = max((_vmhwm_mb(w.proc.pid) for w in live), default=float("nan"))
        restarts = pool.restarts
    parent_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    n = sum(failures.values())
    return {"rows": n, "seconds": dt, "rows_per_s": n / dt, "startup_s": startup,
            "parent_cpu_s": parent_cpu, "worker_cpu_s": worker_cpu, "worker_hwm_mb": worker_hwm,
            "restarts": restarts, "failures": failures}


def shortcut_share(rows: list[dict]) -> float:
    """Share of the rows that the math path answers without math-verify."""
    from exit_loop.tasks import Verdict
    from exit_loop.tasks.math import precheck

    hits = sum(isinstance(precheck(r["response"], r["ground_truth"], None), Verdict) for r in rows)
    return hits / len(rows)


# --------------------------------------------------------------------------- files

_CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from exit_loop.verify import VerifyConfig, run
if __name__ == "__main__":
    t0 = time.perf_counter()
    run(VerifyConfig(input={src!r}, output={dst!r}, task={task!r}, math_workers={workers!r}))
    seconds = time.perf_counter() - t0
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    print(json.dumps({{"seconds": seconds, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "vmhwm_kib": int(hwm[0]) if hwm else None}}))
"""


def write_rows_file(path: Path, rows: Iterator[dict], n: int) -> int:
    """The next n rows of `rows`, written line by line (never all in memory)."""
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(itertools.islice(rows, n)):
            f.write(json.dumps({**r, "sample_index": i}) + "\n")
    return path.stat().st_size


def bench_file(tmp: Path, rows: Iterator[dict], n: int, task: str, workers: int | None = None) -> dict:
    src, dst = tmp / f"{task}_{n}.jsonl", tmp / f"{task}_{n}_verified.jsonl"
    size = write_rows_file(src, rows, n)
    script = tmp / "child.py"
    script.write_text(_CHILD.format(root=str(ROOT), src=str(src), dst=str(dst), task=task, workers=workers))
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    with dst.open("rb") as f:
        rows_out = sum(1 for _ in f)
    res = {"rows": n, "rows_out": rows_out, "input_mb": size / 1e6, "output_mb": dst.stat().st_size / 1e6,
           "run_s": child["seconds"], "rows_per_s": n / child["seconds"], "load": load,
           "maxrss_mb": child["maxrss_kib"] / 1024,
           "vmhwm_mb": child["vmhwm_kib"] / 1024 if child["vmhwm_kib"] else float("nan")}
    src.unlink()
    dst.unlink()
    return res


# --------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gsm8k", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"))
    p.add_argument("--gsm8k_rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--math_problems", type=int, default=2500, help="x 8 samples each (realistic mix)")
    p.add_argument("--math_worst_rows", type=int, default=3000)
    p.add_argument("--math_workers", type=int, default=2)
    p.add_argument("--math_timeout_s", type=float, default=1.5)
    p.add_argument("--big_rows", type=int, default=1_000_000)
    p.add_argument("--math_big_rows", type=int, default=50_000)
    p.add_argument("--skip", nargs="*", default=[], choices=["gsm8k", "math", "files"])
    a = p.parse_args()

    print(f"# verifier throughput  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    try:
        from importlib.metadata import version
        print(f"math-verify {version('math-verify')}, latex2sympy2_extended {version('latex2sympy2_extended')}")
    except Exception as e:  # noqa: BLE001
        print(f"math-verify: {e}")

    if "files" not in a.skip:  # first, while this process is small (a child's ru_maxrss starts at its size)
        print()
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            for n in sorted({a.big_rows // 10, a.big_rows}):
                r = bench_file(tmp, iter_gsm8k_rows(Path(a.gsm8k)), n, "gsm8k")
                print(f"file, GSM8K, {n:,} rows ({r['input_mb']:.0f} MB in, {r['output_mb']:.0f} MB out, "
                      f"{r['rows_out']:,} rows out), run() in a fresh process: {r['run_s']:.1f} s = "
                      f"{r['rows_per_s']:,.0f} rows/s end to end (JSON in and out; load average "
                      f"{r['load']:.1f}); peak RSS {r['maxrss_mb']:.0f} MB (ru_maxrss), {r['vmhwm_mb']:.0f} MB (VmHWM)")
            if a.math_big_rows:
                for n in sorted({a.math_big_rows // 10, a.math_big_rows}):
                    r = bench_file(tmp, iter_math_rows_realistic(seed=2), n, "math", a.math_workers)
                    print(f"file, math ({a.math_workers} workers, realistic), {n:,} rows ({r['input_mb']:.0f} MB "
                          f"in, {r['rows_out']:,} rows out): {r['run_s']:.1f} s = {r['rows_per_s']:,.0f} rows/s "
                          f"including the pool's start (load average {r['load']:.1f}); peak RSS of the verify "
                          f"process {r['maxrss_mb']:.0f} MB (ru_maxrss), {r['vmhwm_mb']:.0f} MB (VmHWM)")

    if "gsm8k" not in a.skip:
        gsm = list(itertools.islice(iter_gsm8k_rows(Path(a.gsm8k)), a.gsm8k_rows))
        load = os.getloadavg()[0]
        r = bench_gsm8k(gsm, a.repeats)
        print(f"\nGSM8K path, 1 core, {r['rows']:,} rows in memory, best of {a.repeats}: "
              f"{r['best_rows_per_s']:,.0f} rows/s (median {r['median_rows_per_s']:,.0f}; load average "
              f"{load:.1f} before); by CPU time {r['rows_per_cpu_s']:,.0f} rows per CPU-second")
        del gsm

    if "math" not in a.skip:
        real = list(itertools.islice(iter_math_rows_realistic(), a.math_problems * 8))
        worst = math_rows_worst(a.math_worst_rows)
        for name, rows in (("realistic", real), ("worst case", worst)):
            load = os.getloadavg()[0]
            r = bench_math(rows, a.math_workers, a.math_timeout_s)
            cpu = r["parent_cpu_s"] + r["worker_cpu_s"]
            print(f"\nmath path, {a.math_workers} workers, {name}: {r['rows']:,} rows in {r['seconds']:.1f} s = "
                  f"{r['rows_per_s']:,.0f} rows/s (pool start-up {r['startup_s']:.2f} s, not counted; load "
                  f"average {load:.1f} before); answered without math-verify: {shortcut_share(rows):.0%}; "
                  f"CPU: parent {r['parent_cpu_s']:.1f} s + workers {r['worker_cpu_s']:.1f} s = "
                  f"{1e3 * cpu / r['rows']:.2f} ms a row, i.e. {r['rows'] / cpu * a.math_workers:,.0f} rows/s "
                  f"on {a.math_workers} idle cores; worker peak RSS {r['worker_hwm_mb']:.0f} MB; "
                  f"failures {r['failures']}, workers replaced {r['restarts']}")


if __name__ == "__main__":
    main()
