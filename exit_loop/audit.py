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

Reading the sample is how a researcher estimates the verifier's false-positive rate on this run.
Beside audit.md, `audit_labels.jsonl` holds the sample, one row a trace with `"verdict": null`:
set each read trace's verdict to "right" or "wrong" (or answer them one by one with
`--interactive`), and the next audit of the same path reads them back (the file is never
overwritten) and reports the false-positive rate, k wrong of n read, with its exact
(Clopper–Pearson) 95% interval, and what it implies for the accepted rows: about k/n of them,
within the interval, are likely wrong.

    exit-loop audit runs/exit_gsm8k/round_01 --interactive     # read and mark the sample here
    exit-loop audit runs/exit_gsm8k/round_01 --labels my_labels.jsonl
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.jsonl import atomic_write_text, iter_jsonl_numbered, write_jsonl
from exit_loop.rundir import VERIFIED
from exit_loop.stats import clopper_pearson

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


LABELS = "audit_labels.jsonl"
VERDICTS = ("right", "wrong")


def label_rows(sample: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The sample as rows of a labels file, each with `verdict` null for the reader to set."""
    return [{"where": r["_where"], "problem_id": r.get("problem_id"), "sample_index": r.get("sample_index"),
             "form": form, "predicted": r.get("predicted"), "ground_truth": r.get("ground_truth"),
             "response": r.get("response"), "verdict": None} for form, r in sample]


def read_labels(path: Path) -> list[dict[str, Any]]:
    """A labels file's rows, each verdict null, "right" or "wrong" (a DataError naming the line)."""
    rows = []
    for lineno, row in iter_jsonl_numbered(path, required=("verdict",)):
        if row["verdict"] is not None and row["verdict"] not in VERDICTS:
            raise DataError(f"{path}:{lineno}: key 'verdict': expected \"right\", \"wrong\" or null, "
                            f"got {row['verdict']!r}")
        rows.append(row)
    return rows


def false_positives(labels: list[dict[str, Any]], accepted: int) -> dict[str, Any] | None:
    """k wrong of n read, the rate's exact 95% interval, and the accepted rows it puts in doubt."""
    read = [r["verdict"] for r in labels if r["verdict"] is not None]
    if not read:
        return None
    k, n = read.count("wrong"), len(read)
    lo, hi = clopper_pearson(k, n)
    return {"wrong": k, "read": n, "rate": k / n, "ci95": [lo, hi], "accepted": accepted,
            "likely_wrong": round(accepted * k / n), "likely_wrong_ci95": [math.floor(accepted * lo),
                                                                          math.ceil(accepted * hi)]}


def ask(labels: list[dict[str, Any]], ask_line=input, show=print) -> None:
    """Each unread label shown, and its verdict asked: y (right), n (wrong), s (skip), q (stop)."""
    for i, row in enumerate(labels, 1):
        if row["verdict"] is not None:
            continue
        show(f"\n[{i}/{len(labels)}] {row['where']}\n  answer {row['predicted']!r}, ground truth "
             f"{row['ground_truth']!r}\n  ...{' '.join(str(row['response'] or '').split())[-300:]}")
        answer = "?"
        while answer not in ("y", "n", "s", "q", ""):  # Enter skips
            try:
                answer = ask_line("really right? [y]es / [n]o / [s]kip / [q]uit: ").strip().lower()[:1]
            except EOFError:  # input closed: what was answered is kept
                return
        if answer == "q":
            return
        if answer in ("y", "n"):
            row["verdict"] = "right" if answer == "y" else "wrong"


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
              f"Set each one's verdict in {LABELS} (\"right\" or \"wrong\"; or `--interactive`): the next audit "
              "reports the false-positive rate with its exact interval."]
    if sample:
        hi0 = clopper_pearson(0, len(sample))[1]
        lo1, hi1 = clopper_pearson(1, len(sample))
        lines.append(f"With all {len(sample)} read: none wrong bounds the rate below {hi0:.1%}, one wrong gives "
                     f"[{lo1:.1%}, {hi1:.1%}] (exact 95%).")
    lines += ["", "| # | form | answer | ground truth | end of response | row |", "| --- | --- | --- | --- | --- | --- |"]
    for i, (form, r) in enumerate(sample, 1):
        lines.append(f"| {i} | {form} | {_cell(r.get('predicted'), 40)} | {_cell(r.get('ground_truth'), 20)} | "
                     f"{_cell(r.get('response'), 100)} | {_cell(r['_where'], 60)} |")
    fp = result.get("false_positives")
    if fp:
        lo, hi = fp["ci95"]
        lines += ["", "## False-positive rate, from the traces read", "",
                  f"{fp['wrong']} of {fp['read']} accepted traces read are wrong: {fp['rate']:.1%}, exact 95% interval "
                  f"[{lo:.1%}, {hi:.1%}] (Clopper–Pearson). Of the {fp['accepted']} accepted rows, about "
                  f"{fp['likely_wrong']} [{fp['likely_wrong_ci95'][0]}, {fp['likely_wrong_ci95'][1]}] are likely wrong."]
    return "\n".join(lines) + "\n"


def run(path: str | Path, n: int = 50, seed: int = 0, labels: str | Path | None = None,
        interactive: bool = False) -> Path:
    """Audit `path` (a file of verified rows or a directory holding them); returns audit.md's path.
    The labels file (`labels`, else audit_labels.jsonl beside audit.md) is written with the sample
    where it does not exist yet, else read: its verdicts give the false-positive rate."""
    path = Path(path)
    files = labelled_files(path)
    result = audit(read_rows(files), n, seed)
    out = (path.parent if path.is_file() else path) / "audit.md"
    labels_file = Path(labels) if labels else out.with_name(LABELS)
    marks = read_labels(labels_file) if labels_file.exists() else label_rows(result["sample"])
    if interactive:
        ask(marks)
    if interactive or not labels_file.exists():
        write_jsonl(labels_file, marks)  # the reader's verdicts so far, never lost
    result["false_positives"] = false_positives(marks, result["accepted"])
    text = render(result, str(path))
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
    parser.add_argument("--labels", help=f"the labels file (default {LABELS} beside audit.md): written with the "
                                         "sample if absent, else its verdicts are read")
    parser.add_argument("--interactive", action="store_true",
                        help="show each unread trace and ask its verdict (y/n/s/q); the answers go to the labels file")
    a = parser.parse_args(argv)
    if a.n < 0:
        parser.error("--n must be at least 0")
    run(a.path, a.n, a.seed, a.labels, a.interactive)
    return 0
