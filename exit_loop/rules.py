"""The per-question rules a training split goes through: exact repeats of a (question, response)
pair dropped, at most K rows per question. One function serves both places that apply them: the
filter (`exit_loop.filter.pick`: one round's traces, a question named by its problem id) and the
SFT stage (`exit_loop.train.data.apply_rules`: every file of the data window together, a question
named by its prompt, the latest files first).

    kept = list(per_question(rows, lambda r: (r["prompt"], r["response"]), dedup=True, k=4, dropped=Counter()))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def per_question(items: Iterable[T], pair: Callable[[T], tuple[str, str]], dedup: bool, k: int | None,
                 dropped: Counter) -> Iterator[T]:
    """The items that pass, in order; `pair(item)` is its (question, response). Where `dedup`, a
    pair already kept is dropped (`dropped["duplicate"]`); an item whose question already has `k`
    kept is dropped (`dropped["over_k"]`). Lazy: each item is counted as it is drawn, so rules
    chained before this one count in the rows' order too."""
    seen: set[tuple[str, str]] = set()
    per_q: Counter[str] = Counter()
    for item in items:
        question, response = pair(item)
        if dedup and (question, response) in seen:
            dropped["duplicate"] += 1
            continue
        if k is not None and per_q[question] >= k:
            dropped["over_k"] += 1
            continue
        seen.add((question, response))
        per_q[question] += 1
        yield item
