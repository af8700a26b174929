"""The `server` backend against a real OpenAI-compatible server: vLLM's (the CPU build) on
127.0.0.1 with the tiny model, started once for the module. Between client and server, where a
test needs it, a fault-injecting proxy (tests/fault_proxy.py): 429 and 500 answers, dropped
connections, `reasoning_content`, a slow server, a server that stops mid-run. Then a generation
whose server `exit-loop slurm submit` launches as a job of its own, on the local SLURM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from exit_loop.config import load_config
from exit_loop.jsonl import read_jsonl
from exit_loop.pipeline.generate import GenerateConfig, generate
from exit_loop.prompts import canonical_response
from exit_loop.sample import ServerError

from fault_proxy import FaultProxy
from helpers import SLURM, cli, exit_config, logs, wait_idle

QUESTIONS, SAMPLES = 6, 3
KEY_ENV = "EXIT_LOOP_TEST_API_KEY"
KEY = "sk-test-0123456789-do-not-log"   # a dummy key: it must appear in no file and no output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cmd(model: Path, port: int | str) -> list[str]:
    # one engine process and no worker process: the CPU build starts in about 45 s rather than 65
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni"]


SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM OpenAI-compatible server; yields its root URL (http://127.0.0.1:P)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(serve_cmd(tiny_model_dir, port), env={**os.environ, **SERVER_ENV}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{root}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield root
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def gen_config(tmp: Path, name: str, model: Path, gsm8k_dir: Path, base_url: str, *extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, None, [
        f"output_dir={tmp / name}", f"data.dataset={gsm8k_dir / 'train.jsonl'}", f"data.num_examples={QUESTIONS}",
        f"sample.model_name={model}", "sample.backend=server", f"sample.num_samples={SAMPLES}",
        "sample.max_tokens=24", "sample.temperature=1.0", f"sample.server.base_url={base_url}",
        "sample.server.max_retries=8", *extra])


def pairs(path: Path) -> list[tuple[str, int]]:
    return [(r["problem_id"], r["sample_index"]) for r in read_jsonl(path)]


def check_every_pair_once(out: Path) -> list[dict]:
    rows = read_jsonl(out / "samples.jsonl")
    got = pairs(out / "samples.jsonl")
    assert len(got) == len(set(got)) == QUESTIONS * SAMPLES, f"{len(got)} rows, {len(set(got))} distinct"
    assert {k for _, k in got} == set(range(SAMPLES))
    return rows


def tree_text(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


@pytest.mark.engine
def test_generation_through_a_server_writes_the_splits_of_the_other_backends(
        server: str, tiny_model_dir: Path, gsm8k_dir: Path, tmp_path: Path, monkeypatch, capfd):
    """Completions with the prompt's token ids: both splits with the keys the HF backend writes;
    `prompt_tokens` is what the student's tokenizer gives; the key (from the environment) reaches
    the server and appears in no file and no output."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with FaultProxy(server, require_key=KEY) as proxy:
        cfg = gen_config(tmp_path, "server", tiny_model_dir, gsm8k_dir, proxy.url, f"sample.server.api_key_env={KEY_ENV}")
        out = generate(cfg)
    assert proxy.keys_seen == {f"Bearer {KEY}"} and proxy.forwarded > 0
    rows = check_every_pair_once(out)
    assert {r["backend"] for r in rows} == {"server"} and all(r["prompt_tokens"] > 0 for r in rows)
    hf = generate(load_config(GenerateConfig, None, [
        f"output_dir={tmp_path / 'hf'}", f"data.dataset={gsm8k_dir / 'train.jsonl'}", "data.num_examples=2",
        f"sample.model_name={tiny_model_dir}", "sample.backend=hf", "sample.num_samples=1", "sample.max_tokens=8"]))
    for split in ("sft_r1_all.jsonl", "sft_r1_correct.jsonl", "samples.jsonl"):
        a, b = read_jsonl(out / split), read_jsonl(hf / split)
        if a and b:
            assert set(a[0]) == set(b[0]), split
    from transformers import AutoTokenizer

    from exit_loop.tokens import encode_prompt
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert all(r["prompt_tokens"] == len(encode_prompt(tok, r["prompt"])) for r in rows)
    seen = capfd.readouterr()
    assert KEY not in seen.out + seen.err
    assert KEY not in tree_text(out) and KEY_ENV in (out / "config.yaml").read_text()


