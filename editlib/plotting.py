"""The paper's figures and tables from result frames (no notebook needed).

Figures are built with the object-oriented matplotlib API (``matplotlib.figure.Figure``, no pyplot
state), styled with seaborn, so they work under any backend (Agg included) and are shown in a
notebook by ``display(fig)``. Every metric is the case mean ×100 (GE: bits ×100, as the paper
prints it); bands are the normal-approximation 95% confidence interval of that mean over cases
(1.96 · sample std / √n). S is the harmonic mean of the ES, PS and NS means, so it has no band.
With several data orderings every line is instead the mean over orderings of the per-ordering
statistic (S included) and every band ±1 sample std over orderings (:func:`_stats`).

Tables are DataFrames of the paper's ``"mean(std)"`` strings (:func:`editlib.metrics.format_summary`);
:func:`paper_reference_tables` holds the paper's own Tables 1, 3 and 4 for comparison.
"""
from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import matplotlib
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator, NullLocator

from .beyond import s_over_orderings
from .metrics import alignments_in, failed_rows, format_summary, singular_rows, summarize_cases, with_alignment
from .store import atomic_write_bytes

PANELS = ("ES", "PS", "NS", "S")
NAMES = {"ES": "Efficacy ES", "PS": "Paraphrase PS", "NS": "Neighbourhood NS", "S": "Score S",
         "GE": "Generation entropy GE"}
BAND = "95% CI"
METHOD_ORDER = ("memit", "rome", "emmet", "alphaedit", "encore")
_PALETTE = dict(zip(METHOD_ORDER, sns.color_palette("deep", len(METHOD_ORDER))))
# distinct line styles and markers: ROME and MEMIT singular edits often coincide exactly
_STYLE = {"memit": ("-", "o"), "rome": ("--", "s"), "emmet": ("-.", "^"), "alphaedit": (":", "D"),
          "encore": ((0, (5, 1, 1, 1)), "v")}
_SHARES = ("ES", "PS", "NS")  # metrics that are shares: bands clipped to [0, 100]


# --------------------------------------------------------------------------- helpers

def _current(cases: pd.DataFrame) -> pd.DataFrame:
    """Rows evaluated right after their own edit (all rows when there is no ``eval`` column)."""
    return cases[cases["eval"] == "current"] if "eval" in cases.columns else cases


def _of_method(df: pd.DataFrame, method: str) -> pd.DataFrame:
    out = df[df["method"] == method]
    if out.empty:
        raise ValueError(f"no rows for method {method!r} (have {sorted(df['method'].unique())})")
    return out


def _metrics(cases: pd.DataFrame) -> tuple[str, ...]:
    """The panels to draw: ES, PS, NS, S, and GE when the frame has it."""
    return PANELS + (("GE",) if "GE" in cases.columns else ())


def n_orderings(cases: pd.DataFrame) -> int:
    return int(cases["ordering"].nunique()) if "ordering" in cases.columns else 1


def band_label(cases: pd.DataFrame) -> str:
    """What a figure's bands are: the 95% CI over cases (one ordering) or ±1 std over orderings,
    with the range of orderings per line point when it varies (no band where fewer than 2 ran)."""
    if n_orderings(cases) < 2:
        return BAND
    keys = [k for k in ("method", "layer", "lam", "batch_size", "eval") if k in cases.columns]
    per = cases.groupby(keys)["ordering"].nunique() if keys else pd.Series([n_orderings(cases)])
    lo, hi = int(per.min()), int(per.max())
    return f"±1 std over {hi} orderings" if lo == hi else f"±1 std over {lo}–{hi} orderings"


def _stats(cases: pd.DataFrame, keys: Sequence[str], over_orderings: bool | None = None) -> pd.DataFrame:
    """Unrounded per-group summary with ``<m>_ci``: the band's half-width. One ordering: the 95%
    CI of the case mean, over the cases that produced the metric (none, NaN, where fewer than 2 did). Several (``data.orderings``; ``over_orderings``, default: this frame has
    more than one): each metric and S are computed per ordering, the line is their mean and the
    band ±1 sample std over orderings (S gets one too; a group with fewer than 2 orderings that
    produced scores gets none, NaN, never a zero band)."""
    if over_orderings if over_orderings is not None else n_orderings(cases) > 1:
        from .beyond import ordering_summary

        o = ordering_summary(cases, keys)
        for m in ("ES", "PS", "NS", "GE", "S"):
            if m in o.columns:
                if m != "S":
                    o[f"{m}_mean"] = o[m]
                o[f"{m}_ci"] = o[f"{m}_sd"]
        return o.sort_values(list(keys)).reset_index(drop=True)
    s = summarize_cases(cases, by=list(keys), decimals=None)
    # each metric's CI over the values its mean was taken over: failed rows (and a metric's missing
    # values) are left out of the mean, so they must be left out of n too, or the band would narrow
    counts = s[list(keys)].merge(cases[~failed_rows(cases)].groupby(list(keys)).count().reset_index(),
                                 on=list(keys), how="left")  # per group, each metric's values
    for col in [c for c in s.columns if c.endswith("_std")]:
        m = col[:-4]
        n = counts[m].fillna(0).to_numpy(dtype=float)
        # summarize_cases gives the population std; the CI uses the sample std
        with np.errstate(divide="ignore", invalid="ignore"):
            half = 1.96 * s[col].to_numpy(dtype=float) / np.sqrt(n - 1)
        s[m + "_ci"] = np.where(n > 1, half, np.nan)  # one value: no band (NaN), never a zero-width one
    return s.sort_values(list(keys)).reset_index(drop=True)


def _ylabel(metric: str, band: str = BAND) -> str:
    """The panel's y label; bands over orderings are named once, in the title (:func:`_panel_titles`)."""
    if metric == "S":
        return "S (harmonic mean of ES, PS, NS)" if band == BAND else "S (mean of per-ordering S)"
    unit = "bits ×100" if metric == "GE" else "mean ×100"
    return f"{metric} ({unit}; band: {band})" if band == BAND else f"{metric} ({unit})"


def _band_title(fig: Figure, band: str) -> None:
    """Bands over orderings: say so under the title (lines are means over the orderings)."""
    if band != BAND:
        k = band.split(" over ")[1]
        _suptitle(fig, f"{fig.get_suptitle()}\nlines: mean over {k}; bands: {band}")


def _suptitle(fig: Figure, title: str) -> None:
    """The figure's title, wrapped to its width (a long model and data description must not be
    clipped at both sides), in the size every figure uses."""
    chars = max(40, int(fig.get_figwidth() * 13))

    def balanced(line: str) -> str:  # as many lines as needed, of even length (no one-word last line)
        n = math.ceil(len(line) / chars)
        return textwrap.fill(line, min(chars, math.ceil(len(line) / n) + 8)) if n > 1 else line
    fig.suptitle("\n".join(balanced(line) for line in title.split("\n")), fontsize="medium")


def _figure(n_panels: int, title: str, *, width: float = 3.6, height: float = 3.3) -> tuple[Figure, list]:
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(width * n_panels, height), layout="constrained")
        axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
    _suptitle(fig, title)
    return fig, axes


