"""Every error the project raises on purpose, in one place; `exit_loop.cli` catches them by type
and prints the message (no traceback): each names the file, the line or key, and what was expected.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and what was expected."""


class DataError(ValueError):
    """Bad input data: the message names the file, the line and what was expected."""


class NothingToTrain(DataError):
    """Every row of the splits was dropped before training (too long, cut short); the message says
    how many of each."""


class DiskFullError(OSError):
    """A write failed for want of space (ENOSPC, or EDQUOT: over quota); names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


class StageFailed(RuntimeError):
    """A stage's process exited non-zero; its own output above says why."""


class SlurmError(RuntimeError):
    """sbatch, squeue or scancel failed; the message has their own words."""


@contextmanager
def naming_a_full_disk(path: Path) -> Iterator[None]:
    """Re-raise a write's ENOSPC / EDQUOT as a DiskFullError that names `path` and says what to do."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(e.errno, f"{path}: {os.strerror(e.errno)}; free some space and run the same "
                                     "command again (whatever was written completely is kept)") from e
