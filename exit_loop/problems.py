"""Problems: GSM8K from the hub (`openai/gsm8k`, config `main`) or from a local JSONL file in the
same format (`{"question": ..., "answer": "... #### 42"}`).

Each problem gets a stable id, `<split>-<index>` (index in the source file), and its ground
truth: the text after `#### `, thousands separators removed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exit_loop.jsonl import DataError, iter_jsonl_numbered

DEFAULT_DATASET = "openai/gsm8k"


@dataclass
class DataConfig:
    dataset: str = DEFAULT_DATASET   # hub id or path to a local JSONL file
    subset: str = "main"             # hub config name (ignored for local files)
    split: str = "train"
    num_examples: int | None = None  # first N (or a random N with `shuffle`)
    shuffle: bool = False            # take a seeded random subset instead of the first N
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {self.num_examples}")


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    ground_truth: str
    solution: str  # the data set's own worked solution (for baseline data)


def ground_truth_from_answer(answer: str) -> str:
    """`'...\\n#### 1,234'` -> `'1234'`."""
    if "####" not in answer:
        raise ValueError("no '#### ' final-answer line")
    final = answer.rsplit("####", 1)[1].strip()
    final = final.replace(",", "").strip()
    if not final:
        raise ValueError("empty final answer after '####'")
    return final


def is_local(dataset: str) -> bool:
    return dataset.endswith((".jsonl", ".json")) or Path(dataset).exists() or dataset.startswith(("/", "./", "../", "~"))


def _rows_from_hub(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets  # slow import; only when the hub is used

    ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    return [dict(r) for r in ds]


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load, give ids, take the requested subset. Raises DataError naming file and line."""
    if is_local(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        numbered = list(iter_jsonl_numbered(path, required=("question", "answer")))
        rows = [row for _, row in numbered]
        where = lambda i: f"{path}:{numbered[i][0]}"  # noqa: E731 - blank lines are skipped
        split = cfg.split if cfg.split else path.stem
    else:
        rows = _rows_from_hub(cfg)
        where = lambda i: f"{cfg.dataset}[{cfg.split}][{i}]"  # noqa: E731
        split = cfg.split
    problems = []
    for i, row in enumerate(rows):
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise DataError(f"{where(i)}: missing key(s) {', '.join(map(repr, missing))}; "
                            "a GSM8K row needs 'question' and 'answer'")
        try:
            gt = ground_truth_from_answer(str(row["answer"]))
        except ValueError as e:
            raise DataError(f"{where(i)}: key 'answer': {e}") from None
        problems.append(Problem(f"{split}-{i}", str(row["question"]), gt, str(row["answer"])))
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


def problem_index(problem_id: str) -> int:
    return int(problem_id.rsplit("-", 1)[1])
