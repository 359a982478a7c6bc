"""The layout holds: the import graph of bench/, models/ and training/ has no cycle; every import
between parts goes the way its part's docstring allows ("May import: ...", read by
bench/report/quotes/layout.py, which docs/architecture.md quotes); no module reaches for
another's private name; no source file is over 400 lines; module names are not reused; and the
benchmark runs a point's scenario through models/runtime.py instead of a loop of its own.

Imports are read with `ast`, inside functions too: an import made on use is still a dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bench.report.quotes.layout import PARTS, may_import

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bench", "models", "training")
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of module `name`
    that reaches our packages; relative imports resolved."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            found.append((target, names, node.lineno))
            # `from package import module` imports the module too
            found += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in MODULES]
    return [(t, names, line) for t, names, line in found if t.split(".")[0] in PACKAGES]


GRAPH = {name: sorted({t for t, _, _ in imports(name) if t in MODULES and t != name}) for name in MODULES}


def part_of(module: str) -> str | None:
    return max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len, default=None)


def allowed_imports(part: str) -> set[str]:
    """The parts on the "May import:" line of the part's docstring (bench/report/quotes/layout.py)."""
    return set(may_import(ROOT, part))


def test_every_part_says_what_it_may_import():
    for part in PARTS:
        allowed_imports(part)


def test_the_import_graph_has_no_cycle():
    """Depth-first search over GRAPH; a back edge is a cycle, reported with its path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_import_goes_the_allowed_way():
    allowed = {part: allowed_imports(part) for part in PARTS}
    wrong = []
    for name in MODULES:
        here = part_of(name)
        for target, _, line in imports(name):
            there = part_of(target)
            if here is None or there is None or there == here:
                continue
            if there not in allowed[here]:
                wrong.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {here} imports {target} "
                             f"({there} is not in its 'May import:' line)")
    assert wrong == [], "\n".join(wrong)


def test_no_module_takes_another_s_private_name():
    taken = []
    for name in MODULES:
        for target, names, line in imports(name):
            private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in MODULES]
            if private and target != name:
                taken.append(f"{MODULES[name].relative_to(ROOT)}:{line}: {', '.join(private)} from {target}")
        tree = ast.parse(MODULES[name].read_text())
        aliases = {a.asname or a.name.rpartition(".")[2]: f"{(n.module or '')}.{a.name}".lstrip(".")
                   for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        for node in ast.walk(tree):  # module._private, on a module imported by name
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and any(m.endswith(aliases[node.value.id]) for m in MODULES)):
                taken.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert taken == [], "\n".join(taken)


def test_no_source_file_is_over_400_lines():
    sources = [*MODULES.values(), ROOT / "run_bench.py", ROOT / "train_melt.py"]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"


def test_module_names_are_not_reused():
    """Two modules called policies.py in three places meant three things; a package's config.py
    (and __init__, __main__) aside, a file name says what it holds once."""
    seen: dict[str, list[str]] = {}
    for path in MODULES.values():
        if path.name not in ("__init__.py", "__main__.py", "config.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


STEP_LOOP = ("decode_step", "greedy_decode", "forced_decode", "StepTimer")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("bench")))
def test_bench_runs_no_step_loop_of_its_own(name):
    """A point's prefill, decode and their timers are models/runtime.py's (Scenario): bench/ defines
    no prefill or decode, and calls no decode step or step timer (machine.py times its copies and
    matrix products with StepTimer, which is not a model's step)."""
    tree = ast.parse(MODULES[name].read_text())
    defined = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
               and re.fullmatch(r"_?(prefill|decode|decode_step|forced_decode|greedy_decode|generate)", n.name)]
    assert defined == [], f"{name} defines {defined}: the scenario's steps belong in models/runtime.py"
    if name != "bench.measure.machine":
        used = sorted({n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
                       if (isinstance(n, ast.Attribute) and n.attr in STEP_LOOP)
                       or (isinstance(n, ast.Name) and n.id in STEP_LOOP)})
        assert used == [], f"{name} uses {used}: run the scenario through models.runtime.Scenario"
