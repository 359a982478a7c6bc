"""The structural guards: what must hold between rows whatever the sizes (MELT flat in loops,
MELT at one loop = the standard model plus its gates, each cache's bytes = its formula x the
standard model's). Each guard a ceilings file switches on runs over the rows it applies to."""

from __future__ import annotations

import pandas as pd

from ..rows.schema import IDENTITY
from .findings import LIMITED, Finding, norm, point_name

GUARDS = {"melt_flat_in_loops": "MELT peak flat in loops",
          "melt_one_loop_is_standard": "MELT at one loop = standard + its gates",
          "ouro_kv_is_loops_x_standard": "LoopLM KV = loops x standard",
          "melt_kv_is_standard": "MELT KV = standard",
          "policy_kv_is_formula": "cache policies' KV = their formula x standard",
          "policy_flat_in_loops": "cache policies' peaks flat where their cache is"}


TOLERANCES = ("melt_flat_in_loops", "policy_flat_in_loops")  # guards set by a tolerance, the others by true


NEEDS = {"melt_flat_in_loops": "a MELT setting measured at two depths above 1",
         "melt_one_loop_is_standard": "a MELT row at loops 1 and a standard row of the same setting, chunked prefill",
         "policy_kv_is_formula": "a LoopLM or LoopCoder row and a standard row of the same setting",
         "policy_flat_in_loops": "a LoopLM setting measured at two depths with the same cache size",
         "ouro_kv_is_loops_x_standard": "a LoopLM row and a standard row of the same setting",
         "melt_kv_is_standard": "a MELT row and a standard row of the same setting"}


def check_guards(df: pd.DataFrame, guards: dict) -> list[Finding]:
    """The structural guards switched on in `guards`. One that finds nothing to compare fails: a
    guard must not pass by having no rows."""
    ok = df[df.status == "ok"]
    findings = []
    for name, setting in guards.items():
        if setting is False:
            continue
        if name == "melt_flat_in_loops":
            found = _melt_flat(ok, float(setting))
        elif name == "melt_one_loop_is_standard":
            found = _melt_one_loop(ok)
        elif name == "policy_kv_is_formula":
            found = _policy_kv(ok)
        elif name == "policy_flat_in_loops":
            found = _policy_flat(ok, float(setting))
        elif name == "ouro_kv_is_loops_x_standard":  # the per-loop LoopLM (Ouro's own cache)
            per_loop = ok[(ok.model != "ouro") | ok.kv_sharing.isna() | (ok.kv_sharing == "per_loop")]
            found = _kv_vs_standard(per_loop, "ouro", lambda loops: loops, name)
        else:
            found = _kv_vs_standard(ok, "melt", lambda loops: 1, name)
        findings += found or [Finding(name, "-", False, f"nothing to compare: the results need {NEEDS[name]} "
                                                        f"(or set {name}: false)")]
    return findings



def _melt_flat(ok: pd.DataFrame, tolerance: float) -> list[Finding]:
    """Per MELT setting: the peak at every depth <= the peak at its smallest depth above 1 x
    (1 + tolerance). (With one loop MELT keeps no latent: it is the standard model plus its gates,
    the guard melt_one_loop_is_standard.)"""
    melt = ok[(ok.model == "melt") & (ok.loops > 1)]
    others = [c for c in IDENTITY if c != "loops"]
    findings = []
    for _, group in melt.groupby(others, dropna=False):
        findings += _flat(group, LIMITED, "melt_flat_in_loops", tolerance)
    return findings


def _flat(group: pd.DataFrame, columns: list[str], guard: str, tolerance: float, why: str = "") -> list[Finding]:
    """Every row of `group` (one setting at several depths) deeper than its shallowest: each of
    `columns` within `tolerance` of the shallowest row's."""
    if len(group) < 2:
        return []
    base = group.loc[group.loops.idxmin()]
    findings = []
    for column in columns:
        for r in group[group.loops > base.loops].to_dict("records"):
            if pd.isna(r[column]) or pd.isna(base[column]):
                continue
            ratio = r[column] / base[column]
            findings.append(Finding(
                guard, point_name(r), ratio <= 1 + tolerance,
                f"{column} {int(r[column]):,} B = {ratio:.4f} x loops={int(base.loops)} "
                f"({int(base[column]):,} B){why}; allowed <= {1 + tolerance:g}"))
    return findings


SAME_SETTING = ["size", "seq_len", "batch", "new_tokens", "scenario", "dtype", "device", "probe"]


