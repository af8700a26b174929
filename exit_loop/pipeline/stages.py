"""The stages of a round, as `exit-loop run`, `exit-loop generate` and the SLURM jobs run them:
rollout (eval + sample, one engine for both), merge (shards into one samples file), verify,
filter, train. Each run-level entry (`rollout_stage`, `merge_stage`, `verify_stage`,
`filter_stage`, `train_stage`; `run_stage` by name) works in a `Run`'s directories and writes its
`manifest.json` last; the pieces below them (`draw`, `merge_shards`, `label`) take plain paths,
so a generation's one round (`exit_loop.pipeline.generate`) goes through the same code.

    exit-loop stage rollout runs/exit_gsm8k --arm main --round 0 --shard 3
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from exit_loop.baseline import baseline_row
from exit_loop.console import say, stage_log, train_progress
from exit_loop.errors import ConfigError, DataError
from exit_loop.evaluate import EvalConfig, evaluate
from exit_loop.filter import write_splits
from exit_loop.hub import route_push, stage_checkpoint, stage_splits, upload
from exit_loop.jsonl import iter_jsonl, write_json, write_jsonl, write_manifest
from exit_loop.pipeline.run import STAGES, ExperimentConfig, Run
from exit_loop.pipeline.track import sft_tracking
from exit_loop.sample import HFBackend, SampleConfig, Sampled, VLLMBackend, sample, start_backend
from exit_loop.tasks import Problem, load_problems
from exit_loop.train import TrainConfig, train
from exit_loop.verify import count_lines, read_samples, verify_rows, with_progress


def wall(t0: float) -> dict[str, float]:
    """A manifest's timings: the wall time since `t0` (time.monotonic())."""
    return {"wall_s": round(time.monotonic() - t0, 3)}


# --------------------------------------------------------------------------- pieces (plain paths)


def draw(cfg: SampleConfig, problems: list[Problem], samples_file: Path, shard_file: Callable[[int], Path],
         shard: int | None = None, backend: VLLMBackend | HFBackend | None = None,
         hint: str = "") -> Sampled | None:
    """Sample every problem `cfg.num_samples` times. Unsharded: into `samples_file`. With
    `cfg.num_shards` > 1: into the shard files, either every shard with one engine and then merged
    into `samples_file` (`shard` None), or only `shard` (None returned: the merge comes later).
    `backend` is used where given (and left open); else one is started only if there is work."""
    n = cfg.num_shards
    if n == 1:
        return sample(cfg, problems, samples_file, backend)
    owned = backend is None and shard is None and bool(problems)
    backend = start_backend(cfg) if owned else backend
    try:
        for i in (range(n) if shard is None else [shard]) if problems else []:
            sample(replace(cfg, shard_id=i), problems, shard_file(i), backend)
    finally:
        if owned:
            backend.close()  # type: ignore[union-attr]
    if shard is not None:
        return None
    return merge_shards([shard_file(i) for i in range(n)], problems, cfg.num_samples, samples_file, hint)


def merge_shards(paths: list[Path], problems: list[Problem], num_samples: int, out: Path,
                 hint: str = "") -> Sampled:
    """The shard files' rows as one samples file, by question (in `problems` order) and then
    sample index; refuses (DataError, ending with `hint`) while a shard file or any (question,
    sample) pair is missing."""
    where = paths[0].parent if paths else out.parent
    absent = [i for i, path in enumerate(paths) if not path.exists()]
    if absent:
        raise DataError(f"{where}: shard(s) {absent} of {len(paths)} missing; {hint or 'run them first'}")
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        for row in iter_jsonl(path, required=("problem_id", "sample_index", "response")):
            found.setdefault((row["problem_id"], row["sample_index"]), row)
    want = [(p.id, j) for p in problems for j in range(num_samples)]
    missing = [key for key in want if key not in found]
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(want)} samples missing (first: {missing[0]}); "
                        f"{hint or 'run the unfinished shards'}")
    rows = [found[key] for key in want]
    write_jsonl(out, rows)
    print(f"merge: {len(rows)} samples from {len(paths)} shards -> {out}", flush=True)
    return Sampled(out, len(rows), sum(r.get("num_tokens", 0) for r in rows))


def label(samples_file: Path, task: str) -> Iterator[dict[str, Any]]:
    """The verifier's labelled rows of a samples file, streamed."""
    return verify_rows(read_samples(samples_file, task), task=task)


def sample_manifest(directory: Path, t0: float, model: str, problems: list[Problem], sampled: Sampled,
                    **extra: Any) -> None:
    write_manifest(directory, "sample", wall(t0), model=model, questions=len(problems), **extra,
                   counts={"samples": sampled.samples, "tokens_generated": sampled.tokens})


# --------------------------------------------------------------------------- a run's stages


