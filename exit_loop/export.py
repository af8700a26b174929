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

Rows are read as `exit-loop train` reads them (a blank response is skipped, with a warning; a
bad row fails naming its file and line), so an all split exports every non-blank trace.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import Any

from exit_loop.console import say
from exit_loop.jsonl import write_jsonl
from exit_loop.prompts import CHAT_SYSTEM_PROMPT, question_of
from exit_loop.train.data import read_splits

FORMATS = ("trl",)


def to_trl_rows(rows: list[dict[str, str]], chat: bool) -> list[dict[str, Any]]:
    """Our rows as TRL prompt-completion rows: plain text, or conversational (`chat`)."""
    if not chat:
        return [{"prompt": r["prompt"], "completion": r["response"]} for r in rows]
    return [{
        "prompt": [{"role": "system", "content": CHAT_SYSTEM_PROMPT},
                   {"role": "user", "content": r.get("question") or question_of(r["prompt"])}],
        "completion": [{"role": "assistant", "content": f"<think> {r['response']}"}],
    } for r in rows]


def default_output(split: str | Path, chat: bool) -> Path:
    split = Path(split)
    return split.with_name(f"{split.stem}_trl{'_chat' if chat else ''}")


def export(split: str | Path, output: str | Path | None = None, chat: bool = False) -> Path:
    """Write `split`'s rows in TRL's form to `<output>/train.jsonl`; returns `output`."""
    out = Path(output) if output is not None else default_output(split, chat)
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
                   help="trl: prompt-completion rows that trl sft reads as they are (default)")
    p.add_argument("--chat", action="store_true",
                   help="conversational rows (system, user question; assistant '<think> ' + response)")
    p.add_argument("--output", help="directory for train.jsonl (default: beside the split, "
                                    "<split name>_trl or <split name>_trl_chat)")
    a = p.parse_args(argv)
    export(a.split, a.output, a.chat)
    return 0
