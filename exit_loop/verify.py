"""The verifier stage: label each sampled trace against its ground truth.

    exit-loop verify --input data/gsm8k/samples.jsonl --output data/gsm8k/verified.jsonl
    exit-loop verify --task math --input data/math/samples.jsonl --output data/math/verified.jsonl math_workers=2

Every input row needs `response` (the canonical response, `{reasoning} </think>
<answer>{answer}</answer>`) and `ground_truth`; `finish_reason` is read when present. Each output
row is the input row plus four keys:

- `predicted`: the text of the last complete `<answer>...</answer>` (stripped), or None;
- `format_ok`: whether the response has the canonical form (`exit_loop.prompts.format_ok`);
- `is_correct`: canonical form *and* the predicted answer equals the ground truth;
- `failure`: one of FAILURES, chosen in this order: `truncated` (finish_reason "length" and not
  correct), `no_answer` (no complete, non-empty answer tag), `format`, `ambiguous` (the answer
  names more than one value or hedges: never correct), `timeout` (math only), `wrong`, else `none`.

`task` picks the verdict, which lives with the task (`exit_loop.tasks`):

- `gsm8k` (`exit_loop.tasks.gsm8k`): the answer must name exactly one number (`read_answer`),
  compared as an exact rational after a light, fast normalisation; no `eval`, no sympy.
- `math` (`exit_loop.tasks.math`): MATH-style answers through math-verify, in worker processes
  (`exit_loop.tasks.math_pool`), each check under a hard limit: `math_timeout_s` seconds of CPU
  time, and 3x that of wall-clock time; a check over either is killed and the row's failure is
  `timeout`.

The verifier never raises on a string: any input, however long or odd, gets a verdict.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exit_loop.command import config_parser
from exit_loop.config import load_config
from exit_loop.console import say, stream
from exit_loop.errors import DataError
from exit_loop.jsonl import iter_jsonl_numbered, write_jsonl
from exit_loop.tasks import TASKS, Verdict, task_of
from exit_loop.tasks.math_pool import DEFAULT_TIMEOUT_S
from exit_loop.tasks.problem import row_fields


@dataclass
class VerifyConfig:
    input: str | None = None     # JSONL in: rows with `response` and `ground_truth`
    output: str | None = None    # JSONL out: the same rows with predicted/is_correct/format_ok/failure added
    task: Literal["gsm8k", "math"] = "gsm8k"  # answer checker: GSM8K numbers, or math-verify
    math_workers: int | None = None  # math: worker processes (default: this process's CPUs, at most 8)
    math_timeout_s: float = DEFAULT_TIMEOUT_S  # math: CPU seconds per answer check (3x that of wall clock), then `timeout`

    def __post_init__(self) -> None:
        if self.math_workers is not None and self.math_workers < 1:
            raise ValueError(f"verify.math_workers: expected at least 1, got {self.math_workers}")
        if not self.math_timeout_s > 0:
            raise ValueError(f"verify.math_timeout_s: expected seconds > 0, got {self.math_timeout_s}")


def labelled(row: dict[str, Any], v: Verdict) -> dict[str, Any]:
    """A new dict: `row` plus the verdict's `predicted`, `is_correct`, `format_ok` and `failure`."""
    return {**row, "predicted": v.predicted, "is_correct": v.is_correct,
            "format_ok": v.format_ok, "failure": v.failure}


def verify_row(row: dict[str, Any], task: str = "gsm8k") -> dict[str, Any]:
    """A new dict: `row` plus `predicted`, `is_correct`, `format_ok` and `failure`.

    With `task="math"` the check runs in the process-wide math pool (`shared_pool`); to verify
    many rows use `verify_rows`, which batches them through a pool of its own."""
    return labelled(row, task_of(task).verify(*row_fields(row)))


