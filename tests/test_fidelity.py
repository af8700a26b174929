"""The student trains on exactly what it sampled, in the context it sampled it in: a tokenizer built
like Qwen2's (byte-level BPE, Qwen2's pre-tokenizer pattern, the tags as ordinary text, so `>` and a
following newline merge), a BOS tokenizer, the sampler's prompt ids against the SFT stage's, and the
rows SFT drops rather than cuts."""

from __future__ import annotations

from pathlib import Path

import pytest

from exit_loop.errors import DataError
from exit_loop.prompts import canonical_response, normalise_response, student_prompt, teacher_prompt
from exit_loop.tokens import encode_completion, encode_prompt

QUESTIONS = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?", "48/2 = 24 in May, 48 + 24 = 72.", "72"),
    ("Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
     "How much did she earn?", "12/60 = 0.2 per minute, 0.2 * 50 = 10.", "10"),
    ("Betty has half of the $100 she needs for a wallet. Her parents give her $15 and her "
     "grandparents twice as much. How much more does she need?", "50 + 15 + 30 = 95, 100 - 95 = 5.", "5"),
]
# What a student writes right after the prompt's `<think>`: a newline (merges with `>` under
# Qwen2's pattern), two, a space, nothing.
LEADS = ["\n", "\n\n", " ", ""]


def _texts() -> list[str]:
    texts = []
    for q, r, a in QUESTIONS * 30:
        for lead in LEADS:
            texts.append(student_prompt(q) + lead + canonical_response(r, a))
    return texts


@pytest.fixture(scope="module")
def qwen2_like(tmp_path_factory) -> Path:
    """A tiny Qwen2 model whose tokenizer is built like Qwen2's (no tag is a token of its own)."""
    from exit_loop.tiny_model import build_model, train_tokenizer

    out = tmp_path_factory.mktemp("qwen2_like")
    tok = train_tokenizer(_texts(), vocab_size=600, qwen2_like=True)
    build_model(tok).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _rows() -> list[dict[str, str]]:
    """Student-style rows: the response keeps the whitespace written after `<think>`."""
    rows = []
    for (q, r, a), lead in zip(QUESTIONS * 2, LEADS * 2):
        norm = normalise_response(f"{lead}{r} </think> <answer>{a}</answer>", "r1_zero")
        assert norm.ok and norm.response.startswith(lead)
        rows.append({"prompt": student_prompt(q), "response": norm.response})
    return rows


