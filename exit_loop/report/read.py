"""Reading finished runs for the report: which arm runs the given paths hold (`find_runs`), and
each one's numbers per round (`read_run`), its held-out verdicts per question (`read_outcomes`),
environment and eval settings. Only reads: nothing under a run directory is written.

A value a run does not hold is None, never estimated; a value that is there but malformed is a
DataError naming the file and key.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exit_loop.config import flatten
from exit_loop.errors import DataError
from exit_loop.jsonl import iter_jsonl_numbered
from exit_loop.rundir import (EVAL, GREEDY, MANIFEST, SUMMARY, TIME_COLUMNS, VERIFIED, round_dirs, round_name,
                              seed_dirs, seed_name)
from exit_loop.verify import verify_rows

EVAL_FRACTIONS = ("accuracy", "pass@k", "maj@k", "format_error_rate")


@dataclass
class FoundRun:
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
    return ((path / "config.yaml").is_file() and not round_dirs(path)
            and any((d / "run.json").is_file() for d in path.iterdir() if d.is_dir()))


def _unique_names(runs: list[FoundRun]) -> None:
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


def find_runs(run_dirs: list[Path]) -> list[FoundRun]:
    """The arm runs under the given paths, in order, each once, with unique names (an experiment
    with several seeds: one run per arm and seed, named `arm/seed_<s>`)."""
    if not run_dirs:
        raise DataError("no RUN_DIR given; expected at least one run or experiment directory")
    found: list[tuple[Path, Path | None, int | None]] = []
    for given in map(Path, run_dirs):
        if not given.is_dir():
            raise DataError(f"{given}: no such directory; expected a run directory (with round_* "
                            "directories) or an experiment directory (with one run per arm)")
        if round_dirs(given):
            parent = _abspath(given).parent
            found.append((given, parent if _is_experiment_dir(parent) else None, None))
            continue
        seeds = seed_dirs(given)
        for seed, d in seeds or [(None, given)]:
            if round_dirs(d):  # one arm, several seeds
                found.append((d, given, seed))
                continue
            arms = sorted(a for a in d.iterdir() if a.is_dir() and (a / "run.json").is_file())
            if not arms:
                raise DataError(f"{d}: holds no round_* directories and no arm directories (with "
                                "run.json); expected a run directory or an experiment directory")
            found += [(arm, given, seed) for arm in arms]

    runs: list[FoundRun] = []
    seen: set[Path] = set()
    for path, experiment_dir, seed in found:
        if _abspath(path) in seen:  # named twice (an arm and its experiment): report it once
            continue
        seen.add(_abspath(path))
        info = _read_json(path / "run.json")
        arm = _get(info, "arm")
        name = arm if isinstance(arm, str) and arm else _abspath(path).name
        runs.append(FoundRun(path=path, arm=name, experiment=_experiment_name(path, info, experiment_dir),
                        experiment_dir=experiment_dir, info=info, seed=seed, base_arm=name))
    _unique_names(runs)
    for r in runs:
        r.base_arm = r.arm
        if r.seed is not None:
            r.arm = f"{r.arm}/{seed_name(r.seed)}"
    return runs


def _wall_s(manifest: dict[str, Any] | None, path: Path) -> float | None:
    """A stage's wall time: its manifest's `timings.wall_s` (jsonl.write_manifest, every stage)."""
    return _number(_get(manifest, "timings", "wall_s"), path, "timings.wall_s")


# diversity across rounds (what ReST-EM's over-fitting and RFT's plateau come from): per question
# the distinct final answers and distinct responses among its samples, and the share of a round's
# training rows that an earlier round already trained on
DIVERSITY = ("distinct_answers", "distinct_traces", "repeated_training_share")


def sample_diversity(path: Path) -> tuple[float, float, set[str]] | None:
    """A round's verified samples: the mean number of distinct final answers (`predicted`, no
    answer counting as one) and of distinct responses per question, and the questions solved (a
    sample verified correct); None without the file."""
    if not path.is_file():
        return None
    answers: dict[str, set[Any]] = {}
    traces: dict[str, set[Any]] = {}
    solved: set[str] = set()
    for _, row in iter_jsonl_numbered(path, required=("problem_id",)):
        q = str(row["problem_id"])
        answers.setdefault(q, set()).add(row.get("predicted"))
        traces.setdefault(q, set()).add(row.get("response"))
        if row.get("is_correct") is True:
            solved.add(q)
    if not answers:
        return None
    return (round(sum(map(len, answers.values())) / len(answers), 4),
            round(sum(map(len, traces.values())) / len(traces), 4), solved)


def training_rows(manifest: dict[str, Any] | None) -> set[tuple[Any, Any]] | None:
    """The distinct (prompt, response) rows a round trained on, from the files its train manifest
    names (`data`); None where it names none or one is gone."""
    files = _get(manifest, "data")
    if not isinstance(files, list) or not files:
        return None
    out: set[tuple[Any, Any]] = set()
    for f in files:
        path = Path(f["path"]) if isinstance(f, dict) and isinstance(f.get("path"), str) else None
        if path is None or not path.is_file():
            return None
        out.update((row.get("prompt"), row.get("response")) for _, row in iter_jsonl_numbered(path))
    return out


def read_run(run: FoundRun) -> dict[str, Any]:
    """One arm's numbers per round: lists indexed by round, null where the run holds nothing."""
    rounds_dirs = round_dirs(run.path)
    if not rounds_dirs:
        raise DataError(f"{run.path}: holds no round_* directories; expected round_00/, round_01/, ...")
    run_json = run.path / "run.json"
    planned = _number(_get(run.info, "rounds"), run_json, "rounds", integer=True)
    last = max(max(rounds_dirs), planned if planned is not None else 0)
    rounds = list(range(last + 1))

    arm: dict[str, Any] = {key: [] for key in (*EVAL_FRACTIONS, "n", "mean_response_tokens", "k", "yield",
                                               "tokens_generated", "training_tokens", "training_steps",
                                               "training_rows", "training_epochs", *DIVERSITY,
                                               "newly_solved", "rationalized")}
    arm["wall_time_s"] = {stage: [] for stage in TIME_COLUMNS}
    seen: set[tuple[Any, Any]] = set()  # every earlier round's training rows
    ever_solved: set[str] = set()       # training questions an earlier round's samples solved
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

        hinted = _get(summary, "hinted")  # this arm trained on a rationalization's rows
        arm["rationalized"].append(None if hinted is None else _number(
            _get(hinted, "correct_split_rows"), path, "hinted.correct_split_rows", integer=True))
        path = d / "sample" / MANIFEST
        manifest = _read_json(path)
        generated = _number(_get(manifest, "counts", "tokens_generated"), path, "counts.tokens_generated", integer=True)
        if hinted is not None and generated is not None:  # its hinted draws are its cost too
            generated += _number(_get(manifest, "hinted", "tokens_generated"), path, "hinted.tokens_generated",
                                 integer=True) or 0
        arm["wall_time_s"]["sample"].append(_wall_s(manifest, path))

        path = d / "train" / MANIFEST
        manifest = _read_json(path)
        if generated is None and _get(manifest, "kind") == "grpo":  # it generates while it trains
            generated = _number(_get(manifest, "counts", "tokens_generated"), path, "counts.tokens_generated",
                                integer=True)
        arm["tokens_generated"].append(generated)
        arm["training_tokens"].append(_number(_get(manifest, "tokens"), path, "tokens", integer=True))
        arm["training_steps"].append(_number(_get(manifest, "steps"), path, "steps", integer=True))
        arm["training_rows"].append(_number(_get(manifest, "trained_examples"), path, "trained_examples",
                                            integer=True) if _get(manifest, "skipped") is None else 0)
        arm["training_epochs"].append(_number(_get(manifest, "epochs"), path, "epochs"))
        arm["wall_time_s"]["train"].append(_wall_s(manifest, path))

        answers, traces, solved = sample_diversity(d / "verify" / VERIFIED) or (None, None, None)
        arm["distinct_answers"].append(answers)
        arm["distinct_traces"].append(traces)
        arm["newly_solved"].append(None if solved is None else len(solved - ever_solved))
        ever_solved |= solved or set()
        trained = training_rows(manifest)
        arm["repeated_training_share"].append(round(len(trained & seen) / len(trained), 4) if trained else None)
        seen |= trained or set()

        for stage in ("verify", "filter", "eval"):
            path = d / stage / MANIFEST
            arm["wall_time_s"][stage].append(_wall_s(_read_json(path), path))

    timings = _get(run.info, "timings")
    if timings is not None:
        if not isinstance(timings, dict):
            raise DataError(f"{run_json}: key 'timings' is {timings!r}; expected an object of seconds")
        timings = {key: _number(v, run_json, f"timings.{key}") for key, v in timings.items()}
    arm.update(rounds=rounds, run_dir=str(run.path), experiment=run.experiment, timings=timings)
    return arm


