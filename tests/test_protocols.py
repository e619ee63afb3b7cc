"""The editing protocols end to end on the committed miniature ``models/tiny-world`` (6 layers),
with very small sizes (4 facts, 3 value steps): rows and columns of every protocol, restore
(order independence, bit-identical weights), sequential = batch for B = total, resume after an
injected failure, re-runs and parameter conflicts, seeds, fail-fast parameter checks and the
``python -m editlib run`` command.

The model and C0 are loaded once per module; each test swaps ``study.params`` (its own
``results_dir`` under ``tmp_path``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

from _fixtures import one_thread  # noqa: F401  (module-wide single thread)
from _fixtures import SCORES, UNIT, assert_unedited, quiet, snapshot, sort_units, use, write_counts
from editlib import protocols
from editlib.tf32 import matmul_tf32
from editlib.__main__ import main
from editlib.counterfact import DatasetNotFound
from editlib.params import ParamsError, resolve
from editlib.paths import REPO_ROOT
from editlib.store import RunConflict

SMOKE = REPO_ROOT / "params" / "smoke.yaml"

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "models" / "tiny-world" / "config.json").is_file(),
                                reason="models/tiny-world is missing")

#: every experiment at layer 1 on 4 facts, 3 value-optimisation steps
SMALL = {
    "hparams.common.v_num_grad_steps": 3,
    "layer_search.n_facts": 4, "layer_search.layers": [0, 1], "layer_search.methods": ["rome", "memit"],
    "singular.n_facts": 4, "singular.layer": 1,
    "sweep.total": 4, "sweep.batch_size": 2, "sweep.layer": 1,
    "sweep.memit_lambdas": [1, 10000], "sweep.emmet_lambdas": [0, 1e-3],
    "batch.total": 4, "batch.batch_sizes": [2, 4], "batch.layer": 1, "batch.methods": ["memit", "emmet"],
    "sequential.total": 4, "sequential.batch_sizes": [2, 4], "sequential.layer": 1,
    "sequential.methods": ["memit", "emmet"],
}
COLUMNS = ["case_id", "method", "layer", "batch_size", "batch_index", "eval", *SCORES]


def params_for(results_dir: Path, name: str = "t", **over):
    return resolve(SMOKE, overrides={**SMALL, "results_dir": str(results_dir), "name": name, **over})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The miniature, its facts, context templates and C0 of layers 0 and 1, loaded once."""
    p = params_for(tmp_path_factory.mktemp("study"))
    st = protocols.open_study(p, log=quiet)
    st.covs([0, 1])
    return st


@pytest.fixture(scope="module")
def weights0(study):
    """The unedited weights (clones), taken right after loading."""
    return snapshot(study.model)


def exp_dir(p, experiment: str) -> Path:
    return Path(p.results_dir) / p.name / experiment


def check_columns(cases: pd.DataFrame):
    missing = [c for c in COLUMNS if c not in cases.columns]
    assert not missing, f"cases lack columns {missing}"
    assert cases[SCORES].notna().all().all()
    shares = [c for c in SCORES if not c.endswith("_mag")]  # magnitudes are differences in [-1, 1]
    assert ((cases[shares] >= 0) & (cases[shares] <= 1)).all().all()
    assert (cases[["ES_mag", "PS_mag", "NS_mag"]].abs() <= 1).all().all()


def check_batches(p, experiment: str, n_batches: int):
    b = pd.read_parquet(exp_dir(p, experiment) / "batches.parquet")
    assert len(b) == n_batches
    cols = ["method", "layer", "batch_index", "n", "mu", "cond_D", "w_rel_dist", "seconds_values"]
    missing = [c for c in cols + ([] if experiment == "layer_search" else ["batch_size"]) if c not in b.columns]
    assert not missing, f"batches.parquet lacks {missing}"
    assert (b.cond_D > 0).all() and (b.w_rel_dist > 0).all() and (b.seconds_values >= 0).all()
    return b


# --------------------------------------------------------------------------- rows and columns

def test_layer_search_rows(study, weights0, tmp_path):
    p = params_for(tmp_path)
    cases = protocols.run_layer_search(use(study, p), log=quiet)
    check_columns(cases)
    assert len(cases) == 4 * 2 * 2  # n_facts x layers x methods
    assert (cases["eval"] == "current").all() and (cases.batch_size == 1).all()
    assert cases.groupby(["method", "layer"]).case_id.nunique().to_dict() == {
        (m, l): 4 for m in ("memit", "rome") for l in (0, 1)}
    check_batches(p, "layer_search", 4 * 2 * 2)
    assert json.loads((exp_dir(p, "layer_search") / "manifest.json").read_text())["complete"]
    assert_unedited(study.model, weights0)


def test_singular_rows(study, weights0, tmp_path):
    p = params_for(tmp_path)
    cases = protocols.run_singular(use(study, p), log=quiet)
    check_columns(cases)
    assert len(cases) == 4 * 2 and (cases.layer == 1).all() and (cases["eval"] == "current").all()
    assert sorted(cases.method.unique()) == ["memit", "rome"]
    assert_unedited(study.model, weights0)


def test_singular_in_chunks_equals_one_unit(study, weights0, tmp_path):
    """singular.chunk_size splits Table 1 into units of that many facts (for a cluster): the same
    rows, batch indices and scores as one unit (values are computed per chunk, so equal to float
    rounding), under the chunk units' names."""
    whole = sort_units(protocols.run_singular(use(study, params_for(tmp_path / "a")), log=quiet))
    p = params_for(tmp_path / "b", **{"singular.chunk_size": 3})
    parts = sort_units(protocols.run_singular(use(study, p), log=quiet))
    assert sorted(f.name for f in (exp_dir(p, "singular") / "parts").glob("*.cases.parquet")) == [
        "o0-c00000.cases.parquet", "o0-c00001.cases.parquet"]
    assert (whole[["method", "case_id", "batch_index"]].to_numpy() == parts[["method", "case_id", "batch_index"]].to_numpy()).all()
    assert sorted(parts.batch_index.unique()) == [0, 1, 2, 3]
    assert_frame_equal(whole[SCORES], parts[SCORES], check_exact=False, rtol=0, atol=1e-5)
    assert_unedited(study.model, weights0)


def test_batch_rows_and_diagnostics(study, weights0, tmp_path):
    p = params_for(tmp_path)
    cases = protocols.run_batch(use(study, p), log=quiet)
    check_columns(cases)
    assert cases.groupby(["method", "batch_size"]).size().to_dict() == {
        (m, b): 4 for m in ("emmet", "memit") for b in (2, 4)}
    assert (cases["eval"] == "current").all() and (cases.layer == 1).all()
    assert sorted(cases[cases.batch_size == 2].batch_index.unique()) == [0, 1]
    b = check_batches(p, "batch", 2 * (2 + 1))  # per method: 2 batches of 2, 1 of 4
    assert sorted(b[b.method == "memit"].n) == [2, 2, 4]
    assert_unedited(study.model, weights0)


def test_sequential_rows(study, weights0, tmp_path):
    p = params_for(tmp_path, **{"sequential.forgetting_every": 2})
    cases = protocols.run_sequential(use(study, p), log=quiet)
    check_columns(cases)
    n = cases.groupby(["method", "batch_size", "eval"]).size().to_dict()
    for m in ("memit", "emmet"):
        for b in (2, 4):
            assert n[(m, b, "current")] == 4 and n[(m, b, "final")] == 4
        # forgetting curve, every 2 edited facts: the 2 facts so far after batch 1 of 2 (named by
        # the facts edited); none after the last batch (the final evaluation is that)
        assert n[(m, 2, "after_2")] == 2
        assert not any(k[0] == m and k[1] == 4 and k[2].startswith("after_") for k in n)
    final = cases[cases["eval"] == "final"]
    assert (final.groupby(["method", "batch_size"]).case_id.nunique() == 4).all()
    b = check_batches(p, "sequential", 2 * (2 + 1))
    # sequential: the distance to W0 grows from batch to batch
    seq = b[(b.method == "memit") & (b.batch_size == 2)].sort_values("batch_index")
    assert seq.w_rel_dist.iloc[1] > seq.w_rel_dist.iloc[0]
    assert not list((exp_dir(p, "sequential") / "checkpoints").glob("*.safetensors"))
    assert_unedited(study.model, weights0)


def test_sweep_rows(study, weights0, tmp_path):
    p = params_for(tmp_path)
    cases = protocols.run_sweep(use(study, p), log=quiet)
    check_columns(cases)
    assert cases.groupby(["method", "lam"]).size().to_dict() == {
        ("memit", 1.0): 4, ("memit", 10000.0): 4, ("emmet", 0.0): 4, ("emmet", 1e-3): 4}
    b = check_batches(p, "sweep", 4 * 2)  # 4 settings x 2 batches
    assert sorted(b[b.method == "memit"].mu.unique()) == [1.0, 10000.0]
    assert sorted(b[b.method == "emmet"].mu.unique()) == [0.0, 1e-3]
    assert_unedited(study.model, weights0)


def test_methods_and_lambdas_share_the_keys_solve(study, weights0, tmp_path, monkeypatch):
    """C0⁻¹K is solved once per set of keys (issue #13): ROME and MEMIT at a layer of the layer
    search share one multi-right-hand-side solve, and every λ of both methods on a sweep batch
    shares one; the reference path (one edit at a time) is left as it is."""
    from editlib.solver import CovFactor

    calls = []
    real = CovFactor.solve
    monkeypatch.setattr(CovFactor, "solve", lambda self, K: calls.append(K.shape[1]) or real(self, K))
    protocols.run_layer_search(use(study, params_for(tmp_path / "ls")), log=quiet)
    assert calls == [4, 4]  # 2 layers × 4 facts, not 2 layers × 2 methods
    calls.clear()
    protocols.run_sweep(use(study, params_for(tmp_path / "sw")), log=quiet)
    assert calls == [2, 2]  # 2 batches of 2, not × 4 settings
    calls.clear()
    protocols.run_singular(use(study, params_for(tmp_path / "ref", **{"evaluation.batched_edits": False})),
                           log=quiet)
    assert calls == [1] * 8  # 4 facts × 2 methods, each edit alone
    assert_unedited(study.model, weights0)