def _melt_one_loop(ok: pd.DataFrame) -> list[Finding]:
    """Per MELT row at loops 1 with a standard row of the same setting, both prefilled in the same
    chunks: its peaks exceed the standard model's by exactly its extra weights (the gates)."""
    key = SAME_SETTING + ["prefill", "chunk_size"]
    chunked = ok[ok.prefill == "chunked"]
    standard = {tuple(norm(r[c]) for c in key): r for r in chunked[chunked.model == "standard"].to_dict("records")}
    findings = []
    for r in chunked[(chunked.model == "melt") & (chunked.loops == 1)].to_dict("records"):
        s = standard.get(tuple(norm(r[c]) for c in key))
        if s is None:
            continue
        gates = int(r["weights_bytes"]) - int(s["weights_bytes"])
        for column in LIMITED:
            if pd.isna(r[column]) or pd.isna(s[column]):
                continue
            extra = int(r[column]) - int(s[column])
            findings.append(Finding("melt_one_loop_is_standard", point_name(r), extra == gates,
                                    f"{column} {int(r[column]):,} B - standard {int(s[column]):,} B = "
                                    f"{extra:,} B; MELT's extra weights {gates:,} B"))
    return findings


def _policy_kv(ok: pd.DataFrame) -> list[Finding]:
    """Per LoopLM (any cache policy) or LoopCoder row with a standard row of the same setting: its
    cache as allocated, and after the prefill, is the policy's formula times the standard model's
    (cache-policies.md): groups x standard for the LoopLM, standard plus (T - 1) windows of
    min(W, L) rows for LoopCoder."""
    from models.cache_policies import POLICIES

    standard = {tuple(norm(r[c]) for c in SAME_SETTING): r for r in ok[ok.model == "standard"].to_dict("records")}
    findings = []
    for r in ok[ok.model.isin(["ouro", "loopcoder"])].to_dict("records"):
        s = standard.get(tuple(norm(r[c]) for c in SAME_SETTING))
        if s is None or pd.isna(r["kv_bytes_measured"]) or pd.isna(s["kv_bytes_measured"]):
            continue
        base, loops = int(s["kv_bytes_measured"]), int(r["loops"])
        if r["model"] == "ouro":
            policy = POLICIES[norm(r["kv_sharing"]) or "per_loop"]
            sizes = (loops, int(norm(r["kv_ring"]) or 1), int(norm(r["kv_anchor"]) or 1))
            want, want_decode = base * policy.groups(*sizes), base * policy.decode_groups(*sizes)
            how = f"{policy.groups(*sizes)} / {policy.decode_groups(*sizes)} x standard"
        else:
            length = int(r["seq_len"]) + int(r["new_tokens"])
            want = want_decode = base + (loops - 1) * base * min(int(r["kv_window"]), length) // length
            how = f"standard + {loops - 1} windows of {min(int(r['kv_window']), length)} rows"
        got, got_decode = int(r["kv_bytes_measured"]), r.get("kv_decode_bytes_analytic")
        ok_decode = got_decode is None or pd.isna(got_decode) or int(got_decode) == want_decode
        findings.append(Finding("policy_kv_is_formula", point_name(r),
                                got == want and ok_decode,
                                f"KV {got:,} B (after the prefill {norm(got_decode)}), want {want:,} / {want_decode:,} B = {how}"))
    return findings


def _policy_flat(ok: pd.DataFrame, tolerance: float) -> list[Finding]:
    """Per LoopLM setting (policy and sizes): at every depth whose cache is the size it is at the
    smallest such depth, the peak stays within tolerance of that depth's: peak_bytes where the
    allocated cache is equal, peak_decode_bytes where the cache after the prefill is."""
    looped = ok[ok.model == "ouro"]
    others = [c for c in IDENTITY if c != "loops"]
    findings = []
    for _, group in looped.groupby(others, dropna=False):
        for column, sizes in (("peak_bytes", ["kv_bytes_analytic", "kv_decode_bytes_analytic"]),
                              ("peak_decode_bytes", ["kv_decode_bytes_analytic"])):
            for _, same in group.groupby(sizes):   # rows without the sizes (older tables) are not compared
                findings += _flat(same, [column], "policy_flat_in_loops", tolerance, ", same cache")
    return findings


def _kv_vs_standard(ok: pd.DataFrame, model: str, factor, name: str) -> list[Finding]:
    """Per `model` row with a standard row of the same setting: KV bytes == factor(loops) x its."""
    same = SAME_SETTING
    standard = {tuple(norm(r[c]) for c in same): r for r in ok[ok.model == "standard"].to_dict("records")}
    findings = []
    for r in ok[ok.model == model].to_dict("records"):
        s = standard.get(tuple(norm(r[c]) for c in same))
        if s is None or pd.isna(r["kv_bytes_measured"]) or pd.isna(s["kv_bytes_measured"]):
            continue
        want = factor(int(r["loops"])) * int(s["kv_bytes_measured"])
        got = int(r["kv_bytes_measured"])
        findings.append(Finding(name, point_name(r), got == want,
                                f"KV {got:,} B, standard {int(s['kv_bytes_measured']):,} B x "
                                f"{factor(int(r['loops']))} = {want:,} B"))
    return findings