def test_qwen2_like_tokenizer_merges_across_the_end_of_think(qwen2_like: Path):
    """The premise: tokenising prompt + response as one string (what TRL does with text) moves the
    boundary, so the prompt's ids are not a prefix of the whole's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_like)
    assert "<think>" not in tok.get_vocab()
    prompt = student_prompt(QUESTIONS[0][0])
    alone = encode_prompt(tok, prompt)
    joined = encode_prompt(tok, prompt + "\nNatalia sold 24. </think> <answer>72</answer>")
    assert joined[:len(alone)] != alone


@pytest.mark.engine
def test_training_context_is_the_sampling_context(qwen2_like: Path, tmp_path: Path):
    """Every prepared example: the sampler's prompt ids, untrained; then the stored response's ids
    and EOS, trained. Fails where TRL tokenises the text itself (the boundary moves)."""
    from exit_loop.train import TrainConfig, build_trainer, check_prepared

    rows = _rows()
    cfg = TrainConfig(data=["unused"], model=str(qwen2_like), output_dir=str(tmp_path / "out"),
                      sft={"max_steps": 1, "report_to": "none", "save_strategy": "no", "use_cpu": True})
    trainer = build_trainer(cfg, rows)
    check_prepared(trainer, cfg)
    tok = trainer.processing_class
    assert len(trainer.train_dataset) == len(rows)
    for row, ex in zip(rows, trainer.train_dataset):
        fed = encode_prompt(tok, row["prompt"])
        n = len(fed)
        assert ex["input_ids"][:n] == fed, "the training context is not the sampling context"
        assert set(ex["labels"][:n]) == {-100}
        assert ex["labels"][n:] == ex["input_ids"][n:] == encode_completion(tok, row["response"]) + [tok.eos_token_id]
        assert tok.decode(ex["labels"][n:-1]) == row["response"]


@pytest.mark.engine
def test_sampled_rows_train_in_the_context_they_were_sampled_in(qwen2_like: Path, tmp_path: Path):
    """End to end on the Qwen2-like student: the real HF sampler draws rows, each recording how many
    prompt ids it fed; SFT prepares every row (correct or not: the all split) and its prompt ids are
    those; a row whose recorded count differs is refused, naming file and line."""
    from exit_loop.jsonl import read_jsonl, write_jsonl
    from exit_loop.sample import SampleConfig, sample
    from exit_loop.tasks import Problem
    from exit_loop.train import TrainConfig, build_trainer, read_splits

    problems = [Problem(f"q{i}", q, a, "") for i, (q, _, a) in enumerate(QUESTIONS)]
    out = tmp_path / "samples.jsonl"
    sample(SampleConfig(model_name=str(qwen2_like), backend="hf", num_samples=2, max_tokens=24,
                        temperature=1.0, prompt_style="r1_zero"), problems, out)
    samples = read_jsonl(out)
    assert len(samples) == 6
    cfg = TrainConfig(data=[str(out)], model=str(qwen2_like), output_dir=str(tmp_path / "sft"),
                      truncated="no_eos", sft={"max_steps": 1, "report_to": "none", "use_cpu": True})
    rows, _ = read_splits(cfg.data)
    trainer = build_trainer(cfg, rows)
    tok = trainer.processing_class
    assert len(trainer.train_dataset) == 6
    for row, ex in zip(samples, trainer.train_dataset):
        n = row["prompt_tokens"]
        assert n == len(encode_prompt(tok, row["prompt"]))
        assert ex["input_ids"][:n] == encode_prompt(tok, row["prompt"])
        trained = ex["labels"][n:]
        if row["finish_reason"] == "stop":
            assert trained[-1] == tok.eos_token_id
            trained = trained[:-1]
        assert tok.decode(trained) == row["response"]
        assert row["num_tokens"] == len(encode_completion(tok, row["response"]))
    samples[1]["prompt_tokens"] += 1
    write_jsonl(out, samples)
    with pytest.raises(DataError, match=r"samples\.jsonl:2: the sampler fed \d+ prompt tokens"):
        build_trainer(cfg, read_splits(cfg.data)[0])


def _bos_tokenizer(tmp_path: Path):
    """The tiny tokenizer with a BOS that the tokenizer adds, as Llama's and Gemma's do, and a chat
    template that writes it too."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from exit_loop.tiny_model import train_tokenizer

    tok = train_tokenizer(_texts()[:40], vocab_size=400)
    tok.add_special_tokens({"bos_token": "<|bos|>"})
    inner = tok.backend_tokenizer
    inner.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", tok.bos_token_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<|bos|>", eos_token=tok.eos_token,
                                  pad_token=tok.pad_token)
    tok.chat_template = "{{ bos_token }}" + (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_one_bos_for_every_prompt_style(tmp_path: Path):
    tok = _bos_tokenizer(tmp_path)
    bos = tok.bos_token_id
    q = QUESTIONS[0][0]
    plain = encode_prompt(tok, student_prompt(q))
    chat = encode_prompt(tok, teacher_prompt(q, "chat", tok))  # the template wrote the BOS already
    for ids in (plain, chat):
        assert ids[0] == bos and ids.count(bos) == 1
    assert encode_completion(tok, "x </think> <answer>1</answer>").count(bos) == 0


@pytest.mark.engine
def test_bos_student_samples_and_trains_with_one_bos(tmp_path: Path):
    """HF sampler and SFT agree on a BOS student: one BOS, the same prompt ids."""
    from exit_loop.jsonl import read_jsonl
    from exit_loop.sample import SampleConfig, sample
    from exit_loop.tasks import Problem
    from exit_loop.tiny_model import build_model
    from exit_loop.train import TrainConfig, build_trainer, read_splits

    tok = _bos_tokenizer(tmp_path)
    model_dir = tmp_path / "bos_model"
    build_model(tok).save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    out = tmp_path / "samples.jsonl"
    sample(SampleConfig(model_name=str(model_dir), backend="hf", num_samples=1, max_tokens=8, temperature=0.0,
                        prompt_style="r1_zero"), [Problem("q0", QUESTIONS[0][0], "72", "")], out)
    row = read_jsonl(out)[0]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)  # as the sampler and the trainer load it
    assert row["prompt_tokens"] == len(encode_prompt(tok, row["prompt"]))
    cfg = TrainConfig(data=[str(out)], model=str(model_dir), output_dir=str(tmp_path / "sft"), truncated="no_eos",
                      sft={"max_steps": 1, "report_to": "none", "use_cpu": True})
    ex = build_trainer(cfg, read_splits(cfg.data)[0]).train_dataset[0]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"].count(tok.bos_token_id) == 1


