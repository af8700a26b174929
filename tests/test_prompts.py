"""Unit tests for prompts and response normalisation (exit_loop/prompts.py): pure and fast; the
chat-template tests use a tokenizer trained here on a few strings (milliseconds, no hub)."""

from __future__ import annotations

import pytest

from exit_loop.prompts import (
    CHAT_SYSTEM_PROMPT,
    R1_ZERO_PROMPT,
    Normalised,
    canonical_response,
    format_ok,
    last_boxed,
    normalise_response,
    question_of,
    student_prompt,
    teacher_prompt,
)

# Copied from DESIGN.md ("Student prompt"): one newline after each line, none after `<think>`.
DESIGN_PROMPT = """A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.
User: {question}
Assistant: <think>"""

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# --------------------------------------------------------------------------- the student prompt

def test_r1_zero_prompt_is_exactly_the_design_text():
    assert R1_ZERO_PROMPT == DESIGN_PROMPT
    p = student_prompt(QUESTION)
    assert p == DESIGN_PROMPT.replace("{question}", QUESTION)
    assert p.count("\n") == 2
    assert p.endswith("\nAssistant: <think>")
    assert p.split("\n")[1] == f"User: {QUESTION}"


def test_student_prompt_strips_the_question_and_keeps_braces():
    p = student_prompt("  What is {x} + 1?\n")
    assert "\nUser: What is {x} + 1?\nAssistant: <think>" in p
    assert p.endswith("<think>")


def test_canonical_response_spacing():
    assert canonical_response("  48/2 = 24. 48+24 = 72.\n", " 72 ") == "48/2 = 24. 48+24 = 72. </think> <answer>72</answer>"
    assert canonical_response("a", "b") == "a </think> <answer>b</answer>"
    assert format_ok(canonical_response("\nsome reasoning\n", "\n5\n"))


# --------------------------------------------------------------------------- normalise_response

R = "48/2 = 24 clips in May, 48+24 = 72 in all."
CANON = f"{R} </think> <answer>72</answer>"

GOOD = [
    # (raw text, style, canonical response)
    (f"{R} </think> <answer>72</answer>", "r1_zero", CANON),
    (f" {R}\n</think>\n<answer> 72 </answer>", "r1_zero", " " + CANON),           # spacing made canonical
    (f"\n{R} </think> <answer>72</answer>", "r1_zero", "\n" + CANON),  # whitespace after the prompt's <think> kept
    (f"\n<think>{R}</think> <answer>72</answer>", "r1_zero", CANON),   # but a second <think> is normalised away
    (f"{R}</think><answer>72</answer>", "r1_zero", CANON),
    (f"{R} </think> <answer>72</answer> User: thanks! <answer>9", "r1_zero", CANON),  # trailing text dropped
    (f"{R} </think> <answer>72</answer><|endoftext|>", "r1_zero", CANON),
    (f"<think>\n{R}\n</think>\n\n<answer>72</answer>\n", "chat", CANON),            # a leading <think>
    (f"  <think>{R}</think> <answer>72</answer>", "chat", CANON),
    (f"{R} </think> <answer>72</answer>", "chat", CANON),
    (f"{R}\n</think>\n\nSo she sold \\boxed{{72}} clips.", "reasoning", CANON),       # \boxed after </think>
    (f"{R}\n</think>\n\nSo she sold \\boxed 72 clips.", "reasoning", CANON),          # \boxed without braces
    (f"{R}\n</think>\n\nThe answer is $\\boxed 72$", "reasoning", CANON),
    (f"<think>\n{R}\n</think>\n\nThe answer is $\\boxed{{72}}$.", "reasoning", CANON),
    (f"{R} \\boxed{{5}} </think> Final: \\boxed{{72}}", "reasoning",
     f"{R} \\boxed{{5}} </think> <answer>72</answer>"),                              # the box after </think>
    (f"{R}\n</think>\n\\boxed{{\\frac{{1}}{{2}}}}", "reasoning",
     f"{R} </think> <answer>\\frac{{1}}{{2}}</answer>"),                              # nested braces
    (f"{R}\n</think>\n\\boxed{{\\text{{72 clips}}}} and \\boxed{{", "reasoning",
     f"{R} </think> <answer>\\text{{72 clips}}</answer>"),                            # an unclosed last box
    (f"{R}\n</think>\n<answer>72</answer>", "reasoning", CANON),                      # an answer tag wins
    (f"{R}\n</think>\n\\boxed{{5}} <answer>72</answer>", "reasoning", CANON),
]


@pytest.mark.parametrize("text,style,expected", GOOD)
def test_normalise_response_good(text, style, expected):
    n = normalise_response(text, style)
    assert n == Normalised(expected, True, "")
    assert format_ok(n.response)


