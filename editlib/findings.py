"""The paper's claims checked against stored results, and one paragraph of findings per experiment
— computed from ``cases.parquet`` frames, never typed by hand (the report notebook shows both).

Each claim has the paper's numbers (Llama-3-8B, as printed), ours, whether it holds here, the
margin it holds by, and its spread over the data orderings when the run has several.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from .beyond import MAX_FAILED
from .metrics import alignments_in, summarize_cases, with_alignment

#: |S(MEMIT) − S(ROME)| (points) below which the two "coincide" (the paper: 0.05)
SAME_S = 1.0
#: "a batch size hurts" once S falls this many points below the smallest batch size's S
DROP = 5.0


def _current(c: pd.DataFrame) -> pd.DataFrame:
    return c[c["eval"] == "current"] if "eval" in c.columns else c


def _s(c: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return summarize_cases(_current(c), by=by)


def _orderings(c: pd.DataFrame) -> list:
    return sorted(c["ordering"].unique()) if "ordering" in c.columns else [0]


def _facts_per_ordering(c: pd.DataFrame) -> int:
    """Distinct facts of the largest ordering: case ids repeat across orderings only by chance,
    so counting them over all orderings would overstate the facts one run edits."""
    if "case_id" not in c.columns:
        return len(c)
    if "ordering" not in c.columns:
        return int(c["case_id"].nunique())
    return int(c.groupby("ordering")["case_id"].nunique().max())


def _spread(c: pd.DataFrame, stat: Callable[[pd.DataFrame], float]) -> str:
    """``stat`` per ordering as "a ± b over n orderings", or "" for one ordering. An ordering
    whose edits all failed has no value: it is left out and said so, never counted as zero."""
    o = _orderings(c)
    if len(o) < 2:
        return "n/a (one ordering)"
    v = np.array([_or_nan(stat, c[c["ordering"] == x]) for x in o], dtype=float)
    ok = v[np.isfinite(v)]
    if len(ok) < 2:
        return f"n/a (scores in {len(ok)} of {len(o)} orderings)"
    some = "" if len(ok) == len(o) else f" of {len(o)} (the others: no scores)"
    # the sample std (ddof 1), as the tables' "S over orderings" and the figures' bands
    return f"{ok.mean():.2f} ± {ok.std(ddof=1):.2f} over {len(ok)}{some} orderings"


class _NoScores(Exception):
    """A claim or finding needs S where every edit failed (no scores)."""


#: what a statistic raises on a part of the cases it cannot judge (a method, batch size, layer or
#: ordering absent from the part, or scores missing because every edit failed)
_CANNOT_JUDGE = (ValueError, KeyError, IndexError, _NoScores)


def _or_nan(stat: Callable[[pd.DataFrame], float], c: pd.DataFrame) -> float:
    """``stat(c)``, NaN where it has nothing to compute from (every edit of ``c`` failed)."""
    try:
        return float(stat(c))
    except _CANNOT_JUDGE:
        return float("nan")


def _scored(s: pd.DataFrame) -> pd.DataFrame:
    """The rows of a summary that have S (a configuration whose edits all failed has none)."""
    return s[np.isfinite(s["S"].to_numpy(dtype=float))]


def _unscored(s: pd.DataFrame, key: str, label: str) -> str:
    """", no scores at B = 8, 16 (every edit failed)" for the configurations of ``s`` without S."""
    bad = s[~np.isfinite(s["S"].to_numpy(dtype=float))]
    if bad.empty:
        return ""
    return f", no scores at {label} = {', '.join(f'{v:g}' for v in bad[key])} (every edit failed)"


def _some_failed(s: pd.DataFrame, key: str, label: str) -> str:
    """"; 3/100 edits failed at B = 64, left out of its mean" for the configurations of ``s`` where
    some but not all edits failed (those where all did: :func:`_unscored`)."""
    part = s[(s["n_failed"] > 0) & np.isfinite(s["S"].to_numpy(dtype=float))]
    if part.empty:
        return ""
    bits = ", ".join(f"{int(r['n_failed'])}/{int(r['n'])} at {label} = {r[key]:g}" for _, r in part.iterrows())
    return f"; failed edits, left out of the means: {bits}"


def _no_scores_row(claim: str, paper: str, why: str) -> dict:
    return {"claim": claim, "paper": paper, "ours": f"no scores: {why} (every edit failed; see the failure table)",
            "holds": None, "margin": "n/a", "spread": "n/a"}


#: the methods the paper's batch, sequential and λ claims are about
PAPER_METHODS = ("memit", "emmet")


def _methods(c: pd.DataFrame, only: tuple[str, ...] | None = None) -> list[str]:
    """The methods present (``only`` those), in the plots' order (MEMIT first)."""
    from .plotting import METHOD_ORDER

    have = set(c["method"]) if only is None else set(c["method"]) & set(only)
    return [m for m in METHOD_ORDER if m in have] + sorted(have - set(METHOD_ORDER))


