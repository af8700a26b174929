"""Prompts and the canonical response: each writer beside its checker.

The student prompt (`r1_zero`) is what every stored row carries as `prompt` (`student_prompt`;
`question_of` reads the question back out of it); the teacher may be asked differently (`chat`,
`reasoning`: `teacher_prompt`), but what it writes is normalised to the canonical response
`{reasoning} </think> <answer>{answer}</answer>` (`canonical_response`, `normalise_response`)
before it is stored. `format_ok` and `extract_answer` are the checker's side, which every task's
verdict (`exit_loop.tasks`) starts from; `last_boxed` is the project's one `\\boxed{}` parser.
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

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"


def student_prompt(question: str) -> str:
    """The `r1_zero` prompt: the exact text every stored row carries as `prompt`."""
    return R1_ZERO_PROMPT.format(question=question.strip())


HINT = "{question}\nHint: the answer is {answer}."


def hinted_question(question: str, answer: str) -> str:
    """STaR's rationalization (Zelikman et al. 2022, 3.2): the question with its ground-truth answer
    given as a hint, what a hinted draw asks (`sample.hint`); the stored row keeps the plain
    question's prompt."""
    return HINT.format(question=question.strip(), answer=answer.strip())


# what a hinted row's manifests say of it: the student trains in a context it did not sample in
HINTED_CONTEXT = ("drawn with the ground truth as a hint in the prompt, stored and trained with the plain prompt: "
                  "not sampled in the context it trains in")


_R1_HEAD, _R1_TAIL = R1_ZERO_PROMPT.split("{question}")


def question_of(prompt: str) -> str:
    """The question inside a stored `r1_zero` student prompt (any other prompt is returned as is):
    the inverse of `student_prompt` for a stripped question."""
    if prompt.startswith(_R1_HEAD) and prompt.endswith(_R1_TAIL):
        return prompt[len(_R1_HEAD):len(prompt) - len(_R1_TAIL)]
    return prompt


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
    return tokenizer.apply_chat_template(teacher_messages(question, style, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def teacher_messages(question: str, style: PromptStyle, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat turns of the `chat` and `reasoning` styles: what `teacher_prompt` renders through
    the chat template, and what a server's chat endpoint is sent."""
    _check_style(style)
    if style == "r1_zero":
        raise ValueError("prompt style 'r1_zero' is a raw prompt, not chat turns")
    if style == "chat":
        return [{"role": "system", "content": system_prompt or CHAT_SYSTEM_PROMPT},
                {"role": "user", "content": question.strip()}]
    # reasoning models: DeepSeek recommends no system prompt, the instruction in the user turn
    instruction = system_prompt or "Please reason step by step, and put your final answer within \\boxed{}."
    return [{"role": "user", "content": f"{question.strip()}\n{instruction}"}]


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (balanced braces), stripped; for
    `\\boxed 5` (no braces) the token after it. None if there is none or it is empty."""
    best: tuple[int, str] | None = None
    for cmd in ("\\boxed", "\\fbox"):
        i = text.rfind(cmd)
        while i >= 0:
            content = _braced_after(text, i + len(cmd))
            if content is not None:
                if best is None or i > best[0]:
                    best = (i, content)
                break
            i = text.rfind(cmd, 0, i)
    return None if best is None or not best[1] else best[1]


def _braced_after(text: str, i: int) -> str | None:
    j = i
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for k in range(j, len(text)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1:k].strip()
        return None  # unbalanced
    if j > i:  # `\\boxed 5`: the token up to a space, `$` or the end
        end = j
        while end < len(text) and text[end] not in " $\n":
            end += 1
        return text[j:end].strip() or None
    return None


@dataclass(frozen=True)
class Normalised:
    response: str          # canonical where possible, else the raw text
    ok: bool               # True when `response` is canonical
    reason: str = ""       # why it is not: 'no_answer' or 'format'


def normalise_response(text: str, style: PromptStyle) -> Normalised:
    """Turn a teacher's raw output into the canonical response.

    - `r1_zero`: the output continues after the prompt's `<think>`; it must hold `</think>` and
      then `<answer>…</answer>`. The whitespace written right after the prompt's `<think>` is kept
      (the stored prompt is exactly what was sampled from, so training sees the tokens that were
      sampled); from the end of the reasoning on, spacing is made canonical, and anything after the
      last `</answer>` is dropped (the sampler stops there).
    - `chat`: as `r1_zero`, with an opening `<think>` allowed (and removed).
    - `reasoning`: the model thinks in `<think>…</think>` (the opening tag is often in the
      prompt) and then answers, often in `\\boxed{}`; the answer is the last `<answer>` tag or the
      last `\\boxed{}` after `</think>`.
    """
    _check_style(style)
    raw = text
    body = text.lstrip()
    lead = ""
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
    elif style == "r1_zero":  # the continuation of the stored prompt: its first whitespace stays
        lead = text[:len(text) - len(body)]
    if body.count(THINK_CLOSE) == 0:
        has_answer = ANSWER_OPEN in body or (style == "reasoning" and last_boxed(body) is not None)
        return Normalised(raw, False, "format" if has_answer else "no_answer")
    reasoning, _, after = body.rpartition(THINK_CLOSE)
    if THINK_OPEN in reasoning or THINK_CLOSE in reasoning \
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
    return Normalised(lead + canonical_response(reasoning, answer), True)


# --------------------------------------------------------------------------- the checker's side

def _last_answer_span(response: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last complete answer pair, or None.

    Pairs are matched as a left-to-right lazy scan would (`<answer>(.*?)</answer>`): a closing tag
    closes the first opening tag after the previous closing tag. Works backwards with str.rfind, so
    the common case is a couple of C-speed scans and nothing is quadratic.
    """
    end = response.rfind(ANSWER_CLOSE)
    while end >= 0:
        prev = response.rfind(ANSWER_CLOSE, 0, end)
        lo = prev + len(ANSWER_CLOSE) if prev >= 0 else 0
        start = response.find(ANSWER_OPEN, lo, end)
        if start >= 0:
            return start + len(ANSWER_OPEN), end
        end = prev  # an orphan closing tag: try the one before
    return None


def extract_answer(response: str) -> str | None:
    """Content of the last complete `<answer>...</answer>`, stripped; None if there is none."""
    if not isinstance(response, str):
        return None
    span = _last_answer_span(response)
    return None if span is None else response[span[0]:span[1]].strip()


def format_ok(response: str) -> bool:
    """True for the canonical response `{reasoning} </think> <answer>{answer}</answer>`:

    exactly one `</think>`, non-empty reasoning before it (with no `<think>`: the prompt carries
    the opening tag), exactly one space and then `<answer>`, exactly one answer pair holding a
    non-empty answer, and nothing after `</answer>` but whitespace. Whitespace before `</think>`
    and inside the answer tags is not checked.
    """
    if not isinstance(response, str):
        return False
    if response.count(THINK_CLOSE) != 1 or response.count(ANSWER_OPEN) != 1 \
            or response.count(ANSWER_CLOSE) != 1 or THINK_OPEN in response:
        return False
    reasoning, _, after = response.partition(THINK_CLOSE)
    if not reasoning.strip() or not after.startswith(" " + ANSWER_OPEN):
        return False
    answer, sep, tail = after[1 + len(ANSWER_OPEN):].partition(ANSWER_CLOSE)
    return bool(sep) and bool(answer.strip()) and not tail.strip()
