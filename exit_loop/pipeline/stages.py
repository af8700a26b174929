"""The stages of a round, as `exit-loop run`, `exit-loop generate` and the SLURM jobs run them:
rollout (eval + sample, one engine for both), merge (shards into one samples file), verify,
filter, train. Each run-level entry (`rollout_stage`, `merge_stage`, `verify_stage`,
`filter_stage`, `train_stage`; `run_stage` by name) works in a `Run`'s directories and writes its
`manifest.json` last; the pieces below them (`draw`, `merge_shards`, `label`) take plain paths,
so a generation's one round (`exit_loop.pipeline.generate`) goes through the same code.

    exit-loop stage rollout runs/exit_gsm8k --arm main --round 0 --shard 3
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from exit_loop.baseline import baseline_row
from exit_loop.console import say, stage_log, train_progress
from exit_loop.errors import ConfigError, DataError, NothingToTrain
from exit_loop.evaluate import EvalConfig, draw_eval, eval_draws, evaluate, score
from exit_loop.filter import write_splits
from exit_loop.hub import route_push, stage_checkpoint, stage_splits, upload
from exit_loop.jsonl import iter_jsonl, write_jsonl, write_manifest
from exit_loop.prompts import HINTED_CONTEXT
from exit_loop.rundir import SAMPLES, SAMPLES_HINTED, STAGES, VERIFIED, VERIFIED_HINTED, round_name
from exit_loop.pipeline.parallel import data_parallel, run_plan
from exit_loop.pipeline.rollout import Draw, plan, same_engine, shard_draws
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.pipeline.track import sft_tracking
from exit_loop.sample import SampleConfig, SamplerBackend, Sampled, generated_tokens, sample, start_backend
from exit_loop.tasks import Problem, load_problems
from exit_loop.train import TrainConfig, train
from exit_loop.train.grpo import GRPORound, train_grpo
from exit_loop.verify import count_lines, read_samples, verify_rows, with_progress


def wall(t0: float) -> dict[str, float]:
    """A manifest's timings: the wall time since `t0` (time.monotonic())."""
    return {"wall_s": round(time.monotonic() - t0, 3)}


# --------------------------------------------------------------------------- pieces (plain paths)


def draw(cfg: SampleConfig, problems: list[Problem], samples_file: Path, shard_dir: Path,
         shard: int | None = None, backend: SamplerBackend | None = None,
         hint: str = "") -> Sampled | None:
    """Sample every problem `cfg.num_samples` times. Unsharded: into `samples_file`. With
    `cfg.num_shards` > 1: into the shard files in `shard_dir`, either every shard on one engine and
    then merged into `samples_file` (`shard` None), or only `shard` (None returned: the merge comes
    later). `backend` is used where given (and left open); else one is started only if there is
    work. With `shard` and `backend` None and `cfg.data_parallel` > 1 (or unset on a node with
    several GPUs), the shards (num_shards, or one per engine) are drawn by that many engine
    processes at once (`exit_loop.pipeline.parallel`) and merged."""
    engines = data_parallel(cfg) if shard is None and backend is None and problems else 1
    if cfg.num_shards == 1 and engines == 1:
        return sample(cfg, problems, samples_file, backend)
    draws = shard_draws(cfg, engines, shard_dir)
    if problems:
        run_plan(plan([draws if shard is None else [draws[shard]]], engines), {"sample": problems}, cfg,
                 shard_dir.parent / "workers", backend)
    if shard is not None:
        return None
    return merge_shards([d.path for d in draws], problems, cfg.num_samples, samples_file, hint)


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
    say(f"merge: {len(rows)} samples from {len(paths)} shards -> {out}")
    return Sampled(out, len(rows), sum(generated_tokens(r) for r in rows))


def label(samples_file: Path, task: str) -> Iterator[dict[str, Any]]:
    """The verifier's labelled rows of a samples file, streamed."""
    return verify_rows(read_samples(samples_file, task), task=task)


def rationalize(cfg: SampleConfig, problems: list[Problem], samples_file: Path, task: str, num_samples: int,
                backend: SamplerBackend | None = None) -> tuple[int, Sampled]:
    """STaR's rationalization (Zelikman et al. 2022, 3.2): the problems that none of
    `samples_file`'s samples solved (labelled here by `task`'s verifier), drawn again `num_samples`
    times with the ground truth as a hint in the prompt (`sample.hint`), into SAMPLES_HINTED beside
    it; their rows keep the plain prompt and say `hinted: true`. Returns how many problems that was
    and what was drawn (resumes like any draw)."""
    solved = {row["problem_id"] for row in label(samples_file, task) if row["is_correct"]}
    unsolved = [p for p in problems if p.id not in solved]
    hcfg = replace(cfg, hint=True, num_samples=num_samples, num_shards=1, shard_id=0)
    d = samples_file.parent
    hinted = draw(hcfg, unsolved, d / SAMPLES_HINTED, d / "hinted_shards", None, backend, "run the same stage again")
    assert hinted is not None  # shard None: drawn and merged
    return len(unsolved), hinted