def test_blocks_below_are_shared_exactly(study, weights0, tmp_path, monkeypatch):
    """evaluation.share_below_gb (editlib.below): MEMIT's evaluation at a layer replays the blocks
    below it from ROME's, every λ of a sweep batch from the first, EMMET's batches from MEMIT's; the
    cases are the same to the bit as with sharing off."""
    made = []
    real = protocols._shared_below
    monkeypatch.setattr(protocols, "_shared_below", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    key = ["method", "layer", "case_id"]
    for run, n in ((protocols.run_layer_search, 2), (protocols.run_sweep, 8), (protocols.run_batch, 4)):
        made.clear()
        on = run(use(study, params_for(tmp_path / f"on{n}")), log=quiet)
        objs = {id(b): b for b in made}.values()
        hits = [(b.layer, b.hits) for b in objs]
        made.clear()
        off = run(use(study, params_for(tmp_path / f"off{n}", **{"evaluation.share_below_gb": 0})), log=quiet)
        assert all(b.hits == 0 for b in made)
        k = key + [c for c in ("lam", "batch_size", "batch_index") if c in on.columns]
        on, off = on.sort_values(k).reset_index(drop=True), off.sort_values(k).reset_index(drop=True)
        assert_frame_equal(on[k + SCORES], off[k + SCORES], check_exact=True)
        if n == 2:  # layer 0 has nothing below it; layer 1: MEMIT's batches are ROME's
            assert sorted(l for l, h in hits if h > 0) == [1] and (0, 0) in hits
        elif n == 8:  # one per sweep batch, shared by its 4 settings
            assert len(hits) == 2 and all(h > 0 for _, h in hits)
        else:  # one per ordering: EMMET's evaluations at B = 2 and 4 replay MEMIT's
            assert len(hits) == 1 and hits[0][1] > 0
    assert_unedited(study.model, weights0)


# --------------------------------------------------------------------------- restore and equivalences

def test_batch_order_does_not_matter(study, weights0, tmp_path):
    """Every batch is applied to the unedited model: B = [2, 4] and [4, 2] give the same scores."""
    a = protocols.run_batch(use(study, params_for(tmp_path, "a")), log=quiet)
    assert_unedited(study.model, weights0)
    b = protocols.run_batch(use(study, params_for(tmp_path, "b", **{"batch.batch_sizes": [4, 2]})), log=quiet)
    assert_unedited(study.model, weights0)
    key = ["method", "batch_size", "case_id"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert_frame_equal(a[key + SCORES], b[key + SCORES], check_exact=True)


def test_batch_mode_computes_targets_once_and_slices_them(study, weights0, tmp_path, monkeypatch):
    """Batch mode prepares keys/values/residuals once per value setting for all facts (every batch
    starts from the unedited model), and a slice equals what the chunk alone would give."""
    calls: list[int] = []
    real = protocols.prepare_targets

    def counting(model, tok, records, *a, **k):
        calls.append(len(records))
        return real(model, tok, records, *a, **k)
    monkeypatch.setattr(protocols, "prepare_targets", counting)
    p = params_for(tmp_path)
    st = use(study, p)
    cases = protocols.run_batch(st, log=quiet)
    assert calls == [4], calls  # MEMIT and EMMET share the value setting: one call for 4 facts
    assert len(cases) == 2 * (4 + 4)
    hp = p.method_hparams("memit", 1, "batch")
    facts = st.facts(4)
    whole = real(st.model, st.tok, facts, hp, st.contexts(hp.context_templates))
    part = real(st.model, st.tok, facts[2:], hp, st.contexts(hp.context_templates))
    sl = protocols._slice(whole, [2, 3])
    torch.testing.assert_close(sl.K, part.K, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sl.R, part.R, rtol=1e-4, atol=1e-5)
    assert_unedited(study.model, weights0)


def test_sequential_with_one_batch_equals_batch_mode(study, weights0, tmp_path):
    over = {"batch.batch_sizes": [4], "sequential.batch_sizes": [4]}
    st = use(study, params_for(tmp_path, **over))
    seq = protocols.run_sequential(st, log=quiet)
    bat = protocols.run_batch(st, log=quiet)
    key = ["method", "case_id"]
    cur = seq[seq["eval"] == "current"].sort_values(key).reset_index(drop=True)
    bat = bat.sort_values(key).reset_index(drop=True)
    assert len(cur) == len(bat) == 8
    assert_frame_equal(cur[key], bat[key])
    # batch mode scores through per-row hooks, sequential mode on the edited weights: float32 rounding
    assert_frame_equal(cur[SCORES], bat[SCORES], check_exact=False, rtol=0, atol=1e-5)
    # with one batch, the final evaluation is the current one
    fin = seq[seq["eval"] == "final"].sort_values(key).reset_index(drop=True)
    assert_frame_equal(fin[SCORES], cur[SCORES], check_exact=False, rtol=0, atol=1e-9)
    assert_unedited(study.model, weights0)


def test_sequential_batches_are_prepared_on_the_edited_model(study, weights0, tmp_path, monkeypatch):
    """Batch r's z, K and R equal prepare_targets run on a model holding only batches < r (SPEC §5:
    weights are never restored between sequential batches), and differ from the unedited model's."""
    from editlib.editing import apply_edit, prepare_targets
    from editlib.weights import EditSession

    recorded = []
    real = protocols.prepare_targets

    def spy(model, tok, records, hp, ctx, **kw):
        tg = real(model, tok, records, hp, ctx, **kw)
        recorded.append(([r.case_id for r in records], hp, ctx, tg))
        return tg

    monkeypatch.setattr(protocols, "prepare_targets", spy)
    over = {"sequential.methods": ["memit"], "sequential.total": 6, "sequential.batch_sizes": [2],
            "sequential.eval_final": False}
    st = use(study, params_for(tmp_path, **over))
    protocols.run_sequential(st, log=quiet)
    assert [ids for ids, *_ in recorded] == [[r.case_id for r in st.facts(6)[i:i + 2]] for i in (0, 2, 4)]
    by_id = {r.case_id: r for r in st.facts(6)}
    for r in (1, 2):
        with EditSession(study.model) as s:
            for ids, hp, ctx, tg in recorded[:r]:  # the model holding batches < r
                apply_edit(study.model, study.tok, [by_id[i] for i in ids], hp, study.covs(hp.layers),
                           ctx, s, targets=tg)
            ids, hp, ctx, got = recorded[r]
            want = prepare_targets(study.model, study.tok, [by_id[i] for i in ids], hp, ctx)
        for name, a, b in (("z", got.values.z, want.values.z), ("K", got.K, want.K), ("R", got.R, want.R)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"batch {r}: {name} differs"
        fresh = prepare_targets(study.model, study.tok, [by_id[i] for i in ids], hp, ctx)  # unedited
        assert not torch.allclose(got.R, fresh.R, rtol=1e-3, atol=1e-4), f"batch {r} used the unedited model"
    assert_unedited(study.model, weights0)


# --------------------------------------------------------------------------- independent edits together

@pytest.mark.parametrize("runner", ["layer_search", "singular", "batch", "sweep"])
def test_batched_independent_edits_equal_the_reference_path(study, weights0, tmp_path, runner):
    """Singular and batch edits evaluated together through per-row low-rank hooks (default) give the
    same cases and diagnostics as editing, evaluating and restoring one edit at a time
    (``evaluation.batched_edits: false``), and never write a weight."""
    run = getattr(protocols, f"run_{runner}")
    before = write_counts(study.model)
    ref = run(use(study, params_for(tmp_path / "ref", **{"evaluation.batched_edits": False})), log=quiet)
    assert write_counts(study.model) != before  # the reference path writes (and restores) weights
    before = write_counts(study.model)
    p = params_for(tmp_path / "bat")
    got = run(use(study, p), log=quiet)
    assert write_counts(study.model) == before, "the batched path wrote a weight"
    assert_unedited(study.model, weights0)
    a, b = sort_units(got), sort_units(ref)
    assert len(a) == len(b) and (a["case_id"].to_numpy() == b["case_id"].to_numpy()).all()
    for c in ("ES", "PS", "NS", "ES_acc", "PS_acc", "NS_acc"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    assert_frame_equal(a[SCORES], b[SCORES], check_exact=False, rtol=0, atol=1e-5)
    ba = pd.read_parquet(exp_dir(p, runner) / "batches.parquet")
    bb = pd.read_parquet(Path(str(exp_dir(p, runner)).replace("/bat/", "/ref/")) / "batches.parquet")
    keys = [k for k in ("method", "lam", "layer", "batch_size", "batch_index") if k in ba.columns]
    ba, bb = ba.sort_values(keys).reset_index(drop=True), bb.sort_values(keys).reset_index(drop=True)
    assert (ba["n"] == bb["n"]).all() and (ba["n_failed"] == bb["n_failed"]).all()
    for col in ("w_dist", "w_rel_dist", "delta_norm", "cond_D", "mean_resid_norm"):
        assert np.allclose(ba[col], bb[col], rtol=1e-4, atol=0), col


# --------------------------------------------------------------------------- failed edits

@pytest.mark.parametrize("runner", ["singular", "batch"])
def test_batched_cases_with_failures_and_uneven_batches_equal_the_reference_path(study, weights0, tmp_path,
                                                                                 monkeypatch, runner):
    """With a failed fact inside a batch and batches of unequal size (5 facts at B = 2: 2, 2, 1),
    the batched path's stored cases equal the reference path's column for column: the markers
    (failed, fail_reason, value_stalled, solve_jitter), the labels, their dtypes and order."""
    real = protocols.prepare_targets
    victim = study.facts(5)[2].case_id

    def sabotage(model, tok, records, hp, ctx, **kw):
        tg = real(model, tok, records, hp, ctx, **kw)
        tg.values.fail_reason = ["injected failure" if r.case_id == victim else "" for r in records]
        return tg

    monkeypatch.setattr(protocols, "prepare_targets", sabotage)
    over = {"batch.total": 5, "batch.batch_sizes": [2], "singular.n_facts": 5}
    run = getattr(protocols, f"run_{runner}")
    ref = sort_units(run(use(study, params_for(tmp_path / "ref", **{**over, "evaluation.batched_edits": False})),
                         log=quiet))
    got = sort_units(run(use(study, params_for(tmp_path / "bat", **over)), log=quiet))
    assert list(got.columns) == list(ref.columns) and (got.dtypes == ref.dtypes).all()
    assert got["failed"].sum() == ref["failed"].sum() == len(got) // 5  # the victim, once per method
    marks = ["case_id", "failed", "fail_reason", "value_stalled", "solve_jitter",
             *[c for c in ref.columns if c in UNIT]]
    assert_frame_equal(got[marks], ref[marks], check_exact=True)
    assert_frame_equal(got[SCORES], ref[SCORES], check_exact=False, rtol=0, atol=1e-5)
    assert_unedited(study.model, weights0)


def test_a_failed_solve_fails_its_batch_alone_as_on_the_reference_path(study, weights0, tmp_path, monkeypatch):
    """The closed-form update of one batch fails (the second of three, 5 facts at B = 2): on the
    batched path as on the reference path, its facts are failed rows with the solver's reason and
    no scores, batches.parquet counts them with NaN diagnostics, and the other batches are edited
    and scored as without the failure."""
    from editlib import editing
    real = protocols.solve_factors
    seen = {"n": 0}

    def second_fails(R, K, *a, **k):
        seen["n"] += 1
        if seen["n"] == 2:
            raise ValueError("injected")
        return real(R, K, *a, **k)

    monkeypatch.setattr(protocols, "solve_factors", second_fails)
    monkeypatch.setattr(editing, "solve_factors", second_fails)
    over = {"batch.total": 5, "batch.batch_sizes": [2], "batch.methods": ["memit"]}
    runs = {}
    for name, batched in (("ref", False), ("bat", True)):
        seen["n"] = 0
        p = params_for(tmp_path / name, **{**over, "evaluation.batched_edits": batched})
        runs[name] = (sort_units(protocols.run_batch(use(study, p), log=quiet)),
                      pd.read_parquet(exp_dir(p, "batch") / "batches.parquet").sort_values("batch_index"))
        assert seen["n"] == 3
    victims = {f.case_id for f in study.facts(5)[2:4]}
    for cases, b in runs.values():
        bad = cases[cases.case_id.isin(victims)]
        assert len(bad) == 2 and bad["failed"].all()
        assert (bad["fail_reason"] == "the closed-form update failed: injected").all()
        assert bad[SCORES].isna().all().all()
        good = cases[~cases.case_id.isin(victims)]
        assert not good["failed"].any() and good[SCORES].notna().all().all()
        assert list(b["n_failed"]) == [0, 2, 0]
        assert b["delta_norm"].isna().tolist() == [False, True, False]
    (ref, rb), (got, gb) = runs["ref"], runs["bat"]
    assert_frame_equal(got[["case_id", "failed", "fail_reason"]], ref[["case_id", "failed", "fail_reason"]])
    assert_frame_equal(got[SCORES], ref[SCORES], check_exact=False, rtol=0, atol=1e-5)
    assert np.allclose(gb["delta_norm"], rb["delta_norm"], rtol=1e-6, equal_nan=True)
    assert_unedited(study.model, weights0)


def test_numerically_singular_solves_are_counted_on_the_rows_they_edited(study, weights0, tmp_path, monkeypatch):
    """Every edited row carries its solve's solve_resid (batches.parquet's), on the batched and the
    reference path and on a sequential run's later evaluations, so that a solve that missed the
    method's equations (resid above solver.SOLVE_RESID_WARN, unjittered) is counted in the failure
    table and named under the figures. Here the threshold is lowered to below every real residual."""
    from editlib import plotting, solver

    over = {"batch.total": 6, "batch.batch_sizes": [1, 3], "batch.methods": ["memit"]}
    for name, batched in (("ref", False), ("bat", True)):
        p = params_for(tmp_path / name, **{**over, "evaluation.batched_edits": batched})
        cases = protocols.run_batch(use(study, p), log=quiet)
        b = pd.read_parquet(exp_dir(p, "batch") / "batches.parquet")
        per_batch = cases.groupby(["batch_size", "batch_index"])["solve_resid"].agg(["min", "max"])
        want = b.set_index(["batch_size", "batch_index"])["solve_resid"]
        assert np.array_equal(per_batch["min"], per_batch["max"]) and np.allclose(per_batch.loc[want.index, "max"], want)
        assert (cases["solve_resid"] > 0).all() and (cases["solve_resid"] < solver.SOLVE_RESID_WARN).all()
        assert plotting.failure_table({"batch": cases})["singular solves"].tolist() == [0]
        monkeypatch.setattr(solver, "SOLVE_RESID_WARN", float(cases["solve_resid"].min()) / 2)
        ft = plotting.failure_table({"batch": cases})
        assert ft["singular solves"].tolist() == [6, 6] and ft["failed"].tolist() == [0, 0]
        assert "12 of 12 edited-fact rows come from numerically singular solves" in plotting.singular_note(cases)
        monkeypatch.undo()
    p = params_for(tmp_path / "seq", **{"sequential.methods": ["memit"], "sequential.batch_sizes": [2]})
    seq = protocols.run_sequential(use(study, p), log=quiet)
    cur = seq[seq["eval"] == "current"].set_index("case_id")["solve_resid"]
    fin = seq[seq["eval"] == "final"].set_index("case_id")["solve_resid"]
    assert cur.notna().all() and np.array_equal(fin.loc[cur.index], cur)  # each fact: its own batch's solve
    assert_unedited(study.model, weights0)


def test_diverged_values_are_failed_cases_not_zeros(study, weights0, tmp_path):
    """v_lr = 1e30 (the value optimisation overflows): every case is a failed row with its reason
    and no scores, the summary counts them, nothing is written into the model, and the
    configuration goes on (8 edits, below the failure check's minimum)."""
    st = use(study, params_for(tmp_path, **{"hparams.common.v_lr": 1e30}))
    cases = protocols.run_singular(st, log=quiet)
    assert len(cases) == 8 and cases["failed"].all()
    assert cases["fail_reason"].str.contains("value optimisation").all()
    assert cases[SCORES].isna().all().all()
    s = protocols.summarize(cases, by=["method"])
    assert list(s["n"]) == [4, 4] and list(s["n_failed"]) == [4, 4]
    assert list(protocols.summarize(cases, by=["method"], formatted=True)["failed"]) == ["4", "4"]
    assert_unedited(study.model, weights0)


def test_too_many_failures_stop_the_configuration(study, weights0, tmp_path, monkeypatch):
    monkeypatch.setattr(protocols, "MIN_EDITS_FOR_FAILURE_CHECK", 2)
    p = params_for(tmp_path, **{"hparams.common.v_lr": 1e30})
    with pytest.raises(protocols.TooManyFailures, match="max_failed_fraction"):
        protocols.run_singular(use(study, p), log=quiet)
    assert (exp_dir(p, "singular") / "parts" / "o0.cases.parquet").is_file()  # the unit is kept
    assert_unedited(study.model, weights0)
    # a resume counts the stored unit: the limit covers the configuration, not the edits since
    with pytest.raises(protocols.TooManyFailures, match="counting the units stored by earlier sessions"):
        protocols.run_singular(use(study, p), log=quiet)
    # and the limit is free on reopen (no RunConflict): raised, the run finishes on the kept unit
    cases = protocols.run_singular(use(study, params_for(tmp_path, **{"hparams.common.v_lr": 1e30,
                                                                      "evaluation.max_failed_fraction": 1.0})), log=quiet)
    assert cases["failed"].all() and len(cases) == 8


def test_stored_failures_are_judged_on_their_totals_once(monkeypatch):
    """On resume the stored parts are counted in the units' order, not the order they ran in: a
    running total that crosses the limit midway must not stop a configuration whose total is under
    it; a total over it stops the run with the configuration's first failure reason."""
    monkeypatch.setattr(protocols, "MIN_EDITS_FOR_FAILURE_CHECK", 16)

    def part(n, failed, reason="diverged"):
        return pd.DataFrame({"method": "memit", "failed": [i < failed for i in range(n)],
                             "fail_reason": [reason if i < failed else "" for i in range(n)]})
    f = protocols._Failures(0.25, log=lambda *_: None)
    for c in (part(16, 5), part(24, 0)):  # 31 % after the first part, 5 of 40 (12.5 %) in all
        f.add("sweep λ=1:", c, stored=True)
    f.check()
    f.add("sweep λ=2:", part(16, 0), stored=True)
    f.add("sweep λ=2:", part(16, 9, "non-finite key"), stored=True)  # 9 of 32
    with pytest.raises(protocols.TooManyFailures, match=r"9 of 32 edits failed .* counting the units stored by "
                                                        r"earlier sessions; first reason: non-finite key"):
        f.check()


def test_one_failed_fact_leaves_the_rest_of_its_batch_edited(study, weights0, tmp_path, monkeypatch):
    """A fact whose value failed is left out of its batch's solve: its row is failed, the other
    facts are edited exactly as a batch without it, and batches.parquet counts it."""
    real = protocols.prepare_targets
    victim = study.facts(4)[1].case_id

    def sabotage(model, tok, records, hp, ctx, **kw):
        tg = real(model, tok, records, hp, ctx, **kw)
        tg.values.fail_reason = ["injected failure" if r.case_id == victim else ""
                                 for r in records]
        return tg

    monkeypatch.setattr(protocols, "prepare_targets", sabotage)
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4]}
    p = params_for(tmp_path, **over)
    cases = protocols.run_batch(use(study, p), log=quiet)
    bad = cases[cases.case_id == victim].iloc[0]
    assert bad["failed"] and bad["fail_reason"] == "injected failure" and pd.isna(bad["ES"])
    good = cases[cases.case_id != victim]
    assert not good["failed"].any() and good[SCORES].notna().all().all()
    b = pd.read_parquet(exp_dir(p, "batch") / "batches.parquet")
    assert list(b["n_failed"]) == [1] and list(b["n"]) == [4]
    # the three others were edited exactly as a batch of those three alone
    monkeypatch.setattr(protocols, "prepare_targets", real)
    facts3 = [f for f in study.facts(4) if f.case_id != victim]
    st3 = use(study, params_for(tmp_path / "three", **{**over, "batch.total": 3, "batch.batch_sizes": [3]}))
    st3.facts = lambda n, o=0: facts3  # same facts in the same order, without the victim
    three = protocols.run_batch(st3, log=quiet).sort_values("case_id").reset_index(drop=True)
    good = good.sort_values("case_id").reset_index(drop=True)
    assert_frame_equal(good[SCORES], three[SCORES], check_exact=False, rtol=0, atol=1e-6)
    assert_unedited(study.model, weights0)


def test_shared_value_time_is_counted_once(study, tmp_path):
    """Methods (and batch sizes) that reuse the same prepared targets do not charge their time again:
    summing seconds_values gives the real time."""
    p = params_for(tmp_path, **{"batch.batch_sizes": [2, 4]})
    protocols.run_batch(use(study, p), log=quiet)
    b = pd.read_parquet(exp_dir(p, "batch") / "batches.parquet")
    first = b[(b.method == "memit") & (b.batch_size == 2)]
    assert (first["seconds_values"] > 0).all() and not first["shared_targets"].any()
    again = b[(b.method == "emmet") | (b.batch_size == 4)]
    assert (again["seconds_values"] == 0).all() and again["shared_targets"].all()


def test_the_value_store_changes_no_stored_number(study, weights0, tmp_path):
    """evaluation.share_values_gb (editlib.valuestore): the experiments read back the chunks of
    values that earlier ones optimised on the same weights, and store the same cases to the bit as
    a study that optimises every chunk itself."""
    runs = {}
    for gb in (2.0, 0):
        st = use(study, params_for(tmp_path / f"gb{gb:g}", **{"evaluation.share_values_gb": gb}))
        runs[gb] = [protocols.run_layer_search(st, log=quiet), protocols.run_singular(st, log=quiet),
                    protocols.run_sweep(st, log=quiet), protocols.run_batch(st, log=quiet),
                    protocols.run_sequential(st, log=quiet)]
        if gb:
            # optimised: the layer search's chunks at layers 0 and 1, the sweep's two batches, and
            # the second batch of each B = 2 sequential run (MEMIT's and EMMET's edited weights);
            # read back: singular and batch (the layer search's chunk at layer 1), the first batch
            # of each sequential run (B = 4: that chunk again; B = 2: the sweep's first batch)
            assert (st.value_store.hits, st.value_store.misses) == (6, 6)
        else:
            assert st.value_store is None and not (tmp_path / f"gb{gb:g}" / "_values").exists()
    for kept, alone in zip(runs[2.0], runs[0]):
        assert_frame_equal(kept.reset_index(drop=True), alone.reset_index(drop=True), check_exact=True)
    assert_unedited(study.model, weights0)


def test_a_sequential_run_reads_back_the_batches_an_identical_run_optimised(study, weights0, tmp_path):
    """A sequential run keeps each batch's values under the updates before it (weights.edit_history):
    a second run that edits the same facts the same way (here with other measurements) reads every
    batch back and stores the same cases to the bit as a run without the store. A planted wrong
    entry under the second batch's key moves that batch's scores and not the first's, so it is
    read, under the edited weights' key and no other."""
    from editlib.valuestore import ValueStore
    over = {"sequential.methods": ["memit"], "sequential.batch_sizes": [2]}
    alone = protocols.run_sequential(use(study, params_for(tmp_path / "alone", **over,
                                                           **{"evaluation.share_values_gb": 0})), log=quiet)
    saved, real_save = [], ValueStore.save

    def recording(self, key, res):
        saved.append((key, res))
        real_save(self, key, res)

    st = use(study, params_for(tmp_path / "shared", "first", **over))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ValueStore, "save", recording)
        first = protocols.run_sequential(st, log=quiet)
    assert len(saved) == 2 and saved[0][0] != saved[1][0]  # both batches kept, under different keys
    st = use(study, params_for(tmp_path / "shared", "second", **over, **{"sequential.eval_final": False}))
    second = protocols.run_sequential(st, log=quiet)
    assert (st.value_store.hits, st.value_store.misses) == (2, 0)
    cur = lambda c: c[c["eval"] == "current"].reset_index(drop=True)
    assert_frame_equal(first.reset_index(drop=True), alone.reset_index(drop=True), check_exact=True)
    # (alone's final rows leave value_stalled an object column: the values are compared, not dtypes)
    assert_frame_equal(cur(second), cur(alone), check_exact=True, check_dtype=False)
    key, res = saved[1]
    res.z = res.z + 0.5 * res.z.norm(dim=0)  # a shifted value: another edit
    st.value_store.save(key, res)
    planted = protocols.run_sequential(use(study, params_for(tmp_path / "shared", "planted", **over)), log=quiet)
    at = lambda c, b: cur(c)[cur(c).batch_index == b].reset_index(drop=True)[SCORES]
    assert_frame_equal(at(planted, 0), at(alone, 0), check_exact=True)
    assert not at(planted, 1).equals(at(alone, 1))
    assert_unedited(study.model, weights0)


# --------------------------------------------------------------------------- resume, re-run, conflicts

@pytest.mark.parametrize("windows", [[1], [2]])  # [2]: MEMIT over layers 1-2 (two factor logs per batch)
def test_sequential_resumes_after_a_failure(study, weights0, tmp_path, windows):
    over = {"sequential.methods": ["memit"], "sequential.total": 6, "sequential.batch_sizes": [2, 6],
            "sequential.windows": windows}
    p = params_for(tmp_path, "interrupted", **over)
    st = use(study, p)
    with pytest.raises(RuntimeError, match="injected failure after batch 0"):
        protocols.run_sequential(st, log=quiet, fail_after=1)
    assert_unedited(study.model, weights0)  # the session restored the weights on the way out
    root = exp_dir(p, "sequential")
    assert not json.loads((root / "manifest.json").read_text())["complete"]
    # the checkpoint is an append-only log: one file of low-rank factors per finished batch
    assert [f.name for f in (root / "checkpoints").glob("*/*.safetensors")] == ["b000000.safetensors"]
    assert [d.name for d in (root / "checkpoints").iterdir()] == [f"memit{'-w2' if windows == [2] else ''}-B00002-o0"]
    assert len(list((root / "parts").glob("*.cases.parquet"))) == 1

    logged: list[str] = []
    resumed = protocols.run_sequential(st, log=logged.append)
    assert any("resuming at batch 1/3" in m for m in logged), logged
    assert not list((root / "checkpoints").glob("**/*.safetensors"))
    assert_unedited(study.model, weights0)

    q = params_for(tmp_path, "uninterrupted", **over, **{"evaluation.share_values_gb": 0})  # optimises every batch itself
    straight: list[str] = []
    whole = protocols.run_sequential(use(study, q), log=straight.append)
    assert len(whole) == 6 + 6 + 6 + 6  # B=2: current + final, B=6: current + final

    def closing(msgs: list[str]) -> list[str]:  # the closing lines' scores, without their seconds
        return [m.split("; right after each batch ")[1] for m in msgs if "right after each batch" in m]
    assert len(closing(logged)) == 2 and closing(logged) == closing(straight)  # resumed batches counted
    assert_frame_equal(sort_units(resumed), sort_units(whole), check_exact=True)  # replay is bit-exact
    stored = pd.read_parquet(root / "cases.parquet")
    assert_frame_equal(sort_units(stored), sort_units(whole), check_exact=True)
    bs = [pd.read_parquet(exp_dir(x, "sequential") / "batches.parquet") for x in (p, q)]
    cols = [c for c in bs[0].columns if not c.startswith("seconds")]
    assert_frame_equal(sort_units(bs[0][cols]), sort_units(bs[1][cols]), check_exact=True)


def test_rerun_does_nothing_and_changes_conflict(study, weights0, tmp_path, monkeypatch):
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4]}
    p = params_for(tmp_path, **over)
    first = protocols.run_batch(use(study, p), log=quiet)
    manifest = (exp_dir(p, "batch") / "manifest.json").read_text()

    def no_edits(*a, **k):
        raise AssertionError("a finished experiment was edited again")
    monkeypatch.setattr(protocols, "apply_edit", no_edits)
    monkeypatch.setattr(protocols, "prepare_targets", no_edits)
    logged: list[str] = []
    again = protocols.run_batch(use(study, params_for(tmp_path, **over)), log=logged.append)
    assert len(logged) == 1 and "already complete" in logged[0] and "nothing to do" in logged[0], logged
    assert_frame_equal(again, first, check_exact=True)
    assert (exp_dir(p, "batch") / "manifest.json").read_text() == manifest
    for key, val in [("covariance.layers_per_pass", 1), ("evaluation.gen_kv_gb", 1.0)]:  # how, not what
        logged.clear()
        protocols.run_batch(use(study, params_for(tmp_path, **over, **{key: val})), log=logged.append)
        assert len(logged) == 1 and "already complete" in logged[0], (key, logged)
    # recorded as null, the digest of folders written before it was left out (they reopen too)
    assert json.loads(manifest)["params"]["covariance"]["layers_per_pass"] is None

    for key, val, named in [("hparams.common.v_num_grad_steps", 4, "v_num_grad_steps"),
                            ("batch.total", 8, "spec.total"), ("batch.layer", 0, "spec.layer"),
                            ("evaluation.alignment", "reference", "evaluation.alignment")]:
        with pytest.raises(RunConflict, match=named.replace(".", r"\.")):
            protocols.run_batch(use(study, params_for(tmp_path, **over, **{key: val})), log=quiet)
    assert_unedited(study.model, weights0)


