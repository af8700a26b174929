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

    from exit_loop.train.attention import register_varlen_attention
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register_varlen_attention())

(The HF sampler's decode attention, `gqa_decode`, lives with its decoder in
`exit_loop.sample.graph`.)
"""

from __future__ import annotations

import inspect
from typing import Any

NAME = "varlen_sdpa"
_varlen_kwargs: dict[str, Any] | None = None


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
