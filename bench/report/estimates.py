"""How close the CPU-side estimates come to a GPU: the fake probe's peaks and the analytic memory
model's predictions against the measured peaks of the same points (on a GPU, the CUDA caching
allocator's torch.cuda.max_memory_allocated).

    python -m bench.report.estimates MEASURED_RESULTS FAKE_RESULTS [--out DIR]

MEASURED_RESULTS' rows of any probe but fake (cuda on a GPU; tracked in the CPU smoke run of
scripts/gpu_check.sh) are matched with FAKE_RESULTS' fake rows on model, size, loops, seq_len,
batch, new_tokens, scenario, dtype and prefill schedule. Writes estimate_vs_cuda.csv and .md to DIR (default
MEASURED_RESULTS) and prints the table; error = estimate / measured - 1. scripts/gpu_check.sh runs
it for Ouro-1.4B at 4K, 16K and 32K tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from ..rows.files import atomic_file, load_rows

MATCH = ["model", "size", "loops", "seq_len", "batch", "new_tokens", "scenario", "dtype", "prefill", "chunk_size"]
PHASES = {"prefill": ("peak_prefill_bytes", "predicted_prefill_bytes"),
          "decode": ("peak_decode_bytes", "predicted_decode_bytes")}


def compare(measured: pd.DataFrame, fake: pd.DataFrame) -> pd.DataFrame:
    """One row per (point, phase) measured ok by both: measured, fake and predicted GB, errors in %."""
    measured = measured[(measured.probe != "fake") & (measured.status == "ok")]
    fake = fake[(fake.probe == "fake") & (fake.status == "ok")]
    both = measured.merge(fake, on=MATCH, suffixes=("", "_fake"))
    rows = []
    for r in both.to_dict("records"):
        for phase, (peak, predicted) in PHASES.items():
            if pd.isna(r[peak]):
                continue
            rows.append({**{k: r[k] for k in ("model", "size", "loops", "seq_len", "batch")},
                         "phase": phase, "probe": r["probe"], "measured GB": r[peak] / 1e9,
                         "fake GB": r[peak + "_fake"] / 1e9, "predicted GB": r[predicted] / 1e9,
                         "fake error %": 100 * (r[peak + "_fake"] / r[peak] - 1),
                         "predicted error %": 100 * (r[predicted] / r[peak] - 1)})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report.estimates", description=__doc__.split("\n")[0])
    parser.add_argument("measured", help="results folder measured with probe=cuda (or tracked)")
    parser.add_argument("fake", help="results folder of the same points with probe=fake")
    parser.add_argument("--out", help="where to write (default: the measured folder)")
    args = parser.parse_args(argv)
    table = compare(load_rows(args.measured), load_rows(args.fake))
    if table.empty:
        print(f"{parser.prog}: error: no point measured ok by both {args.measured} (not fake) and "
              f"{args.fake} (fake)", file=sys.stderr)
        return 2
    out = Path(args.out or args.measured)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "estimate_vs_cuda.csv") as tmp:
        table.to_csv(tmp, index=False)
    text = table.to_markdown(index=False, floatfmt=".3f")
    worst = table[["fake error %", "predicted error %"]].abs().max()
    summary = (f"\nmax |error|: fake {worst['fake error %']:.2f} %, predicted "
               f"{worst['predicted error %']:.2f} % (target: 5 %)\n")
    with atomic_file(out / "estimate_vs_cuda.md") as tmp:
        tmp.write_text("# Fake probe and memory model vs the measured peak\n\n" + text + "\n" + summary)
    print(text + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
