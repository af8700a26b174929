"""The README's commands name what exists: every `exit-loop <subcommand>` a real subcommand, every
configs/*.yaml a real file (bench/readme_commands.py runs them; this only reads the page)."""

from __future__ import annotations

import sys
from pathlib import Path

from exit_loop.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import readme_commands  # noqa: E402 - bench/ is not a package


def test_readme_commands_name_real_subcommands_and_configs():
    cmds = readme_commands.commands((ROOT / "README.md").read_text())
    assert sum(c.argv[0] == "exit-loop" for c in cmds) >= 10
    problems = {c.text: readme_commands.static_problems(c, set(COMMANDS)) for c in cmds}
    assert {text: p for text, p in problems.items() if p} == {}