def _fmt_s(v: float) -> str:
    return f"{v:.2f}"


# --------------------------------------------------------------------------- the claims

def _best_layer(c: pd.DataFrame, method: str = "memit") -> tuple[int, float, pd.DataFrame]:
    s = _s(c[c["method"] == method], ["layer"])
    if _scored(s).empty:
        raise _NoScores(f"{method.upper()} at every layer")
    top = s["S"].max()
    best = int(s[s["S"] == top]["layer"].min())
    return best, float(top), s


def claim_early_layer(stored: dict[str, pd.DataFrame]) -> dict | None:
    c = stored.get("layer_search")
    if c is None:
        return None
    method = "memit" if "memit" in set(c["method"]) else _methods(c)[0]
    claim, paper = ("an early layer is the best place to edit",
                    "layer 1 of 32 (0-indexed) scores best for MEMIT and ROME; Llama-2-7B too")
    try:
        best, top, s = _best_layer(c, method)
    except _NoScores as e:
        return _no_scores_row(claim, paper, str(e))
    layers, n, of = _searched(c)
    late = s[s["layer"].isin(layers[len(layers) // 2:])]  # the later half of the searched layers
    margin = top - float(late["S"].max()) if len(late) else float("nan")
    return {"claim": claim, "paper": paper,
            "ours": f"layer {best} of {of} ({method.upper()} S {_fmt_s(top)}); best of the later half "
                    f"S {_fmt_s(top - margin)}",
            "holds": best < max(1, n // 4) or best <= 1,
            "margin": f"{margin:.2f} S points over the later half",
            "spread": "best layer: " + _spread(c, lambda x: _best_layer(x, method)[0])}


def claim_rome_memit(stored: dict[str, pd.DataFrame]) -> dict | None:
    c = stored.get("singular")
    if c is None or not {"rome", "memit"} <= set(c["method"]):
        return None
    claim, paper = "MEMIT ≈ ROME for singular edits", "S 94.10 (MEMIT) vs 94.15 (ROME) at layer 1: ΔS −0.05"
    s = _s(c, ["method"]).set_index("method")["S"]
    d = float(s["memit"] - s["rome"])
    if not np.isfinite(d):
        return _no_scores_row(claim, paper, " and ".join(m.upper() for m in ("memit", "rome") if not np.isfinite(s[m])))

    def delta(x):
        t = _s(x, ["method"]).set_index("method")["S"]
        return float(t["memit"] - t["rome"])
    extra = ""
    ls = stored.get("layer_search")
    if ls is not None and {"rome", "memit"} <= set(ls["method"]):
        t = _s(ls, ["method", "layer"]).pivot(index="layer", columns="method", values="S")
        extra = f"; at every layer of the layer search |ΔS| ≤ {float((t['memit'] - t['rome']).abs().max()):.2f}"
    return {"claim": claim, "paper": paper,
            "ours": f"S {_fmt_s(s['memit'])} (MEMIT) vs {_fmt_s(s['rome'])} (ROME): ΔS {d:+.2f}{extra}",
            "holds": abs(d) <= SAME_S,
            "margin": f"|ΔS| {abs(d):.2f} (threshold {SAME_S:g})",
            "spread": "ΔS: " + _spread(c, delta)}


def _batch_drops(c: pd.DataFrame, method: str) -> tuple[int, int, dict[str, float]]:
    s = _s(c[c["method"] == method], ["batch_size"]).sort_values("batch_size")
    if not np.isfinite(s["S"].to_numpy(dtype=float)[[0, -1]]).all():
        raise _NoScores(f"{method.upper()} at B = " + " and ".join(
            f"{int(r['batch_size'])}" for _, r in s.iloc[[0, -1]].iterrows() if not np.isfinite(r["S"])))
    lo, hi = s.iloc[0], s.iloc[-1]
    return int(lo["batch_size"]), int(hi["batch_size"]), {
        m: float(lo[k] - hi[k]) for m, k in (("ES", "ES_mean"), ("PS", "PS_mean"), ("NS", "NS_mean"), ("S", "S"))}


def _change(drop: float) -> str:
    """A score's drop as the signed change it is: 0.38 -> "−0.38", -12.5 -> "+12.50" (a rise)."""
    return f"{-drop:+.2f}".replace("-", "−")


def claim_batch_hurts(stored: dict[str, pd.DataFrame]) -> dict | None:
    c = stored.get("batch")
    if c is None or c["batch_size"].nunique() < 2 or not _methods(c, PAPER_METHODS):
        return None
    c = c[c["method"].isin(PAPER_METHODS)]  # the claim is about the paper's methods
    claim, paper = ("bigger batches hurt, NS most",
                    "MEMIT and EMMET at B 16→4096 on layer 1: every score falls, NS the most")
    parts, holds, margins = [], True, []
    try:
        drops = {m: _batch_drops(c, m) for m in _methods(c)}
    except _NoScores as e:
        return _no_scores_row(claim, paper, str(e))
    for m in _methods(c):
        lo, hi, d = drops[m]
        worst = max(("ES", "PS", "NS"), key=lambda k: d[k])
        holds &= d["S"] > 0 and worst == "NS"
        margins.append(f"{m.upper()} S {_change(d['S'])}")
        parts.append(f"{m.upper()} B {lo}→{hi}: S {_change(d['S'])}, NS {_change(d['NS'])}, ES {_change(d['ES'])}, "
                     f"PS {_change(d['PS'])} (largest drop: {worst})")
    m0 = _methods(c)[0]
    return {"claim": claim, "paper": paper, "ours": "; ".join(parts), "holds": bool(holds), "margin": ", ".join(margins),
            "spread": f"{m0.upper()} S drop: " + _spread(c, lambda x: _batch_drops(x, m0)[2]["S"])}


def _seq_best(c: pd.DataFrame, method: str, ev: str = "current") -> tuple[int, float, int, float]:
    x = c[(c["method"] == method) & (c["eval"] == ev)] if "eval" in c.columns else c[c["method"] == method]
    s = summarize_cases(x, by=["batch_size"]).sort_values("batch_size")
    one = s.iloc[-1]  # the largest batch size: one batch of all facts (checked by the caller)
    smaller = _scored(s.iloc[:-1])
    if not np.isfinite(one["S"]) or smaller.empty:
        raise _NoScores(f"{method.upper()} " + ("in one batch" if not np.isfinite(one["S"]) else "in sequence"))
    best = smaller.loc[smaller["S"].idxmax()]
    return int(best["batch_size"]), float(best["S"]), int(one["batch_size"]), float(one["S"])


def claim_sequential(stored: dict[str, pd.DataFrame]) -> dict | None:
    c = stored.get("sequential")
    if c is None or c["batch_size"].nunique() < 2 or not _methods(c, PAPER_METHODS):
        return None
    c = c[c["method"].isin(PAPER_METHODS)]
    n_facts = _facts_per_ordering(c[c["method"] == _methods(c)[0]])
    if int(c["batch_size"].max()) < n_facts:  # no run edits all facts in one batch: nothing to compare
        return None
    claim, paper = ("sequential batches beat one big batch of the same facts",
                    "one batch of 4096 scores worst; sequential batches of 1024 score best (MEMIT and EMMET)")
    parts, holds, margins, final = [], True, [], []
    has_final = "eval" in c.columns and (c["eval"] == "final").any()
    try:
        best = {m: _seq_best(c, m) for m in _methods(c)}
        best_final = {m: _seq_best(c, m, "final") for m in _methods(c)} if has_final else {}
    except _NoScores as e:
        return _no_scores_row(claim, paper, str(e))
    for m in _methods(c):
        b, sb, one, so = best[m]
        holds &= sb > so
        margins.append(f"{m.upper()} {sb - so:+.2f}")
        parts.append(f"{m.upper()}: B = {b} in sequence S {_fmt_s(sb)} vs one batch of {one} S {_fmt_s(so)}")
        if has_final:
            fb, fsb, _, fso = best_final[m]
            final.append(f"{m.upper()} best B = {fb} S {_fmt_s(fsb)} vs one batch {_fmt_s(fso)}")
    m0 = _methods(c)[0]
    ours = "; ".join(parts) + (f". Retention on the final model: {'; '.join(final)}" if final else "")
    return {"claim": claim, "paper": paper, "ours": ours, "holds": bool(holds), "margin": "S(best sequential) − S(one batch): " + ", ".join(margins),
            "spread": f"{m0.upper()} margin: " + _spread(c, lambda x: (lambda r: r[1] - r[3])(_seq_best(x, m0)))}


#: S points within which a λ sweep is flat (the printed digit): no λ is named the best of a tie
FLAT_S = 0.01


def claim_lambda(stored: dict[str, pd.DataFrame]) -> dict | None:
    c = stored.get("sweep")
    if c is None or "lam" not in c.columns or not _methods(c, PAPER_METHODS):
        return None
    c = c[c["method"].isin(PAPER_METHODS)]
    parts = []
    for m in _methods(c):
        s = _scored(_s(c[c["method"] == m], ["lam"]))
        if s.empty:
            parts.append(f"{m.upper()}: no scores at any λ (every edit failed)")
            continue
        top = s.loc[s["S"].idxmax()]
        if len(s) > 1 and float(s["S"].max() - s["S"].min()) < FLAT_S:  # no λ is "the best" of a tie
            parts.append(f"{m.upper()}: S flat over λ ({_fmt_s(top['S'])}, every λ within {FLAT_S:g})")
            continue
        parts.append(f"{m.upper()} λ = {top['lam']:g} (S {_fmt_s(top['S'])})")
    return {"claim": "the chosen λ",
            "paper": "MEMIT λ = 5×10^4 (S 86.49 at B = 1024), EMMET λ = 0 (S 74.23)",
            "ours": "highest S: " + "; ".join(parts),
            "holds": None, "margin": "model-specific: λ scales with C0, which depends on the model and its corpus",
            "spread": f"{_methods(c)[0].upper()} best λ: " + _spread(
                c, lambda x: float(_s(x[x["method"] == _methods(c)[0]], ["lam"]).sort_values("S").iloc[-1]["lam"]))}


CLAIMS = (claim_early_layer, claim_rome_memit, claim_batch_hurts, claim_sequential, claim_lambda)


def _holds_per_ordering(claim: Callable[[dict], dict | None], stored: dict[str, pd.DataFrame],
                        orderings: list) -> list[bool | None]:
    """Whether ``claim`` holds on each ordering's cases alone; None where it cannot be judged there
    (the ordering is not in the claim's experiment, or its scores are missing)."""
    out = []
    for o in orderings:
        part = {e: c[c["ordering"] == o] if "ordering" in c.columns else c for e, c in stored.items()}
        part = {e: c for e, c in part.items() if len(c)}  # an experiment without this ordering is absent
        try:
            r = claim(part)
        except _CANNOT_JUDGE:
            r = None
        out.append(None if r is None else r["holds"])
    return out


def _holds_label(pooled: bool | None, per: list[bool | None]) -> str:
    """"yes" / "no" over the pooled cases, qualified when the orderings that could be judged
    disagree: "yes over all, in 2 of 3 orderings" (one ordering reverses it), "no over all, yes in
    1 of 3 orderings"; orderings that could not be judged are counted apart ("; n/a in 1")."""
    if pooled is None:
        return "n/a"
    word = "yes" if pooled else "no"
    judged = [bool(h) for h in per if h is not None]
    k, n = sum(judged), len(judged)
    if n < 2 or (pooled and k == n) or (not pooled and k == 0):
        return word
    na = f"; n/a in {len(per) - n}" if len(per) > n else ""
    return (f"yes over all, in {k} of {n} orderings{na}" if pooled
            else f"no over all, yes in {k} of {n} orderings{na}")


def _layer_scope(c: pd.DataFrame) -> pd.DataFrame:
    """The early-layer claim judges one method's layers (MEMIT's when present)."""
    return c[c["method"] == ("memit" if "memit" in set(c["method"]) else _methods(c)[0])]


def _ends_scope(c: pd.DataFrame) -> pd.DataFrame:
    """The batch claim compares each method's smallest and largest batch size."""
    ends = c.groupby("method")["batch_size"].transform(lambda b: b.isin([b.min(), b.max()]))
    return c[ends.astype(bool)]


#: what each claim compares: its experiment, the keys of a configuration, and which of the cases
#: (its methods, its configurations): failures elsewhere are not its concern
_SCOPE: dict[Callable, tuple[str, list[str], Callable[[pd.DataFrame], pd.DataFrame]]] = {
    claim_early_layer: ("layer_search", ["method", "layer"], _layer_scope),
    claim_rome_memit: ("singular", ["method"], lambda c: c[c["method"].isin(("rome", "memit"))]),
    claim_batch_hurts: ("batch", ["method", "batch_size"], lambda c: _ends_scope(c[c["method"].isin(PAPER_METHODS)])),
    claim_sequential: ("sequential", ["method", "batch_size"], lambda c: c[c["method"].isin(PAPER_METHODS)]),
    claim_lambda: ("sweep", ["method", "lam"], lambda c: c[c["method"].isin(PAPER_METHODS)])}
#: how a configuration key is named in a note
_KEY_LABEL = {"layer": "layer", "batch_size": "B", "lam": "λ"}
#: failures listed by name in a claim's note; the rest are counted
_LISTED = 4


def _config(r: pd.Series, keys: list[str]) -> str:
    """"MEMIT B = 64", "ROME layer 3", "EMMET λ = 10" (a summary row's configuration)."""
    bits = [str(r["method"]).upper()] if "method" in keys else []
    for k in keys:
        if k != "method":
            bits.append(f"{_KEY_LABEL.get(k, k)} {r[k]:g}" if k == "layer" else f"{_KEY_LABEL.get(k, k)} = {r[k]:g}")
    return " ".join(bits)


def _claim_failures(stored: dict[str, pd.DataFrame], claim: Callable) -> tuple[str, str | None]:
    """The failed edits of the configurations ``claim`` compares: a note for its "ours" text
    ("" when none failed; failed edits are left out of the means, so the means are over fewer
    facts) and why it gets no verdict (more than :data:`MAX_FAILED` of one configuration failed,
    as notebook 07's answers), else None."""
    exp, keys, scope = _SCOPE[claim]
    c = stored.get(exp)
    if c is None or c.empty:
        return "", None
    c = scope(_current(c))
    keys = [k for k in keys if k in c.columns]
    if c.empty or not keys:
        return "", None
    s = summarize_cases(c, by=keys)
    bad = s[s["n_failed"] > 0]
    if bad.empty:
        return "", None
    listed = [f"{int(r['n_failed'])}/{int(r['n'])} at {_config(r, keys)}" for _, r in bad.head(_LISTED).iterrows()]
    if len(bad) > _LISTED:
        listed.append(f"and at {len(bad) - _LISTED} more configurations")
    share = bad["n_failed"] / bad["n"]
    worst = bad.loc[share.idxmax()]
    why = (f"{int(worst['n_failed'])} of {int(worst['n'])} edits at {_config(worst, keys)} failed"
           if float(share.max()) > MAX_FAILED else None)
    return f" (failed edits, left out of the means: {', '.join(listed)})", why


def claims_table(stored: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per claim whose experiment was run: claim, paper, ours, holds here (yes / no /
    n/a over the pooled cases, and in how many orderings when they disagree), margin, spread
    over orderings. Failed edits of the compared configurations are named in "ours" (they are
    left out of its means); where more than :data:`MAX_FAILED` of one configuration failed, the
    claim gets no verdict ("n/a: ..."), as notebook 07's answers."""
    orderings = sorted(set().union(*(set(_orderings(c)) for c in stored.values()))) if stored else []
    rows = []
    for f in CLAIMS:
        r = f(stored)
        if r is None:
            continue
        note, why = ("", None) if r["ours"].startswith("no scores:") else _claim_failures(stored, f)
        if why is not None and r["holds"] is not None:  # too many failed edits: no verdict, said why
            rows.append({**r, "ours": r["ours"] + note, "holds": f"n/a: {why} (over {MAX_FAILED:.0%})"})
            continue
        per = _holds_per_ordering(f, stored, orderings) if len(orderings) > 1 and r["holds"] is not None else []
        rows.append({**r, "ours": r["ours"] + note, "holds": _holds_label(r["holds"], per)})
    t = pd.DataFrame(rows, columns=["claim", "paper", "ours", "holds", "margin", "spread"])
    return t.rename(columns={"holds": "holds here"})


def second_reading_claims(stored: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per second alignment the stored cases hold (``evaluation.also_alignment``), :func:`claims_table`
    under that reading, over the experiments scored that way (the reference's BOS-shifted reading,
    SPEC §8.1, beside correct results, or the reverse). Empty when no experiment holds one."""
    found = sorted({a for c in stored.values() for a in alignments_in(c)})
    return {a: claims_table({e: with_alignment(c, a) for e, c in stored.items() if a in alignments_in(c)})
            for a in found}


# --------------------------------------------------------------------------- the paragraphs

def _searched(c: pd.DataFrame) -> tuple[list[int], int, str]:
    """The searched layers, the depth they show (deepest + 1) and how to name them: "6" when every
    layer up to the deepest was searched, else "the searched 0, 1, 5"."""
    layers = sorted(int(l) for l in c["layer"].unique())
    n = layers[-1] + 1
    return layers, n, (str(n) if layers == list(range(n)) else "the searched " + ", ".join(map(str, layers)))


def finding_layer_search(c: pd.DataFrame) -> str:
    parts = []
    for m in _methods(c):
        try:
            best, top, s = _best_layer(c, m)
        except _NoScores:
            parts.append(f"{m.upper()} has no scores at any layer (every edit failed)")
            continue
        worst = s.loc[s["S"].idxmin()]
        parts.append(f"{m.upper()} edits best at layer {best} (S {top:.2f}) and worst at layer "
                     f"{int(worst['layer'])} (S {worst['S']:.2f}){_unscored(s, 'layer', 'layer')}"
                     f"{_some_failed(s, 'layer', 'layer')}")
    return f"Over {_searched(c)[2]} layers, " + "; ".join(parts) + "."


def finding_singular(c: pd.DataFrame) -> str:
    s = _s(c, ["method"]).set_index("method")
    layer = int(c["layer"].iloc[0]) if "layer" in c.columns else None
    bits = [f"{m.upper()} S {r['S']:.2f} (ES {r['ES_mean']:.2f}, PS {r['PS_mean']:.2f}, NS {r['NS_mean']:.2f}"
            + (f"; {int(r['n_failed'])} of {int(r['n'])} edits failed, left out" if r["n_failed"] else "") + ")"
            if np.isfinite(r["S"]) else f"{m.upper()} no scores (all {int(r['n'])} edits failed)"
            for m, r in s.iterrows()]
    k = len(_orderings(c))
    facts = f"{_facts_per_ordering(c)} facts" + (f" in each of {k} orderings" if k > 1 else "")
    return f"Singular edits of {facts} at layer {layer}: " + "; ".join(bits) + "."


def finding_sweep(c: pd.DataFrame) -> str:
    bits = []
    for m in _methods(c):
        every = _s(c[c["method"] == m], ["lam"]).sort_values("lam")
        s = _scored(every)
        if s.empty:
            bits.append(f"{m.upper()} has no scores at any λ (every edit failed)")
            continue
        top = s.loc[s["S"].idxmax()]
        bits.append(f"{m.upper()} scores best at λ = {top['lam']:g} (S {top['S']:.2f}; range over the grid "
                    f"{s['S'].min():.2f}–{s['S'].max():.2f}{_unscored(every, 'lam', 'λ')}{_some_failed(every, 'lam', 'λ')})")
    return "; ".join(bits) + "."


def finding_batch(c: pd.DataFrame) -> str:
    bits = []
    for m in _methods(c):
        every = _s(c[c["method"] == m], ["batch_size"]).sort_values("batch_size")
        s = _scored(every)
        if s.empty:
            bits.append(f"{m.upper()}: no scores at any batch size (every edit failed)")
            continue
        first = float(s["S"].iloc[0])
        below = s[s["S"] < first - DROP]
        where = (f"falls more than {DROP:g} points below it from B = {int(below['batch_size'].iloc[0])} on"
                 if len(below) else f"stays within {DROP:g} points of it up to B = {int(s['batch_size'].iloc[-1])}")
        bits.append(f"{m.upper()}: S {first:.2f} at B = {int(s['batch_size'].iloc[0])}, {where} "
                    f"(S {float(s['S'].iloc[-1]):.2f} at B = {int(s['batch_size'].iloc[-1])}"
                    f"{_unscored(every, 'batch_size', 'B')}{_some_failed(every, 'batch_size', 'B')})")
    return "; ".join(bits) + "."


def finding_sequential(c: pd.DataFrame) -> str:
    bits = []
    for m in _methods(c):
        every = summarize_cases(c[(c["method"] == m) & (c["eval"] == "current")], by=["batch_size"])
        cur = _scored(every)
        if cur.empty:
            bits.append(f"{m.upper()}: no scores at any batch size (every edit failed)")
            continue
        top = cur.loc[cur["S"].idxmax()]
        txt = (f"{m.upper()}: B = {int(top['batch_size'])} scores best right after each batch (S {top['S']:.2f}"
               f"{_unscored(every, 'batch_size', 'B')}{_some_failed(every, 'batch_size', 'B')})")
        fin = c[(c["method"] == m) & (c["eval"] == "final")]
        f = _scored(summarize_cases(fin, by=["batch_size"])) if len(fin) else pd.DataFrame()
        if len(f):
            ft = f.loc[f["S"].idxmax()]
            txt += f", B = {int(ft['batch_size'])} keeps the most on the final model (S {ft['S']:.2f})"
        bits.append(txt)
    return "; ".join(bits) + "."


FINDINGS = {"layer_search": finding_layer_search, "singular": finding_singular, "sweep": finding_sweep,
            "batch": finding_batch, "sequential": finding_sequential}


def finding(experiment: str, cases: pd.DataFrame) -> str:
    """One paragraph (Markdown) of what ``experiment``'s stored cases show."""
    f = FINDINGS.get(experiment.split("-", 1)[0])
    return f(cases) if f else ""
