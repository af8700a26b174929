"""Audit a verifier's labels before trusting a run: what it accepted, in what forms, and a sample
of accepted traces to read by hand.

    exit-loop audit runs/exit_gsm8k/round_01                # every verified.jsonl under it
    exit-loop audit data/gsm8k/verified.jsonl --n 50 --seed 0
    exit-loop audit data/gsm8k/sft_r1_all.jsonl             # an all split carries the labels too

For labelled rows (`predicted`, `is_correct`, `failure`: a `verified.jsonl` or an all split; a
directory is searched for `verified.jsonl` files, else `sft_r1_all.jsonl` ones) it prints and
writes to `audit.md` (beside the file, or in the directory):

- the count per failure class (`none`, `wrong`, `ambiguous`, `no_answer`, `format`, `truncated`,
  `timeout`);
- the answer forms seen (`integer`, `decimal`, `negative`, `fraction`, `mixed number`,
  `scientific`, `with units or currency`, `equation`, `latex`, `words`, `long text`, `empty`),
  with how many rows of each and how many of them were accepted;
- `--n` accepted traces drawn at random with `--seed`, the unusual forms first (every form but a
  plain integer before any plain integer), each with its answer, ground truth and the end of its
  response.

Reading the sample is how a researcher estimates the verifier's false-positive rate on this run:
k accepted traces of n that are not really right put it near k/n (the Wilson interval of k in n,
printed for k = 0 and 1, bounds it).
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.jsonl import atomic_write_text, iter_jsonl_numbered
from exit_loop.rundir import VERIFIED
from exit_loop.stats import wilson

FORMS = ("empty", "integer", "negative", "decimal", "fraction", "mixed number", "scientific",
         "with units or currency", "equation", "latex", "words", "long text")
_INTEGER = re.compile(r"\d{1,3}(?:,\d{3})*|\d+", re.ASCII)
_NEGATIVE = re.compile(r"-\d+(?:\.\d+)?", re.ASCII)
_DECIMAL = re.compile(r"\d*\.\d+", re.ASCII)
_FRACTION = re.compile(r"-?\d+\s*/\s*\d+|-?\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}", re.ASCII)
_MIXED = re.compile(r"\d+\s+\d+\s*/\s*\d+|\d+\s*\\[dt]?frac\s*\{[^{}]*\}\s*\{[^{}]*\}", re.ASCII)
_SCIENTIFIC = re.compile(r"(?:\d+(?:\.\d+)?\s*(?:\\times|×|\*)\s*10\s*\^|\d+(?:\.\d+)?[eE][+-]?\d)")
_DIGIT = re.compile(r"\d")
REQUIRED = ("predicted", "is_correct", "failure")
LONG = 40


def answer_form(predicted: Any) -> str:
    """Which of FORMS an answer text takes (the first that fits, in a fixed order)."""
    text = predicted.strip() if isinstance(predicted, str) else ""
    if not text:
        return "empty"
    if len(text) > LONG:
        return "long text"
    for form, pattern in (("integer", _INTEGER), ("negative", _NEGATIVE), ("decimal", _DECIMAL),
                          ("mixed number", _MIXED), ("fraction", _FRACTION)):
        if pattern.fullmatch(text):
            return form
    if _SCIENTIFIC.search(text):
        return "scientific"
    if "=" in text:
        return "equation"
    if "\\" in text:
        return "latex"
    if _DIGIT.search(text):
        return "with units or currency"
    return "words"


def labelled_files(path: Path) -> list[Path]:
    """The files to audit: `path` itself, or the verified.jsonl (else sft_r1_all.jsonl) files under it."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    for name in (VERIFIED, "sft_r1_all.jsonl"):
        found = sorted(path.rglob(name))
        if found:
            return found
    raise DataError(f"{path}: no verified.jsonl or sft_r1_all.jsonl under it; give a file of verified rows")


def read_rows(files: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for f in files:
        for lineno, row in iter_jsonl_numbered(f, required=REQUIRED):
            rows.append({**row, "_where": f"{f}:{lineno}"})
    if not rows:
        raise DataError(f"{', '.join(map(str, files))}: no rows")
    return rows


def audit(rows: list[dict[str, Any]], n: int = 50, seed: int = 0) -> dict[str, Any]:
    """Counts per failure class and per answer form, and the sample of accepted rows."""
    failures = Counter(str(r.get("failure")) for r in rows)
    forms: Counter[str] = Counter()
    accepted_forms: Counter[str] = Counter()
    accepted = []
    for r in rows:
        form = answer_form(r.get("predicted"))
        forms[form] += 1
        if r.get("is_correct") is True:
            accepted_forms[form] += 1
            accepted.append((form, r))
    rng = random.Random(seed)
    rng.shuffle(accepted)
    accepted.sort(key=lambda fr: (fr[0] == "integer", accepted_forms[fr[0]]))  # unusual first, stable
    return {"rows": len(rows), "accepted": sum(accepted_forms.values()), "failures": failures,
            "forms": forms, "accepted_forms": accepted_forms, "sample": accepted[:n]}


def _cell(text: Any, width: int) -> str:
    s = " ".join(str(text if text is not None else "").split()).replace("|", "\\|")
    return s if len(s) <= width else "…" + s[-(width - 1):]


def render(result: dict[str, Any], source: str) -> str:
    lines = [f"# Verifier audit: {source}", "",
             f"{result['rows']} rows, {result['accepted']} accepted as correct.", "",
             "| failure class | rows | share |", "| --- | --- | --- |"]
    for name, count in result["failures"].most_common():
        lines.append(f"| {name} | {count} | {count / result['rows']:.1%} |")
    lines += ["", "| answer form | rows | accepted |", "| --- | --- | --- |"]
    for form in FORMS:
        if result["forms"][form]:
            lines.append(f"| {form} | {result['forms'][form]} | {result['accepted_forms'][form]} |")
    sample = result["sample"]
    lines += ["", f"## {len(sample)} accepted traces to read (unusual forms first)", "",
              "Mark each that is not really right. k of n marked puts the false-positive rate near k/n."]
    if sample:
        lo0, hi0 = wilson(0, len(sample))
        lo1, hi1 = wilson(1, len(sample))
        lines.append(f"With n = {len(sample)}: k = 0 gives [{lo0:.1%}, {hi0:.1%}], k = 1 gives "
                     f"[{lo1:.1%}, {hi1:.1%}] (95% Wilson).")
    lines += ["", "| # | form | answer | ground truth | end of response | row |", "| --- | --- | --- | --- | --- | --- |"]
    for i, (form, r) in enumerate(sample, 1):
        lines.append(f"| {i} | {form} | {_cell(r.get('predicted'), 40)} | {_cell(r.get('ground_truth'), 20)} | "
                     f"{_cell(r.get('response'), 100)} | {_cell(r['_where'], 60)} |")
    return "\n".join(lines) + "\n"


def run(path: str | Path, n: int = 50, seed: int = 0) -> Path:
    """Audit `path` (a file of verified rows or a directory holding them); returns audit.md's path."""
    path = Path(path)
    files = labelled_files(path)
    text = render(audit(read_rows(files), n, seed), str(path))
    out = (path.parent if path.is_file() else path) / "audit.md"
    atomic_write_text(out, text)
    print(text, end="")
    say(f"audit: wrote {out}")
    return out


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="exit-loop audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a verified.jsonl (or an all split), a round directory or a run directory")
    parser.add_argument("--n", type=int, default=50, help="accepted traces to sample (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    a = parser.parse_args(argv)
    if a.n < 0:
        parser.error("--n must be at least 0")
    run(a.path, a.n, a.seed)
    return 0
