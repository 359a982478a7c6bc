"""Figures that the README and docs/ quote from committed results, kept equal to their sources.

In Markdown a quoted figure sits between two HTML comments, which render invisibly:

    MELT keeps <!--q:training.melt_of_teacher-->0.992<!--/q--> of the teacher's accuracy

and a generated table between markers on lines of their own (blank lines around the table):

    <!--q:cpu.headline-->

    | loops | ... |

    <!--/q-->

Each name in QUOTES maps to a function that reads a committed result file and returns the exact
text, so a figure in the docs is either what the file says or a reported drift.

    python -m bench.report.quotes check [FILE ...]   # exit 1, listing each quote that differs from its source
    python -m bench.report.quotes write [FILE ...]   # rewrite every marked region from the results
    python -m bench.report.quotes list               # the names and the files they read

FILE defaults to README.md, docs/*.md and results/README.md. Exit status: 0 all equal, 1 a drift,
an unknown name or a malformed marker, 2 bad input (one line on stderr).

    sources.py   each quote's name, the result files it reads and the text it makes from them
    designs.py   the cache designs' quotes (memory and quality per design, drift, the depth sweep)
    read.py      where the committed results are, reading them, a Markdown table
    markers.py   finding the marked regions in Markdown, checking and rewriting them; the command

May import: bench.rows.
"""
