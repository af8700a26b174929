"""JSONL reading and writing: clear errors that name the file and line, atomic whole-file
writes, and append-only streams that survive a crash mid-line.

Every stage reads and writes rows through this module, so a malformed line or a half-written
file is caught in one place; `write_manifest` writes the `manifest.json` that ends each stage.
(The errors it raises, `DataError` and `DiskFullError`, live in `exit_loop.errors`.)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from exit_loop.environment import environment
from exit_loop.errors import DataError, naming_a_full_disk
from exit_loop.rundir import MANIFEST


def iter_jsonl(path: str | Path, required: Iterable[str] = ()) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-blank line; raise DataError naming file and line on bad input.

    `required` keys must be present in every row.
    """
    for _, row in iter_jsonl_numbered(path, required):
        yield row


def iter_jsonl_numbered(path: str | Path, required: Iterable[str] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
    """As `iter_jsonl`, yielding `(line number, row)`, so callers checking a row's values can
    name its line (blank lines are skipped, so the row index is not the line number)."""
    path = Path(path)
    required = tuple(required)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise DataError(
                    f"{path}:{lineno}: missing key(s) {', '.join(map(repr, missing))}; "
                    f"a row needs {', '.join(map(repr, required))}"
                )
            yield lineno, row


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    return list(iter_jsonl(path, required))


def dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False)


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, exclusive temporary file beside `path`, with the permissions an ordinary file
    gets (0666 less the process's umask *now*; `tempfile.mkstemp` would make it 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - a name clash: draw another
            continue


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing (`mode` "w" for text, "wb" for bytes); on
    success fsync and rename it over `path`, on failure remove it. Readers see the old file or the
    whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        encoding = None if "b" in mode else "utf-8"
        with naming_a_full_disk(path), os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write all rows atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        for row in rows:
            f.write(dumps(row))
            f.write("\n")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


class AppendLog:
    """An append-only JSONL stream for results that arrive one by one.

    Opening it repairs a torn last line (a crash mid-write leaves a line with no newline): that
    line is cut off, so the rows already read back are exactly the complete ones. Each `write`
    puts whole lines in one `write` call; `flush` makes them durable.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self._repair_and_load()
        self._f = self.path.open("a", encoding="utf-8")

    def _repair_and_load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # torn last line from a crash: drop it
            with self.path.open("r+b") as f:
                f.truncate(end)
        self.rows = read_jsonl(self.path)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(dumps(r) + "\n" for r in rows)
        if text:
            with naming_a_full_disk(self.path):
                self._f.write(text)
                self._f.flush()

    def sync(self) -> None:
        with naming_a_full_disk(self.path):
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            with naming_a_full_disk(self.path):
                try:
                    self.sync()
                finally:
                    self._f.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (manifests record these)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | Path, stage: str, timings: dict[str, Any], **fields: Any) -> Path:
    """A stage's `manifest.json`, written last (its existence marks the stage done):
    {"stage": ..., **fields, "timings": ..., "environment": ...} (`exit_loop.environment`: the
    versions, CPU, ISA and GPU it ran with)."""
    return write_json(Path(directory) / MANIFEST,
                      {"stage": stage, **fields, "timings": timings, "environment": environment()})
