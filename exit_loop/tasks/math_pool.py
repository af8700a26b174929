"""Worker processes that check MATH-style answers with math-verify, each check under a hard
time limit that works from any thread.

    with MathPool(workers=2, timeout_s=1.5) as pool:
        pool.check(r"\\frac{1}{2}", "0.5")                    # True
        for key, result in pool.imap(pairs):  # pairs: (key, (gold, predicted)) or (key, None)
            ...                               # result: True, False, TIMEOUT, or None for None

math-verify's own timeout is `signal.alarm`, which works only on a process's main thread and
cannot stop a long C-level computation. Here every check runs in a worker process, forked from a
forkserver that has math-verify imported and warmed up (`exit_loop.tasks.math_warmup`), so a new worker
is ready in milliseconds. The parent only reads pipes. Each answer may use `timeout_s` seconds
of the worker's CPU time, and at most WALL_FACTOR times that in wall-clock time (so a crowded
machine slows a check down without turning a right answer into a timeout, yet nothing waits for
ever); the clocks start once a worker is ready, so start-up never counts. A worker over either
limit is killed (SIGKILL) and replaced: that row's result is TIMEOUT, and the rest of the
worker's chunk is sent out again. A worker that dies on a row (e.g. out of memory) counts the same.
As with vLLM, a script that starts a pool needs `if __name__ == "__main__":`.

Work goes out in chunks of consecutive rows (samples of one problem sit together, so each worker's
caches of parsed gold answers and of verdicts are hit), and results come back in input order
with a bounded number of rows in flight, so a file of any size streams through in bounded memory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from functools import lru_cache
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

K = TypeVar("K")

TIMEOUT = "timeout"        # a result: the check did not finish within timeout_s (or its worker died)
DEFAULT_TIMEOUT_S = 1.5    # real answers take milliseconds (intervals and tuples: ~50 ms cold)
WALL_FACTOR = 3.0          # a check stops at WALL_FACTOR * timeout_s wall-clock seconds, whatever its CPU
STARTUP_TIMEOUT_S = 120.0  # a new worker must be ready within this (imports, warm-up)
try:
    _CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
    _CLOCK_TICKS = 0
MAX_DEFAULT_WORKERS = 8
_DELIMITED = re.compile(r"(?<!\\)\$|\\\(|\\\[|\\boxed|\\fbox")  # `$` (not `\$`), \( \[ \boxed \fbox


def default_workers() -> int:
    """The CPUs this process may run on (SLURM's binding included), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, MAX_DEFAULT_WORKERS))


# --------------------------------------------------------------------------- in the worker

def _as_latex(answer: str) -> str:
    """What math-verify parses: the answer as is if it carries LaTeX delimiters or a `\\boxed{}`,
    else wrapped in `\\boxed{}` (math-verify needs an anchor to take bare LaTeX such as `\\frac12`)."""
    return answer if _DELIMITED.search(answer) else "\\boxed{" + answer + "}"


def _parse(answer: str) -> list[Any]:
    from math_verify import parse

    return parse(_as_latex(answer), parsing_timeout=None)  # type: ignore[arg-type] - the pool times out


# what marks a decimal literal in an answer (`0.5`, `.5`, `1e-10`): the relative tolerance's cue
DECIMAL_LITERAL = re.compile(r"\d\.\d|(?<![\d.])\.\d|\d[eE][+-]?\d")
REL_TOL = 1e-9  # numbers where one side is a decimal literal: equal within this share of the larger


def _value(x: Any) -> Any:
    """What an answer states: the right side of `x = 5`, the set of `x \\in [1, 2]`."""
    import sympy

    if isinstance(x, sympy.Eq):
        return x.rhs
    if isinstance(x, sympy.Contains):
        return x.args[1]
    return x


def _kind(x: Any) -> str:
    import sympy

    for kind in ("FiniteSet", "Tuple", "Interval", "Union", "Matrix"):
        if type(x).__name__ == kind or isinstance(x, getattr(sympy, kind, ())):
            return kind
    return "expr" if isinstance(x, sympy.Expr) else type(x).__name__


def _exact_enough(gold: str, predicted: str, g: list[Any], p: list[Any]) -> bool:
    """Where math-verify called two numbers equal, hold it to the project's rule: exact forms
    (rationals, radicals, pi, powers) must be equal exactly; a relative tolerance applies only
    when one side is a decimal literal. math-verify itself rounds both to 6 decimals, so that
    2^{-61} equals 2^{-60} and 0.0000001 equals 0.0000002 for it. Other shapes (tuples, sets,
    intervals, expressions with symbols) keep math-verify's verdict, unless the two are of
    different kinds (a set against a tuple or a number)."""
    import sympy

    a, b = (_value(x[0]) if x else None for x in (g, p))
    if _kind(a) != _kind(b):
        return False  # a set for a pair, a list for one number: not the same answer
    if not (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and a.is_number and b.is_number):
        return True
    if DECIMAL_LITERAL.search(gold) or DECIMAL_LITERAL.search(predicted):
        return _relatively_close(a, b)
    return bool(sympy.simplify(a - b) == 0)


def _relatively_close(a: Any, b: Any) -> bool:
    import sympy

    diff, scale = (sympy.N(x, 60) for x in (abs(a - b), sympy.Max(abs(a), abs(b))))
    return bool(diff == 0 or diff <= REL_TOL * scale)


def _decimal_close(gold: str, predicted: str, g: list[Any], p: list[Any]) -> bool:
    """Where math-verify said no: a decimal literal within REL_TOL of an exact number is still
    the number (math-verify misses `4.656612873077393e-10` for 2^{-31})."""
    import sympy

    if not (DECIMAL_LITERAL.search(gold) or DECIMAL_LITERAL.search(predicted)) or not (g and p):
        return False
    a, b = _value(g[0]), _value(p[0])
    return (isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr) and bool(a.is_number) and bool(b.is_number)
            and _relatively_close(a, b))


