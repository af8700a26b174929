"""Text to token ids, one way for every sampler backend and for training, so that the student
trains on exactly the context it sampled in.

- `encode_prompt`: a prompt's ids, with the one special-token policy: the tokenizer's own special
  tokens (a BOS where the tokenizer adds one: Llama, Gemma; none for Qwen2), except that a prompt
  whose text already starts with the BOS token (a chat template that writes it) gets no second
  one. vLLM and the HF backend are handed these ids; the SFT stage puts them before the response.
- `encode_completion`: a response's ids, tokenised on its own (never merged with the prompt's
  last token: with a byte-level BPE, `<think>` followed by a newline can merge across `>`).
- `count_tokens`: the length of `encode_completion`, what SFT will see of a stored response.
"""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """The token ids a sampler feeds for `text` and the SFT stage trains after (see the module
    doc for the BOS policy)."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_completion(tokenizer: Any, text: str) -> list[int]:
    """A response's token ids on their own: no special tokens, no EOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def count_tokens(tokenizer: Any, text: str) -> int:
    return len(encode_completion(tokenizer, text))


def without_bos(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """`ids` without the BOS token that `encode_prompt` added before `text` (to compare a prompt's
    ids with its text). A text that itself starts with the BOS token keeps it: SmolLM2's BOS is
    `<|im_start|>`, which every ChatML prompt starts with."""
    bos = getattr(tokenizer, "bos_token_id", None)
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos_text and text.startswith(bos_text):
        return ids
    return ids[1:] if bos is not None and ids[:1] == [bos] else ids
