"""`exit-loop slurm`: the job graph, scripts and config checks (pure), and, on a real local SLURM
(`.ci/run` starts one; `bash ../shared/tools/slurm/start_slurm.sh` as root for development):
a 2-round ExIt run whose outputs match `exit-loop run`; a generation array task cancelled (and
another requeued by its USR1 trap) mid-way, then resubmitted with no lost or duplicated rows; a
failed stage whose dependents never run, shown by `slurm status`, resubmitted after the fix."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from exit_loop.config import ConfigError, load_config
from exit_loop.jsonl import read_jsonl
from exit_loop.pipeline.slurm import command, plan
from exit_loop.pipeline.slurm.script import array_ranges, shell_word

from helpers import SLURM, SLURM_HF, cli, exit_config, logs, wait_idle


# --------------------------------------------------------------------------- pure parts


def test_ranges_and_shell_words():
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_ranges([3]) == "3"
    assert shell_word("sample.shard_id={shard}") == 'sample.shard_id="$SLURM_ARRAY_TASK_ID"'
    assert shell_word("{shard}") == '"$SLURM_ARRAY_TASK_ID"'
    assert shell_word("a b") == "'a b'"
    assert shell_word("") == "''"


def test_dry_run_prints_every_stage_chained_and_submits_nothing(tmp_path: Path, capsys, gsm8k_dir: Path):
    cfg = exit_config(tmp_path, "dry", "org/model-1.5B", gsm8k_dir,
                      sample={"num_shards": 2, "tensor_parallel_size": 2},
                      slurm={**SLURM, "partition": "gpu", "account": "acct", "qos": "high", "extra": ["--exclusive"],
                             "rollout": {"time": "2:00:00"}, "train": {"gpus": 4, "mem": "0"},
                             "setup": ["module load cuda"]})
    assert command(["submit", str(cfg), "--dry-run", "rounds=1"]) == 0
    out = capsys.readouterr().out
    graph = out.split("dependency graph")[1].splitlines()[1:]
    assert [g.split()[0] for g in graph] == ["dry-r0-rollout", "dry-r0-merge", "dry-r0-verify", "dry-r0-filter",
                                             "dry-r0-train", "dry-r1-rollout"]
    assert "[array 0-1] after nothing" in graph[0]
    assert graph[1].endswith("after <dry-r0-rollout>") and graph[5].endswith("after <dry-r0-train>")
    scripts = {s.split("\n", 1)[0]: s for s in out.split("# ---- ")[1:]}
    rollout, train, verify = scripts["dry-r0-rollout"], scripts["dry-r0-train"], scripts["dry-r0-verify"]
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@60", "#SBATCH --partition=gpu",
                 "#SBATCH --account=acct", "#SBATCH --qos=high", "#SBATCH --exclusive", "module load cuda",
                 "scontrol requeue", f"#SBATCH --output={tmp_path / 'runs' / 'dry' / 'slurm' / 'logs'}"):
        assert line in rollout and line in train
    assert "#SBATCH --array=0-1" in rollout and "--time=2:00:00" in rollout and "--time=0:30:00" in train
    assert '--shard "$SLURM_ARRAY_TASK_ID"' in rollout and "stage rollout" in rollout
    assert "#SBATCH --gpus-per-node=2" in rollout  # unset: sample.tensor_parallel_size
    assert "#SBATCH --gpus-per-node=4" in train and "--mem=0" in train
    assert "accelerate.commands.launch --multi_gpu --num_processes 4" in train and "stage train" in train
    assert "--gpus-per-node" not in verify
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def dry_run_scripts(out: str) -> dict[str, str]:
    """name -> script, from `slurm submit --dry-run`'s output (`# ---- NAME` before each)."""
    return dict(s.split("\n", 1) for s in out.split("# ---- ")[1:])