def _line(ax, x, s: pd.DataFrame, metric: str, *, label: str, color=None, linestyle="-",
          marker="o", hollow: bool = False, hatched: bool = False, alpha: float = 0.18) -> None:
    """One mean line with its band (S has one only over orderings, :func:`_stats`). ``hollow``:
    open markers, for a line drawn over an identical one; ``hatched``: a hatched band, for a
    second line of the same colour whose band may overlap the first's."""
    y = s["S"] if metric == "S" else s[f"{metric}_mean"]
    (ln,) = ax.plot(x, y, marker=marker, linestyle=linestyle, color=color, label=label, markersize=4,
                    clip_on=False, **({"markerfacecolor": "none"} if hollow else {}))
    if f"{metric}_ci" in s:  # S has a band only over orderings (it is one number per ordering)
        ci = s[f"{metric}_ci"]
        lo, hi = y - ci, y + ci
        if metric in _SHARES or metric == "S":
            lo, hi = lo.clip(lower=0), hi.clip(upper=100)
        if hatched:
            ax.fill_between(x, lo, hi, facecolor="none", edgecolor=ln.get_color(), hatch="////",
                            alpha=0.35, linewidth=0)
        else:
            ax.fill_between(x, lo, hi, color=ln.get_color(), alpha=alpha, linewidth=0)


def _legend(ax, ncols: int = 5, **kw) -> None:
    """The legend of ``ax``'s lines, under the figure's panels (inside a panel it covered data),
    the figure made taller by its rows so that the panels keep their size."""
    fig = ax.figure
    handles, labels = ax.get_legend_handles_labels()
    cols = max(1, min(len(labels), ncols))
    fig.set_figheight(fig.get_figheight() + 0.22 * math.ceil(len(labels) / cols) + 0.15)
    fig.legend(handles, labels, loc="outside lower center", ncols=cols, **kw)


def _share_y(axes, metrics: Sequence[str]) -> None:
    """One y range for the ES, PS and NS panels (all shares ×100), so their drops compare at a
    glance (the paper's point that NS falls most); S and GE keep their own. No score axis runs
    past 100 or below 0 (the markers there are drawn whole)."""
    share = [ax for ax, m in zip(axes, metrics) if m in _SHARES]
    if len(share) > 1:
        lo = min(ax.get_ylim()[0] for ax in share)
        hi = max(ax.get_ylim()[1] for ax in share)
        for ax in share:
            ax.set_ylim(lo, hi)
    for ax, m in zip(axes, metrics):
        if m in _SHARES or m == "S":
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, 0.0), min(hi, 100.0))


def _panel_titles(axes, metrics: Sequence[str], band: str = BAND) -> None:
    for ax, m in zip(axes, metrics):
        ax.set_title(NAMES[m])
        ax.set_ylabel(_ylabel(m, band))
    _band_title(axes[0].figure, band)


def _categorical_log_x(ax, values: Sequence[float], base: float = 2, *, one_batch: float | None = None) -> None:
    """Log x axis with ticks (and only ticks) at ``values``; ``one_batch``: the batch size that
    edits every fact in one batch (sequential runs), labelled so."""
    ax.set_xscale("log", base=base)
    ax.set_xticks(list(values))
    ax.set_xticklabels([f"{v:g}" + ("\n(one batch)" if v == one_batch else "") for v in values])
    ax.xaxis.set_minor_locator(NullLocator())


def _one_batch_size(c: pd.DataFrame) -> float | None:
    """The batch size of a sequential run whose single batch holds every fact (each ordering's
    rows at that size all come from batch 0), or None."""
    if "batch_index" not in c.columns or c.empty:
        return None
    top = c[c["batch_size"] == c["batch_size"].max()]
    return float(top["batch_size"].iloc[0]) if (top["batch_index"] == 0).all() else None


def lambda_label(v: float) -> str:
    """A short λ tick label: 0, 1, 10, 100, then 1e3, 5e4, 1e-2 … (no 6-digit labels that overlap)."""
    if v == 0 or 1 <= abs(v) <= 100:
        return f"{v:g}"
    mant, exp = f"{v:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def _lambda_axis(ax, lams: Sequence[float]) -> None:
    """Symlog (when λ = 0 occurs) or log x axis with ticks at the λ values."""
    pos = [l for l in lams if l > 0]
    if len(pos) < len(lams):
        ax.set_xscale("symlog", linthresh=min(pos) if pos else 1.0)
    else:
        ax.set_xscale("log")
    ax.set_xticks(list(lams))
    ax.set_xticklabels(_spaced_labels(lams), rotation=45, ha="right")
    ax.xaxis.set_minor_locator(NullLocator())


def _spaced_labels(lams: Sequence[float], min_decades: float = 0.6) -> list[str]:
    """λ tick labels that do not overlap: a λ closer than ``min_decades`` to an already labelled
    one keeps its tick without a label (5×10^4 beside 10^5), zero and powers of ten first."""
    def decade(v: float) -> bool:
        return v == 0 or math.log10(abs(v)).is_integer()

    labels = [""] * len(lams)
    kept: list[float] = []
    for i in sorted(range(len(lams)), key=lambda i: (not decade(lams[i]), i)):
        v = lams[i]
        if v == 0 or all(abs(math.log10(v) - math.log10(k)) >= min_decades for k in kept if k > 0):
            labels[i] = lambda_label(v)
            kept.append(v)
    return labels


def _methods(df: pd.DataFrame) -> list[str]:
    have = list(df["method"].unique())
    return [m for m in METHOD_ORDER if m in have] + sorted(m for m in have if m not in METHOD_ORDER)


def jitter_note(cases: pd.DataFrame) -> str | None:
    """One line when any plotted edit was solved with jitter (SPEC §8.5): a figure must never
    silently mix regularised and exact solves. None when every solve was exact."""
    if "solve_jitter" not in cases.columns:
        return None
    jit = cases["solve_jitter"].to_numpy(dtype=float)
    k = int((jit > 0).sum())
    if k == 0:
        return None
    return (f"{k} of {len(jit)} edited-fact rows come from solves regularised with jitter "
            f"(τ ≤ {jit.max():.1g} of D's mean eigenvalue); all others were solved exactly")


def failure_note(cases: pd.DataFrame) -> str | None:
    """One line when any plotted case failed (no scores: left out of the means, never a zero)."""
    if cases.empty or not {"ES", "PS", "NS"} <= set(cases.columns):
        return None
    bad = failed_rows(cases)
    if not bad.any():
        return None
    first = cases["fail_reason"][bad].iloc[0] if "fail_reason" in cases.columns else "no scores"
    return f"{int(bad.sum())} of {len(bad)} cases failed and are left out of the means ({first})"


