"""Compare finished runs: accuracy per round per arm, yield, tokens and wall time per stage,
written as report.md, report.json, accuracy.png and response_length.png.

    exit-loop compare runs/compare_filtered_unfiltered
    exit-loop compare runs/exit_a runs/exit_b --output_dir reports/a_vs_b

Each RUN_DIR is either one run (it holds round_00/, round_01/, ... directly) or an experiment
directory whose subdirectories are runs, one per arm, each with its run.json. Arms are named by
run.json's `arm` (else the directory's name); two runs with the same arm name are told apart by
their experiment's name (`exp_a/main`, `exp_b/main`).

Round k's eval measures the policy that samples in round k: round 0 is the starting student,
the last round (which holds only eval/) is the final checkpoint. A value a run does not hold is
null in report.json and a dash in report.md, never estimated.

Every accuracy carries its 95% Wilson interval over the held-out questions (`accuracy_ci95`,
from each round's `eval/greedy.jsonl`, else from eval.json's n); each pair of arms, at each round
both evaluated, gets the paired difference on the same questions with a 95% paired-bootstrap
interval and an exact McNemar p-value (`paired`: `{a, b, round, diff, ci95, p_mcnemar, n}`).
Arms evaluated on different questions are refused (`--allow_mismatch` pairs them on the
questions they share).

The report goes to the experiment directory all the runs share, else the first RUN_DIR, unless
--output_dir says otherwise. Run directories are only read; the report files are the only
thing written.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exit_loop.config import flatten
from exit_loop.errors import DataError
from exit_loop.jsonl import atomic_write_bytes, atomic_write_text, iter_jsonl_numbered, write_json
from exit_loop.environment import describe
from exit_loop.layout import EVAL, GREEDY, ROUND_RE, SEED_RE, SUMMARY, TIME_COLUMNS, round_name, seed_name
from exit_loop.stats import accuracy_interval, paired_difference, pooled_difference, t_interval, wilson
from exit_loop.verify import verify_rows

log = logging.getLogger(__name__)

EVAL_FRACTIONS = ("accuracy", "pass@k", "maj@k", "format_error_rate")


@dataclass
class Run:
    """One arm's run directory, as found on disk."""
    path: Path
    arm: str                        # the name shown in the report (unique among the runs)
    experiment: str
    experiment_dir: Path | None     # the experiment directory holding this arm, if any
    info: dict[str, Any] | None     # run.json, if present
    seed: int | None = None         # the seed, where the experiment ran several (seed_<s>/)
    base_arm: str = ""              # the arm's own name (without the seed)


# ---------------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None if the file does not exist."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _get(obj: dict[str, Any] | None, *keys: str) -> Any:
    """obj[k1][k2]..., or None where any level is missing."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _number(value: Any, path: Path, key: str, *, fraction: bool = False, integer: bool = False
            ) -> float | int | None:
    """`value` checked to be null or a finite number (a fraction in [0, 1], an integer)."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if fraction:
        ok = ok and 0 <= value <= 1
    if not ok:
        expected = ("an integer" if integer else "a fraction in [0, 1]" if fraction
                    else "a finite number")
        raise DataError(f"{path}: key {key!r} is {value!r}; expected {expected} or null")
    return int(value) if integer else value


def _abspath(path: Path) -> Path:
    """Absolute and normalised (`.` and `..` gone) without following symlinks."""
    return Path(os.path.abspath(path))


def _round_dirs(path: Path) -> dict[int, Path]:
    out = {}
    for d in path.iterdir():
        m = ROUND_RE.fullmatch(d.name)
        if m and d.is_dir():
            out[int(m.group(1))] = d
    return out


def _experiment_name(run_dir: Path, info: dict[str, Any] | None, experiment_dir: Path | None) -> str:
    name = _get(info, "experiment")
    if isinstance(name, str) and name:
        return name
    for d in (run_dir, experiment_dir):
        if d is not None and (d / "config.yaml").is_file():
            import yaml

            try:
                cfg = yaml.safe_load((d / "config.yaml").read_text(encoding="utf-8"))
            except yaml.YAMLError as e:
                raise DataError(f"{d / 'config.yaml'}: not valid YAML ({e})") from None
            if isinstance(cfg, dict) and isinstance(cfg.get("experiment"), str) and cfg["experiment"]:
                return cfg["experiment"]
    return _abspath(experiment_dir or run_dir).name


def _is_experiment_dir(path: Path) -> bool:
    """An experiment directory: a config.yaml, no rounds of its own, and arms below it."""
    return ((path / "config.yaml").is_file() and not _round_dirs(path)
            and any((d / "run.json").is_file() for d in path.iterdir() if d.is_dir()))