def sample_manifest(directory: Path, timings: dict[str, float], model: str, questions: int, sampled: Sampled,
                    hinted: tuple[int, Sampled] | None = None, **extra: Any) -> None:
    """The sample stage's manifest; `hinted`: a rationalization's questions and draw (counted
    apart: the arms that do not rationalize never see them)."""
    counts = {"samples": sampled.samples, "tokens_generated": sampled.tokens}
    if hinted is not None:
        extra["hinted"] = {"questions": hinted[0], "samples": hinted[1].samples,
                           "tokens_generated": hinted[1].tokens, "file": str(hinted[1].path),
                           "context": HINTED_CONTEXT}
    write_manifest(directory, "sample", timings, model=model, questions=questions, **extra, counts=counts)


# --------------------------------------------------------------------------- a run's stages


def select_questions(run: Run, arm: str, k: int, problems: list[Problem]) -> list[Problem]:
    """Which training questions round k samples, from the labels of earlier rounds."""
    pol = run.cfg.policy
    if pol.questions == "all" or k == 0:
        return problems
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    if pol.questions == "unsolved":  # solved in any earlier round: out
        for j in range(k):
            for row in _labels(run, arm, j):
                correct[row["problem_id"]] += bool(row["is_correct"])
        return [p for p in problems if correct[p.id] == 0]
    # band: each question's pass rate in the most recent round that sampled it (a question left
    # out of round k-1 keeps the rate that left it out, rather than coming back every other round)
    for j in range(k - 1, -1, -1):
        here: dict[str, list[bool]] = defaultdict(list)
        for row in _labels(run, arm, j):
            here[row["problem_id"]].append(bool(row["is_correct"]))
        for pid, oks in here.items():
            if pid not in total:
                total[pid], correct[pid] = len(oks), sum(oks)
    lo, hi = pol.band
    return [p for p in problems if total[p.id] == 0 or lo <= correct[p.id] / total[p.id] <= hi]


def _labels(run: Run, arm: str, k: int) -> Iterator[dict[str, Any]]:
    path = run.real_dir(arm, k, "verify") / VERIFIED
    return iter_jsonl(path) if path.exists() else iter(())


def round_questions(run: Run, arm: str, k: int) -> list[Problem]:
    return select_questions(run, arm, k, load_problems(run.cfg.data))


MERGE_HINT = "run the unfinished shards (exit-loop stage rollout --shard I)"


def rollout_stage(run: Run, arm: str, k: int, shard: int | None = None) -> None:
    """eval and sample of round k; one engine serves both when they use the same model and backend
    (`exit_loop.pipeline.rollout.same_engine`): the greedy eval, the round's samples (and hinted
    samples), then the eval's sampled draws (`eval.n`), so that measuring more never changes what a
    round trains on. The engine's start and stop count in the stage that uses it first and last. With shards, every shard is drawn and then merged; `shard` draws only
    that one (shard 0 also evaluates) and leaves the merge to `merge_stage`."""
    cfg = run.cfg
    n = cfg.sample.num_shards
    if shard is not None and not 0 <= shard < n:
        raise ConfigError(f"--shard {shard}: sample.num_shards is {n}; expected 0 to {n - 1}")
    need_eval = not run.done(arm, k, "eval") and shard in (None, 0)
    need_sample = k < cfg.rounds and not run.done(arm, k, "sample") and cfg.arms[arm].samples
    base = replace(cfg.sample, seed=cfg.seed + k, round=k)
    if shard is None and (need_eval or need_sample) and (dp := data_parallel(base)) > 1:
        return parallel_rollout(run, arm, k, need_eval, need_sample, dp)
    backend = None
    scfg = run.sampler_config(arm, k)
    ecfg = eval_config(run, arm, k)
    deferred = 0.0  # with one engine for both: the eval's seconds so far, its sampled draws still to come
    try:
        if need_eval:
            t0 = time.monotonic()
            if need_sample and same_engine(scfg, ecfg.sample):
                backend = start_backend(ecfg.sample)  # one engine for both (never a teacher's server)
            if backend is not None and ecfg.samples:
                # greedy now, the sampled metrics after the round's samples: they draw from the engine's
                # random stream, and what is measured must not change what the round trains on
                draw_eval(ecfg, backend, ("greedy",))
                deferred = time.monotonic() - t0
            else:
                evaluate(ecfg, backend, started_at=t0)
        if need_sample:
            t0 = time.monotonic()
            d = run.real_dir(arm, k, "sample")
            problems = round_questions(run, arm, k)
            if backend is None and problems and n == 1:  # one engine here: draw would ask the sampler's
                backend = start_backend(scfg)            # own data_parallel (a teacher's may differ)
            sampled = draw(scfg, problems, d / SAMPLES, d / "shards", shard, backend, MERGE_HINT)
            hinted = hinted_draw(run, arm, k, scfg, problems, d, backend) if sampled is not None else None
            if backend is not None and not deferred:  # the engine's stop counts in the stage that used it last
                backend.close()
                backend = None
            if sampled is not None:
                sample_manifest(d, wall(t0), scfg.model_name, len(problems), sampled, hinted,
                                **({"shards": n} if n > 1 else {}))
        if deferred:
            t0 = time.monotonic()
            draw_eval(ecfg, backend)  # the sampled draws (the greedy one is complete)
            backend.close()
            backend = None
            score(ecfg, deferred + time.monotonic() - t0)
    finally:
        if backend is not None:
            backend.close()


