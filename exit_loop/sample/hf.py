"""The HF backend: transformers, batched, left padding, prompts sorted by length, bf16 on GPU; on
a GPU, decoding runs through the CUDA-graph decoder (`exit_loop.sample.graph`).

Across rounds in one process (`isolate: false`, as the quickstart runs), a closed GPU backend
keeps its model and decoder (`HFBackend.kept`), and the next backend for a model of the same
architecture copies the new checkpoint's weights into them in place instead of loading a model
and compiling and capturing its graphs again: the captured graphs read the same parameter
memory, now holding the new weights (tests/test_hf_reuse.py: the same greedy outputs as a fresh
backend). Only models whose weights and KV cache take at most `KEEP_MAX_BYTES` are kept, since
the kept model holds GPU memory while the round trains; `HFBackend.release()` frees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exit_loop.sample.graph import GraphDecoder
from exit_loop.sample.request import Completion, OnDone, Request, SampleConfig

log = logging.getLogger(__name__)

KEEP_MAX_BYTES = 4 << 30  # weights + KV cache of a model kept across rounds, at most
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")


@dataclass
class Kept:
    """A closed backend's model and decoder, kept for the next backend of the same architecture."""
    key: tuple
    model: Any
    decoder: GraphDecoder | None
    compile_ok: bool


def _architecture_key(model_name: str, dtype, device, trust_remote_code: bool) -> tuple:
    """What must match for a kept model to take another checkpoint's weights: the model config
    (but its path and the dtype it was saved in), the dtype and the device it runs in."""
    import json

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_name, trust_remote_code=trust_remote_code).to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return (json.dumps(config, sort_keys=True, default=str), str(dtype), str(device))


def load_weights_into(model, model_name: str) -> bool:
    """Copy the safetensors weights of `model_name` (a local directory) into `model`'s parameters
    in place (cast to their dtype, as `from_pretrained(dtype=...)` casts), so that CUDA graphs
    captured on them run with the new weights. False, with nothing copied, where the checkpoint's
    tensors do not map one to one onto the model's (only a tied output embedding may be absent)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_name).glob("*.safetensors"))
    if not files:
        return False
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(f, device=str(model.device)))
    own = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config.get_text_config(), "tie_word_embeddings", False) else set()
    if set(state) - set(own) or set(own) - set(state) - tied \
            or any(own[k].shape != v.shape for k, v in state.items()):
        return False
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return True


class HFBackend:
    """transformers: batched, left padding, prompts sorted by length, bf16 on GPU.

    On a GPU, decoding runs through `GraphDecoder` (a static KV cache and one CUDA graph per
    token: bench/hf_sampler.py has the speed-up over plain `generate`); every batch is padded to
    `hf_batch_size` rows so the graph keeps one shape. On CPU, with `sample.sampling.min_p` or
    `repetition_penalty`, or if the graph cannot be built, it is plain `model.generate`.
    A GPU backend's model and decoder are kept for the next one (the module docstring)."""

    kept: Kept | None = None  # the last closed GPU backend's model and decoder, in this process

    @classmethod
    def release(cls) -> None:
        """Free the kept model and decoder (GPU memory)."""
        import torch

        if cls.kept is not None:
            cls.kept = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

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
        self.graphs = self.device.type == "cuda"  # decode through GraphDecoder
        self.compile_ok = True  # False once compiling the decoding step has failed
        self.decoder: GraphDecoder | None = None
        self.key = _architecture_key(cfg.model_name, dtype, self.device, cfg.trust_remote_code) \
            if self.graphs and Path(cfg.model_name).is_dir() else None
        kept, HFBackend.kept = HFBackend.kept, None
        self.reused = kept is not None and kept.key == self.key and load_weights_into(kept.model, cfg.model_name)
        if self.reused:
            assert kept is not None
            from transformers import GenerationConfig

            self.model, self.decoder, self.compile_ok = kept.model, kept.decoder, kept.compile_ok
            try:
                self.model.generation_config = GenerationConfig.from_pretrained(cfg.model_name)
            except OSError:
                pass
        else:
            del kept
            if self.graphs:
                torch.cuda.empty_cache()
            self.model = AutoModelForCausalLM.from_pretrained(
                cfg.model_name, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
            ).to(self.device).eval()
        torch.manual_seed(cfg.seed)
        # where a backend's time goes (logged at close): the start (model load) and the decoders
        # built (torch.compile and CUDA-graph capture), against the time spent generating
        self.timings = {"load_s": time.monotonic() - t0, "decoder_build_s": 0.0, "decoders_built": 0,
                        "generate_s": 0.0, "reused": self.reused}

    def tokenizer(self):
        return self.tok

    def close(self) -> None:
        import torch

        t = self.timings
        log.info("hf backend: model load %.1fs, %d decoder(s) built in %.1fs (compile and graph capture), "
                 "generating %.1fs (decoder builds included)%s", t["load_s"], t["decoders_built"],
                 t["decoder_build_s"], t["generate_s"], "; model and decoder reused" if self.reused else "")
        if self.key is not None and self._bytes() <= KEEP_MAX_BYTES:
            HFBackend.kept = Kept(self.key, self.model, self.decoder, self.compile_ok)
        self.decoder = None
        del self.model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _bytes(self) -> int:
        """GPU memory of the model's weights and the decoder's KV cache."""
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for layer in getattr(getattr(self.decoder, "cache", None), "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                n += t.numel() * t.element_size() if t is not None and hasattr(t, "numel") else 0
        return n

    def generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig | None = None) -> None:
        t0 = time.monotonic()
        try:
            self._generate(requests, on_done, cfg or self.cfg)
        finally:
            self.timings["generate_s"] += time.monotonic() - t0

    def _generate(self, requests: list[Request], on_done: OnDone, cfg: SampleConfig) -> None:
        # one row per (request, sample); longest prompts first so each batch pads little
        lengths = {id(r): len(self.tok(r.prompt, add_special_tokens=False).input_ids) for r in requests}
        rows = [(r, k) for r in sorted(requests, key=lambda r: -lengths[id(r)]) for k in r.sample_indices]
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
            prompts = [r.prompt for r, _ in batch]
            if graph:  # one batch shape for the graph: pad with copies of the last row
                prompts += prompts[-1:] * (cfg.hf_batch_size - len(batch))
            enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            new = self._new_tokens(enc, gen_kwargs, cfg, eos_ids, graph)
            for (req, _), ids in zip(batch, new):
                ids, finish = trim(ids, eos_ids, self.tok.pad_token_id, cfg.max_tokens)
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
