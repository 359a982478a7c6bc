"""The README and docs/ as a newcomer meets them: every figure quoted from a committed run equals
its source file (bench.report.quotes), every shell command shown is classified (the cheap ones run here as
written, with the output shown where a page shows it; the expensive ones are listed with the reason
they are not run), the Python examples run, links resolve, and no page or code comment carries
project history."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report.quotes import markers as quotes
from bench.report.quotes.sources import QUOTES
from bench.rows.schema import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "results" / "README.md"]

# Commands shown in the pages that this test runs as written, in a copy of the repository (its
# outputs go to a temporary folder), with the exit status each must give. Keep their total to
# well under a minute: the whole suite has to stay quick on a 2-core machine.
CHEAP = {
    ".venv/bin/python run_bench.py model=melt loops=4 seq_len=1024": 0,
    ".venv/bin/python run_bench.py loops=0": 2,
    ".venv/bin/python run_bench.py size=small seq_len=9000": 2,
    ".venv/bin/python train_melt.py melt.chunk_size=0": 2,
    ".venv/bin/python -m bench.gate check results/reference/cpu "
    "--ceilings conf/ceilings/cpu_small.yaml": 0,
    ".venv/bin/python -m bench.report results/reference/cpu --out results/cpu-report": 0,
    ".venv/bin/python -m bench.report.quotes check": 0,
    ".venv/bin/python -m bench.report.quotes write": 0,
}

# Commands shown in the pages that this test does not run, and why. Run them by hand when the
# pages around them change.
PY = ".venv/bin/python"
EXPENSIVE = {
    "make bench": "installs the venv, then the default sweep: minutes of CPU",
    "make test": "installs the venv, then the whole test suite, this test included: minutes",
    "make bench ceilings": "the default sweep first, as make bench",
    f"{PY} run_bench.py -m experiment=memory_vs_depth": "a sweep of 11 points: about two minutes",
    f"{PY} run_bench.py -m experiment=default prefill=one_pass name=default_one_pass":
        "the default sweep, one-pass prefill: minutes",
    f"{PY} run_bench.py -m model=standard,ouro,melt loops=1,2,4,8 seq_len=512,2048":
        "a sweep of 24 points: minutes",
    f"{PY} run_bench.py -m probe=fake size=ouro-1.4b dtype=bfloat16 loops=4 seq_len=32000 "
    "model=standard,ouro,melt new_tokens=4":
        "Ouro-1.4B shapes at 32K tokens under the fake probe: about half a minute",
    f"{PY} run_bench.py -m experiment=paper_table2":
        "full-size shapes at 32K tokens under the fake probe: under a minute",
    f"{PY} run_bench.py -m experiment=memory_vs_seq_len probe=fake size=ouro-1.4b "
    "dtype=bfloat16 model=ouro,melt seq_len=8192,32768 mem_limit_mib=24000":
        "Ouro-1.4B shapes at up to 32K tokens under the fake probe: a minute or two",
    f"{PY} run_bench.py -m experiment=ci": "about a minute; tests/gate/test_ci_ceilings.py runs this sweep",
    f"{PY} -m bench.gate check results/ci":
        "needs results/ci from the ci sweep; tests/gate/test_ci_ceilings.py runs this check on it",
    f"{PY} -m bench.gate check results/ci --update --headroom 0.02":
        "needs results/ci from the ci sweep, and rewrites conf/ceilings/ci.yaml",
    f"{PY} run_bench.py -m experiment=capacity": "a capacity search of four models: minutes",
    f"{PY} run_bench.py model=melt checkpoint=results/reference/training/checkpoints/melt seq_len=1024":
        "several seconds, past the cheap set's budget; tests/training/test_training.py runs a checkpoint "
        "through run_bench.py",
    f"{PY} train_melt.py": "trains a teacher, a standard model and MELT: minutes",
    f"{PY} train_melt.py preset=ablations": "the whole post-training table: about ten minutes",
    f"{PY} train_melt.py preset=quick":
        "trains for well under a minute; tests/training/test_training.py runs this pipeline",
    f"{PY} train_melt.py variants=[melt,melt_last] melt.chunk_size=8 melt.lr_gate=1e-2":
        "trains a teacher and two MELT variants: minutes",
    f"{PY} train_melt.py preset=ablations out_dir=results/reference/training":
        "the whole post-training table, into the committed reference run: about ten minutes",
    f"{PY} run_bench.py -m experiment=decode_speed hydra.sweep.dir=results/cpu-speed/decode_speed":
        "a speed sweep of four models: a minute or more",
    f"OMP_NUM_THREADS=1 {PY} run_bench.py -m experiment=decode_speed "
    "hydra.sweep.dir=results/cpu-speed/decode_speed_1thread":
        "a speed sweep of four models: a minute or more",
    f"OMP_NUM_THREADS=1 {PY} run_bench.py -m experiment=decode_speed model=standard,ouro,melt "
    "compile=true hydra.sweep.dir=results/cpu-speed/decode_speed_1thread_compiled":
        "compiles three models' decode step with inductor: minutes",
    f"OMP_NUM_THREADS=1 {PY} run_bench.py -m experiment=capacity "
    "hydra.sweep.dir=results/cpu-speed/capacity_1thread": "a capacity search of four models: minutes",
    f"OMP_NUM_THREADS=1 {PY} run_bench.py -m experiment=capacity probe=fake size=ouro-1.4b "
    "dtype=bfloat16 seq_len=32768 budget_gb=80 model=standard,ouro,melt "
    "hydra.sweep.dir=results/cpu-speed/capacity_fake_ouro-1.4b_32k":
        "a capacity search at Ouro-1.4B shapes under the fake probe: about half an hour on one thread",
    f"{PY} run_bench.py policy=ring kv_ring=2 loops=4 seq_len=1024":
        "a point of about 15 s, past the cheap set's budget; tests/test_config.py composes "
        "every policy= choice and tests/models/test_cache_policies.py runs each design",
    f"{PY} run_bench.py -m experiment=policies": "100 points at size small: about 8 minutes on 2 cores",
    f"{PY} train_melt.py preset=depth out_dir=results/reference/quality/depth":
        "about 5 minutes on one core; tests/training/test_products_task.py runs preset=depth_quick",
    f"{PY} train_melt.py preset=text out_dir=results/reference/quality/text":
        "about 35 minutes on one core; tests/training/test_text_setting.py runs preset=text_quick",
    f"{PY} -m bench.report.frontier results/reference/policies/quality.csv results/reference/quality/quality.csv "
    "results/reference/policies/memory_ouro_1.4b --out results/reference/quality":
        "rewrites a committed folder; tests/report/test_frontier.py runs it into a temporary folder and "
        "compares the table with the committed one",
    f"{PY} train_melt.py preset=quality out_dir=results/quality":
        "about an hour on one core (results/reference/quality/from-empty); the quick presets of each "
        "teacher set run in tests/training/",
    f"{PY} -m training.corpus heldout results/stdlib_heldout.txt":
        "tests/training/test_text_setting.py writes the held-out split the same way and reads it back",
    f"{PY} train_melt.py preset=policies out_dir=results/reference/policies":
        "retrains six post-trained models into the committed run: about a quarter of an hour; "
        "tests/training/test_design_quality.py runs the quick preset",
    f"OMP_NUM_THREADS=1 {PY} run_bench.py -m experiment=policies probe=fake size=ouro-1.4b dtype=bfloat16 "
    "loops=4 seq_len=32768 repeats=0 name=policies_ouro_fake":
        "ten designs at Ouro-1.4B shapes and 32K tokens under the fake probe: about 25 minutes",
    f"{PY} -m bench.report.frontier results/reference/policies/quality.csv results/policies_ouro_fake "
    "--out results/reference/policies":
        "needs results/policies_ouro_fake from the sweep above; tests/report/test_frontier.py runs "
        "bench.report.frontier on the committed sweep",
    f"{PY} run_bench.py -m experiment=policy_quality checkpoint=ByteDance/Ouro-1.4B text=docs/models.md":
        "downloads Ouro-1.4B from the hub; tests/measure/test_scored_text.py runs the experiment on a "
        "tiny checkpoint",
    "scripts/gpu_check.sh": "needs a CUDA GPU",
    "GPU_CHECK_SMOKE=1 scripts/gpu_check.sh": "about a minute; tests/measure/test_speed_columns.py runs it",
    'GPU_CHECK_ONLY="decode_compiled capacity" GPU_CHECK_STEP_S=240 scripts/gpu_check.sh':
        "needs a CUDA GPU; tests/measure/test_speed_columns.py runs it in smoke mode",
}

SHELL_BLOCKS = {"sh", "console"}     # fenced blocks whose lines are commands (console: `$ ` prompts)
OTHER_BLOCKS = {"python", "text"}    # python: run by test_python_examples_run; text: not run
COMMAND = re.compile(r'(?:[A-Z][A-Z0-9_]*=(?:"[^"]*"|\S+)\s+)*'   # VAR=value ... before it
                     r'(?:make|python3?|\.venv/bin/python|scripts/\S+)(?:\s|$)')


# -- reading the pages ----------------------------------------------------------------------------

def fenced_blocks(path: Path):
    """(info string, first line number, lines) of each fenced code block of a Markdown page."""
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"\s*(```|~~~)(.*)$", lines[i])
        if m:
            start, fence = i, m.group(1)
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                i += 1
            yield m.group(2).strip(), start + 1, lines[start + 1:i]
        i += 1


def _join(lines: list[str]) -> list[tuple[int, str]]:
    """Lines with backslash continuations joined, each with its offset in the block."""
    out, pending, at = [], "", 0
    for k, line in enumerate(lines):
        if not pending:
            at = k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1].strip() + " "
            continue
        out.append((at, pending + line.strip()))
        pending = ""
    return out


def _strip_comment(command: str) -> str:
    return re.split(r"\s+#", command, maxsplit=1)[0].strip()


def shown_commands():
    """Every shell command shown in the pages: (command, output shown after it or None, where)."""
    found = []
    for path in PAGES:
        rel = path.relative_to(ROOT)
        for info, first, lines in fenced_blocks(path):
            if info in OTHER_BLOCKS:
                continue
            assert info in SHELL_BLOCKS, \
                f"{rel}:{first}: a code block needs a language: sh, console, python or text"
            if info == "console":
                current = None
                for line in lines:
                    if line.startswith("$ "):
                        current = [_strip_comment(line[2:]), [], f"{rel}:{first}"]
                        found.append(current)
                    else:
                        assert current is not None, f"{rel}:{first}: console block without a $ prompt"
                        current[1].append(line)
                continue
            for offset, line in _join(lines):
                command = _strip_comment(line)
                if not command:
                    continue
                assert COMMAND.match(command), \
                    f"{rel}:{first + offset + 1}: {command!r}: not a command this test can classify"
                found.append([command, None, f"{rel}:{first + offset + 1}"])
    return [(c, "\n".join(out).strip() if out is not None else None, where) for c, out, where in found]


# -- the pages ------------------------------------------------------------------------------------

def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 10 * 1024


def test_every_docs_page_says_what_it_is_for_and_is_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    assert "docs/README.md" in (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        title, blank, opening = page.read_text().split("\n")[:3]
        assert title.startswith("# ") and not blank and opening[:1].isalpha(), \
            f"{page.name}: starts with a title, then a sentence on what the page is for"
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, \
                    f"{page.relative_to(ROOT)}: link to {target}: no such heading"


def test_every_column_is_documented():
    text = (ROOT / "docs" / "columns.md").read_text()
    assert [c for c in COLUMNS if f"`{c}`" not in text] == []


HISTORY = re.compile(r"\bissues? #?[0-9]+\b|\breview[ ]fix", re.I)


def test_code_comments_and_pages_carry_no_history():
    """History (which issue added what, review rounds) belongs in git, not in the files."""
    skip = {".git", ".venv", "results", "outputs", "multirun", "__pycache__"}
    files = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
             and (p.suffix in {".py", ".yaml", ".yml", ".sh", ".toml"} or p.name == "Makefile"
                  or p.relative_to(ROOT).parts[0] == ".ci")]
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
            for p in files + PAGES for n, line in enumerate(p.read_text().split("\n"), 1)
            if HISTORY.search(line)]
    assert hits == []


# -- quoted figures -------------------------------------------------------------------------------

def test_quoted_figures_equal_their_sources():
    problems = quotes.check(PAGES)
    assert problems == [], "\n".join(map(str, problems)) + "\n(python -m bench.report.quotes write fixes drift)"


def test_every_quote_is_used_and_well_formed():
    used = set()
    for page in PAGES:
        found, bad = quotes.regions(page.read_text(), str(page))
        assert bad == []
        used |= {r.name for r in found}
    assert used == set(QUOTES)
    for name, quote in QUOTES.items():
        assert quotes.NAME.fullmatch(name)
        assert all((ROOT / source).is_file() for source in quote.sources), name


def test_a_drifted_figure_is_reported_and_rewritten(tmp_path):
    right = QUOTES["training.melt_of_teacher"].make(ROOT)
    table = QUOTES["cpu.headline"].make(ROOT)
    ratio = table.splitlines()[2].split("|")[-2].strip()  # MELT / LoopLM at one loop, e.g. 1.047
    drifted = table.replace(f"| {ratio} |", "| 0.78 |", 1)
    assert drifted != table
    page = tmp_path / "page.md"
    page.write_text("MELT keeps <!--q:training.melt_of_teacher-->0.5<!--/q--> of it.\n\n"
                    "<!--q:cpu.headline-->\n\n" + drifted + "\n\n<!--/q-->\n")
    problems = quotes.check([page])
    assert [(p.line, p.name) for p in problems] == [(1, "training.melt_of_teacher"), (3, "cpu.headline")]
    assert "written '0.5'" in problems[0].message and f"computed {right!r}" in problems[0].message
    assert "0.78" in problems[1].message and ratio in problems[1].message
    assert quotes.main(["check", str(page)]) == 1
    assert quotes.write([page]) == [page]
    assert quotes.check([page]) == []
    assert f"<!--q:training.melt_of_teacher-->{right}<!--/q-->" in page.read_text()
    assert quotes.main(["check", str(page)]) == 0
    assert quotes.main(["check", str(tmp_path / "missing.md")]) == 2


def test_malformed_markers_are_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("a <!--q:cpu.nothing-->1<!--/q-->\n"             # unknown name
                    "b <!--q:cpu.headline-->1<!--/q-->\n"            # a table inline
                    "c <!--/q-->\n"                                  # closing without opening
                    "d <!-- q:cpu.headline -->\n"                    # spaces
                    "e `<!--q:shown.in.code-->` is an example\n"     # not a marker
                    "f <!--q:training.melt_of_teacher-->0.992\n")    # never closed
    problems = {(p.line, p.name): p.message for p in quotes.check([page])}
    assert set(problems) == {(1, "cpu.nothing"), (2, "cpu.headline"), (3, "/q"),
                             (4, "q:cpu.headline"), (6, "training.melt_of_teacher")}
    assert "unknown quote name" in problems[(1, "cpu.nothing")]
    assert "lines of their own" in problems[(2, "cpu.headline")]
    before = page.read_text()
    quotes.write([page])
    assert page.read_text() == before  # nothing it cannot place is rewritten


# -- commands -------------------------------------------------------------------------------------

def test_every_command_is_classified():
    shown = {command for command, _, _ in shown_commands()}
    unclassified = sorted(shown - set(CHEAP) - set(EXPENSIVE))
    assert unclassified == [], "add each to CHEAP (run here) or EXPENSIVE (with the reason) in this file"
    assert not set(CHEAP) & set(EXPENSIVE)
    assert sorted(set(CHEAP) - shown) == [] and sorted(set(EXPENSIVE) - shown) == [], "no longer shown"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the repository as a fresh clone has it after `make install`, whose outputs go to
    a temporary folder: the code, conf/ and pages copied, results/reference/ linked (read only),
    and .venv/bin/python running this interpreter."""
    dst = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns(".git", ".venv", "results", "outputs", "multirun", "__pycache__",
                                    ".pytest_cache", "*.egg-info")
    shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)
    (dst / "results").mkdir()
    shutil.copy(ROOT / "results" / "README.md", dst / "results" / "README.md")
    (dst / "results" / "reference").symlink_to(ROOT / "results" / "reference")
    python = dst / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return dst


@pytest.fixture(scope="module")
def cheap_runs(checkout) -> dict[str, subprocess.CompletedProcess]:
    """Each CHEAP command run once in the copy, one after another, on one thread: on a shared
    machine torch's threads spin against other processes and a point takes several times as long."""
    env = {**os.environ, "PATH": f"{checkout / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)

    def run(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=checkout, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)

    return {command: run(command) for command in CHEAP}


@pytest.mark.parametrize("command", list(CHEAP), ids=lambda c: re.sub(r"\W+", "_", c[17:60]).strip("_"))
def test_cheap_command_runs_as_written(command, cheap_runs):
    proc = cheap_runs[command]
    assert proc.returncode == CHEAP[command], proc.stdout[-3000:]
    for _, output, where in (s for s in shown_commands() if s[0] == command and s[1] is not None):
        assert proc.stdout.strip() == output, f"{where} shows another output than\n{proc.stdout}"


def test_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples may write files (a checkpoint)
    blocks = [(page, first, "\n".join(lines)) for page in PAGES
              for info, first, lines in fenced_blocks(page) if info == "python"]
    assert blocks
    for page, first, code in blocks:
        exec(compile(code, f"{page.name}:{first}", "exec"), {"__name__": "__doc_example__"})
