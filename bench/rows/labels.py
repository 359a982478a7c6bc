"""What to call a row's cache design: its `policy` column (models.cache_policies.policy_name: the
LoopLM's kv_sharing, else the model) and the sizes that tell two settings of a design apart."""

from __future__ import annotations

import pandas as pd

LABELS = {"standard": "standard", "per_loop": "LoopLM (Ouro)", "last_loop": "LoopLM last_loop",
          "first_loop": "LoopLM first_loop", "mean_loops": "LoopLM mean_loops", "ring": "LoopLM ring",
          "anchor": "LoopLM anchor", "first_writes": "LoopLM first_writes", "melt": "MELT",
          "loopcoder": "LoopCoder", "hf_llama": "HF Llama (peer)"}
# Where a design that is not one of the LoopLM's cache policies comes from (those carry their own).
SOURCES = {"standard": "the layers once", "melt": "MELT (arXiv 2605.07721)",
           "loopcoder": "IQuest-Coder Loop / PLT (arXiv 2510.24824)", "hf_llama": "transformers' Llama"}
SIZES = {"ring": ("kv_ring",), "anchor": ("kv_anchor", "kv_ring"), "loopcoder": ("kv_window",)}  # shown in labels
SIZE_NAMES = {"kv_ring": "K", "kv_anchor": "A", "kv_window": "W"}


def design_label(row) -> str:
    """'LoopLM ring (K=2)', 'LoopCoder (W=64)', 'MELT', ...: a row's cache design and its sizes."""
    policy = row["policy"]
    sizes = [f"{SIZE_NAMES[k]}={int(row[k])}" for k in SIZES.get(policy, ()) if pd.notna(row.get(k))]
    return LABELS.get(policy, policy) + (f" ({', '.join(sizes)})" if sizes else "")


def policy_of_label(label: str) -> str:
    """The `policy` a design_label() starts with (the label itself when none does)."""
    return next((p for p, name in LABELS.items() if label.startswith(name)), label)
