"""AlphaEdit and ENCORE (editlib.editors, issue #15): their defining properties, plain float64
re-derivations of their solves, most-probable early stopping, the per-run keys of earlier edits,
NaN / restore guarantees, and tiny batch and sequential runs from params on the miniature."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pandas.testing import assert_frame_equal

from _fixtures import one_thread  # noqa: F401  (autouse: single-threaded module)
from _fixtures import CTX, FACTS, WORDS, assert_unedited, collect_cov, fact, quiet, snapshot, tiny_llama, use, word_tokenizer
from editlib import protocols
from editlib.arch import arch_for, block_output, weight_out_in
from editlib.editing import EditFailed, EditHParams, apply_edit, paper_llama3, prepare_targets
from editlib.editors import (NullSpaceOperator, PriorKeys, encore_operator, nullspace, preservation,
                             run_state)
from editlib.nethook import Trace
from editlib.params import ParamsError, resolve
from editlib.paths import REPO_ROOT
from editlib.solver import factor_cov, solve_factors
from editlib.tokens import filled_ids, in_context, pad_right, target_ids
from editlib.values import ValueHParams, compute_values
from editlib.weights import EditSession

F64 = torch.float64
VH = ValueHParams(v_num_grad_steps=6)


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def hp_for(method: str, layers=(1,), values=VH, **kw) -> EditHParams:
    return EditHParams(method=method, layers=layers, values=values, **kw)


# --------------------------------------------------------------------------- random data


def random_problem(seed: int = 0, d_in: int = 48, d_out: int = 16, n: int = 5, n_prior: int = 7):
    """C0 with a spread spectrum (a few large eigenvalues, a long small tail), keys, residuals and
    earlier keys, all float64."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))
    eig = torch.logspace(2, -4, d_in, dtype=F64)
    C0 = (Q * eig) @ Q.T
    C0 = (C0 + C0.T) / 2
    K = torch.randn(d_in, n, generator=g, dtype=F64)
    R = torch.randn(d_out, n, generator=g, dtype=F64)
    Kp = torch.randn(d_in, n_prior, generator=g, dtype=F64)
    return C0, K, R, Kp


def np_nullspace(C0: np.ndarray, threshold: float) -> np.ndarray:
    """Û written out: ascending eigenvectors while their eigenvalues sum to ≤ threshold · trace."""
    e, V = np.linalg.eigh(C0)
    e = np.clip(e, 0, None)
    r = len(e) if threshold >= 1 else int((np.cumsum(e) / e.sum() <= threshold).sum())  # 1: all of the trace
    return V[:, :r]


def np_alphaedit(C0, K, R, Kp, alpha: float, threshold: float) -> np.ndarray:
    """The official AlphaEdit update, literally: (P(KKᵀ + K_pK_pᵀ) + αI) Δᵀ = P K Rᵀ; W += Δ P."""
    C0, K, R = (np.asarray(t, dtype=np.float64) for t in (C0, K, R))
    U = np_nullspace(C0, threshold)
    P = U @ U.T
    A = K @ K.T + (np.asarray(Kp) @ np.asarray(Kp).T if Kp is not None else 0)
    delta_t = np.linalg.solve(P @ A + alpha * np.eye(len(C0)), P @ K @ R.T)
    return delta_t.T @ P


def np_encore(C0, K, R, Kp, lam_p: float, lam_n: float) -> np.ndarray:
    """ENCORE's constrained update: ΔW = R Kᵀ (λ_p C0 + λ_n I + K_pK_pᵀ + KKᵀ)⁻¹."""
    C0, K, R = (np.asarray(t, dtype=np.float64) for t in (C0, K, R))
    M = lam_p * C0 + lam_n * np.eye(len(C0)) + K @ K.T
    if Kp is not None:
        M = M + np.asarray(Kp) @ np.asarray(Kp).T
    return np.linalg.solve(M.T, (R @ K.T).T).T