def singular_note(cases: pd.DataFrame) -> str | None:
    """One line when any plotted edit came from a numerically singular solve (an exact factorisation
    whose update misses the method's equations: :func:`editlib.metrics.singular_rows`); failed rows,
    named by :func:`failure_note`, are not counted again."""
    bad = singular_rows(cases)
    if bad.any() and {"ES", "PS", "NS"} <= set(cases.columns):
        bad &= ~failed_rows(cases)
    if not bad.any():
        return None
    worst = float(cases["solve_resid"].to_numpy(dtype=float)[bad].max())
    return (f"{int(bad.sum())} of {len(bad)} edited-fact rows come from numerically singular solves "
            f"(the update misses the method's equations by up to {worst:.2g} of ‖R‖)")


def batch_notes(batches: pd.DataFrame, cols: Sequence[str]) -> list[str]:
    """What a figure drawn from per-batch diagnostics (``cols`` of ``batches.parquet``) must say:
    batches with failed facts (left out of their update), batches that wrote no update (their
    ``cols`` are NaN: left out of the lines, which then average over fewer orderings), and
    held-out facts without scores (NaN/inf outputs: counted as not known, their margin left out)."""
    notes = []
    every_batch = any(not c.startswith("heldout_") for c in cols)  # degradation rows are every k facts only
    if every_batch and "n_failed" in batches.columns:
        k = batches["n_failed"].fillna(0).to_numpy(dtype=float)
        if (k > 0).any():
            notes.append(f"{int((k > 0).sum())} of {len(k)} batches had failed facts ({int(k.sum())} facts, "
                         "left out of their batch's update)")
    gone = [c for c in cols if c in batches.columns and batches[c].isna().any()]
    if every_batch and gone and "n" in batches.columns and "n_failed" in batches.columns:
        dead = batches[(batches["n_failed"] >= batches["n"]) & (batches["n"] > 0)]
        if len(dead):
            notes.append(f"{len(dead)} batches wrote no update (every fact failed): left out of the lines")
    if "heldout_unscored" in batches.columns and any(c.startswith("heldout_") for c in cols):
        u = batches["heldout_unscored"].fillna(0).to_numpy(dtype=float)
        if (u > 0).any():
            notes.append(f"{int((u > 0).sum())} measurements had held-out facts without scores (up to {int(u.max())}; "
                         "NaN/inf outputs): counted as not known, left out of the margin")
    return notes


def _warn(fig: Figure, notes: Sequence[str | None]) -> Figure:
    """``notes`` (None: nothing to say) under the figure's panels, one warning line each."""
    notes = [n for n in notes if n]
    if notes:
        fig.supxlabel("\n".join("⚠ " + n for n in notes), fontsize="small", color="firebrick")
    return fig


def _batch_note(fig: Figure, batches: pd.DataFrame, cols: Sequence[str]) -> Figure:
    return _warn(fig, batch_notes(batches, cols))


def _note(fig: Figure, cases: pd.DataFrame) -> Figure:
    return _warn(fig, [failure_note(cases), jitter_note(cases), singular_note(cases)])


# --------------------------------------------------------------------------- figures

#: methods whose means differ by at most this many points (×100) on every panel "coincide"
COINCIDE = 0.5


def coinciding(s: pd.DataFrame, key: str, metrics: Sequence[str]) -> dict[str, str]:
    """Method -> the earlier-drawn method it coincides with (every mean of every panel within
    :data:`COINCIDE` points at every ``key`` value), so a legend can say why one line hides another."""
    per = {m: s[s["method"] == m] for m in _methods(s)}
    return {b: a for b, (a, _) in _covered_by(per, metrics, key=key, whole=True).items()}


def _covered_by(stats: Mapping[str, pd.DataFrame], metrics: Sequence[str], *, key: str = "batch_size",
                whole: bool = False) -> dict[str, tuple[str, list]]:
    """Method -> (a method drawn before it, the ``key`` values they share) when its line lies on
    that one's at every shared value on every panel (within :data:`COINCIDE`): ROME and EMMET give
    the same edit at B = 1. ``whole``: only lines over the same ``key`` values. Its markers are
    drawn open and its legend entry says so."""
    cols = ["S" if m == "S" else f"{m}_mean" for m in metrics]
    out: dict[str, tuple[str, list]] = {}
    names = list(stats)
    for i, b in enumerate(names):
        gb = stats[b].set_index(key)[cols]
        for a in names[:i]:
            ga = stats[a].set_index(key)[cols]
            if whole and not ga.index.equals(gb.index):
                continue
            shared = sorted(set(ga.index) & set(gb.index))
            if shared and float((ga.loc[shared] - gb.loc[shared]).abs().to_numpy().max()) <= COINCIDE:
                out[b] = (a, shared)
                break
    return out


def facts_per_layer(cases: pd.DataFrame) -> str:
    """How many facts were edited at each layer (per method and ordering), counted from the cases
    (failed edits included): "100 facts per layer", "… per layer and ordering", a range if uneven."""
    keys = [k for k in ("method", "layer", "ordering") if k in cases.columns]
    n = cases.groupby(keys)["case_id"].nunique()
    lo, hi = int(n.min()), int(n.max())
    count = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return f"{count} fact{'s' if hi != 1 else ''} per layer" + (" and ordering" if n_orderings(cases) > 1 else "")