def _unique_names(runs: list[Run]) -> None:
    """Arms named alike (under one seed) get their experiment's name in front; any left alike
    are numbered."""
    clash = Counter((r.arm, r.seed) for r in runs)
    for r in runs:
        if clash[(r.arm, r.seed)] > 1:
            r.arm = f"{r.experiment}/{r.arm}"
    clash = Counter((r.arm, r.seed) for r in runs)
    seen: Counter[tuple[str, int | None]] = Counter()
    for r in runs:
        if clash[(r.arm, r.seed)] > 1:
            seen[(r.arm, r.seed)] += 1
            r.arm = f"{r.arm}#{seen[(r.arm, r.seed)]}"


def _seed_dirs(path: Path) -> list[tuple[int, Path]]:
    """An experiment's `seed_<s>/` directories (it ran several seeds), by seed."""
    out = []
    for d in path.iterdir():
        m = SEED_RE.fullmatch(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)


def find_runs(run_dirs: list[Path]) -> list[Run]:
    """The arm runs under the given paths, in order, each once, with unique names (an experiment
    with several seeds: one run per arm and seed, named `arm/seed_<s>`)."""
    if not run_dirs:
        raise DataError("no RUN_DIR given; expected at least one run or experiment directory")
    found: list[tuple[Path, Path | None, int | None]] = []
    for given in map(Path, run_dirs):
        if not given.is_dir():
            raise DataError(f"{given}: no such directory; expected a run directory (with round_* "
                            "directories) or an experiment directory (with one run per arm)")
        if _round_dirs(given):
            parent = _abspath(given).parent
            found.append((given, parent if _is_experiment_dir(parent) else None, None))
            continue
        seeds = _seed_dirs(given)
        for seed, d in seeds or [(None, given)]:
            if _round_dirs(d):  # one arm, several seeds
                found.append((d, given, seed))
                continue
            arms = sorted(a for a in d.iterdir() if a.is_dir() and (a / "run.json").is_file())
            if not arms:
                raise DataError(f"{d}: holds no round_* directories and no arm directories (with "
                                "run.json); expected a run directory or an experiment directory")
            found += [(arm, given, seed) for arm in arms]

    runs: list[Run] = []
    seen: set[Path] = set()
    for path, experiment_dir, seed in found:
        if _abspath(path) in seen:  # named twice (an arm and its experiment): report it once
            continue
        seen.add(_abspath(path))
        info = _read_json(path / "run.json")
        arm = _get(info, "arm")
        name = arm if isinstance(arm, str) and arm else _abspath(path).name
        runs.append(Run(path=path, arm=name, experiment=_experiment_name(path, info, experiment_dir),
                        experiment_dir=experiment_dir, info=info, seed=seed, base_arm=name))
    _unique_names(runs)
    for r in runs:
        r.base_arm = r.arm
        if r.seed is not None:
            r.arm = f"{r.arm}/{seed_name(r.seed)}"
    return runs


def _wall_s(manifest: dict[str, Any] | None, path: Path) -> float | None:
    """A stage's wall time: `timings.wall_s`, or the SFT stage's top-level `wall_time_s`."""
    if _get(manifest, "timings", "wall_s") is not None:
        return _number(manifest["timings"]["wall_s"], path, "timings.wall_s")  # type: ignore[index]
    return _number(_get(manifest, "wall_time_s"), path, "wall_time_s")


def read_run(run: Run) -> dict[str, Any]:
    """One arm's numbers per round: lists indexed by round, null where the run holds nothing."""
    rounds_dirs = _round_dirs(run.path)
    if not rounds_dirs:
        raise DataError(f"{run.path}: holds no round_* directories; expected round_00/, round_01/, ...")
    run_json = run.path / "run.json"
    planned = _number(_get(run.info, "rounds"), run_json, "rounds", integer=True)
    last = max(max(rounds_dirs), planned if planned is not None else 0)
    rounds = list(range(last + 1))

    arm: dict[str, Any] = {key: [] for key in (*EVAL_FRACTIONS, "n", "mean_response_tokens", "k", "yield",
                                               "tokens_generated", "training_tokens", "training_steps",
                                               "training_rows", "training_epochs")}
    arm["wall_time_s"] = {stage: [] for stage in TIME_COLUMNS}
    for k in rounds:
        d = rounds_dirs.get(k, run.path / round_name(k))

        path = d / "eval" / EVAL
        ev = _read_json(path)
        if ev is not None:
            if "accuracy" not in ev:
                raise DataError(f"{path}: missing key 'accuracy' (greedy pass@1 as a fraction)")
            if ev.get("round") is not None and ev["round"] != k:
                raise DataError(f"{path}: key 'round' is {ev['round']!r}; expected {k} (its directory)")
        for key in EVAL_FRACTIONS:
            arm[key].append(_number(_get(ev, key), path, key, fraction=True))
        arm["mean_response_tokens"].append(_number(_get(ev, "mean_response_tokens"), path, "mean_response_tokens"))
        arm["k"].append(_number(_get(ev, "k"), path, "k", integer=True))
        arm["n"].append(_number(_get(ev, "n"), path, "n", integer=True))

        path = d / "filter" / SUMMARY
        summary = _read_json(path)
        traces = _number(_get(summary, "traces"), path, "traces", integer=True)
        correct = _number(_get(summary, "correct_traces"), path, "correct_traces", integer=True)
        if traces and correct is not None:
            arm["yield"].append(correct / traces)
        else:
            arm["yield"].append(_number(_get(summary, "trace_accuracy"), path, "trace_accuracy", fraction=True))

        path = d / "sample" / "manifest.json"
        manifest = _read_json(path)
        arm["tokens_generated"].append(_number(_get(manifest, "counts", "tokens_generated"), path,
                                               "counts.tokens_generated", integer=True))
        arm["wall_time_s"]["sample"].append(_wall_s(manifest, path))

        path = d / "train" / "manifest.json"
        manifest = _read_json(path)
        key = "tokens" if _get(manifest, "tokens") is not None else "training_tokens"
        arm["training_tokens"].append(_number(_get(manifest, key), path, key, integer=True))
        arm["training_steps"].append(_number(_get(manifest, "steps"), path, "steps", integer=True))
        arm["training_rows"].append(_number(_get(manifest, "trained_examples"), path, "trained_examples",
                                            integer=True) if _get(manifest, "skipped") is None else 0)
        arm["training_epochs"].append(_number(_get(manifest, "epochs"), path, "epochs"))
        arm["wall_time_s"]["train"].append(_wall_s(manifest, path))

        for stage in ("verify", "filter", "eval"):
            path = d / stage / "manifest.json"
            arm["wall_time_s"][stage].append(_wall_s(_read_json(path), path))

    timings = _get(run.info, "timings")
    if timings is not None:
        if not isinstance(timings, dict):
            raise DataError(f"{run_json}: key 'timings' is {timings!r}; expected an object of seconds")
        timings = {key: _number(v, run_json, f"timings.{key}") for key, v in timings.items()}
    arm.update(rounds=rounds, run_dir=str(run.path), experiment=run.experiment, timings=timings)
    return arm