def hinted_draw(run: Run, arm: str, k: int, scfg: SampleConfig, problems: list[Problem], d: Path,
                backend: SamplerBackend | None = None) -> tuple[int, Sampled] | None:
    """Round k's rationalization where it has one (`Run.rationalizes`), once its samples are all
    drawn: with the sampler of the round, `policy.rationalize_samples` per unsolved question."""
    if not run.rationalizes(arm, k, "sample"):
        return None
    pol = run.cfg.policy
    return rationalize(scfg, problems, d / SAMPLES, run.cfg.data.task,
                       pol.rationalize_samples or scfg.num_samples, backend)


def eval_config(run: Run, arm: str, k: int) -> EvalConfig:
    """Round k's eval of the policy: the student's engine settings with the eval's own sampling
    settings (`eval.sample`), none of training's sampling keys."""
    cfg = run.cfg
    es = cfg.eval.sample
    return EvalConfig(output_dir=str(run.real_dir(arm, k, "eval")), data=cfg.eval.data,
                      sample=replace(cfg.sample, seed=cfg.seed + k, round=k, model_name=run.policy(arm, k),
                                     max_tokens=es.max_tokens, top_p=es.top_p, stop=es.stop, sampling={}),
                      k=cfg.eval.k, n=cfg.eval.n, temperature=es.temperature)


def parallel_rollout(run: Run, arm: str, k: int, need_eval: bool, need_sample: bool, dp: int) -> None:
    """`rollout_stage` on `dp` engine processes at once (`exit_loop.pipeline.parallel`): process w
    evaluates shard w of `dp` of the held-out questions (`eval/shards/`) and samples its share of
    the sample shards, on one engine where eval and sample use the same model and backend (the plan:
    `exit_loop.pipeline.rollout`); then both are merged as `merge_stage` merges a SLURM array's
    shards. Each process draws the greedy eval, its sample shards, then the eval's sampled draws
    (as `rollout_stage`); eval's wall time is until the last greedy shard finished plus the sampled
    draws', the sample stage's the time between (and its merge and hinted draws)."""
    t0, started = time.monotonic(), time.time()
    sets: dict[str, list[Problem]] = {}
    ecfg = eval_config(run, arm, k)
    evals: list[tuple[SampleConfig, Path, list[Draw]]] = []  # each eval draw's config, file and shards
    if need_eval:
        sets["eval"] = load_problems(ecfg.data)
        evals = [(dcfg, out, shard_draws(dcfg, dp, Path(ecfg.output_dir) / "shards" / name, "eval"))
                 for name, dcfg, out in eval_draws(ecfg)]
    d = run.real_dir(arm, k, "sample")
    scfg = run.sampler_config(arm, k)
    draws = shard_draws(scfg, dp, d / "shards") if need_sample else []
    if need_sample:
        sets["sample"] = round_questions(run, arm, k)
    greedy, later = (evals[0][2], [x for _, _, shards in evals[1:] for x in shards]) if evals else ([], [])
    # the greedy eval, the round's samples, then the eval's sampled draws (as rollout_stage draws them)
    finished = run_plan(plan([greedy, draws, later], dp), sets, scfg,
                        (d if need_sample else Path(ecfg.output_dir)) / "workers")

    def end(ds: list[Draw], default: float) -> float:
        return max([finished[str(x.path)] for x in ds], default=default)

    eval_end = end(greedy, started)
    sample_end = end(draws, eval_end)
    if need_eval:
        for dcfg, out, shards in evals:
            merge_shards([x.path for x in shards], sets["eval"], dcfg.num_samples, out, "run the same stage again")
        score(ecfg, eval_end - started + time.time() - sample_end)  # the greedy draws, then the sampled and the merges
    resumed = time.time()  # the sample stage's merge and hinted draws from here
    if need_sample:
        t1 = time.monotonic()
        sampled = merge_shards([x.path for x in draws], sets["sample"], scfg.num_samples, d / SAMPLES,
                               "run the same stage again")
        merge_s = round(time.monotonic() - t1, 3)
        hinted = hinted_draw(run, arm, k, scfg, sets["sample"], d)  # its own engines, where it has any work
        wall_s = sample_end - eval_end + time.time() - resumed if need_eval else time.monotonic() - t0
        sample_manifest(d, {"wall_s": round(wall_s, 3), "merge_s": merge_s}, scfg.model_name, len(sets["sample"]),
                        sampled, hinted, shards=len(draws), data_parallel=dp)


