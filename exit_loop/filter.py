"""The filter: verified rows in, the splits and a summary out.

    exit-loop filter --input data/gsm8k/verified.jsonl --output_dir data/gsm8k

- `sft_r1_all.jsonl`: every trace, with its labels and provenance.
- `sft_r1_correct.jsonl`: `{"prompt", "response"}` for correct traces only, after the options
  (at most K per question, exact-duplicate responses dropped, a response-token cap).
- `sft_r1_formatted.jsonl`: `{"prompt", "response"}` for well-formed traces whatever their
  answer (not ambiguous, not cut short), under the same options: it tells "correct" apart from
  "well-formed" in a comparison of arms.
- `summary.json`: trace accuracy, share of questions with a correct trace, mean response tokens
  of correct and incorrect traces, count per failure class.

`filter_rows` is a pure function over rows; `write_splits` writes its result and returns the
summary to its caller (the loop and `exit-loop generate` print and record it from there); `run`
is the `exit-loop filter` entry.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from exit_loop.command import config_parser
from exit_loop.config import load_config
from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.hub import check_hub, stage_splits, upload
from exit_loop.jsonl import iter_jsonl, write_json, write_jsonl
from exit_loop.prompts import HINTED_CONTEXT
from exit_loop.rundir import SUMMARY
from exit_loop.rules import per_question
from exit_loop.tasks import count_failures

ALL_KEYS = ("prompt", "response", "ground_truth", "predicted", "is_correct")
# the summary's counts a generation's manifest records (exit-loop generate; reverify --rewrite)
MANIFEST_COUNTS = ("traces", "correct_traces", "questions", "questions_solved", "correct_split_rows")
PROVENANCE_KEYS = ("problem_id", "sample_index", "model", "round", "num_tokens", "teacher_num_tokens", "prompt_tokens", "finish_reason",
                   "failure", "format_ok", "backend", "prompt_style", "question", "raw_output", "hinted")


@dataclass
class FilterConfig:
    input: str | None = None                      # verified rows (for `exit-loop filter`)
    output_dir: str = "data/gsm8k"
    all_name: str = "sft_r1_all.jsonl"
    correct_name: str = "sft_r1_correct.jsonl"
    formatted_name: str = "sft_r1_formatted.jsonl"  # well-formed traces, answers unchecked
    max_correct_per_question: int | None = None   # K: keep at most K correct traces per question
    dedup: bool = True                            # drop exact-duplicate responses per question
    max_response_tokens: int | None = None        # drop correct traces longer than this
    push_to_hub: str | None = None                # ORG/NAME: a run's splits to this dataset repo (exit_loop.hub)

    def __post_init__(self) -> None:
        if self.max_correct_per_question is not None and self.max_correct_per_question < 1:
            raise ValueError("max_correct_per_question must be at least 1")


def all_row(row: dict[str, Any]) -> dict[str, Any]:
    """The all-split row: the DESIGN.md keys first, then provenance."""
    out = {k: row.get(k) for k in ALL_KEYS}
    out.update({k: row[k] for k in PROVENANCE_KEYS if k in row})
    return out


def _mean(xs: list[int]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def well_formed(row: dict[str, Any]) -> bool:
    """A trace for the `formatted` split: canonical in form, whatever its answer; not ambiguous
    (a hedge is not a form to learn) and not cut short by the sampler."""
    return bool(row.get("format_ok")) and row.get("failure") not in ("ambiguous", "truncated") \
        and row.get("finish_reason") != "length"


def question_id(row: dict[str, Any]) -> str:
    """The question a trace answers: its problem id, else its prompt."""
    return str(row.get("problem_id", row.get("prompt")))


def short_enough(row: dict[str, Any], cap: int | None, dropped: Counter) -> bool:
    """Whether a trace is within the response-token cap (one without a token count is not);
    counts `dropped["too_long"]` where it is not."""
    ntok = row.get("num_tokens")
    if cap is not None and (not isinstance(ntok, int) or ntok > cap):
        dropped["too_long"] += 1
        return False
    return True


def pick(rows: Iterable[dict[str, Any]], cfg: FilterConfig) -> tuple[list[dict[str, Any]], Counter]:
    """The rows a split keeps of `rows`, in order: the response-token cap, exact duplicates per
    question dropped (`dedup`), at most K per question (`exit_loop.rules.per_question`); and what
    each rule dropped."""
    dropped: Counter = Counter()
    fits = (row for row in rows if short_enough(row, cfg.max_response_tokens, dropped))
    kept = per_question(fits, lambda row: (question_id(row), row["response"]), cfg.dedup,
                        cfg.max_correct_per_question, dropped)
    return list(kept), dropped


def pairs(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """A split's `{prompt, response}` rows."""
    return [{"prompt": row["prompt"], "response": row["response"]} for row in rows]


class Splits(NamedTuple):
    all: list[dict[str, Any]]        # every row, labelled
    correct: list[dict[str, Any]]    # verified-correct prompt/response pairs (after dedup, K, length)
    formatted: list[dict[str, Any]]  # well-formed prompt/response pairs, answers unchecked (the same rules)
    summary: dict[str, Any]


