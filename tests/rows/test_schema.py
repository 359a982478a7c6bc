"""The row schema is the format every part agrees on, and reading it needs no torch."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

from bench.rows.schema import COLUMNS, IDENTITY, MODEL_OPTION_COLUMNS


def test_the_option_columns_are_the_models_options_in_their_order():
    from models import MODEL_OPTIONS

    assert MODEL_OPTION_COLUMNS == list(MODEL_OPTIONS)


def test_every_identity_column_is_a_setting_and_no_column_is_repeated():
    from bench.config import BenchConfig

    assert set(IDENTITY) <= set(BenchConfig.__dataclass_fields__)
    assert len(COLUMNS) == len(set(COLUMNS))


def test_rows_reports_and_the_gate_load_without_torch():
    """python -m bench.gate and python -m bench.report read results; a bad input should cost them
    a fraction of a second, not torch's import."""
    code = ("import sys; import bench.rows.files, bench.report.build, bench.gate.cli, bench.report.quotes.markers; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
