"""The MELT paper's Table 2 beside ours: cache per token, cache at 32,000 tokens, weights, total.

The paper's figures are derived, not measured (bf16, decimal GB: 1 GB = 1e9 bytes, 1 MB = 1e6
bytes): KV at 32K = KV per token x 32,000. Ours come from the models' exact byte counts in each
row (kv_bytes_per_token, weights_bytes), with total = weights + KV; the paper's totals are 0.04 to
0.07 GB below the sum of its own columns (MELT: 3.272 + 6.29 = 9.56, printed 9.49), so they are
shown beside ours, not reproduced. Then what the paper does not give: the peak our probe measured or estimated for a prefill of 32,000 tokens and a few decode
steps (`fake` on a CPU, `cuda` on a GPU).

    python run_bench.py -m experiment=paper_table2        # writes results/paper_table2/report.md
"""

from __future__ import annotations

import pandas as pd

# (label, model, size, loops) -> the paper's (KV per token MB, KV at 32K GB, weights GB, total GB)
PAPER_TABLE2 = {
    ("MELT-1.6B", "melt", "ouro-1.4b", 4): (0.197, 6.29, 3.272, 9.49),
    ("Ouro-1.4B-Thinking", "ouro", "ouro-1.4b", 4): (0.786, 25.17, 2.869, 27.97),
    ("Qwen3-1.7B", "standard", "qwen3-1.7b", 1): (0.115, 3.67, 3.442, 7.07),
}
TOKENS = 32_000


def table2(df: pd.DataFrame) -> pd.DataFrame:
    """One row per Table 2 model found among `df`'s ok bfloat16 rows at 32,000 tokens, batch 1 (the
    first such row of each; a sweep has one): the paper's
    columns and ours side by side (decimal MB / GB). Empty when none is there."""
    ok = df[(df.status == "ok") & (df.dtype == "bfloat16") & (df.seq_len == TOKENS) & (df.batch == 1)]
    rows = []
    for (label, model, size, loops), paper in PAPER_TABLE2.items():
        match = ok[(ok.model == model) & (ok["size"] == size) & (ok.loops == loops)]
        if match.empty:
            continue
        r = match.iloc[0]
        kv = r.kv_bytes_per_token * TOKENS
        ours = (r.kv_bytes_per_token / 1e6, kv / 1e9, r.weights_bytes / 1e9,
                (r.weights_bytes + kv) / 1e9)
        rows.append({"model": label,
                     "KV/token MB paper": paper[0], "KV/token MB ours": ours[0],
                     "KV 32K GB paper": paper[1], "KV 32K GB ours": ours[1],
                     "weights GB paper": paper[2], "weights GB ours": ours[2],
                     "total GB paper": paper[3], "total GB ours": ours[3],
                     "our peak GB": r.peak_bytes / 1e9, "probe": r.probe})
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame) -> list[str]:
    """The report.md section for a non-empty table2()."""
    return ["## Paper Table 2 (bf16, 32,000 tokens, decimal units)", "",
            "Paper figures are derived: KV = per-token KV x 32,000. Ours are the models' exact byte"
            " counts, total = weights + KV (the paper's totals are 0.04-0.07 GB below the sum of its"
            " own columns). `our peak` is what the probe saw over a 32,000-token prefill and the"
            " decode after it, activations included.", "",
            table.to_markdown(index=False, floatfmt=".3f"), ""]
