"""What every task shares: where its rows come from (`DataConfig`: a hub data set or a local JSONL
file), a `Problem` (a stable id, the question, the ground truth, the data set's own solution),
and a `Verdict` (what a task's checker says of one response).

Each problem's id is `<split>-<index>` (index in the source file). A task module
(`exit_loop.tasks.gsm8k`, `exit_loop.tasks.math`) turns source rows into problems and labels
responses; `exit_loop.tasks.load_problems` picks the task from `DataConfig.task`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from exit_loop.errors import DataError
from exit_loop.jsonl import iter_jsonl_numbered
from exit_loop.prompts import extract_answer, format_ok

DEFAULT_DATASET = "openai/gsm8k"
FAILURES = ("none", "no_answer", "format", "truncated", "ambiguous", "wrong", "timeout")


def count_failures(failures: Iterable[str]) -> dict[str, int]:
    """How many of each failure class, every class of FAILURES listed (zero included) in that
    order, then any other label seen, so a summary always shows e.g. its `ambiguous` count."""
    counts = Counter(failures)
    return {**{f: counts.pop(f, 0) for f in FAILURES}, **dict(sorted(counts.items()))}


@dataclass
class DataConfig:
    dataset: str = DEFAULT_DATASET   # hub id or path to a local JSONL file
    subset: str = "main"             # hub config name (ignored for local files)
    split: str = "train"
    num_examples: int | None = None  # first N (or a random N with `shuffle`)
    shuffle: bool = False            # take a seeded random subset instead of the first N
    seed: int = 0
    task: Literal["gsm8k", "math"] = "gsm8k"  # row format and answer checker: GSM8K or MATH
    # a row key naming each question's group (MATH: level), or several: reports split by each
    group_by: str | list[str] | None = None

    def __post_init__(self) -> None:
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {self.num_examples}")
        if isinstance(self.group_by, list) and (not self.group_by or len(set(self.group_by)) < len(self.group_by)):
            raise ValueError(f"group_by: give one key or a list of distinct keys, got {self.group_by}")
        if any(k in ("group", "difficulty") for k in self.group_keys[1:]):
            raise ValueError(f"group_by: a further key may not be 'group' or 'difficulty' (the report's own "
                             f"groupings), got {self.group_by}")

    @property
    def group_keys(self) -> list[str]:
        return [] if self.group_by is None else [self.group_by] if isinstance(self.group_by, str) else self.group_by


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    ground_truth: str
    solution: str  # the data set's own worked solution (for baseline data)
    group: str | None = None  # the row's value of `DataConfig.group_by` (its first key): rows carry it, reports split by it
    groups: tuple[tuple[str, str], ...] = ()  # (key, value) of group_by's further keys: rows carry them as `groups`


@dataclass(frozen=True)
class Verdict:
    predicted: str | None   # the extracted answer text (stripped), None if no <answer> tag
    is_correct: bool
    format_ok: bool
    failure: str            # one of FAILURES


def is_local(dataset: str) -> bool:
    return dataset.endswith((".jsonl", ".json")) or Path(dataset).exists() or dataset.startswith(("/", "./", "../", "~"))


def rows_from_hub(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets  # slow import; only when the hub is used

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except OSError as e:  # offline (HF_HUB_OFFLINE=1), no network, or no such data set on the hub
        which = ", ".join(f"{k} {v!r}" for k, v in (("subset", cfg.subset), ("split", cfg.split)) if v)
        raise DataError(f"data set {cfg.dataset!r} ({which}) could not be loaded from the hub: {e}. "
                        "Without the hub, set the config's `dataset` key (data.dataset, eval.data.dataset) to a "
                        "local JSONL file of the same rows, e.g. GSM8K's train.jsonl / test.jsonl "
                        "(question, answer)") from None
    return [dict(r) for r in ds]


def source_rows(cfg: DataConfig, required: tuple[str, ...] = ()
                ) -> tuple[list[dict[str, Any]], Callable[[int], str], str]:
    """The data set's rows, a function naming row i's place (file:line or hub row) for errors,
    and the split name used in problem ids."""
    if is_local(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        numbered = list(iter_jsonl_numbered(path, required=required))
        return ([row for _, row in numbered], lambda i: f"{path}:{numbered[i][0]}",
                cfg.split if cfg.split else path.stem)
    return rows_from_hub(cfg), lambda i: f"{cfg.dataset}[{cfg.split}][{i}]", cfg.split


def row_group(row: dict[str, Any], cfg: DataConfig, where: str) -> dict[str, Any]:
    """A source row's groups under `cfg.group_by` as Problem's `group` (the first key's value,
    None where group_by is unset) and `groups` (the further keys'); DataError naming the row and
    key where one is missing."""
    keys = cfg.group_keys
    for key in keys:
        if row.get(key) is None:
            raise DataError(f"{where}: no key {key!r} (data.group_by); every row needs its group, "
                            f"found keys {sorted(row)}")
    return {"group": str(row[keys[0]]) if keys else None, "groups": tuple((k, str(row[k])) for k in keys[1:])}


def problem_index(problem_id: str) -> int:
    return int(problem_id.rsplit("-", 1)[1])


def subset(problems: list[Problem], cfg: DataConfig) -> list[Problem]:
    """The first `cfg.num_examples` problems, or with `cfg.shuffle` a seeded random subset in
    source order."""
    if not problems:
        raise DataError(f"{cfg.dataset}: no problems found")
    if cfg.num_examples is not None:
        if cfg.shuffle:
            rng = random.Random(cfg.seed)
            problems = sorted(rng.sample(problems, min(cfg.num_examples, len(problems))),
                              key=lambda p: problem_index(p.id))
        else:
            problems = problems[: cfg.num_examples]
    return problems


def read_response(response: Any, ground_truth: Any) -> tuple[str | None, bool, str | None, str | None]:
    """What every task's verdict starts from: (the predicted answer, whether the response has the
    canonical form, the failure its form alone decides (`no_answer`, `format`) or None, the ground
    truth as text or None). Never raises."""
    if not isinstance(response, str):
        response = "" if response is None else str(response)
    if ground_truth is not None and not isinstance(ground_truth, str):
        ground_truth = str(ground_truth)
    predicted = extract_answer(response)
    ok = format_ok(response)
    failure = "no_answer" if not predicted else None if ok else "format"
    return predicted, ok, failure, ground_truth


def row_fields(row: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """What a verdict reads of a row: its response as text ("" if missing), its ground truth as
    text (None if missing) and its finish_reason."""
    response, truth = row.get("response"), row.get("ground_truth")
    return ("" if response is None else str(response), None if truth is None else str(truth),
            row.get("finish_reason"))


def verdict(predicted: str | None, ok: bool, failure: str, finish_reason: str | None) -> Verdict:
    """The Verdict for `failure`; a response cut at max_tokens that is not correct is `truncated`."""
    correct = failure == "none"
    if not correct and finish_reason == "length":
        failure = "truncated"
    return Verdict(predicted=predicted, is_correct=correct, format_ok=ok, failure=failure)
