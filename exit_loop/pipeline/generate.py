"""Single-round R1 trace generation: sample with a teacher, verify, filter.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100 --num_samples 4
    exit-loop generate --config configs/generate_gsm8k_qwen2.5-72b.yaml
    exit-loop generate --config configs/generate_gsm8k_qwen2.5-72b.yaml sample.num_shards=8 sample.shard_id=3
    exit-loop merge --config configs/generate_gsm8k_qwen2.5-72b.yaml
    exit-loop generate --config configs/generate_gsm8k_qwen2.5-32b.yaml --data_parallel 4   # 8 GPUs, TP 2
    exit-loop generate --config configs/generate_gsm8k_deepseek-r1_server.yaml --base_url http://node12:8000/v1

Writes into `output_dir` (default `data/gsm8k/`): `samples.jsonl` (raw samples, streamed;
with shards `samples/shard-KKKKK-of-NNNNN.jsonl`), `sft_r1_all.jsonl`, `sft_r1_correct.jsonl`,
`summary.json`, the resolved `config.yaml`, and `manifest.json` last. Running the same command
again generates only the (problem, sample) pairs that are missing. A changed config is refused,
naming the keys that differ, before anything is drawn: only more problems (`data.num_examples`)
or more samples per problem (`sample.num_samples`) may be asked for, and each such change is
recorded in `config_changes.jsonl` (`--allow_config_change` continues under any change, recorded
too). Where the sampler runs may change (`sample.data_parallel`, `sample.gpu_device`,
`sample.server`, a shard's `sample.shard_id`). On a node with several GPUs the
unsharded generation runs one engine per `sample.tensor_parallel_size` GPUs at once
(`sample.data_parallel`, `exit_loop.pipeline.parallel`), each drawing its shards into `samples/`,
then merges them into `samples.jsonl`. With `sample.backend: server` the teacher is an
OpenAI-compatible server (`exit_loop.sample.server`): `sample.server.base_url`, or a server that
`exit-loop slurm submit` launches (`sample.server.launch`), whose address its job writes to
`<output_dir>/server/address`.

A generation is the one-round case of an ExIt run's stages (`exit_loop.pipeline.stages`): the same
sampling (`draw`), merge of shards (`merge_shards`), verifier (`label`) and filter
(`write_splits`), only laid out flat in one directory, with no verified rows kept.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from exit_loop.command import config_parser
from exit_loop.config import changed_keys, dump_yaml, flatten, load_config, read_yaml, to_dict
from exit_loop.console import say, stage_log
from exit_loop.errors import ConfigError, DataError
from exit_loop.filter import MANIFEST_COUNTS, FilterConfig, write_splits
from exit_loop.jsonl import AppendLog, atomic_write_text, iter_jsonl_numbered, sha256_file, write_manifest
from exit_loop.rundir import SAMPLES
from exit_loop.pipeline.resources import SlurmConfig
from exit_loop.pipeline.run import shard_path
from exit_loop.pipeline.stages import draw, label, merge_shards
from exit_loop.sample import SampleConfig, check_model_path, check_sampling_keys, resolve_prompt_style
from exit_loop.tasks import DataConfig, load_problems


@dataclass
class GenerateConfig:
    output_dir: str = "data/gsm8k"
    data: DataConfig = field(default_factory=DataConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # `exit-loop slurm submit` resources


def shard_file(cfg: GenerateConfig, shard: int) -> Path:
    """Where shard `shard` of a sharded generation goes: `<output_dir>/samples/shard-…`."""
    return shard_path(Path(cfg.output_dir) / "samples", shard, cfg.sample.num_shards)


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
    fcfg = replace(cfg.filter, output_dir=str(out), input=str(samples_file))
    summary = write_splits(label(samples_file, cfg.data.task), fcfg)
    timings["verify_filter_s"] = round(time.monotonic() - t0, 3)
    write_manifest(
        out, "generate", timings,
        inputs={"dataset": cfg.data.dataset, "split": cfg.data.split, "model": cfg.sample.model_name},
        config=to_dict(cfg),
        counts={k: summary[k] for k in MANIFEST_COUNTS},
        files={p.name: sha256_file(p) for p in (samples_file, out / fcfg.all_name, out / fcfg.correct_name)})
    say(f"generate: wrote {out / fcfg.all_name} and {out / fcfg.correct_name}")
    return out


# keys that say where the sampler runs, not what it draws; a shard's job writes its own shard_id
WHERE_KEYS = ("sample.data_parallel", "sample.gpu_device", "sample.server", "sample.shard_id")
GROWABLE = ("data.num_examples", "sample.num_samples")


def check_generation_config(cfg: GenerateConfig, out: Path, allow: bool) -> None:
    """Refuse to continue a generation in `out` under another config (ConfigError naming the keys;
    more problems or samples may be asked for); record every accepted change in
    `config_changes.jsonl`. Call before config.yaml is rewritten."""
    path = out / "config.yaml"
    if not path.exists():
        return
    old, _ = read_yaml(path)
    keys = changed_keys(old, cfg, ignore=WHERE_KEYS)                      # every change
    refused = [k.split(" ", 1)[0] for k in changed_keys(old, cfg, ignore=WHERE_KEYS, growable=GROWABLE)]
    a, b = flatten(to_dict(old)), flatten(to_dict(cfg))
    if refused and not allow:
        detail = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in refused)
        raise ConfigError(f"{path}: this generation was made with another config; differing keys: {detail}. "
                          "Its samples would mix settings (only more problems, data.num_examples, or more "
                          "samples, sample.num_samples, may be added). Use another --output_dir, or "
                          "--allow_config_change to continue anyway")
    if keys:
        with AppendLog(out / "config_changes.jsonl") as log:
            log.write([{"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "forced": bool(refused),
                        "changed": {k: [a.get(k), b.get(k)] for k in keys}}])
        say(f"generate: config changed ({', '.join(f'{k} {a.get(k)!r} -> {b.get(k)!r}' for k in keys)}); "
            f"recorded in {out / 'config_changes.jsonl'}")


def resolve_prompt(cfg: GenerateConfig) -> None:
    """prompt_style=auto -> the style the model's tokenizer asks for, as every shard and the merge
    record it (config.yaml holds the resolved style, so `auto` is not a change)."""
    if cfg.sample.prompt_style == "auto":
        cfg.sample.prompt_style = resolve_prompt_style(cfg.sample.model_name)
        say(f"generate: prompt_style=auto -> {cfg.sample.prompt_style} for {cfg.sample.model_name}")


def generate(cfg: GenerateConfig, allow_config_change: bool = False) -> Path:
    """Sample this shard's pending traces; unsharded, also verify and filter. Returns output_dir.
    A config that differs from the one `output_dir` was made with is refused
    (`check_generation_config`) unless `allow_config_change`."""
    check_model_path(cfg.sample.model_name)
    if cfg.sample.backend != "hf":
        check_sampling_keys(cfg.sample)
    resolve_prompt(cfg)
    out = Path(cfg.output_dir)
    if cfg.sample.backend == "server":  # a launched server is found through the address file its job writes
        cfg.sample.server = cfg.sample.server.launched_from(out)
    check_generation_config(cfg, out, allow_config_change)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    t0 = time.monotonic()
    problems = load_problems(cfg.data)
    sharded = cfg.sample.num_shards > 1
    check_existing_samples(shard_file(cfg, cfg.sample.shard_id) if sharded else out / SAMPLES, cfg.sample)
    for path in [] if sharded else sorted((out / "samples").glob("shard-*.jsonl")):  # data-parallel shards
        check_existing_samples(path, cfg.sample)
    timings = {"load_problems_s": round(time.monotonic() - t0, 3)}
    t1 = time.monotonic()
    with stage_log(out):  # the engine's and other libraries' output to <output_dir>/stage.log
        draw(cfg.sample, problems, out / SAMPLES, out / "samples",
             shard=cfg.sample.shard_id if sharded else None)
    timings["sample_s"] = round(time.monotonic() - t1, 3)
    if sharded:
        say(f"generate: shard {cfg.sample.shard_id}/{cfg.sample.num_shards} done -> "
            f"{shard_file(cfg, cfg.sample.shard_id)}; when every shard is done run `exit-loop merge` "
            "with the same config")
        return out
    return finish(cfg, out / SAMPLES, timings)


def merge(cfg: GenerateConfig, allow_config_change: bool = False) -> Path:
    """Put every shard's samples together (ordered by problem, then sample), verify, filter."""
    resolve_prompt(cfg)
    check_generation_config(cfg, Path(cfg.output_dir), allow_config_change)
    n = cfg.sample.num_shards
    sampled = merge_shards([shard_file(cfg, i) for i in range(n)], load_problems(cfg.data),
                           cfg.sample.num_samples, Path(cfg.output_dir) / SAMPLES)
    return finish(cfg, sampled.path, {})


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
    "student": "sample.student",
    "data_parallel": "sample.data_parallel",
    "base_url": "sample.server.base_url",
    "output_dir": "output_dir",
}