def plot_layer_search(cases: pd.DataFrame, title: str) -> Figure:
    """Figures 1 / 6: ES, PS, NS, S (and GE) per edited layer, one line per method; a method whose
    line would hide another's says so in the legend."""
    cases = _current(cases)
    metrics = _metrics(cases)
    s = _stats(cases, ["method", "layer"])
    same = coinciding(s, "layer", metrics)
    fig, axes = _figure(len(metrics), f"{title}, {facts_per_layer(cases)}")
    for ax, m in zip(axes, metrics):
        for method in _methods(s):
            g = s[s["method"] == method]
            ls, mk = _STYLE.get(method, ("-", "o"))
            label = method.upper() + (f" (= {same[method].upper()} within {COINCIDE:g})" if method in same else "")
            _line(ax, g["layer"], g, m, label=label, color=_PALETTE.get(method), linestyle=ls, marker=mk)
        ax.set_xlabel("edited layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _panel_titles(axes, metrics, band_label(cases))
    _share_y(axes, metrics)
    _legend(axes[0], title="method")
    return _note(fig, cases)


def plot_batch(cases: pd.DataFrame, method: str, title: str) -> Figure:
    """Figures 2 / 3: metrics after one batch edit vs batch size (log2 axis)."""
    c = _current(_of_method(cases, method))
    metrics = _metrics(c)
    s = _stats(c, ["batch_size"])
    fig, axes = _figure(len(metrics), title)
    for ax, m in zip(axes, metrics):
        _line(ax, s["batch_size"], s, m, label=method.upper(), color=_PALETTE.get(method))
        _categorical_log_x(ax, s["batch_size"].tolist())
        ax.set_xlabel("batch size")
    _panel_titles(axes, metrics, band_label(c))
    _share_y(axes, metrics)
    return _note(fig, c)


def windowed(cases: pd.DataFrame, method: str) -> list[str]:
    """``method``'s windowed configurations in ``cases`` ("memit-w2", ...), by window size."""
    have = [m for m in cases["method"].unique() if str(m).startswith(f"{method}-w")]
    return sorted(have, key=lambda m: int(str(m).rsplit("-w", 1)[1]))


def plot_windows(cases: pd.DataFrame, method: str, title: str) -> Figure:
    """Single-layer ``method`` against its windowed versions (``batch.windows``): ES, PS, NS, S
    vs batch size, one line per window (solid: the single layer)."""
    labels = [method] + windowed(cases, method)
    c = _current(cases[cases["method"].isin(labels)])
    metrics = _metrics(c)
    fig, axes = _figure(len(metrics), title)
    # shades of the method's own colour (the other methods' colours would read as other methods)
    colors = sns.dark_palette(_PALETTE.get(method, "C0"), len(labels) + 1, reverse=True)[:len(labels)]
    for ax, m in zip(axes, metrics):
        for color, (i, label) in zip(colors, enumerate(labels)):
            s = _stats(c[c["method"] == label], ["batch_size"], n_orderings(c) > 1)
            name = f"{method.upper()}, 1 layer" if i == 0 else f"{method.upper()}, {label.rsplit('-w', 1)[1]} layers"
            _line(ax, s["batch_size"], s, m, label=name, color=color, linestyle="-" if i == 0 else "--")
        _categorical_log_x(ax, sorted(c["batch_size"].unique().tolist()))
        ax.set_xlabel("batch size")
    _panel_titles(axes, metrics, band_label(c))
    _share_y(axes, metrics)
    _legend(axes[0], fontsize="small")
    return _note(fig, c)


def plot_sequential(cases: pd.DataFrame, method: str, title: str) -> Figure:
    """Figures 4 / 5: each fact scored right after its own batch (solid), and, when ``final`` rows
    exist, every fact scored on the final model (dashed: retention)."""
    c = _of_method(cases, method)
    cur, fin = c[c["eval"] == "current"], c[c["eval"] == "final"]
    metrics = _metrics(cur)
    s_cur = _stats(cur, ["batch_size"])
    s_fin = _stats(fin, ["batch_size"]) if not fin.empty else None
    color = _PALETTE.get(method)
    one = _one_batch_size(cur)
    fig, axes = _figure(len(metrics), title)
    for ax, m in zip(axes, metrics):
        _line(ax, s_cur["batch_size"], s_cur, m, label="right after its batch", color=color)
        if s_fin is not None:
            _line(ax, s_fin["batch_size"], s_fin, m, label="on the final model (retention)",
                  color=color, linestyle="--", marker="s", hollow=True, hatched=True)
        _categorical_log_x(ax, sorted(set(c["batch_size"].tolist())), one_batch=one)
        ax.set_xlabel("batch size (sequential batches)")
    _panel_titles(axes, metrics, band_label(c))
    _share_y(axes, metrics)
    _legend(axes[0], fontsize="small")
    return _note(fig, c)


def _size_colors(sizes: Sequence[int]) -> dict[int, tuple]:
    """One colour per batch size from an ordered palette (small B light, large B dark), distinct
    from the methods' colours."""
    sizes = sorted(sizes)
    return dict(zip(sizes, sns.color_palette("viridis_r", len(sizes) + 1)[1:]))


def _plain_log2_x(ax, unedited: bool = False) -> None:
    """A log2 x axis of facts edited with plain tick labels (8, 16, … not 2³, 2⁴; 0.5 reads "0":
    the unedited model)."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "0" if unedited and v == 0.5 else f"{v:g}"))


def _orderings_note(fig: Figure, frame: pd.DataFrame) -> None:
    """Bands over the orderings of ``frame``, when it has several: said under the title."""
    k = n_orderings(frame)
    if k > 1:
        _band_title(fig, f"±1 std over {k} orderings")


def _mean_sd(g: pd.DataFrame, cols: Sequence[str]) -> pd.DataFrame:
    """Per batch index: the mean over orderings of ``cols`` and their sample std (``<col>_sd``;
    NaN, no band, where fewer than two orderings measured it)."""
    agg = g.groupby("batch_index")[list(cols)].agg(["mean", "std"]).sort_index()
    out = pd.DataFrame({c: agg[(c, "mean")] for c in cols} | {f"{c}_sd": agg[(c, "std")] for c in cols})
    return out.reset_index()


def plot_sequential_diagnostics(batches: pd.DataFrame, method: str, title: str, *,
                                x: str = "edits") -> Figure:
    """‖W − W0‖_F/‖W0‖_F and cond(D) after each sequential batch (log y), one line per batch size,
    mean over orderings with a ±1 std band. ``x``: "edits" (facts edited so far, log2 axis: runs of
    every batch size compare at the same number of facts) or "batch_index" (0-based updates).
    cond(D) of a one-fact batch is 1 (D is 1 × 1), so B = 1 is left out of that panel."""
    b = _of_method(batches, method)
    panels = (("w_rel_dist", r"$\|W - W_0\|_F \,/\, \|W_0\|_F$"), ("cond_D", "cond(D) (B = 1 has 1)"))
    fig, axes = _figure(len(panels), title, width=4.6)
    colors = _size_colors(b["batch_size"].unique())
    for ax, (col, label) in zip(axes, panels):
        for B, g in b.groupby("batch_size"):
            if col == "cond_D" and B == 1:
                continue
            g = _mean_sd(g, [col])
            xs = g["batch_index"] if x == "batch_index" else (g["batch_index"] + 1) * B
            ax.plot(xs, g[col], color=colors[B], label=f"B={B}", marker="o" if len(g) <= 40 else None,
                    markersize=3, clip_on=False)
            lo = (g[col] - g[f"{col}_sd"]).where(lambda v: v > 0, g[col] / 10)  # log axis: no band below 0
            ax.fill_between(xs, lo, g[col] + g[f"{col}_sd"], color=colors[B], alpha=0.15, linewidth=0)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        if x == "batch_index":
            ax.set_xlabel("sequential update (batch index)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            _plain_log2_x(ax)
            ax.set_xlabel("facts edited so far")
    _legend(axes[0], title="batch size", fontsize="small")
    _orderings_note(fig, b)
    return _batch_note(fig, b, [c for c, _ in panels])


DEGRADATION = (("heldout_known", "held-out facts still known (%)"),
               ("heldout_margin", "held-out P(true) − P(new) (×100)"),
               ("heldout_ppl", "perplexity of held-out fact text"))


def has_degradation(batches: pd.DataFrame) -> bool:
    """Whether a sequential run measured degradation (``sequential.degradation_every``)."""
    return "heldout_known" in batches.columns and batches["heldout_known"].notna().any()


def _degradation_axis(ax, b: pd.DataFrame, col: str, label: str) -> None:
    """A degradation panel's frame: the unedited model as a dotted line and a grey point at "0"
    (not joined to the measurements: nothing was measured between), facts edited on a log2 axis,
    perplexity on a log axis (one collapsed run would flatten the others), the share of facts
    still known within [0, 100]."""
    _plain_log2_x(ax, unedited=True)
    if len(b):
        base = float(b[f"{col}_0"].mean())
        ax.axhline(base, color="0.5", linestyle=":", linewidth=1)
        ax.plot([0.5], [base], color="0.5", marker="o", markersize=4, linestyle="none", clip_on=False)
        # ticks at the unedited model's "0" and at powers of 2 up to the last measurement
        top = math.log2(max(float(((b["batch_index"] + 1) * b["batch_size"]).max()), 1.0))
        ax.set_xticks([0.5] + [2.0 ** k for k in range(0, int(top) + 1, max(1, math.ceil(top / 6)))])
    ax.set_xlabel("facts edited so far")
    ax.set_ylabel(label)
    if col == "heldout_ppl":
        ax.set_yscale("log")
        # plain numbers (3, 4, 10, 100; not 3×10⁰), minor ones only where the axis spans little
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.5)))
    if col == "heldout_known":
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 100.0))


def _degradation_line(ax, m: pd.DataFrame, col: str, B: int, **style) -> None:
    """One run's measurements ``m`` (:func:`_mean_sd`: mean over orderings, a ±1 std band where
    two or more measured) at the facts edited so far."""
    xs = ((m["batch_index"] + 1) * B).to_numpy(dtype=float)
    ys, sd = m[col].to_numpy(dtype=float), m[f"{col}_sd"].to_numpy(dtype=float)
    (ln,) = ax.plot(xs, ys, markersize=3, clip_on=False, **style)
    lo, hi = ys - sd, ys + sd
    if col == "heldout_known":
        lo, hi = np.clip(lo, 0, 100), np.clip(hi, 0, 100)
    ax.fill_between(xs, lo, hi, color=ln.get_color(), alpha=0.15, linewidth=0)


def _lies_on(drawn: Mapping, ys: np.ndarray):
    """The key of a line already drawn that ``ys`` lies on (the same measurements within
    :data:`COINCIDE`), or None: the new line gets open markers so that both stay visible."""
    return next((k for k, d in drawn.items() if len(d) == len(ys) and np.nanmax(np.abs(d - ys)) <= COINCIDE),
                None)


def plot_degradation(batches: pd.DataFrame, methods: Sequence[str], title: str, *,
                     ylims: Mapping[str, tuple[float, float]] | None = None) -> Figure:
    """Model degradation vs facts edited so far (log2 axis; the unedited model a grey point at 0
    and a dotted line): held-out known facts, their margin, and perplexity; one colour per batch
    size, one line style per method (editlib.degradation); mean over orderings with a ±1 std band
    when there are several. ``ylims``: column -> y range, so that sibling figures share scales."""
    b = batches[batches["method"].isin(methods) & batches["heldout_known"].notna()]
    fig, axes = _figure(len(DEGRADATION), title, width=4.4)
    colors = _size_colors(b["batch_size"].unique())
    for ax, (col, label) in zip(axes, DEGRADATION):
        for method in _methods(b):
            ls, mk = _STYLE.get(method, ("-", "o"))
            drawn: dict[int, np.ndarray] = {}
            for B, g in b[b["method"] == method].groupby("batch_size"):
                m = _mean_sd(g, [col])
                ys = m[col].to_numpy(dtype=float)
                _degradation_line(ax, m, col, B, color=colors[B], linestyle=ls, marker=mk,
                                  label=f"{_name(method)} B={B}",
                                  markerfacecolor="none" if _lies_on(drawn, ys) is not None else colors[B])
                drawn[B] = ys
        _degradation_axis(ax, b, col, label)
        if ylims and col in ylims:
            ax.set_ylim(*ylims[col])
    _legend(axes[0], ncols=4, fontsize="small")
    _orderings_note(fig, b)
    return _batch_note(fig, b, [c for c, _ in DEGRADATION])


def degradation_ylims(batches: pd.DataFrame, methods: Sequence[str]) -> dict[str, tuple[float, float]]:
    """One y range per degradation panel over ``methods`` (their means and bands, and the unedited
    model), for sibling figures of one run to share: a dip of one held-out fact must not fill one
    editor's panel while it is invisible in another's."""
    b = batches[batches["method"].isin(methods) & batches["heldout_known"].notna()]
    out = {}
    for col, _ in DEGRADATION:
        vals = [b[f"{col}_0"].to_numpy(dtype=float)]
        for _, g in b.groupby(["method", "batch_size"]):
            m = _mean_sd(g, [col])
            sd = m[f"{col}_sd"].fillna(0).to_numpy(dtype=float)
            vals += [m[col].to_numpy(dtype=float) - sd, m[col].to_numpy(dtype=float) + sd]
        v = np.concatenate(vals)
        v = v[np.isfinite(v)]
        if col == "heldout_ppl":
            v = v[v > 0]
            lo, hi = float(v.min()) / 1.1, float(v.max()) * 1.1
        else:
            pad = 0.05 * max(float(v.max() - v.min()), 1.0)
            lo, hi = float(v.min()) - pad, float(v.max()) + pad
            if col == "heldout_known":
                lo, hi = max(lo, 0.0), min(hi, 100.0)
        out[col] = (lo, hi)
    return out


# --------------------------------------------------------------------------- beyond the paper (notebook 07)

def _name(method: str) -> str:
    from .beyond import display
    return display(method)


def _editor_stats(c: pd.DataFrame, methods: Sequence[str], over: bool) -> dict[str, pd.DataFrame]:
    """Per editor present in ``c`` (in ``methods``' order): its :func:`_stats` by batch size."""
    return {m: _stats(c[c["method"] == m], ["batch_size"], over) for m in methods if (c["method"] == m).any()}


def _editor_label(method: str, covered: Mapping[str, tuple[str, list]]) -> str:
    if method not in covered:
        return _name(method)
    a, shared = covered[method]
    at = "" if len(shared) > 1 else f" at B = {shared[0]:g}"
    return f"{_name(method)} (= {_name(a)}{at})"


def plot_editors_batch(cases: pd.DataFrame, methods: Sequence[str], title: str) -> Figure:
    """Figures 2-3 for several editors at once: metrics after one batch edit vs batch size, one
    line per editor (ROME, which edits one fact, is a point at B = 1); bands per :func:`_stats`."""
    c = _current(cases[cases["method"].isin(methods)])
    metrics = _metrics(c)
    fig, axes = _figure(len(metrics), title)
    stats = _editor_stats(c, methods, n_orderings(c) > 1)
    covered = _covered_by(stats, metrics)
    for ax, m in zip(axes, metrics):
        for method, s in stats.items():
            ls, mk = _STYLE.get(method, ("-", "o"))
            _line(ax, s["batch_size"], s, m, label=_editor_label(method, covered), color=_PALETTE.get(method),
                  linestyle=ls, marker=mk, hollow=method in covered, alpha=0.1)
        _categorical_log_x(ax, sorted(c["batch_size"].unique().tolist()))
        ax.set_xlabel("batch size")
    _panel_titles(axes, metrics, band_label(c))
    _share_y(axes, metrics)
    _legend(axes[0], title="editor", fontsize="small")
    return _note(fig, c)


def plot_editors_sequential(cases: pd.DataFrame, methods: Sequence[str], title: str) -> Figure:
    """Figures 4-5 for several editors: top row, each fact scored right after its own batch; bottom
    row (when ``final`` rows exist), every fact on the final model (retention). One line per editor."""
    c = cases[cases["method"].isin(methods)]
    rows = [("current", "right after its batch")] + ([("final", "on the final model")]
                                                     if (c["eval"] == "final").any() else [])
    metrics = _metrics(c)
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(3.6 * len(metrics), 3.1 * len(rows)), layout="constrained")
        grid = fig.subplots(len(rows), len(metrics), squeeze=False)
    _suptitle(fig, title)
    band = band_label(c)
    sizes = sorted(c["batch_size"].unique().tolist())
    one = _one_batch_size(c[c["eval"] == "current"])
    for r, (ev, what) in enumerate(rows):
        ce = c[c["eval"] == ev]
        stats = _editor_stats(ce, methods, n_orderings(c) > 1)
        covered = _covered_by(stats, metrics)
        for ax, m in zip(grid[r], metrics):
            for method, s in stats.items():
                ls, mk = _STYLE.get(method, ("-", "o"))
                _line(ax, s["batch_size"], s, m, label=_editor_label(method, covered), color=_PALETTE.get(method),
                      linestyle=ls, marker=mk, hollow=method in covered, alpha=0.1)
            _categorical_log_x(ax, sizes, one_batch=one)
            ax.set_xlabel("batch size (sequential batches)")
            ax.set_title(f"{NAMES[m]}, {what}", fontsize="medium")
            ax.set_ylabel(_ylabel(m, band))
        _share_y(list(grid[r]), metrics)
    _band_title(fig, band)
    _legend(grid[0][0], title="editor", fontsize="small")
    return _note(fig, c)


