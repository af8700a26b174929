"""Packed (padding-free) SFT batches through the whole model: a batch that TRL's padding-free
collator flattens into one row must train each sequence exactly as if it were alone.

The SFT stage's GPU defaults flatten a batch into one row and hand the model the sequence
boundaries (`cu_seq_lens_q`, `position_ids`); the `varlen_sdpa` attention then runs PyTorch's
varlen FlashAttention kernel. A kernel test on random q/k/v cannot see what the model hands the
kernel in a real step, nor the backward pass, so these tests run the whole Qwen2 model:

- per-sequence logits, loss and **gradients** of the packed row equal those of each sequence run
  alone through plain `sdpa` (float32 on CPU; bf16 tolerance under autocast on a GPU);
- changing a later token moves no earlier position and no other sequence, and the loss of the
  earlier positions has exactly zero gradient with respect to the later inputs.

On CPU (the `cpu` cases, run by `make test`) `varlen_sdpa` falls back to `sdpa` with the
block-causal mask transformers builds from `position_ids`: the same checks then cover the
fallback. The `cuda` cases carry the `gpu` marker (`make gpu-check`) and are skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from exit_loop.train.attention import register_varlen_attention  # noqa: E402

LENGTHS = (37, 64, 23)  # three sequences of different lengths, flattened into one row
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", "autocast", id="cuda-fp32-weights-bf16-autocast", marks=[pytest.mark.gpu, CUDA]),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16-weights", marks=[pytest.mark.gpu, CUDA]),
]
# ||packed - alone|| / ||alone||: float32 agrees to rounding; bf16 (8 bits of mantissa) to about 1%
TOLERANCE = {"cpu": 1e-4, "cuda": 3e-2}


def _models(device: str, dtype, kv_heads: int = 2):
    """The same random Qwen2 weights twice: `varlen_sdpa` (the stage's GPU attention) and `sdpa`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=64,
                         max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    out = []
    for attn in (register_varlen_attention(), "sdpa"):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn)
        if dtype is torch.bfloat16:
            model = model.to(torch.bfloat16)
        out.append(model.to(device).train())
    assert [m.config._attn_implementation for m in out] == ["varlen_sdpa", "sdpa"]
    return out


def _sequences(seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]


