"""A procedurally generated arithmetic word-problem task in GSM8K's format, for the offline
quickstart and tests: small enough that a two-layer transformer learns it from its own traces.

    python -m exit_loop.tasks.arith --out_dir data/quickstart num_train=512 num_test=200 max_steps=3

Each question chains `steps` additions or subtractions of a small count to a starting count:

    {"question": "Ava has three apples. She buys five. Then she gives two. How many apples does Ava have now?",
     "answer": "3+5=8\\n8-2=6\\n#### 6"}

The question spells its numbers as words and the solution works in digits: one `a+b=c` (or
`a-b=c`) line per step and the final `#### N` line. (Words are single tokens for the tiny
student's tokenizer, which splits digits one by one; each count then sits right after its verb,
which a two-layer model learns to read much sooner.) The normal GSM8K
loader (`exit_loop.tasks.load_problems`, task `gsm8k`) reads the files and `exit-loop baseline-data` turns them into
canonical prompt/response rows. Difficulty: `min_steps`/`max_steps` (how many operations),
`max_operand` (the largest count added or taken away) and `max_start` (the largest starting
count); every running total stays in [0, max_total]. The train and test splits come from one
seeded generator and share no question.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from exit_loop.config import load_config, to_dict
from exit_loop.jsonl import write_json, write_jsonl
from exit_loop.rundir import MANIFEST

NAMES = [("Ava", "she"), ("Ben", "he"), ("Cleo", "she"), ("Dan", "he"), ("Eve", "she"), ("Finn", "he"),
         ("Gia", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jon", "he"), ("Kim", "she"), ("Leo", "he")]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ADD_VERBS = ["buys", "finds", "gets"]
SUB_VERBS = ["gives", "loses", "sells"]


@dataclass
class ArithTaskConfig:
    num_train: int = 512
    num_test: int = 200
    min_steps: int = 1          # operations per question
    max_steps: int = 3
    max_operand: int = 9        # largest count added or taken away (at least 1)
    max_start: int = 9          # largest starting count
    max_total: int = 9          # every running total stays in [0, max_total]
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1 or self.max_start < 0 or self.max_total < self.max_start:
            raise ValueError("need max_operand >= 1, max_start >= 0 and max_total >= max_start")
        if self.max_total > 99 or self.max_operand > 99:
            raise ValueError("counts are spelled as words up to 99: need max_total, max_operand <= 99")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError("num_train and num_test must be at least 1")


def number_word(n: int) -> str:
    """0..99 in words: 7 -> 'seven', 42 -> 'forty-two'."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_word: {n} is outside 0..99")
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")


def make_problem(rng: random.Random, cfg: ArithTaskConfig) -> dict[str, str]:
    """One question and its step-by-step solution ending `#### N`."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    total = rng.randint(0, cfg.max_start)
    sentences = [f"{name} has {number_word(total)} {item}."]
    lines = []
    for i in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        # the next total is drawn uniformly from those one step can reach, so answers spread
        # evenly over [0, max_total] (no pile at the bounds for a model to guess from)
        reach = [v for v in range(max(0, total - cfg.max_operand), min(cfg.max_total, total + cfg.max_operand) + 1)
                 if v != total]
        new = rng.choice(reach)
        op, n = ("+", new - total) if new > total else ("-", total - new)
        verb = rng.choice(ADD_VERBS if op == "+" else SUB_VERBS)
        words = f"{verb} {number_word(n)}"
        sentences.append(f"{pronoun.capitalize()} {words}." if i == 0 else f"Then {pronoun} {words}.")
        lines.append(f"{total}{op}{n}={new}")
        total = new
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": "\n".join(lines) + f"\n#### {total}"}


def generate(cfg: ArithTaskConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows): distinct questions from one generator seeded with `cfg.seed`."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    want = cfg.num_train + cfg.num_test
    tries = 0
    while len(rows) < want:
        tries += 1
        if tries > 50 * want:
            raise ValueError(f"only {len(rows)} distinct questions after {tries} draws; "
                             f"ask for fewer than {want} or make the task bigger")
        row = make_problem(rng, cfg)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows[:cfg.num_train], rows[cfg.num_train:]


def write_task(cfg: ArithTaskConfig, out_dir: str | Path) -> Path:
    """Write `train.jsonl`, `test.jsonl` and (last) `manifest.json` to `out_dir`; return it."""
    out = Path(out_dir)
    train, test = generate(cfg)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    write_json(out / MANIFEST, {"task": "arith", "config": to_dict(cfg),
                                       "counts": {"train": len(train), "test": len(test)}})
    return out


def command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m exit_loop.tasks.arith", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="where train.jsonl and test.jsonl go")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ArithTaskConfig keys, e.g. max_steps=2")
    a = p.parse_args(argv)
    out = write_task(load_config(ArithTaskConfig, None, a.overrides), a.out_dir)
    print(out)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(command(sys.argv[1:]))
