"""Re-label stored traces with the verifier as it is now (or another task's) without sampling
again, and say what changed.

    exit-loop reverify runs/exit_gsm8k                    # every verified.jsonl under the run
    exit-loop reverify data/gsm8k/sft_r1_all.jsonl        # a generation's all split carries its labels
    exit-loop reverify runs/exit_math/round_01 --task math --examples 5

For each labelled row (`response`, `ground_truth` and the stored `is_correct` and `failure`: a
`verified.jsonl`, else an all split; a directory is searched as `exit-loop audit` searches it)
the verdict is computed again and compared with the stored one. The diff counts the rows whose
verdict changed, by stored → new failure class (`wrong → none` is a trace the verifier now
accepts, `none → ambiguous` one it no longer does), with `--examples` rows of each change (file
and line, both answers, the ground truth, the end of the response). It goes to reverify.md and
reverify.json beside the file (or in the directory; `--output_dir` elsewhere); the stored rows are
only read. A verifier change is then a number a reviewer can check: how many accepted traces it
adds or removes, and which.

    exit-loop reverify data/gsm8k --rewrite               # and rewrite that generation's splits

`--rewrite` (a generation's output directory, `exit-loop generate --output_dir`): the relabelled
all split goes through the generation's own filter settings again, so its correct and formatted
splits and summary.json follow the new verdicts; the files replaced are kept beside them first
(`sft_r1_correct.before_reverify_00.jsonl`, ...), and the generation's manifest gets the new
counts and file hashes and a `reverified` entry (task, changes, where the old files went).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from exit_loop.audit import labelled_files, read_rows
from exit_loop.config import load_config
from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.filter import MANIFEST_COUNTS, FilterConfig, write_splits
from exit_loop.jsonl import atomic_write_text, sha256_file, write_json
from exit_loop.rundir import MANIFEST, SUMMARY
from exit_loop.tasks import TASKS
from exit_loop.verify import verify_rows

TAIL = 160  # characters of a response shown in an example


def reverify(rows: list[dict[str, Any]], task: str = "gsm8k", examples: int = 3,
             relabelled: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The stored verdicts of `rows` against the verifier's now: counts per change of failure
    class, how many verdicts flipped each way, and up to `examples` rows of each change. The
    relabelled rows are appended to `relabelled` where it is given."""
    changes: Counter[str] = Counter()
    shown: dict[str, list[dict[str, Any]]] = {}
    accepted_now = accepted_before = newly = no_longer = 0
    for old, new in zip(rows, verify_rows(({k: v for k, v in r.items() if k != "_where"} for r in rows), task=task)):
        if relabelled is not None:
            relabelled.append(new)
        was, now = old.get("is_correct") is True, new["is_correct"] is True
        accepted_before += was
        accepted_now += now
        newly += now and not was
        no_longer += was and not now
        if was == now and old.get("failure") == new["failure"]:
            continue
        change = f"{old.get('failure')} → {new['failure']}"
        changes[change] += 1
        if len(shown.setdefault(change, [])) < examples:
            shown[change].append({"where": old["_where"], "predicted_before": old.get("predicted"),
                                  "predicted_now": new["predicted"], "ground_truth": old.get("ground_truth"),
                                  "response_end": " ".join(str(old.get("response") or "").split())[-TAIL:]})
    return {"task": task, "rows": len(rows), "accepted_before": accepted_before, "accepted_now": accepted_now,
            "changed": sum(changes.values()), "newly_accepted": newly, "no_longer_accepted": no_longer,
            "changes": dict(changes.most_common()), "examples": shown}