@pytest.mark.parametrize("with_prior", [False, True])
@pytest.mark.parametrize("threshold", [1e-3, 3e-2, 1.0])
def test_alphaedit_solve_equals_plain_float64_derivation(with_prior, threshold) -> None:
    C0, K, R, Kp = random_problem()
    cov = factor_cov(C0)
    hp = hp_for("alphaedit", L2=0.7, nullspace_threshold=threshold)
    prior = run_state(hp, {1: cov})
    if with_prior:
        prior.add(1, Kp[:, :3])
        prior.add(1, Kp[:, 3:])
    op, mu, extra = preservation(hp, cov, prior, 1)
    X, _ = solve_factors(R, K, op, mu)
    want = np_alphaedit(C0, K, R, Kp if with_prior else None, 0.7, threshold)
    assert rel(R @ X, want) < 1e-8
    assert extra["prior_keys"] == (7 if with_prior else 0)
    assert 0 < extra["nullspace_frac"] <= 1 and 0 < extra["nullspace_energy"] <= threshold + 1e-12


def test_alphaedit_update_leaves_the_preserved_subspace_unchanged() -> None:
    """ΔW k = 0 for every k in the span of C0's kept (large-eigenvalue) eigenvectors, to 1e-6
    relative, and ΔW P = ΔW; also with earlier keys in the system."""
    C0, K, R, Kp = random_problem(seed=1)
    cov = factor_cov(C0)
    hp = hp_for("alphaedit", L2=0.1, nullspace_threshold=1e-2)
    ns = nullspace(cov, 1e-2)
    e, V = torch.linalg.eigh(C0)
    kept = V[:, ns.dims:]  # the preserved keys' span
    assert 0 < ns.dims < C0.shape[0] and ns.frac == ns.dims / C0.shape[0]
    for prior in (None, PriorKeys(basis={1: ns.U})):
        if prior is not None:
            prior.add(1, Kp)
        op, mu, _ = preservation(hp, cov, prior, 1)
        X, _ = solve_factors(R, K, op, mu)
        dW = R @ X
        assert float(torch.linalg.norm(dW)) > 1e-3  # a real update ...
        k = kept @ torch.randn(kept.shape[1], 20, generator=torch.Generator().manual_seed(2), dtype=F64)
        leak = torch.linalg.norm(dW @ k, dim=0) / (torch.linalg.matrix_norm(dW, 2) * torch.linalg.norm(k, dim=0))
        assert float(leak.max()) < 1e-6  # ... that does not touch the preserved keys
        P = ns.U @ ns.U.T
        assert rel(dW @ P, dW) < 1e-12


def test_nullspace_threshold_is_relative_to_the_trace() -> None:
    """Scaling C0 (another model's activation scale) keeps the same null space; the threshold is
    validated and a threshold below the smallest eigenvalue's share fails loudly."""
    C0, *_ = random_problem()
    a, b = nullspace(factor_cov(C0), 1e-2), nullspace(factor_cov(1e4 * C0), 1e-2)
    assert a.dims == b.dims and rel(torch.abs(a.U.T @ b.U), torch.eye(a.dims, dtype=F64)) < 1e-8
    with pytest.raises(ValueError, match="keeps no direction"):
        nullspace(factor_cov(C0), 1e-12)
    with pytest.raises(ValueError, match="nullspace_threshold"):
        nullspace(factor_cov(C0), 0.0)
    with pytest.raises(ValueError, match="L2"):
        NullSpaceOperator(a.U, 0.0)


