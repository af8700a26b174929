"""Round metrics in TensorBoard and W&B: `report_to: [tensorboard, wandb]` at the top of a run's
config (either, or both).

    exit-loop run configs/exit_gsm8k_qwen2.5-math-1.5b.yaml report_to=[tensorboard]
    tensorboard --logdir runs/exit_gsm8k/tensorboard

One tracker run per arm and seed (`<arm>-seed<S>`), grouped by experiment: TensorBoard runs live
in `runs/<experiment>/tensorboard/<arm>-seed<S>/`, W&B runs carry `group=<experiment>` (project
from WANDB_PROJECT, default `exit-loop`; entity, mode and API key from wandb's own environment
variables, WANDB_ENTITY, WANDB_MODE, WANDB_API_KEY, never from a file). After each round the loop
logs, at step = round: held-out eval numbers (`eval/accuracy`, `eval/pass@k`, ...), the filter's
(`filter/yield`, `filter/question_coverage`, ...), tokens (`sample/tokens_generated`,
`train/tokens`) and each stage's wall time (`time/<stage>_s`), read with `exit-loop compare`'s
reader, so they are report.json's numbers. A resumed run logs its rounds again, at the same steps.

Each round's SFT run goes to the same trackers through TRL's own `report_to`, named
`<arm>-seed<S>/sft-round_KK` (TensorBoard: a sub-run of the arm's; W&B: a run of the same group).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from exit_loop.report.read import FoundRun
from exit_loop.report.read import read_run
from exit_loop.jsonl import write_json
from exit_loop.rundir import SUMMARY
from exit_loop.pipeline.run import Run

TRACKERS = ("tensorboard", "wandb")
WANDB_DEFAULT_PROJECT = "exit-loop"
FILTER_KEYS = ("trace_accuracy", "question_coverage", "correct_split_rows", "mean_tokens_correct",
               "mean_tokens_incorrect")


def run_name(run: Run, arm: str) -> str:
    return f"{arm}-seed{run.cfg.seed}"


def sft_run_name(run: Run, arm: str, k: int) -> str:
    return f"{run_name(run, arm)}/sft-round_{k:02d}"


def tensorboard_dir(run: Run, arm: str) -> Path:
    return run.root / "tensorboard" / run_name(run, arm)


def round_scalars(run: Run, arm: str, k: int) -> dict[str, float]:
    """Round k's numbers as report.json holds them (read by `exit-loop compare`'s reader), plus
    the filter summary's; a number the round does not hold is left out."""
    report = read_run(FoundRun(path=run.arm_dir(arm), arm=arm, experiment=run.cfg.experiment,
                                experiment_dir=None, info=None))
    out: dict[str, Any] = {}
    for key in ("accuracy", "pass@k", "maj@k", "format_error_rate", "mean_response_tokens"):
        out[f"eval/{key}"] = report[key][k]
    out["filter/yield"] = report["yield"][k]
    out["sample/tokens_generated"] = report["tokens_generated"][k]
    out["train/tokens"] = report["training_tokens"][k]
    out["sample/distinct_answers"] = report["distinct_answers"][k]
    out["sample/distinct_traces"] = report["distinct_traces"][k]
    out["train/repeated_share"] = report["repeated_training_share"][k]
    for stage, values in report["wall_time_s"].items():
        out[f"time/{stage}_s"] = values[k]
    summary = run.stage_dir(arm, k, "filter") / SUMMARY
    if summary.exists():
        data = json.loads(summary.read_text(encoding="utf-8"))
        out.update({f"filter/{key}": data.get(key) for key in FILTER_KEYS})
    return {key: float(v) for key, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """The arm's tracker runs (TensorBoard writer, W&B run), opened by `open_tracker`."""

    def __init__(self, run: Run, arm: str):
        self.run, self.arm = run, arm
        self.tb = None
        self.wandb = "wandb" in run.cfg.report_to
        if "tensorboard" in run.cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir(run, arm)))

    def log_round(self, k: int) -> dict[str, float]:
        scalars = round_scalars(self.run, self.arm, k)
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, global_step=k)
            self.tb.flush()
        if self.wandb:  # open only while logging: a round's SFT run (in this process or not) is its own
            w = _wandb_init(self.run, self.arm)
            w.log({"round": k, **scalars})
            w.finish()
        return scalars

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def open_tracker(run: Run, arm: str) -> Tracker | None:
    return Tracker(run, arm) if run.cfg.report_to else None


def _wandb_init(run: Run, arm: str):
    """The arm's W&B run; its id is kept in `<arm dir>/wandb.json`, so every round (and a resumed
    run) continues the same run."""
    import wandb

    ids = run.arm_dir(arm) / "wandb.json"
    run_id = json.loads(ids.read_text())["id"] if ids.exists() else secrets.token_hex(6)
    write_json(ids, {"id": run_id})
    w = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT), group=run.cfg.experiment,
                   name=run_name(run, arm), id=run_id, resume="allow", dir=str(run.root),
                   job_type="exit-rounds", config={"experiment": run.cfg.experiment, "arm": arm,
                                                   "seed": run.cfg.seed, "split": run.cfg.arms[arm].split})
    w.define_metric("round")
    w.define_metric("*", step_metric="round")
    return w


def sft_tracking(run: Run, arm: str, k: int) -> tuple[dict[str, Any], dict[str, str]]:
    """What round k's SFT run needs to report to the run's trackers: `sft` keys for TRL
    (`report_to`, `run_name`; ones the config sets itself are kept) and environment variables
    for transformers' callbacks (TensorBoard's log dir; W&B's project, group and directory)."""
    trackers = list(run.cfg.report_to)
    if not trackers:
        return {}, {}
    sft = {"report_to": trackers, "run_name": re.sub(r"/", "-", sft_run_name(run, arm, k))}
    env: dict[str, str] = {}
    if "tensorboard" in trackers:
        env["TENSORBOARD_LOGGING_DIR"] = str(run.root / "tensorboard" / sft_run_name(run, arm, k))
    if "wandb" in trackers:
        env["WANDB_PROJECT"] = os.environ.get("WANDB_PROJECT", WANDB_DEFAULT_PROJECT)
        env["WANDB_RUN_GROUP"] = run.cfg.experiment
        env["WANDB_DIR"] = str(run.root)
    return sft, env