def _labelled_rows(path: Path) -> list[dict[str, Any]]:
    """An eval file's rows, labelled by the verifier here (with the eval's task) where they carry
    no verdict."""
    rows = [row for _, row in iter_jsonl_numbered(path, required=("problem_id",))]
    if rows and any("is_correct" not in row for row in rows):  # raw generations: label them
        manifest = _read_json(path.parent / MANIFEST)
        task = _get(manifest, "config", "data", "task") or "gsm8k"
        rows = list(verify_rows(rows, task=task))
    return rows


def read_pass_rates(run: FoundRun) -> dict[str, float] | None:
    """Each held-out question's pass rate among round 0's sampled eval generations
    (`eval/samples_k.jsonl`, `eval.n` a question): how hard the starting student found it. None
    where round 0 drew no samples (eval.n and eval.k unset)."""
    d = round_dirs(run.path).get(0)
    path = d / "eval" / "samples_k.jsonl" if d is not None else None
    if path is None or not path.is_file():
        return None
    per: dict[str, list[bool]] = {}
    for row in _labelled_rows(path):
        per.setdefault(str(row["problem_id"]), []).append(row["is_correct"] is True)
    return {pid: sum(v) / len(v) for pid, v in per.items()} or None


def read_outcomes(run: FoundRun, rounds: list[int]
                  ) -> tuple[list[dict[str, bool] | None], dict[str, str], dict[str, dict[str, str]]]:
    """Per round, each held-out question's greedy verdict (problem_id -> is_correct), from
    `eval/greedy.jsonl` (labelled by the verifier here, with the eval's task, where its rows carry
    no verdict); None where the round holds no generations. And each question's group, where
    the rows carry one (`data.group_by`), and per further key of group_by (the rows' `groups`)
    each question's value."""
    rounds_dirs = round_dirs(run.path)
    out: list[dict[str, bool] | None] = []
    groups: dict[str, str] = {}
    further: dict[str, dict[str, str]] = {}
    for k in rounds:
        path = rounds_dirs.get(k, run.path / round_name(k)) / "eval" / GREEDY
        if not path.is_file():
            out.append(None)
            continue
        rows = _labelled_rows(path)
        out.append({str(row["problem_id"]): row["is_correct"] is True for row in rows})
        for row in rows:
            pid = str(row["problem_id"])
            if row.get("group") is not None:
                groups[pid] = str(row["group"])
            for key, value in (row.get("groups") or {}).items():
                further.setdefault(str(key), {})[pid] = str(value)
    return out, groups, further