def select_questions(run: Run, arm: str, k: int, problems: list[Problem]) -> list[Problem]:
    """Which training questions round k samples, from the labels of earlier rounds."""
    pol = run.cfg.policy
    if pol.questions == "all" or k == 0:
        return problems
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    rounds = range(k) if pol.questions == "unsolved" else [k - 1]
    for j in rounds:
        path = run.real_dir(arm, j, "verify") / "verified.jsonl"
        if not path.exists():
            continue
        for row in iter_jsonl(path):
            total[row["problem_id"]] += 1
            correct[row["problem_id"]] += bool(row["is_correct"])
    if pol.questions == "unsolved":
        return [p for p in problems if correct[p.id] == 0]
    lo, hi = pol.band
    return [p for p in problems if total[p.id] == 0 or lo <= correct[p.id] / total[p.id] <= hi]


def round_questions(run: Run, arm: str, k: int) -> list[Problem]:
    return select_questions(run, arm, k, load_problems(run.cfg.data))


MERGE_HINT = "run the unfinished shards (exit-loop stage rollout --shard I)"


def rollout_stage(run: Run, arm: str, k: int, shard: int | None = None) -> None:
    """eval and sample of round k; one engine serves both when they use the same model. The
    engine's start and stop count in the stage that uses it first and last. With shards, every
    shard is drawn and then merged; `shard` draws only that one (shard 0 also evaluates) and
    leaves the merge to `merge_stage`."""
    cfg = run.cfg
    n = cfg.sample.num_shards
    if shard is not None and not 0 <= shard < n:
        raise ConfigError(f"--shard {shard}: sample.num_shards is {n}; expected 0 to {n - 1}")
    need_eval = not run.done(arm, k, "eval") and shard in (None, 0)
    need_sample = k < cfg.rounds and not run.done(arm, k, "sample") and cfg.arms[arm].split != "original"
    base = replace(cfg.sample, seed=cfg.seed + k, round=k)
    backend = None
    try:
        if need_eval:
            ecfg = EvalConfig(output_dir=str(run.real_dir(arm, k, "eval")), data=cfg.eval.data,
                              sample=replace(base, model_name=run.policy(arm, k)), k=cfg.eval.k,
                              k_temperature=cfg.eval.k_temperature)
            t0 = time.monotonic()
            if need_sample and run.sampler_model(arm, k) == run.policy(arm, k):
                backend = start_backend(ecfg.sample)
            evaluate(ecfg, backend, started_at=t0)
        if need_sample:
            t0 = time.monotonic()
            d = run.real_dir(arm, k, "sample")
            scfg = replace(base, model_name=run.sampler_model(arm, k))
            problems = round_questions(run, arm, k)
            if backend is None and problems and n == 1:
                backend = start_backend(scfg)
            sampled = draw(scfg, problems, d / "samples.jsonl", lambda i: run.sample_shard(arm, k, i), shard,
                           backend, MERGE_HINT)
            if backend is not None:  # the engine's stop counts in the sample stage's wall time
                backend.close()
                backend = None
            if sampled is not None:
                sample_manifest(d, t0, scfg.model_name, problems, sampled,
                                **({"shards": n} if n > 1 else {}))
    finally:
        if backend is not None:
            backend.close()


def merge_stage(run: Run, arm: str, k: int) -> None:
    """Round k's shard files as one samples.jsonl and the sample manifest."""
    if run.done(arm, k, "sample"):
        return
    t0 = time.monotonic()
    n = run.cfg.sample.num_shards
    problems = round_questions(run, arm, k)
    d = run.real_dir(arm, k, "sample")
    sampled = merge_shards([run.sample_shard(arm, k, i) for i in range(n)], problems, run.cfg.sample.num_samples,
                           d / "samples.jsonl", MERGE_HINT)
    sample_manifest(d, t0, run.sampler_model(arm, k), problems, sampled, shards=n)


def verify_stage(run: Run, arm: str, k: int) -> None:
    t0 = time.monotonic()
    d = run.real_dir(arm, k, "verify")
    src = run.real_dir(arm, k, "sample") / "samples.jsonl"
    out = write_jsonl(d / "verified.jsonl", with_progress(label(src, run.cfg.data.task), count_lines(src),
                                                          d / "verified.jsonl"))
    write_manifest(d, "verify", wall(t0), input=str(src), output=str(out))


def filter_stage(run: Run, arm: str, k: int) -> dict[str, Any] | None:
    """The round's splits (or, for an `original` arm, the data set's own solutions); returns
    the filter's summary (None for `original`)."""
    t0 = time.monotonic()
    cfg = run.cfg
    d = run.stage_dir(arm, k, "filter")
    if cfg.arms[arm].split == "original":
        problems = load_problems(cfg.data)
        write_jsonl(d / "sft_original.jsonl", (baseline_row(p) for p in problems))
        write_manifest(d, "filter", wall(t0), split="original", rows=len(problems))
        return None
    src = run.real_dir(arm, k, "verify") / "verified.jsonl"
    summary = write_splits(iter_jsonl(src), replace(cfg.filter, input=str(src), output_dir=str(d)),
                           allow_empty=True)  # empty: every question already solved
    if cfg.filter.push_to_hub:  # before the manifest: a failed upload is tried again on resume
        repo = cfg.filter.push_to_hub
        staged = stage_splits(run.root / "hub" / repo.split("/")[1], hub_name(run, arm, k),
                              d / cfg.filter.correct_name, d / cfg.filter.all_name)
        say(f"filter: pushed {hub_name(run, arm, k)} to {upload(staged, repo, 'dataset', f'{arm} round {k}')}")
    write_manifest(d, "filter", wall(t0), split=cfg.arms[arm].split)
    return summary


