"""Beyond the paper (notebook 07): every editor in the batch and sequential protocols, over
several seeded orderings, with model degradation, and an answer per editor to the paper's
question computed from the stored results.

The runs are ordinary batch and sequential experiments of *derived* params
(:func:`study_params`): ``beyond.methods`` and ``beyond.orderings`` replace the study's, the
``beyond.batch`` / ``beyond.sequential`` overrides are merged over its sections, and the results
go to ``results/<name>-beyond/`` so they never mix with notebooks 04-05's. Everything else
(protocols, resume, executors, failure accounting) is the same code.

Error bars: a statistic is computed per ordering, then summarised as mean ± sample std over the
orderings (``ddof = 1``); tables also give the per-case std pooled over orderings, as the paper
prints it (:func:`ordering_summary`).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .metrics import summarize_cases
from .params import ParamsError, StudyParams, beyond_sections, check_beyond

SUFFIX = "-beyond"
#: printed names (the paper's spelling)
DISPLAY = {"memit": "MEMIT", "rome": "ROME", "emmet": "EMMET", "alphaedit": "AlphaEdit", "encore": "ENCORE"}
METRICS = ("ES", "PS", "NS")


def display(method: str) -> str:
    return DISPLAY.get(method, method.upper())


def stored_best_layer(p: StudyParams) -> int:
    """The best layer of ``p``'s own stored layer search (the highest MEMIT S, ties: the lowest),
    as ``layer: best`` means everywhere else."""
    from .protocols import _layer_search_cases, best_layer_of

    path = _layer_search_cases(p, "model")
    if path is None or not path.is_file():
        raise ParamsError(f"beyond.layer is 'best', which needs a finished layer search ({path} is missing): "
                          "run notebook 01_layer_search first, or give beyond.layer an integer")
    return best_layer_of(pd.read_parquet(path))


def study_params(p: StudyParams, *, resolve_layer: bool = True) -> StudyParams:
    """The params of the beyond-the-paper runs (see the module docstring). ``resolve_layer``:
    turn ``beyond.layer: best`` into the integer of the study's stored layer search (the derived
    params have no layer search of their own)."""
    check_beyond(p)
    secs = beyond_sections(p)
    layer = p.beyond.layer
    if layer == "best" and resolve_layer:
        layer = stored_best_layer(p)
    return replace(p, name=p.name + SUFFIX, data=replace(p.data, orderings=tuple(p.beyond.orderings)),
                   batch=replace(secs["batch"], layer=layer), sequential=replace(secs["sequential"], layer=layer))


# --------------------------------------------------------------------------- statistics over orderings

def _current(cases: pd.DataFrame, ev: str = "current") -> pd.DataFrame:
    return cases[cases["eval"] == ev] if "eval" in cases.columns else cases


def ordering_summary(cases: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Per group of ``by``: each metric's mean over orderings of the per-ordering case mean
    (``<m>``), its sample std over orderings (``<m>_sd``), the per-case std pooled over orderings
    (``<m>_case_std``), S likewise (``S``, ``S_sd``), ``orderings`` (those with scores: an
    ordering whose edits all failed has none and is left out of the mean, not counted as zero),
    ``n`` cases and ``n_failed`` (rows without scores, never averaged in)."""
    by = list(by)
    per = summarize_cases(cases, by=by + ["ordering"], decimals=None)
    pooled = summarize_cases(cases, by=by, decimals=None)
    metrics = [m for m in ("ES", "PS", "NS", "GE") if f"{m}_mean" in per.columns]
    rows = []
    for key, g in per.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        pool = pooled
        for k, v in row.items():
            pool = pool[pool[k] == v]
        # orderings that produced scores (an ordering whose edits all failed has no S)
        row.update(orderings=int(np.isfinite(g["S"].to_numpy(dtype=float)).sum()), n=int(g["n"].sum()),
                   n_failed=int(g["n_failed"].sum()))
        for m in metrics + ["S"]:
            col = "S" if m == "S" else f"{m}_mean"
            v = g[col].to_numpy(dtype=float)
            row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"{m}_sd"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan")
            if m != "S":
                row[f"{m}_case_std"] = float(pool[f"{m}_std"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def s_over_orderings(cases: pd.DataFrame, by: Sequence[str]) -> list[str] | None:
    """Each group's "S over orderings" (mean ± sample std of the per-ordering S) in the row order
    of ``summarize_cases(cases, by)``; None when the cases come from one ordering (the tables of
    notebooks 01-06 then carry the pooled S alone)."""
    by = [by] if isinstance(by, str) else list(by or [])
    if not by or "ordering" not in cases.columns or cases["ordering"].nunique() < 2:
        return None
    o = summarize_cases(cases, by=by)[by].merge(ordering_summary(cases, by), on=by, how="left")
    return [f"{a:.2f} ± {b:.2f}" if pd.notna(a) and pd.notna(b) else "n/a" for a, b in zip(o["S"], o["S_sd"])]


def _pm(v: float, sd: float, digits: int = 2) -> str:
    if not np.isfinite(v):
        return "n/a"
    return f"{v:.{digits}f} ± {sd:.{digits}f}" if np.isfinite(sd) else f"{v:.{digits}f}"


def format_ordering_summary(s: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The table as printed: ``"mean ± std over orderings (per-case std)"`` per metric, S as
    ``"mean ± std"``; methods by their printed names."""
    out = pd.DataFrame(index=s.index)
    for k in by:
        out[k] = s[k].map(display) if k == "method" else s[k].astype(str)
    out["orderings"] = s["orderings"].astype(str)
    out["n"] = s["n"].astype(str)
    out["failed"] = s["n_failed"].astype(str)
    out["S"] = [_pm(a, b) for a, b in zip(s["S"], s["S_sd"])]
    for m in [m for m in ("ES", "PS", "NS", "GE") if m in s.columns]:
        out[m] = [f"{_pm(a, b)} ({c:.2f})" for a, b, c in zip(s[m], s[f"{m}_sd"], s[f"{m}_case_std"])]
    return out


# --------------------------------------------------------------------------- the answers

def best_sizes(seq_cases: pd.DataFrame) -> dict[str, int]:
    """Each method's sequential batch size with the highest mean S right after its batch (ties:
    the larger size, fewer updates)."""
    s = ordering_summary(_current(seq_cases), ["method", "batch_size"])
    return {m: int(g.sort_values(["S", "batch_size"], ascending=[False, False]).iloc[0]["batch_size"])
            for m, g in s.groupby("method")}


#: the smallest spread a difference is judged against (S points): saturated scores can have sd 0
MIN_SPREAD = 0.5
#: above this share of failed edits at a compared size, the paragraph gives no verdict
MAX_FAILED = 0.25


def _differs(a: pd.Series, b: pd.Series) -> bool:
    """Whether two groups' S differ by more than twice the larger of their spreads over orderings
    (at least :data:`MIN_SPREAD`; with one ordering, that floor alone)."""
    sds = [x for x in (a["S_sd"], b["S_sd"]) if np.isfinite(x)]
    return abs(a["S"] - b["S"]) > 2 * max(sds + [MIN_SPREAD])


def _b(r: pd.Series) -> int:
    return int(r["batch_size"])


def _unreliable(rows: Sequence[pd.Series]) -> str | None:
    """Why ``rows`` cannot be compared (no scores, or too many failed edits), else None."""
    for r in rows:
        if not np.isfinite(r["S"]):
            return f"every edit at B = {_b(r)} failed"
        if r["n"] and r["n_failed"] / r["n"] > MAX_FAILED:
            return f"{int(r['n_failed'])} of {int(r['n'])} edits at B = {_b(r)} failed"
    return None


def _failed(rows: Sequence[pd.Series]) -> str:
    """" (failed edits, left out of the means: ...)" when any compared size had failures."""
    bad = [f"{int(r['n_failed'])}/{int(r['n'])} at B = {_b(r)}" for r in rows if r["n_failed"]]
    return f" Failed edits, left out of the means: {', '.join(bad)}." if bad else ""


def _trend(s: pd.DataFrame) -> tuple[str, pd.Series, pd.Series]:
    g = s.sort_values("batch_size")
    lo, hi = g.iloc[0], g.iloc[-1]
    if len(g) < 2 or not _differs(lo, hi):
        return "flat", lo, hi
    return ("worse" if hi["S"] < lo["S"] else "better"), lo, hi


def _batch_part(s: pd.DataFrame) -> tuple[str, str | None]:
    if len(s) == 1:
        r = s.iloc[0]
        return f"Batch editing: only B = {_b(r)} (S {_pm(r['S'], r['S_sd'])}).", None
    trend, lo, hi = _trend(s)
    why = _unreliable([lo, hi])
    if why:
        return (f"Batch editing: S {_pm(lo['S'], lo['S_sd'])} at B = {_b(lo)}, {_pm(hi['S'], hi['S_sd'])} at "
                f"B = {_b(hi)}.{_failed([lo, hi])}"), f"one batch: no verdict, {why}"
    word = {"worse": "falls", "better": "rises", "flat": "stays within its spread"}[trend]
    text = (f"Batch editing: S {word} from {_pm(lo['S'], lo['S_sd'])} at B = {_b(lo)} to {_pm(hi['S'], hi['S_sd'])} "
            f"at B = {_b(hi)} (NS {lo['NS']:.1f} → {hi['NS']:.1f}).{_failed([lo, hi])}")
    return text, {"worse": "one bigger batch scores worse", "better": "one bigger batch scores better",
                  "flat": "the batch size barely matters in one batch"}[trend]


def _sequential_verdict(s: pd.DataFrame, total: int) -> str:
    small, large = s.iloc[0], s.iloc[-1]
    best = s.sort_values(["S", "batch_size"], ascending=[False, False]).iloc[0]
    why = _unreliable([small, large, best])
    if why:
        return f"in sequence: no verdict, {why}"
    name_small = "one-fact updates (B = 1)" if _b(small) == 1 else f"B = {_b(small)}"
    name_large = f"a single batch (B = {_b(large)})" if _b(large) == total else f"B = {_b(large)}"
    same = "in sequence, the batch size makes no difference beyond the spread over orderings"
    if _b(best) == _b(small):
        return f"in sequence, the smallest batches (B = {_b(small)}) are best" if _differs(best, large) else same
    if _b(best) == _b(large):
        return f"in sequence, larger batches are better, up to {name_large}" if _differs(best, small) else same
    beats = [n for n, r in ((name_small, small), (name_large, large)) if _differs(best, r)]
    if len(beats) == 2:
        return f"in sequence, a moderate batch size (B = {_b(best)}) beats both {name_small} and {name_large}"
    if beats:
        other = name_large if beats[0] == name_small else name_small
        return (f"in sequence, a moderate batch size (B = {_b(best)}) beats {beats[0]}, "
                f"but not {other} beyond the spread")
    return same


def answer(method: str, batch_cases: pd.DataFrame | None, seq_cases: pd.DataFrame | None,
           seq_batches: pd.DataFrame | None = None) -> str:
    """One paragraph answering "is bigger edit batch size better?" for ``method``, computed from
    its stored batch and sequential results (mean ± std over orderings). A difference counts only
    when it exceeds twice the spread over orderings (:func:`_differs`); a size where every edit, or
    more than :data:`MAX_FAILED` of them, failed gets no verdict, and failures are always named."""
    name, parts, verdicts, best_b = display(method), [], [], None
    if batch_cases is not None and (batch_cases["method"] == method).any():
        text, verdict = _batch_part(ordering_summary(_current(batch_cases[batch_cases["method"] == method]),
                                                     ["batch_size"]))
        parts.append(text)
        if verdict:
            verdicts.append(verdict)
    if seq_cases is not None and (seq_cases["method"] == method).any():
        c = seq_cases[seq_cases["method"] == method]
        s = ordering_summary(_current(c), ["batch_size"]).sort_values("batch_size").reset_index(drop=True)
        keys = [k for k in ("ordering", "batch_size") if k in c.columns]
        total = int(_current(c).groupby(keys).size().max())  # facts per run
        best = s.sort_values(["S", "batch_size"], ascending=[False, False]).iloc[0]
        best_b = _b(best)  # as best_sizes(): the degradation sentence below is about this size
        if len(s) == 1:
            parts.append(f"Sequential editing of {total} facts: only B = {_b(best)} "
                         f"(S {_pm(best['S'], best['S_sd'])} right after each batch).{_failed([best])}")
        else:
            others = [r for r in (s.iloc[0], s.iloc[-1]) if _b(r) != _b(best)]
            parts.append(f"Sequential-batch editing of {total} facts: the best S right after each batch is at "
                         f"B = {_b(best)} ({_pm(best['S'], best['S_sd'])}), against "
                         + " and ".join(f"{_pm(r['S'], r['S_sd'])} at B = {_b(r)}" for r in others) + "."
                         + _failed([best] + others))
            verdicts.append(_sequential_verdict(s, total))
        fin = _current(c, "final")
        if not fin.empty:
            f = ordering_summary(fin, ["batch_size"])
            fb = f.sort_values(["S", "batch_size"], ascending=[False, False]).iloc[0]
            parts.append(f"On the final model (retention of all edits) the best S is at B = {_b(fb)} "
                         f"({_pm(fb['S'], fb['S_sd'])}).")
    if seq_batches is not None and len(seq_batches) and "heldout_known" in seq_batches.columns and seq_cases is not None:
        b = seq_batches[(seq_batches["method"] == method) & seq_batches["heldout_known"].notna()]
        last = b[b["batch_size"] == best_b]
        if "ordering" in last.columns and len(last):
            last = last[last["batch_index"] == last.groupby("ordering")["batch_index"].transform("max")]
        if len(last):
            parts.append(f"Degradation at B = {best_b} after all edits: {last['heldout_known'].mean():.1f} % of "
                         f"held-out known facts still known (unedited {last['heldout_known_0'].mean():.1f} %), "
                         f"perplexity {last['heldout_ppl_0'].mean():.2f} → {last['heldout_ppl'].mean():.2f}.")
    if seq_batches is not None and "nullspace_frac" in seq_batches.columns:  # AlphaEdit: how much room P leaves
        ns = seq_batches[(seq_batches["method"] == method) & seq_batches["nullspace_frac"].notna()]
        if len(ns):
            parts.append(f"Its null space keeps {100 * ns['nullspace_frac'].mean():.1f} % of C0's eigenvectors "
                         f"({100 * ns['nullspace_energy'].mean():.2f} % of its trace): the update can only use those "
                         f"directions.")
    if not parts:
        return f"**{name}**: no stored batch or sequential results."
    verdict = "; ".join(verdicts) if verdicts else (
        "ROME edits one fact at a time, so only B = 1 ran (EMMET is its batched form)" if method == "rome"
        else "only one batch size ran, so this run cannot say")
    return f"**{name}.** " + " ".join(parts) + f" *Is bigger better?* {verdict[0].upper() + verdict[1:]}."


def answers(methods: Sequence[str], batch_cases: pd.DataFrame | None, seq_cases: pd.DataFrame | None,
            seq_batches: pd.DataFrame | None = None) -> Mapping[str, str]:
    """:func:`answer` for each method, in order."""
    return {m: answer(m, batch_cases, seq_cases, seq_batches) for m in methods}


def save_answers(text: Mapping[str, str], out_dir: str | Path, stem: str = "beyond_answers") -> Path:
    """The paragraphs as Markdown (written atomically)."""
    from .store import atomic_write_bytes

    path = Path(out_dir) / f"{stem}.md"
    body = "# Is bigger edit batch size better? One answer per editor\n\n" + "\n\n".join(text.values()) + "\n"
    atomic_write_bytes(path, body.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- notebook 07's outputs

def outputs(methods: Sequence[str], batch_cases: pd.DataFrame | None, seq_cases: pd.DataFrame | None,
            seq_batches: pd.DataFrame | None, title: str) -> list[tuple[str, object]]:
    """Notebook 07's figures and tables, ``(stem, Figure | DataFrame)`` in the order shown, from
    stored results (notebook 07 and the report draw the same): ``beyond_table_batch``,
    ``beyond_batch_all_methods``, ``beyond_table_sequential``, ``beyond_sequential_all_methods``,
    ``beyond_degradation_<method>`` and ``beyond_degradation_all_methods``."""
    from . import plotting

    out: list[tuple[str, object]] = []
    if batch_cases is not None and len(batch_cases):
        by = ["method", "batch_size"]
        out.append(("beyond_table_batch", format_ordering_summary(ordering_summary(batch_cases, by), by)))
        out.append(("beyond_batch_all_methods",
                    plotting.plot_editors_batch(batch_cases, methods, f"Batch editing, all editors, {title}")))
    if seq_cases is not None and len(seq_cases):
        by = ["method", "batch_size", "eval"]
        out.append(("beyond_table_sequential", format_ordering_summary(ordering_summary(seq_cases, by), by)))
        out.append(("beyond_sequential_all_methods",
                    plotting.plot_editors_sequential(seq_cases, methods, f"Sequential-batch editing, all editors, {title}")))
        if seq_batches is not None and plotting.has_degradation(seq_batches):
            ran = [m for m in methods if (seq_batches["method"] == m).any()]
            ylims = plotting.degradation_ylims(seq_batches, ran)  # the editors' figures share their scales
            for m in ran:
                out.append((f"beyond_degradation_{m}", plotting.plot_degradation(
                    seq_batches, [m], f"Degradation, sequential {display(m)}, {title}", ylims=ylims)))
            best = best_sizes(seq_cases)
            out.append(("beyond_degradation_all_methods", plotting.plot_degradation_overlay(
                seq_batches, {m: best[m] for m in methods if m in best},
                f"Degradation, every editor at its best batch size, {title}")))
    return out


def save_outputs(items: Sequence[tuple[str, object]], fig_dir: str | Path) -> list[Path]:
    """Write :func:`outputs` into ``fig_dir`` (figures as PNG and PDF, tables as CSV and Markdown)."""
    from . import plotting

    paths: list[Path] = []
    for stem, obj in items:
        save = plotting.save_table if isinstance(obj, pd.DataFrame) else plotting.save_figure
        paths += save(obj, fig_dir, stem)
    return paths