@pytest.mark.engine
def test_faults_are_retried_and_reasoning_is_normalised(server: str, tiny_model_dir: Path, gsm8k_dir: Path,
                                                         tmp_path: Path):
    """429 (with Retry-After), 500 and dropped connections, and the reasoning returned apart
    (`reasoning_content`) through the chat endpoint: every pair exactly once, each response the
    canonical `{reasoning} </think> <answer>{answer}</answer>`."""
    faults = ["429", "ok", "500", "drop", "ok", "ok"]
    with FaultProxy(server, faults=faults, reasoning=True) as proxy:
        out = generate(gen_config(tmp_path, "faults", tiny_model_dir, gsm8k_dir, proxy.url,
                                  "sample.prompt_style=reasoning", "sample.server.max_concurrency=4"))
    assert all(proxy.faults_served.get(k, 0) > 0 for k in ("429", "500", "drop")), proxy.faults_served
    rows = check_every_pair_once(out)
    clean = 0
    for r in rows:
        raw = r["raw_output"]
        assert raw.startswith("<think>") and "</think><answer>" in raw
        reasoning, _, answer = raw[len("<think>"):].rpartition("</think>")
        assert answer == f"<answer>{len(reasoning.strip())}</answer>"
        if reasoning.strip() and not any(t in reasoning for t in ("<think>", "</think>", "<answer>", "</answer>")):
            assert r["response"] == canonical_response(reasoning, str(len(reasoning.strip())))
            clean += 1
    assert clean >= len(rows) // 2


@pytest.mark.engine
def test_a_server_that_refuses_n_is_asked_once_per_sample(server: str, tiny_model_dir: Path, gsm8k_dir: Path,
                                                          tmp_path: Path):
    with FaultProxy(server, refuse_n=True) as proxy:
        out = generate(gen_config(tmp_path, "no_n", tiny_model_dir, gsm8k_dir, proxy.url,
                                  "sample.server.max_concurrency=1"))
    check_every_pair_once(out)
    assert proxy.faults_served == {"400": 1} and proxy.n_seen == [SAMPLES] + [1] * (QUESTIONS * SAMPLES)


