"""Held-out evaluation: greedy pass@1, and with k samples pass@k and maj@k, on GSM8K test.

    exit-loop eval --model runs/exit/round_02/train/ckpt --num_examples 500 --k 4

Writes `eval.json` (accuracy = greedy pass@1 as a fraction, pass@k, maj@k, format-error rate,
mean response tokens), the labelled generations (`greedy.jsonl`, `samples_k.jsonl`) and
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

from exit_loop.config import load_config, to_dict
from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.jsonl import iter_jsonl, write_json, write_manifest
from exit_loop.sample import HFBackend, SampleConfig, VLLMBackend, check_model_path, sample, start_backend
from exit_loop.tasks import DataConfig, count_failures, load_problems
from exit_loop.tasks.gsm8k import parse_number
from exit_loop.tasks.math_pool import shared_pool
from exit_loop.verify import verify_rows


def _test_split() -> DataConfig:
    return DataConfig(split="test")


@dataclass
class EvalConfig:
    output_dir: str = "runs/eval"
    data: DataConfig = field(default_factory=_test_split)
    sample: SampleConfig = field(default_factory=SampleConfig)  # model, backend, max_tokens, …
    k: int = 0                 # > 1: also draw k samples per question for pass@k and maj@k
    k_temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.k < 0 or self.k == 1:
            raise ValueError(f"k must be 0 (greedy only) or at least 2, got {self.k}")


def _labelled(path: Path, task: str) -> list[dict[str, Any]]:
    return list(verify_rows(iter_jsonl(path, required=("problem_id", "response", "ground_truth")), task=task))


def metrics(greedy: list[dict[str, Any]], sampled: list[dict[str, Any]], k: int,
            same: Callable[[str, str], bool] | None = None) -> dict[str, Any]:
    """eval.json's numbers from labelled rows (pure). `same(a, b)`: whether two answers are the
    same value, for maj@k (None: GSM8K's exact numbers)."""
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
    if k and sampled:
        by_q: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in sampled:
            by_q[r["problem_id"]].append(r)
        passed = voted = 0
        for rows in by_q.values():
            passed += any(r["is_correct"] for r in rows)
            voted += majority_correct(rows, same)
        out["pass@k"] = round(passed / len(by_q), 4)
        out["maj@k"] = round(voted / len(by_q), 4)
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


def math_equivalent(a: str, b: str) -> bool:
    """Whether math-verify (in the shared pool, under its time limit) calls two answers equal."""
    return a == b or shared_pool().check(a, b) is True


def evaluate(cfg: EvalConfig, backend: VLLMBackend | HFBackend | None = None,
             started_at: float | None = None) -> Path:
    """Generate and score; returns `output_dir`. A `backend` already holding the model is reused
    (`started_at`: when its start began, so the stage's time includes it)."""
    out = Path(cfg.output_dir)
    if (out / "manifest.json").exists():
        return out
    check_model_path(cfg.sample.model_name)
    t0 = time.monotonic() if started_at is None else started_at
    problems = load_problems(cfg.data)
    greedy_cfg = replace(cfg.sample, temperature=0.0, num_samples=1, num_shards=1, shard_id=0)
    owned = backend is None
    backend = backend or start_backend(greedy_cfg)  # one engine for the greedy and the k samples
    try:
        sample(greedy_cfg, problems, out / "greedy.jsonl", backend, summary=False)  # the eval line says it
        if cfg.k:
            k_cfg = replace(greedy_cfg, temperature=cfg.k_temperature, num_samples=cfg.k)
            sample(k_cfg, problems, out / "samples_k.jsonl", backend, summary=False)
    finally:
        if owned:
            backend.close()
    sampled = _labelled(out / "samples_k.jsonl", cfg.data.task) if cfg.k else []
    result = {"round": cfg.sample.round, "model": cfg.sample.model_name, "dataset": cfg.data.dataset, "split": cfg.data.split,
              **metrics(_labelled(out / "greedy.jsonl", cfg.data.task), sampled, cfg.k,
                        math_equivalent if cfg.data.task == "math" else None)}
    write_json(out / "eval.json", result)
    write_manifest(out, "eval", {"wall_s": round(time.monotonic() - t0, 3)}, config=to_dict(cfg))
    pk = f", pass@{cfg.k} {result['pass@k']:.1%}, maj@{cfg.k} {result['maj@k']:.1%}" if cfg.k else ""
    say(f"eval: accuracy {result['accuracy']:.1%} on {result['n']} questions{pk}; "
        f"format errors {result['format_error_rate']:.1%} -> {out / 'eval.json'}")
    return out


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with EvalConfig keys")
    p.add_argument("--model", help="checkpoint or hub id (sample.model_name)")
    p.add_argument("--dataset", help="hub id or local JSONL (data.dataset)")
    p.add_argument("--split", help="default test (data.split)")
    p.add_argument("--num_examples", type=int, help="first N questions (data.num_examples)")
    p.add_argument("--k", type=int, help="samples per question for pass@k / maj@k")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], help="sample.backend")
    p.add_argument("--output_dir", help="default runs/eval")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sample.max_tokens=512")
    a = p.parse_args(argv)
    flags = {"model": "sample.model_name", "dataset": "data.dataset", "split": "data.split",
             "num_examples": "data.num_examples", "k": "k", "backend": "sample.backend",
             "output_dir": "output_dir"}
    values = {key: getattr(a, f) for f, key in flags.items() if getattr(a, f) is not None}
    evaluate(load_config(EvalConfig, a.config, a.overrides, values))
    return 0