@pytest.mark.parametrize("add_prev_edits", [False, True])
def test_encore_solve_equals_plain_float64_derivation(add_prev_edits) -> None:
    C0, K, R, Kp = random_problem(seed=3)
    cov = factor_cov(C0)
    hp = hp_for("encore", mom2_update_weight=30.0, update_norm_lambda=0.5, add_prev_edits=add_prev_edits)
    prior = run_state(hp, {1: cov})
    assert (prior is not None) == add_prev_edits
    if prior is not None:
        prior.add(1, Kp)
    op, mu, _ = preservation(hp, cov, prior, 1)
    X, _ = solve_factors(R, K, op, mu)
    assert rel(R @ X, np_encore(C0, K, R, Kp if add_prev_edits else None, 30.0, 0.5)) < 1e-8
    # λ_n = 0 with add_prev_edits false is MEMIT with λ = λ_p
    hp0 = hp_for("encore", mom2_update_weight=30.0, update_norm_lambda=0.0, add_prev_edits=False)
    op0, mu0, _ = preservation(hp0, cov)
    X0, _ = solve_factors(R, K, op0, mu0)
    Xm, _ = solve_factors(R, K, cov, 30.0)
    assert rel(X0, Xm) < 1e-8


def test_encore_norm_penalty_bounds_and_shrinks_the_update() -> None:
    """‖ΔW‖_F ≤ ‖R‖_F / (2√λ_n) whatever C0 and K_p, and ‖ΔW‖ decreases as λ_n grows."""
    C0, K, R, Kp = random_problem(seed=4)
    cov = factor_cov(C0)
    norms = []
    for lam_n in (1e-3, 1e-1, 1.0, 10.0):
        op = encore_operator(cov, 1e-3, lam_n, Kp @ Kp.T)
        X, info = solve_factors(R, K, op, 1.0)
        assert info.delta_norm <= float(R.norm()) / (2 * math.sqrt(lam_n)) * (1 + 1e-12)
        norms.append(info.delta_norm)
    assert all(a > b for a, b in zip(norms, norms[1:])), norms


# --------------------------------------------------------------------------- tiny model, apply_edit


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_llama(len(tok), layers=3, dtype=F64).requires_grad_(False)


@pytest.fixture(scope="module")
def C0(lm):
    return collect_cov(lm, 1)


@pytest.fixture
def covs(C0):
    return {1: factor_cov(C0)}


@pytest.fixture(scope="module")
def targets(lm, tok):
    return prepare_targets(lm, tok, FACTS, hp_for("memit"), CTX)


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap: dict) -> None:
    for k, v in model.state_dict().items():
        assert v.dtype == snap[k].dtype and torch.equal(v, snap[k]), k


def test_alphaedit_edit_of_the_model_leaves_preserved_keys_alone(lm, tok, covs, C0, targets) -> None:
    """On a (float64) model: the written ΔW = W' − W annihilates the kept eigenvectors of C0 and
    equals the official formula; the stats report the null space."""
    hp = hp_for("alphaedit", L2=1.0, nullspace_threshold=5e-2)
    w0 = weight_out_in(lm, 1).to(F64).clone()
    with EditSession(lm) as s:
        st = apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=targets)
        dW = s.master(1).to(F64) - w0
    ns = nullspace(covs[1], 5e-2)
    _, V = torch.linalg.eigh(C0)
    kept = V[:, ns.dims:]
    leak = torch.linalg.norm(dW @ kept, dim=0) / torch.linalg.matrix_norm(dW, 2)
    assert float(leak.max()) < 1e-6
    assert rel(dW, np_alphaedit(C0, targets.K, targets.R, None, 1.0, 5e-2)) < 1e-6
    assert st.nullspace_frac == pytest.approx(ns.frac) and st.nullspace_energy <= 5e-2
    assert st.mu == 1.0 and st.prior_keys == 0 and math.isnan(st.delta_bound)


