"""The console: what a stage shows (its progress bars and one summary line) and where everything
else goes (its `stage.log`).

    with stage_log(run_dir / "round_00" / "verify"):   # fds 1 and 2 -> round_00/verify/stage.log
        print("verify: ...", file=stream())            # the project's own line, on the terminal

Inside `stage_log`, file descriptors 1 and 2 point at `<stage dir>/stage.log` (appended), so
everything other libraries write lands there: Python warnings and logging, `datasets` and
Trainer progress bars, and what native code and vLLM's engine process (which inherits the
descriptors) write past Python altogether. The project's own output goes to `stream()`, a copy
of the terminal's stdout taken on entry; the `exit_loop` logger's console handler writes there
too, so a project warning is printed once. If the block fails, the last lines of the log are
shown on stderr with its path, then the error goes on.

Every line the project itself shows a user goes through `say`, in a stage or out of one (a
command's summary, a merge's count, a model's download), so it reaches the terminal wherever it is
said; `print` is left to a command's data output (a path, a listing) outside any stage.

At `--log_level debug` nothing is redirected: every library's output is on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

LOG_NAME = "stage.log"
TAIL_LINES = 40

_console: TextIO | None = None


def stream() -> TextIO:
    """Where the project's own output goes: the terminal, also inside `stage_log`."""
    return _console if _console is not None else sys.stdout


def say(line: str) -> None:
    """One line of the project's own output (a stage's summary), on the console, above any
    progress bar that is showing."""
    from tqdm import tqdm

    tqdm.write(line, file=stream())
    stream().flush()


def quiet() -> bool:
    """Whether other libraries' output is kept off the console (every level but debug)."""
    return logging.getLogger("exit_loop").getEffectiveLevel() > logging.DEBUG


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln.rsplit("\r", 1)[-1] for ln in lines[-n:]]  # a progress bar: its last state


def _terminal(stdout: TextIO, saved_fd: int) -> TextIO:
    """The console while fd 1 points at a log: `stdout` itself where it does not write to fd 1
    (pytest's capture, a notebook's stream), else a stream on a copy of the original fd 1."""
    try:
        on_fd1 = stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        on_fd1 = False
    if not on_fd1:
        return stdout
    return os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")


@contextmanager
def stage_log(directory: str | Path) -> Iterator[Path]:
    """Run the block with fds 1 and 2 on `directory/stage.log`; yields the log's path."""
    global _console
    path = Path(directory) / LOG_NAME
    if not quiet() or _console is not None:  # debug, or already inside a stage's log
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    python_streams = sys.stdout, sys.stderr
    _console = _terminal(sys.stdout, saved[0])
    # Python-level writers on fds 1 and 2, wherever sys.stdout pointed (pytest, a notebook). Never
    # closed: a logging handler made during the stage keeps its stream, and after the stage the
    # same fds are the terminal again.
    fd_streams = [open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False) for fd in (1, 2)]
    failed = False
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout, sys.stderr = fd_streams
        yield path
    except BaseException:
        failed = True
        raise
    finally:
        for s in fd_streams:
            s.flush()
        sys.stdout, sys.stderr = python_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        if _console is not python_streams[0]:
            _console.close()
        _console = None
        if failed:
            lines = tail(path)
            if lines:
                print(f"--- last {len(lines)} lines of {path}:", *lines, "---", sep="\n", file=sys.stderr,
                      flush=True)


def train_progress():
    """A transformers `TrainerCallback` that shows the optimizer steps as a progress bar on the
    console (the Trainer's own bar goes to the stage's log with the rest)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                                file=stream(), dynamic_ncols=True, mininterval=1.0)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainProgress()
