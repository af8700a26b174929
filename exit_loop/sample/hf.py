"""The HF backend: transformers, batched, left padding, prompts sorted by length, bf16 on GPU; on
a GPU, decoding runs through the CUDA-graph decoder (`exit_loop.sample.graph`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from exit_loop.sample.graph import GraphDecoder
from exit_loop.sample.request import Completion, OnDone, Request, SampleConfig
from exit_loop.tokens import encode_prompt

log = logging.getLogger(__name__)


class HFBackend:
    """transformers: batched, left padding, prompts sorted by length, bf16 on GPU.

    On a GPU, decoding runs through `GraphDecoder` (a static KV cache and one CUDA graph per
    token: bench/hf_sampler.py has the speed-up over plain `generate`); every batch is padded to
    `hf_batch_size` rows so the graph keeps one shape. On CPU, with `sample.sampling.min_p` or
    `repetition_penalty`, or if the graph cannot be built, it is plain `model.generate`."""

    def __init__(self, cfg: SampleConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.monotonic()
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
        self.graphs = self.device.type == "cuda"  # decode through GraphDecoder
        self.compile_ok = True  # False once compiling the decoding step has failed
        self.decoder: GraphDecoder | None = None
        torch.manual_seed(cfg.seed)
        # where a backend's time goes (logged at close): the start (model load) and the decoders
        # built (torch.compile and CUDA-graph capture), against the time spent generating
        self.timings = {"load_s": time.monotonic() - t0, "decoder_build_s": 0.0, "decoders_built": 0,
                        "generate_s": 0.0}

    def tokenizer(self):
        return self.tok

    def close(self) -> None:
        import torch

        t = self.timings
        log.info("hf backend: model load %.1fs, %d decoder(s) built in %.1fs (compile and graph capture), "
                 "generating %.1fs (decoder builds included)", t["load_s"], t["decoders_built"],
                 t["decoder_build_s"], t["generate_s"])
        self.decoder = None
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig | None = None) -> None:
        t0 = time.monotonic()
        try:
            self._generate(requests, on_done, cfg or self.cfg)
        finally:
            self.timings["generate_s"] += time.monotonic() - t0

    def _generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig) -> None:
        # one row per (request, sample); longest prompts first so each batch pads little
        ids_of = {id(r): encode_prompt(self.tok, r.prompt) for r in requests}
        rows = [(r, k) for r in sorted(requests, key=lambda r: -len(ids_of[id(r)])) for k in r.sample_indices]
        results: dict[int, list[Completion]] = {}
        stop = cfg.stop_strings
        eos_ids = {self.tok.eos_token_id} | set(as_list(self.model.generation_config.eos_token_id))
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
            prompts = [{"input_ids": ids_of[id(r)]} for r, _ in batch]
            if graph:  # one batch shape for the graph: pad with copies of the last row
                prompts += prompts[-1:] * (cfg.hf_batch_size - len(batch))
            enc = self.tok.pad(prompts, return_tensors="pt", padding=True).to(self.device)
            new = self._new_tokens(enc, gen_kwargs, cfg, eos_ids, graph)
            for (req, _), ids in zip(batch, new):
                ids, finish = trim(ids, eos_ids, self.tok.pad_token_id, cfg.max_tokens)
                ids = _cut_at_stop(ids, stop, self._decode)
                text = self._decode(ids)
                for s in stop:  # generation stops at the token that completes `s`: cut after it
                    cut = text.find(s)
                    if cut >= 0:
                        text, finish = text[:cut + len(s)], "stop"
                results.setdefault(id(req), []).append(Completion(text, len(ids), finish, len(ids_of[id(req)])))
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
                    self.decoder = None
                    torch.cuda.empty_cache()
                    if compile:  # compilation failed (no Triton, say): the same graphs, uncompiled
                        log.warning("HF backend: compiling the decoding step failed (%s); decoding uncompiled",
                                    reason)
                        compile = self.compile_ok = False
                        continue
                    log.warning("HF backend: CUDA-graph decoding failed (%s); using plain generate", reason)
                    self.graphs = False
                    break
        with torch.inference_mode():
            out = self.model.generate(**enc, **gen_kwargs)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    def _graph_decoder(self, shape, max_tokens: int, eos_ids: set[int], top_k: int, top_p: float, compile: bool,
                       kv_bucket: int) -> GraphDecoder:
        """The decoder for this batch shape: the last one if it fits, else a new one (the first
        batch of a call is its longest, so one decoder serves a whole call)."""
        import torch

        batch, prompt_len = shape
        d = self.decoder
        if (d is None or d.batch != batch or d.max_len < prompt_len + max_tokens
                or (d.top_k, d.top_p, d.compiled, d.kv_bucket) != (top_k, top_p, compile, kv_bucket)):
            self.decoder = d = None
            torch.cuda.empty_cache()
            max_len = -(-(prompt_len + max_tokens) // 128) * 128
            t0 = time.monotonic()
            self.decoder = d = GraphDecoder(self.model, batch, max_len, eos_ids, self.tok.pad_token_id,
                                              top_k, top_p, compile, kv_bucket)
            torch.cuda.synchronize()
            self.timings["decoder_build_s"] += time.monotonic() - t0
            self.timings["decoders_built"] += 1
        return d



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


def as_list(x: Any) -> list[Any]:
    """None, one value or a sequence (as generation_config.eos_token_id may be) as a list."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def trim(ids: list[int], eos_ids: set[int], pad_id: int | None, max_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row at its first EOS (kept out of the text) and drop right padding."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[:i], "stop"
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id not in eos_ids:
        ids = ids[:-1]
    return ids, "length" if len(ids) >= max_tokens else "stop"
