"""The sampler: R1-style traces for each problem, streamed to JSONL as they finish.

    exit-loop generate --model_name Qwen/Qwen2.5-32B-Instruct --num_examples 100 --num_samples 4

Two backends behind one interface: `vllm` (the offline `LLM` engine: every pending prompt is
enqueued at once and the engine is stepped until done, writing each request's samples the moment
it finishes) and `hf` (transformers `generate`, batched, left padding, length-sorted). `auto`
uses vLLM and falls back to HF, with a warning that says why, when vLLM cannot be imported or its
engine fails to start.

Resume: the samples file is append-only; on start, rows already there are read back (a line torn
by a crash is dropped) and only the missing (problem, sample) pairs are generated.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from exit_loop.config import ConfigError
from exit_loop.jsonl import AppendLog
from exit_loop.problems import Problem
from exit_loop.prompts import PromptStyle, normalise_response, student_prompt, teacher_prompt

log = logging.getLogger("exit_loop.sample")

Backend = Literal["auto", "vllm", "hf"]


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
    num_shards: int = 1
    shard_id: int = 0
    round: int = 0                         # provenance, set by the loop

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, num_shards={self.num_shards}), got {self.shard_id}")
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


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str             # 'stop' or 'length'


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


# --------------------------------------------------------------------------- backends


class VLLMBackend:
    def __init__(self, cfg: SampleConfig):
        import vllm  # noqa: F401  (ImportError here means: fall back)
        from vllm import LLM

        if cfg.gpu_device and cfg.gpu_device.startswith("cuda:"):
            os.environ["CUDA_VISIBLE_DEVICES"] = cfg.gpu_device.split(":", 1)[1]
        util = cfg.gpu_memory_utilization
        if util is None:  # on the CPU build it is the share of RAM vLLM insists is free at start
            import torch

            util = 0.9 if torch.cuda.is_available() else 0.4
        kwargs: dict[str, Any] = dict(
            model=cfg.model_name,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=util,
            dtype=cfg.dtype,
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            enforce_eager=cfg.enforce_eager,
        )
        if cfg.max_model_len is not None:
            kwargs["max_model_len"] = cfg.max_model_len
        kwargs.update(cfg.engine)
        self.cfg = cfg
        self.llm = LLM(**kwargs)
        self.name = "vllm"

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine's processes now (rather than at interpreter exit)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def sampling_params(self, n: int, cfg: SampleConfig | None = None):
        from vllm import SamplingParams

        cfg = cfg or self.cfg
        params: dict[str, Any] = dict(
            n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
            stop=cfg.stop_strings or None, include_stop_str_in_output=True,
        )
        params.update(cfg.sampling)
        return SamplingParams(**params)

    def generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig | None = None) -> None:
        """Generate every request; `cfg` may change sampling settings (not engine settings)."""
        if not requests:
            return
        # greedy decoding gives every sample the same text: vLLM wants n=1 there, so draw once
        greedy = (cfg or self.cfg).temperature == 0
        params = [self.sampling_params(1 if greedy else len(r.sample_indices), cfg) for r in requests]
        prompts = [r.prompt for r in requests]
        if not hasattr(self.llm, "enqueue"):  # older vLLM: one call, results at the end
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            for req, out in zip(requests, outputs):
                on_done(req, _completions(out, len(req.sample_indices)))
            return
        # The same work as LLM.generate (enqueue everything, step the engine), but each request
        # is handed over the moment it finishes, so a crash loses only unfinished requests.
        # enqueue returns internal ids ("<n>-<random>"); outputs carry the external "<n>"
        ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        by_id = {rid.split("-", 1)[0]: req for rid, req in zip(ids, requests)}
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    req = by_id.pop(out.request_id.split("-", 1)[0])
                    on_done(req, _completions(out, len(req.sample_indices)))


def _completions(out: Any, n: int) -> list[Completion]:
    outs = sorted(out.outputs, key=lambda o: o.index)
    comps = [Completion(o.text, len(o.token_ids), o.finish_reason or "stop") for o in outs]
    return comps * n if len(comps) == 1 else comps  # one greedy draw stands for all n


class HFBackend:
    """transformers: batched, left padding, prompts sorted by length, bf16 on GPU.

    On a GPU, decoding runs through `_GraphDecoder` (a static KV cache and one CUDA graph per
    token: bench/hf_sampler.py has the speed-up over plain `generate`); every batch is padded to
    `hf_batch_size` rows so the graph keeps one shape. On CPU, with `sample.sampling.min_p` or
    `repetition_penalty`, or if the graph cannot be built, it is plain `model.generate`."""

    def __init__(self, cfg: SampleConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.name = "hf"
        if cfg.gpu_device:
            device = cfg.gpu_device
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if cfg.dtype not in ("auto", None):
            dtype = getattr(torch, cfg.dtype)
        else:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tok = AutoTokenizer.from_pretrained(cfg.model_name, trust_remote_code=cfg.trust_remote_code)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            cfg.model_name, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
        ).to(self.device).eval()
        self.graphs = self.device.type == "cuda"  # decode through _GraphDecoder
        self.compile_ok = True  # False once compiling the decoding step has failed
        self._decoder: _GraphDecoder | None = None
        torch.manual_seed(cfg.seed)

    def tokenizer(self):
        return self.tok

    def close(self) -> None:
        import torch

        self._decoder = None
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig | None = None) -> None:
        cfg = cfg or self.cfg
        # one row per (request, sample); longest prompts first so each batch pads little
        lengths = {id(r): len(self.tok(r.prompt, add_special_tokens=False).input_ids) for r in requests}
        rows = [(r, k) for r in sorted(requests, key=lambda r: -lengths[id(r)]) for k in r.sample_indices]
        results: dict[int, list[Completion]] = {}
        stop = cfg.stop_strings
        eos_ids = {self.tok.eos_token_id} | set(_as_list(self.model.generation_config.eos_token_id))
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_tokens, pad_token_id=self.tok.pad_token_id)
        if cfg.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            gen_kwargs.update(stop_strings=stop, tokenizer=self.tok)
        for key, value in cfg.sampling.items():  # the vLLM keys that generate() also knows
            if key in ("top_k", "min_p", "repetition_penalty", "min_tokens"):
                gen_kwargs["min_new_tokens" if key == "min_tokens" else key] = value
            else:
                log.warning("HF backend ignores sample.sampling.%s", key)
        graph = self.graphs and not {"min_p", "repetition_penalty"} & set(cfg.sampling)
        for start in range(0, len(rows), cfg.hf_batch_size):
            batch = rows[start:start + cfg.hf_batch_size]
            prompts = [r.prompt for r, _ in batch]
            if graph:  # one batch shape for the graph: pad with copies of the last row
                prompts += prompts[-1:] * (cfg.hf_batch_size - len(batch))
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            new = self._new_tokens(enc, gen_kwargs, cfg, eos_ids, graph)
            for (req, _), ids in zip(batch, new):
                ids, finish = _trim(ids, eos_ids, self.tok.pad_token_id, cfg.max_tokens)
                ids = _cut_at_stop(ids, stop, self._decode)
                text = self._decode(ids)
                for s in stop:  # generation stops at the token that completes `s`: cut after it
                    cut = text.find(s)
                    if cut >= 0:
                        text, finish = text[:cut + len(s)], "stop"
                results.setdefault(id(req), []).append(Completion(text, len(ids), finish))
                if len(results[id(req)]) == len(req.sample_indices):
                    on_done(req, results.pop(id(req)))

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _new_tokens(self, enc, gen_kwargs: dict[str, Any], cfg: SampleConfig, eos_ids: set[int],
                    graph: bool) -> list[list[int]]:
        """The new token ids of every row of the batch `enc` (padded after an EOS)."""
        import torch

        if graph:
            top_k = int(cfg.sampling.get("top_k") or 0)
            compile = cfg.hf_compile if self.compile_ok else False
            while True:
                try:
                    decoder = self._graph_decoder(enc["input_ids"].shape, cfg.max_tokens, eos_ids, max(top_k, 0),
                                                  cfg.top_p if cfg.temperature > 0 else 1.0, compile,
                                                  cfg.hf_kv_bucket)
                    return decoder.run(enc["input_ids"], enc["attention_mask"], cfg.max_tokens,
                                       int(cfg.sampling.get("min_tokens") or 0), cfg.temperature,
                                       cfg.stop_strings, self._decode)
                except Exception as e:  # noqa: BLE001 - a failed graph must not stop sampling
                    reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
                    self._decoder = None
                    torch.cuda.empty_cache()
                    if compile:  # compilation failed (no Triton, say): the same graphs, uncompiled
                        log.warning("HF backend: compiling the decoding step failed (%s); decoding uncompiled", reason)
                        print(f"exit-loop: warning: compiling the decoding step failed ({reason}); "
                              "decoding uncompiled", flush=True)
                        compile = self.compile_ok = False
                        continue
                    log.warning("HF backend: CUDA-graph decoding failed (%s); using plain generate", reason)
                    print(f"exit-loop: warning: CUDA-graph decoding failed ({reason}); using plain generate",
                          flush=True)
                    self.graphs = False
                    break
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen_kwargs)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    def _graph_decoder(self, shape, max_tokens: int, eos_ids: set[int], top_k: int, top_p: float, compile: bool,
                       kv_bucket: int) -> _GraphDecoder:
        """The decoder for this batch shape: the last one if it fits, else a new one (the first
        batch of a call is its longest, so one decoder serves a whole call)."""
        import torch

        batch, prompt_len = shape
        d = self._decoder
        if (d is None or d.batch != batch or d.max_len < prompt_len + max_tokens
                or (d.top_k, d.top_p, d.compiled, d.kv_bucket) != (top_k, top_p, compile, kv_bucket)):
            self._decoder = d = None
            torch.cuda.empty_cache()
            max_len = -(-(prompt_len + max_tokens) // 128) * 128
            self._decoder = d = _GraphDecoder(self.model, batch, max_len, eos_ids, self.tok.pad_token_id,
                                              top_k, top_p, compile, kv_bucket)
        return d


class _GraphDecoder:
    """Decoding on a GPU with one CUDA graph per token: the model's forward over a static KV
    cache (transformers' StaticCache, which keeps its write position on the GPU), sampling
    (temperature, top-k, top-p; Gumbel-max, so no host round trip), and the bookkeeping (EOS,
    padding of finished rows) are captured once for a batch shape and replayed for every new
    token. The host looks at the batch only every CHECK_EVERY tokens (all rows done? a stop
    string?), so the GPU never waits for Python between tokens. Attention runs through
    `gqa_decode` (exit_loop.attention) while the decoder works, and is set back after.

    With `compile`, the step is compiled by torch.compile before capture (norms, RoPE, SiLU,
    residuals and sampling fused; each layer's attention is a graph break, compiled on its own).
    With `kv_bucket`, one graph is captured per cache length kv_bucket, 2 kv_bucket, ...,
    max_len, and each step replays the shortest one that holds its slot, so attention reads
    only the written part of the cache. On an H200 at batch 256 these took a Qwen2.5-1.5B-shape
    step from 8.0 ms to 3.7-4.6 ms (bench/RESULTS.md); compiling and capturing cost ~30 s once per process."""

    CHECK_EVERY = 32

    def __init__(self, model, batch: int, max_len: int, eos_ids: set[int], pad_id: int, top_k: int,
                 top_p: float, compile: bool = False, kv_bucket: int = 0):
        import torch
        from transformers import StaticCache

        from exit_loop.attention import decode_kv_limit

        dev = model.device
        self.model, self.batch, self.max_len, self.pad_id = model, batch, max_len, pad_id
        self.top_k, self.top_p, self.compiled, self.kv_bucket = top_k, top_p, compile, kv_bucket
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("sliding-window attention layers")
        long = dict(dtype=torch.long, device=dev)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev)  # prompt padding: False
        self.slots = torch.arange(max_len, device=dev)
        self.tokens = torch.zeros(batch, 1, **long)      # the token fed to the next step
        self.positions = torch.zeros(batch, 1, **long)   # its position id
        self.step = torch.zeros((), **long)              # new tokens so far
        self.min_new = torch.zeros((), **long)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.greedy = torch.zeros((), dtype=torch.bool, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.full((batch, max_len), pad_id, **long)
        self.eos = torch.tensor(sorted(eos_ids), **long)
        # one graph per cache length the attention reads: kv_bucket, 2 kv_bucket, ..., max_len
        bucket = kv_bucket if 0 < kv_bucket < max_len else max_len
        self.limits = sorted({*range(bucket, max_len, bucket), max_len})
        step = torch.compile(self._step, dynamic=False) if compile else self._step
        # each layer's attention is a graph break, and the frame after it is compiled once per layer
        # (its layer index is a constant): allow that many, not dynamo's default of 8
        layers = model.config.get_text_config().num_hidden_layers
        recompiles = max(torch._dynamo.config.recompile_limit, 2 * layers + len(self.limits) + 8)
        with torch.no_grad(), self._attention(), torch._dynamo.config.patch(recompile_limit=recompiles):
            self._prefill(self.tokens, torch.ones_like(self.tokens))  # allocates the cache
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture
                for limit in self.limits:
                    with decode_kv_limit(limit):
                        for _ in range(2):
                            step()
            torch.cuda.current_stream().wait_stream(side)
            self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
            pool = None
            for limit in self.limits:  # the graphs never run at once: one memory pool for all
                graph = torch.cuda.CUDAGraph()
                with decode_kv_limit(limit), torch.cuda.graph(graph, pool=pool):
                    step()
                pool = graph.pool()
                self.graphs[limit] = graph

    @contextmanager
    def _attention(self):
        from exit_loop.attention import decode_compiled, register_decode_attention

        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(register_decode_attention())
        try:
            with decode_compiled(self.compiled):
                yield
        finally:
            self.model.set_attn_implementation(old)

    def _prefill(self, input_ids, attention_mask):
        """Reset, run the prompts (plain forward, into the cache), pick the first new token."""
        self.cache.reset()
        self.mask.fill_(True)
        self.mask[:, :input_ids.shape[1]] = attention_mask.bool()
        self.done.zero_()
        self.step.zero_()
        self.out.fill_(self.pad_id)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.positions.copy_(attention_mask.sum(-1, keepdim=True) - 1)
        self._advance(self._pick(logits[:, -1].float()))

    def _step(self):
        """One token for every row (what the graph holds)."""
        visible = self.mask & (self.slots <= self.cache.layers[0].cumulative_length)
        logits = self.model(input_ids=self.tokens, position_ids=self.positions,
                            attention_mask=visible[:, None, None, :], past_key_values=self.cache,
                            use_cache=True).logits
        self._advance(self._pick(logits[:, -1].float()))

    def _pick(self, logits):
        import torch

        inf = float("-inf")
        eos = logits.index_select(1, self.eos)
        logits = logits.index_copy(1, self.eos, torch.where(self.step < self.min_new, inf, eos))  # min_tokens
        greedy = logits.argmax(-1)
        x = logits / self.temperature
        if self.top_k:
            x = x.masked_fill(x < x.topk(self.top_k, dim=-1).values[:, -1:], inf)
        if self.top_p < 1.0:
            top, idx = x.sort(dim=-1, descending=True)
            p = top.softmax(-1)
            x = x.scatter(1, idx, top.masked_fill(p.cumsum(-1) - p > self.top_p, inf))
        u = torch.rand_like(x).clamp_(min=torch.finfo(x.dtype).tiny)
        sampled = (x - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max: a draw from softmax(x)
        return torch.where(self.greedy, greedy, sampled)

    def _advance(self, nxt):
        nxt = nxt.masked_fill(self.done, self.pad_id)
        self.out.index_copy_(1, self.step.view(1), nxt[:, None])
        self.done |= (nxt[:, None] == self.eos).any(-1)
        self.tokens.copy_(nxt[:, None])
        self.positions.add_(1)
        self.step.add_(1)

    def run(self, input_ids, attention_mask, max_new: int, min_new: int, temperature: float,
            stop: list[str], decode: Callable[[list[int]], str]) -> list[list[int]]:
        """New token ids of every row (pad after EOS or a stop string; up to CHECK_EVERY extra
        tokens after a stop string, which the caller cuts)."""
        import torch

        with torch.no_grad(), self._attention():
            self.min_new.fill_(min_new)
            self.temperature.fill_(max(temperature, 1e-5))
            self.greedy.fill_(temperature == 0)
            self._prefill(input_ids, attention_mask)
            prompt_len = input_ids.shape[1]
            limits = iter(self.limits)
            limit = next(limits)
            n = 1
            while n < max_new:
                if n % self.CHECK_EVERY == 0 and self._finished(n, stop, decode):
                    break
                while limit < prompt_len + n:  # this step writes slot prompt_len + n - 1
                    limit = next(limits)
                self.graphs[limit].replay()
                n += 1
            return self.out[:, :n].tolist()

    def _finished(self, n: int, stop: list[str], decode: Callable[[list[int]], str]) -> bool:
        """All rows done? Rows whose last tokens hold a stop string are marked done first."""
        if stop:
            done = self.done.tolist()
            recent = self.out[:, max(0, n - self.CHECK_EVERY - 16):n].tolist()
            hits = [i for i, ids in enumerate(recent) if not done[i] and any(s in decode(ids) for s in stop)]
            if hits:
                self.done[hits] = True
        return bool(self.done.all())


def _cut_at_stop(ids: list[int], stop: list[str], decode: Callable[[list[int]], str]) -> list[int]:
    """`ids` up to the token that completes the first stop string (all of them if none)."""
    if not stop or not any(s in decode(ids) for s in stop):
        return ids
    lo, hi = 1, len(ids)  # the shortest prefix whose text holds a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(ids[:mid]) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return ids[:lo]


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _trim(ids: list[int], eos_ids: set[int], pad_id: int | None, max_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row at its first EOS (kept out of the text) and drop right padding."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i], "stop"
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id not in eos_ids:
        ids = ids[:-1]
    return ids, "length" if len(ids) >= max_tokens else "stop"


def start_backend(cfg: SampleConfig) -> VLLMBackend | HFBackend:
    """Start the configured backend; `auto` tries vLLM first and says why it falls back."""
    if cfg.backend == "hf":
        return HFBackend(cfg)
    if cfg.backend == "vllm":
        return VLLMBackend(cfg)
    try:
        return VLLMBackend(cfg)
    except Exception as e:  # noqa: BLE001 - any failure to start vLLM means: use HF
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:500]  # all lines: the first may not say which
        log.warning("vLLM unavailable (%s); falling back to the HF transformers backend", reason)
        print(f"exit-loop: warning: vLLM unavailable ({reason}); falling back to the HF backend",
              flush=True)
        return HFBackend(cfg)


# --------------------------------------------------------------------------- the stage


def sample_row(cfg: SampleConfig, req: Request, k: int, c: Completion, backend: str) -> dict[str, Any]:
    norm = normalise_response(c.text, cfg.prompt_style)
    row: dict[str, Any] = {
        "problem_id": req.problem.id,
        "sample_index": k,
        "prompt": student_prompt(req.problem.question),
        "response": norm.response,
        "ground_truth": req.problem.ground_truth,
        "question": req.problem.question,
        "model": cfg.model_name,
        "round": cfg.round,
        "backend": backend,
        "prompt_style": cfg.prompt_style,
        "num_tokens": c.num_tokens,
        "finish_reason": c.finish_reason,
    }
    if cfg.prompt_style != "r1_zero":
        row["raw_output"] = c.text
    return row


def sample(cfg: SampleConfig, problems: Sequence[Problem], out_path: str | Path,
           backend: VLLMBackend | HFBackend | None = None) -> Path:
    """Sample `cfg.num_samples` traces for each problem of this shard into `out_path` (JSONL),
    resuming from what is there. Returns `out_path`."""
    from tqdm.auto import tqdm

    if cfg.prompt_style == "auto":
        cfg = replace(cfg, prompt_style=resolve_prompt_style(cfg.model_name))
    out_path = Path(out_path)
    problems = select_shard(problems, cfg.num_shards, cfg.shard_id)
    with AppendLog(out_path) as sink:
        done = {(r["problem_id"], r["sample_index"]) for r in sink.rows}
        total = len(problems) * cfg.num_samples
        todo_problems = [p for p in problems if any((p.id, k) not in done for k in range(cfg.num_samples))]
        if not todo_problems:
            print(f"sample: {out_path} already complete ({len(done)} samples)", flush=True)
            return out_path
        owned = backend is None
        backend = backend or start_backend(cfg)
        style, system = cfg.prompt_style, cfg.system_prompt
        tok = backend.tokenizer() if style != "r1_zero" else None
        requests = pending_requests(todo_problems, done, cfg.num_samples,
                                    lambda p: teacher_prompt(p.question, style, tok, system))
        bar = tqdm(total=total, initial=len(done), desc=f"sample ({backend.name})", unit="sample",
                   dynamic_ncols=True, mininterval=1.0)
        last_sync = time.monotonic()

        def on_done(req: Request, comps: list[Completion]) -> None:
            nonlocal last_sync
            sink.write(sample_row(cfg, req, k, c, backend.name) for k, c in zip(req.sample_indices, comps))
            bar.update(len(comps))
            if time.monotonic() - last_sync > 5.0:
                sink.sync()
                last_sync = time.monotonic()

        t0 = time.monotonic()
        try:
            backend.generate(requests, on_done, cfg)
        finally:
            if owned:
                backend.close()
        bar.close()
        n_new = sum(len(r.sample_indices) for r in requests)
        dt = time.monotonic() - t0
        print(f"sample: {n_new} new samples in {dt:.1f}s ({n_new / max(dt, 1e-9):.1f} samples/s) "
              f"-> {out_path}", flush=True)
    return out_path