def read_outcomes(run: Run, rounds: list[int]) -> tuple[list[dict[str, bool] | None], dict[str, str]]:
    """Per round, each held-out question's greedy verdict (problem_id -> is_correct), from
    `eval/greedy.jsonl` (labelled by the verifier here, with the eval's task, where its rows carry
    no verdict); None where the round holds no generations. And each question's group, where
    the rows carry one (`data.group_by`)."""
    rounds_dirs = _round_dirs(run.path)
    out: list[dict[str, bool] | None] = []
    groups: dict[str, str] = {}
    for k in rounds:
        path = rounds_dirs.get(k, run.path / round_name(k)) / "eval" / GREEDY
        if not path.is_file():
            out.append(None)
            continue
        rows = [row for _, row in iter_jsonl_numbered(path, required=("problem_id",))]
        if rows and any("is_correct" not in row for row in rows):  # raw generations: label them
            manifest = _read_json(path.parent / "manifest.json")
            task = _get(manifest, "config", "data", "task") or "gsm8k"
            rows = list(verify_rows(rows, task=task))
        out.append({str(row["problem_id"]): row["is_correct"] is True for row in rows})
        groups.update({str(row["problem_id"]): str(row["group"]) for row in rows if row.get("group") is not None})
    return out, groups


def group_accuracy(outcomes: list[dict[str, bool] | None], groups: dict[str, str]) -> dict[str, Any]:
    """Per group of questions (`data.group_by`), each round's accuracy, its Wilson interval and n."""
    out: dict[str, Any] = {}
    for g in sorted(set(groups.values())):
        acc, ci, ns = [], [], []
        for q in outcomes:
            xs = [v for pid, v in (q or {}).items() if groups.get(pid) == g]
            acc.append(round(sum(xs) / len(xs), 4) if xs else None)
            ci.append([round(x, 4) for x in wilson(sum(xs), len(xs))] if xs else None)
            ns.append(len(xs) if xs else None)
        out[g] = {"accuracy": acc, "accuracy_ci95": ci, "n": ns}
    return out


def run_environment(run: Run) -> dict[str, Any] | None:
    """The environment (versions, CPU and its ISA, GPU) a run's first recorded eval ran in."""
    for _, d in sorted(_round_dirs(run.path).items()):
        env = _get(_read_json(d / "eval" / "manifest.json"), "environment")
        if isinstance(env, dict):
            return env
    return None


def _interval(outcomes: dict[str, bool] | None, accuracy: float | None, n: int | None) -> list[float] | None:
    """The 95% Wilson interval of a round's accuracy, over its questions."""
    if outcomes:
        k, n = sum(outcomes.values()), len(outcomes)
    elif accuracy is not None and n:
        k = round(accuracy * n)
    else:
        return None
    return [round(x, 4) for x in wilson(k, n)]