def test_multi_node_training_runs_the_launcher_on_every_node(tmp_path: Path, capsys, gsm8k_dir: Path):
    """slurm.nodes=2: the train job holds two nodes and srun starts `accelerate launch` on each,
    with the node count, that node's rank and the first node's address from SLURM; the inner
    command is expanded by bash as a node would, with its SLURM_NODEID."""
    cfg = exit_config(tmp_path, "mn", "org/model-1.5B", gsm8k_dir,
                      slurm={**SLURM, "nodes": 2, "train": {"gpus": 4}})
    assert command(["submit", str(cfg), "--dry-run", "rounds=1"]) == 0
    scripts = dry_run_scripts(capsys.readouterr().out)
    train, rollout = scripts["mn-r0-train"], scripts["mn-r0-rollout"]
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in train and "#SBATCH --gpus-per-node=4" in train
    assert "#SBATCH --nodes=1\n#SBATCH --ntasks=1\n" in rollout and "srun" not in rollout  # only training spans nodes
    assert 'export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in train
    script = tmp_path / "train.sh"
    script.write_text(train)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # bash parses it
    (line,) = [ln for ln in train.splitlines() if ln.startswith("srun ")]
    srun = shlex.split(line)
    assert srun[:6] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]
    assert srun[7:] == ["&"]
    env = {"PATH": os.environ["PATH"], "SLURM_NODEID": "1", "MAIN_ADDR": "node-a", "SLURM_JOB_ID": "1234"}
    res = subprocess.run(["bash", "-c", "printf '%s\\n' " + srun[6]], env=env, capture_output=True, text=True)
    argv = res.stdout.splitlines()
    launch = argv[argv.index("accelerate.commands.launch"):]
    flags = dict(zip(launch[2:12:2], launch[3:12:2]))
    assert launch[1] == "--multi_gpu" and flags == {
        "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "node-a",
        "--main_process_port": str(20000 + 1234 % 20000), "--num_processes": "8"}
    assert launch[12:16] == ["-m", "exit_loop.cli", "stage", "train"]
    with pytest.raises(ConfigError, match="slurm.nodes must be at least 1"):
        plan(str(exit_config(tmp_path, "bad", "org/m", gsm8k_dir, slurm={**SLURM, "nodes": 0})), [], write=False)


def test_train_sft_script_matches_the_generated_jobs():
    text = (Path(__file__).resolve().parents[1] / "slurm" / "train_sft.sh").read_text()
    for line in ("#SBATCH --output=logs/%x-%j.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@", "scontrol requeue", "--num_machines \"$NODES\"",
                 "--machine_rank \"$SLURM_NODEID\""):
        assert line in text, line
    assert subprocess.run(["bash", "-n", "-c", text]).returncode == 0


@pytest.mark.slurm
def test_one_node_scripts_pass_sbatch_test_only(slurm_cluster, tmp_path: Path, capsys, gsm8k_dir: Path):
    """The local one-node SLURM accepts the rendered train job and slurm/train_sft.sh as they are
    (their resources scaled to it on the command line, which overrides #SBATCH lines)."""
    cfg = exit_config(tmp_path, "one", "org/model-1.5B", gsm8k_dir, slurm={**SLURM, "train": {"gpus": 2}})
    assert command(["submit", str(cfg), "--dry-run", "rounds=1"]) == 0
    script = tmp_path / "train.sh"
    script.write_text(dry_run_scripts(capsys.readouterr().out)["one-r0-train"])
    root = Path(__file__).resolve().parents[1]
    for path, extra in ((script, []), (root / "slurm" / "train_sft.sh", ["--gpus-per-node=2", "--cpus-per-task=1",
                                                                        "--time=0:10:00"])):
        res = subprocess.run(["sbatch", "--test-only", *extra, str(path)], capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0 and "to start at" in res.stderr, (path, res.stderr)


def test_multi_arm_runs_share_round_zero_once(tmp_path: Path, gsm8k_dir: Path):
    cfg = exit_config(tmp_path, "arms", "org/model", gsm8k_dir, rounds=1,
                      arms={"base": {"split": "original"}, "filtered": {"split": "correct"}})
    jobs, _, _ = plan(str(cfg), [], write=False)
    after = {j.name: j.after for j in jobs}
    assert list(after) == ["arms-r0-rollout", "arms-r0-verify",
                           "arms-base-r0-filter", "arms-base-r0-train", "arms-base-r1-rollout",
                           "arms-filtered-r0-filter", "arms-filtered-r0-train", "arms-filtered-r1-rollout"]
    assert after["arms-r0-verify"] == ["shared/r0/rollout"]
    assert after["arms-base-r0-filter"] == after["arms-filtered-r0-filter"] == ["shared/r0/verify"]
    assert "--arm filtered" in " ".join(jobs[0].argv)  # made by an arm that samples


def test_generation_config_is_detected(tmp_path: Path, gsm8k_dir: Path):
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "sample": {"model_name": "org/m"}}))
    jobs, _, slurm_dir = plan(str(path), ["sample.num_shards=3"])
    assert [(j.name, j.after) for j in jobs] == [("out-r0-generate", []), ("out-r0-merge", ["generate"])]
    assert jobs[0].shards() == [0, 1, 2] and "sample.shard_id={shard}" in jobs[0].argv
    assert slurm_dir == tmp_path / "out" / "slurm" and (slurm_dir / "config.yaml").exists()
    with pytest.raises(ConfigError, match="sample.num_samples"):  # the finished shards would not match
        plan(str(path), ["sample.num_shards=3", "sample.num_samples=4"])
    jobs, _, _ = plan(str(path), ["sample.num_shards=3", "slurm.time=1:00:00"])  # resources may change
    jobs, _, _ = plan(str(tmp_path / "out"), ["slurm.time=1:00:00"])
    assert len(jobs) == 2  # the output dir, as submitted before


