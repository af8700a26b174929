"""Compare finished runs: accuracy per round per arm, yield, tokens and wall time per stage,
written as report.md, report.json, accuracy.png and response_length.png.

    exit-loop compare runs/compare_filtered_unfiltered
    exit-loop compare runs/exit_a runs/exit_b --output_dir reports/a_vs_b

Each RUN_DIR is either one run (it holds round_00/, round_01/, ... directly) or an experiment
directory whose subdirectories are runs, one per arm, each with its run.json. Arms are named by
run.json's `arm` (else the directory's name); two runs with the same arm name are told apart by
their experiment's name (`exp_a/main`, `exp_b/main`).

Round k's eval measures the policy that samples in round k: round 0 is the starting student,
the last round (which holds only eval/) is the final checkpoint. A value a run does not hold is
null in report.json and a dash in report.md, never estimated.

Every accuracy carries its 95% Wilson interval over the held-out questions (`accuracy_ci95`,
from each round's `eval/greedy.jsonl`, else from eval.json's n); each pair of arms, at each round
both evaluated, gets the paired difference on the same questions with a 95% paired-bootstrap
interval and an exact McNemar p-value (`paired`: `{a, b, round, diff, ci95, p_mcnemar, n}`).
Arms evaluated on different questions are refused (`--allow_mismatch` pairs them on the
questions they share).

The report goes to the experiment directory all the runs share, else the first RUN_DIR, unless
--output_dir says otherwise. Run directories are only read; the report files are the only
thing written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from exit_loop.console import say
from exit_loop.jsonl import atomic_write_text, write_json
from exit_loop.report.build import build_report
from exit_loop.report.read import default_out_dir, find_runs
from exit_loop.report.render import paired_lines, render_markdown, summary_line, write_plots

log = logging.getLogger(__name__)


def compare(run_dirs: list[Path], out_dir: Path | None = None, allow_mismatch: bool = False) -> Path:
    """Read the runs, write report.json, the two PNGs and report.md to `out_dir`; return `out_dir`."""
    return _compare(run_dirs, out_dir, allow_mismatch)[0]


def _compare(run_dirs: list[Path], out_dir: Path | None, allow_mismatch: bool = False
             ) -> tuple[Path, dict[str, Any], list[str]]:
    runs = find_runs([Path(p) for p in run_dirs])
    report = build_report(runs, allow_mismatch)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(runs, run_dirs)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    note = None
    try:
        plots = write_plots(report, out_dir)
    except ImportError:
        plots, note = [], "Plots not drawn: matplotlib is not installed (`pip install matplotlib`)."
        log.warning("compare: %s", note)
    atomic_write_text(out_dir / "report.md", render_markdown(report, plots, note))
    return out_dir, report, ["report.json", *plots, "report.md"]


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="exit-loop compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run directory (round_* inside) or an experiment directory (one run per arm)")
    p.add_argument("--output_dir", help="where the report goes (default: the runs' common experiment "
                                        "directory, else the first RUN_DIR)")
    p.add_argument("--allow_mismatch", action="store_true",
                   help="pair arms evaluated on different questions on the questions they share")
    a = p.parse_args(argv)
    out, report, written = _compare([Path(d) for d in a.run_dirs], Path(a.output_dir) if a.output_dir else None,
                                    a.allow_mismatch)
    for name, arm in report["arms"].items():
        say(summary_line(name, arm).replace("**", ""))
    for line in paired_lines(report, last_only=True):
        say(line)
    say(f"compare: wrote {', '.join(written)} in {out}")
    return 0