def paired_rows(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]],
                allow_mismatch: bool = False) -> list[dict[str, Any]]:
    """For each pair of arms (in report order) and each round both evaluated: the paired
    difference in accuracy on the same questions, its 95% paired-bootstrap interval and the
    exact McNemar p-value. Arms evaluated on different questions are refused (DataError naming
    them) unless `allow_mismatch`, which pairs them on the questions they share."""
    names = list(report["arms"])
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = report["arms"][a].get("seed"), report["arms"][b].get("seed")
            if sa != sb:  # arms pair within a seed; across seeds, the pooled entries
                continue
            for r, (qa, qb) in enumerate(zip(outcomes[a], outcomes[b])):
                if not qa or not qb:
                    continue
                if set(qa) != set(qb):
                    only_a, only_b = sorted(set(qa) - set(qb)), sorted(set(qb) - set(qa))
                    if not allow_mismatch:
                        raise DataError(
                            f"arms {a!r} and {b!r} were evaluated on different questions at round {r} "
                            f"({len(only_a)} only in {a!r}, e.g. {only_a[:3]}; {len(only_b)} only in {b!r}, "
                            f"e.g. {only_b[:3]}): a paired comparison needs the same questions "
                            "(--allow_mismatch pairs them on the questions they share)")
                shared = sorted(set(qa) & set(qb))
                if not shared:
                    continue
                d = paired_difference([qa[q] for q in shared], [qb[q] for q in shared])
                row = {"a": a, "b": b, "round": report["arms"][a]["rounds"][r],
                       "diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci95"]],
                       "p_mcnemar": d["p_mcnemar"], "n": d["n"]}
                if sa is not None:
                    row.update(a=report["arms"][a]["arm"], b=report["arms"][b]["arm"], seed=sa)
                out.append(row)
    return out + pooled_paired(report, outcomes)


def pooled_paired(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]]) -> list[dict[str, Any]]:
    """Across seeds, for each pair of arms and round: the mean of the per-seed paired differences
    with a 95% interval from a two-level bootstrap (seeds, then questions within a seed); p is null
    (there is no one exact test across seeds)."""
    by_arm: dict[str, dict[int, str]] = {}
    for name, arm in report["arms"].items():
        if arm.get("seed") is not None:
            by_arm.setdefault(arm["arm"], {})[arm["seed"]] = name
    out = []
    arms = list(by_arm)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            seeds = sorted(set(by_arm[a]) & set(by_arm[b]))
            if len(seeds) < 2:
                continue
            rounds = report["arms"][by_arm[a][seeds[0]]]["rounds"]
            for r, rnd in enumerate(rounds):
                pairs = []
                for s in seeds:
                    qa, qb = outcomes[by_arm[a][s]][r], outcomes[by_arm[b][s]][r]
                    if qa and qb:
                        shared = sorted(set(qa) & set(qb))
                        pairs.append(([qa[q] for q in shared], [qb[q] for q in shared]))
                if len(pairs) < 2 or not all(p[0] for p in pairs):
                    continue
                out.append({"a": a, "b": b, "round": rnd, **over_seeds(pairs, seeds)})
    return out


def over_seeds(pairs: list[tuple[list[bool], list[bool]]], seeds: list[int]) -> dict[str, Any]:
    """A difference pooled over seeds (one (a, b) pair of outcome lists per seed): each seed's
    difference and sign, their mean with the t-interval over seeds (`t_ci95`), and the two-level
    bootstrap over seeds and questions (`ci95`) beside it."""
    d = pooled_difference(pairs)
    per_seed = [round(sum(x) / len(x) - sum(y) / len(y), 4) for x, y in pairs]
    t = t_interval(per_seed)
    return {"seed": None, "seeds": len(pairs), "seed_list": seeds[:len(pairs)], "per_seed": per_seed,
            "positive": sum(v > 0 for v in per_seed), "diff": round(d["diff"], 4),
            "t_ci95": [round(x, 4) for x in t] if t else None,
            "ci95": [round(x, 4) for x in d["ci95"]], "p_mcnemar": None, "n": d["n"]}


def gain_rows(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]]) -> list[dict[str, Any]]:
    """Each arm's accuracy at every later round minus its own round 0, on the same questions: per
    run (paired bootstrap, exact McNemar) and, where the arm ran under several seeds, pooled over
    them (`over_seeds`)."""
    out: list[dict[str, Any]] = []
    by_arm: dict[str, dict[Any, str]] = {}
    for name, arm in report["arms"].items():
        by_arm.setdefault(arm["arm"], {})[arm["seed"]] = name
        q = outcomes[name]
        for r in range(1, len(q)):
            if q[0] and q[r]:
                shared = sorted(set(q[0]) & set(q[r]))
                d = paired_difference([q[r][x] for x in shared], [q[0][x] for x in shared])
                out.append({"arm": arm["arm"], "seed": arm["seed"], "round": arm["rounds"][r], "from_round": arm["rounds"][0],
                            "diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci95"]],
                            "p_mcnemar": d["p_mcnemar"], "n": d["n"]})
    for arm, names in by_arm.items():
        seeds = sorted(s for s in names if s is not None)
        if len(seeds) < 2:
            continue
        rounds = report["arms"][names[seeds[0]]]["rounds"]
        for r in range(1, len(rounds)):
            pairs = []
            for s in seeds:
                q = outcomes[names[s]]
                if r < len(q) and q[0] and q[r]:
                    shared = sorted(set(q[0]) & set(q[r]))
                    pairs.append(([q[r][x] for x in shared], [q[0][x] for x in shared]))
            if len(pairs) >= 2:
                out.append({"arm": arm, "round": rounds[r], "from_round": rounds[0], **over_seeds(pairs, seeds)})
    return out


