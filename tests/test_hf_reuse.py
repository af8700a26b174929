"""The HF backend's model and CUDA-graph decoder kept across rounds (issue 21): a backend for the
next round's checkpoint copies its weights into the kept model in place, and its decoder (the
graphs captured on the old weights) then samples exactly what a freshly loaded backend samples
(greedy, the same text). On a CPU nothing is kept. `make gpu-check` runs the GPU test."""

from __future__ import annotations

import pytest

from exit_loop.prompts import student_prompt
from exit_loop.sample.hf import HFBackend, load_weights_into
from exit_loop.sample.request import SampleConfig, pending_requests
from exit_loop.tasks import Problem

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 12 eggs. How many eggs are in 5 boxes?",
             "Sara reads 20 pages a day. How many pages does she read in a week?",
             "There are 9 birds on a tree and 4 fly away. How many are left?"]


def _perturbed_copy(src, out, seed: int):
    """The model at `src` with every weight moved by noise, saved with its tokenizer to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp(min=1e-3))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _greedy(backend: HFBackend, cfg: SampleConfig) -> list[str]:
    problems = [Problem(f"q{i}", q, "0", "") for i, q in enumerate(QUESTIONS)]
    texts: dict[str, str] = {}
    backend.generate(pending_requests(problems, set(), 1, lambda p: student_prompt(p.question)),
                     lambda req, comps: texts.__setitem__(req.problem.id, comps[0].text), cfg)
    return [texts[p.id] for p in problems]


def test_weights_load_in_place_or_not_at_all(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    other = _perturbed_copy(tiny_model_dir, tmp_path / "b", seed=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert load_weights_into(model, str(other))
    want = AutoModelForCausalLM.from_pretrained(other)
    for (n, p), (_, q) in zip(model.named_parameters(), want.named_parameters()):
        assert p.data_ptr() == before[n] and torch.equal(p, q), n
    assert not load_weights_into(model, str(tmp_path))  # no safetensors there: nothing copied
    assert torch.equal(next(model.parameters()), next(want.parameters()))


def test_nothing_is_kept_on_cpu(tiny_model_dir):
    HFBackend.release()
    backend = HFBackend(SampleConfig(model_name=str(tiny_model_dir), backend="hf", gpu_device="cpu"))
    backend.close()
    assert HFBackend.kept is None and not backend.reused


@pytest.mark.gpu
def test_a_kept_decoder_samples_what_a_fresh_backend_samples(tmp_path, tiny_model_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    b = _perturbed_copy(tiny_model_dir, tmp_path / "b", seed=1)
    cfg_a = SampleConfig(model_name=str(tiny_model_dir), backend="hf", temperature=0.0, max_tokens=24,
                         hf_batch_size=8)
    cfg_b = SampleConfig(model_name=str(b), backend="hf", temperature=0.0, max_tokens=24, hf_batch_size=8)
    HFBackend.release()
    first = HFBackend(cfg_a)
    out_a = _greedy(first, cfg_a)
    assert first.timings["decoders_built"] == 1 and not first.reused
    first.close()
    assert HFBackend.kept is not None

    reused = HFBackend(cfg_b)
    assert reused.reused and reused.decoder is not None
    out_reused = _greedy(reused, cfg_b)
    assert reused.timings["decoders_built"] == 0  # the kept graphs, not new ones
    reused.close()

    HFBackend.release()
    fresh = HFBackend(cfg_b)
    assert not fresh.reused
    out_fresh = _greedy(fresh, cfg_b)
    fresh.close()
    HFBackend.release()
    assert out_reused == out_fresh
    assert out_fresh != out_a  # the other weights say something else: the copy took effect
