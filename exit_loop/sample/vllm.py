"""The vLLM backend: the offline `LLM` engine; every pending prompt is enqueued at once and the
engine is stepped until done, handing over each request's samples the moment it finishes (so a
crash loses only unfinished requests).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any, Iterator

from exit_loop.sample.request import Completion, OnDone, Request, SampleConfig
from exit_loop.tokens import encode_prompt


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive now out of the collector's sight while vLLM starts or stops.

    vLLM calls `gc.collect()` several times while it starts; after torch, transformers and TRL are
    imported each full collection walks about a million objects (~0.45 s on 2 cores), most of an
    engine's start in the quickstart (2.0 s; 0.45 s frozen; bench/RESULTS.md). Freezing moves them
    to a generation the collector skips, and unfreezing hands them back: nothing is lost. On a GPU
    one collection comes first, so that memory an earlier trainer left in reference cycles is
    free when vLLM measures what it may take.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


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
        with frozen_heap():
            self.llm = LLM(**kwargs)
        self.name = "vllm"

    def tokenizer(self):
        return self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine's processes now (rather than at interpreter exit)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()  # (it unfreezes the heap itself, so frozen_heap would not help here)

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
        # token ids, not text: the one special-token policy (exit_loop.tokens) for every backend
        tok = self.tokenizer()
        prompts = [{"prompt_token_ids": encode_prompt(tok, r.prompt)} for r in requests]
        # The same work as LLM.generate (enqueue everything, step the engine), but each request
        # is handed over the moment it finishes, so a crash loses only unfinished requests
        # (LLM.enqueue: vLLM 0.32, the pinned version, has it).
        # enqueue returns internal ids ("<n>-<random>"); outputs carry the external "<n>"
        ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        by_id = {rid.split("-", 1)[0]: req for rid, req in zip(ids, requests)}
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    req = by_id.pop(out.request_id.split("-", 1)[0])
                    on_done(req, completions(out, len(req.sample_indices)))


def completions(out: Any, n: int) -> list[Completion]:
    """A finished vLLM request's outputs as Completions, in sample order."""
    outs = sorted(out.outputs, key=lambda o: o.index)
    fed = len(out.prompt_token_ids) if getattr(out, "prompt_token_ids", None) is not None else None
    comps = [Completion(o.text, len(o.token_ids), o.finish_reason or "stop", fed) for o in outs]
    return comps * n if len(comps) == 1 else comps  # one greedy draw stands for all n
