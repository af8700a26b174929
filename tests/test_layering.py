"""The package reads one way down (DESIGN.md, "Layout"): the import graph of `exit_loop`, built
from the source with `ast` (imports at module level and inside functions alike), has no cycle,
and no module takes a `_private` name from another module of the package; the tests and the
benchmarks use public names only. Pure and fast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "exit_loop"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(module imported, name taken from it or "", line) for every import of the package in
    `path`, wherever it stands; `from a import b` where `a.b` is a module imports that module."""
    name_of = {p: m for m, p in modules.items()}
    here = name_of.get(path, "")
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != PACKAGE:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, "", node.lineno) if sub in modules else (base, a.name, node.lineno))
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, path in modules.items():
        for target, _, _ in imports(path, modules):
            while target and target not in modules:  # `import exit_loop.a.b` of a name: its module
                target = target.rpartition(".")[0]
            if target and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(files: list[Path], modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """`file:line takes _name from module` for each `_private` name imported from another module."""
    name_of = {p: m for m, p in modules.items()}
    out = []
    for path in files:
        for target, name, line in imports(path, modules):
            private = name.startswith("_") and not name.startswith("__")
            if private and target != name_of.get(path):
                out.append(f"{path.relative_to(root)}:{line} takes {name} from {target}")
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and graph["exit_loop.cli"] == {"exit_loop.errors", "exit_loop.console"}  # the graph is read
    assert "exit_loop.tasks.problem" in graph["exit_loop.tasks.gsm8k"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_lower_layers_never_import_the_pipeline():
    graph = import_graph()
    below = [m for m in graph if not m.startswith(f"{PACKAGE}.pipeline") and m != f"{PACKAGE}.cli"]
    wrong = sorted(f"{m} imports {t}" for m in below for t in graph[m] if t.startswith(f"{PACKAGE}.pipeline"))
    assert not wrong, wrong
    for leaf in ("errors", "environment", "tasks.problem", "prompts", "jsonl", "config", "pipeline.resources"):
        assert not {t for t in graph[f"{PACKAGE}.{leaf}"]} - {f"{PACKAGE}.errors", f"{PACKAGE}.jsonl",
                                                          f"{PACKAGE}.prompts", f"{PACKAGE}.environment",
                                                          f"{PACKAGE}.rundir"}, leaf
    for floor in ("environment", "rundir", "rules"):
        assert not graph[f"{PACKAGE}.{floor}"], f"{floor} imports nothing of the package"


def test_no_private_name_crosses_a_module():
    modules = module_files()
    files = [*modules.values(), *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py"))]
    found = private_imports(files, modules)
    assert not found, "\n".join(found)


def test_the_checks_catch_what_they_look_for(tmp_path: Path):
    """A cycle (through a function-level import) and a private name, in a package made here."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from exit_loop.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from exit_loop.a import _hidden\n")
    graph = import_graph(tmp_path)
    assert cycles(graph) == [["exit_loop.a", "exit_loop.b"]]
    found = private_imports([pkg / "a.py", pkg / "b.py"], module_files(tmp_path), tmp_path)
    assert found == ["exit_loop/b.py:2 takes _hidden from exit_loop.a"]