@pytest.mark.parametrize("method", ["alphaedit", "encore"])
def test_prior_keys_accumulate_over_a_sequential_run(lm, tok, covs, C0, method) -> None:
    """Three batches edited one after another: K_p holds the keys of every earlier batch (in Û
    coordinates for AlphaEdit) and each batch's update is the plain formula with those K_p."""
    hp = (hp_for("alphaedit", L2=1.0, nullspace_threshold=5e-2) if method == "alphaedit"
          else hp_for("encore", mom2_update_weight=2.0, update_norm_lambda=0.5))
    prior = run_state(hp, covs)
    batches = [FACTS[:2], FACTS[2:3], FACTS[3:]]
    seen = []
    with EditSession(lm) as s:
        for i, b in enumerate(batches):
            tg = prepare_targets(lm, tok, b, hp, CTX)
            before = s.master(1).to(F64).clone()
            st = apply_edit(lm, tok, b, hp, covs, CTX, s, targets=tg, prior=prior)
            dW = s.master(1).to(F64) - before
            Kp = torch.cat([k for k in seen], 1) if seen else None
            want = (np_alphaedit(C0, tg.K, tg.R, Kp, 1.0, 5e-2) if method == "alphaedit"
                    else np_encore(C0, tg.K, tg.R, Kp, 2.0, 0.5))
            assert rel(dW, want) < 1e-6, i
            assert st.prior_keys == sum(k.shape[1] for k in seen)
            seen.append(tg.K.to(F64))
    allK = torch.cat(seen, 1)
    B = prior.basis[1]
    gram = allK @ allK.T if B is None else B.T @ allK @ allK.T @ B
    assert rel(prior.gram[1], gram) < 1e-12 and prior.count[1] == 4
    assert [k.shape[1] for _, k in prior.log] == [2, 1, 1]


def test_encore_distance_stays_within_its_bound_over_a_sequential_run(lm, tok, covs) -> None:
    """‖W_t − W_0‖_F ≤ Σ_{s≤t} ‖R_s‖_F / (2√λ_n) after every batch of a sequential run."""
    hp = hp_for("encore", mom2_update_weight=1e-3, update_norm_lambda=0.05)
    prior = run_state(hp, covs)
    bound = 0.0
    with EditSession(lm) as s:
        for b in (FACTS[:1], FACTS[1:2], FACTS[2:3], FACTS[3:]):
            tg = prepare_targets(lm, tok, b, hp, CTX)
            st = apply_edit(lm, tok, b, hp, covs, CTX, s, targets=tg, prior=prior)
            assert st.delta_bound == pytest.approx(float(tg.R.to(F64).norm()) / (2 * math.sqrt(0.05)))
            assert st.delta_norm <= st.delta_bound
            bound += st.delta_bound
            assert st.w_dist <= bound * (1 + 1e-9)


@pytest.mark.parametrize("method", ["alphaedit", "encore"])
def test_nan_is_refused_and_the_model_restored(lm, tok, covs, targets, method) -> None:
    """A non-finite residual leaves that fact out; all non-finite, non-finite earlier keys or an
    overflowing update: EditFailed, nothing written, the run's K_p unchanged, and the model
    bit-identical after the session."""
    hp = hp_for(method)
    snap = _snapshot(lm)
    R = targets.R.clone()
    R[0, 2] = float("nan")
    nan_tg = dataclasses.replace(targets, R=R)
    prior = run_state(hp, covs)
    with EditSession(lm) as s:
        st = apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=nan_tg, prior=prior)
        assert st.n_failed == 1 and prior.count[1] == 3
        edited = s.master(1).clone()
        for bad in (dataclasses.replace(targets, R=torch.full_like(targets.R, float("nan"))),
                    dataclasses.replace(targets, R=targets.R * 1e300)):
            with pytest.raises(EditFailed):
                apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=bad, prior=prior)
            assert torch.equal(s.master(1), edited) and prior.count[1] == 3
        with pytest.raises(ValueError, match="non-finite"):
            prior.add(1, torch.full_like(targets.K, float("inf")))
    _assert_same(lm, snap)
    broken = run_state(hp, covs)
    broken.gram[1] = torch.full_like(prior.gram[1], float("nan"))
    with EditSession(lm) as s:
        with pytest.raises(EditFailed):
            apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=targets, prior=broken)
        assert s.factor_log == []
    _assert_same(lm, snap)


