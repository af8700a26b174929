"""The one way a command that reads a config builds its parser: its module docstring as the
description, its own epilog (examples), and then every config key it takes (sections flattened to
dotted keys), each with its default and the comment its dataclass field carries in the source, so
`--help` says what a key does without opening the code.

    p = config_parser("exit-loop run", __doc__, ExperimentConfig, epilog=EXAMPLES)

A field's comment is its metadata's `comment`, else the one at the end of its line, else the
comment lines just above it, else (a class made by dataclasses.make_dataclass, which has no source)
that of the same field in the class its `COMMENTS_FROM` names. The key list is made when the help
is printed, not each time a command starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import typing
from typing import Any

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")
_COMMENT = re.compile(r"^\s+#\s?(.*)$")
WIDTH = 30  # the key column


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """Each field of dataclass `cls` and its comment: its metadata's `comment`, else the one its
    source gives it, else the one `cls.COMMENTS_FROM` gives the same field."""
    out = {f.name: f.metadata["comment"] for f in dataclasses.fields(cls) if f.metadata.get("comment")}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (a frozen build, a class made at run time)
        lines = []
    if (source := getattr(cls, "COMMENTS_FROM", None)) is not None:
        names = {f.name for f in dataclasses.fields(cls)}
        out.update({k: v for k, v in field_comments(source).items() if k in names and k not in out})
    names = {f.name for f in dataclasses.fields(cls)}
    above: list[str] = []
    for line in lines[1:]:
        if m := _COMMENT.match(line):
            above.append(m.group(1).strip())
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    return str(value)


def keys_help(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """`key=default   comment` for every config key of dataclass `cls` (a section's keys under
    its dotted name, with the section's own defaults; a section that is null by default is listed
    by its keys too). `defaults`: an instance of `cls` whose values are the defaults shown."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}{f.name}"
        section = hints[f.name]
        alts = [a for a in typing.get_args(section) if a is not type(None)]
        if not dataclasses.is_dataclass(section) and len(alts) == 1 and dataclasses.is_dataclass(alts[0]):
            section = alts[0]  # `X | None`: a section left out by default
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        args = typing.get_args(section)
        if typing.get_origin(section) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
            names = ", ".join(default) if default else "none"  # named sections (arms): each one's keys
            out.append(f"  {key}.NAME.*".ljust(WIDTH) + f"  {comments.get(f.name) or 'named sections'} (default: {names})")
            out += keys_help(args[1], f"{key}.NAME.")
            continue
        if dataclasses.is_dataclass(section):
            if comments.get(f.name):
                out.append(f"  {key}.*".ljust(WIDTH) + f"  {comments[f.name]}")
            out += keys_help(section, f"{key}.", default if dataclasses.is_dataclass(default) else None)
            continue
        text = f"  {key}={_show(default) if not dataclasses.is_dataclass(default) else '{…}'}"
        out.append(text.ljust(WIDTH) + f"  {comments[f.name]}" if comments.get(f.name) else text)
    return out


class _ConfigParser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog ends with its config's keys, listed when the help is printed."""

    def __init__(self, *args: Any, config_cls: type, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_cls = config_cls

    def format_help(self) -> str:
        keys = ("config keys (key=value after the command, or in the YAML; default shown):\n"
                + "\n".join(keys_help(self.config_cls)))
        own, self.epilog = self.epilog, f"{self.epilog.rstrip()}\n\n{keys}" if self.epilog else keys
        try:
            return super().format_help()
        finally:
            self.epilog = own


def config_parser(prog: str, doc: str | None, cls: type, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser for a command that reads a `cls` config: `doc` as its description, then
    `epilog`, then the config keys (`keys_help`)."""
    return _ConfigParser(prog=prog, description=doc, epilog=epilog, config_cls=cls,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
