"""Held-out evaluation: greedy pass@1, and with n samples per question the unbiased pass@k
(k = 1, 2, 4, ... up to n), sampled pass@1 and maj@k, on GSM8K test.

    exit-loop eval --model runs/exit/round_02/train/ckpt --num_examples 500 --k 4 --n 16

Writes `eval.json` (accuracy = greedy pass@1 as a fraction, pass@k, pass_at {k: value},
sampled_pass@1, maj@k, maj@n, format-error rate, mean response tokens), the labelled generations (`greedy.jsonl`, `samples_k.jsonl`) and
`manifest.json` last into `output_dir`. Generation goes through the sampler (same backends, same
resume), so an interrupted eval picks up where it stopped. In an ExIt run the rollout stage
(`exit_loop.pipeline.stages`) hands it the engine that then samples.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from exit_loop.command import config_parser
from exit_loop.config import load_config, to_dict
from exit_loop.console import say
from exit_loop.errors import ConfigError, DataError
from exit_loop.jsonl import iter_jsonl, write_json, write_manifest
from exit_loop.rundir import EVAL, GREEDY, MANIFEST
from exit_loop.sample import SampleConfig, SamplerBackend, check_model_path, sample, start_backend
from exit_loop.stats import pass_at_k
from exit_loop.tasks import DataConfig, count_failures, load_problems, task_of
from exit_loop.tasks.gsm8k import parse_number
from exit_loop.verify import verify_rows


def _test_split() -> DataConfig:
    return DataConfig(split="test")


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    data: DataConfig = field(default_factory=_test_split)
    sample: SampleConfig = field(default_factory=SampleConfig)  # model, backend, max_tokens, …
    k: int = 0                 # > 1: the k of pass@k and maj@k in the summary
    n: int | None = None       # samples per question for the sampled metrics (None: k); n >= k
    temperature: float = 0.7   # of the sampled metrics (greedy pass@1 is always temperature 0)

    def __post_init__(self) -> None:
        if self.k < 0 or self.k == 1:
            raise ValueError(f"k must be 0 (greedy only) or at least 2, got {self.k}")
        if self.n is not None and (self.n < max(self.k, 1)):
            raise ValueError(f"n must be at least k (and 1), got n={self.n}, k={self.k}")

    @property
    def samples(self) -> int:
        """How many samples per question the sampled metrics draw (0: greedy only)."""
        return self.k if self.n is None else self.n


def _labelled(path: Path, task: str) -> list[dict[str, Any]]:
    return list(verify_rows(iter_jsonl(path, required=("problem_id", "response", "ground_truth")), task=task))


def metrics(greedy: list[dict[str, Any]], sampled: list[dict[str, Any]], k: int,
            same: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
    """eval.json's numbers from labelled rows (pure). `same(a, b)`: whether two answers are the
    same value, for maj@k (None: GSM8K's exact numbers).

    With n sampled rows per question: pass@j for j = 1, 2, 4, ... up to n by the unbiased
    estimator 1 - C(n-c, j)/C(n, j) (`pass_at`; `pass@k` is j = k), `sampled_pass@1` (the mean
    share of correct samples), maj@k over the first k samples and maj@n over all n."""
    if not greedy:
        raise DataError("eval: no greedy generations to score")
    n = len(greedy)
    out: dict[str, Any] = {
        "n": n,
        "accuracy": round(sum(r["is_correct"] for r in greedy) / n, 4),
        "format_error_rate": round(sum(not r["format_ok"] for r in greedy) / n, 4),
        "mean_response_tokens": round(sum(r.get("num_tokens", 0) for r in greedy) / n, 2),
        "failures": count_failures(r["failure"] for r in greedy),
        "k": k or None, "pass@k": None, "maj@k": None,
    }
    if sampled:
        by_q: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in sampled:
            by_q[r["problem_id"]].append(r)
        n = min(len(rows) for rows in by_q.values())
        if n != max(len(rows) for rows in by_q.values()):
            raise DataError(f"eval: the sampled rows hold between {n} and "
                            f"{max(len(rows) for rows in by_q.values())} samples per question; expected the same n")
        correct = [sum(r["is_correct"] for r in rows) for rows in by_q.values()]
        ks = [j for j in (2 ** i for i in range(n.bit_length())) if j <= n]
        if k and k not in ks and k <= n:
            ks = sorted({*ks, k})
        out["samples_per_question"] = n
        out["pass_at"] = {str(j): round(sum(pass_at_k(n, c, j) for c in correct) / len(correct), 4) for j in ks}
        out["sampled_pass@1"] = out["pass_at"]["1"]
        if k and k <= n:
            out["pass@k"] = out["pass_at"][str(k)]
            out["maj@k"] = round(sum(majority_correct(sorted(rows, key=lambda r: r.get("sample_index", 0))[:k], same)
                                     for rows in by_q.values()) / len(by_q), 4)
        out["maj@n"] = round(sum(majority_correct(rows, same) for rows in by_q.values()) / len(by_q), 4)
    return out


def majority_correct(rows: list[dict[str, Any]], same: Callable[[str, str], bool] | None = None) -> bool:
    """Majority vote over well-formed answers that name a value (`ambiguous` ones get no vote);
    ties go to the earliest sample. Correct if the winner's first row was verified correct.

    Answers are grouped by `same(a, b)` against each group's first answer (MATH: math-verify's
    equivalence, so `2`, `2\\pi`, `\\sqrt{2}` and `(1,2)` stay apart); without it by their exact
    value where they name one number (GSM8K), else by their text."""
    groups: list[tuple[Any, list[dict[str, Any]]]] = []
    for r in sorted(rows, key=lambda r: r.get("sample_index", 0)):
        if not (r.get("format_ok") and r.get("predicted")) or r.get("failure") == "ambiguous":
            continue
        text = r["predicted"].strip()
        key: Any = text if same is not None else parse_number(text)
        key = text if key is None else key
        for first, members in groups:
            if (same(first, key) if same is not None else first == key):
                members.append(r)
                break
        else:
            groups.append((key, [r]))
    if not groups:
        return False
    winner = max((members for _, members in groups), key=len)  # max keeps the first of equals
    return bool(winner[0]["is_correct"])


def eval_draws(cfg: EvalConfig) -> list[tuple[str, SampleConfig, Path]]:
    """What an eval samples: (name, sampler config, file) for the greedy draw and, with n (or k),
    the n samples per question; one engine serves both."""
    out = Path(cfg.output_dir)
    greedy_cfg = replace(cfg.sample, temperature=0.0, num_samples=1, num_shards=1, shard_id=0)
    draws = [("greedy", greedy_cfg, out / GREEDY)]
    if cfg.samples:
        draws.append(("samples_k", replace(greedy_cfg, temperature=cfg.temperature, num_samples=cfg.samples),
                      out / "samples_k.jsonl"))
    return draws


def evaluate(cfg: EvalConfig, backend: SamplerBackend | None = None,
             started_at: float | None = None) -> Path:
    """Generate and score; returns `output_dir`. A `backend` already holding the model is reused
    (`started_at`: when its start began, so the stage's time includes it)."""
    out = Path(cfg.output_dir)
    if (out / MANIFEST).exists():
        return out
    t0 = time.monotonic() if started_at is None else started_at
    draw_eval(cfg, backend)
    return score(cfg, time.monotonic() - t0)


def draw_eval(cfg: EvalConfig, backend: SamplerBackend | None = None, which: tuple[str, ...] | None = None) -> None:
    """Draw the files of `eval_draws` (those named in `which`; None: all) on `backend` (else on an
    engine of its own, started only where a draw has work), resuming what is on disk."""
    if cfg.sample.hint:
        raise ConfigError("eval: sample.hint would give every held-out question its answer in the prompt; "
                          "hints are for STaR rationalization's training samples only")
    check_model_path(cfg.sample.model_name)
    problems = load_problems(cfg.data)
    draws = [d for d in eval_draws(cfg) if which is None or d[0] in which]
    owned = backend is None
    backend = backend or start_backend(draws[0][1])  # one engine for the greedy and the k samples
    try:
        for _, dcfg, path in draws:
            sample(dcfg, problems, path, backend, summary=False)  # the eval line says it
    finally:
        if owned:
            backend.close()


def score(cfg: EvalConfig, drawn_s: float) -> Path:
    """Label the drawn files of `eval_draws`, write eval.json and (last) the manifest, whose wall
    time is `drawn_s` (engine start and sampling) plus the scoring; returns `output_dir`."""
    out = Path(cfg.output_dir)
    t0 = time.monotonic()
    sampled = _labelled(out / "samples_k.jsonl", cfg.data.task) if cfg.samples else []
    result = {"round": cfg.sample.round, "model": cfg.sample.model_name, "dataset": cfg.data.dataset, "split": cfg.data.split,
              **metrics(_labelled(out / GREEDY, cfg.data.task), sampled, cfg.k,
                        task_of(cfg.data.task).same_answer)}
    write_json(out / EVAL, result)
    write_manifest(out, "eval", {"wall_s": round(drawn_s + time.monotonic() - t0, 3)}, config=to_dict(cfg))
    pk = f", pass@{cfg.k} {result['pass@k']:.1%}, maj@{cfg.k} {result['maj@k']:.1%}" if cfg.k else ""
    if cfg.samples:
        pk += f", sampled pass@1 {result['sampled_pass@1']:.1%} ({cfg.samples} samples a question)"
    say(f"eval: accuracy {result['accuracy']:.1%} on {result['n']} questions{pk}; "
        f"format errors {result['format_error_rate']:.1%} -> {out / 'eval.json'}")
    return out


def command(argv: list[str]) -> int:
    p = config_parser("exit-loop eval", __doc__, EvalConfig)
    p.add_argument("--config", help="YAML file with EvalConfig keys")
    p.add_argument("--model", help="checkpoint or hub id (sample.model_name)")
    p.add_argument("--dataset", help="hub id or local JSONL (data.dataset)")
    p.add_argument("--split", help="default test (data.split)")
    p.add_argument("--num_examples", type=int, help="first N questions (data.num_examples)")
    p.add_argument("--k", type=int, help="the k of pass@k / maj@k (draws k samples per question unless n is set)")
    p.add_argument("--n", type=int, help="samples per question for the sampled metrics (n >= k): unbiased "
                   "pass@1, 2, 4, ... up to n, sampled pass@1, maj@n")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], help="sample.backend")
    p.add_argument("--output_dir", help="default runs/eval")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sample.max_tokens=512")
    a = p.parse_args(argv)
    flags = {"model": "sample.model_name", "dataset": "data.dataset", "split": "data.split",
             "num_examples": "data.num_examples", "k": "k", "n": "n", "backend": "sample.backend",
             "output_dir": "output_dir"}
    values = {key: getattr(a, f) for f, key in flags.items() if getattr(a, f) is not None}
    evaluate(load_config(EvalConfig, a.config, a.overrides, values))
    return 0