def test_hparams_validation_and_dicts() -> None:
    for bad, match in (({"L2": 0.0}, "L2"), ({"L2": float("inf")}, "L2"),
                       ({"nullspace_threshold": 0.0}, "nullspace_threshold"),
                       ({"nullspace_threshold": 1.5}, "nullspace_threshold"),
                       ({"update_norm_lambda": -1.0}, "update_norm_lambda"),
                       ({"add_prev_edits": "yes"}, "add_prev_edits")):
        with pytest.raises(ValueError, match=match):
            EditHParams(method="alphaedit", **bad)
    with pytest.raises(ValueError, match="encore needs"):
        EditHParams(method="encore", mom2_update_weight=0.0, update_norm_lambda=0.0)
    with pytest.raises(ValueError, match="early_stop"):
        ValueHParams(early_stop="never")
    # ENCORE's values stop on MPES unless told otherwise; dicts round-trip; other methods' dicts
    # do not carry the new keys (their results keep their parameter digests)
    enc = EditHParams.from_dict({"method": "encore"})
    assert enc.values.early_stop == "mpes" and enc.mu == 1.0
    assert EditHParams.from_dict({"method": "encore", "early_stop": "loss"}).values.early_stop == "loss"
    for hp in (enc, EditHParams.from_dict({"method": "encore", "early_stop": "loss"}),
               EditHParams(method="alphaedit", L2=3.0), EditHParams(method="memit")):
        assert EditHParams.from_dict(hp.to_dict()) == hp
    d = EditHParams(method="memit").to_dict()
    assert not {"L2", "nullspace_threshold", "update_norm_lambda", "add_prev_edits"} & set(d)
    assert "early_stop" not in d["values"]
    assert paper_llama3("encore").values.early_stop == "mpes" and paper_llama3("alphaedit").L2 == 10.0


# --------------------------------------------------------------------------- MPES


def _reference_most_probable(model, tok, record, layer, contexts, delta) -> bool:
    """With δ added at block ``layer``'s output at the subject's last token, is every target token
    the argmax at its position under every rewriting prompt? (full forward, written plainly)"""
    tgt = target_ids(tok, record.target_new.str)
    seqs, lookups, starts = [], [], []
    for c in contexts.flat:
        ids, idx = filled_ids(tok, in_context(c, record.prompt), record.subject)
        starts.append(len(ids))
        seqs.append(ids + tgt[:-1])
        lookups.append(idx)
    ids, mask = pad_right(seqs, tok.pad_token_id)

    def edit(out):
        hs = block_output(out).clone()
        for i, j in enumerate(lookups):
            hs[i, j] = hs[i, j] + delta.to(hs.dtype)
        return hs

    with torch.no_grad(), Trace(model, arch_for(model).layer_name(layer), retain_output=False, edit_output=edit):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return all(int(logits[i, s - 1 + j].argmax()) == t for i, s in enumerate(starts) for j, t in enumerate(tgt))


def _already_predicted(model, tok, contexts, layer) -> list:
    """Facts over the word vocabulary whose (one-word) target is already the model's argmax under
    every rewriting prompt."""
    out = []
    zero = torch.zeros(model.config.hidden_size, dtype=F64)
    for subject in ("the cat", "France", "Paris", "a dog"):
        for prompt in ("{} sat on", "the capital of {}", "{} ran to", "{} is capital of", "a mat and {}"):
            for w in WORDS:
                r = fact(100 + len(out), prompt, subject, w)
                if _reference_most_probable(model, tok, r, layer, contexts, zero):
                    out.append(r)
                    break
    return out