def filter_rows(rows: Iterable[dict[str, Any]], cfg: FilterConfig) -> Splits:
    """Split verified rows into the three splits and their summary."""
    all_rows: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    questions: set[str] = set()
    solved: set[str] = set()
    tokens_ok: list[int] = []
    tokens_bad: list[int] = []
    hinted: list[dict[str, Any]] = []  # STaR rationalization's rows: counted apart from the student's own
    for row in rows:
        a = all_row(row)
        all_rows.append(a)
        if row.get("hinted"):
            hinted.append(a)
            continue
        qid = question_id(row)
        questions.add(qid)
        failures[str(row.get("failure", "none" if row.get("is_correct") else "wrong"))] += 1
        ntok = row.get("num_tokens")
        if row.get("is_correct"):
            solved.add(qid)
            if isinstance(ntok, int):
                tokens_ok.append(ntok)
        elif isinstance(ntok, int):
            tokens_bad.append(ntok)
    correct, dropped = pick((r for r in all_rows if r.get("is_correct")), cfg)
    formatted, dropped_formatted = pick((r for r in all_rows if well_formed(r)), cfg)
    own = [r for r in all_rows if not r.get("hinted")]
    n = len(own)
    n_correct = sum(1 for r in own if r.get("is_correct"))
    summary = {
        "traces": n,
        "correct_traces": n_correct,
        "trace_accuracy": round(n_correct / n, 4) if n else None,
        "questions": len(questions),
        "questions_solved": len(solved),
        "question_coverage": round(len(solved) / len(questions), 4) if questions else None,
        "mean_tokens_correct": _mean(tokens_ok),
        "mean_tokens_incorrect": _mean(tokens_bad),
        "failures": count_failures(failures.elements()),
        "correct_split_rows": len(correct),
        "dropped_from_correct": dict(dropped),
        "formatted_split_rows": len(formatted),
        "dropped_from_formatted": dict(dropped_formatted),
    }
    if hinted:
        summary["hinted"] = {
            "traces": len(hinted),
            "correct_traces": sum(1 for r in hinted if r.get("is_correct")),
            "questions": len({question_id(r) for r in hinted}),
            "questions_solved": len({question_id(r) for r in hinted if r.get("is_correct")}),
            "correct_split_rows": sum(1 for r in correct if r.get("hinted")),
            "context": HINTED_CONTEXT,
        }
    return Splits(all_rows, pairs(correct), pairs(formatted), summary)


def write_splits(rows: Iterable[dict[str, Any]], cfg: FilterConfig, allow_empty: bool = False) -> dict[str, Any]:
    """Filter and write both splits and `summary.json` into `cfg.output_dir`; returns the summary.
    No rows is an error, unless `allow_empty` (an ExIt round whose every question is already
    solved: empty splits and a summary of zero traces)."""
    out = Path(cfg.output_dir)
    all_rows, correct, formatted, summary = filter_rows(rows, cfg)
    if not all_rows:
        if not allow_empty:
            raise DataError(f"{cfg.input or 'filter'}: no rows to filter")
        summary = {"traces": 0, "correct_traces": 0, "correct_split_rows": 0}
    write_jsonl(out / cfg.all_name, all_rows)
    write_jsonl(out / cfg.correct_name, correct)
    write_jsonl(out / cfg.formatted_name, formatted)
    if all_rows:
        summary["all_split"] = str(out / cfg.all_name)
        summary["correct_split"] = str(out / cfg.correct_name)
        summary["formatted_split"] = str(out / cfg.formatted_name)
        say(format_summary(summary))
    write_json(out / SUMMARY, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    acc = summary["trace_accuracy"]
    cov = summary["question_coverage"]
    return (f"filter: {summary['traces']} traces, accuracy {acc:.1%}, "
            f"{summary['questions_solved']}/{summary['questions']} questions solved ({cov:.1%}), "
            f"{summary['correct_split_rows']} rows in the correct split; failures {json.dumps(summary['failures'])}")


def run(cfg: FilterConfig) -> Path:
    """Stage entry: the splits of `cfg.input` in `cfg.output_dir` (returned)."""
    if not cfg.input:
        raise DataError("filter: no input file given (--input)")
    check_hub({"push_to_hub": cfg.push_to_hub})
    write_splits(iter_jsonl(cfg.input, required=("prompt", "response", "is_correct")), cfg)
    out = Path(cfg.output_dir)
    if cfg.push_to_hub:  # the splits as config `default` of a dataset repository
        staged = stage_splits(out / "hub", "default", out / cfg.correct_name, out / cfg.all_name)
        say(f"filter: pushed the splits to {upload(staged, cfg.push_to_hub, 'dataset', 'exit-loop filter')}")
    return out


def command(argv: list[str]) -> int:
    p = config_parser("exit-loop filter", __doc__, FilterConfig)
    p.add_argument("--input", help="verified rows (JSONL with prompt, response, is_correct)")
    p.add_argument("--output_dir", help="where the splits go (default data/gsm8k)")
    p.add_argument("--config", help="YAML file with FilterConfig keys")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. max_correct_per_question=4")
    a = p.parse_args(argv)
    values = {k: v for k, v in {"input": a.input, "output_dir": a.output_dir}.items() if v is not None}
    run(load_config(FilterConfig, a.config, a.overrides, values))
    return 0