def test_rows_longer_than_max_length_and_truncated_rows_are_dropped_not_cut(qwen2_like: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    from exit_loop.train import TrainConfig, tokenize_rows

    tok = AutoTokenizer.from_pretrained(qwen2_like)
    rows = _rows()[:3]
    rows[1] = {**rows[1], "response": rows[1]["response"] * 40}           # far over max_length
    rows[2] = {**rows[2], "finish_reason": "length"}                      # the sampler cut it short
    cfg = TrainConfig(data=["unused"], model=str(qwen2_like))
    out, dropped = tokenize_rows(rows, cfg, tok, tok.eos_token_id, max_length=400)
    assert len(out) == 1 and dropped == {"too_long": 1, "truncated": 1}
    assert out[0]["input_ids"][-1] == tok.eos_token_id
    cfg.truncated = "no_eos"  # kept, but never taught to stop there
    out, dropped = tokenize_rows(rows, cfg, tok, tok.eos_token_id, max_length=400)
    assert len(out) == 2 and dropped == {"too_long": 1}
    assert out[1]["input_ids"][-1] != tok.eos_token_id
    assert out[1]["input_ids"] == encode_prompt(tok, rows[2]["prompt"]) + encode_completion(tok, rows[2]["response"])


# --------------------------------------------------------------------------- teachers of other styles

TEACHER_QS = [("What is 2 plus 3?", "2 + 3 = 5.", "5"), ("What is 4 times 6?", "4 * 6 = 24.", "24")]
SYSTEM = "Think, then answer in tags."  # short prompts: the teacher is fitted in seconds
FAST = {"gradient_checkpointing": False, "disable_tqdm": True, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "max_steps": 100, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "save_strategy": "no", "report_to": "none", "use_cpu": True}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A tiny teacher that knows TEACHER_QS by heart in two styles: asked through its chat template
    with the `chat` system message, it answers `<think> r </think> <answer>a</answer>`; asked as a
    reasoning model (the question and a `\\boxed{}` instruction as the user turn, no system
    message), it thinks and answers in `\\boxed{}` after `</think>`."""
    from transformers import AutoTokenizer

    from exit_loop.jsonl import write_jsonl
    from exit_loop.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("teacher")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt": teacher_prompt(q, "chat", tok, SYSTEM), "response": f"<think> {canonical_response(r, a)}"}
            for q, r, a in TEACHER_QS]
    rows += [{"prompt": teacher_prompt(q, "reasoning", tok, SYSTEM), "response": f"{r}\n</think>\n\nSo \\boxed{{{a}}}."}
             for q, r, a in TEACHER_QS]
    cfg = TrainConfig(data=[str(write_jsonl(tmp / "fit.jsonl", rows))], model=str(tiny_model_dir),
                      output_dir=str(tmp / "fit"), sft=FAST)
    return train(cfg) / "ckpt"


@pytest.mark.engine
@pytest.mark.parametrize("style", ["chat", "reasoning"])
def test_a_teacher_of_another_style_stores_student_prompts_and_canonical_responses(
        style: str, tmp_path: Path, tiny_model_dir: Path, teacher: Path):
    """`exit-loop generate` with a chat-template teacher or a reasoning teacher: every stored row
    carries the student prompt and the canonical response, its num_tokens in the student's tokens
    (`--student`) and the teacher's own count apart; SFT of the student then trains in the student
    context (r1_zero), token for token."""
    from transformers import AutoTokenizer

    from exit_loop.jsonl import read_jsonl
    from exit_loop.pipeline.generate import GenerateConfig, generate
    from exit_loop.jsonl import write_jsonl
    from exit_loop.sample import SampleConfig
    from exit_loop.tasks import DataConfig
    from exit_loop.train import TrainConfig, build_trainer, read_splits

    data = write_jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": f"{r}\n#### {a}"} for q, r, a in TEACHER_QS])
    out = generate(GenerateConfig(
        output_dir=str(tmp_path / "gen"), data=DataConfig(dataset=str(data)),
        sample=SampleConfig(model_name=str(teacher), backend="hf", prompt_style=style, temperature=0.0,
                            max_tokens=48, stop=[] if style == "reasoning" else None, system_prompt=SYSTEM,
                            student=str(tiny_model_dir))))
    rows = sorted(read_jsonl(out / "sft_r1_all.jsonl"), key=lambda r: r["problem_id"])
    student_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert [r["prompt"] for r in rows] == [student_prompt(q) for q, _, _ in TEACHER_QS]
    assert [r["response"] for r in rows] == [canonical_response(r, a) for _, r, a in TEACHER_QS], \
        [r["raw_output"] for r in rows]
    assert all(r["is_correct"] and r["prompt_style"] == style and "raw_output" in r for r in rows)
    for r in rows:
        assert r["num_tokens"] == len(encode_completion(student_tok, r["response"]))
        assert "teacher_num_tokens" in r and "prompt_tokens" not in r
    correct = out / "sft_r1_correct.jsonl"
    cfg = TrainConfig(data=[str(correct)], model=str(tiny_model_dir), output_dir=str(tmp_path / "student"),
                      sft={"max_steps": 1, "report_to": "none", "use_cpu": True})
    trainer = build_trainer(cfg, read_splits(cfg.data)[0])
    for r, ex in zip(read_jsonl(correct), trainer.train_dataset):
        fed = encode_prompt(student_tok, r["prompt"])
        assert ex["input_ids"][:len(fed)] == fed
        assert student_tok.decode(ex["labels"][len(fed):-1]) == r["response"]


def test_prompt_tokens_make_the_prompt_frame_two_tokens_and_keep_the_text():
    """`prompt_tokens`: the r1_zero prompt's fixed head and tail are one token each; the text the
    ids decode to is the prompt itself, and prompt + response ids are still the row's own."""
    from exit_loop.tiny_model import prompt_frame, train_tokenizer

    texts = [f"{student_prompt(q)}{r}" for q, r, _ in QUESTIONS] * 5
    plain, framed = train_tokenizer(texts, vocab_size=400), train_tokenizer(texts, vocab_size=400, prompt_tokens=True)
    head, tail = (framed.convert_tokens_to_ids(t) for t in prompt_frame())
    for row in _rows():
        ids = encode_prompt(framed, row["prompt"])
        assert ids.count(head) == 1 and ids[0] == head and ids[-1] == tail
        assert len(ids) + 60 < len(encode_prompt(plain, row["prompt"]))
        assert framed.decode(ids) == row["prompt"]
        full = ids + encode_completion(framed, row["response"])
        assert framed.decode(full) == row["prompt"] + row["response"]