def plot_degradation_overlay(batches: pd.DataFrame, best: dict[str, int], title: str) -> Figure:
    """Degradation vs facts edited so far, one line per editor at its best sequential batch size
    (``best``: method -> B), mean over orderings with a ±1 std band when there are several."""
    fig, axes = _figure(len(DEGRADATION), title, width=4.4)
    b = batches[batches["heldout_known"].notna()] if "heldout_known" in batches.columns else batches.iloc[:0]
    for ax, (col, label) in zip(axes, DEGRADATION):
        drawn: dict[str, np.ndarray] = {}
        for method, B in best.items():
            g = b[(b["method"] == method) & (b["batch_size"] == B)]
            if g.empty:
                continue
            ls, mk = _STYLE.get(method, ("-", "o"))
            m = _mean_sd(g, [col])
            ys = m[col].to_numpy(dtype=float)
            same = _lies_on(drawn, ys)
            name = f"{_name(method)} B={B}" + (f" (= {_name(same)})" if same else "")
            _degradation_line(ax, m, col, B, color=_PALETTE.get(method), linestyle=ls, marker=mk,
                              label=name, **({"markerfacecolor": "none"} if same else {}))
            drawn[method] = ys
        _degradation_axis(ax, b, col, label)
    _legend(axes[0], fontsize="small", title="editor at its best B", title_fontsize="small")
    _orderings_note(fig, b)
    shown = b[b[["method", "batch_size"]].apply(tuple, axis=1).isin(list(best.items()))] if len(b) else b
    return _batch_note(fig, shown, [c for c, _ in DEGRADATION])