def verify_rows(rows: Iterable[dict[str, Any]], task: str = "gsm8k", *,
                math_workers: int | None = None,
                math_timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[dict[str, Any]]:
    """Label rows lazily, in order. `task="math"` runs a pool of `math_workers` processes for
    as long as the iteration lasts (it stops when the rows run out or the iterator is closed)."""
    for row, v in task_of(task).verify_many(rows, math_workers, math_timeout_s):
        yield labelled(row, v)


# --------------------------------------------------------------------------- stage entry

def read_samples(path: str | Path, task: str = "gsm8k") -> Iterator[dict[str, Any]]:
    """Stream the rows to verify from `path`: each needs `response` and `ground_truth`, and for
    GSM8K a ground truth that is a number; a row without raises DataError naming its line (a
    ground truth that cannot match would label every trace of its question wrong, silently)."""
    good: set[str] = set()  # ground truths already checked: a question's samples share one
    checker = task_of(task)
    for lineno, row in iter_jsonl_numbered(path, required=("response", "ground_truth")):
        truth = row["ground_truth"]
        if truth not in good:
            text = "" if truth is None or isinstance(truth, bool) else str(truth).strip()
            if not text or not checker.truth_ok(text):
                raise DataError(f"{path}:{lineno}: key 'ground_truth': expected {checker.truth_expected}, "
                                f"got {truth!r}")
            if isinstance(truth, str):
                if len(good) >= 1 << 16:  # memory stays bounded on a file of distinct answers
                    good.clear()
                good.add(truth)
        yield row


def count_lines(path: str | Path) -> int:
    """Non-blank lines of a JSONL file (a progress bar's total)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def with_progress(rows: Iterable[dict[str, Any]], total: int | None, out: str | Path) -> Iterator[dict[str, Any]]:
    """Labelled rows passed through as they come, with a progress bar on the console; when they
    are all through, one summary line: rows, rows/s and the count per failure class."""
    from tqdm.auto import tqdm

    failures: Counter[str] = Counter()
    t0 = time.monotonic()
    with tqdm(total=total, desc="verify", unit="row", file=stream(), dynamic_ncols=True, mininterval=1.0) as bar:
        for row in rows:
            failures[str(row.get("failure"))] += 1
            bar.update(1)
            yield row
    n, dt = sum(failures.values()), time.monotonic() - t0
    say(f"verify: {n} rows in {dt:.1f}s ({n / max(dt, 1e-9):.0f} rows/s); "
        f"failures {json.dumps(dict(failures.most_common()))} -> {out}")


def run(cfg: VerifyConfig) -> Path:
    """Stage entry: read `cfg.input`, write the labelled rows to `cfg.output` (atomically).
    Rows stream through: memory stays bounded whatever the file's size."""
    if cfg.task not in TASKS:
        raise ValueError(f"verify.task: expected one of {', '.join(map(repr, TASKS))}, got {cfg.task!r}")
    if not cfg.input:
        raise ValueError("verify.input: expected a path to a JSONL file of sampled rows")
    if not cfg.output:
        raise ValueError("verify.output: expected a path for the verified JSONL file")
    rows = verify_rows(read_samples(cfg.input, cfg.task), cfg.task, math_workers=cfg.math_workers,
                       math_timeout_s=cfg.math_timeout_s)
    return write_jsonl(cfg.output, with_progress(rows, count_lines(cfg.input), cfg.output))


def command(argv: list[str]) -> int:
    import argparse

    p = config_parser("exit-loop verify", __doc__, VerifyConfig)
    p.add_argument("--input", help="JSONL rows with `response` and `ground_truth`")
    p.add_argument("--output", help="where the labelled rows go")
    p.add_argument("--task", choices=list(TASKS),
                   help="answer checker: gsm8k (numbers, default) or math (math-verify)")
    p.add_argument("--config", help="YAML file with VerifyConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any VerifyConfig key, e.g. math_workers=4 math_timeout_s=3")
    a = p.parse_args(argv)
    values = {k: v for k, v in {"input": a.input, "output": a.output, "task": a.task}.items() if v is not None}
    cfg = load_config(VerifyConfig, a.config, a.overrides, values)
    if not cfg.input or not cfg.output:
        p.error("--input and --output are required")
    run(cfg)
    return 0