def render(diff: dict[str, Any], source: str) -> str:
    lines = [f"# Verifier diff: {source}", "",
             f"{diff['rows']} stored rows re-labelled with the `{diff['task']}` verifier: {diff['changed']} changed "
             f"({diff['newly_accepted']} newly accepted, {diff['no_longer_accepted']} no longer accepted); accepted "
             f"{diff['accepted_before']} → {diff['accepted_now']}.", ""]
    if diff["changes"]:
        lines += ["| stored → now | rows |", "| --- | --- |"]
        lines += [f"| {change} | {n} |" for change, n in diff["changes"].items()]
    for change, rows in diff["examples"].items():
        lines += ["", f"## {change}", "", "| row | answer before | answer now | ground truth | end of response |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            cells = [r["where"], r["predicted_before"], r["predicted_now"], r["ground_truth"], r["response_end"]]
            lines.append("| " + " | ".join(str(c if c is not None else "").replace("|", "\\|") for c in cells) + " |")
    if "rewritten" in diff:
        kept = ", ".join(diff["rewritten"]["kept"].values())
        lines += ["", f"The generation's splits were written again from these verdicts: "
                      f"{diff['rewritten']['correct_split_rows']} rows in the correct split; the old files kept as {kept}."]
    return "\n".join(lines) + "\n"


def generation(path: Path) -> tuple[dict[str, Any], FilterConfig]:
    """The manifest and filter settings of the generation in directory `path` (for `--rewrite`)."""
    manifest_path = path / MANIFEST
    if not path.is_dir() or not manifest_path.exists():
        raise DataError(f"{path}: --rewrite takes a generation's output directory (exit-loop generate's "
                        f"--output_dir, with its {MANIFEST}); no {manifest_path}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("stage") != "generate":
        raise DataError(f"{manifest_path}: stage {manifest.get('stage')!r}, not a generation's; --rewrite rewrites "
                        "only the splits `exit-loop generate` wrote (a run's rounds keep their verified.jsonl)")
    filter_keys = (manifest.get("config") or {}).get("filter") or {}
    return manifest, load_config(FilterConfig, None, [], {**filter_keys, "output_dir": str(path), "input": None,
                                                          "push_to_hub": None})


def rewrite(path: Path, manifest: dict[str, Any], fcfg: FilterConfig, rows: list[dict[str, Any]],
            diff: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Keep the generation's splits and summary beside them, write them again from the relabelled
    `rows`, then its manifest (last: counts, hashes, a `reverified` entry). Returns the summary
    and where each replaced file was kept."""
    names = (fcfg.all_name, fcfg.correct_name, fcfg.formatted_name, SUMMARY)
    n = 0
    while any((path / kept_name(name, n)).exists() for name in names):
        n += 1
    kept = {}
    for name in names:
        if (path / name).exists():
            shutil.copy2(path / name, path / kept_name(name, n))
            kept[name] = kept_name(name, n)
    summary = write_splits(rows, fcfg)
    manifest["counts"] = {k: summary[k] for k in MANIFEST_COUNTS}
    manifest.setdefault("files", {}).update({name: sha256_file(path / name) for name in (fcfg.all_name, fcfg.correct_name)})
    manifest.setdefault("reverified", []).append({
        "task": diff["task"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "changed": diff["changed"],
        "newly_accepted": diff["newly_accepted"], "no_longer_accepted": diff["no_longer_accepted"],
        "changes": diff["changes"], "kept": kept})
    write_json(path / MANIFEST, manifest)
    return summary, kept


def kept_name(name: str, n: int) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.before_reverify_{n:02d}.{ext}" if dot else f"{name}.before_reverify_{n:02d}"


def run(path: str | Path, task: str = "gsm8k", examples: int = 3, output_dir: str | Path | None = None,
        rewrite_splits: bool = False) -> Path:
    """Re-label what `path` holds, write reverify.md and reverify.json (and with `rewrite_splits`
    the generation's splits again); returns reverify.md's path."""
    path = Path(path)
    relabelled: list[dict[str, Any]] | None = None
    if rewrite_splits:
        manifest, fcfg = generation(path)
        files, relabelled = [path / fcfg.all_name], []
    else:
        files = labelled_files(path)
    diff = reverify(read_rows(files), task, examples, relabelled)
    out = Path(output_dir) if output_dir else (path.parent if path.is_file() else path)
    out.mkdir(parents=True, exist_ok=True)
    if relabelled is not None:
        summary, kept = rewrite(path, manifest, fcfg, relabelled, diff)
        diff["rewritten"] = {"correct_split_rows": summary["correct_split_rows"], "kept": kept}
    write_json(out / "reverify.json", {"source": str(path), **diff})
    atomic_write_text(out / "reverify.md", render(diff, str(path)))
    say(f"reverify: {diff['changed']} of {diff['rows']} verdicts changed ({diff['newly_accepted']} newly accepted, "
        f"{diff['no_longer_accepted']} no longer) -> {out / 'reverify.md'}")
    return out / "reverify.md"


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop reverify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a verified.jsonl (or an all split), a round directory or a run directory")
    p.add_argument("--task", choices=list(TASKS), default="gsm8k", help="the verifier to label with (default gsm8k)")
    p.add_argument("--examples", type=int, default=3, help="rows shown per change of class (default 3)")
    p.add_argument("--output_dir", help="where reverify.md/json go (default: beside the file, or in the directory)")
    p.add_argument("--rewrite", action="store_true",
                   help="PATH is a generation's output directory: write its splits and summary again from the new "
                        "verdicts (the old ones kept beside them, *.before_reverify_NN.*)")
    a = p.parse_args(argv)
    if a.examples < 0:
        p.error("--examples must be at least 0")
    run(a.path, a.task, a.examples, a.output_dir, a.rewrite)
    return 0