@pytest.mark.engine
def test_a_killed_client_and_a_stopped_server_lose_nothing(server: str, tiny_model_dir: Path, gsm8k_dir: Path,
                                                           tmp_path: Path):
    """The client SIGKILLed mid-run, then run again; the server gone mid-run: a clear error naming
    it, every sample written so far kept, and a rerun against the server back up completes."""
    out = tmp_path / "killed"
    port = free_port()
    with FaultProxy(server, port=port, delay_s=0.4):
        cmd = [sys.executable, "-m", "exit_loop", "generate", f"--output_dir={out}",
               f"--dataset={gsm8k_dir / 'train.jsonl'}", f"--num_examples={QUESTIONS}", f"--num_samples={SAMPLES}",
               f"--model_name={tiny_model_dir}", "--backend=server", f"--base_url=http://127.0.0.1:{port}/v1",
               "sample.max_tokens=24", "sample.temperature=1.0", "sample.server.max_concurrency=1"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        samples = out / "samples.jsonl"
        deadline = time.monotonic() + 120
        while not (samples.exists() and len(samples.read_text().splitlines()) >= SAMPLES * 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the generation ended before it was killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = pairs(samples)
    assert SAMPLES * 2 <= len(before) < QUESTIONS * SAMPLES
    # the server stops after two more requests: the run stops, naming it; nothing is lost
    cfg = gen_config(tmp_path, "killed", tiny_model_dir, gsm8k_dir, f"http://127.0.0.1:{port}/v1",
                     "sample.server.max_retries=2", "sample.server.max_concurrency=1")
    with FaultProxy(server, port=port, stop_after=2) as proxy:
        with pytest.raises(ServerError, match=rf"127\.0\.0\.1:{port}.*run the same command again"):
            generate(cfg)
        proxy.stopped.wait(5)
    after = pairs(samples)
    assert after[:len(before)] == before and len(after) == len(before) + 2 * SAMPLES
    with FaultProxy(server, port=port):  # the server back: the same command completes
        out_dir = generate(cfg)
    rows = check_every_pair_once(out_dir)
    assert pairs(samples)[:len(after)] == after and len(rows) == QUESTIONS * SAMPLES
    assert (out_dir / "manifest.json").exists()


@pytest.mark.engine
def test_an_exit_run_takes_round_0_from_a_server_teacher(server: str, tiny_model_dir: Path, gsm8k_dir: Path,
                                                         tmp_path: Path):
    """`teacher.server`: round 0 is sampled through the server, the student's eval in process."""
    from exit_loop.pipeline.loop import run_loop
    from exit_loop.pipeline.run import ExperimentConfig

    cfg = {"experiment": "srv", "runs_dir": str(tmp_path / "runs"), "rounds": 1, "student": str(tiny_model_dir),
           "isolate": False,
           "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": 4},
           "eval": {"data": {"dataset": str(gsm8k_dir / "test.jsonl"), "split": "test", "num_examples": 4},
                    "sample": {"max_tokens": 16}},
           "sample": {"num_samples": 2, "max_tokens": 16, "backend": "hf"},
           "teacher": {"model": str(tiny_model_dir), "prompt_style": "r1_zero", "temperature": 1.0,
                       "server": {"base_url": f"{server}/v1"}},
           "filter": {"dedup": False},
           "train": {"truncated": "no_eos", "sft": {"max_steps": 1, "per_device_train_batch_size": 4,
                                                    "save_strategy": "no", "gradient_checkpointing": False}},
           "arms": {"main": {"split": "all"}}}
    path = tmp_path / "srv.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = run_loop(load_config(ExperimentConfig, path))
    rows = read_jsonl(root / "round_00" / "sample" / "samples.jsonl")
    assert len(rows) == 8 and {r["backend"] for r in rows} == {"server"}
    assert json.loads((root / "round_00" / "eval" / "manifest.json").read_text())
    assert (root / "round_00" / "train" / "manifest.json").exists()
    with pytest.raises(Exception, match="teacher.backend: server"):
        bad = dict(cfg, sample={**cfg["sample"], "backend": "server"}, experiment="bad")
        path.write_text(yaml.safe_dump(bad))
        run_loop(load_config(ExperimentConfig, path))


# --------------------------------------------------------------------------- SLURM


def test_shipped_r1_config_launches_a_two_node_server_beside_client_tasks(capsys):
    """configs/generate_gsm8k_deepseek-r1_server.yaml, --dry-run: one 2-node x 8-GPU server job
    (vLLM, TP 8 in a node, PP 2 across, node 1 headless) that depends on nothing, client tasks
    without GPUs beside it, and a job that cancels the server once they have ended (afterany)."""
    from exit_loop.pipeline.slurm import command

    root = Path(__file__).resolve().parents[1]
    assert command(["submit", str(root / "configs" / "generate_gsm8k_deepseek-r1_server.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    scripts = {b.split("\n", 1)[0].strip(): b for b in out.split("# ---- ")[1:]}
    server = scripts["gsm8k_r1-server"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "srun --nodes=2 --ntasks-per-node=1",
                 "--tensor-parallel-size 8 --pipeline-parallel-size 2", '--nnodes 2 --node-rank "$SLURM_NODEID"',
                 '--master-addr "$MAIN_ADDR" $([ "$SLURM_NODEID" = 0 ] || echo --headless)',
                 '--port "$SERVER_PORT"', "data/gsm8k_r1/server/address"):
        assert line in server, line
    clients = scripts["gsm8k_r1-r0-generate"]
    assert "#SBATCH --array=0-3" in clients and "--gpus-per-node" not in clients
    assert "scancel <gsm8k_r1-server>" in scripts["gsm8k_r1-server-stop"]
    graph = out.split("dependency graph", 1)[1]
    assert "gsm8k_r1-server after nothing" in graph and "gsm8k_r1-r0-generate [array 0-3] after nothing" in graph
    assert "gsm8k_r1-server-stop after <gsm8k_r1-r0-generate> (afterany)" in graph
    assert not (root / "data" / "gsm8k_r1").exists()  # a dry run writes nothing


@pytest.mark.slurm
@pytest.mark.engine
def test_a_generation_whose_server_the_slurm_job_launches(tiny_model_dir: Path, gsm8k_dir: Path, tmp_path: Path,
                                                          cancel_after):
    """On the local SLURM: the server job (the real vLLM server), two client array tasks that wait
    for its address file and /health, the merge, and the job that cancels the server."""
    out = tmp_path / "gen"
    launch = " ".join(serve_cmd(tiny_model_dir, "{port}")).replace("--host 127.0.0.1", "--host {host}")
    cfg = {"output_dir": str(out),
           "data": {"dataset": str(gsm8k_dir / "train.jsonl"), "num_examples": QUESTIONS},
           "sample": {"model_name": str(tiny_model_dir), "backend": "server", "num_samples": SAMPLES,
                      "max_tokens": 24, "temperature": 1.0, "num_shards": 2,
                      "server": {"launch": {"command": launch, "host": "127.0.0.1", "ready_timeout_s": 300}}},
           "slurm": {**SLURM, "env": {**SLURM["env"], **SERVER_ENV}}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cancel_after.append(out / "slurm")
    res = cli("slurm", "submit", str(path))
    assert res.returncode == 0, res.stderr
    wait_idle(out / "slurm", 420)
    assert (out / "manifest.json").exists(), logs(out / "slurm")
    rows = check_every_pair_once(out)
    assert {r["backend"] for r in rows} == {"server"}
    assert not (out / "server" / "address").exists() and "ended" in (out / "server" / "status").read_text()
    status = cli("slurm", "status", str(out)).stdout
    assert all(" done " in line for line in status.splitlines()), status


def test_keys_are_named_never_written(tmp_path: Path, monkeypatch):
    """`api_key_env` takes a variable's name; a key put there is refused without being echoed, and
    an unset variable is named, not guessed."""
    from exit_loop.config import ConfigError
    from exit_loop.sample import SampleConfig, ServerBackend, ServerConfig

    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, None, ["sample.backend=server", f"sample.server.api_key_env={KEY}"])
    assert KEY not in str(e.value) and "name of an environment variable" in str(e.value)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ConfigError, match=f"environment variable {KEY_ENV} is not set"):
        ServerBackend(SampleConfig(backend="server", server=ServerConfig(base_url="http://127.0.0.1:9/v1",
                                                                         api_key_env=KEY_ENV)))


def test_an_exit_run_launches_its_teachers_server_beside_round_0(tmp_path: Path, gsm8k_dir: Path, capsys):
    """teacher.server.launch in a run: one server job for round 0 of every seed, cancelled once
    those rollouts have ended; the later rounds never wait for it."""
    from exit_loop.pipeline.slurm import command

    path = exit_config(tmp_path, "tsrv", "org/student-1.5B", gsm8k_dir, seeds=[0, 1],
                       teacher={"model": "org/Teacher-R1-70B",
                                "server": {"launch": {"command": "vllm serve org/Teacher-R1-70B", "gpus_per_node": 4}}})
    assert command(["submit", str(path), "--dry-run"]) == 0
    graph = capsys.readouterr().out.split("dependency graph", 1)[1]
    assert "tsrv-server after nothing" in graph
    assert "tsrv-server-stop after <tsrv-s0-r0-rollout>, <tsrv-s1-r0-rollout> (afterany)" in graph
    assert "tsrv-s0-r1-rollout after <tsrv-s0-r0-train>" in graph


@pytest.mark.engine
def test_each_samples_token_count_is_the_servers(server: str, tiny_model_dir: Path, gsm8k_dir: Path):
    """n > 1 from vLLM's server: each sample's count comes from its token ids (asked for once the
    server says it is vLLM's), so a sample cut at max_tokens counts exactly max_tokens."""
    from exit_loop.sample import SampleConfig, ServerConfig, start_backend
    from exit_loop.sample.request import Request
    from exit_loop.tasks import DataConfig, load_problems

    cfg = SampleConfig(model_name=str(tiny_model_dir), backend="server", max_tokens=16, temperature=1.0,
                       stop=[], server=ServerConfig(base_url=f"{server}/v1"))
    problems = load_problems(DataConfig(dataset=str(gsm8k_dir / "train.jsonl"), num_examples=3))
    got = []
    backend = start_backend(cfg)
    backend.generate([Request(p, "User: " + p.question, [0, 1, 2, 3]) for p in problems],
                     lambda req, comps: got.extend(comps))
    assert backend.vllm and len(got) == 12
    assert all(c.num_tokens == 16 for c in got if c.finish_reason == "length")
    assert all(0 < c.num_tokens <= 16 for c in got)