def train_split(run: Run, arm: str, k: int) -> Path:
    d = run.stage_dir(arm, k, "filter")
    split = run.cfg.arms[arm].split
    if split == "original":
        return d / "sft_original.jsonl"
    return d / (run.cfg.filter.correct_name if split == "correct" else run.cfg.filter.all_name)


def train_config(run: Run, arm: str, k: int) -> TrainConfig:
    cfg = run.cfg
    rounds = range(k + 1) if cfg.policy.data_window == "all" else [k]
    data = [str(train_split(run, arm, j)) for j in rounds]
    data = [p for p in data if Path(p).stat().st_size > 0]
    model = cfg.student if cfg.policy.retrain_from == "base" else run.policy(arm, k)
    tracked, _ = sft_tracking(run, arm, k)  # report_to and run_name, under what train.sft sets
    sft, _ = route_push(cfg.train.sft, cfg.train.hub_model_id)  # the merged ckpt/ is pushed, not trainer/
    return TrainConfig(data=data or [str(train_split(run, arm, k))], model=model,
                       output_dir=str(run.stage_dir(arm, k, "train")),
                       num_examples=cfg.arms[arm].num_examples, seed=cfg.seed,
                       use_chat_template=cfg.train.use_chat_template, peft=cfg.train.peft,
                       sft={**tracked, **sft}, trust_remote_code=cfg.sample.trust_remote_code)


def train_stage(run: Run, arm: str, k: int) -> None:
    tcfg = train_config(run, arm, k)
    if all(Path(p).stat().st_size == 0 for p in tcfg.data):
        # no correct trace at all: the policy carries over unchanged (recorded, not hidden)
        out = Path(tcfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if (out / "ckpt").exists() or (out / "ckpt").is_symlink():
            (out / "ckpt").unlink()
        os.symlink(os.path.abspath(tcfg.model), out / "ckpt")
        write_json(out / "manifest.json", {"stage": "train", "skipped": "no training rows",
                                           "model": tcfg.model, "examples": 0, "tokens": 0})
        say(f"train: no training rows in round {k}; the policy carries over")
        return
    os.environ.update(sft_tracking(run, arm, k)[1])  # where transformers' tracker callbacks write
    train(tcfg, callbacks=[train_progress()])
    repo = hub_settings(run.cfg)["train.hub_model_id"]
    if repo:
        staged = stage_checkpoint(run.root / "hub" / repo.split("/")[1] / hub_name(run, arm, k, "-"),
                                  Path(tcfg.output_dir) / "ckpt", run.cfg.student, hub_name(run, arm, k, "-"))
        url = upload(staged, repo, "model", f"{arm} round {k}", revision=hub_name(run, arm, k, "-"))
        say(f"train: pushed the checkpoint to {url}")


def hub_name(run: Run, arm: str, k: int, sep: str = "_") -> str:
    """Round k's name on the hub: its dataset config (round_00, <arm>_round_00) or model
    revision (round_00, <arm>-round_00)."""
    return f"round_{k:02d}" if not run.multi else f"{arm}{sep}round_{k:02d}"


def hub_settings(cfg: ExperimentConfig) -> dict[str, str | None]:
    """The run's settings that need the hub, by config key (exit_loop.hub.check_hub)."""
    return {"filter.push_to_hub": cfg.filter.push_to_hub,
            "train.hub_model_id": route_push(cfg.train.sft, cfg.train.hub_model_id)[1]}


def run_stage(run: Run, name: str, arm: str, k: int, shard: int | None = None) -> None:
    """Run one stage in this process (the `exit-loop stage` command and the cheap stages), other
    libraries' output in the stage directory's stage.log (rollout: eval's; merge: sample's)."""
    where = {"rollout": "eval", "merge": "sample"}.get(name, name)
    with stage_log(run.real_dir(arm, k, where)):
        _run_stage(run, name, arm, k, shard)
    for stage in STAGES:
        run.link(arm, k, stage)


def _run_stage(run: Run, name: str, arm: str, k: int, shard: int | None) -> None:
    if name == "rollout":
        rollout_stage(run, arm, k, shard)
    elif name == "merge":
        merge_stage(run, arm, k)
    elif name == "verify":
        if not run.done(arm, k, "verify"):
            verify_stage(run, arm, k)
    elif name == "filter":
        if not run.done(arm, k, "filter"):
            filter_stage(run, arm, k)
    elif name == "train":
        train_stage(run, arm, k)
    else:
        raise ValueError(f"unknown stage {name!r}")
