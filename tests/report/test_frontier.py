"""bench.report.frontier on the committed policies run: every design's quality beside its memory at
Ouro-1.4B, the frontier, and the label layout of the plot."""

from pathlib import Path

import pandas as pd
import pytest

from bench.report import frontier
from bench.rows.files import load_rows

REF = Path(__file__).resolve().parents[2] / "results" / "reference" / "policies"


@pytest.fixture(scope="module")
def joined():
    return frontier.table(pd.read_csv(REF / "quality.csv"), load_rows(REF / "memory_ouro_1.4b"))


def test_every_quality_row_has_its_memory_at_ouro_1_4b(joined):
    assert len(joined) == len(pd.read_csv(REF / "quality.csv"))
    assert joined.ouro_kv_per_token_decode.notna().all() and joined.ouro_decode_peak_gb.notna().all()
    per_token = joined.drop_duplicates("policy").set_index("policy").ouro_kv_per_token_decode
    # Ouro-1.4B, 4 loops: the per-loop cache is 4 standard caches, a ring of 2 slots is 2.
    assert per_token["per_loop"] == 4 * per_token["standard"]
    assert per_token["ring"] == 2 * per_token["standard"]
    assert per_token["last_loop"] == per_token["melt"] == per_token["standard"]


def test_the_design_is_named_at_the_tasks_sizes_and_memory_settings_are_listed(joined):
    loopcoder = joined[joined.policy == "loopcoder"]
    assert set(loopcoder.design) == {"LoopCoder (W=8)"} and set(loopcoder.ouro_design) == {"LoopCoder (W=64)"}
    text = frontier.markdown(joined)
    assert "there LoopCoder (W=64)" in text and "| training" in text


def test_frontier_keeps_the_points_nothing_beats_on_both():
    points = pd.DataFrame({"x": [1, 1, 2, 3, 4], "y": [0.2, 0.5, 0.4, 0.9, 0.9]})
    assert frontier.frontier(points, "x", "y")[["x", "y"]].values.tolist() == [[1, 0.5], [3, 0.9]]


@pytest.mark.parametrize("ys", [[0.0, 0.0, 0.01, 0.4], [0.9, 1.0, 1.0, 1.0, 1.0], [0.5]])
def test_label_heights_keep_order_and_gap_within_the_axes(ys):
    heights = frontier._spread(ys, gap=0.06)
    assert all(b - a >= 0.06 - 1e-12 for a, b in zip(heights, heights[1:]))
    assert -0.04 <= min(heights) and max(heights) <= 1.08
    if len(ys) == 1:
        assert heights == ys


def test_main_writes_table_and_frontier(tmp_path):
    assert frontier.main([str(REF / "quality.csv"), str(REF / "memory_ouro_1.4b"), "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"table.csv", "table.md", "frontier.png"}
    assert (tmp_path / "table.md").read_text() == frontier.markdown(pd.read_csv(tmp_path / "table.csv"))


QUALITY = REF.parent / "quality"


def test_several_quality_tables_are_joined_one_panel_per_teacher_set(tmp_path):
    args = [str(REF / "quality.csv"), str(QUALITY / "quality.csv"), str(REF / "memory_ouro_1.4b"), "--out", str(tmp_path)]
    assert frontier.main(args) == 0
    joined = pd.read_csv(tmp_path / "table.csv")
    assert list(dict.fromkeys(joined.teacher)) == ["ouro", "last_exit", "depth", "text"]
    assert len(joined) == len(pd.read_csv(REF / "quality.csv")) + len(pd.read_csv(QUALITY / "quality.csv"))
    # The README's designs table reads the committed join; it must be this one.
    committed = pd.read_csv(QUALITY / "table.csv")
    pd.testing.assert_frame_equal(joined, committed)


def test_a_teacher_set_in_two_tables_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        frontier.main([str(REF / "quality.csv"), str(REF / "quality.csv"), str(REF / "memory_ouro_1.4b"),
                       "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "teacher set 'ouro' is in both" in err and "allowed: each teacher set in one QUALITY_CSV" in err
    assert not any(tmp_path.iterdir())