def plot_sweep(cases: pd.DataFrame, method: str, title: str) -> Figure:
    """Tables 3 / 4 as a figure: metrics vs λ (symlog axis when λ = 0 is in the grid)."""
    c = _current(_of_method(cases, method))
    metrics = _metrics(c)
    s = _stats(c, ["lam"])
    fig, axes = _figure(len(metrics), title)
    for ax, m in zip(axes, metrics):
        _line(ax, s["lam"], s, m, label=method.upper(), color=_PALETTE.get(method))
        _lambda_axis(ax, s["lam"].tolist())
        ax.set_xlabel("λ")
    _panel_titles(axes, metrics, band_label(c))
    _share_y(axes, metrics)
    return _note(fig, c)


# --------------------------------------------------------------------------- saving

def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (dpi 150) and ``<stem>.pdf`` into ``out_dir``, each atomically (drawn in
    memory, then renamed into place: a run stopped mid-write leaves the old file, never half a new
    one); return the paths."""
    out = Path(out_dir)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    png, pdf = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=150, metadata={"Software": None})
    with matplotlib.rc_context({"pdf.fonttype": 42}):  # TrueType, not Type 3: what publishers accept
        fig.savefig(pdf, format="pdf", metadata={"CreationDate": None, "Creator": None, "Producer": None})
    atomic_write_bytes(paths[0], png.getvalue())
    atomic_write_bytes(paths[1], pdf.getvalue())
    return paths


def save_json(obj, out_dir: str | Path, name: str) -> Path:
    """``obj`` as indented JSON in ``out_dir/name``, written atomically (a record beside the figures,
    such as notebook 01's ``best_layer.json``); returns the path."""
    path = Path(out_dir) / name
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))
    return path


def _md_cell(v) -> str:
    text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame, *, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (header, separator, one line per row)."""
    if index:
        df = df.reset_index()
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_md_cell(c) for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, out_dir: str | Path, stem: str) -> list[Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` into ``out_dir``, each atomically; return the paths."""
    out = Path(out_dir)
    paths = [out / f"{stem}.csv", out / f"{stem}.md"]
    atomic_write_bytes(paths[0], df.to_csv(index=False).encode("utf-8"))
    atomic_write_bytes(paths[1], to_markdown(df).encode("utf-8"))
    return paths


# --------------------------------------------------------------------------- tables

def _table_metrics(formatted: pd.DataFrame) -> list[str]:
    return [m for m in ("ES", "PS", "NS", "GE") if m in formatted.columns] + ["S"]


def format_lambda(lam: float) -> str:
    """λ as the paper writes it: ``0``, ``1``, ``1×10^1``, ``5×10^4``, ``1×10^-2``."""
    if lam == 0:
        return "0"
    mant, exp = f"{lam:.6e}".split("e")
    mant, exp = f"{float(mant):g}", int(exp)
    return mant if exp == 0 else f"{mant}×10^{exp}"


def table1(cases: pd.DataFrame) -> pd.DataFrame:
    """Table 1: singular edits at the chosen layer, one row per method (MEMIT first)."""
    c = _current(cases)
    f = format_summary(summarize_cases(c, by="method"))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    f = f.iloc[sorted(range(len(f)), key=lambda i: order.get(f["method"].iloc[i], 99))]
    out = pd.DataFrame({"Algorithm": f["method"].str.upper()})
    for m in _table_metrics(f):
        out[m] = f[m]
    for col in ("failed", "jittered"):
        if col in f.columns:
            out[col] = f[col]
    over = s_over_orderings(c, ["method"])  # several orderings only: one-ordering tables unchanged
    if over is not None:
        out["S over orderings"] = [over[i] for i in f.index]
    return out.reset_index(drop=True)