def pooled_arms(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]],
                groups: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """Across seeds, per arm and round (and per group of questions, where they have groups): the
    mean accuracy over seeds and its 95% interval from a two-level bootstrap over seeds and
    questions (`accuracy_interval`)."""
    groups = groups or {}
    by_arm: dict[str, list[str]] = {}
    for name, arm in report["arms"].items():
        if arm.get("seed") is not None:
            by_arm.setdefault(arm["arm"], []).append(name)
    def over_seeds_per_round(names: list[str], rounds: list[int], keep) -> dict[str, list]:
        """Each round's mean over seeds of the questions `keep` selects, and its interval."""
        acc, ci = [], []
        for r in range(len(rounds)):
            per_seed = [[v for pid, v in outcomes[n][r].items() if keep(n, pid)]
                        for n in names if r < len(outcomes[n]) and outcomes[n][r]]
            per_seed = [x for x in per_seed if x]
            acc.append(round(sum(sum(x) / len(x) for x in per_seed) / len(per_seed), 4) if per_seed else None)
            ci.append([round(v, 4) for v in accuracy_interval(per_seed)] if per_seed else None)
        return {"accuracy": acc, "accuracy_ci95": ci}

    out = {}
    for arm, names in by_arm.items():
        rounds = report["arms"][names[0]]["rounds"]
        out[arm] = {"rounds": rounds, "seeds": [report["arms"][n]["seed"] for n in names],
                    **over_seeds_per_round(names, rounds, lambda n, pid: True), "by_group": {}}
        for g in sorted({g for n in names for g in groups.get(n, {}).values()}):
            out[arm]["by_group"][g] = over_seeds_per_round(names, rounds,
                                                           lambda n, pid, g=g: groups[n].get(pid) == g)
    return out


# What an eval's manifest config may differ in between arms: which model and round it measured, and
# where it ran (engine placement; `sample.server`, which an in-process eval never uses, and which
# manifests written before it existed lack).
_EVAL_OWN = {"output_dir", "sample.model_name", "sample.round", "sample.seed", "sample.student",
             "sample.gpu_device", "sample.num_shards", "sample.shard_id", "sample.hf_batch_size",
             "sample.gpu_memory_utilization", "sample.engine", "sample.server"}


def eval_settings(run: Run) -> dict[str, Any]:
    """The eval settings of a run's first evaluated round (its manifest's config, flattened),
    less what may differ between arms (the model, the round, engine placement)."""
    for d in sorted(_round_dirs(run.path).items()):
        manifest = _read_json(d[1] / "eval" / "manifest.json")
        config = _get(manifest, "config")
        if isinstance(config, dict):
            return {k: v for k, v in flatten(config).items()
                    if k not in _EVAL_OWN and not k.startswith(("sample.engine.", "sample.server."))}
    return {}


def check_eval_settings(runs: list[Run], allow_mismatch: bool = False) -> None:
    """Refuse (DataError naming the keys) arms evaluated on different data or under different
    settings (max_tokens, temperature, stop, k, n, the task...): one table would mix what is
    measured with how."""
    if allow_mismatch or len(runs) < 2:
        return
    first = eval_settings(runs[0])
    for run in runs[1:]:
        other = eval_settings(run)
        if not first or not other:
            continue
        keys = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if keys:
            diffs = ", ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in keys[:6])
            raise DataError(f"arms {runs[0].arm!r} and {run.arm!r} were evaluated differently ({diffs}); "
                            "their accuracies are not comparable in one table (--allow_mismatch to tabulate "
                            "them anyway)")


def build_report(runs: list[Run], allow_mismatch: bool = False) -> dict[str, Any]:
    check_eval_settings(runs, allow_mismatch)
    arms, outcomes, groups = {}, {}, {}
    envs: list[dict[str, Any]] = []
    for run in runs:
        arm = read_run(run)
        outcomes[run.arm], groups[run.arm] = read_outcomes(run, arm["rounds"])
        arm["by_group"] = group_accuracy(outcomes[run.arm], groups[run.arm])
        env = run_environment(run)
        for e in envs:
            if e["environment"] == env:
                e["runs"].append(run.arm)
                break
        else:
            if env is not None:
                envs.append({"environment": env, "runs": [run.arm]})
        ns = arm.pop("n")
        arm["accuracy_ci95"] = [_interval(q, acc, n) for q, acc, n in zip(outcomes[run.arm], arm["accuracy"], ns)]
        arm["n_questions"] = [len(q) if q else n for q, n in zip(outcomes[run.arm], ns)]
        arm["arm"], arm["seed"] = run.base_arm or run.arm, run.seed
        arms[run.arm] = arm
    report: dict[str, Any] = {"arms": arms, "generated_by": "exit-loop compare", "environments": envs}
    report["paired"] = paired_rows(report, outcomes, allow_mismatch)
    report["gains"] = gain_rows(report, outcomes)
    if any(arm["seed"] is not None for arm in arms.values()):
        report["pooled"] = pooled_arms(report, outcomes, groups)
    return report


