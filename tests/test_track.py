"""Round metrics to TensorBoard and W&B (exit_loop/pipeline/track.py), read back with the
trackers' own readers: TensorBoard's EventAccumulator, and W&B's offline run file decoded with
wandb's own protobuf schema. The runs are built by hand as the loop writes them (no model); the
tiny ExIt run of test_loop.py checks the same against a real run."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from exit_loop.report import compare
from exit_loop.config import ConfigError, load_config
from exit_loop.pipeline.run import ExperimentConfig, Run
from exit_loop.pipeline.track import open_tracker, sft_tracking, tensorboard_dir

from helpers import make_run, report_scalars, tensorboard_scalars

ACC = [0.10, 0.25, 0.40]


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): W&B's LevelDB-style log (a 7-byte
    header, then 32 KiB blocks of records, each a CRC32, a length, a type: full, first, middle,
    last), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # padding at a block's end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            yield rec


def experiment_cfg(tmp: Path, *extra: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, [f"runs_dir={tmp}", "student=x/y", "experiment=tracked",
                                                f"rounds={len(ACC) - 1}", *extra])


def test_round_scalars_in_tensorboard_and_wandb_equal_the_report(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = Run(experiment_cfg(tmp_path, "report_to=[tensorboard, wandb]", "seed=3"))
    make_run(run.root, "tracked", "main", ACC)
    tracker = open_tracker(run, "main")
    for k in range(len(ACC)):
        tracker.log_round(k)
    tracker.close()
    report = json.loads((compare([run.root], tmp_path / "report") / "report.json").read_text())["arms"]["main"]
    want = {k: report_scalars(report, k) for k in range(len(ACC))}
    assert want[0]["eval/accuracy"] == 0.10 and want[1]["time/train_s"] == 50.0  # the hand-built run

    assert tensorboard_dir(run, "main") == run.root / "tensorboard" / "main-seed3"
    tb = tensorboard_scalars(tensorboard_dir(run, "main"))
    for k, scalars in want.items():
        for key, value in scalars.items():
            assert tb[key][k] == pytest.approx(value, rel=1e-6), (key, k)
    assert tb["filter/question_coverage"] == {0: pytest.approx(0.6), 1: pytest.approx(0.6)}
    assert 2 not in tb["filter/yield"]  # the last round holds only its eval

    run_id = json.loads((run.root / "wandb.json").read_text())["id"]
    files = sorted((run.root / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(files) == len(ACC)  # the same run, resumed for each round
    history, meta = {}, None
    for rec in (r for f in files for r in wandb_records(f)):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            meta = rec.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            history[row["round"]] = row
    assert meta.display_name == "main-seed3" and meta.run_group == "tracked" and meta.project == "exit-loop"
    assert meta.run_id == run_id
    for k, scalars in want.items():
        for key, value in scalars.items():
            assert history[k][key] == pytest.approx(value, rel=1e-6), (key, k)


def test_sft_runs_are_named_to_match(tmp_path: Path):
    run = Run(experiment_cfg(tmp_path, "report_to=[tensorboard, wandb]", "arms={a: {}, b: {split: all}}"))
    sft, env = sft_tracking(run, "b", 1)
    assert sft == {"report_to": ["tensorboard", "wandb"], "run_name": "b-seed0-sft-round_01"}
    assert env["TENSORBOARD_LOGGING_DIR"] == str(run.root / "tensorboard" / "b-seed0" / "sft-round_01")
    assert env["WANDB_RUN_GROUP"] == "tracked" and env["WANDB_DIR"] == str(run.root)
    assert sft_tracking(Run(experiment_cfg(tmp_path)), "main", 0) == ({}, {})


def test_report_to_names_the_trackers(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"report_to\[0\].*'tensorboard', 'wandb'.*mlflow"):
        experiment_cfg(tmp_path, "report_to=[mlflow]")