def run_environment(run: FoundRun) -> dict[str, Any] | None:
    """The environment (versions, CPU and its ISA, GPU) a run's first recorded eval ran in."""
    for _, d in sorted(round_dirs(run.path).items()):
        env = _get(_read_json(d / "eval" / MANIFEST), "environment")
        if isinstance(env, dict):
            return env
    return None


# What an eval's manifest config may differ in between arms: which model and round it measured, and
# where it ran (engine placement; `sample.server`, which an in-process eval never uses, and which
# manifests written before it existed lack).
_EVAL_OWN = {"output_dir", "sample.model_name", "sample.round", "sample.seed", "sample.student",
             "sample.gpu_device", "sample.num_shards", "sample.shard_id", "sample.hf_batch_size",
             "sample.gpu_memory_utilization", "sample.engine", "sample.server"}


def eval_settings(run: FoundRun) -> dict[str, Any]:
    """The eval settings of a run's first evaluated round (its manifest's config, flattened),
    less what may differ between arms (the model, the round, engine placement)."""
    for d in sorted(round_dirs(run.path).items()):
        manifest = _read_json(d[1] / "eval" / MANIFEST)
        config = _get(manifest, "config")
        if isinstance(config, dict):
            return {k: v for k, v in flatten(config).items()
                    if k not in _EVAL_OWN and not k.startswith(("sample.engine.", "sample.server."))}
    return {}


def check_eval_settings(runs: list[FoundRun], allow_mismatch: bool = False) -> None:
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


def default_out_dir(runs: list[FoundRun], run_dirs: list[Path]) -> Path:
    """The experiment directory every run belongs to, else the first RUN_DIR."""
    exp = {_abspath(r.experiment_dir) if r.experiment_dir else None for r in runs}
    if len(exp) == 1 and None not in exp:
        return runs[0].experiment_dir  # type: ignore[return-value]
    return Path(run_dirs[0])


