"""CounterFact metrics ES / PS / NS (+ magnitudes and accuracies), GE, RS and S (SPEC §6).

Per case (:func:`evaluate_records`), from the teacher-forced mean-token NLLs of ``" " + target_new``
and ``" " + target_true`` after every prompt (:func:`editlib.scoring.score_targets`):

* ES / PS: share of rewrite prompts / paraphrases with NLL_new < NLL_true (P(new) > P(true));
  NS: share of neighbourhood prompts with NLL_true < NLL_new (the true target still wins).
* ``*_mag`` ("diff"): rewrite/paraphrase mean of exp(-NLL_new) - exp(-NLL_true), neighbourhood
  mean of exp(-NLL_true) - exp(-NLL_new); exp(-mean NLL) is the geometric-mean token probability.
* ``*_acc``: share of prompts whose expected target (new for rewrite/paraphrase, true for
  neighbourhood) has every token as the argmax.
* GE (optional): mean n-gram entropy (bits) of the case's sampled generations; RS (only with
  user-supplied ROME files): TF-IDF consistency of those generations (:mod:`editlib.rs`).

:func:`summarize_cases` aggregates like the reference ``summarize.py``: mean and population std
over cases, x100, rounded to 2 decimals, and S = harmonic mean of the ES, PS, NS means.

``also_alignment`` (``evaluation.also_alignment``) scores the probability tests a second time under
the other BOS alignment (SPEC §8.1) in the same evaluation, into columns ``ES@reference`` and so on
(:func:`alignment_column`): the paper's reading and the correct one from one run, the edits, values
and GE computed once. :func:`with_alignment` reads a frame as if it had been scored that way.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import hmean

from .generation import ngram_entropy, sample_texts
from .records import Record, RecordError
from .scoring import ALIGNMENTS, score_pairs

FAMILIES = ("rewrite", "paraphrase", "neighborhood")
SHORT = {"rewrite": "ES", "paraphrase": "PS", "neighborhood": "NS"}
PROB_METRICS = ("ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag", "ES_acc", "PS_acc", "NS_acc")
METRICS = (*PROB_METRICS, "GE", "RS")
#: why a case evaluated without an edit failure has no scores (see :func:`evaluate_records`)
NONFINITE_REASON = "the model's outputs are not finite (NaN/inf logits) on this case's prompts"
_NONFINITE = "_nonfinite"  # internal: per case, some scored or sampled logit was NaN/inf


def check_also_alignment(alignment: str, also: str | None) -> None:
    """``also`` (``evaluation.also_alignment``) is None or the alignment other than ``alignment``:
    ValueError otherwise."""
    if also is not None and (also not in ALIGNMENTS or also == alignment):
        raise ValueError(f"also_alignment must be the alignment other than {alignment!r} "
                         f"({', '.join(ALIGNMENTS)}), got {also!r}")


def alignment_column(metric: str, alignment: str) -> str:
    """The column of ``metric`` (one of :data:`PROB_METRICS`) scored under the second alignment."""
    return f"{metric}@{alignment}"


def alignments_in(cases: pd.DataFrame) -> list[str]:
    """The second alignments whose columns ``cases`` holds (``evaluation.also_alignment``)."""
    return [a for a in ALIGNMENTS if alignment_column("ES", a) in cases.columns]


def with_alignment(cases: pd.DataFrame, alignment: str) -> pd.DataFrame:
    """``cases`` with its ``<metric>@<alignment>`` columns in place of ES, PS, NS and their
    magnitudes and accuracies (every other column, ``failed`` included, as it is), so that every
    summary and table reads the second alignment's scores. A row without them (its logits were
    not finite under that alignment alone, or it comes from a run without that option, concatenated
    with one) has no scores there: summaries count it as failed, and a ``RuntimeWarning`` says how
    many scored rows that makes."""
    cols = {alignment_column(m, alignment): m for m in PROB_METRICS if m in cases.columns}
    missing = [c for c in cols if c not in cases.columns]
    if missing or not cols:
        raise ValueError(f"the cases hold no {alignment!r} alignment scores (no column "
                         f"{missing[0] if missing else alignment_column('ES', alignment)}; "
                         f"evaluation.also_alignment: {alignment} writes them)")
    es = alignment_column("ES", alignment)
    lost = int((cases["ES"].notna() & cases[es].isna()).sum()) if "ES" in cases.columns else 0
    if lost:
        warnings.warn(f"{lost} of {len(cases)} rows have an ES but none under the {alignment!r} alignment "
                      f"(their logits were not finite under it, or they come from a run without "
                      f"evaluation.also_alignment: {alignment}): read under it they count as failed",
                      RuntimeWarning, stacklevel=2)
    out = cases.drop(columns=list(cols.values())).rename(columns=cols)
    out = out[[c for c in cases.columns if "@" not in c]]
    out.attrs = {**cases.attrs, "alignment": alignment}
    return out


@dataclass
class _Prompts:
    """All probability-test prompts of a record list, flattened, with their owner and family."""

    prefixes: list[str]
    new: list[str]
    true: list[str]
    owner: np.ndarray   # index of the record in the call
    family: np.ndarray  # index into FAMILIES


def _flatten(records: Sequence[Record], families: Sequence[str] = FAMILIES) -> _Prompts:
    prefixes, new, true, owner, family = [], [], [], [], []
    for i, r in enumerate(records):
        groups = ((r.rewrite_prompt,), r.paraphrase_prompts, r.neighborhood_prompts)
        for f, prompts in enumerate(groups):
            if FAMILIES[f] not in families:
                continue
            for p in prompts:
                prefixes.append(p)
                new.append(r.target_new.str)
                true.append(r.target_true.str)
                owner.append(i)
                family.append(f)
    return _Prompts(prefixes, new, true, np.asarray(owner, dtype=np.int64), np.asarray(family, dtype=np.int64))


def _case_mean(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Per-record mean of per-prompt values (NaN for a record without prompts)."""
    sums = np.bincount(owner, weights=values.astype(np.float64), minlength=n)
    counts = np.bincount(owner, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _probability_columns(model, tok, records: Sequence[Record], alignment: str,
                         batch_size: int, groups=None, deltas=None, below=None,
                         families: Sequence[str] = FAMILIES) -> dict[str, np.ndarray]:
    """ES/PS/NS (those of ``families``), magnitudes and accuracies per case; one scoring call for
    both targets (SPEC §6)."""
    t = _flatten(records, families)
    g = None if groups is None else np.asarray(groups, dtype=np.int64)[t.owner].tolist()
    s_new, s_true = score_pairs(model, tok, t.prefixes, t.new, t.true, alignment=alignment,
                                batch_size=batch_size, groups=g, deltas=deltas, below=below)
    bad = ~(np.isfinite(s_new.nll) & np.isfinite(s_true.nll))  # NaN/inf logits: no score, not a loss
    new_wins = s_new.nll < s_true.nll
    true_wins = s_true.nll < s_new.nll
    p_diff = np.exp(-s_new.nll) - np.exp(-s_true.nll)  # geometric-mean token probabilities (SPEC §6)
    out: dict[str, np.ndarray] = {}
    for f, fam in enumerate(FAMILIES):  # filled per family, returned in PROB_METRICS order
        if fam not in families:
            continue
        m, key = t.family == f, SHORT[fam]
        neighbourhood = fam == "neighborhood"
        success = true_wins if neighbourhood else new_wins
        mag = -p_diff if neighbourhood else p_diff
        acc = s_true.correct if neighbourhood else s_new.correct
        out[key] = _case_mean(success[m], t.owner[m], len(records))
        out[f"{key}_mag"] = _case_mean(mag[m], t.owner[m], len(records))
        out[f"{key}_acc"] = _case_mean(acc[m], t.owner[m], len(records))
    out = {k: out[k] for k in PROB_METRICS if k in out}
    out[_NONFINITE] = np.bincount(t.owner[bad], minlength=len(records)) > 0
    return out


def _generation_columns(model, tok, records: Sequence[Record], *, seed: int, max_len: int,
                        batch_size: int, rs_resources, groups=None, deltas=None,
                        max_kv_bytes: float | None = None, text: str = "clean",
                        decode: str = "transformers") -> dict[str, np.ndarray]:
    """GE (and RS) per case from one batched sampling call over all generation prompts."""
    prompts, owner, keys = [], [], []
    for i, r in enumerate(records):
        for j, p in enumerate(r.generation_prompts):
            prompts.append(p)
            owner.append(i)
            keys.append((r.case_id, j))  # per-prompt stream: same text whatever the batching
    extra = {} if groups is None else {"groups": np.asarray(groups, dtype=np.int64)[owner].tolist(),
                                       "deltas": deltas}
    texts, finite = sample_texts(model, tok, prompts, max_len=max_len, seed=seed, batch_size=batch_size,
                                 keys=keys, max_kv_bytes=max_kv_bytes, text=text, return_finite=True,
                                 decode=decode, **extra)
    owner_a = np.asarray(owner, dtype=np.int64)
    ent = np.asarray([ngram_entropy(x) for x in texts], dtype=np.float64)
    out = {"GE": _case_mean(ent, owner_a, len(records)),
           _NONFINITE: np.bincount(owner_a[~np.asarray(finite, dtype=bool)], minlength=len(records)) > 0}
    if rs_resources is not None:
        by_case: list[list[str]] = [[] for _ in records]
        for i, x in zip(owner, texts):
            by_case[i].append(x)
        out["RS"] = np.asarray([rs_resources.score(r, g) for r, g in zip(records, by_case)])
    return out


def check_generation_prompts(records: Sequence[Record], where: str = "") -> None:
    """GE is the mean over a case's generation prompts (SPEC §6): a record without any would have
    no GE, which a mean over cases would silently leave out. Fail, naming the records."""
    bare = [r.case_id for r in records if not r.generation_prompts]
    if bare:
        shown = ", ".join(map(str, bare[:5])) + (f" and {len(bare) - 5} more" if len(bare) > 5 else "")
        raise RecordError(f"evaluation.generation is on, but {len(bare)} record(s){where} have no generation_prompts "
                          f"(case_id {shown}): GE cannot be scored for them; turn generation off or use records "
                          "that have generation prompts")


def evaluate_records(model, tok, records: Sequence[Record], *, alignment: str = "correct",
                     batch_size: int = 128, generation: bool = False, gen_seed: int = 0,
                     gen_max_len: int = 100, gen_batch_size: int = 64, gen_kv_gb: float | None = None,
                     rs_resources=None, groups: Sequence[int] | None = None,
                     deltas=None, gen_text: str = "clean", below=None,
                     gen_decode: str = "transformers", families: Sequence[str] = FAMILIES,
                     also_alignment: str | None = None) -> pd.DataFrame:
    """One row per record: case_id, ES, PS, NS, ``*_mag``, ``*_acc`` (shares in [0, 1]) and, when
    ``generation``, GE (bits, not x100) and RS (only with ``rs_resources``, an
    :class:`editlib.rs.RSResources`). ``df.attrs`` holds ``records_per_s`` and ``seconds``.

    ``also_alignment``: the other alignment, whose ES, PS, NS, magnitudes and accuracies follow as
    ``ES@<alignment>`` ... (:func:`alignment_column`): a second scoring call, the same calls as an
    evaluation with ``alignment=also_alignment`` makes, so the same scores. Non-finite logits under
    the first alignment (or in GE) blank the whole case, as without it; under the second alone,
    only the second's columns (the case's own scores, and whether it counts as failed, stay as
    they would be without the option).

    ``groups[i]`` / ``deltas``: record i is evaluated under independent edit ``groups[i]`` of an
    active :class:`editlib.lowrank.RowDeltas` hook, so the records of many edits (each made on the
    unedited model) are evaluated in one call without writing a weight. ``gen_kv_gb``: at most
    this many GB of KV cache per generation batch (fewer rows than ``gen_batch_size`` if need be).
    ``gen_text``: how GE reads a generated text (:func:`editlib.generation.decode_text`);
    ``gen_decode``: how its decode steps run (:mod:`editlib.decode`). ``below``:
    an :class:`editlib.below.SharedBelow` for the scoring forwards (generation runs every block).
    ``families``: the prompt families scored (columns of the others are left out), e.g.
    ``("rewrite",)`` for ES alone; the prompts are batched among themselves, so a score may differ
    from the all-families call's at float rounding (another batch, another padding)."""
    bad_fam = [f for f in families if f not in FAMILIES]
    if isinstance(families, str) or bad_fam or not families:
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
    if rs_resources is not None and not generation:
        raise ValueError("RS is computed on the generations: pass generation=True with rs_resources")
    check_also_alignment(alignment, also_alignment)
    records = list(records)
    if generation:
        check_generation_prompts(records)
    t0 = time.perf_counter()
    cols: dict[str, np.ndarray] = {"case_id": np.asarray([r.case_id for r in records], dtype=np.int64)}
    if records:
        cols.update(_probability_columns(model, tok, records, alignment, batch_size, groups, deltas, below,
                                         families))
        nonfinite = cols.pop(_NONFINITE)
        alt_bad, alt_cols = None, []
        if also_alignment is not None:
            alt = _probability_columns(model, tok, records, also_alignment, batch_size, groups, deltas, below,
                                       families)
            alt_bad = alt.pop(_NONFINITE)
            alt_cols = [alignment_column(k, also_alignment) for k in alt]
            cols.update(zip(alt_cols, alt.values()))
        if generation:
            cols.update(_generation_columns(model, tok, records, seed=gen_seed, max_len=gen_max_len,
                                            batch_size=gen_batch_size, rs_resources=rs_resources,
                                            groups=groups, deltas=deltas,
                                            max_kv_bytes=None if gen_kv_gb is None else gen_kv_gb * 1e9,
                                            text=gen_text, decode=gen_decode))
            nonfinite = nonfinite | cols.pop(_NONFINITE)
        if nonfinite.any():  # a NaN/inf logit scores nothing: the whole case is blank (counted as failed)
            for k in cols:
                if k != "case_id":
                    cols[k] = np.where(nonfinite, np.nan, cols[k].astype(np.float64))
        if alt_bad is not None and alt_bad.any():  # ... but the second reading's alone blanks only its own columns
            for k in alt_cols:
                cols[k] = np.where(alt_bad, np.nan, cols[k].astype(np.float64))
    else:
        shorts = {SHORT[f] for f in families}
        prob = [k for k in PROB_METRICS if k.split("_")[0] in shorts]
        names = [*prob, *(alignment_column(k, also_alignment) for k in prob if also_alignment is not None),
                 *(("GE",) if generation else ()), *(("RS",) if rs_resources is not None else ())]
        cols.update({k: np.zeros(0) for k in names})
    seconds = time.perf_counter() - t0
    df = pd.DataFrame(cols)
    df.attrs.update(seconds=seconds, alignment=alignment,
                    records_per_s=len(records) / seconds if seconds > 0 else float("inf"))
    return df


# --------------------------------------------------------------------------- summaries

def harmonic_score(es: float, ps: float, ns: float) -> float:
    """S = harmonic mean of ES, PS, NS (SPEC §6, scipy ``hmean``); 0 when any of them is 0."""
    vals = [float(es), float(ps), float(ns)]
    if any(np.isnan(v) for v in vals):
        return float("nan")
    if min(vals) <= 0:
        return 0.0
    return float(hmean(vals))


def with_unscored(cases: pd.DataFrame, reasons: Sequence[str]) -> list[str]:
    """``reasons`` (one per case, "" = edited) with :data:`NONFINITE_REASON` for every case that
    has no ES/PS/NS although its edit did not fail: its model outputs were NaN/inf, so it is a
    failed edit, counted and shown as such."""
    blank = cases[["ES", "PS", "NS"]].isna().any(axis=1).to_numpy()
    return [r or (NONFINITE_REASON if b else "") for r, b in zip(reasons, blank)]


def failed_rows(df: pd.DataFrame) -> np.ndarray:
    """Rows that carry no valid scores: marked ``failed`` by the protocol (a diverged value, an
    unsolvable system) or with ES, PS or NS missing. They are counted, never averaged in."""
    bad = np.array(df[["ES", "PS", "NS"]].isna().any(axis=1), dtype=bool)
    if "failed" in df.columns:
        bad = bad | np.array(df["failed"].fillna(False), dtype=bool)
    return bad


def singular_rows(df: pd.DataFrame) -> np.ndarray:
    """Rows edited by an exact (unjittered) solve whose update misses the method's equations by more
    than :data:`editlib.solver.SOLVE_RESID_WARN` of ‖R‖: D + μI factored but was numerically
    singular (docs/correctness.md). Scored as written, as the reference writes them, and counted."""
    from .solver import SOLVE_RESID_WARN

    if "solve_resid" not in df.columns:
        return np.zeros(len(df), dtype=bool)
    resid = df["solve_resid"].to_numpy(dtype=np.float64)
    exact = df["solve_jitter"].to_numpy(dtype=np.float64) == 0 if "solve_jitter" in df.columns else np.ones(len(df), bool)
    with np.errstate(invalid="ignore"):
        return (resid > SOLVE_RESID_WARN) & exact


def _summary_row(g: pd.DataFrame, metrics: Sequence[str], decimals: int | None) -> dict:
    bad = failed_rows(g)
    row: dict = {"n": len(g), "n_failed": int(bad.sum())}
    ok = g[~bad]
    for m in metrics:
        v = ok[m].to_numpy(dtype=np.float64)
        v = v[~np.isnan(v)]
        mean, std = (float(np.mean(v)) * 100, float(np.std(v)) * 100) if len(v) else (np.nan, np.nan)
        if decimals is not None:  # summarize.py rounds x100 values before computing S
            mean, std = round(mean, decimals), round(std, decimals)
        row[f"{m}_mean"], row[f"{m}_std"] = mean, std
    row["S"] = harmonic_score(row["ES_mean"], row["PS_mean"], row["NS_mean"])
    if "solve_jitter" in g.columns:  # cases whose edit needed a regularised solve (SPEC §8.5)
        jit = g["solve_jitter"].to_numpy(dtype=np.float64)
        row["n_jittered"] = int((jit > 0).sum())
        row["max_jitter"] = float(np.nanmax(jit)) if len(jit) and (jit > 0).any() else 0.0
    return row


def summarize_cases(df: pd.DataFrame, by: str | Sequence[str] | None = None,
                    decimals: int | None = 2) -> pd.DataFrame:
    """Per group (or overall): ``n`` (all rows), ``n_failed`` (rows without valid scores, left out
    of the means), ``S`` and ``<metric>_mean`` / ``<metric>_std`` (x100, population std, as in the
    reference ``summarize.py``; rounded to ``decimals`` unless None), and with a ``solve_jitter``
    column ``n_jittered`` / ``max_jitter``."""
    metrics = [m for m in METRICS if m in df.columns]
    missing = [m for m in ("ES", "PS", "NS") if m not in metrics]
    if missing:
        raise ValueError(f"summarize_cases needs columns ES, PS, NS; missing {missing}")
    if by is None:
        return pd.DataFrame([_summary_row(df, metrics, decimals)])
    keys = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, g in df.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key)), **_summary_row(g, metrics, decimals)})
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Strings as the paper prints them: ``"98.05(11.34)"`` per metric and ``"94.10"`` for S."""
    metrics = [m for m in METRICS if f"{m}_mean" in summary.columns]
    keys = [c for c in summary.columns
            if c not in ("n", "n_failed", "S", "n_jittered", "max_jitter") and not c.endswith(("_mean", "_std"))]
    out = pd.DataFrame(index=summary.index)
    for k in keys:
        out[k] = summary[k].astype(str)
    out["n"] = summary["n"].astype(int).astype(str)
    if "n_failed" in summary.columns:  # always shown: "0" says every edit produced scores
        out["failed"] = summary["n_failed"].astype(int).astype(str)
    out["S"] = summary["S"].map(lambda x: f"{x:.2f}")
    for m in metrics:
        out[m] = [f"{a:.2f}({b:.2f})" for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"])]
    if "n_jittered" in summary.columns:  # "0" = every edit solved exactly; else "k (τ ≤ x)"
        out["jittered"] = [str(int(k)) if k == 0 else f"{int(k)} (τ≤{t:.1g})"
                           for k, t in zip(summary["n_jittered"], summary["max_jitter"])]
    return out
