"""The marked regions of Markdown files: found, checked against their quotes, rewritten; and the
command (python -m bench.report.quotes check | write | list [FILE ...])."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .sources import QUOTES, ROOT, Quote


# -- finding the marked regions -------------------------------------------------------------------

COMMENT = re.compile(r"<!--(.*?)-->", re.S)
NAME = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+")


@dataclass
class Region:
    name: str
    line: int      # of the opening marker
    start: int     # offsets of the text between the markers
    end: int

    def text(self, source: str) -> str:
        return source[self.start:self.end]


@dataclass
class Problem:
    path: str
    line: int
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name}: {self.message}"


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\n\s*\n).)+?\1", re.S)


def _blank_code(text: str) -> str:
    """`text` with fenced blocks and code spans blanked out (same offsets, newlines kept), so that
    a marker shown as an example in code is not taken for one."""
    for pattern in (FENCE, CODE_SPAN):
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return text


def regions(text: str, path: str = "") -> tuple[list[Region], list[Problem]]:
    """The marked regions of a Markdown text, and the markers that are not well-formed (an
    opening without its closing marker, a closing without an opening, a bad name). Markers
    inside code (fenced blocks, `code spans`) are examples, not markers."""
    found, problems, open_ = [], [], None
    for m in COMMENT.finditer(_blank_code(text)):
        body, line = m.group(1), text.count("\n", 0, m.start()) + 1
        if body.startswith("q:"):
            name = body[2:]
            if not NAME.fullmatch(name):
                problems.append(Problem(path, line, name, "not a quote name (lower-case words "
                                        "joined by dots, as in cpu.headline)"))
            if open_ is not None:
                problems.append(Problem(path, open_[1], open_[0], "no closing <!--/q--> before the "
                                        "next quote"))
            open_ = (name, line, m.end())
        elif body == "/q":
            if open_ is None:
                problems.append(Problem(path, line, "/q", "a closing marker without an opening one"))
            else:
                found.append(Region(open_[0], open_[1], open_[2], m.start()))
                open_ = None
        elif re.match(r"\s*/?\s*q\s*:", body) or body.strip() == "/q":
            problems.append(Problem(path, line, body.strip(), "malformed marker: write <!--q:NAME--> "
                                    "and <!--/q--> without spaces"))
    if open_ is not None:
        problems.append(Problem(path, open_[1], open_[0], "no closing <!--/q-->"))
    return [r for r in found if NAME.fullmatch(r.name)], problems


def default_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "results" / "README.md"]


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _expected(region: Region, quote: Quote, root: Path) -> str:
    text = quote.make(root)
    return f"\n\n{text}\n\n" if quote.table else text


def check(files: list[Path] | None = None, root: Path = ROOT) -> list[Problem]:
    """Every problem in `files`: drifted figures, unknown names, malformed markers."""
    problems = []
    for path in files or default_files(root):
        if not path.is_file():
            continue
        source, shown = path.read_text(), _display(path, root)
        found, bad = regions(source, shown)
        problems += bad
        for region in found:
            quote = QUOTES.get(region.name)
            if quote is None:
                problems.append(Problem(shown, region.line, region.name,
                                        f"unknown quote name (known: {', '.join(QUOTES)})"))
                continue
            written = region.text(source)
            if quote.table != written.startswith("\n"):
                problems.append(Problem(shown, region.line, region.name,
                                        "a table: put its markers on lines of their own" if quote.table
                                        else "an inline figure: keep it on the markers' line"))
                continue
            try:
                computed = _expected(region, quote, root)
            except (OSError, LookupError, KeyError, ValueError) as e:
                problems.append(Problem(shown, region.line, region.name,
                                        f"cannot compute from {', '.join(quote.sources)}: {e}"))
                continue
            if written.strip("\n") != computed.strip("\n"):
                problems.append(Problem(shown, region.line, region.name,
                                        f"written {_show(written)}, computed {_show(computed)} "
                                        f"(from {', '.join(quote.sources)})"))
    return problems


def _show(text: str) -> str:
    text = text.strip("\n")
    return repr(text) if "\n" not in text else "\n" + "\n".join("    " + t for t in text.split("\n")) + "\n  "


def write(files: list[Path] | None = None, root: Path = ROOT) -> list[Path]:
    """Rewrite every known, well-formed region of `files` from the results; returns the files
    changed. Regions with an unknown name or a wrong shape are left as they are."""
    changed = []
    for path in files or default_files(root):
        if not path.is_file():
            continue
        source = path.read_text()
        found, _ = regions(source)
        out, last = [], 0
        for region in found:
            quote = QUOTES.get(region.name)
            if quote is None or quote.table != region.text(source).startswith("\n"):
                continue
            out += [source[last:region.start], _expected(region, quote, root)]
            last = region.end
        new = "".join(out) + source[last:]
        if new != source:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report.quotes", description="Check or rewrite the figures the docs quote from committed results.")
    parser.add_argument("action", choices=["check", "write", "list"])
    parser.add_argument("files", nargs="*", type=Path,
                        help="Markdown files (default: README.md, docs/*.md, results/README.md)")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"python -m bench.report.quotes: error: {missing[0]}: no such file", file=sys.stderr)
        return 2
    files = args.files or default_files()
    if args.action == "list":
        for name, quote in QUOTES.items():
            print(f"{name}: {', '.join(quote.sources)}")
        return 0
    if args.action == "write":
        for path in write(files):
            print(f"rewrote {_display(path, ROOT)}")
    problems = check(files)
    for problem in problems:
        print(problem)
    count = sum(len(regions(f.read_text())[0]) for f in files if f.is_file())
    print(f"quotes: {count} in {len(files)} files, {len(problems)} "
          f"problem{'s' if len(problems) != 1 else ''}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