def sweep_table(cases: pd.DataFrame, method: str) -> pd.DataFrame:
    """Tables 3 / 4: one row per λ (ascending) with ``Lambda`` as printed and numeric ``lam``."""
    c = _current(_of_method(cases, method))
    s = summarize_cases(c, by="lam")
    f = format_summary(s)
    out = pd.DataFrame({"Lambda": [format_lambda(l) for l in s["lam"]], "lam": s["lam"].astype(float)})
    for m in _table_metrics(f):
        out[m] = f[m].to_numpy()
    for col in ("failed", "jittered"):
        if col in f.columns:
            out[col] = f[col].to_numpy()
    over = s_over_orderings(c, ["lam"])
    if over is not None:
        out["S over orderings"] = over
    return out


def table2(sizes, batches: pd.DataFrame | None = None) -> pd.DataFrame:
    """Table 2: batch size, number of batches and total edits of the sequential-batch runs.
    ``sizes``: the stored experiment's spec (``StoredResult.spec``: what ran, as the report reads
    it) or the StudyParams that are running it (their ``sequential`` section). With ``batches``
    (the diagnostics frame), also the batches actually run per method."""
    if not isinstance(sizes, Mapping):
        sizes = {"total": sizes.sequential.total, "batch_sizes": sizes.sequential.batch_sizes}
    total, sizes = int(sizes["total"]), [int(b) for b in sizes["batch_sizes"]]
    out = pd.DataFrame({"Batch Size": sizes, "Num Batches": [math.ceil(total / b) for b in sizes],
                        "Total Edits": [total] * len(sizes)})
    if batches is not None and not batches.empty:
        done = batches.groupby(["method", "batch_size"])["batch_index"].nunique().unstack(0)
        for m in done.columns:
            out[f"run ({m.upper()})"] = [int(done[m].get(b, 0)) if not pd.isna(done[m].get(b, 0)) else 0
                                         for b in sizes]
    return out


def retention_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Sequential-batch editing: scores right after each batch (``current``) and on the final model
    (``final``) per method and batch size."""
    c = cases[cases["eval"].isin(["current", "final"])]
    f = format_summary(summarize_cases(c, by=["method", "batch_size", "eval"]))
    out = pd.DataFrame({"Method": f["method"].str.upper(), "Batch Size": f["batch_size"],
                        "Evaluated": f["eval"].map({"current": "after its batch", "final": "final model"})})
    for m in _table_metrics(f):
        out[m] = f[m]
    for col in ("failed", "jittered"):
        if col in f.columns:
            out[col] = f[col]
    over = s_over_orderings(c, ["method", "batch_size", "eval"])  # several orderings only
    if over is not None:
        out["S over orderings"] = over
    return out.reset_index(drop=True)


FAILURE_COLUMNS = ("experiment", "configuration", "cases", "failed", "first reason", "jittered", "max τ (rel.)",
                   "singular solves")


def failure_table(cases_by_experiment: dict[str, pd.DataFrame],
                  failed_units: dict[str, dict[str, dict]] | None = None,
                  incomplete: dict[str, int] | None = None) -> pd.DataFrame:
    """Failed edits, regularised solves and numerically singular ones (edited rows whose solve
    missed the method's equations, :func:`editlib.metrics.singular_rows`) per experiment and
    configuration (method, layer, λ, batch size), counted on the rows scored right after their
    edit; one row per configuration with any of them, or one "none" row per experiment — so a
    report always says. A
    later evaluation of a sequential run (``eval`` final, after_N) with more failed facts than
    right after their edits adds a row of its own, counting those facts (the later model's doing,
    e.g. its logits overflowed) and giving their first reason.
    ``failed_units`` (experiment -> unit -> {error, ...}, :func:`editlib.reproduce.stored_failed_units`):
    units of work that failed on every try add one row each (their cases are missing, not failed).
    ``incomplete`` (experiment -> units saved, :func:`editlib.reproduce.incomplete_experiments`):
    one row each for experiments started but not finished. With nothing at all, one row says so."""
    rows = []

    def row(exp: str, configuration: str, cases: int = 0, failed: int = 0, reason: str = "", jittered: int = 0,
            tau: str = "", singular: int = 0) -> None:
        rows.append(dict(zip(FAILURE_COLUMNS, (exp, configuration, cases, failed, reason, jittered, tau, singular))))

    for exp, saved in (incomplete or {}).items():
        row(exp, f"incomplete: {saved} unit(s) saved, no results consolidated (rerun its notebook to resume)",
            reason="not finished")
    for exp, units in (failed_units or {}).items():
        for unit, info in sorted(units.items()):
            row(exp, f"unit {unit} (not run: no cases stored)",
                reason=str(info.get("error", "")).splitlines()[0][:200] if info.get("error") else "failed")
    keys = ("method", "layer", "lam", "batch_size")
    for exp, cases in cases_by_experiment.items():
        c = cases[cases["eval"] == "current"] if "eval" in cases.columns else cases
        by = [k for k in keys if k in c.columns]
        found = False
        for key, g in (c.groupby(by, sort=True, dropna=False) if by else [((), c)]):
            key = key if isinstance(key, tuple) else (key,)
            bad = failed_rows(g)
            jit = g["solve_jitter"].to_numpy(dtype=float) if "solve_jitter" in g.columns else np.zeros(len(g))
            singular = singular_rows(g) & ~bad
            if not bad.any() and not (jit > 0).any() and not singular.any():
                continue
            found = True
            row(exp, ", ".join(f"{k}={v}" for k, v in zip(by, key)), len(g), int(bad.sum()),
                g["fail_reason"][bad].iloc[0] if bad.any() and "fail_reason" in g.columns else "",
                int((jit > 0).sum()), f"{jit.max():.1g}" if (jit > 0).any() else "", int(singular.sum()))
        later = sorted(set(cases["eval"]) - {"current"}, key=str) if "eval" in cases.columns else []
        fact = [k for k in (*by, "ordering", "case_id") if k in cases.columns]
        failed_now = set(map(tuple, c.loc[failed_rows(c), fact].itertuples(index=False))) if later else set()
        for ev in later:
            e = cases[cases["eval"] == ev]
            for key, g in (e.groupby(by, sort=True, dropna=False) if by else [((), e)]):
                key = key if isinstance(key, tuple) else (key,)
                # facts that fail here but did not right after their own edit (the later model's doing)
                new = failed_rows(g) & ~np.array([t in failed_now for t in map(tuple, g[fact].itertuples(index=False))],
                                                 dtype=bool)
                if not new.any():
                    continue
                found = True
                row(exp, ", ".join([f"{k}={v}" for k, v in zip(by, key)] + [f"eval={ev}"]), len(g), int(new.sum()),
                    g["fail_reason"][new].iloc[0] if "fail_reason" in g.columns else "")
        if not found:
            row(exp, "all", len(c), reason="none")
    if not rows:
        row("(none)", "no experiment stored")
    return pd.DataFrame(rows, columns=list(FAILURE_COLUMNS))


_PAPER_T1 = [("MEMIT", "100.0", "98.05", "85.61", "615.09", "94.10"),
             ("ROME", "100.0", "98.05", "85.73", "614.42", "94.15")]
_PAPER_T3 = [
    ("1", 1, "100.0(0.0)", "98.05(11.34)", "85.61(21.93)", "615.09(32.01)", "94.10"),
    ("1×10^1", 1e1, "100.0(0.0)", "98.05(10.89)", "85.73(21.87)", "614.42(36.04)", "94.15"),
    ("1×10^2", 1e2, "92.63(26.13)", "89.79(24.72)", "53.03(32.23)", "541.56(70.60)", "73.55"),
    ("1×10^3", 1e3, "93.36(24.9)", "89.43(24.49)", "52.86(32.41)", "521.97(84.59)", "73.51"),
    ("1×10^4", 1e4, "93.51(24.64)", "88.99(25.14)", "53.00(32.30)", "537.32(72.02)", "73.53"),
    ("5×10^4", 5e4, "97.71(14.97)", "92.7(22.73)", "73.19(29.41)", "611.48(23.34)", "86.49"),
    ("1×10^5", 1e5, "88.04(32.45)", "81.74(34.71)", "80.15(25.77)", "615.28(21.18)", "83.17"),
    ("5×10^5", 5e5, "43.6(49.59)", "39.79(44.07)", "87.05(20.45)", "616.78(18.12)", "50.37"),
    ("1×10^6", 1e6, "33.15(47.08)", "31.18(41.44)", "87.64(20.04)", "617.04(17.98)", "40.73"),
]
_PAPER_T4 = [
    ("0", 0.0, "94.09(23.58)", "90.14(24.06)", "53.5(31.31)", "545.84(68.7)", "74.23"),
    ("1×10^{-2}", 1e-2, "70.56(45.58)", "68.16(38.93)", "52.56(35.89)", "563.84(58.55)", "62.67"),
    ("1×10^{-3}", 1e-3, "79.39(40.45)", "76.27(34.24)", "51.39(33.96)", "487.69(93.56)", "66.42"),
    ("1×10^{-4}", 1e-4, "89.99(30.01)", "85.72(27.64)", "52.08(31.7)", "522.15(77.4)", "71.46"),
    ("1×10^{-5}", 1e-5, "92.33(26.61)", "86.72(27.19)", "51.86(31.14)", "530.25(75.91)", "72.04"),
    ("1×10^{-6}", 1e-6, "93.60(24.47)", "90.75(23.46)", "52.08(31.81)", "529.64(80.43)", "73.34"),
    ("1×10^{-7}", 1e-7, "93.95(23.85)", "90.11(24.13)", "52.05(31.42)", "529.02(82.7)", "73.25"),
]


def paper_reference_tables() -> dict[str, pd.DataFrame]:
    """The paper's Tables 1, 3, 4 (Llama-3-8B, CounterFact) as printed, strings verbatim; the
    sweep tables also carry the numeric ``lam``."""
    cols = ["ES", "PS", "NS", "GE", "S"]
    return {"table1": pd.DataFrame(_PAPER_T1, columns=["Algorithm", *cols]),
            "table3": pd.DataFrame(_PAPER_T3, columns=["Lambda", "lam", *cols]),
            "table4": pd.DataFrame(_PAPER_T4, columns=["Lambda", "lam", *cols])}


def ours_labels(alignment: str, gen_text: str) -> dict[str, str]:
    """How the tables next to the paper's name our columns: "ours", and where our reading of a
    metric is not the one behind the paper's numbers, which it is (SPEC §6, §8.1: the paper's
    ES/PS/NS read the reference's BOS-shifted positions on Llama-3, its GE texts that keep the
    BOS string): ``evaluation.alignment`` and ``evaluation.gen_text`` other than ``reference``."""
    labels = {}
    if alignment != "reference":
        labels.update({m: "ours, correct alignment" for m in ("ES", "PS", "NS", "S")})
    if gen_text != "reference":
        labels["GE"] = "ours, clean text"
    return labels


def table_vs_paper(cases: pd.DataFrame, make, paper: pd.DataFrame, on: str, alignment: str,
                   gen_text: str) -> pd.DataFrame:
    """Our table of ``cases`` (``make``: :func:`table1`, or a sweep table) next to the paper's
    (:func:`compare_with_paper`, labelled by :func:`ours_labels`), and, where the cases hold a
    second alignment's scores (``evaluation.also_alignment``), that alignment's ES, PS, NS and S
    beside ours: the paper's reading and the correct one from the same edits."""
    also = {a: make(with_alignment(cases, a)) for a in alignments_in(cases)}
    return compare_with_paper(make(cases), paper, on, ours_labels(alignment, gen_text), also=also)


