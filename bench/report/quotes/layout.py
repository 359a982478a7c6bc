"""The code's parts and what each may import, read from their docstrings' `May import:` lines:
the one place the import direction is written down. docs/architecture.md quotes it
(layout.imports) and tests/test_layout.py holds every import to it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

# Data-flow order; a module belongs to the longest part that prefixes its dotted name.
PARTS = ("models", "bench.config", "bench.sweep", "bench.measure", "bench.rows", "bench.report", "bench.gate",
         "training")


def part_file(root: Path, part: str) -> Path:
    """The file whose docstring speaks for a part: its package's __init__.py, or the module."""
    path = root.joinpath(*part.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def docstring(root: Path, part: str) -> str:
    return ast.get_docstring(ast.parse(part_file(root, part).read_text())) or ""


def may_import(root: Path, part: str) -> list[str]:
    """The parts on the part's `May import:` line (parenthesised remarks dropped; `nothing`: none).
    Raises ValueError for a part without the line or naming something that is not a part."""
    match = re.search(r"^May import:(.*?)(?:\n\s*\n|\Z)", docstring(root, part), re.M | re.S)
    if match is None:
        raise ValueError(f"{part_file(root, part).relative_to(root)}: the docstring has no 'May import:' line")
    listed = re.sub(r"\([^)]*\)", "", match.group(1)).replace("\n", " ").strip().rstrip(".")
    names = [] if listed == "nothing" else [item.strip() for item in listed.split(",")]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ValueError(f"{part_file(root, part).relative_to(root)}: 'May import:' names {unknown}, not parts {PARTS}")
    return names


def imports_table(root: Path) -> str:
    """A Markdown table: each part, what it is (its docstring's first line), what it may import."""
    rows = [f"| `{part}` | {docstring(root, part).splitlines()[0].rstrip('.:')} | "
            f"{', '.join(f'`{n}`' for n in may_import(root, part)) or 'nothing of ours'} |" for part in PARTS]
    return "\n".join(["| part | what it is | may import |", "| :--- | :--- | :--- |", *rows])
