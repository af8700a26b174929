"""A tiny student built locally, for tests, CPU runs and benchmarks: a byte-level BPE tokenizer
trained with `tokenizers` on the task's text, and a randomly initialised Qwen2-architecture
model a few hundred thousand parameters big, saved as safetensors. No hub access.

    python -m exit_loop.tiny_model --texts ../shared/data/gsm8k/train.jsonl --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from exit_loop.prompts import R1_ZERO_PROMPT

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen-style chat template, so the `chat` prompt style can be exercised on the tiny model too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen2's pre-tokenizer pattern (its tokenizer.json): punctuation runs take the newlines after
# them, so `>` + `\n` is one pre-token and BPE can merge across the end of `<think>`.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def prompt_frame() -> list[str]:
    """The fixed text of the r1_zero prompt around its question: the instructions up to `User: `,
    and the newline, `Assistant: ` and `<think>` after it."""
    head, tail = R1_ZERO_PROMPT.split("{question}")
    return [head, tail]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, qwen2_like: bool = False,
                    prompt_tokens: bool = False):
    """A byte-level BPE tokenizer (GPT-2/Qwen style) wrapped as a transformers fast tokenizer.

    Default: the think/answer tags are single tokens (added after training), which keeps a tiny
    model's job easy. `qwen2_like`: built as Qwen2's is (its pre-tokenizer pattern, no tag among
    the added tokens), so the tags are ordinary text that merges with what follows them, as in a
    real student's tokenizer. `prompt_tokens`: the r1_zero prompt's fixed text before and after
    the question is one token each (`prompt_frame`), so a prompt is its question plus two tokens
    instead of about 90 more (the text is the same; the quickstart's student trains about three
    times faster, its compute going to the question and the answer)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if qwen2_like:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    if prompt_tokens:  # longest match first: the frame's tags stay inside its token
        fast.add_tokens([AddedToken(t, normalized=False) for t in prompt_frame()])
    if not qwen2_like:
        fast.add_tokens(TAG_TOKENS)  # ordinary (not special) tokens: decoding keeps them
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    return fast


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 2, seed: int = 0,
                max_position_embeddings: int = 2048):
    """A random Qwen2 model. Head dimension 64 (vLLM's CPU attention rejects 16)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        head_dim=64,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.eos_token_id
    return model


def gsm8k_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Texts to train the tokenizer on: questions and solutions in prompt/response form."""
    texts = [R1_ZERO_PROMPT]
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            row = json.loads(line)
            texts.append(row["question"])
            texts.append(row["answer"])
    return texts


def create_tiny_model(out_dir: str | Path, texts: Iterable[str], vocab_size: int = 1024,
                      hidden_size: int = 128, num_layers: int = 2, seed: int = 0,
                      prompt_tokens: bool = False) -> Path:
    """Train the tokenizer, build the model, save both (safetensors) to `out_dir`."""
    out = Path(out_dir)
    tokenizer = train_tokenizer(texts, vocab_size, prompt_tokens=prompt_tokens)
    model = build_model(tokenizer, hidden_size, num_layers, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", required=True, help="GSM8K-format JSONL whose text trains the tokenizer")
    p.add_argument("--out", required=True, help="directory to write the model and tokenizer to")
    p.add_argument("--vocab_size", type=int, default=1024)
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = create_tiny_model(a.out, gsm8k_texts(a.texts), a.vocab_size, a.hidden_size, a.num_layers, a.seed)
    print(out)


if __name__ == "__main__":
    main()