def merge_stage(run: Run, arm: str, k: int) -> None:
    """Round k's shard files as one samples.jsonl and the sample manifest."""
    if run.done(arm, k, "sample"):
        return
    t0 = time.monotonic()
    n = run.cfg.sample.num_shards
    problems = round_questions(run, arm, k)
    d = run.real_dir(arm, k, "sample")
    sampled = merge_shards([run.sample_shard(arm, k, i) for i in range(n)], problems, run.cfg.sample.num_samples,
                           d / SAMPLES, MERGE_HINT)
    hinted = hinted_draw(run, arm, k, run.sampler_config(arm, k), problems, d)
    sample_manifest(d, wall(t0), run.sampler_model(arm, k), len(problems), sampled, hinted, shards=n)


def verify_stage(run: Run, arm: str, k: int) -> None:
    t0 = time.monotonic()
    d = run.real_dir(arm, k, "verify")
    src = run.real_dir(arm, k, "sample") / SAMPLES
    out = write_jsonl(d / VERIFIED, with_progress(label(src, run.cfg.data.task), count_lines(src), d / VERIFIED))
    extra = {}
    if (hinted := src.parent / SAMPLES_HINTED).exists():  # a rationalization's draws: labelled apart
        extra["hinted"] = {"input": str(hinted), "output": str(write_jsonl(d / VERIFIED_HINTED, label(hinted, run.cfg.data.task)))}
    write_manifest(d, "verify", wall(t0), input=str(src), output=str(out), **extra)


