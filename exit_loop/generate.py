"""Single-round R1 trace generation: sample with a teacher, verify, filter.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100 --num_samples 4
    exit-loop generate --config configs/generate_gsm8k_qwen2.5-72b.yaml
    exit-loop generate --config configs/generate_gsm8k_qwen2.5-72b.yaml sample.num_shards=8 sample.shard_id=3
    exit-loop merge --config configs/generate_gsm8k_qwen2.5-72b.yaml

Writes into `output_dir` (default `data/gsm8k/`): `samples.jsonl` (raw samples, streamed;
with shards `samples/shard-KKKKK-of-NNNNN.jsonl`), `sft_r1_all.jsonl`, `sft_r1_correct.jsonl`,
`summary.json`, the resolved `config.yaml`, and `manifest.json` last. Running the same command
again generates only the (problem, sample) pairs that are missing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exit_loop.config import dump_yaml, load_config, to_dict
from exit_loop.filter import FilterConfig, format_summary, write_splits
from exit_loop.jsonl import (DataError, atomic_write_text, iter_jsonl, iter_jsonl_numbered, sha256_file,
                             write_json, write_jsonl)
from exit_loop.problems import DataConfig, load_problems, problem_index
from exit_loop.sample import (SampleConfig, check_model_path, check_sampling_keys, resolve_prompt_style,
                              sample)
from exit_loop.slurm import SlurmConfig
from exit_loop.verify import verify_rows


@dataclass
class GenerateConfig:
    output_dir: str = "data/gsm8k"
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # `exit-loop slurm submit` resources


def samples_path(cfg: GenerateConfig) -> Path:
    out = Path(cfg.output_dir)
    s = cfg.sample
    if s.num_shards == 1:
        return out / "samples.jsonl"
    return out / "samples" / f"shard-{s.shard_id:05d}-of-{s.num_shards:05d}.jsonl"


def check_existing_samples(path: Path, cfg: SampleConfig) -> None:
    """Refuse to mix samples of another model or prompt style into one file."""
    if not path.exists():
        return
    for lineno, row in iter_jsonl_numbered(path):
        for key, want in (("model", cfg.model_name), ("prompt_style", cfg.prompt_style)):
            if key in row and row[key] != want:
                raise DataError(
                    f"{path}:{lineno}: holds samples with {key}={row[key]!r}, but this run has "
                    f"{key}={want!r}; use another output_dir or remove the file")
        break


def finish(cfg: GenerateConfig, samples_file: Path, timings: dict[str, float]) -> Path:
    """Verify the merged samples, write the splits, the summary and (last) the manifest."""
    out = Path(cfg.output_dir)
    t0 = time.monotonic()
    fcfg = FilterConfig(**{**to_dict(cfg.filter), "output_dir": str(out), "input": str(samples_file)})
    rows = verify_rows(iter_jsonl(samples_file, required=("prompt", "response", "ground_truth")),
                       task=cfg.data.task)
    write_splits(rows, fcfg)
    timings["verify_filter_s"] = round(time.monotonic() - t0, 3)
    summary = json.loads((out / "summary.json").read_text())
    print(format_summary(summary), flush=True)
    manifest = {
        "stage": "generate",
        "inputs": {"dataset": cfg.data.dataset, "split": cfg.data.split, "model": cfg.sample.model_name},
        "config": to_dict(cfg),
        "counts": {k: summary[k] for k in ("traces", "correct_traces", "questions", "questions_solved",
                                            "correct_split_rows")},
        "files": {p.name: sha256_file(p) for p in (samples_file, out / fcfg.all_name, out / fcfg.correct_name)},
        "timings": timings,
    }
    write_json(out / "manifest.json", manifest)
    print(f"generate: wrote {out / fcfg.all_name} and {out / fcfg.correct_name}", flush=True)
    return out


def generate(cfg: GenerateConfig) -> Path:
    """Sample this shard's pending traces; unsharded, also verify and filter. Returns output_dir."""
    check_model_path(cfg.sample.model_name)
    if cfg.sample.backend != "hf":
        check_sampling_keys(cfg.sample)
    if cfg.sample.prompt_style == "auto":
        cfg.sample.prompt_style = resolve_prompt_style(cfg.sample.model_name)
        print(f"generate: prompt_style=auto -> {cfg.sample.prompt_style} for {cfg.sample.model_name}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    t0 = time.monotonic()
    problems = load_problems(cfg.data)
    path = samples_path(cfg)
    check_existing_samples(path, cfg.sample)
    timings = {"load_problems_s": round(time.monotonic() - t0, 3)}
    t1 = time.monotonic()
    sample(cfg.sample, problems, path)
    timings["sample_s"] = round(time.monotonic() - t1, 3)
    if cfg.sample.num_shards > 1:
        print(f"generate: shard {cfg.sample.shard_id}/{cfg.sample.num_shards} done -> {path}; "
              f"when every shard is done run `exit-loop merge` with the same config", flush=True)
        return out
    return finish(cfg, path, timings)


def merge(cfg: GenerateConfig) -> Path:
    """Put every shard's samples together (ordered by problem, then sample), verify, filter."""
    out = Path(cfg.output_dir)
    n = cfg.sample.num_shards
    expected = {p.id for p in load_problems(cfg.data)}
    by_pair: dict[tuple[str, int], dict[str, Any]] = {}
    missing_shards = []
    for k in range(n):
        path = out / "samples" / f"shard-{k:05d}-of-{n:05d}.jsonl"
        if not path.exists():
            missing_shards.append(k)
            continue
        for row in iter_jsonl(path, required=("problem_id", "sample_index", "response")):
            by_pair.setdefault((row["problem_id"], row["sample_index"]), row)
    if missing_shards:
        raise DataError(f"{out / 'samples'}: shard(s) {missing_shards} of {n} missing; run them first")
    want = len(expected) * cfg.sample.num_samples
    have = sum(1 for (pid, k) in by_pair if pid in expected and k < cfg.sample.num_samples)
    if have < want:
        raise DataError(f"{out / 'samples'}: {have} of {want} samples present; rerun the unfinished shards")
    rows = [by_pair[key] for key in sorted(by_pair, key=lambda t: (problem_index(t[0]), t[1]))
            if key[0] in expected and key[1] < cfg.sample.num_samples]
    merged = write_jsonl(out / "samples.jsonl", rows)
    print(f"merge: {len(rows)} samples from {n} shards -> {merged}", flush=True)
    return finish(cfg, merged, {})


# --------------------------------------------------------------------------- command line

FLAGS = {  # flag -> config key
    "model_name": "sample.model_name",
    "num_examples": "data.num_examples",
    "dataset": "data.dataset",
    "split": "data.split",
    "num_samples": "sample.num_samples",
    "backend": "sample.backend",
    "prompt_style": "sample.prompt_style",
    "gpu_device": "sample.gpu_device",
    "output_dir": "output_dir",
}


def parse_args(argv: list[str], prog: str, description: str) -> GenerateConfig:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); flags and key=value override it")
    p.add_argument("--model_name", help="hub id or local path of the teacher (sample.model_name)")
    p.add_argument("--num_examples", type=int, help="first N problems (data.num_examples)")
    p.add_argument("--dataset", help="hub id (openai/gsm8k) or local JSONL path (data.dataset)")
    p.add_argument("--split", help="data set split, default train (data.split)")
    p.add_argument("--num_samples", type=int, help="samples per problem (sample.num_samples)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], help="sampler backend (sample.backend)")
    p.add_argument("--prompt_style", choices=["auto", "r1_zero", "chat", "reasoning"],
                   help="how the teacher is asked (sample.prompt_style)")
    p.add_argument("--gpu_device", help="e.g. cuda:0 (sample.gpu_device)")
    p.add_argument("--output_dir", help="where files go, default data/gsm8k (output_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config key, e.g. sample.temperature=0.6 sample.max_tokens=2048")
    a = p.parse_args(argv)
    values = {key: getattr(a, flag) for flag, key in FLAGS.items() if getattr(a, flag) is not None}
    return load_config(GenerateConfig, a.config, a.overrides, values)


def command(argv: list[str]) -> int:
    generate(parse_args(argv, "exit-loop generate", __doc__))
    return 0


def merge_command(argv: list[str]) -> int:
    merge(parse_args(argv, "exit-loop merge", "Merge sharded samples, then verify and filter.\n\n" + __doc__))
    return 0