def _check(gold: str, predicted: str, parse: Any) -> bool:
    from math_verify import verify

    try:
        g, p = parse(gold), parse(predicted)
        if verify(g, p, timeout_seconds=None):
            return _exact_enough(gold, predicted, g, p)
        return _decimal_close(gold, predicted, g, p)
    except Exception:  # math-verify catches its own errors; this is belt and braces
        return False


# Samples of one problem repeat its gold answer and, often, each other's answers: cache parses
# and verdicts, of short texts only (a cache of megabyte answers would be a leak).
_CACHE_CHARS = 512
_parse_cached = lru_cache(maxsize=1 << 14)(_parse)


@lru_cache(maxsize=1 << 16)
def _check_cached(gold: str, predicted: str) -> bool:
    return _check(gold, predicted, _parse_cached)


def check_answer(gold: str, predicted: str) -> bool:
    """math-verify's verdict on one answer, in this process and with no time limit (a worker
    calls it; call it directly only on trusted input). Never raises."""
    if len(gold) <= _CACHE_CHARS and len(predicted) <= _CACHE_CHARS:
        return _check_cached(gold, predicted)
    return _check(gold, predicted, lambda a: _parse_cached(a) if len(a) <= _CACHE_CHARS else _parse(a))


_WARM_UP = ((r"\frac{1}{2}", "0.5"), (r"(-\infty, 3]", r"[3, \infty)"), ("x^2+2x+1", "(x+1)^2"),
            ("(1, 2)", r"\{1, 2\}"), (r"2\sqrt{5}", r"\text{(C)}"))


def warm_up() -> None:
    """Import math-verify and parse a few answers of common shapes: the parser's first input of
    each shape is slow (~50 ms), so a worker does this before any clock runs."""
    # math-verify warns (once) that its signal timeout is off: here that is the point
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    for gold, predicted in _WARM_UP:
        check_answer(gold, predicted)