def test_a_resume_checks_the_saved_units_templates_and_settings(study, weights0, tmp_path):
    """The protocols' own resume: every saved unit records the session's settings (its context
    templates' digests, the failed-edit limit), and a resume whose templates differ from a saved
    unit's is refused before any edit; parts no unit of the params writes are refused too."""
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4]}
    p = params_for(tmp_path, **over)
    protocols.run_batch(use(study, p), log=quiet)
    root = exp_dir(p, "batch")
    unit = json.loads(next((root / "parts").glob("*.unit.json")).read_text())
    assert set(unit["settings"]["context_templates"]) == {"memit"} and unit["settings"]["evaluation.max_failed_fraction"] == 0.25
    man = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**man, "complete": False}))  # as a run that died before finishing
    side = next((root / "parts").glob("*.unit.json"))
    side.write_text(json.dumps({**unit, "settings": {**unit["settings"], "context_templates": {"memit": "another-gpu"}}}))
    with pytest.raises(RunConflict, match=r"other context templates \(memit\)"):
        protocols.run_batch(use(study, p), log=quiet)
    side.write_text(json.dumps(unit))
    (root / "parts" / "memit-B00004-o9.cases.parquet").write_bytes(b"")  # a unit these params do not have
    (root / "parts" / "memit-B00004-o9.unit.json").write_text(json.dumps({**unit, "unit": "memit-B00004-o9"}))
    with pytest.raises(RunConflict, match=r"2 file\(s\) belong to no unit of these params \(memit-B00004-o9.cases.parquet"):
        protocols.run_batch(use(study, p), log=quiet)
    assert_unedited(study.model, weights0)