def compare_with_paper(ours: pd.DataFrame, paper: pd.DataFrame, on: str,
                       labels: dict[str, str] | None = None,
                       also: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Side by side: ``<metric> (ours)`` and ``<metric> (paper)`` for every metric of either table,
    rows matched on ``on`` ("Algorithm" or "lam"); a missing value is left empty. ``labels``
    (:func:`ours_labels`): a metric's own name for "ours", e.g. "ours, correct alignment". Our
    ``failed`` count comes along as ``failed (ours)`` (our means leave those edits out; "0": none
    failed). ``also``: per second alignment, our table scored that way, whose ES, PS, NS and S
    follow ours as ``<metric> (ours, <alignment> alignment)``."""
    labels = labels or {}
    metrics = [m for m in ("ES", "PS", "NS", "GE", "S") if m in ours.columns or m in paper.columns]
    failed = ["failed"] if "failed" in ours.columns else []
    mine = {m: f"{m} ({labels.get(m, 'ours')})" for m in metrics}
    def keyed(t: pd.DataFrame) -> pd.DataFrame:  # λ matched as a number, whatever each table stores
        return t.assign(lam=t["lam"].astype(float)) if on == "lam" else t

    a = keyed(ours[[on] + [m for m in metrics if m in ours.columns] + failed].rename(
        columns={**mine, "failed": "failed (ours)"}))
    b = keyed(paper[[on] + [m for m in metrics if m in paper.columns]].rename(columns={m: f"{m} (paper)" for m in metrics}))
    out = a.merge(b, on=on, how="outer").sort_values(on, kind="stable") if on == "lam" else a.merge(b, on=on, how="outer")
    theirs: dict[str, list[str]] = {m: [] for m in metrics}
    for alignment, t in (also or {}).items():
        names = {m: f"{m} (ours, {alignment} alignment)" for m in ("ES", "PS", "NS", "S") if m in t.columns and m in metrics}
        out = out.merge(keyed(t[[on, *names]].rename(columns=names)), on=on, how="left")
        for m, name in names.items():
            theirs[m].append(name)
    if on == "lam":
        out.insert(0, "Lambda", [format_lambda(l) for l in out["lam"]])
    cols = [c for c in out.columns if c in ("Lambda", on)]
    for m in metrics:
        cols += [c for c in (mine[m], *theirs[m], f"{m} (paper)") if c in out.columns]
    cols += [f"{c} (ours)" for c in failed]
    return out[cols].fillna("").reset_index(drop=True)
