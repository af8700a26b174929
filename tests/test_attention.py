"""The HF sampler's decode attention (`gqa_decode`, exit_loop.sample.graph) on CPU: the grouped
matmul path against a float64 reference, the KV limit the CUDA-graph decoder sets per graph, and
the compiled version it runs when the decoding step is compiled."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from exit_loop.sample.graph import DecodeAttention  # noqa: E402

A = DecodeAttention()


def _case(b=3, h=12, hk=2, d=16, slots=40, seed=0):
    """Random query/key/value and a decode mask: left padding per row, slots after 30 unwritten."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=g) for shape in ((b, h, 1, d), (b, hk, slots, d), (b, hk, slots, d)))
    visible = torch.ones(b, slots, dtype=torch.bool)
    visible[0, :7] = False
    visible[2, :3] = False
    visible[:, 30:] = False
    return q, k, v, visible


def _reference(q, k, v, visible):
    """Attention in float64 with every query head given its own copy of its key/value head."""
    group = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v64).transpose(1, 2)  # (batch, 1, heads, dim)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def test_gqa_decode_matches_a_float64_reference():
    q, k, v, visible = _case()
    out, _ = A.decode_attention_forward(None, q, k, v, visible[:, None, None, :])
    assert out.shape == (3, 1, 12, 16)
    assert _rel(out, _reference(q, k, v, visible)) < 1e-5


def test_kv_limit_reads_only_the_first_slots():
    q, k, v, visible = _case()
    m4 = visible[:, None, None, :]
    full, _ = A.decode_attention_forward(None, q, k, v, m4)
    with A.decode_kv_limit(32):  # every slot from 30 on is masked: the same function
        cut, _ = A.decode_attention_forward(None, q, k, v, m4)
    assert torch.allclose(cut, full, atol=1e-6)
    with A.decode_kv_limit(20):  # slots 20..29 are visible: the limit must drop them
        short, _ = A.decode_attention_forward(None, q, k, v, m4)
    assert _rel(short, _reference(q, k[:, :, :20], v[:, :, :20], visible[:, :20])) < 1e-5
    assert not torch.allclose(short, full, atol=1e-3)


def test_kv_limit_is_read_at_run_time_under_torch_compile():
    """The decoder compiles its step once and captures one graph per limit: the attention is
    left out of the compiled graph, so a compiled caller sees each new limit."""
    q, k, v, visible = _case()
    m4 = visible[:, None, None, :]
    from transformers import AttentionInterface

    attend = AttentionInterface()[A.register_decode_attention()]

    @torch.compile(backend="eager", dynamic=False)
    def step(q, k, v, m4):
        return attend(None, q * 1.0, k, v, m4)[0] + 0.0

    for limit in (20, 25, 40, 20):
        with A.decode_kv_limit(limit):
            got = step(q, k, v, m4)
        want = _reference(q, k[:, :, :limit], v[:, :, :limit], visible[:, :limit])
        assert _rel(got, want) < 1e-5, limit


@pytest.mark.engine
def test_compiled_core_matches_the_reference():
    """Under decode_compiled (inductor; on CPU its C++ backend, tens of seconds) the function is
    the same, at every KV limit, and the context is left as found."""
    q, k, v, visible = _case(seed=1)
    m4 = visible[:, None, None, :]
    with A.decode_compiled(True):
        out, _ = A.decode_attention_forward(None, q, k, v, m4)
        assert A.compiled_core is not None, A.compile_failed  # it ran compiled, not the fallback
        with A.decode_kv_limit(20):
            short, _ = A.decode_attention_forward(None, q, k, v, m4)
    assert A.compiled_core is None
    assert _rel(out, _reference(q, k, v, visible)) < 1e-5
    assert _rel(short, _reference(q, k[:, :, :20], v[:, :, :20], visible[:, :20])) < 1e-5