def test_mpes_stops_exactly_when_the_target_is_the_argmax_everywhere(tok) -> None:
    """Every fact stops at the first step at which its target is the argmax under every rewriting
    prompt (checked independently on the δ of each step of an unstopped run); one already
    predicted stops at step 0; ``mpes_hits = 2`` stops at the second such step."""
    lm = tiny_llama(len(tok), lm_scale=30.0, dtype=F64).requires_grad_(False)
    layer, T = 1, 8
    done0 = _already_predicted(lm, tok, CTX, layer)
    assert done0, "no already-predicted fact found for this seed"
    facts = [done0[0], *FACTS]
    base = dict(v_lr=0.3, early_stop_loss=0.0, z_batch_size=8)
    # δ after t steps of an optimisation that never stops early (t = 0 … T-1)
    traj = [compute_values(lm, tok, facts, layer, CTX, ValueHParams(v_num_grad_steps=t + 1, **base))
            for t in range(T)]
    holds = [[_reference_most_probable(lm, tok, f, layer, CTX, (v.z[:, i] - v.h[:, i]).to(F64))
              for v in traj] for i, f in enumerate(facts)]
    mp = compute_values(lm, tok, facts, layer, CTX, ValueHParams(v_num_grad_steps=T, early_stop="mpes", **base))
    two = compute_values(lm, tok, facts, layer, CTX,
                         ValueHParams(v_num_grad_steps=T, early_stop="mpes", mpes_hits=2, **base))
    firsts = []
    for i, h in enumerate(holds):
        hits = [t for t, ok in enumerate(h) if ok]
        first = hits[0] if hits else T - 1
        second = hits[1] if len(hits) > 1 else T - 1
        firsts.append(first)
        assert int(mp.steps[i]) == first, (i, h, mp.steps.tolist())
        torch.testing.assert_close(mp.z[:, i], traj[first].z[:, i], rtol=0, atol=1e-9)
        assert int(two.steps[i]) == second, (i, h, two.steps.tolist())
    assert firsts[0] == 0 and max(firsts) > 0  # one stops at once, another needs steps
    # the loss-threshold stop is unchanged for the other methods (default)
    assert ValueHParams().early_stop == "loss"


# --------------------------------------------------------------------------- protocols from params

SMOKE = REPO_ROOT / "params" / "smoke.yaml"
needs_tiny = pytest.mark.skipif(not (REPO_ROOT / "models" / "tiny-world" / "config.json").is_file(),
                                reason="models/tiny-world is missing")
SCORES = ["ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag"]
SMALL = {"hparams.common.v_num_grad_steps": 3, "batch.total": 4, "batch.batch_sizes": [2, 4],
         "batch.layer": 1, "batch.methods": ["alphaedit", "encore"], "sequential.total": 4,
         "sequential.batch_sizes": [2], "sequential.layer": 1, "sequential.methods": ["alphaedit", "encore"]}


def params_for(results_dir: Path, name: str = "t", **over):
    return resolve(SMOKE, overrides={**SMALL, "results_dir": str(results_dir), "name": name, **over})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    p = params_for(tmp_path_factory.mktemp("study"))
    st = protocols.open_study(p, experiments=["batch", "sequential"], log=quiet)
    st.covs([1])
    return st


@pytest.fixture(scope="module")
def weights0(study):
    return snapshot(study.model)


@needs_tiny
def test_batch_protocol_rows(study, weights0, tmp_path) -> None:
    p = params_for(tmp_path)
    cases = protocols.run_batch(use(study, p), log=quiet)
    assert cases.groupby(["method", "batch_size"]).size().to_dict() == {
        (m, b): 4 for m in ("alphaedit", "encore") for b in (2, 4)}
    assert np.isfinite(cases[SCORES].to_numpy(dtype=float)).all() and not cases["failed"].any()
    b = pd.read_parquet(Path(p.results_dir) / p.name / "batch" / "batches.parquet")
    ae, en = b[b.method == "alphaedit"], b[b.method == "encore"]
    assert ((ae.nullspace_frac > 0) & (ae.nullspace_frac < 1)).all() and (ae.mu == 1.0).all()
    assert (en.delta_norm <= en.delta_bound).all() and en.nullspace_frac.isna().all()
    assert (b.prior_keys == 0).all()  # every batch starts from the unedited model
    assert_unedited(study.model, weights0)


