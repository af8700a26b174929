"""Who draws what: a rollout's plan, one list of draws per engine (`Draw`: one `sample` call: a
shard's config, which problems, which file), and `run_draws`, the runner of one engine's list, in
this process or in each engine process of `exit_loop.pipeline.parallel` (whose `run_plan` picks).

    plans = plan([greedy_shards, sample_shards], engines=2)   # engine w: greedy shard w, then sample shards w, w+2, ...
    finished = run_plan(plans, {"eval": held_out, "sample": questions}, cfg, work_dir)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from exit_loop.pipeline.run import shard_path
from exit_loop.sample import SampleConfig, SamplerBackend, sample, select_shard, start_backend
from exit_loop.tasks import Problem


@dataclass(frozen=True)
class Draw:
    """One `sample` call: `cfg` (its num_shards/shard_id pick the problems), `problems` (a key into
    the problem sets the plan runs with), `path` (its file)."""
    cfg: SampleConfig
    problems: str
    path: Path


def shard_draws(cfg: SampleConfig, engines: int, shard_dir: Path, problems: str = "sample") -> list[Draw]:
    """`cfg`'s shards as draws into `shard_dir`: `cfg.num_shards` of them, or one per engine where
    that is 1."""
    n = cfg.num_shards if cfg.num_shards > 1 else engines
    return [Draw(replace(cfg, num_shards=n, shard_id=i), problems, shard_path(shard_dir, i, n)) for i in range(n)]


def plan(groups: Sequence[Sequence[Draw]], engines: int) -> list[list[Draw]]:
    """One list of draws per engine: each group's draws dealt in turn (engine w draws w, w + engines,
    ...), the groups in order (eval's first)."""
    return [[d for g in groups for d in g[w::engines]] for w in range(engines)]


def same_engine(a: SampleConfig, b: SampleConfig) -> bool:
    """Whether one engine serves both configs: the same model on the same backend."""
    return (a.model_name, a.backend) == (b.model_name, b.backend)


def run_draws(draws: Sequence[Draw], problem_sets: dict[str, list[Problem]],
              backend: SamplerBackend | None = None) -> dict[str, float]:
    """Run `draws` in order on one engine: `backend` where given (left open), else one started where
    a draw has work, another only where the model or backend changes, closed at the end. Returns,
    for each draw's file, when (time.time()) it was finished."""
    finished: dict[str, float] = {}
    engine: SamplerBackend | None = None  # the engine started here
    serves: SampleConfig | None = None     # and the config it was started for
    try:
        for d in draws:
            problems = problem_sets[d.problems]
            mine = engine if serves is not None and same_engine(serves, d.cfg) else None
            if backend is None and mine is None and missing(d, problems):
                if engine is not None:
                    engine.close()
                    engine = None
                engine = mine = start_backend(d.cfg)
                serves = d.cfg
            sample(d.cfg, problems, d.path, backend or mine)  # None: nothing to draw, nothing started
            finished[str(d.path)] = time.time()
    finally:
        if engine is not None:
            engine.close()
    return finished


# --------------------------------------------------------------------------- what is left


def drawn_pairs(path: Path) -> set[tuple[str, int]]:
    """(problem, sample) pairs in a samples file; a line torn by a kill is not a pair."""
    pairs = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                pairs.add((row["problem_id"], row["sample_index"]))
            except (ValueError, KeyError, TypeError):
                continue
    return pairs


def missing(d: Draw, problems: Sequence[Problem]) -> int:
    """How many of the draw's (problem, sample) pairs its file still lacks."""
    mine = select_shard(problems, d.cfg.num_shards, d.cfg.shard_id)
    want = {(p.id, j) for p in mine for j in range(d.cfg.num_samples)}
    return len(want - drawn_pairs(d.path))