def test_unquoted_time_is_refused_with_the_reason(tmp_path: Path):
    from exit_loop.pipeline.generate import GenerateConfig

    path = tmp_path / "g.yaml"
    path.write_text("slurm:\n  time: 12:00:00\n")
    with pytest.raises(ConfigError, match="quote it"):
        load_config(GenerateConfig, path)
    with pytest.raises(ConfigError, match="slurm.train.gpu"):
        load_config(GenerateConfig, None, ["slurm.train.gpu=2"])
    cfg = load_config(GenerateConfig, None, ["slurm.time=12:00:00", "slurm.train.gpus=8", "slurm.extra=[--exclusive]"])
    r = cfg.slurm.resources("train", 1)
    assert (r.time, r.gpus, r.extra) == ("12:00:00", 8, ["--exclusive"])
    assert cfg.slurm.resources("verify", 0).gpus == 0


# --------------------------------------------------------------------------- a real SLURM


def status(run_dir: Path) -> dict[str, str]:
    res = cli("slurm", "status", str(run_dir))
    assert res.returncode == 0, res.stderr
    return {line.split()[0]: line for line in res.stdout.splitlines()}


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and p.relative_to(root).parts[0] != "slurm" and p.name != "run.json"}


def labelled(path: Path) -> list[tuple]:
    return sorted((r["problem_id"], r["sample_index"], r["response"], r["is_correct"]) for r in read_jsonl(path))