@needs_tiny
def test_batched_equals_reference_path(study, weights0, tmp_path) -> None:
    """The no-write path (per-row low-rank hooks) equals edit-evaluate-restore for both editors."""
    got = protocols.run_batch(use(study, params_for(tmp_path / "a")), log=quiet)
    ref = protocols.run_batch(use(study, params_for(tmp_path / "b", **{"evaluation.batched_edits": False})),
                              log=quiet)
    key = ["method", "batch_size", "case_id"]
    got, ref = got.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    assert_frame_equal(got[SCORES], ref[SCORES], check_exact=False, rtol=0, atol=1e-5)
    assert_unedited(study.model, weights0)


@needs_tiny
def test_sequential_protocol_rows_and_resume(study, weights0, tmp_path) -> None:
    """Sequential runs keep K_p per run (prior_keys grows batch by batch and restarts for the next
    configuration); a run interrupted after its first batch resumes (K_p replayed from the
    checkpoint) to exactly the uninterrupted result."""
    p = params_for(tmp_path, "cut")
    st = use(study, p)
    with pytest.raises(RuntimeError, match="injected failure"):
        protocols.run_sequential(st, log=quiet, fail_after=1)
    assert_unedited(study.model, weights0)
    resumed = protocols.run_sequential(st, log=quiet)
    whole = protocols.run_sequential(use(study, params_for(tmp_path, "whole")), log=quiet)
    key = ["method", "eval", "batch_index", "case_id"]
    a, b = resumed.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True)
    assert_frame_equal(a, b, check_exact=True)
    assert np.isfinite(b[SCORES].to_numpy(dtype=float)).all()
    assert b.groupby(["method", "eval"]).size().to_dict() == {
        (m, e): 4 for m in ("alphaedit", "encore") for e in ("current", "final")}
    bt = pd.read_parquet(Path(p.results_dir) / "whole" / "sequential" / "batches.parquet")
    for m in ("alphaedit", "encore"):
        assert list(bt[bt.method == m].sort_values("batch_index").prior_keys) == [0, 2]
    assert_unedited(study.model, weights0)


def test_encore_sequential_resume_replays_its_keys(study, weights0, tmp_path) -> None:
    """An ENCORE run interrupted after its first batch resumes with K_p replayed from the
    checkpoint (keys read back from disk join the Gram on the factor's device) to exactly the
    uninterrupted run: cases and the per-batch diagnostics, prior_keys included."""
    one = {"sequential.methods": ["encore"]}
    st = use(study, params_for(tmp_path, "cut", **one))
    with pytest.raises(RuntimeError, match="injected failure"):
        protocols.run_sequential(st, log=quiet, fail_after=1)
    resumed = protocols.run_sequential(st, log=quiet)
    whole = protocols.run_sequential(use(study, params_for(tmp_path, "whole", **one)), log=quiet)
    key = ["method", "eval", "batch_index", "case_id"]
    assert_frame_equal(resumed.sort_values(key).reset_index(drop=True),
                       whole.sort_values(key).reset_index(drop=True), check_exact=True)
    bt = {n: pd.read_parquet(Path(tmp_path) / n / "sequential" / "batches.parquet").sort_values("batch_index")
          for n in ("cut", "whole")}
    assert list(bt["cut"].prior_keys) == list(bt["whole"].prior_keys) == [0, 2]
    assert np.allclose(bt["cut"].delta_norm, bt["whole"].delta_norm, rtol=0, atol=0)
    assert_unedited(study.model, weights0)


def test_singular_edits_with_the_new_editors(study, weights0, tmp_path) -> None:
    """One-fact edits (the layer search's and Table 1's path: one multi-right-hand-side solve) work
    for AlphaEdit and ENCORE and equal editing the weights one fact at a time."""
    over = {"singular.methods": ["alphaedit", "encore"], "singular.layer": 1}
    got = protocols.run_singular(use(study, params_for(tmp_path, "bat", **over)), log=quiet)
    ref = protocols.run_singular(use(study, params_for(tmp_path, "ref", **over, **{"evaluation.batched_edits": False})),
                                 log=quiet)
    key = ["method", "batch_index", "case_id"]
    a, b = got.sort_values(key).reset_index(drop=True), ref.sort_values(key).reset_index(drop=True)
    assert sorted(a.method.unique()) == ["alphaedit", "encore"] and np.isfinite(a[SCORES].to_numpy(dtype=float)).all()
    for c in ("ES", "PS", "NS"):
        assert (a[c].to_numpy() == b[c].to_numpy()).all(), c
    assert np.allclose(a[SCORES].to_numpy(dtype=float), b[SCORES].to_numpy(dtype=float), rtol=0, atol=1e-5)
    assert_unedited(study.model, weights0)


