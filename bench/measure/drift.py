"""How far a LoopLM's K/V move from loop to loop: why a cache policy that keeps one loop's K/V
(last_loop, first_loop) or their mean survives zero-shot, or does not.

    kv_drift(model, ids) -> a table: per layer and loop, cosine similarity and relative distance of
                            that loop's keys and values to the last loop's and to loop 0's

The prompt is prefilled once with per-loop K/V (every loop's rows kept), whatever the model's own
policy; the numbers are means over the batch and the prompt's tokens, per KV head row
([H_kv * D] vectors). Relative distance: ||x - ref|| / ||ref||.
"""

from __future__ import annotations

import copy

import pandas as pd
import torch


def _similarity(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """x, ref [B, H_kv, L, D] -> (mean cosine similarity, mean relative distance) over B and L."""
    a = x.float().permute(0, 2, 1, 3).flatten(2)                               # [B, L, H_kv * D]
    b = ref.float().permute(0, 2, 1, 3).flatten(2)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    relative = (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)
    return cosine.mean().item(), relative.mean().item()


@torch.inference_mode()
def kv_drift(model, ids: torch.Tensor, chunk_size: int | None = None) -> pd.DataFrame:
    """Rows: layer, loop, kind (keys | values), cos_vs_last, rel_vs_last, cos_vs_first, rel_vs_first."""
    from models import OuroLM, build_from_config

    if not isinstance(model, OuroLM):
        raise ValueError(f"model: {type(model).__name__} has no per-loop K/V; allowed: a LoopLM (ouro)")
    config = copy.deepcopy(model.config)
    config.kv_sharing, config.exit_policy = "per_loop", "last"
    per_loop = build_from_config(config, dtype=model.dtype, device=model.device, init=False)
    per_loop.load_state_dict(model.state_dict())
    batch, length = ids.shape
    cache = per_loop.new_cache(batch, length)
    per_loop.prefill(ids, cache, chunk_size)
    N, T = config.num_hidden_layers, config.loops
    rows = []
    for layer in range(N):
        for kind, buffers in (("keys", cache.keys), ("values", cache.values)):
            first, last = buffers[layer], buffers[(T - 1) * N + layer]
            for loop in range(T):
                x = buffers[loop * N + layer]
                cos_last, rel_last = _similarity(x, last)
                cos_first, rel_first = _similarity(x, first)
                rows.append(dict(layer=layer, loop=loop, kind=kind, cos_vs_last=cos_last, rel_vs_last=rel_last,
                                 cos_vs_first=cos_first, rel_vs_first=rel_first))
    return pd.DataFrame(rows)