def _worker_main(conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    warm_up()  # next to nothing if the forkserver did it (exit_loop.tasks.math_warmup)
    try:
        conn.send((None, time.process_time()))  # ready
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        try:
            for seq, gold, predicted in chunk:
                result = check_answer(gold, predicted)
                # with the CPU time used so far, which is where the next row's budget starts
                conn.send((seq, result, time.process_time()))
        except (BrokenPipeError, OSError):  # the parent has gone
            return


# --------------------------------------------------------------------------- in the parent

class _Worker:
    def __init__(self, ctx: Any):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                name="exit-loop-math-verify")
        self.proc.start()
        child.close()
        self.pending: deque[tuple[int, str, str]] = deque()  # sent, not yet answered, in order
        self.ready = False  # the worker has started and warmed up; until then no clock runs
        self.deadline = 0.0  # when to look at the current row next
        self.row_t0 = 0.0    # when the current row started (wall clock)
        self.row_cpu0 = 0.0  # the worker's CPU seconds when it started
        self.cpu = 0.0       # the worker's CPU seconds at its last message

    def start_row(self, timeout_s: float) -> None:
        self.row_t0 = time.monotonic()
        self.row_cpu0 = self.cpu
        self.deadline = self.row_t0 + timeout_s

    def cpu_now(self) -> float | None:
        """The worker's CPU seconds (user + system) from /proc, or None where that is not there."""
        if not _CLOCK_TICKS:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        except (OSError, ValueError, IndexError):
            return None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.join(5)
        except Exception:  # pragma: no cover - already gone
            pass
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within a second."""
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(1)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def _shutdown(workers: list[_Worker | None]) -> None:
    for i, w in enumerate(workers):
        if w is not None:
            w.stop()
            workers[i] = None


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" not in methods:  # pragma: no cover - not POSIX
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # takes effect if the forkserver is not running yet; workers forked from it skip the
    # ~0.5 s import of math-verify and sympy and the parser's warm-up. ("__main__" is
    # multiprocessing's default; Python 3.11's forkserver ignores it, so each worker imports a
    # script's main module itself, as spawned processes do.)
    ctx.set_forkserver_preload(["__main__", "exit_loop.tasks.math_warmup"])
    return ctx


_PENDING = object()


class MathPool:
    """`workers` processes running math-verify; each answer gets at most `timeout_s` seconds.

    Processes start on first use and stop on `close()` (or leaving a `with` block, or garbage
    collection, or interpreter exit). One thread at a time uses a pool; others wait their turn.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 chunk_size: int = 16):
        if workers is not None and workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a positive number of seconds, got {timeout_s}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: expected at least 1, got {chunk_size}")
        self.workers = workers or default_workers()
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self.timeouts = 0    # rows reported as TIMEOUT so far
        self.restarts = 0    # workers killed (timeout or death) and replaced so far
        self._ctx: Any = None
        self._slots: list[_Worker | None] = [None] * self.workers
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._slots)

    # -- lifecycle

    def close(self) -> None:
        """Stop every worker (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> MathPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _worker(self, i: int) -> _Worker:
        w = self._slots[i]
        if w is None:
            if self._ctx is None:
                self._ctx = _context()
            w = self._slots[i] = _Worker(self._ctx)
        return w

    def _replace(self, i: int, timed_out: bool = True) -> None:
        w = self._slots[i]
        if w is not None:
            w.kill()
        self._slots[i] = None  # started again when next needed
        self.restarts += timed_out

    def live_workers(self) -> list[Any]:
        """The worker processes running now (each with `proc` and `cpu_now()`), for benchmarks."""
        return [w for w in self._slots if w is not None]

    # -- work

    def check(self, gold: str, predicted: str) -> bool | str:
        """One answer: True, False or TIMEOUT."""
        for _, result in self.imap([(None, (gold, predicted))]):
            return result  # type: ignore[return-value]
        raise AssertionError("unreachable")  # pragma: no cover

    def imap(self, items: Iterable[tuple[K, tuple[str, str] | None]],
             window: int | None = None) -> Iterator[tuple[K, bool | str | None]]:
        """For each `(key, job)` in order, `(key, result)`: a job `(gold, predicted)` gets True,
        False or TIMEOUT; a job of None gets None at once (rows that need no check keep their
        place). At most `window` rows (default 8 chunks a worker) are read ahead of the output."""
        if self._closed:
            raise RuntimeError("MathPool is closed")
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("MathPool.imap: this thread is already inside an imap of this pool")
        with self._lock:
            self._owner = me
            try:
                yield from self._imap(iter(items), window or 8 * self.chunk_size * self.workers)
            finally:
                # an abandoned (or failed) run may leave workers busy with rows nobody will read
                for i, w in enumerate(self._slots):
                    if w is not None and w.pending:
                        self._replace(i, timed_out=False)
                self._owner = None

    def _imap(self, items: Iterator[tuple[K, tuple[str, str] | None]],
              window: int) -> Iterator[tuple[K, bool | str | None]]:
        out: deque[list[Any]] = deque()            # [key, result] in input order
        waiting: dict[int, list[Any]] = {}         # seq -> its entry in `out`
        queue: deque[tuple[int, str, str]] = deque()  # jobs not yet sent
        seq = 0
        exhausted = False
        while True:
            while not exhausted and len(out) < window:
                try:
                    key, job = next(items)
                except StopIteration:
                    exhausted = True
                    break
                if job is None:
                    out.append([key, None])
                else:
                    entry = [key, _PENDING]
                    out.append(entry)
                    waiting[seq] = entry
                    queue.append((seq, str(job[0]), str(job[1])))
                    seq += 1
            while out and out[0][1] is not _PENDING:
                key, result = out.popleft()
                yield key, result
            if not out:
                if exhausted:
                    return
                continue
            self._dispatch(queue)
            self._collect(waiting, queue)

    def _dispatch(self, queue: deque[tuple[int, str, str]]) -> None:
        for i in range(self.workers):
            if not queue:
                return
            w = self._slots[i]
            if w is not None and w.pending:
                continue
            w = self._worker(i)
            # share out the tail evenly so no worker sits idle at the end
            n = min(self.chunk_size, max(1, -(-len(queue) // self.workers)))
            chunk = [queue.popleft() for _ in range(min(n, len(queue)))]
            w.pending.extend(chunk)
            if w.ready:
                w.start_row(self.timeout_s)
            else:
                w.deadline = time.monotonic() + STARTUP_TIMEOUT_S
            try:
                w.conn.send(chunk)
            except (OSError, ValueError):  # it died between chunks: start over with a new one
                w.pending.clear()
                queue.extendleft(reversed(chunk))
                self._replace(i, timed_out=False)

    def _collect(self, waiting: dict[int, list[Any]], queue: deque[tuple[int, str, str]]) -> None:
        busy = [(i, w) for i, w in enumerate(self._slots) if w is not None and w.pending]
        if not busy:
            return
        now = time.monotonic()
        wait_s = max(0.0, min(w.deadline for _, w in busy) - now)
        ready = wait([w.conn for _, w in busy], timeout=wait_s)
        for i, w in busy:
            if w.conn not in ready:
                continue
            try:
                while w.pending and w.conn.poll():
                    msg = w.conn.recv()
                    if msg[0] is None:  # started: the first row's clocks start now
                        w.ready = True
                    else:
                        s, result, _ = msg
                        w.pending.popleft()
                        waiting.pop(s)[1] = result
                    w.cpu = msg[-1]
                    w.start_row(self.timeout_s)  # the next row starts now
            except (EOFError, OSError):  # died on its current row
                self._give_up(i, w, waiting, queue)
        now = time.monotonic()
        for i, w in busy:
            if self._slots[i] is w and w.pending and now >= w.deadline and not w.conn.poll():
                if not w.ready:
                    raise self._failed_start(w)
                wall = now - w.row_t0
                cpu_now = w.cpu_now()
                cpu = wall if cpu_now is None else cpu_now - w.row_cpu0
                wall_limit = WALL_FACTOR * self.timeout_s
                if cpu >= self.timeout_s or wall >= wall_limit:
                    self._give_up(i, w, waiting, queue)
                else:  # it has had less CPU than its budget (a crowded machine): look again later
                    w.deadline = min(now + max(self.timeout_s - cpu, 0.01), w.row_t0 + wall_limit)

    def _failed_start(self, w: _Worker) -> RuntimeError:
        w.kill()
        how = (f"exited with code {w.proc.exitcode} (its error is on stderr above)"
               if w.proc.exitcode is not None else f"was not ready within {STARTUP_TIMEOUT_S:.0f} s")
        return RuntimeError(f"a math-verify worker process {how}; is math-verify installed "
                            f"(`python -c 'import math_verify'`)?")

    def _give_up(self, i: int, w: _Worker, waiting: dict[int, list[Any]],
                 queue: deque[tuple[int, str, str]]) -> None:
        """The worker's current row is a TIMEOUT; kill it; send the rest of its chunk again."""
        if not w.ready:  # never started: no row is to blame, and a new one would fail the same
            raise self._failed_start(w)
        s, _, _ = w.pending.popleft()
        waiting.pop(s)[1] = TIMEOUT
        self.timeouts += 1
        queue.extendleft(reversed(w.pending))
        w.pending.clear()
        self._replace(i)
        self._worker(i)  # start its successor now: it warms up while the others work


# --------------------------------------------------------------------------- a shared pool

_shared: MathPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> MathPool:
    """The process-wide pool for one-off checks (`verify_row(row, task="math")`): default
    workers and timeout, started on first use, stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared._closed:
            _shared = MathPool()
        return _shared
