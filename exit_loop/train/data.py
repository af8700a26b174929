"""The SFT stage's data: the split files read and checked (`read_splits`), the per-question rules
over all of them (`apply_rules`), a seeded subset (`subsample`), and each row tokenised the way
the sampler fed it (`prompt_and_completion`, `tokenize_rows`).

    rows, files = read_splits(["round_00/sft_correct.jsonl", "round_01/sft_correct.jsonl"])
    rows, dropped = apply_rules(rows, dedup=True, k=4)
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

from exit_loop.errors import DataError, NothingToTrain
from exit_loop.jsonl import iter_jsonl_numbered, sha256_file
from exit_loop.prompts import question_of, teacher_prompt
from exit_loop.rules import per_question
from exit_loop.tokens import encode_completion, encode_prompt, without_bos
from exit_loop.train.config import TrainConfig

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("prompt", "response")


def read_splits(paths: list[str]) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """All rows of all split files, in order, as {"prompt", "response"} (and the `question` an all
    split carries); per file its path, sha256 and row count. Rows with a blank response (a trace
    where the model wrote nothing, kept in an all split) are skipped, with a note. Raises DataError
    naming file and line on a bad or empty split, naming the file on a missing one."""
    rows: list[dict[str, str]] = []
    files = []
    for path in paths:
        path = Path(path)
        n = blank = 0
        for lineno, row in iter_jsonl_numbered(path, required=REQUIRED_KEYS):
            if isinstance(row["response"], str) and isinstance(row["prompt"], str) \
                    and row["prompt"].strip() and not row["response"].strip():
                blank += 1  # an all split keeps traces where the model wrote nothing: no text to learn
                continue
            for key in REQUIRED_KEYS:
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{path}:{lineno}: key '{key}' must be a non-empty string, "
                                    f"got {row[key]!r}")
            kept = {"prompt": row["prompt"], "response": row["response"], "source": f"{path}:{lineno}"}
            if isinstance(row.get("question"), str) and row["question"].strip():
                kept["question"] = row["question"]  # an all split carries it: no parsing it back
            if row.get("finish_reason") == "length":
                kept["finish_reason"] = "length"    # the all split says the sampler cut it short
            if isinstance(row.get("prompt_tokens"), int):
                kept["prompt_tokens"] = row["prompt_tokens"]  # the student's own sample: its context's length
            rows.append(kept)
            n += 1
        if blank:
            # expected of an all split (it keeps traces where the model wrote nothing): a note
            log.info("train: %s: skipped %d row(s) with a blank response", path, blank)
        if n == 0 and not blank:
            raise DataError(f"{path}: empty split (no rows); a split needs rows with "
                            f"{', '.join(map(repr, REQUIRED_KEYS))}")
        files.append({"path": str(path), "sha256": sha256_file(path), "rows": n})
    if not rows:
        raise NothingToTrain(f"{', '.join(map(str, paths))}: every row has a blank response; nothing to learn")
    return rows, files


def apply_rules(rows: list[dict[str, str]], dedup: bool, k: int | None) -> tuple[list[dict[str, str]], Counter]:
    """The rows that train of all the files together: repeats of a (prompt, response) pair
    dropped (`dedup`), at most `k` rows per prompt (a question) across every file
    (`exit_loop.rules.per_question`), the latest files' rows first (the newest policy's traces);
    order otherwise kept. Returns what each rule dropped."""
    dropped: Counter = Counter()
    if not dedup and k is None:
        return rows, dropped
    file_of = [r.get("source", "").rsplit(":", 1)[0] for r in rows]
    rank = {f: i for i, f in enumerate(reversed(list(dict.fromkeys(file_of))))}
    order = sorted(range(len(rows)), key=lambda i: rank[file_of[i]])
    keep = set(per_question(order, lambda i: (rows[i]["prompt"], rows[i]["response"]), dedup, k, dropped))
    return [r for i, r in enumerate(rows) if i in keep], dropped


def subsample(rows: list[dict[str, str]], n: int | None, seed: int) -> list[dict[str, str]]:
    """A seeded random `n` of `rows`, kept in their original order: all of them when n is None,
    or when the splits hold fewer than n (a warning says so; the manifest counts what was used)."""
    if n is None:
        return rows
    if n > len(rows):
        log.warning("train: num_examples=%d but the splits hold only %d rows; using all of them", n, len(rows))
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def prompt_and_completion(row: dict[str, str], cfg: TrainConfig, tokenizer: Any) -> tuple[str, str]:
    """The text the student was prompted with when it sampled, and the text it is to write: the
    stored `r1_zero` prompt and response, or, through the chat template, the chat the sampler's
    `chat` style sends and `<think> {response}`."""
    if not cfg.use_chat_template:
        return row["prompt"], row["response"]
    question = row.get("question") or question_of(row["prompt"])
    return teacher_prompt(question, "chat", tokenizer, cfg.system_prompt), f"<think> {row['response']}"


def tokenize_rows(rows: list[dict[str, str]], cfg: TrainConfig, tokenizer: Any, eos_id: int,
                  max_length: int | None) -> tuple[list[dict[str, list[int]]], Counter]:
    """Our rows as TRL's pre-tokenised rows (`input_ids`, `completion_mask`): the prompt's ids as
    the sampler fed them (`exit_loop.tokens.encode_prompt`), then the response tokenised on its
    own, then EOS. Tokenising prompt + response as one string (what TRL does with text) can merge
    the prompt's last token with the response's first (`<think>` + newline in a byte-level BPE),
    moving the boundary: the student would train on a context it never sampled in.

    Rows are dropped, not cut, and counted (the Counter's keys): `too_long` (more than
    `max_length` tokens with the EOS: a cut would train a trace with its answer and EOS cut off)
    and `truncated` (the sampler hit max_tokens, per the all split's `finish_reason`: an EOS
    would teach stopping mid-reasoning; `cfg.truncated="no_eos"` trains them without one).
    Raises DataError naming the row whose text does not survive tokenisation."""
    out: list[dict[str, list[int]]] = []
    dropped: Counter = Counter()
    for i, row in enumerate(rows):
        cut_short = row.get("finish_reason") == "length"
        if cut_short and cfg.truncated == "drop":
            dropped["truncated"] += 1
            continue
        prompt, completion = prompt_and_completion(row, cfg, tokenizer)
        p_ids = encode_prompt(tokenizer, prompt)
        c_ids = encode_completion(tokenizer, completion)
        for what, text, ids in (("prompt", prompt, without_bos(tokenizer, p_ids, prompt)), ("response", completion, c_ids)):
            back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            if back != text:
                where = row.get("source", f"row {i}")
                raise DataError(
                    f"{where}: the {what} does not survive {cfg.model}'s tokenizer (its ids decode to "
                    f"{back[:80]!r}..., not {text[:80]!r}...): the ids trained on would not be the ones sampled")
        fed = row.get("prompt_tokens")
        if fed is not None and fed != len(p_ids) and not cfg.use_chat_template:
            raise DataError(
                f"{row.get('source', f'row {i}')}: the sampler fed {fed} prompt tokens, but {cfg.model}'s "
                f"tokenizer makes {len(p_ids)} of this prompt: the student would train in a context it did "
                "not sample in (another tokenizer, or another special-token policy)")
        ids = p_ids + c_ids + ([] if cut_short else [eos_id])
        if max_length is not None and len(ids) > max_length:
            dropped["too_long"] += 1
            continue
        out.append({"input_ids": ids, "completion_mask": [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))})
    return out, dropped