# ---------------------------------------------------------------------------------- writing


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _int(x: float | int | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _k_label(report: dict[str, Any]) -> str:
    ks = {k for arm in report["arms"].values() for k in arm["k"] if k is not None}
    return str(ks.pop()) if len(ks) == 1 else "k"


def summary_line(name: str, arm: dict[str, Any]) -> str:
    """`name: accuracy A% (round i) → B% (round j), +D points; time: ...; overhead ...`."""
    acc = [(r, a) for r, a in zip(arm["rounds"], arm["accuracy"]) if a is not None]
    if not acc:
        text = "no accuracy recorded"
    elif len(acc) == 1:
        text = f"accuracy {_pct(acc[0][1])}% at round {acc[0][0]} only"
    else:
        (r0, a0), (r1, a1) = acc[0], acc[-1]
        text = (f"accuracy {_pct(a0)}% (round {r0}) → {_pct(a1)}% (round {r1}), "
                f"{100 * (a1 - a0):+.1f} points")
    t = arm.get("timings") or {}
    total = t.get("total_s")
    if total:
        parts = [f"{s} {100 * t[f'{s}_s'] / total:.0f}%" for s in TIME_COLUMNS if t.get(f"{s}_s") is not None]
        if t.get("overhead_s") is not None:
            parts.append(f"loop overhead {_secs(t['overhead_s'])} s ({100 * t['overhead_s'] / total:.1f}%)")
        text += f"; time {_secs(total)} s: " + ", ".join(parts)
    return f"**{name}**: {text}"


def _ci_n(arm: dict[str, Any], i: int) -> str:
    n = arm.get("n_questions")
    return str(n[i]) if n and n[i] is not None else "—"


def paired_lines(report: dict[str, Any], last_only: bool = False) -> list[str]:
    """`a − b, round r: +X points [lo, hi], p = …, n = …` for each paired entry (the last round
    of each pair only, with `last_only`)."""
    rows = report.get("paired") or []
    if last_only:
        last: dict[tuple[str, str, Any], dict[str, Any]] = {}
        for row in rows:
            last[(row["a"], row["b"], row.get("seed", 0) if "seed" in row else "-")] = row
        rows = list(last.values())
    out = []
    for row in rows:
        lo, hi = row["ci95"]
        where = f"round {row['round']}"
        if "seed" in row:
            where += f", seed {row['seed']}" if row["seed"] is not None else f", pooled over {row['seeds']} seeds"
        if row["p_mcnemar"] is None:
            test = "two-level bootstrap over seeds and questions, no exact test"
        else:
            test = f"p = {row['p_mcnemar']:.3g} (McNemar, exact)"
        out.append(f"{row['a']} − {row['b']}, {where}: {100 * row['diff']:+.1f} points "
                   f"[{100 * lo:+.1f}, {100 * hi:+.1f}], {test}, n = {row['n']}")
    return out


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci_pts(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{_pts(ci[0])}, {_pts(ci[1])}]"


TRUST = ("Which interval to trust: the t-interval over seeds treats each seed (its own initialisation, warm "
         "start, sampling and training) as one draw of the method, so it carries the variance a claim about the "
         "method has to beat; with {n} seeds it is the one this report's verdicts use. The two-level bootstrap "
         "beside it resamples seeds and questions and covers less than 95% with few seeds (about 83-90% with 3 "
         "seeds, 93% with 5, in simulation with the quickstart's spread).")


def over_seeds_lines(report: dict[str, Any]) -> list[str]:
    """report.md's claims over seeds: the last round of every arm pair and of every arm against its
    own round 0, each seed's difference, how many are positive, the mean with its t-interval over
    seeds, the pooled bootstrap beside it, and a verdict."""
    rows = [r for r in report.get("paired") or [] if "seeds" in r]
    gains = [g for g in report.get("gains") or [] if "seeds" in g]
    if not rows and not gains:
        return []
    last_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        last_pair[(r["a"], r["b"])] = r
    last_gain: dict[str, dict[str, Any]] = {}
    for g in gains:
        last_gain[g["arm"]] = g
    entries = [(f"{g['arm']} round {g['round']} − round {g['from_round']}", g) for g in last_gain.values()]
    entries += [(f"{a} − {b}, round {r['round']}", r) for (a, b), r in last_pair.items()]
    n = max(e["seeds"] for _, e in entries)
    lines = ["", "## Over seeds: the claims", "",
             "Each seed's difference in held-out accuracy (points), how many seeds are positive, the mean over "
             "seeds with its 95% t-interval over seeds, and the two-level bootstrap over seeds and questions. "
             "A verdict needs the t-interval above (or below) zero.", "",
             "| comparison | seeds | per seed | positive | mean | 95% t over seeds | 95% pooled bootstrap | verdict |",
             "|---|---:|---|---:|---:|---|---|---|"]
    for label, e in entries:
        t = e.get("t_ci95")
        verdict = ("higher" if t and t[0] > 0 else "lower" if t and t[1] < 0 else "not shown")
        lines.append(f"| {label} | {e['seeds']} | {', '.join(_pts(v) for v in e['per_seed'])} | "
                     f"{e['positive']}/{e['seeds']} | {_pts(e['diff'])} | {_ci_pts(t)} | {_ci_pts(e['ci95'])} | {verdict} |")
    lines += ["", TRUST.format(n=n)]
    if n < 5:
        lines.append(f"With {n} seeds the t-interval is wide (its t quantile is {'12.7' if n == 2 else '4.30' if n == 3 else '3.18'}); "
                     "a claim the project makes needs at least 5.")
    return lines


def group_lines(report: dict[str, Any]) -> list[str]:
    """Accuracy per group of held-out questions (`data.group_by`): pooled over seeds where there are
    several, else per run."""
    source = report.get("pooled") or report["arms"]
    have = {name: a.get("by_group") for name, a in source.items() if a.get("by_group")}
    if not have:
        return []
    rounds = max((a["rounds"] for a in source.values()), key=len)
    lines = ["", "## By group of questions", "",
             "Held-out accuracy % per group of questions (the eval data's `group_by` key)"
             + (", mean over seeds with the two-level bootstrap's 95% interval." if report.get("pooled")
                else ", with its 95% Wilson interval."), "",
             "| arm | group | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "|---|---|" + "---|" * len(rounds)]
    for name, groups in have.items():
        for g, v in groups.items():
            cells = []
            for acc, ci in zip(v["accuracy"], v["accuracy_ci95"]):
                cells.append("—" if acc is None else f"{_pct(acc)} [{_pct(ci[0])}, {_pct(ci[1])}]")
            lines.append(f"| {name} | {g} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any], plots: list[str], note: str | None = None) -> str:
    k = _k_label(report)
    head = ["arm", "round", "accuracy %", "95% CI", "n", f"pass@{k} %", f"maj@{k} %", "format errors %",
            "response tokens", "yield %", "tokens generated", "training tokens",
            *(f"{s} s" for s in TIME_COLUMNS)]
    lines = ["# exit-loop compare", "",
             "Accuracy is held-out greedy pass@1; round k's eval measures the policy that samples in "
             "round k (round 0: the starting student; the last round: the final checkpoint). "
             "Yield is correct traces / traces generated. — means the run holds no value.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for name, arm in report["arms"].items():
        for i, r in enumerate(arm["rounds"]):
            ci = arm["accuracy_ci95"][i]
            n = "—" if ci is None else _ci_n(arm, i)
            row = [name, str(r), _pct(arm["accuracy"][i]), "—" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]", n,
                   _pct(arm["pass@k"][i]), _pct(arm["maj@k"][i]),
                   _pct(arm["format_error_rate"][i]), _secs(arm["mean_response_tokens"][i]),
                   _pct(arm["yield"][i]), _int(arm["tokens_generated"][i]), _int(arm["training_tokens"][i]),
                   *(_secs(arm["wall_time_s"][s][i]) for s in TIME_COLUMNS)]
            lines.append("| " + " | ".join(row) + " |")
    if report.get("pooled"):
        lines += ["", "## Pooled over seeds", "",
                  "Mean held-out accuracy over the seeds, with a 95% interval from a two-level bootstrap "
                  "(seeds, then questions within a seed).", "",
                  "| arm | seeds | round | accuracy % | 95% CI |", "|---|---|---|---:|---|"]
        for name, pooled in report["pooled"].items():
            for r, acc, ci in zip(pooled["rounds"], pooled["accuracy"], pooled["accuracy_ci95"]):
                interval = "—" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]"
                lines.append(f"| {name} | {', '.join(map(str, pooled['seeds']))} | {r} | {_pct(acc)} | {interval} |")
    lines += over_seeds_lines(report)
    lines += group_lines(report)
    lines += ["", "## Training compute", "",
              "What each round's SFT optimised: arms compared on equal terms train the same steps "
              "(`train.budget`); rows and tokens are one epoch of the round's training data.", "",
              "| arm | round | optimizer steps | training rows | training tokens | epochs |",
              "|---|---|---:|---:|---:|---:|"]
    for name, arm in report["arms"].items():
        for i, r in enumerate(arm["rounds"][:-1]):  # the last round only evaluates
            epochs = arm["training_epochs"][i]
            lines.append(f"| {name} | {r} | {_int(arm['training_steps'][i])} | {_int(arm['training_rows'][i])} | "
                         f"{_int(arm['training_tokens'][i])} | {'—' if epochs is None else f'{epochs:.2f}'} |")
    lines += ["", "## Summary", ""]
    lines += [f"- {summary_line(name, arm)}" for name, arm in report["arms"].items()]
    if report.get("paired"):
        lines += ["", "## Paired differences", "",
                  "Accuracy of a minus accuracy of b on the same questions: 95% paired-bootstrap interval "
                  "over questions, exact McNemar p-value.", ""]
        lines += [f"- {line}" for line in paired_lines(report)]
    gains = [g for g in report.get("gains") or [] if "seeds" not in g]
    if gains:
        lines += ["", "## Gains over round 0", "",
                  "Each run's accuracy at a round minus its own round 0, on the same questions: 95% paired-bootstrap "
                  "interval, exact McNemar p-value.", ""]
        for g in gains:
            lo, hi = g["ci95"]
            seed = f", seed {g['seed']}" if g["seed"] is not None else ""
            lines.append(f"- {g['arm']}{seed}, round {g['round']} − round {g['from_round']}: {100 * g['diff']:+.1f} points "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p = {g['p_mcnemar']:.3g}, n = {g['n']}")
    if report.get("environments"):
        lines += ["", "## Environment", ""]
        for e in report["environments"]:
            which = "" if len(report["environments"]) == 1 else f" ({', '.join(e['runs'])})"
            lines.append(f"- {describe(e['environment'])}{which}")
    lines += ["", "## Runs", ""]
    lines += [f"- **{name}**: `{arm['run_dir']}` (experiment `{arm['experiment']}`)"
              for name, arm in report["arms"].items()]
    titles = {"accuracy.png": "Accuracy per round", "response_length.png": "Mean response tokens per round"}
    if plots or note:
        lines += ["", "## Plots", ""]
        lines += [f"![{titles[p]}]({p})\n" for p in plots]
        if note:
            lines.append(note)
    return "\n".join(lines).rstrip() + "\n"


def _plot(report: dict[str, Any], key: str, scale: float, ylabel: str, title: str, path: Path) -> Path:
    # Figure + the Agg canvas directly: no pyplot, so no global backend is chosen or changed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, arm in report["arms"].items():
        ys = [math.nan if v is None else v * scale for v in arm[key]]
        line, = ax.plot(arm["rounds"], ys, marker="o", label=name)
        ci = arm.get(f"{key}_ci95")
        if ci:  # the 95% interval as a band
            lo = [math.nan if c is None else c[0] * scale for c in ci]
            hi = [math.nan if c is None else c[1] * scale for c in ci]
            ax.fill_between(arm["rounds"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    _plot(report, "accuracy", 100, "accuracy (%)", "Held-out accuracy (greedy pass@1), 95% intervals",
          out_dir / "accuracy.png")
    _plot(report, "mean_response_tokens", 1, "mean response tokens", "Response length",
          out_dir / "response_length.png")
    return ["accuracy.png", "response_length.png"]


def default_out_dir(runs: list[Run], run_dirs: list[Path]) -> Path:
    """The experiment directory every run belongs to, else the first RUN_DIR."""
    exp = {_abspath(r.experiment_dir) if r.experiment_dir else None for r in runs}
    if len(exp) == 1 and None not in exp:
        return runs[0].experiment_dir  # type: ignore[return-value]
    return Path(run_dirs[0])


def compare(run_dirs: list[Path], out_dir: Path | None = None, allow_mismatch: bool = False) -> Path:
    """Read the runs, write report.json, the two PNGs and report.md to `out_dir`; return `out_dir`."""
    return _compare(run_dirs, out_dir, allow_mismatch)[0]


def _compare(run_dirs: list[Path], out_dir: Path | None, allow_mismatch: bool = False
             ) -> tuple[Path, dict[str, Any], list[str]]:
    runs = find_runs([Path(p) for p in run_dirs])
    report = build_report(runs, allow_mismatch)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(runs, run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    note = None
    try:
        plots = write_plots(report, out_dir)
    except ImportError:
        plots, note = [], "Plots not drawn: matplotlib is not installed (`pip install matplotlib`)."
        log.warning("compare: %s", note)
    atomic_write_text(out_dir / "report.md", render_markdown(report, plots, note))
    return out_dir, report, ["report.json", *plots, "report.md"]


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="exit-loop compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run directory (round_* inside) or an experiment directory (one run per arm)")
    p.add_argument("--output_dir", help="where the report goes (default: the runs' common experiment "
                                        "directory, else the first RUN_DIR)")
    p.add_argument("--allow_mismatch", action="store_true",
                   help="pair arms evaluated on different questions on the questions they share")
    a = p.parse_args(argv)
    out, report, written = _compare([Path(d) for d in a.run_dirs], Path(a.output_dir) if a.output_dir else None,
                                    a.allow_mismatch)
    for name, arm in report["arms"].items():
        print(summary_line(name, arm).replace("**", ""))
    for line in paired_lines(report, last_only=True):
        print(line)
    print(f"compare: wrote {', '.join(written)} in {out}")
    return 0