def filter_stage(run: Run, arm: str, k: int) -> dict[str, Any] | None:
    """The round's splits (or, for an `original` arm, the data set's own solutions); returns
    the filter's summary (None for `original`)."""
    t0 = time.monotonic()
    cfg = run.cfg
    d = run.stage_dir(arm, k, "filter")
    if cfg.arms[arm].kind == "grpo":  # nothing to split: the arm generates while it trains
        write_manifest(d, "filter", wall(t0), kind="grpo")
        return None
    if cfg.arms[arm].split == "original":
        data = cfg.arms[arm].data or cfg.data
        problems = load_problems(data)
        write_jsonl(d / "sft_original.jsonl", (baseline_row(p) for p in problems))
        write_manifest(d, "filter", wall(t0), split="original", rows=len(problems), dataset=data.dataset)
        return None
    src = run.real_dir(arm, k, "verify") / VERIFIED
    rows = iter_jsonl(src)
    hinted = src.parent / VERIFIED_HINTED
    if run.rationalizes(arm, k, "filter") and hinted.exists():  # after the student's own, counted apart
        rows = itertools.chain(rows, iter_jsonl(hinted))
    summary = write_splits(rows, replace(cfg.filter, input=str(src), output_dir=str(d)),
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
    f = run.cfg.filter
    return d / {"correct": f.correct_name, "all": f.all_name, "formatted": f.formatted_name}[split]


def train_config(run: Run, arm: str, k: int) -> TrainConfig:
    cfg = run.cfg
    rounds = range(k + 1) if cfg.policy.data_window == "all" else [k]
    data = [str(train_split(run, arm, j)) for j in rounds]
    data = [p for p in data if Path(p).stat().st_size > 0]
    model = cfg.student if cfg.policy.retrain_from == "base" else run.policy(arm, k)
    budget = cfg.arms[arm].budget or cfg.train.budget
    original = cfg.arms[arm].split == "original"
    tracked, _ = sft_tracking(run, arm, k)  # report_to and run_name, under what train.sft sets
    sft, _ = route_push(cfg.train.sft, cfg.train.hub_model_id)  # the merged ckpt/ is pushed, not trainer/
    return TrainConfig(data=data or [str(train_split(run, arm, k))], model=model,
                       output_dir=str(run.stage_dir(arm, k, "train")),
                       # a new training seed every round (data order, dropout): rounds are not
                       # replays of one draw
                       num_examples=cfg.arms[arm].num_examples, seed=cfg.seed + k,
                       # one rule set for whatever split trains: K across the data window, dedup
                       max_per_question=None if original else cfg.filter.max_correct_per_question,
                       dedup=cfg.filter.dedup and not original,
                       budget_steps=budget.steps, budget_tokens=budget.tokens,
                       use_chat_template=cfg.train.use_chat_template, system_prompt=cfg.sample.system_prompt,
                       truncated=cfg.train.truncated, peft=cfg.train.peft,
                       sft={**tracked, **sft}, trust_remote_code=cfg.sample.trust_remote_code)


def local_model_dir(model: str) -> str:
    """A model's directory on this machine: a path as it is, a hub id through the hub's cache
    (where round 0 already put it)."""
    if Path(model).exists():
        return os.path.abspath(model)
    from huggingface_hub import snapshot_download

    return snapshot_download(model)


def carry_over(run: Run, arm: str, k: int, reason: str) -> None:
    """Round k trains nothing: the policy that sampled it carries over unchanged (recorded, not
    hidden); with retrain_from=base that is still round k's policy, not the base student."""
    policy = run.policy(arm, k)
    out = run.stage_dir(arm, k, "train")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ckpt").exists() or (out / "ckpt").is_symlink():
        (out / "ckpt").unlink()
    os.symlink(local_model_dir(policy), out / "ckpt")
    # no timings: nothing trained (the loop and the report read no train time for the round)
    write_manifest(out, "train", {}, skipped=reason, model=policy, examples=0, tokens=0)
    say(f"train: {reason} in round {k}; the policy carries over")


def grpo_round(run: Run, arm: str, k: int) -> GRPORound:
    """A grpo arm's round k: TRL's GRPO on the round's questions from the arm's policy (or the base
    student, `policy.retrain_from`), G = sample.num_samples completions a question under the
    student's sampling settings, the run's task's verifier as the reward."""
    cfg = run.cfg
    s = cfg.sample
    budget = cfg.arms[arm].budget or cfg.train.budget
    return GRPORound(model=cfg.student if cfg.policy.retrain_from == "base" else run.policy(arm, k),
                     output_dir=str(run.stage_dir(arm, k, "train")), problems=round_questions(run, arm, k),
                     task=cfg.data.task, num_generations=s.num_samples, max_completion_length=s.max_tokens,
                     temperature=s.temperature, top_p=s.top_p, stop=s.stop_strings, seed=cfg.seed + k,
                     budget_steps=budget.steps, budget_generated_tokens=budget.generated_tokens, grpo=cfg.train.grpo,
                     peft=cfg.train.peft, trust_remote_code=s.trust_remote_code)


def train_stage(run: Run, arm: str, k: int) -> None:
    if run.cfg.arms[arm].kind == "grpo":
        out = train_grpo(grpo_round(run, arm, k), callbacks=[train_progress()])
    else:
        tcfg = train_config(run, arm, k)
        if all(Path(p).stat().st_size == 0 for p in tcfg.data):
            carry_over(run, arm, k, "no training rows")
            return
        os.environ.update(sft_tracking(run, arm, k)[1])  # where transformers' tracker callbacks write
        try:
            out = train(tcfg, callbacks=[train_progress()])
        except NothingToTrain as e:
            carry_over(run, arm, k, f"no training rows left ({e})")
            return
    repo = hub_settings(run.cfg)["train.hub_model_id"]
    if repo:
        staged = stage_checkpoint(run.root / "hub" / repo.split("/")[1] / hub_name(run, arm, k, "-"),
                                  Path(out) / "ckpt", run.cfg.student, hub_name(run, arm, k, "-"))
        url = upload(staged, repo, "model", f"{arm} round {k}", revision=hub_name(run, arm, k, "-"))
        say(f"train: pushed the checkpoint to {url}")


def hub_name(run: Run, arm: str, k: int, sep: str = "_") -> str:
    """Round k's name on the hub: its dataset config (round_00, <arm>_round_00) or model
    revision (round_00, <arm>-round_00)."""
    return round_name(k) if not run.multi else f"{arm}{sep}{round_name(k)}"


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
