"""A run's stored results as summary tables (``python -m editlib show``), and two runs side by
side (``python -m editlib compare``). Reads ``cases.parquet`` only: no model, no params file.

Each experiment is summarised by its own configuration columns (the paper's tables): the layer
search by method and layer, Table 1 by method, the λ sweep by method and λ, batch editing by method
and batch size, sequential editing by method, batch size and evaluation (current / final).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .beyond import s_over_orderings
from .metrics import format_summary, summarize_cases

#: experiment (folder name before any "-<second model>") -> its configuration columns
KEYS = {"layer_search": ["method", "layer"], "singular": ["method", "layer"],
        "sweep": ["method", "lam"], "batch": ["method", "batch_size"],
        "sequential": ["method", "batch_size", "eval"]}
SCORES = ["ES", "PS", "NS", "S"]


class SummaryError(ValueError):
    """A run folder with nothing to show (exit 2 on the command line)."""


def run_experiments(run_dir: str | Path) -> dict[str, Path]:
    """Experiment name -> its folder, for every finished experiment of a run folder
    (``results/<name>``), in the study's order. Fails with one line when there is none."""
    root = Path(run_dir)
    if not root.is_dir():
        raise SummaryError(f"{root}: no such run folder (expected results/<params name>)")
    found = {d.name: d for d in root.iterdir() if (d / "cases.parquet").is_file()}
    if not found:
        subs = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())) or "nothing"
        raise SummaryError(f"{root}: no finished experiment (no */cases.parquet; found {subs})")
    from .reproduce import EXPERIMENT_ORDER

    rank = {e: i for i, e in enumerate(EXPERIMENT_ORDER)}
    return {e: found[e] for e in sorted(found, key=lambda e: (rank.get(e.split("-", 1)[0], 99), e))}


def _config_keys(cases: pd.DataFrame, experiment: str) -> list[str]:
    """The configuration columns of ``experiment`` present in ``cases``."""
    return [k for k in KEYS.get(experiment.split("-", 1)[0], ["method"]) if k in cases.columns]


def experiment_summary(cases: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Numeric summary (n, n_failed, S, <metric>_mean/_std) per configuration of ``experiment``."""
    return summarize_cases(cases, by=_config_keys(cases, experiment) or None)


def show(run_dir: str | Path) -> str:
    """Every finished experiment's summary table, as the paper prints them (mean(std) ×100)."""
    parts = []
    for exp, d in run_experiments(run_dir).items():
        cases = pd.read_parquet(d / "cases.parquet")
        t = format_summary(experiment_summary(cases, exp))
        t = t[[c for c in t.columns if not c.endswith(("_mag", "_acc"))]]  # the paper's columns
        over = s_over_orderings(cases, _config_keys(cases, exp))  # several orderings: mean ± std of the per-ordering S
        if over is not None:
            t["S over orderings"] = over
        parts.append(f"== {exp} ({d})\n{t.to_string(index=False)}")
    return "\n\n".join(parts)


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """The experiments both runs finished, configuration by configuration: each run's n, failed (its
    edits without scores, left out of its means), ES, PS, NS and S (means ×100) and S(b) − S(a).
    Configurations only one run has are shown with blanks."""
    a, b = run_experiments(run_a), run_experiments(run_b)
    common = [e for e in a if e in b]
    if not common:
        raise SummaryError(f"{run_a} and {run_b} have no finished experiment in common "
                         f"({', '.join(a)} vs {', '.join(b)})")
    la, lb = Path(run_a).name, Path(run_b).name
    if la == lb:
        la, lb = str(run_a), str(run_b)
    parts = []
    for exp in common:
        sa = experiment_summary(pd.read_parquet(a[exp] / "cases.parquet"), exp)
        sb = experiment_summary(pd.read_parquet(b[exp] / "cases.parquet"), exp)
        keys = [k for k in KEYS.get(exp.split("-", 1)[0], ["method"]) if k in sa.columns and k in sb.columns]
        cols = ["n", "n_failed"] + [f"{m}_mean" for m in SCORES[:3]] + ["S"]
        m = pd.merge(sa[keys + cols], sb[keys + cols], on=keys, how="outer", suffixes=(" a", " b"))
        m["ΔS"] = m["S b"] - m["S a"]
        for c in ("n a", "n b", "n_failed a", "n_failed b"):  # counts stay integers; blank where the run lacks the configuration
            m[c] = m[c].map(lambda v: "" if pd.isna(v) else str(int(v)))
        m = m.rename(columns={f"{s}_mean{x}": f"{s}{x}" for s in SCORES[:3] for x in (" a", " b")})
        m = m.rename(columns={f"n_failed{x}": f"failed{x}" for x in (" a", " b")})
        order = keys + [f"{c}{x}" for x in (" a", " b") for c in ("n", "failed", "ES", "PS", "NS", "S")] + ["ΔS"]
        parts.append(f"== {exp}   a = {la}, b = {lb}\n"
                     + m[order].to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep=""))
    only = sorted(set(a) ^ set(b))
    if only:
        parts.append("only in one run: " + ", ".join(only))
    return "\n\n".join(parts)