def test_every_template_style_a_section_asks_for_is_sampled_when_the_study_opens(tmp_path):
    """A section's hparams may choose other context templates (batch.hparams.memit.context_templates):
    their style is sampled with the others when the study opens, so every unit's settings carry its
    digest and Ray workers receive it from the driver, instead of sampling it inside a unit."""
    p = params_for(tmp_path)
    assert protocols.template_styles(p) == sorted({(hp.context_templates, "clean") for hp in p.hparams.values()})
    q = params_for(tmp_path, **{"batch.hparams": {"memit": {"context_templates": "rome"}},
                                "sweep.hparams": {"common": {"context_templates": "plain"}},
                                "singular.hparams": {"common": {"context_text": "reference"}}})
    assert set(protocols.template_styles(q)) == set(protocols.template_styles(p)) | {
        ("rome", "clean"), ("plain", "clean"), ("memit", "reference")}


def test_reference_context_text_runs_under_its_own_templates_and_digest(study, weights0, tmp_path, monkeypatch):
    """``hparams.*.context_text: reference`` samples its own template set (provenance and unit
    settings name it ``memit/reference``), the edits are computed from that set, and its units
    have their own digest. The miniature's BOS string is ``<s>``, which the reference's decoding
    removes too: the same templates, hence the same scores, to the bit."""
    used: list = []
    real = protocols.prepare_targets
    monkeypatch.setattr(protocols, "prepare_targets", lambda m, t, f, hp, ctx, **k: used.append(ctx) or real(m, t, f, hp, ctx, **k))
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4]}
    clean = protocols.run_batch(use(study, params_for(tmp_path, **over)), log=quiet)
    assert used and all(c is study._contexts["memit"] for c in used)
    used.clear()
    with pytest.raises(RunConflict, match="context_text"):  # the same run's folder holds the clean units
        protocols.run_batch(use(study, params_for(tmp_path, **over, **{"batch.hparams.common.context_text": "reference"})), log=quiet)
    p = params_for(tmp_path, name="r", **over, **{"batch.hparams.common.context_text": "reference"})
    ref = protocols.run_batch(use(study, p), log=quiet)
    assert used and all(c is study._contexts["memit/reference"] for c in used)  # the edits read the reference set
    assert study.contexts("memit", "reference") == study.contexts("memit")
    assert study.contexts("memit", "reference") is study._contexts["memit/reference"]
    assert "memit/reference" in study.provenance()["context_templates"]
    units = [json.loads(u.read_text()) for u in (exp_dir(p, "batch") / "parts").glob("*.unit.json")]
    assert units and all(set(u["settings"]["context_templates"]) == {"memit/reference"} for u in units)
    cols = [c for c in clean.columns if not c.startswith("seconds")]
    pd.testing.assert_frame_equal(clean[cols].reset_index(drop=True), ref[cols].reset_index(drop=True))
    assert_unedited(study.model, weights0)


@pytest.mark.parametrize("runner,extra", [("batch", {}), ("sequential", {}),
                                          ("sequential", {"sequential.batch_sizes": [1], "sequential.eval_group": 2})])
def test_also_alignment_stores_the_second_reading_of_the_same_edits(study, weights0, tmp_path, runner, extra):
    """``evaluation.also_alignment: reference`` stores the reference's BOS-shifted scores of the
    same edits beside the correct ones: each equal to a run under that alignment alone, to the
    bit (the same edits, the same scoring calls; sequential batches evaluated in groups too); its
    units have their own digest."""
    from editlib.metrics import alignments_in, with_alignment
    over = {f"{runner}.methods": ["memit"], f"{runner}.batch_sizes": [2], **extra}
    run = getattr(protocols, f"run_{runner}")
    cols = lambda df: [c for c in df.columns if not c.startswith("seconds")]  # noqa: E731
    both = run(use(study, params_for(tmp_path, name="both", **over, **{"evaluation.also_alignment": "reference"})), log=quiet)
    correct = run(use(study, params_for(tmp_path, name="correct", **over)), log=quiet)
    reference = run(use(study, params_for(tmp_path, name="ref", **over, **{"evaluation.alignment": "reference"})), log=quiet)
    assert alignments_in(both) == ["reference"] and alignments_in(correct) == []
    pd.testing.assert_frame_equal(both[cols(correct)], correct[cols(correct)])
    ref = with_alignment(both, "reference")
    pd.testing.assert_frame_equal(ref[cols(reference)], reference[cols(reference)])
    assert not np.allclose(correct["ES_mag"], reference["ES_mag"])
    assert_unedited(study.model, weights0)


def test_a_resumed_sequential_run_counts_its_stored_batches_toward_the_limit(study, weights0, tmp_path, monkeypatch):
    """A sequential configuration resumed after its failed batches were stored (under a higher
    limit) judges the stored and new edits together: the stored totals alone stop it."""
    monkeypatch.setattr(protocols, "MIN_EDITS_FOR_FAILURE_CHECK", 2)
    over = {"sequential.methods": ["memit"], "sequential.batch_sizes": [2], "hparams.common.v_lr": 1e30}
    p = params_for(tmp_path, **over, **{"evaluation.max_failed_fraction": 1.0})
    with pytest.raises(RuntimeError, match="injected failure after batch 0"):
        protocols.run_sequential(use(study, p), log=quiet, fail_after=1)
    with pytest.raises(protocols.TooManyFailures, match=r"2 of 2 edits failed .* counting the units stored by earlier"):
        protocols.run_sequential(use(study, params_for(tmp_path, **over)), log=quiet)
    assert_unedited(study.model, weights0)


def test_section_hparams_override_reaches_the_edit(study, weights0, tmp_path):
    """``batch: {hparams: {memit: {mom2_update_weight: 7}}}`` sets MEMIT's μ in batch mode only
    (not EMMET's, not another experiment's) and is part of the run's identity."""
    over = {"batch.batch_sizes": [4], "batch.hparams.memit.mom2_update_weight": 7,
            "singular.hparams": None}
    p = params_for(tmp_path, **over)
    assert p.method_hparams("memit", 1, "singular").mom2_update_weight == p.hparams["memit"].mom2_update_weight != 7
    protocols.run_batch(use(study, p), log=quiet)
    b = pd.read_parquet(exp_dir(p, "batch") / "batches.parquet")
    assert b.set_index("method").mu.to_dict() == {"memit": 7.0, "emmet": 0.0}
    spec = json.loads((exp_dir(p, "batch") / "manifest.json").read_text())["params"]["spec"]
    assert spec["hparams"]["memit"]["mom2_update_weight"] == 7
    with pytest.raises(RunConflict, match="spec.hparams.memit.mom2_update_weight"):
        protocols.run_batch(use(study, params_for(tmp_path, **{**over, "batch.hparams.memit.mom2_update_weight": 8})),
                            log=quiet)
    assert_unedited(study.model, weights0)


def test_same_seed_same_scores(study, weights0, tmp_path):
    """Two runs (a freshly loaded study for the second) with the same seeds, generation on: identical
    scores and GE. Another ordering seed picks other facts."""
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4], "evaluation.generation": True,
            "evaluation.gen_max_len": 12, "evaluation.gen_seed": 3}
    one = protocols.run_batch(use(study, params_for(tmp_path, "one", **over)), log=quiet)
    assert one.GE.notna().all()
    q = params_for(tmp_path, "two", **over)
    two = protocols.run_batch(protocols.open_study(q, experiments=["batch"], log=quiet), log=quiet)
    assert_frame_equal(one, two, check_exact=True)
    assert_unedited(study.model, weights0)
    other = use(study, params_for(tmp_path, **{"data.ordering_seed": 38})).facts(4)
    assert [r.case_id for r in other] != one.case_id.tolist()


