"""The words of a run directory, in one place: what the loop writes (exit_loop.pipeline.run) and
what `exit-loop compare` reads are the same names.

    <runs_dir>/<experiment>/            config.yaml
        seed_<s>/                       an experiment of several seeds: one directory a seed
            <arm>/                      an experiment of several arms: one directory an arm
                round_<kk>/             round k, two digits (round_00, round_01, ...)
                    eval/               eval.json, greedy.jsonl (the greedy pass@1 rows)
                    sample/             samples.jsonl (shards/ while a sharded draw runs)
                    verify/             verified.jsonl
                    filter/             summary.json and the splits
                    train/              ckpt/
            shared/round_00/<stage>/    round 0's eval, sample and verify, made once for every arm
    every stage directory: manifest.json, written last (the stage is done when it is there)

No imports from the rest of the package: any module may use it.
"""

from __future__ import annotations

import re
from pathlib import Path

# a round's stages in the order they run: eval first (it measures the policy that then samples)
STAGES = ("eval", "sample", "verify", "filter", "train")
# the order a report lists a round's times in: what the round made, then the eval of what it made
TIME_COLUMNS = (*STAGES[1:], STAGES[0])
# round 0's stages made once for every arm, in SHARED/round_00/
SHARED_STAGES = ("eval", "sample", "verify")
SHARED = "shared"

MANIFEST = "manifest.json"
SAMPLES = "samples.jsonl"      # sample/
VERIFIED = "verified.jsonl"    # verify/
# STaR rationalization (policy.rationalize): the hinted draws of the questions no sample solved, and
# their labels, beside (never in) the student's own samples, so no pass rate counts them
SAMPLES_HINTED = "samples_hinted.jsonl"    # sample/
VERIFIED_HINTED = "verified_hinted.jsonl"  # verify/
SUMMARY = "summary.json"       # filter/
EVAL = "eval.json"             # eval/
GREEDY = "greedy.jsonl"        # eval/

ROUND_RE = re.compile(r"round_(\d+)")
SEED_RE = re.compile(r"seed_(-?\d+)")


def round_name(k: int) -> str:
    """Round k's directory name: round_00, round_01, ..."""
    return f"round_{k:02d}"


def seed_name(seed: int) -> str:
    """A seed's directory name in an experiment of several seeds: seed_0, seed_1, ..."""
    return f"seed_{seed}"


def round_dirs(path: Path) -> dict[int, Path]:
    """The round directories directly under a run (an arm's) directory, by round number."""
    out = {}
    for d in path.iterdir():
        m = ROUND_RE.fullmatch(d.name)
        if m and d.is_dir():
            out[int(m.group(1))] = d
    return out


def seed_dirs(path: Path) -> list[tuple[int, Path]]:
    """An experiment's `seed_<s>/` directories (it ran several seeds), by seed."""
    out = []
    for d in path.iterdir():
        m = SEED_RE.fullmatch(d.name)
        if m and d.is_dir():
            out.append((int(m.group(1)), d))
    return sorted(out)
