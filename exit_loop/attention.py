"""Attention for packed (padding-free) SFT batches: PyTorch's own FlashAttention varlen kernel.

TRL's padding-free collator (on by default with `packing_strategy="bfd"`) flattens a batch into
one row and hands the model `cu_seq_lens_q`/`max_length_q`, the sequence boundaries. The
`flash_attention_*` implementations read them but need the `flash-attn` package (a long CUDA
build); plain `sdpa` ignores them and attends over the whole row through a dense block-causal
mask, which costs (row length)^2 instead of the sum of (sequence length)^2. This registers
`varlen_sdpa`, an attention implementation for transformers that calls
`torch.nn.attention.varlen.varlen_attn` (the FlashAttention-2 kernels that ship inside PyTorch's
CUDA build) when the boundaries are there, on a CUDA half-precision input, and is exactly `sdpa`
in every other case (CPU, float32, padded batches, generation), masks included.

    from exit_loop.attention import register_varlen_attention
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register_varlen_attention())

It also registers `gqa_decode` for the HF sampler's CUDA-graph decoder (exit_loop.sample): one
new token per row against a long KV cache, for grouped-query models, without copying the cache
once per query head as `sdpa` does when there is a mask (the copies cost more than the
attention itself at batch 256); everything else goes to `sdpa`. Under `decode_kv_limit(n)` it
reads only the first `n` slots of the cache (the decoder captures one graph per limit, so a
step early in a row reads a short cache, not all of it), and `torch.compile` leaves it out of
the compiled graph (a graph break), so the limit is read when it runs and never recompiles.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Any, Iterator

NAME = "varlen_sdpa"
DECODE_NAME = "gqa_decode"
_varlen_kwargs: dict[str, Any] | None = None
log = logging.getLogger("exit_loop.attention")
_kv_limit: int | None = None  # gqa_decode reads cache slots [0, _kv_limit) only
_compiled: Any = None  # gqa_decode's compiled core, while decode_compiled(True) holds
_compile_failed: str | None = None  # why compiling it failed: then uncompiled for good


@contextmanager
def decode_compiled(on: bool = True) -> Iterator[None]:
    """Within this, `gqa_decode` runs its matmuls and softmax compiled by torch.compile (scale,
    mask, softmax and cast in one kernel between the two matmuls; one compilation per cache
    length); if compiling fails, it warns once and runs them uncompiled."""
    global _compiled
    old = _compiled
    if on and _compiled is None and _compile_failed is None:
        import torch

        _compiled = torch.compile(_decode_core, dynamic=False)
    elif not on:
        _compiled = None
    try:
        yield
    finally:
        _compiled = old


def _decode_core(q, key, value, visible, scale: float):
    """(batch, kv_heads, group, dim) queries against (batch, kv_heads, slots, dim) keys and values;
    `visible` (batch, 1, 1, slots) bool or additive float."""
    import torch

    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # (b, hk, g, cache)
    if visible.dtype == torch.bool:
        scores = scores.masked_fill(~visible, float("-inf"))
    else:
        scores = scores + visible
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)  # (b, hk, g, d)


@contextmanager
def decode_kv_limit(n: int | None) -> Iterator[None]:
    """Within this, `gqa_decode` attends over the first `n` cache slots (None: all of them).
    The caller guarantees that every slot at or after `n` is masked out."""
    global _kv_limit
    old, _kv_limit = _kv_limit, n
    try:
        yield
    finally:
        _kv_limit = old


def varlen_available() -> bool:
    """Whether this PyTorch has the varlen FlashAttention entry point and a CUDA device."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _kwargs_for(varlen_attn) -> dict[str, Any]:
    """The causal and GQA keywords, which changed names between PyTorch releases."""
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # (-1, 0) means causal
    else:
        kwargs["is_causal"] = True
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers attention interface: query/key/value (batch, heads, seq, head_dim); returns
    (batch, seq, heads, head_dim) and no weights."""
    import torch
    from torch.nn.attention.varlen import varlen_attn
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q = kwargs.get("cu_seq_lens_q")
    if query.dtype == torch.float32 and query.is_cuda and torch.is_autocast_enabled("cuda"):
        half = torch.get_autocast_dtype("cuda")  # as sdpa would under autocast (fp32 RoPE output)
        query, key, value = query.to(half), key.to(half), value.to(half)
    if (cu_q is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16)
            or query.shape[0] != 1 or dropout or sliding_window is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    global _varlen_kwargs
    if _varlen_kwargs is None:
        _varlen_kwargs = _kwargs_for(varlen_attn)
    cu_k = kwargs.get("cu_seq_lens_k", cu_q)
    max_q = int(kwargs["max_length_q"])
    max_k = int(kwargs.get("max_length_k", max_q))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (seq, heads, head_dim)
    if "enable_gqa" not in _varlen_kwargs and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    cu_q = cu_q.to(q.device, torch.int32)
    cu_k = cu_k.to(q.device, torch.int32)
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **_varlen_kwargs)
    return out.unsqueeze(0), None


def register_varlen_attention() -> str:
    """Register `varlen_sdpa` with transformers (attention and mask functions) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the sdpa fallback needs sdpa's masks
    return NAME


def decode_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """One query token per row with a 4D mask: (batch, kv_heads, group, dim) x (batch, kv_heads,
    dim, cache) matmuls, softmax in float32; no per-head copies of the cache. Else `sdpa`."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 4 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    global _compiled, _compile_failed
    if _kv_limit is not None and _kv_limit < key.shape[2]:
        key, value, attention_mask = key[:, :, :_kv_limit], value[:, :, :_kv_limit], attention_mask[..., :_kv_limit]
    b, h, _, d = query.shape
    hk = key.shape[1]
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, hk, h // hk, d)  # query heads j*g .. j*g+g-1 share key/value head j
    if _compiled is not None:
        try:
            out = _compiled(q, key, value, attention_mask, scale)
            return out.reshape(b, h, 1, d).transpose(1, 2), None
        except Exception as e:  # noqa: BLE001 - the same function, uncompiled, below
            _compiled, _compile_failed = None, " ".join(f"{type(e).__name__}: {e}".split())[:300]
            log.warning("gqa_decode: compiling failed (%s); running uncompiled", _compile_failed)
            print(f"exit-loop: warning: compiling the decode attention failed ({_compile_failed}); "
                  "running it uncompiled", flush=True)
    out = _decode_core(q, key, value, attention_mask, scale)
    return out.reshape(b, h, 1, d).transpose(1, 2), None


def register_decode_attention() -> str:
    """Register `gqa_decode` with transformers (attention and mask functions) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    import torch

    AttentionInterface.register(DECODE_NAME, torch.compiler.disable(decode_attention_forward, recursive=True))
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_NAME, sdpa_mask)
    return DECODE_NAME
