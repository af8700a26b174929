"""The HF backend's CUDA-graph decoder (`GraphDecoder`) and the attention it decodes with
(`DecodeAttention`, registered with transformers as `gqa_decode`).

`gqa_decode` attends one new token per row against a long KV cache, for grouped-query models,
without copying the cache once per query head as `sdpa` does when there is a mask (the copies
cost more than the attention itself at batch 256); everything else goes to `sdpa`. Under
`decode_kv_limit(n)` it reads only the first `n` slots of the cache (the decoder captures one
graph per limit, so a step early in a row reads a short cache, not all of it), and
`torch.compile` leaves it out of the compiled graph (a graph break), so the limit is read when it
runs and never recompiles. Its state (the limit, the compiled core, why compiling failed) lives on
the `DecodeAttention` object each decoder owns; the module holds none.

    decoder = GraphDecoder(model, batch=256, max_len=1024, eos_ids={eos}, pad_id=pad, top_k=0,
                           top_p=1.0, compile=True, kv_bucket=64)
    new_ids = decoder.run(input_ids, attention_mask, max_new=512, min_new=0, temperature=0.7,
                          stop=["</answer>"], decode=tokenizer.decode)

bench/hf_sampler.py times it against plain `generate` (bench/RESULTS.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

DECODE_NAME = "gqa_decode"


def decode_core(q, key, value, visible, scale: float):
    """(batch, kv_heads, group, dim) queries against (batch, kv_heads, slots, dim) keys and values;
    `visible` (batch, 1, 1, slots) bool or additive float."""
    import torch

    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (b, hk, g, cache)
    if visible.dtype == torch.bool:
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        scores = scores + visible
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (b, hk, g, d)

class DecodeAttention:
    """`gqa_decode` with its state: the KV limit (`decode_kv_limit`) and the compiled core
    (`decode_compiled`). `register_decode_attention()` registers it with transformers and returns
    the name to give `model.set_attn_implementation`."""

    def __init__(self) -> None:
        self.kv_limit: int | None = None   # attend over cache slots [0, kv_limit) only
        self.compiled_core: Any = None     # decode_core compiled, while decode_compiled(True) holds
        self.compile_failed: str | None = None  # why compiling failed: then uncompiled for good
        self.registered: Any = None        # what transformers calls: decode_attention_forward, never traced

    @contextmanager
    def decode_compiled(self, on: bool = True) -> Iterator[None]:
        """Within this, the matmuls and softmax run compiled by torch.compile (scale, mask, softmax
        and cast in one kernel between the two matmuls; one compilation per cache length); if
        compiling fails, it warns once and runs them uncompiled."""
        old = self.compiled_core
        if on and self.compiled_core is None and self.compile_failed is None:
            import torch

            self.compiled_core = torch.compile(decode_core, dynamic=False)
        elif not on:
            self.compiled_core = None
        try:
            yield
        finally:
            self.compiled_core = old

    @contextmanager
    def decode_kv_limit(self, n: int | None) -> Iterator[None]:
        """Within this, attend over the first `n` cache slots (None: all of them). The caller
        guarantees that every slot at or after `n` is masked out."""
        old, self.kv_limit = self.kv_limit, n
        try:
            yield
        finally:
            self.kv_limit = old

    def decode_attention_forward(self, module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, **kwargs):
        """One query token per row with a 4D mask: (batch, kv_heads, group, dim) x (batch, kv_heads,
        dim, cache) matmuls, softmax in float32; no per-head copies of the cache. Else `sdpa`."""
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if query.shape[2] != 1 or not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4 or dropout:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        limit = self.kv_limit
        if limit is not None and limit < key.shape[2]:
            key, value, attention_mask = key[:, :, :limit], value[:, :, :limit], attention_mask[..., :limit]
        b, h, _, d = query.shape
        hk = key.shape[1]
        scale = scaling if scaling is not None else d ** -0.5
        q = query.reshape(b, hk, h // hk, d)  # query heads j*g .. j*g+g-1 share key/value head j
        if self.compiled_core is not None:
            try:
                out = self.compiled_core(q, key, value, attention_mask, scale)
                return out.reshape(b, h, 1, d).transpose(1, 2), None
            except Exception as e:  # noqa: BLE001 - the same function, uncompiled, below
                self.compiled_core = None
                self.compile_failed = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                log.warning("compiling the decode attention failed (%s); running it uncompiled",
                            self.compile_failed)
        out = decode_core(q, key, value, attention_mask, scale)
        return out.reshape(b, h, 1, d).transpose(1, 2), None

    def register_decode_attention(self) -> str:
        """Register this object's `gqa_decode` with transformers (attention and mask functions;
        the last one registered is the one `gqa_decode` names) and return the name."""
        import torch
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        if self.registered is None:  # one object, so a compiled caller's guard on it keeps holding
            self.registered = torch.compiler.disable(self.decode_attention_forward, recursive=True)
        AttentionInterface.register(DECODE_NAME, self.registered)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_NAME, sdpa_mask)
        return DECODE_NAME


class GraphDecoder:
    """Decoding on a GPU with one CUDA graph per token: the model's forward over a static KV
    cache (transformers' StaticCache, which keeps its write position on the GPU), sampling
    (temperature, top-k, top-p; Gumbel-max, so no host round trip), and the bookkeeping (EOS,
    padding of finished rows) are captured once for a batch shape and replayed for every new
    token. The host looks at the batch only every CHECK_EVERY tokens (all rows done? a stop
    string?), so the GPU never waits for Python between tokens. Attention runs through the
    decoder's own `DecodeAttention` (`gqa_decode`) while the decoder works (`attending()`), and
    is set back after.

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

        dev = model.device
        self.model, self.batch, self.max_len, self.pad_id = model, batch, max_len, pad_id
        self.top_k, self.top_p, self.compiled, self.kv_bucket = top_k, top_p, compile, kv_bucket
        self.attention = DecodeAttention()
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("sliding-window attention layers")
        long = dict(dtype=torch.long, device=dev)
        self.mask = torch.ones(batch, max_len, dtype=torch.bool, device=dev)  # prompt padding: False
        self.slots = torch.arange(max_len, device=dev)
        self.tokens = torch.zeros(batch, 1, **long)      # the token fed to the next step
        self.positions = torch.zeros(batch, 1, **long)   # its position id
        self.new_tokens = torch.zeros((), **long)        # new tokens so far
        self.min_new = torch.zeros((), **long)
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.greedy = torch.zeros((), dtype=torch.bool, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.out = torch.full((batch, max_len), pad_id, **long)
        self.eos = torch.tensor(sorted(eos_ids), **long)
        # one graph per cache length the attention reads: kv_bucket, 2 kv_bucket, ..., max_len
        bucket = kv_bucket if 0 < kv_bucket < max_len else max_len
        self.limits = sorted({*range(bucket, max_len, bucket), max_len})
        step = torch.compile(self.step, dynamic=False) if compile else self.step
        # each layer's attention is a graph break, and the frame after it is compiled once per layer
        # (its layer index is a constant): allow that many, not dynamo's default of 8
        layers = model.config.get_text_config().num_hidden_layers
        recompiles = max(torch._dynamo.config.recompile_limit, 2 * layers + len(self.limits) + 8)
        with torch.no_grad(), self.attending(), torch._dynamo.config.patch(recompile_limit=recompiles):
            self.prefill(self.tokens, torch.ones_like(self.tokens))  # allocates the cache
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and compilation) outside the capture
                for limit in self.limits:
                    with self.attention.decode_kv_limit(limit):
                        for _ in range(2):
                            step()
            torch.cuda.current_stream().wait_stream(side)
            self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
            pool = None
            for limit in self.limits:  # the graphs never run at once: one memory pool for all
                graph = torch.cuda.CUDAGraph()
                with self.attention.decode_kv_limit(limit), torch.cuda.graph(graph, pool=pool):
                    step()
                pool = graph.pool()
                self.graphs[limit] = graph

    @contextmanager
    def attending(self) -> Iterator[None]:
        """Within this, the model attends through this decoder's `gqa_decode` (compiled when the
        decoder is); set back after. `prefill`, `step` and the graphs run within it."""
        old = self.model.config._attn_implementation
        self.model.set_attn_implementation(self.attention.register_decode_attention())
        try:
            with self.attention.decode_compiled(self.compiled):
                yield
        finally:
            self.model.set_attn_implementation(old)

    def prefill(self, input_ids, attention_mask):
        """Reset, run the prompts (plain forward, into the cache), pick the first new token."""
        self.cache.reset()
        self.mask.fill_(True)
        self.mask[:, :input_ids.shape[1]] = attention_mask.bool()
        self.done.zero_()
        self.new_tokens.zero_()
        self.out.fill_(self.pad_id)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        self.positions.copy_(attention_mask.sum(-1, keepdim=True) - 1)
        self._advance(self._pick(logits[:, -1].float()))

    def step(self):
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
        logits = logits.index_copy(1, self.eos, torch.where(self.new_tokens < self.min_new, inf, eos))  # min_tokens
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
        self.out.index_copy_(1, self.new_tokens.view(1), nxt[:, None])
        self.done |= (nxt[:, None] == self.eos).any(-1)
        self.tokens.copy_(nxt[:, None])
        self.positions.add_(1)
        self.new_tokens.add_(1)

    def run(self, input_ids, attention_mask, max_new: int, min_new: int, temperature: float,
            stop: list[str], decode: Callable[[list[int]], str]) -> list[list[int]]:
        """New token ids of every row (pad after EOS or a stop string; up to CHECK_EVERY extra
        tokens after a stop string, which the caller cuts)."""
        import torch

        with torch.no_grad(), self.attending():
            self.min_new.fill_(min_new)
            self.temperature.fill_(max(temperature, 1e-5))
            self.greedy.fill_(temperature == 0)
            self.prefill(input_ids, attention_mask)
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