def test_gen_batch_size_changes_no_text(study, weights0, tmp_path):
    """GE samples every prompt from its own seeded stream, so evaluation.gen_batch_size (prompts
    decoded together) reaches the generation and changes no score."""
    over = {"batch.methods": ["memit"], "batch.batch_sizes": [4], "evaluation.generation": True,
            "evaluation.gen_max_len": 12, "evaluation.gen_seed": 3}
    seen = []
    real = protocols.evaluate_records

    def spy(*a, **k):
        seen.append(k.get("gen_batch_size"))
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "evaluate_records", spy)
        one = protocols.run_batch(use(study, params_for(tmp_path, "g64", **over)), log=quiet)
        two = protocols.run_batch(use(study, params_for(tmp_path, "g3", **{**over, "evaluation.gen_batch_size": 3})),
                                  log=quiet)
    assert set(seen) == {64, 3}
    assert one.GE.notna().all()
    assert_frame_equal(one, two, check_exact=True)
    # evaluation.gen_kv_gb caps the rows per decode batch by their KV cache: same texts again
    from editlib import generation
    from editlib.arch import kv_bytes_per_token
    rows, real_batch = [], generation._sample_batch

    def count_rows(model, seqs, *a, **k):
        rows.append(len(seqs))
        return real_batch(model, seqs, *a, **k)

    budget = 2.5 * kv_bytes_per_token(study.model) * 12 / 1e9  # two rows of gen_max_len tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_sample_batch", count_rows)
        capped = protocols.run_batch(use(study, params_for(tmp_path, "kv", **{**over, "evaluation.gen_kv_gb": budget})),
                                     log=quiet)
    assert max(rows) == 2 and len(rows) > 2
    assert_frame_equal(one, capped, check_exact=True)
    # not part of the results' identity: the finished folder reopens under another gen_batch_size,
    # a KV budget, and fast_gram (no effect on a float32 model)
    again = protocols.run_batch(use(study, params_for(tmp_path, "g64", **{
        **over, "evaluation.gen_batch_size": 5, "evaluation.gen_kv_gb": 1.0, "covariance.fast_gram": True})),
                                log=quiet)
    assert_frame_equal(one, again, check_exact=True)
    # GE texts decoded another way are other results: that folder does not reopen under them
    with pytest.raises(RunConflict):
        protocols.run_batch(use(study, params_for(tmp_path, "g64", **{**over, "evaluation.gen_text": "reference"})),
                            log=quiet)
    assert_unedited(study.model, weights0)


# --------------------------------------------------------------------------- bad parameters fail fast

@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the parameters were checked")
    monkeypatch.setattr(protocols, "load_model", boom)


