"""A split as a data set that TRL (`trl sft`), open-r1 and OpenRLHF read as it is.

    exit-loop export data/gsm8k/sft_r1_correct.jsonl --format trl
    trl sft --model_name_or_path Qwen/Qwen2.5-Math-1.5B --dataset_name data/gsm8k/sft_r1_correct_trl

The project's splits keep the guide's `{"prompt", "response"}` rows (the default everywhere);
this writes a copy in TRL's prompt-completion form, as `<output>/train.jsonl` in a directory
that `datasets.load_dataset(<output>)` (what `trl sft --dataset_name` calls) opens as a data set
with a `train` split:

- `--format trl` (default): `{"prompt": <student prompt>, "completion": <response>}`, the
  completion exactly as stored (a student's trace keeps the whitespace it wrote after `<think>`),
  so TRL trains on the completion only and appends the EOS. TRL tokenises prompt + completion as
  one string: with a byte-level BPE, `<think>` followed by a newline can merge across the
  boundary (TRL warns once); `exit-loop train` tokenises the two apart and avoids that.
- `--chat`: conversational rows, the form `exit-loop train use_chat_template=true` trains on:
  `{"prompt": [system, user: the question], "completion": [assistant: "<think> " + response]}`.

- `--format dpo`: preference pairs from an all split, TRL's preference form (what `DPOTrainer`
  and `trl dpo` read): `{"prompt", "chosen": a verified-correct trace, "rejected": a wrong one}` of
  the same question, `--pairs_per_question` of them (default 1; each trace in one pair at most,
  drawn with `--seed`); a question with no correct or no wrong trace gives none. With `--chat`, the
  prompt is the conversation and chosen/rejected are assistant messages.

Rows are read as `exit-loop train` reads them (a blank response is skipped, with a warning; a
bad row fails naming its file and line), so an all split exports every non-blank trace.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

from exit_loop.console import say
from exit_loop.errors import DataError
from exit_loop.jsonl import iter_jsonl_numbered, write_jsonl
from exit_loop.prompts import CHAT_SYSTEM_PROMPT, question_of
from exit_loop.train.data import read_splits

FORMATS = ("trl", "dpo")


def to_trl_rows(rows: list[dict[str, str]], chat: bool) -> list[dict[str, Any]]:
    """Our rows as TRL prompt-completion rows: plain text, or conversational (`chat`)."""
    if not chat:
        return [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
    return [{
        "prompt": _chat_prompt(r),
        "completion": _chat_answer(r),
    } for r in rows]


def _chat_prompt(row: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "system", "content": CHAT_SYSTEM_PROMPT},
            {"role": "user", "content": row.get("question") or question_of(row["prompt"])}]


def _chat_answer(row: dict[str, Any]) -> list[dict[str, str]]:
    """A trace as the assistant's message: "<think> " + the response (the chat template's answer)."""
    return [{"role": "assistant", "content": f"<think> {row['response']}"}]


def preference_pairs(path: str | Path, per_question: int = 1, seed: int = 0, chat: bool = False
                     ) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) rows from an all split: per question (its prompt), up to
    `per_question` pairs of a verified-correct and a wrong trace, each trace used once, drawn with
    `seed`; questions in the order they first appear."""
    by_prompt: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for _, row in iter_jsonl_numbered(path, required=("prompt", "response", "is_correct")):
        if not str(row["response"]).strip():
            continue
        right, wrong = by_prompt.setdefault(row["prompt"], ([], []))
        (right if row["is_correct"] is True else wrong).append(row)
    rng = random.Random(seed)
    out = []
    for prompt, (right, wrong) in by_prompt.items():
        rng.shuffle(right)
        rng.shuffle(wrong)
        for c, r in list(zip(right, wrong))[:per_question]:
            if chat:
                out.append({"prompt": _chat_prompt(c),
                            "chosen": _chat_answer(c), "rejected": _chat_answer(r)})
            else:
                out.append({"prompt": prompt, "chosen": c["response"], "rejected": r["response"]})
    return out


def default_output(split: str | Path, chat: bool, fmt: str = "trl") -> Path:
    split = Path(split)
    return split.with_name(f"{split.stem}_{fmt}{'_chat' if chat else ''}")


def export(split: str | Path, output: str | Path | None = None, chat: bool = False, fmt: str = "trl",
           pairs_per_question: int = 1, seed: int = 0) -> Path:
    """Write `split`'s rows in TRL's form (`fmt` trl: prompt-completion; dpo: preference pairs
    from an all split) to `<output>/train.jsonl`; returns `output`."""
    out = Path(output) if output is not None else default_output(split, chat, fmt)
    if fmt == "dpo":
        pairs = preference_pairs(split, pairs_per_question, seed, chat)
        if not pairs:
            raise DataError(f"{split}: no question with both a correct and a wrong trace; preference pairs "
                            "need an all split (rows with is_correct)")
        write_jsonl(out / "train.jsonl", pairs)
        say(f"export: {len(pairs)} {'conversational ' if chat else ''}preference pairs -> {out / 'train.jsonl'} "
            f"(trl dpo --dataset_name {out})")
        return out
    rows, _ = read_splits([str(split)])
    write_jsonl(out / "train.jsonl", to_trl_rows(rows, chat))
    say(f"export: {len(rows)} {'conversational ' if chat else ''}prompt-completion rows -> {out / 'train.jsonl'} "
        f"(trl sft --dataset_name {out})")
    return out


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="exit-loop export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split", help="a split file: rows with prompt and response (e.g. sft_r1_correct.jsonl)")
    p.add_argument("--format", choices=FORMATS, default="trl",
                   help="trl: prompt-completion rows that trl sft reads as they are (default); dpo: "
                        "(prompt, chosen, rejected) pairs from an all split")
    p.add_argument("--pairs_per_question", type=int, default=1, help="dpo: pairs per question at most (default 1)")
    p.add_argument("--seed", type=int, default=0, help="dpo: which traces pair up (default 0)")
    p.add_argument("--chat", action="store_true",
                   help="conversational rows (system, user question; assistant '<think> ' + response)")
    p.add_argument("--output", help="directory for train.jsonl (default: beside the split, "
                                    "<split name>_<format>, + _chat with --chat)")
    a = p.parse_args(argv)
    if a.pairs_per_question < 1:
        p.error("--pairs_per_question must be at least 1")
    export(a.split, a.output, a.chat, a.format, a.pairs_per_question, a.seed)
    return 0