def test_a_threshold_that_keeps_no_direction_stops_the_run_on_both_paths(study, weights0, tmp_path) -> None:
    """A nullspace_threshold smaller than C0's smallest eigenvalue's share is a parameter problem of
    the run: one clear error naming the key (exit 2 on the command line), on the batched and on the
    reference path alike, never a run of failed edits; nothing is written."""
    from editlib.editors import NullSpaceError

    for batched in (True, False):
        over = {"hparams.alphaedit.nullspace_threshold": 1e-12, "batch.methods": ["alphaedit"],
                "evaluation.batched_edits": batched}
        with pytest.raises(NullSpaceError, match="nullspace_threshold=1e-12 keeps no direction"):
            protocols.run_batch(use(study, params_for(tmp_path, f"ns{batched}", **over)), log=quiet)
        assert_unedited(study.model, weights0)


def test_params_accept_the_new_methods_and_fail_fast(tmp_path) -> None:
    p = params_for(tmp_path, **{"hparams.alphaedit.L2": 2.0, "hparams.encore.update_norm_lambda": 5.0})
    assert p.method_hparams("alphaedit", 1, "batch").L2 == 2.0
    enc = p.method_hparams("encore", 1, "sequential")
    assert enc.update_norm_lambda == 5.0 and enc.values.early_stop == "mpes"
    for over, match in (({"hparams.alphaedit.L2": -1}, r"hparams\.alphaedit: L2"),
                        ({"hparams.alphaedit.nullspace_threshold": 2}, "nullspace_threshold"),
                        ({"hparams.encore.early_stop": "sometimes"}, "early_stop"),
                        ({"hparams.encore.L2x": 1}, "unknown hyperparameter"),
                        ({"sequential.methods": ["alphaedt"]}, "unknown method")):
        with pytest.raises(ParamsError, match=match):
            params_for(tmp_path, **over)


@needs_tiny
def test_sequential_work_matches_the_cost_count(study, weights0, tmp_path, monkeypatch) -> None:
    """editlib.workcount counts what a sequential run of both editors factors: one eigh of C0
    (AlphaEdit's null space), ENCORE's base factor, and one preservation factor per later batch."""
    from editlib import editors
    from editlib.workcount import count_sequential

    study.covs([1])[1].cache.clear()  # as a fresh study: nothing derived from C0 yet
    calls = {"eigh": 0, "pres": 0}
    real_eigh, real_factor, real_post = torch.linalg.eigh, editors.factor_cov, editors.NullSpaceOperator.__post_init__

    def eigh(*a, **k):
        calls["eigh"] += 1
        return real_eigh(*a, **k)

    def factor(*a, **k):
        calls["pres"] += 1
        return real_factor(*a, **k)

    def post(self):
        calls["pres"] += self.prior_gram is not None
        real_post(self)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    monkeypatch.setattr(editors, "factor_cov", factor)
    monkeypatch.setattr(editors.NullSpaceOperator, "__post_init__", post)
    p = params_for(tmp_path, **{"sequential.batch_sizes": [2, 4]})
    protocols.run_sequential(use(study, p), log=quiet)
    exp = count_sequential(p, 1)
    assert calls == {"eigh": exp.total("c0_eigh", "count"), "pres": exp.total("pres_factor", "count")} == \
        {"eigh": 1, "pres": 3}
    assert_unedited(study.model, weights0)