def _params_file(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "bad.yaml"
    f.write_text(f"extends: {SMOKE}\n{text}\n")
    return f


@pytest.mark.parametrize("over, exc, names", [
    ({"bogus.x": 1}, ParamsError, ["'bogus'"]),
    ({"batch.bogus": 1}, ParamsError, ["'batch'", "bogus"]),
    ({"batch.hparams": {"memit": {"bogus": 1}}}, ParamsError, ["batch.hparams.memit", "bogus"]),
    ({"batch.methods": ["memit", "bogus"]}, ParamsError, ["batch.methods", "bogus"]),
    ({"batch.layer": 6}, ParamsError, ["batch", "[6]", "0..5"]),
    ({"sequential.layer": -1}, ParamsError, ["sequential", "[-1]"]),
    ({"layer_search.layers": [0, 9]}, ParamsError, ["layer_search", "[9]"]),
    ({"batch.batch_sizes": [2, 8]}, ParamsError, ["batch.batch_sizes", "[8]", "batch.total=4"]),
    ({"sequential.batch_sizes": [5]}, ParamsError, ["sequential.batch_sizes", "[5]"]),
    ({"sweep.batch_size": 8}, ParamsError, ["sweep.batch_size=8", "sweep.total=4"]),
    ({"singular.chunk_size": 0}, ParamsError, ["singular.chunk_size", "at least 1"]),
    ({"covariance.max_batch_tokens": 32, "covariance.max_length": 48}, ParamsError,
     ["covariance.max_batch_tokens (32)", "covariance.max_length (48)"]),
    ({"batch.total": 5000, "batch.batch_sizes": [4]}, ParamsError, ["batch needs 5000 facts"]),
    ({"data.source": "counterfact"}, DatasetNotFound, ["EDITLIB_COUNTERFACT", "missing-cf.json"]),
    ({"data.source": "counterfact", "data.counterfact_path": "nowhere/cf.json"}, DatasetNotFound,
     ["nowhere/cf.json"]),
    ({"batch.layer": "best"}, ParamsError, ["batch", "best", "layer search"]),
    ({"model.tiny": {"source": "world", "n_records": 10, "max_step": 9}}, ParamsError,
     ["model.tiny", "max_step", "max_steps"]),
    # typos that would otherwise run silently on other facts or another scoring alignment
    ({"data.source": "counterfacts"}, ParamsError, ["data.source", "'counterfacts'"]),
    ({"data.fact_list": "Reference"}, ParamsError, ["data.fact_list", "'Reference'"]),
    ({"evaluation.alignment": "corect"}, ParamsError, ["evaluation.alignment", "'corect'"]),
    ({"batch.batch_sizes": []}, ParamsError, ["batch.batch_sizes must not be empty"]),
    ({"batch.windows": []}, ParamsError, ["batch.windows", "non-empty"]),
    ({"beyond.methods": []}, ParamsError, ["beyond.methods", "must not be empty"]),
])
def test_bad_parameters_fail_before_loading(over, exc, names, tmp_path, monkeypatch, no_model_load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDITLIB_COUNTERFACT", str(tmp_path / "missing-cf.json"))
    with pytest.raises(exc) as e:
        protocols.open_study(params_for(tmp_path, **over), experiments=["layer_search", "batch", "sequential"]
                             if over.get("batch.layer") != "best" else ["batch"], log=quiet)
    for n in names:
        assert n in str(e.value), (n, str(e.value))


def test_a_counterfact_miniature_is_built_from_the_file_its_facts_are_read_from(tmp_path, monkeypatch):
    """``model.tiny`` with ``source: counterfact`` trains the miniature on ``data.counterfact_path``,
    the file whose records the study then reads by case id (not the default CounterFact), with
    every key of the build spec passed on; the manifest's provenance hashes both files."""
    mdir = tmp_path / "mini"
    mdir.mkdir()
    (mdir / "case_ids.json").write_text("[0]")
    calls = []

    def spy(source, n_records, **kw):
        calls.append((source, n_records, kw))
        return mdir

    monkeypatch.setattr("editlib.tiny.ensure_tiny", spy)
    from editlib.counterfact import save_records, sha256_file
    from editlib.world import make_world
    cf = save_records(make_world(3, 0), tmp_path / "my-counterfact.json")  # CounterFact's schema
    spec = {"source": "counterfact", "n_records": 2000, "n_layers": 6, "seed": 3, "max_steps": 50}
    p = params_for(tmp_path, **{"model.tiny": spec, "data.counterfact_path": str(cf)})
    assert protocols.model_dir_for(p.model, quiet, p.data.counterfact_path) == str(mdir)
    (source, n, kw), = calls
    assert (source, n) == ("counterfact", 2000)
    assert kw.pop("log") is quiet
    assert kw == {"n_layers": 6, "seed": 3, "max_steps": 50, "counterfact_path": str(cf)}
    # and open_study passes the data's file on (stopped right after, before any model is loaded)
    calls.clear()
    monkeypatch.setattr(protocols, "check_before_loading", lambda *a, **k: None)

    def stop(*a, **k):
        raise RuntimeError("stop")

    monkeypatch.setattr(protocols, "load_model", stop)
    with pytest.raises(RuntimeError, match="stop"):
        protocols.open_study(p, log=quiet)
    assert calls[0][2]["counterfact_path"] == str(cf)
    prov = protocols._data_provenance(p, str(mdir))
    assert prov == {"source": "model", "path": str(cf), "sha256": sha256_file(cf, uncompressed=True),
                    "case_ids": str(mdir / "case_ids.json"), "case_ids_sha256": sha256_file(mdir / "case_ids.json")}


def test_world_facts_and_their_provenance(tmp_path):
    """``data.source: world`` reads the facts the world miniature was trained on (make_world of the
    same size and seed equals its records.json) and records that size and seed as provenance."""
    from editlib.tiny import load_tiny_records
    mdir = str(REPO_ROOT / "models" / "tiny-world")
    p = params_for(tmp_path, **{"data.source": "world", "data.world_records": 1000, "data.world_seed": 0})
    assert protocols.load_records_for(p, mdir) == load_tiny_records(mdir)
    prov = protocols._data_provenance(p, mdir)
    assert prov == {"source": "world", "world_records": 1000, "world_seed": 0}
    other = params_for(tmp_path, **{"data.source": "world", "data.world_records": 1000, "data.world_seed": 1})
    assert protocols.load_records_for(other, mdir) != load_tiny_records(mdir)


def test_gen_budget_without_a_row_fails_when_the_study_opens(tmp_path):
    """A GE KV budget too small for one row of the loaded model fails as the study opens, naming
    evaluation.gen_kv_gb, before any edit; without GE the budget is not read."""
    from editlib.arch import kv_bytes_per_token

    over = {"evaluation.generation": True, "evaluation.gen_max_len": 12}
    tiny_budget = {"evaluation.gen_kv_gb": 1e-12}
    with pytest.raises(ParamsError, match=r"evaluation\.gen_kv_gb = 1e-12 GB holds no generation row"):
        protocols.open_study(params_for(tmp_path, **over, **tiny_budget), log=quiet)
    st = protocols.open_study(params_for(tmp_path, **{**over, "evaluation.generation": False}, **tiny_budget), log=quiet)
    row = kv_bytes_per_token(st.model) * 12 / 1e9
    protocols.open_study(params_for(tmp_path, **over, **{"evaluation.gen_kv_gb": row}), log=quiet)


def test_evaluate_gen_budget_without_a_row(capsys, tmp_path):
    """`evaluate --gen-kv-gb` too small for one generation row of the loaded model: one line, exit
    2, before any scoring (the model has to be loaded to know its cache per token)."""
    tiny = str(REPO_ROOT / "models" / "tiny-world")
    rc = main(["evaluate", "--model", tiny, "--records", tiny, "--out", str(tmp_path / "e.parquet"),
               "--gen-kv-gb", "1e-12"])
    lines = [l for l in capsys.readouterr().err.splitlines() if "error" in l]  # (weights' loading bar aside)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("editlib evaluate: error: --gen-kv-gb = 1e-12 GB holds no generation row")
    assert not (tmp_path / "e.parquet").exists()


def test_evaluate_gen_decode_graph_on_a_cpu(capsys, tmp_path):
    """`evaluate --gen-decode graph` on a CPU: one line, exit 2, before any scoring."""
    tiny = str(REPO_ROOT / "models" / "tiny-world")
    rc = main(["evaluate", "--model", tiny, "--records", tiny, "--out", str(tmp_path / "e.parquet"),
               "--gen-decode", "graph", "--device", "cpu"])
    lines = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("editlib evaluate: error: --gen-decode graph captures CUDA graphs; the device is cpu")
    assert not (tmp_path / "e.parquet").exists()


def test_bad_params_files(tmp_path, no_model_load):
    with pytest.raises(ParamsError, match="bogus_section"):
        resolve(_params_file(tmp_path, "bogus_section: {a: 1}"))
    with pytest.raises(ParamsError, match=r"'batch'.*bogus_key"):
        resolve(_params_file(tmp_path, "batch: {bogus_key: 1}"))
    with pytest.raises(ParamsError, match="unknown params section 'bogus'"):
        resolve(SMOKE, sections={"bogus": {"a": 1}})


def test_cuda_graphs_on_a_cpu_model_fail_before_loading(tmp_path):
    """hparams compile_blocks: reduce-overhead needs the model on CUDA: said before anything loads;
    the CPU's compile mode passes."""
    p = params_for(tmp_path, **{"hparams.common.compile_blocks": "reduce-overhead"})
    assert p.method_hparams("memit", 1).values.compile_blocks == "reduce-overhead"
    with pytest.raises(ParamsError, match="reduce-overhead captures CUDA graphs, but model.device is 'cpu'"):
        protocols.check_before_loading(p, ["sequential"])
    protocols.check_before_loading(params_for(tmp_path, **{"hparams.common.compile_blocks": "default"}), ["sequential"])
    section = params_for(tmp_path, **{"sequential.hparams": {"common": {"compile_blocks": "reduce-overhead"}}})
    vals = section.value_hparams()
    assert vals["sequential.memit"].compile_blocks == "reduce-overhead" and vals["batch.memit"].compile_blocks == "off"
    with pytest.raises(ParamsError, match="reduce-overhead captures CUDA graphs"):  # a section's own override too
        protocols.check_before_loading(section, ["sequential"])
    protocols.check_before_loading(section, ["batch"])
    for off in ("off", False):  # `compile_blocks: off` unquoted in YAML is False
        p = params_for(tmp_path, **{"hparams.common.compile_blocks": off})
        assert p.method_hparams("memit", 1).values.compile_blocks == "off"
    assert resolve(SMOKE, overrides=["hparams.common.compile_blocks=off"]).value_hparams()["batch.memit"].compile_blocks == "off"
    with pytest.raises(ParamsError, match="compile_blocks must be one of"):
        params_for(tmp_path, **{"hparams.common.compile_blocks": True})


def test_captured_value_steps_on_a_cpu_model_fail_before_loading(tmp_path):
    """hparams capture_steps records CUDA graphs: a CPU model is refused before anything loads,
    for the common hparams and for one section's own override (named), not for the sections that
    do not capture."""
    p = params_for(tmp_path, **{"hparams.common.capture_steps": True})
    assert p.method_hparams("memit", 1).values.capture_steps
    with pytest.raises(ParamsError, match="capture_steps records CUDA graphs .*but model.device is 'cpu'"):
        protocols.check_before_loading(p, ["batch"])
    section = params_for(tmp_path, **{"sequential.hparams": {"common": {"capture_steps": True}}})
    assert [k for k, v in section.value_hparams().items() if v.capture_steps] == ["sequential.memit", "sequential.emmet"]
    with pytest.raises(ParamsError, match=r"capture_steps records CUDA graphs \(sequential.memit, sequential.emmet\)"):
        protocols.check_before_loading(section, ["sequential"])
    protocols.check_before_loading(section, ["batch"])
    with pytest.raises(ParamsError, match="use one of the two"):
        params_for(tmp_path, **{"hparams.common.capture_steps": True, "hparams.common.compile_blocks": "default"})


def test_gen_decode_static_changes_no_score(study, weights0, tmp_path):
    """evaluation.gen_decode: static (editlib.decode) reaches GE's generation and gives the same
    texts as the transformers forward, under batch mode's per-row edits and a sequential run's
    grouped evaluation (later batches' updates subtracted by hooks): the same stored cases."""
    seen = []
    real = protocols.evaluate_records

    def spy(*a, **k):
        seen.append(k.get("gen_decode"))
        return real(*a, **k)

    ge = {"evaluation.generation": True, "evaluation.gen_max_len": 12, "evaluation.gen_seed": 3}
    bat = {"batch.methods": ["memit"], "batch.batch_sizes": [4], **ge}
    seq = {"sequential.methods": ["memit"], "sequential.total": 4, "sequential.batch_sizes": [1],
           "sequential.eval_group": 4, **ge}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "evaluate_records", spy)
        out = {d: (protocols.run_batch(use(study, params_for(tmp_path / d, "b", **bat, **{"evaluation.gen_decode": d})),
                                       log=quiet),
                   protocols.run_sequential(use(study, params_for(tmp_path / d, "s", **seq,
                                                                  **{"evaluation.gen_decode": d})), log=quiet))
               for d in ("transformers", "static")}
    assert set(seen) - {None} == {"transformers", "static"}  # None: held-out degradation scores (no GE)
    for a, b in zip(out["static"], out["transformers"]):
        assert a.GE.notna().all()
        assert_frame_equal(sort_units(a).drop(columns=[c for c in a if c.startswith("seconds")], errors="ignore"),
                           sort_units(b).drop(columns=[c for c in b if c.startswith("seconds")], errors="ignore"),
                           check_exact=True)
    assert_unedited(study.model, weights0)


def test_capture_steps_reaches_the_value_steps_and_changes_no_score(study, weights0, tmp_path):
    """hparams capture_steps set in the params reaches every value step a protocol runs (batch
    mode's chunks, a sequential run's batches after each edit), with the CUDA graph stood in for
    (tests/test_values.py's stand-in), and the stored cases equal the eager run's."""
    from test_values import _StandInGraph

    from editlib import values
    common = {"hparams.common.v_num_grad_steps": 6, "batch.methods": ["memit"], "batch.batch_sizes": [2],
              "sequential.methods": ["memit"], "sequential.batch_sizes": [1]}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(values, "CapturedStep", _StandInGraph)
        mp.setattr(values, "shared_pool", lambda device, fresh=False: "the shared pool")
        mp.setattr(values, "check_capture_device", lambda hp, device: None)
        for on in (False, True):
            _StandInGraph.seen = {}
            p = params_for(tmp_path / str(on), **common, **{"hparams.common.capture_steps": on})
            out[on] = (protocols.run_batch(use(study, p), log=quiet), protocols.run_sequential(use(study, p), log=quiet))
            assert bool(_StandInGraph.seen.get("replays")) == on
            assert not values._KEPT  # the B = 1 run's kept graphs went with its unit
    for a, b in zip(out[True], out[False]):
        assert_frame_equal(sort_units(a).drop(columns=[c for c in a if c.startswith("seconds")], errors="ignore"),
                           sort_units(b).drop(columns=[c for c in b if c.startswith("seconds")], errors="ignore"),
                           check_exact=True)
    assert_unedited(study.model, weights0)


def test_gen_decode_it_cannot_run_fails_before_editing(tmp_path):
    """gen_decode: graph on a CPU model fails before loading (compiled runs uncaptured there); a model the decode step cannot run
    (GPT-2 blocks) fails when the study opens, naming the key; without GE neither is read."""
    from _fixtures import tiny_gpt2

    over = {"evaluation.generation": True, "evaluation.gen_decode": "graph"}
    with pytest.raises(ParamsError, match="gen_decode: graph captures CUDA graphs, but model.device is 'cpu'"):
        protocols.check_before_loading(params_for(tmp_path, **over), ["batch"])
    protocols.check_before_loading(params_for(tmp_path, **{**over, "evaluation.generation": False}), ["batch"])
    static = params_for(tmp_path, **{**over, "evaluation.gen_decode": "static"})
    protocols.check_before_loading(static, ["batch"])
    protocols.check_before_loading(params_for(tmp_path, **{**over, "evaluation.gen_decode": "compiled"}), ["batch"])
    with pytest.raises(ParamsError, match="gen_decode: static cannot decode this model: gpt2 blocks are not Llama-style"):
        protocols._check_gen_budget(static, tiny_gpt2(50))


def test_best_layer_after_the_layer_search(study, weights0, tmp_path):
    """layer: best passes the check when the layer search runs first, and uses its best layer."""
    p = params_for(tmp_path, **{"batch.layer": "best", "batch.methods": ["memit"], "batch.batch_sizes": [4],
                                "layer_search.methods": ["memit"], "layer_search.n_facts": 2})
    protocols.check_before_loading(p, ["layer_search", "batch"])
    st = use(study, p)
    ls = protocols.run_layer_search(st, log=quiet)
    protocols.check_before_loading(p, ["batch"])  # now finished
    best = protocols.best_layer(st)
    s = protocols.summarize(ls, by=["layer"])
    assert best == int(s.sort_values(["S", "layer"], ascending=[False, True]).iloc[0]["layer"])
    cases = protocols.run_batch(st, log=quiet)
    assert (cases.layer == best).all()
    assert_unedited(study.model, weights0)


def test_best_layer_is_the_argmax_of_a_constructed_score_table(study, tmp_path):
    """best_layer reads the stored layer search: MEMIT's highest S wins (not ROME's), ties go to
    the lower layer."""
    p = params_for(tmp_path)
    root = exp_dir(p, "layer_search")
    root.mkdir(parents=True)
    rows = []
    for layer, memit, rome in ((0, 0.5, 0.99), (1, 0.9, 0.1), (2, 0.9, 0.1), (3, 0.2, 0.2)):
        for m, v in (("memit", memit), ("rome", rome)):
            rows += [dict(case_id=i, method=m, layer=layer, ES=v, PS=v, NS=v) for i in range(3)]
    pd.DataFrame(rows).to_parquet(root / "cases.parquet")
    assert protocols.best_layer(use(study, p)) == 1


def test_second_model_results_go_to_their_own_folder(study, tmp_path):
    """The main model's experiments are `<name>/<experiment>`, a second model's get its label
    appended (Figure 6), and figure titles flag editlib miniatures."""
    assert study.suffix == ""
    assert study.title.endswith("miniature: not Llama-3-8B") and study.label in study.title
    p = params_for(tmp_path, **{"second_model.id": str(REPO_ROOT / "models" / "tiny-world-4l"),
                                "second_model.tiny": None, "second_model.label": "four",
                                "layer_search.methods": ["memit"], "layer_search.n_facts": 2,
                                "layer_search.layers": [0, 3]})
    st2 = protocols.open_study(p, which="second_model", experiments=["layer_search"], log=quiet)
    assert st2.n_layers == 4 and st2.suffix == "-four"
    protocols.run_layer_search(st2, log=quiet)
    assert (exp_dir(p, "layer_search-four") / "cases.parquet").is_file()
    assert not exp_dir(p, "layer_search").exists()
    ls2 = pd.read_parquet(exp_dir(p, "layer_search-four") / "cases.parquet")
    s2 = protocols.summarize(ls2[ls2.method == "memit"], by=["layer"])
    assert protocols.best_layer(st2) == int(s2.sort_values(["S", "layer"], ascending=[False, True]).iloc[0]["layer"])


# --------------------------------------------------------------------------- command line

CLI = ["--params", "params/smoke.yaml", "--set", "batch.total=4", "--set", "batch.batch_sizes=[2,4]",
       "--set", "hparams.common.v_num_grad_steps=3"]


def test_cli_run_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["run", "layer-search", "batch", *CLI, "--set", f"results_dir={tmp_path}",
               "--set", "layer_search.n_facts=2", "--set", "layer_search.layers=[0,1]",
               "--set", "layer_search.methods=[memit]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "== layer_search (smoke" in out and "== batch (smoke" in out
    table = out.split("== batch (smoke")[1]
    for word in ("batch_size", "method", "S", "ES", "PS", "NS", "memit", "emmet"):
        assert word in table, word
    cases = pd.read_parquet(tmp_path / "smoke" / "batch" / "cases.parquet")
    assert cases.groupby(["method", "batch_size"]).size().to_dict() == {
        (m, b): 4 for m in ("emmet", "memit") for b in (2, 4)}


def test_cli_errors(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(REPO_ROOT)
    rc = main(["run", "batch", *CLI, "--set", f"results_dir={tmp_path}", "--set", "bogus.x=1"])
    err = capsys.readouterr().err
    assert rc != 0 and "'bogus'" in err
    # smoke.yaml's batch layer is 'best': without a finished layer search, a clear error up front
    rc = main(["run", "batch", *CLI, "--set", f"results_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc != 0 and "best" in err and "layer search" in err


def test_tf32_key(tmp_path):
    """model.tf32 (default off, as the reference) switches TF32 matmuls for the study's process."""
    assert params_for(tmp_path).model.tf32 is False
    assert params_for(tmp_path, **{"model.tf32": True}).model.tf32 is True
    try:
        protocols.set_tf32(True)
        assert matmul_tf32() and torch.backends.cudnn.allow_tf32
    finally:
        protocols.set_tf32(False)
    assert not matmul_tf32()
    try:  # open_study switches it before the model loads
        assert _switches_at_load(tmp_path, {"model.tf32": True}, matmul_tf32)
        assert not _switches_at_load(tmp_path, {}, matmul_tf32)
    finally:
        protocols.set_tf32(False)


class _Loaded(Exception):
    pass


def _switches_at_load(tmp_path, over: dict, switch) -> bool:
    """``switch()`` as ``open_study`` leaves it when it reaches ``load_model`` (stopped there)."""
    seen = []

    def load_model(*a, **k):
        seen.append(switch())
        raise _Loaded

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols, "load_model", load_model)
        with pytest.raises(_Loaded):
            protocols.open_study(params_for(tmp_path, **over), log=quiet)
    return seen[0]


def test_deterministic_key(tmp_path, monkeypatch):
    """model.deterministic (default off) puts torch in deterministic mode (warning where a kernel
    has no deterministic version) with cuBLAS's fixed workspace; the second model inherits it."""
    assert params_for(tmp_path).model.deterministic is False
    p = resolve(REPO_ROOT / "params" / "tiny.yaml", overrides={"model.deterministic": True})
    assert p.model.deterministic is True and p.second_model.deterministic is True
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # records the variable's state for the undo ...
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")  # ... then starts without it
    try:
        protocols.set_deterministic(False)  # off: leaves the process as it is
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        protocols.set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        protocols.set_deterministic(False)  # a later study without it does not switch it off
        assert torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(False)
        assert not _switches_at_load(tmp_path, {}, torch.are_deterministic_algorithms_enabled)
        assert _switches_at_load(tmp_path, {"model.deterministic": True}, torch.are_deterministic_algorithms_enabled)
    finally:
        torch.use_deterministic_algorithms(False)


def test_windowed_memit_in_the_batch_protocol(study, weights0, tmp_path):
    """batch.windows: MEMIT over the chosen layer and the next (window 2) beside the single layer,
    its rows labelled memit-w2; EMMET (one layer only) is not windowed; the windowed edit equals
    apply_edit on both layers; a window past the last layer fails before any edit."""
    p = params_for(tmp_path, **{"batch.windows": [1, 2], "batch.methods": ["memit", "emmet"]})
    cases = protocols.run_batch(use(study, p), log=quiet)
    assert sorted(cases.method.unique()) == ["emmet", "memit", "memit-w2"]
    assert len(cases[cases.method == "memit-w2"]) == len(cases[cases.method == "memit"])
    assert cases[SCORES].notna().all().all()
    assert_unedited(study.model, weights0)
    # the first batch of B = 2 by hand: MEMIT on layers 1 and 2
    from editlib.editing import apply_edit
    from editlib.weights import EditSession
    st = use(study, p)
    hp = dataclasses.replace(p.method_hparams("memit", 1, "batch"), layers=(1, 2))
    facts = st.facts(p.batch.total)[:2]
    with EditSession(study.model) as s:
        apply_edit(study.model, study.tok, facts, hp, st.covs([1, 2]), st.contexts(hp.context_templates), s)
        want = st.evaluate(facts)
    got = sort_units(cases[(cases.method == "memit-w2") & (cases.batch_size == 2) & (cases.batch_index == 0)])
    assert np.allclose(got["ES_mag"].to_numpy(), want.sort_values("case_id")["ES_mag"].to_numpy(), atol=1e-5)
    assert_unedited(study.model, weights0)
    with pytest.raises(ParamsError, match=r"batch.windows \[6\] from layer 1 run past"):
        protocols.run_batch(use(study, params_for(tmp_path / "far", **{"batch.windows": [6]})), log=quiet)


def test_windowed_memit_in_the_sequential_protocol(study, weights0, tmp_path):
    """sequential.windows: MEMIT over the chosen layer and the next, its own sequential run labelled
    memit-w2 (EMMET is not windowed); its first batch equals apply_edit on both layers from the
    unedited model; the model is restored; a window past the last layer fails before any edit."""
    p = params_for(tmp_path, **{"sequential.windows": [1, 2], "sequential.methods": ["memit", "emmet"]})
    cases = protocols.run_sequential(use(study, p), log=quiet)
    assert sorted(cases.method.unique()) == ["emmet", "memit", "memit-w2"]
    w2, one = cases[cases.method == "memit-w2"], cases[cases.method == "memit"]
    assert len(w2) == len(one) and set(w2["eval"]) == {"current", "final"} and (w2.layer == 1).all()
    assert cases[SCORES].notna().all().all()
    assert_unedited(study.model, weights0)
    from editlib.editing import apply_edit
    from editlib.weights import EditSession
    st = use(study, p)
    B = min(p.sequential.batch_sizes)
    hp = dataclasses.replace(p.method_hparams("memit", 1, "sequential"), layers=(1, 2))
    facts = st.facts(p.sequential.total)[:B]
    with EditSession(study.model) as s:
        apply_edit(study.model, study.tok, facts, hp, st.covs([1, 2]), st.contexts(hp.context_templates), s)
        want = st.evaluate(facts)
    got = w2[(w2.batch_size == B) & (w2.batch_index == 0) & (w2["eval"] == "current")].sort_values("case_id")
    assert np.allclose(got["ES_mag"].to_numpy(), want.sort_values("case_id")["ES_mag"].to_numpy(), atol=1e-5)
    assert_unedited(study.model, weights0)
    with pytest.raises(ParamsError, match=r"sequential.windows \[6\] from layer 1 run past"):
        protocols.run_sequential(use(study, params_for(tmp_path / "far", **{"sequential.windows": [6]})), log=quiet)


# --------------------------------------------------------------------------- sequential batches evaluated together

GROUPED = {"sequential.total": 6, "sequential.batch_sizes": [1, 2], "sequential.methods": ["memit", "alphaedit", "encore"],
           "sequential.windows": [1, 2], "sequential.degradation_every": 4, "sequential.heldout_facts": 4,
           "sequential.forgetting_every": 4}


def test_grouped_sequential_evaluation_equals_evaluating_after_each_batch(study, weights0, tmp_path):
    """sequential.eval_group 4: up to four consecutive batches evaluated in one call, each batch's
    rows with the later batches' updates subtracted by hooks (two layers for memit-w2; AlphaEdit
    and ENCORE with their run's earlier keys), give the same cases as evaluating right after each batch:
    ES/PS/NS identical, margins to float32 rounding, the group's last batch bit for bit;
    forgetting and degradation (each ends a group) and the batch diagnostics identical; the model
    restored."""
    ref = protocols.run_sequential(use(study, params_for(tmp_path / "ref", **GROUPED)), log=quiet)
    p = params_for(tmp_path / "grp", **GROUPED, **{"sequential.eval_group": 4})
    got = protocols.run_sequential(use(study, p), log=quiet)
    assert_unedited(study.model, weights0)
    a, b = sort_units(got), sort_units(ref)
    assert len(a) == len(b) and {"memit", "memit-w2", "alphaedit", "alphaedit-w2", "encore"} <= set(a.method)
    assert (a["case_id"].to_numpy() == b["case_id"].to_numpy()).all() and set(a["eval"]) == {"current", "after_4", "final"}
    # forgetting after 4 edited facts whatever the batch size: the 4 facts so far, once per run
    runs = a.groupby(["method", "batch_size"]).size().index
    assert a[a["eval"] == "after_4"].groupby(["method", "batch_size"]).size().reindex(runs).eq(4).all()
    for c in ("ES", "PS", "NS", "ES_acc", "PS_acc", "NS_acc", "failed"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    assert_frame_equal(a[SCORES], b[SCORES], check_exact=False, rtol=0, atol=1e-5)
    # B = 1 (forgetting and degradation after 4 facts, the run's end): groups {0, 1, 2, 3}, {4, 5};
    # B = 2: {0, 1} (4 facts), {2}; the last batch of a group and every later evaluation bit for bit
    last = (a.batch_size == 1) & a.batch_index.isin([3, 5]) | (a.batch_size == 2) & a.batch_index.isin([1, 2]) \
        | (a["eval"] != "current")
    assert_frame_equal(a[last][SCORES], b[last][SCORES], check_exact=True)
    inner = ~last
    assert not a[inner][SCORES].equals(b[inner][SCORES])  # the hooks ran (float32 sums in another order)
    ba, bb = (sort_units(pd.read_parquet(exp_dir(x, "sequential") / "batches.parquet"))
              for x in (p, params_for(tmp_path / "ref", **GROUPED)))
    cols = [c for c in ba.columns if not c.startswith("seconds")]
    assert_frame_equal(ba[cols], bb[cols], check_exact=True)
    n_runs = a.method.nunique()
    assert ba["heldout_known"].notna().sum() == n_runs * (2 + 2)  # after facts 4 and 6 of each B = 1 and 2 run


def test_grouped_sequential_evaluation_generates_the_same_texts(study, weights0, tmp_path):
    """With GE on, each batch's generation prompts continue under its own weights in the grouped
    call: the same texts, hence the same GE scores, as generating right after each batch."""
    over = {"sequential.methods": ["memit"], "sequential.total": 4, "sequential.batch_sizes": [1],
            "evaluation.generation": True, "evaluation.gen_max_len": 12}
    ref = protocols.run_sequential(use(study, params_for(tmp_path / "ref", **over)), log=quiet)
    got = protocols.run_sequential(use(study, params_for(tmp_path / "grp", **over, **{"sequential.eval_group": 4})),
                                   log=quiet)
    a, b = sort_units(got), sort_units(ref)
    ge = [c for c in a.columns if c in ("GE", "fluency", "consistency")]
    assert ge and a[ge].notna().all().all()
    assert_frame_equal(a[ge], b[ge], check_exact=False, rtol=1e-6, atol=0)
    assert_unedited(study.model, weights0)


def test_grouped_sequential_evaluation_resumes_mid_group(study, weights0, tmp_path):
    """A run that stops after editing batches it has not evaluated yet (inside a group) resumes from
    the last evaluated batch and stores the same cases as an uninterrupted grouped run."""
    over = {"sequential.methods": ["memit"], "sequential.total": 7, "sequential.batch_sizes": [1],
            "sequential.eval_group": 4}  # groups: batches 0-3, 4-6
    p = params_for(tmp_path, "interrupted", **over)
    st = use(study, p)
    with pytest.raises(RuntimeError, match=r"after batch 5 .*batches 4-5 edited, not evaluated"):
        protocols.run_sequential(st, log=quiet, fail_after=6)
    assert_unedited(study.model, weights0)
    root = exp_dir(p, "sequential")
    assert len(list((root / "parts").glob("*.cases.parquet"))) == 4
    assert len(list((root / "checkpoints").glob("*/*.safetensors"))) == 4  # never ahead of the stored cases
    logged: list[str] = []
    resumed = protocols.run_sequential(st, log=logged.append)
    assert any("resuming at batch 4/7" in m for m in logged), logged
    whole = protocols.run_sequential(use(study, params_for(tmp_path, "uninterrupted", **over)), log=quiet)
    assert_frame_equal(sort_units(resumed), sort_units(whole), check_exact=True)
    assert_unedited(study.model, weights0)
    with pytest.raises(ParamsError, match="sequential.eval_group must be an integer >= 1"):
        params_for(tmp_path, **{"sequential.eval_group": 0})


def test_evaluation_groups_hold_facts_in_the_protocol(study, weights0, tmp_path):
    """eval_group 4 with batches of 2 facts: the groups are {0, 1} and {2, 3}, so a run stopped after
    three batches has stored the first two (counting batches, nothing would be stored yet)."""
    over = {"sequential.methods": ["memit"], "sequential.total": 8, "sequential.batch_sizes": [2],
            "sequential.eval_group": 4, "sequential.forgetting_every": None}
    p = params_for(tmp_path, "grp", **over)
    with pytest.raises(RuntimeError, match="after batch 2"):
        protocols.run_sequential(use(study, p), log=quiet, fail_after=3)
    root = exp_dir(p, "sequential")
    assert len(list((root / "parts").glob("*.cases.parquet"))) == 2
    assert len(list((root / "checkpoints").glob("*/*.safetensors"))) == 2
    assert_unedited(study.model, weights0)


def test_a_checkpoint_left_by_a_run_killed_after_its_last_unit_is_removed(study, weights0, tmp_path):
    """A run that dies after storing a configuration's last unit but before removing its checkpoint
    log (about 1 GB at paper scale) leaves it on disk; the next run finds the configuration done
    and, once the experiment is finished, removes every checkpoint log; the cases are the same."""
    over = {"sequential.methods": ["memit"], "sequential.total": 3, "sequential.batch_sizes": [1]}
    p = params_for(tmp_path, "killed", **over)
    real = protocols.shutil.rmtree

    def killed(path, *a, **k):
        if "checkpoints" in str(path):
            raise KeyboardInterrupt("killed before the checkpoint log was removed")
        return real(path, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocols.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            protocols.run_sequential(use(study, p), log=quiet)
    ckpts = exp_dir(p, "sequential") / "checkpoints"
    assert len(list(ckpts.glob("*/*.safetensors"))) == 3
    again = protocols.run_sequential(use(study, p), log=quiet)
    assert not list(ckpts.glob("*/*"))
    whole = protocols.run_sequential(use(study, params_for(tmp_path, "whole", **over)), log=quiet)
    assert_frame_equal(sort_units(again), sort_units(whole), check_exact=True)
    assert_unedited(study.model, weights0)


def test_gen_text_is_checked_and_enters_the_digest_only_when_not_the_default(tmp_path):
    """evaluation.gen_text: a bad value fails as the params load; the default leaves every
    experiment's digest as it was before the key existed, 'reference' makes it another folder."""
    with pytest.raises(ParamsError, match="evaluation.gen_text must be 'clean' or 'reference'"):
        params_for(tmp_path, **{"evaluation.gen_text": "raw"})
    assert params_for(tmp_path).evaluation.gen_text == "clean"
    assert params_for(tmp_path, **{"evaluation.gen_text": "reference"}).evaluation.gen_text == "reference"


def test_evaluation_digest_keys(study, tmp_path, monkeypatch):
    """What enters an experiment's params digest from the evaluation section: gen_text only when not
    the default (so default folders keep the digest they had), GE's sentence splitter only when GE
    is on (a folder never mixes punkt and the simple rule)."""
    seen = []
    monkeypatch.setattr(protocols.Experiment, "open", classmethod(lambda cls, *a, **k: seen.append(a[3]["evaluation"])))
    for over in ({}, {"evaluation.gen_text": "reference"}, {"evaluation.generation": True}):
        protocols._exp(use(study, params_for(tmp_path, **over)), "batch", {})
    plain, ref, ge = seen
    assert "gen_text" not in plain and "ge_sentence_splitter" not in plain
    assert ref["gen_text"] == "reference" and "ge_sentence_splitter" not in ref
    assert ge["ge_sentence_splitter"] == protocols.sentence_splitter()


def test_tf32_enters_the_digest_only_where_it_applies(study, tmp_path, monkeypatch):
    """A float32 model on CUDA under TF32 (model.tf32) moves every score by ~1e-3: its results are
    another folder, so a run never reopens, or resumes into, a folder made with IEEE products or
    the reverse; elsewhere (a CPU, a 16-bit model, TF32 off) the digest is what it always was."""
    seen = []
    monkeypatch.setattr(protocols.Experiment, "open", classmethod(lambda cls, *a, **k: seen.append(a[3])))
    protocols._exp(use(study, params_for(tmp_path)), "batch", {})
    monkeypatch.setattr(protocols, "tf32_applies", lambda model: True)
    protocols._exp(use(study, params_for(tmp_path)), "batch", {})
    ieee, tf32 = seen
    assert "tf32" not in ieee and tf32 == {**ieee, "tf32": True}


def test_reference_fact_list_gives_the_facts_and_the_digest(study, weights0, tmp_path):
    """data.fact_list reference: the facts are sample "i" of the index file in its order (not the
    seeded shuffle; Study.facts, which every protocol draws from, and a batch run), the digest
    records the file's sha256 (not its path), provenance names the file; seeded adds no digest key;
    the preflight names a fact the records lack."""
    from editlib.counterfact import save_records, sha256_file
    from editlib.preflight import check_study
    from editlib.records import RecordError

    ids = [r.case_id for r in study.records][::-1]
    fl = tmp_path / "fl.json"
    fl.write_text(json.dumps({"0": ids, "1": ids[3:]}))
    cfp = save_records(study.records, tmp_path / "cf.json")
    over = {"data.source": "counterfact", "data.counterfact_path": str(cfp),
            "data.fact_list": "reference", "data.fact_list_path": str(fl),
            "batch.total": 4, "batch.batch_sizes": [2], "batch.methods": ["memit"], "batch.layer": 1,
            "data.orderings": [0, 1]}
    p = params_for(tmp_path, "ref", **over)
    st = use(study, p)
    assert [r.case_id for r in st.facts(5)] == ids[:5] and [r.case_id for r in st.facts(2, 1)] == ids[3:5]
    assert [r.case_id for r in use(study, params_for(tmp_path)).facts(5)] != ids[:5]
    cases = protocols.run_batch(st, log=quiet)
    for o, want in ((0, ids[:4]), (1, ids[3:7])):
        assert sorted(cases[cases.ordering == o].case_id) == sorted(want)
    man = json.loads((exp_dir(p, "batch") / "manifest.json").read_text())
    data = man["params"]["data"]
    assert data["fact_list_sha256"] == sha256_file(fl) and "fact_list" not in data and "fact_list_path" not in data
    assert man["provenance"]["data"]["fact_list"] == str(fl)
    protocols.run_batch(use(study, params_for(tmp_path, "seeded", **{k: v for k, v in over.items()
                                                                      if not k.startswith("data.")})), log=quiet)
    plain = json.loads((exp_dir(params_for(tmp_path, "seeded"), "batch") / "manifest.json").read_text())["params"]["data"]
    assert not any(k.startswith("fact_list") for k in plain)
    assert_unedited(study.model, weights0)
    check_study(p, ["batch"])
    with pytest.warns(RuntimeWarning, match=r"canonical counterfact.json .* has sha256 "):
        protocols.check_before_loading(p, ["batch"])  # not the canonical file: its case_ids are used, and said so
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        protocols.check_before_loading(params_for(tmp_path, "seeded", **{k: v for k, v in over.items()
                                                                          if k != "data.fact_list"}), ["batch"])
    fl.write_text(json.dumps({"0": [ids[0], 10 ** 7]}))
    with pytest.raises(RecordError, match=r"batch \(batch.total 2\) on the CounterFact file .*1 of the first 2"):
        check_study(params_for(tmp_path, "ref", **{**over, "batch.total": 2}), ["batch"])
    # sequential runs with degradation draw held-out facts after their own: those too, before loading
    fl.write_text(json.dumps({"0": ids[:4] + [10 ** 7] + ids[4:], "1": ids}))
    seq = {**over, "sequential.total": 4, "sequential.batch_sizes": [2], "sequential.heldout_facts": 1}
    check_study(params_for(tmp_path, "ref", **seq, **{"sequential.degradation_every": None}), ["sequential"])
    with pytest.raises(RecordError, match=r"held-out pool after them: 8 facts.*case_ids \[10000000\]"):
        check_study(params_for(tmp_path, "ref", **seq, **{"sequential.degradation_every": 2}), ["sequential"])


def test_forgetting_enters_the_digest_in_facts(study, tmp_path):
    """sequential.forgetting_every counts facts and enters the sequential digest under a key that
    says so; left null, the spec (and every default folder's digest) keeps its null key."""
    plain = protocols._exp_spec(use(study, params_for(tmp_path)), "sequential", 1)
    every = protocols._exp_spec(use(study, params_for(tmp_path, **{"sequential.forgetting_every": 2})), "sequential", 1)
    assert plain["forgetting_every"] is None and "forgetting_every_facts" not in plain
    assert every["forgetting_every_facts"] == 2 and "forgetting_every" not in every


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_protocol_runs_on_cuda_as_on_the_cpu(study, tmp_path) -> None:
    """The paper-scale device path end to end: every protocol (windowed MEMIT included, whose
    second layer recomputes keys and residuals on the GPU) on a CUDA copy of the miniature gives
    the CPU's cases up to float32 rounding (TF32 off, as the params default)."""
    over = {"batch.windows": [1, 2], "sequential.windows": [1, 2]}
    gpu = protocols.open_study(params_for(tmp_path / "gpu", **over, **{"model.device": "cuda"}), log=quiet)
    assert next(gpu.model.parameters()).device.type == "cuda"
    cpu = use(study, params_for(tmp_path / "cpu", **over))
    for run in (protocols.run_layer_search, protocols.run_singular, protocols.run_sweep,
                protocols.run_batch, protocols.run_sequential):
        g, c = (df.sort_values([k for k in dict.fromkeys(("method", "layer", *UNIT)) if k in df]).reset_index(drop=True)
                for df in (run(gpu, log=quiet), run(cpu, log=quiet)))
        assert len(g) == len(c) > 0, run.__name__
        assert (g.fail_reason == c.fail_reason).all(), run.__name__
        for col in ("ES_mag", "PS_mag", "NS_mag"):
            np.testing.assert_allclose(g[col], c[col], rtol=1e-3, atol=1e-4, err_msg=f"{run.__name__} {col}")


def test_records_without_generation_prompts_fail_when_the_study_opens(tmp_path, monkeypatch):
    """With GE on, a fact an experiment will edit that has no generation prompts would have no GE,
    which the means over cases would leave out unnoticed: the study refuses to open, naming it;
    with GE off, or when only facts no experiment draws lack them, it opens."""
    from editlib import counterfact
    from editlib.records import RecordError

    base = params_for(tmp_path)
    recs = protocols.load_records_for(base, protocols.model_dir_for(base.model, quiet))
    drawn = {r.case_id for o in base.data.orderings for r in
             counterfact.sample(recs, base.layer_search.n_facts, o, base.data.ordering_seed)}
    victim = next(r.case_id for r in counterfact.sample(recs, base.layer_search.n_facts, 0, base.data.ordering_seed))
    spare = next(r.case_id for r in recs if r.case_id not in drawn)
    real = protocols.load_records_for

    def strip(ids):
        def load(p, mdir):
            return [dataclasses.replace(r, generation_prompts=()) if r.case_id in ids else r for r in real(p, mdir)]
        return load

    ge = {"evaluation.generation": True, "evaluation.gen_max_len": 12}
    monkeypatch.setattr(protocols, "load_records_for", strip({victim}))
    with pytest.raises(RecordError, match=rf"layer_search's {base.layer_search.n_facts} facts of ordering 0 have no "
                                          rf"generation_prompts \(case_id {victim}\)"):
        protocols.open_study(params_for(tmp_path, **ge), experiments=["layer_search"], log=quiet)
    protocols.open_study(params_for(tmp_path), experiments=["layer_search"], log=quiet)
    monkeypatch.setattr(protocols, "load_records_for", strip({spare}))
    protocols.open_study(params_for(tmp_path, **ge), experiments=["layer_search"], log=quiet)


def test_the_reference_solve_reaches_every_update(study, weights0, tmp_path, monkeypatch):
    """hparams.<method>.solve: reference solves every batch's D + μI as the reference does (LU), on
    the batched path and in sequential editing; on these well-conditioned batches the stored
    scores are the exact solve's (float64 round-off), and the parameter digest names it."""
    from editlib import solver
    calls, real = [], solver._factor_reference
    monkeypatch.setattr(solver, "_factor_reference", lambda M: calls.append(M.shape[0]) or real(M))
    over = {"batch.methods": ["emmet"], "batch.batch_sizes": [2], "sequential.methods": ["emmet"],
            "sequential.batch_sizes": [2]}
    runs = {}
    for how in ("exact", "reference"):
        st = use(study, params_for(tmp_path / how, **over, **{"hparams.emmet.solve": how}))
        runs[how] = [protocols.run_batch(st, log=quiet), protocols.run_sequential(st, log=quiet)]
        assert (how == "reference") == ("solve" in st.params.method_hparams("emmet", 1, "batch").to_dict())
    assert calls == [2] * 4  # two batches of each experiment
    for ref, exact in zip(runs["reference"], runs["exact"]):
        assert_frame_equal(ref[SCORES].reset_index(drop=True), exact[SCORES].reset_index(drop=True),
                           check_exact=False, rtol=1e-6)
    with pytest.raises(ParamsError, match="solve must be one of"):
        params_for(tmp_path / "bad", **{"hparams.emmet.solve": "lu"}).method_hparams("emmet", 1, "batch")
    assert_unedited(study.model, weights0)


def test_a_resume_refuses_units_of_another_hub_commit(study, weights0, tmp_path):
    """A hub id's saved units record the commit they were read from (a moved `main` can bring other
    tokenizer files with the same weights): a resume from another commit is refused, naming the
    model.revision that resumes it; from the same commit it resumes."""
    over = {"sequential.methods": ["memit"], "sequential.batch_sizes": [2]}
    st = use(study, params_for(tmp_path, "hub", **over))
    st._commit = "a" * 40
    with pytest.raises(RuntimeError, match="injected failure after batch 0"):
        protocols.run_sequential(st, log=quiet, fail_after=1)
    moved = dataclasses.replace(st, _commit="b" * 40)
    with pytest.raises(RunConflict, match=f"hub commit\\(s\\) {'a' * 40} .*this session loaded {'b' * 40}; "
                                          f"resume with model.revision: {'a' * 40}"):
        protocols.run_sequential(moved, log=quiet)
    assert len(protocols.run_sequential(st, log=quiet)) > 0
    assert_unedited(study.model, weights0)