# About 130 s on 2 cores, the slowest test, for a reason: a whole two-round ExIt run submitted as SLURM
# jobs (every stage its own job, engines and trainers started per job) against the same run done
# locally, compared row for row. Nothing smaller shows that the chained jobs compute what the loop does.
@pytest.mark.slurm
def test_exit_run_on_slurm_matches_a_local_run(slurm_cluster, tmp_path: Path, tiny_model_dir: Path, gsm8k_dir: Path,
                                               cancel_after: list[Path]):
    cfg = exit_config(tmp_path, "exs", tiny_model_dir, gsm8k_dir)
    cancel_after.append(tmp_path / "runs" / "exs" / "slurm")
    res = cli("slurm", "submit", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    names = [line.split(":")[0] for line in res.stdout.splitlines() if ": submitted job" in line]
    assert names == [f"exs-r{k}-{s}" for k in (0, 1) for s in ("rollout", "verify", "filter", "train")] + ["exs-r2-rollout"]
    # the same config, run locally meanwhile
    local_cfg = exit_config(tmp_path / "local", "exs", tiny_model_dir, gsm8k_dir)
    local = subprocess.Popen([sys.executable, "-m", "exit_loop", "run", str(local_cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    root, local_root = tmp_path / "runs" / "exs", tmp_path / "local" / "runs" / "exs"
    wait_idle(root / "slurm", timeout=900)
    out = local.communicate(timeout=900)[0].decode(errors="replace")
    assert local.returncode == 0, out[-3000:]

    lines = status(root)
    assert len(lines) == 9 and all(" done " in line for line in lines.values()), "\n".join(lines.values()) + logs(root / "slurm")
    assert files(root) == files(local_root)
    for k in range(2):
        r, lr = root / f"round_{k:02d}", local_root / f"round_{k:02d}"
        assert labelled(r / "verify" / "verified.jsonl") == labelled(lr / "verify" / "verified.jsonl")
    for k in range(3):
        ev, lev = (json.loads((d / f"round_{k:02d}" / "eval" / "eval.json").read_text()) for d in (root, local_root))
        assert ev["accuracy"] == lev["accuracy"] and ev["n"] == 8
    log_names = {p.name.rsplit("-", 1)[0] for p in (root / "slurm" / "logs").glob("*.out")}
    assert log_names == set(names)

    before = (root / "slurm" / "jobs.json").read_text()
    res = cli("slurm", "submit", str(root), cwd=tmp_path)  # finished: nothing to submit
    assert res.returncode == 0 and "submitted" not in res.stdout, res.stdout + res.stderr
    assert (root / "slurm" / "jobs.json").read_text() == before


@pytest.mark.slurm
def test_cancelled_and_requeued_generation_shards_resume_without_lost_or_duplicated_rows(
        slurm_cluster, tmp_path: Path, tiny_model_dir: Path, gsm8k_dir: Path, cancel_after: list[Path]):
    out = tmp_path / "gen"
    cancel_after.append(out / "slurm")
    n_problems, g = 16, 2
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(out),
        "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": n_problems},
        # the HF backend writes every hf_batch_size rows: a shard fills up step by step
        "sample": {"model_name": str(tiny_model_dir), "backend": "hf", "num_samples": g, "max_tokens": 48,
                   "temperature": 0.0, "dtype": "float32", "hf_batch_size": 2, "prompt_style": "r1_zero",
                   "num_shards": 2},
        "slurm": SLURM_HF}))
    res = cli("slurm", "submit", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    array = json.loads((out / "slurm" / "jobs.json").read_text())["jobs"]["generate"][0]["id"]
    shard = [out / "samples" / f"shard-{i:05d}-of-00002.jsonl" for i in range(2)]
    per_shard = n_problems // 2 * g

    def rows(i: int) -> int:
        return len(shard[i].read_text().splitlines()) if shard[i].exists() else 0

    cancelled = requeued = None
    deadline = time.monotonic() + 600
    while (cancelled is None or requeued is None) and time.monotonic() < deadline:
        if cancelled is None and rows(1) > 0:
            subprocess.run(["scancel", f"{array}_1"], check=True)  # task 1: cancelled mid-way
            cancelled = rows(1)
        if requeued is None and rows(0) > 0:  # task 0: as if preempted / near its time limit
            subprocess.run(["scancel", "--batch", "--signal=USR1", f"{array}_0"], check=True)
            requeued = rows(0)
        time.sleep(0.2)
    assert cancelled is not None and requeued is not None, logs(out / "slurm")
    assert cancelled < per_shard and requeued < per_shard, "too late: a shard had finished"

    time.sleep(2)
    assert "cancelled" in status(out)["gen-r0-generate"]
    res = cli("slurm", "submit", str(cfg), cwd=tmp_path)  # again, while task 0 is requeued
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[array 1]" in res.stdout, res.stdout  # only the cancelled shard goes again
    wait_idle(out / "slurm", timeout=600)

    lines = status(out)
    assert all(" done " in line for line in lines.values()), "\n".join(lines.values()) + logs(out / "slurm")
    merged = read_jsonl(out / "samples.jsonl")
    pairs = [(r["problem_id"], r["sample_index"]) for r in merged]
    assert len(pairs) == len(set(pairs)) == n_problems * g
    for i in range(2):
        shard_pairs = [(r["problem_id"], r["sample_index"]) for r in read_jsonl(shard[i])]
        assert len(shard_pairs) == len(set(shard_pairs)) == per_shard
    assert len(read_jsonl(out / "sft_r1_all.jsonl")) == n_problems * g
    log0 = (out / "slurm" / "logs" / f"gen-r0-generate-{array}_0.out").read_text()
    assert "USR1: requeueing" in log0 and "restart 1" in log0, log0[-3000:]


@pytest.mark.slurm
def test_failed_stage_stops_its_dependents_and_a_resubmission_completes(
        slurm_cluster, tmp_path: Path, tiny_model_dir: Path, gsm8k_dir: Path, cancel_after: list[Path]):
    heldout = tmp_path / "heldout.jsonl"  # missing at first: shard 0's eval fails
    cfg = exit_config(tmp_path, "fail", tiny_model_dir, gsm8k_dir, rounds=1,
                      eval={"data": {"dataset": str(heldout), "split": "test", "num_examples": 4}},
                      sample={"backend": "hf", "num_shards": 2, "max_tokens": 16}, slurm=SLURM_HF)
    root = tmp_path / "runs" / "fail"
    cancel_after.append(root / "slurm")
    # submit reads the held-out set for the contamination check (it would refuse the missing file
    # at once); skipping that check lets the stage itself fail on SLURM, which is what this tests
    res = cli("slurm", "submit", str(cfg), "--allow_overlap", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_idle(root / "slurm", timeout=600)

    lines = status(root)
    assert "failed" in lines["fail-r0-rollout"] and "shards left: 0" in lines["fail-r0-rollout"], lines
    assert "heldout.jsonl" in logs(root / "slurm")  # the log says why
    dependents = ["fail-r0-merge", "fail-r0-verify", "fail-r0-filter", "fail-r0-train", "fail-r1-rollout"]
    for name in dependents:
        assert "cancelled" in lines[name] and "DependencyNeverSatisfied" in lines[name], lines[name]
        assert not list((root / "slurm" / "logs").glob(f"{name}-*")), f"{name} ran"
    assert not (root / "round_00" / "sample" / "manifest.json").exists()

    heldout.write_text("".join((gsm8k_dir / "test.jsonl").read_text().splitlines(keepends=True)[:4]))
    res = cli("slurm", "submit", str(cfg), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fail-r0-rollout: submitted" in res.stdout and "[array 0]" in res.stdout, res.stdout  # shard 1 was done
    wait_idle(root / "slurm", timeout=600)
    lines = status(root)
    assert all(" done " in line for line in lines.values()), "\n".join(lines.values()) + logs(root / "slurm")
    assert json.loads((root / "round_01" / "eval" / "eval.json").read_text())["n"] == 4
    assert len(read_jsonl(root / "round_00" / "sample" / "samples.jsonl")) == 8 * 2

