"""How close a run is to the machine's limits, for the speed columns of a row.

A decode step must at least read every weight it applies (the layers once per loop, the output
head once) and every K/V row it attends to (one slot per layer per loop, over the context), for the
whole batch; its matrix products need 2 flops per weight per sequence plus the attention products.
Each term over the machine's measured limit (env.copy_bytes_per_s, env.matmul_flops_per_s) is a
lower bound on the step's time; the largest one names what bounds the row:
  weights: reading the weights (batch 1, short context)
  kv:      reading the KV cache (long context, large batch; the LoopLM and MELT alike: every loop
           reads every past token's K/V, MELT just keeps one slot instead of T)
  compute: the matrix products (prefill; very large batches)
bandwidth_utilization = decode bytes per step x steps/s / copy_bytes_per_s; prefill_utilization =
prefill flops x prefills/s / matmul_flops_per_s.
"""

from __future__ import annotations

from ..config import BenchConfig


def _dims(model):
    c = model.config
    itemsize = model.dtype.itemsize
    table = c.vocab_size * c.hidden_size * itemsize                 # embedding or output head
    layer_bytes = model.weights_bytes() - (table if c.tie_word_embeddings else 2 * table)
    # K/V bytes one token adds to one slot (one layer, one loop)
    kv_row = 2 * c.num_key_value_heads * c.head_dim * itemsize
    # attention products per query token per key row, per layer: q.k and p.v over all heads
    attn_flops = 4 * c.num_attention_heads * c.head_dim
    return c, itemsize, table, layer_bytes, kv_row, attn_flops


def decode_terms(model, p: BenchConfig) -> dict:
    """Work of one decode step: bytes of weights and of KV read, and flops (mean context). The KV
    term counts the rows a step must attend (its context); the masked fast step reads the whole
    preallocated buffer (seq_len + new_tokens rows), at most new_tokens / 2 rows more."""
    c, itemsize, table, layer_bytes, kv_row, attn_flops = _dims(model)
    context = p.seq_len + (p.new_tokens - 1) / 2                    # mean past tokens attended
    N, T, B = c.num_hidden_layers, c.loops, p.batch
    return {
        "weights": T * layer_bytes + table,
        "kv": T * N * kv_row * context * B,
        "flops": 2 * B * (T * layer_bytes + table) / itemsize + T * N * B * context * attn_flops,
    }


def prefill_terms(model, p: BenchConfig) -> dict:
    """Work of the prefill: weights read once per loop (per chunk for MELT), K/V written, flops
    of the products over every prompt token (causal attention: half the score matrix)."""
    c, itemsize, table, layer_bytes, kv_row, attn_flops = _dims(model)
    N, T, B, S = c.num_hidden_layers, c.loops, p.batch, p.seq_len
    chunks = -(-S // c.chunk_size) if c.arch == "melt" else 1
    return {
        "weights": T * chunks * layer_bytes + table,
        "kv": T * N * kv_row * S * B,
        "flops": 2 * B * S * T * layer_bytes / itemsize + 2 * B * table / itemsize
                 + T * N * B * attn_flops * S * (S + 1) / 2,
    }


def bound(terms: dict, copy_bw: float, matmul: float) -> str:
    """weights | kv | compute: the term whose time at the machine's limit is largest."""
    times = {"weights": terms["weights"] / copy_bw, "kv": terms["kv"] / copy_bw,
             "compute": terms["flops"] / matmul}
    return max(times, key=times.get)


def speed_columns(model, p: BenchConfig, prefill_s: float, decode_steps_per_s: float | None,
                  copy_bw: float | None, matmul: float | None) -> dict:
    """bandwidth_utilization, decode_bound, prefill_utilization, prefill_bound of a timed row."""
    row = {}
    pre = prefill_terms(model, p)
    if matmul:
        row["prefill_utilization"] = pre["flops"] / prefill_s / matmul
    if copy_bw and matmul:
        row["prefill_bound"] = bound(pre, copy_bw, matmul)
    if decode_steps_per_s:
        dec = decode_terms(model, p)
        if copy_bw:
            row["bandwidth_utilization"] = (dec["weights"] + dec["kv"]) * decode_steps_per_s / copy_bw
        if copy_bw and matmul:
            row["decode_bound"] = bound(dec, copy_bw, matmul)
    return row
