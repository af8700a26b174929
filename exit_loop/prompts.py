"""Prompts and the canonical response.

The student prompt (`r1_zero`) is what every stored row carries as `prompt`; the teacher may be
asked differently (`chat`, `reasoning`), but what it writes is normalised to the canonical
response `{reasoning} </think> <answer>{answer}</answer>` before it is stored.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

PromptStyle = Literal["r1_zero", "chat", "reasoning"]
PROMPT_STYLES: tuple[str, ...] = typing.get_args(PromptStyle)

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within <think> "
    "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\n"
    "Assistant: <think>"
)

CHAT_SYSTEM_PROMPT = (
    "You are a careful math tutor. Think through the problem step by step inside <think> </think> "
    "tags, then give only the final numeric answer inside <answer> </answer> tags, exactly like: "
    "<think> reasoning process here </think> <answer> 42 </answer>. Write nothing after </answer>."
)

THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def student_prompt(question: str) -> str:
    """The `r1_zero` prompt: the exact text every stored row carries as `prompt`."""
    return R1_ZERO_PROMPT.format(question=question.strip())


def canonical_response(reasoning: str, answer: str) -> str:
    return f"{reasoning.strip()} {THINK_CLOSE} {ANSWER_OPEN}{answer.strip()}{ANSWER_CLOSE}"


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:  # e.g. an unresolved "auto": never guess silently
        raise ValueError(f"prompt style {style!r}: expected one of {', '.join(map(repr, PROMPT_STYLES))}")


def teacher_prompt(question: str, style: PromptStyle, tokenizer: Any = None,
                   system_prompt: str | None = None) -> str:
    """The text the teacher model is given. `chat` and `reasoning` use the tokenizer's chat
    template (with `add_generation_prompt`); `r1_zero` is the raw student prompt."""
    _check_style(style)
    if style == "r1_zero":
        return student_prompt(question)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt style {style!r} needs a tokenizer with a chat template; "
                         "use prompt_style=r1_zero for base models")
    messages = []
    if style == "chat":
        messages.append({"role": "system", "content": system_prompt or CHAT_SYSTEM_PROMPT})
        messages.append({"role": "user", "content": question.strip()})
    else:  # reasoning models: DeepSeek recommends no system prompt, the instruction in the user turn
        instruction = system_prompt or "Please reason step by step, and put your final answer within \\boxed{}."
        messages.append({"role": "user", "content": f"{question.strip()}\n{instruction}"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
            i += 1
    return None


@dataclass(frozen=True)
class Normalised:
    response: str          # canonical where possible, else the raw text
    ok: bool               # True when `response` is canonical
    reason: str = ""       # why it is not: 'no_answer' or 'format'


def normalise_response(text: str, style: PromptStyle) -> Normalised:
    """Turn a teacher's raw output into the canonical response.

    - `r1_zero`: the output continues after the prompt's `<think>`; it must hold `</think>` and
      then `<answer>…</answer>`. Spacing around the tags is made canonical, and anything after the
      last `</answer>` is dropped (the sampler stops there).
    - `chat`: as `r1_zero`, with an opening `<think>` allowed (and removed).
    - `reasoning`: the model thinks in `<think>…</think>` (the opening tag is often in the
      prompt) and then answers, often in `\\boxed{}`; the answer is the last `<answer>` tag or the
      last `\\boxed{}` after `</think>`.
    """
    _check_style(style)
    raw = text
    body = text.lstrip()
    if body.startswith("<think>"):
        body = body[len("<think>"):]
    if body.count(THINK_CLOSE) == 0:
        has_answer = ANSWER_OPEN in body or (style == "reasoning" and last_boxed(body) is not None)
        return Normalised(raw, False, "format" if has_answer else "no_answer")
    reasoning, _, after = body.rpartition(THINK_CLOSE)
    if "<think>" in reasoning or THINK_CLOSE in reasoning \
            or ANSWER_OPEN in reasoning or ANSWER_CLOSE in reasoning:
        # answer tags before </think> would ride along into a "canonical" response that the
        # verifier (one answer pair, after </think>) then rejects as format
        return Normalised(raw, False, "format")
    answers = _ANSWER_TAG.findall(after)
    if answers:
        answer = answers[-1]
    elif style == "reasoning" and (boxed := last_boxed(after)) is not None:
        answer = boxed
    else:
        return Normalised(raw, False, "format" if ANSWER_OPEN in after else "no_answer")
    if ANSWER_OPEN in answer or not reasoning.strip():
        return Normalised(raw, False, "format")
    if not answer.strip():  # an empty answer is no answer (as the verifier classes it)
        return Normalised(raw, False, "no_answer")
    return Normalised(canonical_response(reasoning, answer), True)