def _packed_batch(seqs: list[list[int]], device: str) -> dict:
    """The batch TRL's padding-free collator makes of these sequences (one row, boundaries)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["cu_seq_lens_q"].tolist() == [0, 37, 101, 124]
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k != "labels"}
    return {**batch, "use_cache": False}  # as TRL's compute_loss passes it


def _context(device: str, dtype):
    if dtype == "autocast":  # as the Trainer runs a bf16=True step on float32 weights
        return torch.autocast(device, dtype=torch.bfloat16)
    return torch.autocast(device, enabled=False)


def _token_losses(logits, ids):
    """Next-token cross-entropy at every position but the last, float32, summed per sequence."""
    return torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="none")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("device,dtype", CASES)
def test_packed_row_trains_each_sequence_as_if_alone(device, dtype):
    packed_model, alone_model = _models(device, dtype)
    seqs = _sequences()
    batch = _packed_batch(seqs, device)
    tol = TOLERANCE[device]
    with _context(device, dtype):
        logits = packed_model(**batch).logits[0]
        packed_losses, start = [], 0
        for s in seqs:
            packed_losses.append(_token_losses(logits[start:start + len(s)], batch["input_ids"][0, start:start + len(s)]))
            start += len(s)
        torch.stack([x.sum() for x in packed_losses]).sum().backward()
        alone_losses = []
        for s, packed_part, (lo, hi) in zip(seqs, packed_losses, zip((0, 37, 101), (37, 101, 124))):
            ids = torch.tensor([s], device=device)
            alone = alone_model(input_ids=ids).logits[0]
            assert _rel(logits[lo:hi], alone) < tol, f"logits of the sequence at {lo}:{hi} differ"
            alone_losses.append(_token_losses(alone, ids[0]))
            assert _rel(packed_part, alone_losses[-1]) < tol
        torch.stack([x.sum() for x in alone_losses]).sum().backward()
    alone_grads = dict(alone_model.named_parameters())
    worst = max(((_rel(p.grad, alone_grads[n].grad), n) for n, p in packed_model.named_parameters()))
    print(f"{device} {dtype}: worst gradient relative difference {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 2 * tol, f"gradient of {worst[1]} differs: {worst[0]:.3g} relative"


@pytest.mark.parametrize("device,dtype", CASES)
def test_a_later_token_moves_no_earlier_position_and_no_other_sequence(device, dtype):
    packed_model, _ = _models(device, dtype)
    seqs = _sequences()
    changed = [list(s) for s in seqs]
    p = 37 + 40  # position 40 of the middle sequence
    changed[1][40] = 2 if changed[1][40] != 2 else 3
    with _context(device, dtype), torch.no_grad():
        before = packed_model(**_packed_batch(seqs, device)).logits[0]
        after = packed_model(**_packed_batch(changed, device)).logits[0]
    moved = (after - before).abs().amax(-1).float()  # per position
    assert moved[p:101].amax() > 0, "the change moved nothing at all: the test would prove nothing"
    assert moved[:p].amax().item() == 0.0, f"earlier positions moved by up to {moved[:p].amax().item():.3g}"
    assert moved[101:].amax().item() == 0.0, "the next sequence saw a token of the one before"


@pytest.mark.parametrize("device,dtype", CASES)
def test_earlier_losses_have_no_gradient_from_later_inputs(device, dtype):
    """The backward pass is causal too: the loss at positions before p, of every sequence, does
    not depend on the inputs at or after p of its own sequence nor on any other sequence."""
    packed_model, _ = _models(device, dtype)
    seqs = _sequences()
    batch = _packed_batch(seqs, device)
    ids = batch["input_ids"]
    embeds = packed_model.get_input_embeddings()(ids).detach().requires_grad_(True)
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    with _context(device, dtype):
        logits = packed_model(inputs_embeds=embeds, **kwargs).logits[0]
        # the first 20 positions of the middle sequence predict tokens 1..20: inputs 0..19 only
        loss = _token_losses(logits[37:57], ids[0, 37:57]).sum()
        loss.backward()
    grad = embeds.grad[0].float().abs().amax(-1)  # per position
    assert grad[37:56].amax() > 0
    assert grad[56:].amax().item() == 0.0, "a later position of the sequence, or the next one, got gradient"
    assert grad[:37].amax().item() == 0.0, "the sequence before got gradient"


# --------------------------------------------------------------------------- one config, one recipe


@pytest.mark.engine
def test_gpu_defaults_train_the_same_examples_per_step_as_the_cpu_recipe(tmp_path, tiny_model_dir):
    """The GPU speed defaults, switched on here on a CPU, change how a batch is laid out (one
    padding-free row) but not which examples an optimizer step sees, nor where a long one is cut."""
    from exit_loop.prompts import canonical_response, student_prompt
    from exit_loop.train import TrainConfig, build_trainer, check_prepared, sft_config

    rows = [{"prompt": student_prompt(f"What is {i} plus {i % 7}?"),
             "response": canonical_response(" ".join(["step"] * (i % 9)) + f" {i} + {i % 7} = {i + i % 7}.",
                                            str(i + i % 7))} for i in range(40)]
    rows[5]["response"] = canonical_response("a very long one " * 40, "1")  # over max_length
    cfg = TrainConfig(data=["unused"], model=str(tiny_model_dir), output_dir=str(tmp_path), seed=3,
                      sft={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                           "max_length": 240, "max_steps": 5, "disable_tqdm": True})
    plain, fast = (build_trainer(cfg, rows, sft_config(cfg, gpu=gpu)) for gpu in (False, True))
    assert (plain.args.padding_free, fast.args.padding_free) == (False, True)
    assert not fast.args.packing and fast.args.max_length == 240
    assert fast.args.per_device_train_batch_size == 4 and fast.args.gradient_accumulation_steps == 2
    assert check_prepared(plain, cfg) == check_prepared(fast, cfg)
    assert check_prepared(fast, cfg)["truncated_examples"] == 0  # the long one is dropped, not cut
    assert plain.dropped["too_long"] == fast.dropped["too_long"] == 1

    seen = 0
    for a, b in zip(plain.get_train_dataloader(), fast.get_train_dataloader()):
        mask = a["attention_mask"].bool()
        plain_seqs = [(ids[m].tolist(), lab[m].tolist()) for ids, lab, m in zip(a["input_ids"], a["labels"], mask)]
        cu = b["cu_seq_lens_q"].tolist()
        assert b["input_ids"].shape[0] == 1 and len(cu) - 1 == min(4, 39 - 4 * seen)  # one row, the examples asked for
        fast_seqs = [(b["input_ids"][0, s:e].tolist(), b["labels"][0, s:e].tolist()) for s, e in zip(cu, cu[1:])]
        # the padding-free collator masks each example's first label (a position id of 0); the
        # first token is the prompt's, never trained either way
        assert [(i, [-100] + lab[1:]) for i, lab in plain_seqs] == fast_seqs
        assert max(len(i) for i, _ in fast_seqs) <= 240
        seen += 1
    assert seen == 10  # 39 examples (one dropped), 4 per micro-batch


@pytest.fixture(scope="module")
def arith_student(tmp_path_factory):
    """The quickstart's task and random student (its tokenizer packs about two examples in 256)."""
    from exit_loop.tasks.arith import ArithTaskConfig, write_task
    from exit_loop.pipeline.quickstart import tokenizer_texts
    from exit_loop.tiny_model import create_tiny_model

    work = tmp_path_factory.mktemp("arith")
    write_task(ArithTaskConfig(num_train=256, num_test=10), work)
    return work, create_tiny_model(work / "init", tokenizer_texts(work / "train.jsonl"))


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("scale", ["gsm8k-8", "gsm8k-8-packed", "quickstart-32-packed"])
def test_a_real_training_batch_trains_each_example_as_if_alone(tmp_path, tiny_model_dir, gsm8k_train, scale,
                                                              request):
    """A micro-batch exactly as the SFT stage's trainer builds it (TRL's preparation, packing,
    collator; the GPU defaults switched on) through the trainer's model, against each of its
    examples run alone: per-example logits and the gradient of the summed loss. GPU only: on a
    CPU the same batch takes the `sdpa` fallback the tests above already cover, at 30 s a case."""
    from exit_loop.baseline import baseline_row
    from exit_loop.tasks import DataConfig, load_problems
    from exit_loop.train import TrainConfig, build_trainer, sft_config

    device, packing = "cuda", scale.endswith("packed")
    if scale.startswith("quickstart"):  # the quickstart's warm start: 32 packed rows of 256 tokens
        work, model_dir = request.getfixturevalue("arith_student")
        data, batch_size, max_length = DataConfig(dataset=str(work / "train.jsonl"), split="train"), 32, 256
    else:
        model_dir, batch_size, max_length = tiny_model_dir, 8, 1024
        data = DataConfig(dataset=str(gsm8k_train), num_examples=48)
    rows = [baseline_row(p) for p in load_problems(data)]
    cfg = TrainConfig(data=["unused"], model=str(model_dir), output_dir=str(tmp_path), seed=0,
                      sft={"per_device_train_batch_size": batch_size, "max_length": max_length,
                           "packing": packing, "bf16": True, "disable_tqdm": True})
    trainer = build_trainer(cfg, rows, sft_config(cfg, gpu=True))
    model = trainer.model.to(device).train()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    cu = batch["cu_seq_lens_q"].tolist()
    assert len(cu) - 1 > batch_size if packing else len(cu) - 1 == batch_size  # packed: several a row
    ids = batch["input_ids"][0]
    tol = TOLERANCE[device]
    with _context(device, "autocast"):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        sum(_token_losses(logits[s:e], ids[s:e]).sum() for s, e in zip(cu, cu[1:])).backward()
        packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        worst_logits = 0.0
        for s, e in zip(cu, cu[1:]):
            alone = model(input_ids=ids[None, s:e], use_cache=False).logits[0]
            worst_logits = max(worst_logits, _rel(logits[s:e].detach(), alone.detach()))
            _token_losses(alone, ids[s:e]).sum().backward()
    worst = max((_rel(packed_grads[n], p.grad), n) for n, p in model.named_parameters())
    print(f"{scale}: {len(cu) - 1} examples, {ids.numel()} tokens; worst logits "
          f"{worst_logits:.2e}, worst gradient {worst[0]:.2e} ({worst[1]})")
    assert worst_logits < tol
    assert worst[0] < 2 * tol, f"gradient of {worst[1]} differs: {worst[0]:.3g} relative"