BAD = [
    # (raw text, style, reason)
    (f"{R} <answer>72</answer>", "r1_zero", "format"),                 # missing </think>, has an answer
    (f"{R} and so on", "r1_zero", "no_answer"),                        # missing </think>, no answer
    (f"{R} \\boxed{{72}}", "reasoning", "format"),                     # no </think>, has a box
    (f"{R} so 72", "reasoning", "no_answer"),
    (f"{R} \\boxed{{72}}", "r1_zero", "no_answer"),                    # a box is no answer outside `reasoning`
    (f"{R} </think> The answer is 72.", "r1_zero", "no_answer"),       # </think> but no answer tag
    (f"{R} </think> So \\boxed{{72}}", "chat", "no_answer"),
    (f"{R} </think> <answer>72", "r1_zero", "format"),                 # unclosed answer tag
    (f"{R} </think> <answer>  </answer>", "r1_zero", "no_answer"),     # empty answer
    (f"{R}\n</think>\n\\boxed{{}}", "reasoning", "no_answer"),
    (f" </think> <answer>72</answer>", "r1_zero", "format"),           # no reasoning
    (f"{R} <answer>70</answer> </think> <answer>72</answer>", "r1_zero", "format"),  # answer tag in reasoning
    (f"{R} </answer> </think> <answer>72</answer>", "chat", "format"),
    (f"{R} </think> more </think> <answer>72</answer>", "r1_zero", "format"),    # two </think>
    (f"<think> {R} <think> again </think> <answer>72</answer>", "chat", "format"),
    (f"{R} </think> <answer>7 <answer>2</answer>", "r1_zero", "format"),  # nested opening tags
]


@pytest.mark.parametrize("text,style,reason", BAD)
def test_normalise_response_bad_keeps_raw_text_and_says_why(text, style, reason):
    n = normalise_response(text, style)
    assert n == Normalised(text, False, reason)
    assert not format_ok(n.response)


def test_last_boxed():
    assert last_boxed(r"\boxed{1} then \boxed{2}") == "2"
    assert last_boxed(r"\boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert last_boxed(r"\boxed {7}") == "7"
    assert last_boxed(r"\boxed{1} \boxed{2") == "1"
    assert last_boxed(r"no box {here}") is None
    assert last_boxed("") is None


# --------------------------------------------------------------------------- teacher prompts

def _tokenizer(template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([QUESTION, "How many clips?", "Natalia sold 72 clips."], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if template is not None:
        fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def chat_tokenizer():
    return _tokenizer(CHAT_TEMPLATE)


def test_teacher_prompt_chat_uses_the_template_and_the_system_message(chat_tokenizer):
    p = teacher_prompt(f"  {QUESTION}\n", "chat", chat_tokenizer)
    assert p == (f"<|im_start|>system\n{CHAT_SYSTEM_PROMPT}<|im_end|>\n"
                 f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
                 "<|im_start|>assistant\n")
    p = teacher_prompt(QUESTION, "chat", chat_tokenizer, system_prompt="Be brief.")
    assert p.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    # the text tokenizes: the template's special tokens are single tokens of this tokenizer
    ids = chat_tokenizer(p, add_special_tokens=False).input_ids
    assert ids[0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_teacher_prompt_reasoning_puts_the_instruction_in_the_user_turn(chat_tokenizer):
    p = teacher_prompt(QUESTION, "reasoning", chat_tokenizer)
    assert p == (f"<|im_start|>user\n{QUESTION}\n"
                 "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                 "<|im_start|>assistant\n")
    assert "system" not in p
    p = teacher_prompt(QUESTION, "reasoning", chat_tokenizer, system_prompt="Answer in <answer> tags.")
    assert f"{QUESTION}\nAnswer in <answer> tags.<|im_end|>" in p


def test_teacher_prompt_r1_zero_is_the_student_prompt(chat_tokenizer):
    assert teacher_prompt(QUESTION, "r1_zero") == student_prompt(QUESTION)
    assert teacher_prompt(QUESTION, "r1_zero", chat_tokenizer) == student_prompt(QUESTION)


@pytest.mark.parametrize("style", ["chat", "reasoning"])
def test_teacher_prompt_without_a_chat_template_says_so(style):
    with pytest.raises(ValueError, match="chat template.*r1_zero"):
        teacher_prompt(QUESTION, style, _tokenizer(None))
    with pytest.raises(ValueError, match="chat template"):
        teacher_prompt(QUESTION, style, None)


@pytest.mark.parametrize("style", ["auto", "R1", ""])
def test_unknown_style_is_refused_not_guessed(style, chat_tokenizer):
    with pytest.raises(ValueError, match="'r1_zero', 'chat', 'reasoning'"):
        teacher_prompt(QUESTION, style, chat_tokenizer)
    with pytest.raises(ValueError, match="'r1_zero', 'chat', 'reasoning'"):
        normalise_response(f"{R} </think> <answer>72</answer>", style)


@pytest.mark.parametrize("question", ["How many?", "Line one.\nLine two: 3 + 4 = ?", "A {brace} and $5.",
                                      "User: a question that names the roles\nAssistant: <think>"])
def test_question_of_is_the_inverse_of_student_prompt(question):
    """`train --data sft_r1_correct.jsonl` has only the prompt: the question comes back out of it."""
    assert question_of(student_prompt(question)) == question
    assert question_of(student_prompt(f"  {question} \n")) == question  # the prompt strips it
    assert question_of("a free-form prompt") == "a free-form prompt"
