"""Problems: GSM8K from the hub (`openai/gsm8k`, config `main`) or from a local JSONL file in the
same format (`{"question": ..., "answer": "... #### 42"}`); with `task: math`, MATH-style rows
(`{"problem": ..., "solution": "... \\boxed{\\frac{1}{2}}."}`, as in MATH, MATH-500 or
MATH-lighteval) from the hub (give `subset`, e.g. `default` for `HuggingFaceH4/MATH-500`) or a
local JSONL file.

Each problem gets a stable id, `<split>-<index>` (index in the source file), and its ground
truth: for GSM8K the text after `#### `, thousands separators removed; for MATH the row's
`answer` when it has one, else the content of the last `\\boxed{}` (or `\\fbox{}`) in the solution.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
    task: Literal["gsm8k", "math"] = "gsm8k"  # row format and answer checker: GSM8K or MATH

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


def _source_rows(cfg: DataConfig, required: tuple[str, ...] = ()
                 ) -> tuple[list[dict[str, Any]], Callable[[int], str], str]:
    """The data set's rows, a function naming row i's place (file:line or hub row) for errors,
    and the split name used in problem ids."""
    if is_local(cfg.dataset):
        path = Path(cfg.dataset).expanduser()
        numbered = list(iter_jsonl_numbered(path, required=required))
        return ([row for _, row in numbered], lambda i: f"{path}:{numbered[i][0]}",
                cfg.split if cfg.split else path.stem)
    return _rows_from_hub(cfg), lambda i: f"{cfg.dataset}[{cfg.split}][{i}]", cfg.split


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Load, give ids, take the requested subset. Raises DataError naming file and line."""
    if cfg.task == "math":
        return _subset(load_math_problems(cfg), cfg)
    from exit_loop.verify import parse_number  # the verifier's own reading of a number

    rows, where, split = _source_rows(cfg, required=("question", "answer"))
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
        if parse_number(gt) is None:
            raise DataError(f"{where(i)}: key 'answer': the final answer after '####' is not a number: {gt!r}")
        problems.append(Problem(f"{split}-{i}", str(row["question"]), gt, str(row["answer"])))
    if not problems:
        raise DataError(f"{cfg.dataset}: no problems found")
    return _subset(problems, cfg)


def _subset(problems: list[Problem], cfg: DataConfig) -> list[Problem]:
    if cfg.num_examples is not None:
        if cfg.shuffle:
            rng = random.Random(cfg.seed)
            problems = sorted(rng.sample(problems, min(cfg.num_examples, len(problems))),
                              key=lambda p: problem_index(p.id))
        else:
            problems = problems[: cfg.num_examples]
    return problems


# --------------------------------------------------------------------------- MATH

def last_boxed_answer(solution: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces), stripped; for
    `\\boxed 5` (no braces) the token after it. None if there is none."""
    best: tuple[int, str] | None = None
    for cmd in ("\\boxed", "\\fbox"):
        i = solution.rfind(cmd)
        while i >= 0:
            content = _braced_after(solution, i + len(cmd))
            if content is not None:
                if best is None or i > best[0]:
                    best = (i, content)
                break
            i = solution.rfind(cmd, 0, i)
    return None if best is None or not best[1] else best[1]


def _braced_after(text: str, i: int) -> str | None:
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1:k].strip()
        return None  # unbalanced
    if j > i:  # `\\boxed 5`: the token up to a space, `$` or the end
        end = j
        while end < len(text) and text[end] not in " $\n":
            end += 1
        return text[j:end].strip() or None
    return None


def load_math_problems(cfg: DataConfig) -> list[Problem]:
    """All MATH-style problems of `cfg.dataset` (no subset taken). Raises DataError naming the
    file and line (or hub row) of a row without a problem or an answer."""
    rows, where, split = _source_rows(cfg)
    problems = []
    for i, row in enumerate(rows):
        if "problem" not in row or not ("solution" in row or "answer" in row):
            hint = " (this looks like GSM8K: set data.task=gsm8k)" if "question" in row else ""
            raise DataError(f"{where(i)}: a MATH row needs 'problem' and 'solution' (or 'answer'); "
                            f"found keys {sorted(row)}{hint}")
        solution = str(row.get("solution") or "")
        answer = row.get("answer")
        truth = str(answer).strip() if answer is not None and str(answer).strip() else None
        if truth is None:
            truth = last_boxed_answer(solution)
        if not truth:
            raise DataError(f"{where(i)}: key 'solution': no \\boxed{{...}} answer in it (and no 'answer' key)")
        problems.append(Problem(f"{split}-{i}", str(row["problem"]), truth, solution))
    if not problems:
        raise DataError(f"{cfg.dataset}: no problems found")
    return problems


def problem_index(problem_id: str) -> int:
    return int(problem_id.rsplit("-", 1)[1])