def parse_args(argv: list[str], prog: str, description: str) -> GenerateConfig:
    return parse_command(argv, prog, description)[0]


def parse_command(argv: list[str], prog: str, description: str) -> tuple[GenerateConfig, bool]:
    """(the config, --allow_config_change)."""
    p = config_parser(prog, description, GenerateConfig)
    p.add_argument("--config", help="YAML config (see configs/); flags and key=value override it")
    p.add_argument("--model_name", help="hub id or local path of the teacher (sample.model_name)")
    p.add_argument("--num_examples", type=int, help="first N problems (data.num_examples)")
    p.add_argument("--dataset", help="hub id (openai/gsm8k) or local JSONL path (data.dataset)")
    p.add_argument("--split", help="data set split, default train (data.split)")
    p.add_argument("--num_samples", type=int, help="samples per problem (sample.num_samples)")
    p.add_argument("--backend", choices=["auto", "vllm", "hf", "server"],
                   help="sampler backend (sample.backend); server: an OpenAI-compatible server")
    p.add_argument("--prompt_style", choices=["auto", "r1_zero", "chat", "reasoning"],
                   help="how the teacher is asked (sample.prompt_style)")
    p.add_argument("--gpu_device", help="e.g. cuda:0 (sample.gpu_device)")
    p.add_argument("--student", help="the model to be trained on these traces: each row's num_tokens counts "
                   "its response in this model's tokens, the teacher's own count kept as teacher_num_tokens "
                   "(sample.student; default: the teacher's tokens)")
    p.add_argument("--data_parallel", type=int, metavar="N",
                   help="engine processes at once, each on its own GPUs (CPU: cores); default: the visible "
                        "GPUs / sample.tensor_parallel_size, 1 without a GPU (sample.data_parallel)")
    p.add_argument("--base_url", help="with --backend server: the server's URL, e.g. http://node12:8000/v1 "
                   "(sample.server.base_url; the API key comes from the variable sample.server.api_key_env names)")
    p.add_argument("--output_dir", help="where files go, default data/gsm8k (output_dir)")
    p.add_argument("--allow_config_change", action="store_true",
                   help="continue a generation whose config.yaml differs from this config (recorded in "
                        "config_changes.jsonl); without it only more problems or samples may be asked for")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any config key, e.g. sample.temperature=0.6 sample.max_tokens=2048")
    a = p.parse_args(argv)
    values = {key: getattr(a, flag) for flag, key in FLAGS.items() if getattr(a, flag) is not None}
    return load_config(GenerateConfig, a.config, a.overrides, values), a.allow_config_change


def command(argv: list[str]) -> int:
    generate(*parse_command(argv, "exit-loop generate", __doc__))
    return 0


def merge_command(argv: list[str]) -> int:
    merge(*parse_command(argv, "exit-loop merge", "Merge sharded samples, then verify and filter.\n\n" + __doc__))
    return 0
