"""editlib.editing / weights / reprs: ROME, MEMIT and EMMET end to end on tiny random models
(SPEC §1B, §2, §3, §8.4). Equalities are checked on float64 models."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from _fixtures import one_thread  # noqa: F401  (autouse: single-threaded module)
from _fixtures import CTX, FACTS, collect_cov, tiny_gpt2, tiny_llama, word_tokenizer
from editlib.arch import arch_for, edit_weight, to_param_layout, weight_out_in
from editlib.context import PLAIN
from editlib.editing import EditFailed, EditHParams, apply_edit, paper_llama3, prepare_targets
from editlib.protocols import _slice
from editlib.reprs import compute_keys, current_values
from editlib.solver import factor_cov, memit_normal_equations_residual, solve_delta
from editlib.values import ValueHParams
from editlib.weights import EditSession

F64 = torch.float64
VH = ValueHParams(v_num_grad_steps=6)  # the equalities hold for any residual; keep it fast


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def hp_for(method: str, layers=(1,), **kw) -> EditHParams:
    return EditHParams(method=method, layers=layers, values=VH, **kw)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return tiny_llama(len(tok), layers=3, dtype=F64).requires_grad_(False)


@pytest.fixture(scope="module")
def C0(lm) -> dict:
    return {l: collect_cov(lm, l) for l in (1, 2)}


@pytest.fixture(scope="module")
def covs(C0) -> dict:
    return {l: factor_cov(c) for l, c in C0.items()}


@pytest.fixture(scope="module")
def targets(lm, tok) -> dict:
    """BatchTargets (values do not depend on μ): {(n, contexts name): targets}."""
    out = {}
    for name, ctx in (("ctx", CTX), ("plain", PLAIN)):
        for n in (1, 4):
            out[n, name] = prepare_targets(lm, tok, FACTS[:n], hp_for("emmet"), ctx)
    return out


def edit_delta(model, tok, n, hp, covs, ctx, tg):
    """Apply inside a session and return ({layer: W' − W in [d_out, d_in], float64}, stats)."""
    w0 = {l: weight_out_in(model, l).to(F64).clone() for l in hp.layers}
    with EditSession(model) as s:
        stats = apply_edit(model, tok, FACTS[:n], hp, covs, ctx, s, targets=tg)
        dw = {l: weight_out_in(model, l).to(F64) - w0[l] for l in hp.layers}
    return dw, stats


# --------------------------------------------------------------------------- the equalities


def test_prepare_targets(lm, tok, targets) -> None:
    tg = targets[4, "ctx"]
    assert tg.layer == 1 and tg.K.shape == (64, 4) and tg.R.shape == (32, 4)
    # K: ½ k_plain + ½ mean of the two contexts (SPEC §2 "Keys")
    kp = compute_keys(lm, tok, FACTS, 1, PLAIN)
    kc = torch.stack([compute_keys(lm, tok, FACTS, 1, type(CTX)(groups=((c,),))) for c in CTX.groups[1]]).mean(0)
    torch.testing.assert_close(tg.K, 0.5 * kp + 0.5 * kc, rtol=1e-6, atol=1e-7)
    k_plain, h = current_values(lm, tok, FACTS, 1)
    torch.testing.assert_close(k_plain, kp)
    torch.testing.assert_close(tg.R, tg.values.z - h)
    torch.testing.assert_close(tg.values.h, h, rtol=0, atol=1e-6)


def test_residual_is_formed_on_the_model_device(monkeypatch) -> None:
    """z comes back from the value optimisation on the CPU while keys and h stay on the model's
    device (a GPU at paper scale): the residual must be formed there, not as CPU − CUDA. The
    ``meta`` device stands in for the GPU here (mixing it with CPU tensors raises as CUDA does)."""
    import editlib.editing as ed
    from editlib.values import ValueResult

    d, d_in, n = 6, 8, 3
    z = torch.randn(d, n)
    monkeypatch.setattr(ed, "compute_values", lambda *a, **k: ValueResult(
        z=z, h=torch.zeros(d, n), final_loss=torch.zeros(n), steps=torch.zeros(n, dtype=torch.long)))
    monkeypatch.setattr(ed, "compute_keys", lambda *a, **k: torch.empty(d_in, n, device="meta"))
    monkeypatch.setattr(ed, "current_values", lambda *a, **k: (torch.empty(d_in, n, device="meta"),
                                                                torch.empty(d, n, device="meta")))
    with pytest.raises(RuntimeError):
        z - torch.empty(d, n, device="meta")  # what a CPU − GPU subtraction does
    hp = hp_for("memit", layers=(1,))
    tg = prepare_targets(None, None, FACTS[:n], hp, CTX)
    assert tg.R.device.type == "meta" and tg.R.shape == (d, n) and tg.K.device.type == "meta"


@pytest.mark.parametrize("ctx_name", ["ctx", "plain"])
def test_rome_maps_key_to_value(lm, tok, covs, targets, ctx_name) -> None:
    """ROME (N=1, μ=0): (W' − W) k = r."""
    tg = targets[1, ctx_name]
    dw, stats = edit_delta(lm, tok, 1, hp_for("rome"), covs, CTX if ctx_name == "ctx" else PLAIN, tg)
    assert rel(dw[1] @ tg.K.to(F64), tg.R) < 1e-5
    assert stats.n == 1 and stats.mu == 0.0 and stats.layer == 1
    assert stats.delta_norm == pytest.approx(torch.linalg.norm(dw[1]).item(), rel=1e-6)
    assert stats.w_dist == pytest.approx(torch.linalg.norm(dw[1]).item(), rel=1e-6)


@pytest.mark.parametrize("ctx_name", ["ctx", "plain"])
def test_emmet_equality(lm, tok, covs, targets, ctx_name) -> None:
    """EMMET μ=0, N=4: (W' − W) K = R column by column."""
    tg = targets[4, ctx_name]
    dw, stats = edit_delta(lm, tok, 4, hp_for("emmet"), covs, CTX if ctx_name == "ctx" else PLAIN, tg)
    assert stats.mu == 0.0 and stats.n == 4 and stats.jitter == 0.0
    for i in range(4):
        assert rel(dw[1] @ tg.K[:, i].to(F64), tg.R[:, i]) < 1e-5, i


@pytest.mark.parametrize("method", ["rome", "emmet"])
def test_plain_edit_writes_z_into_the_block_output(lm, tok, covs, targets, method) -> None:
    """With plain templates the edited key is the plain prompt's key, so after the edit the block
    output at the subject's last token is exactly z (keys do not depend on the edited matrix)."""
    n = 1 if method == "rome" else 4
    tg = targets[n, "plain"]
    with EditSession(lm) as s:
        apply_edit(lm, tok, FACTS[:n], hp_for(method), covs, PLAIN, s, targets=tg)
        k_after, h_after = current_values(lm, tok, FACTS[:n], 1)
    torch.testing.assert_close(k_after, tg.K)
    assert rel(h_after - (tg.values.z - tg.R), tg.R) < 1e-5  # moved by R ...
    assert rel(h_after, tg.values.z) < 1e-6  # ... onto z


@pytest.mark.parametrize("lam", [1.0, 100.0])
def test_memit_normal_equations(lm, tok, covs, C0, targets, lam: float) -> None:
    """MEMIT: ΔW(λC0 + KKᵀ) = RKᵀ; with λ > 0 the equality W'K = WK + R is *not* exact."""
    tg = targets[4, "ctx"]
    dw, stats = edit_delta(lm, tok, 4, hp_for("memit", mom2_update_weight=lam), covs, CTX, tg)
    assert stats.mu == lam
    assert memit_normal_equations_residual(dw[1], tg.R, tg.K, C0[1], lam) < 1e-6
    assert rel(dw[1] @ tg.K.to(F64), tg.R) > 1e-3


def test_memit_mu_to_zero_approaches_emmet(lm, tok, covs, targets) -> None:
    tg = targets[4, "ctx"]
    emmet, _ = edit_delta(lm, tok, 4, hp_for("emmet"), covs, CTX, tg)
    gaps = []
    for mu in (1e-1, 1e-3, 1e-5, 1e-7):
        memit, _ = edit_delta(lm, tok, 4, hp_for("memit", mom2_update_weight=mu), covs, CTX, tg)
        gaps.append(rel(memit[1], emmet[1]))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-5, gaps


def test_emmet_n1_equals_rome(lm, tok, covs, targets) -> None:
    tg = targets[1, "ctx"]
    rome, _ = edit_delta(lm, tok, 1, hp_for("rome"), covs, CTX, tg)
    emmet, _ = edit_delta(lm, tok, 1, hp_for("emmet"), covs, CTX, tg)
    assert rel(emmet[1], rome[1]) < 1e-10
    # and EMMET with λ_e > 0 is different
    soft, _ = edit_delta(lm, tok, 1, hp_for("emmet", emmet_lambda=0.1), covs, CTX, tg)
    assert rel(soft[1], rome[1]) > 1e-3


def test_rome_formula(lm, tok, covs, C0, targets) -> None:
    """Unified ROME (SPEC §1B): ΔW = r (C0⁻¹k)ᵀ / (kᵀC0⁻¹k), computed independently."""
    tg = targets[1, "ctx"]
    dw, _ = edit_delta(lm, tok, 1, hp_for("rome"), covs, CTX, tg)
    k, r = tg.K.to(F64), tg.R.to(F64)
    c_inv_k = torch.linalg.solve(C0[1], k)
    expected = r @ c_inv_k.T / (k.T @ c_inv_k)
    assert rel(dw[1], expected) < 1e-8


# --------------------------------------------------------------------------- sessions


def _snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snap: dict) -> None:
    for k, v in model.state_dict().items():
        assert v.dtype == snap[k].dtype and torch.equal(v, snap[k]), k


def test_restore_is_bit_identical(lm, tok, covs, targets) -> None:
    snap = _snapshot(lm)
    with EditSession(lm) as s:
        apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=targets[4, "ctx"])
        apply_edit(lm, tok, FACTS[:1], hp_for("rome"), covs, CTX, s, targets=targets[1, "ctx"])
        assert s.layers == [1]
        assert not torch.equal(edit_weight(lm, 1), snap["model.layers.1.mlp.down_proj.weight"])
    _assert_same(lm, snap)
    # also when the block raises
    with pytest.raises(RuntimeError, match="boom"):
        with EditSession(lm) as s:
            apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=targets[4, "ctx"])
            raise RuntimeError("boom")
    _assert_same(lm, snap)


def test_keep_keeps_the_edit(lm, tok, covs, targets) -> None:
    snap = _snapshot(lm)
    name = "model.layers.1.mlp.down_proj.weight"
    try:
        with EditSession(lm) as s:
            s.keep()
            apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=targets[4, "ctx"])
            edited = edit_weight(lm, 1).clone()
        assert torch.equal(edit_weight(lm, 1), edited)
        assert not torch.equal(edited, snap[name])
        for k, v in lm.state_dict().items():  # nothing else moved
            if k != name:
                assert torch.equal(v, snap[k]), k
        s.restore()  # an explicit restore still goes back
        _assert_same(lm, snap)
    finally:
        with torch.no_grad():
            edit_weight(lm, 1).copy_(snap[name])


@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.bfloat16])
def test_zero_update_is_a_no_op(tok, dtype) -> None:
    """Writing the master back must not lose bits of the weight in any dtype (float64 included)."""
    model = tiny_llama(len(tok), layers=2, dtype=dtype)
    if dtype == F64:  # make the weight use float64's extra bits (from_config initialises in fp32)
        with torch.no_grad():
            edit_weight(model, 1).mul_(1 + 1e-12 * torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=F64))
    snap = _snapshot(model)
    with EditSession(model) as s:
        s.apply(1, torch.zeros(32, 64))
        s.keep()
    _assert_same(model, snap)
    assert s.distance(1) == (0.0, 0.0)


def test_nan_update_is_refused(lm, tok, covs, targets) -> None:
    snap = _snapshot(lm)
    bad = torch.zeros(32, 64, dtype=F64)
    bad[3, 7] = float("nan")
    with EditSession(lm) as s:
        with pytest.raises(ValueError, match="non-finite"):
            s.apply(1, bad)
        assert s.layers == []  # nothing recorded, nothing written
        _assert_same(lm, snap)
        good = torch.full((32, 64), 1e-3, dtype=F64)
        s.apply(1, good)
        w, m = edit_weight(lm, 1).clone(), s.master(1).clone()
        for v in (float("nan"), float("inf")):
            bad[3, 7] = v
            with pytest.raises(ValueError, match="non-finite"):
                s.apply(1, bad)
            assert torch.equal(edit_weight(lm, 1), w) and torch.equal(s.master(1), m)
        with pytest.raises(ValueError, match="shape"):
            s.apply(1, torch.zeros(64, 32))
        assert torch.equal(edit_weight(lm, 1), w)
    _assert_same(lm, snap)

    tg = targets[4, "ctx"]
    R = tg.R.clone()
    R[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solve_delta(R, tg.K, covs[1], 0.0)
    # a fact with a non-finite residual is left out of the solve (a failed edit), the others are
    # edited exactly as a batch without it
    nan_tg = dataclasses.replace(tg, R=R)
    assert nan_tg.fail_reason == ["", "", "residual z − h is not finite", ""]
    with EditSession(lm) as s:
        stats = apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=nan_tg)
        got = s.master(1).clone()
    assert stats.n_failed == 1
    keep = [0, 1, 3]
    three = _slice(tg, keep)  # the batch mode's own slicing of prepared targets
    assert three.values.fail_reason == [""] * 3
    with EditSession(lm) as s:
        apply_edit(lm, tok, [FACTS[i] for i in keep], hp_for("emmet"), covs, CTX, s, targets=three)
        assert torch.equal(s.master(1), got)
    # nothing solvable: EditFailed, nothing written
    all_nan = dataclasses.replace(tg, R=torch.full_like(tg.R, float("nan")))
    with EditSession(lm) as s:
        with pytest.raises(EditFailed, match="all 4 facts failed"):
            apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=all_nan)
        _assert_same(lm, snap)
    _assert_same(lm, snap)


def test_a_fact_with_a_non_finite_key_fails_alone(lm, tok, covs, targets) -> None:
    """A fact whose key is NaN (a bf16 / fp16 overflow at scale) while its value succeeded is left
    out of the solve as a failed edit; the others are edited exactly as a batch without it, instead
    of the NaN key failing the whole batch in the solver."""
    snap = _snapshot(lm)
    tg = targets[4, "ctx"]
    K = tg.K.clone()
    K[0, 2] = float("nan")
    nan_tg = dataclasses.replace(tg, K=K)
    assert nan_tg.values.fail_reason == [""] * 4 and torch.isfinite(nan_tg.R).all()
    assert nan_tg.fail_reason == ["", "", "key is not finite", ""]
    with EditSession(lm) as s:
        stats = apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=nan_tg)
        got = s.master(1).clone()
    assert stats.n == 4 and stats.n_failed == 1
    keep = [0, 1, 3]
    with EditSession(lm) as s:
        apply_edit(lm, tok, [FACTS[i] for i in keep], hp_for("emmet"), covs, CTX, s,
                   targets=_slice(tg, keep))  # the batch mode's own slicing of prepared targets
        assert torch.equal(s.master(1), got)
    assert not torch.equal(got, weight_out_in(lm, 1))  # the three were written
    _assert_same(lm, snap)


def test_targets_of_another_layer_are_refused(lm, tok, covs, targets) -> None:
    """Targets prepared for layer 1 (keys and residuals there) given to an edit of layer 2 would
    write the wrong update without an error: refused, naming the layers, before anything is written.
    The same for targets of another number of facts."""
    snap = _snapshot(lm)
    tg = targets[4, "ctx"]
    assert tg.layer == 1 and covs[2].dim == tg.K.shape[0]  # shapes alone would not catch it
    with EditSession(lm) as s:
        with pytest.raises(ValueError, match=r"targets were prepared for layer 1 and 4 facts, not layer 2 and 4"):
            apply_edit(lm, tok, FACTS, hp_for("emmet", layers=(2,)), covs, CTX, s, targets=tg)
        with pytest.raises(ValueError, match=r"targets were prepared for layer 1 and 4 facts, not layer 1 and 3"):
            apply_edit(lm, tok, FACTS[:3], hp_for("emmet"), covs, CTX, s, targets=tg)
        assert s.layers == [] and s.factor_log == []
        _assert_same(lm, snap)


def test_multilayer_failure_rolls_back_every_layer(lm, tok, covs, monkeypatch) -> None:
    """Multi-layer MEMIT whose 2nd layer's solve fails after the 1st layer was written: EditFailed,
    both layers bit-identical to before, the factor log empty and the run's prior keys unchanged
    (no half edit stays in a sequential run); a retry in the same session then equals a fresh
    session's edit bit for bit."""
    import editlib.editing as ed
    from editlib.editors import PriorKeys

    snap = _snapshot(lm)
    hp = hp_for("memit", layers=(1, 2), mom2_update_weight=1.0)
    tg = prepare_targets(lm, tok, FACTS, hp, CTX)
    w0 = {l: weight_out_in(lm, l).clone() for l in (1, 2)}

    def prior_keys() -> PriorKeys:  # a run that already holds the keys of an earlier batch
        p = PriorKeys(basis={1: None, 2: None})
        p.add(1, tg.K[:, :1])
        return p

    def state(p: PriorKeys) -> tuple:
        return ({l: g.clone() for l, g in p.gram.items()}, dict(p.count), [(l, k.clone()) for l, k in p.log])

    def same_state(a: tuple, b: tuple) -> bool:
        return (a[0].keys() == b[0].keys() and all(torch.equal(a[0][l], b[0][l]) for l in a[0])
                and a[1] == b[1] and len(a[2]) == len(b[2])
                and all(la == lb and torch.equal(ka, kb) for (la, ka), (lb, kb) in zip(a[2], b[2])))

    real, calls = ed.solve_factors, []

    def failing_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            assert not torch.equal(weight_out_in(lm, 1), w0[1])  # layer 1 is written by now
            raise ValueError("injected")
        return real(*a, **k)

    monkeypatch.setattr(ed, "solve_factors", failing_second)
    prior = prior_keys()
    before = state(prior)
    with EditSession(lm) as s:
        with pytest.raises(EditFailed, match="closed-form update failed: injected"):
            apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=tg, prior=prior)
        assert len(calls) == 2
        for l in (1, 2):
            assert torch.equal(weight_out_in(lm, l), w0[l]), l
            assert torch.equal(s.master(l), w0[l]), l
        _assert_same(lm, snap)
        assert s.factor_log == []
        assert same_state(state(prior), before)
        # the same batch again in the same session (the solver now succeeds)
        retry = apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=tg, prior=prior)
        got = {l: s.master(l).clone() for l in (1, 2)}
        got_log = [(l, R.clone(), X.clone()) for l, R, X in s.factor_log]
    _assert_same(lm, snap)
    fresh_prior = prior_keys()
    with EditSession(lm) as s:
        fresh = apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=tg, prior=fresh_prior)
        for l in (1, 2):
            assert torch.equal(got[l], s.master(l)), l
            assert not torch.equal(got[l], w0[l]), l
        assert len(got_log) == len(s.factor_log) == 2
        for (la, Ra, Xa), (lb, Rb, Xb) in zip(got_log, s.factor_log):
            assert la == lb and torch.equal(Ra, Rb) and torch.equal(Xa, Xb)
    assert same_state(state(prior), state(fresh_prior)) and prior.count == {1: 5, 2: 4}
    assert retry.delta_norm == fresh.delta_norm and retry.w_dist == fresh.w_dist
    _assert_same(lm, snap)


def test_set_master_round_trip(lm, tok, covs, targets) -> None:
    """A checkpointed master restores the edited weight exactly in a fresh session (resume)."""
    snap = _snapshot(lm)
    with EditSession(lm) as s:
        apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=targets[4, "ctx"])
        saved, edited = s.master(1).clone(), edit_weight(lm, 1).clone()
    _assert_same(lm, snap)
    with EditSession(lm) as s:
        s.set_master(1, saved)
        assert torch.equal(edit_weight(lm, 1), edited) and torch.equal(s.master(1), saved)
        with pytest.raises(ValueError, match="non-finite"):
            s.set_master(1, torch.full_like(saved, float("nan")))
        with pytest.raises(ValueError, match="wrong shape"):
            s.set_master(1, saved.T)
        assert torch.equal(edit_weight(lm, 1), edited)
    _assert_same(lm, snap)


def test_bf16_master_accumulates(tok) -> None:
    """Two updates of 0.4 bf16-ulp each: a bf16 weight alone would round both away; the fp32
    master keeps them (master == W0.float() + d1 + d2 exactly) and the weight is master→bf16."""
    model = tiny_llama(len(tok), layers=2, dtype=torch.bfloat16)
    w0 = edit_weight(model, 1).clone()
    _, e = torch.frexp(w0.float())
    ulp = torch.ldexp(torch.ones_like(w0, dtype=torch.float32), e - 8)  # bf16: 8 significant bits
    d1 = 0.4 * ulp
    d2 = 0.4 * ulp
    naive = ((w0 + d1.to(torch.bfloat16)).to(torch.bfloat16) + d2.to(torch.bfloat16)).to(torch.bfloat16)
    assert (naive == w0).float().mean() > 0.9  # in-place bf16 adds lose the updates
    with EditSession(model) as s:
        s.apply(1, d1)
        s.apply(1, d2)
        m = s.master(1)
        assert m.dtype == torch.float32
        assert torch.equal(m, (w0.float() + d1) + d2)
        w = edit_weight(model, 1)
        assert w.dtype == torch.bfloat16 and torch.equal(w, m.to(torch.bfloat16))
        assert (w != w0).float().mean() > 0.9  # 0.8 ulp in total: rounds to the next value
    assert torch.equal(edit_weight(model, 1), w0)


def test_bf16_edit_end_to_end(tok) -> None:
    """An EMMET edit of a bf16 model: the fp32 master holds W0 + ΔW with (W'−W0)K = R to fp32
    precision even though the bf16 weight itself is rounded."""
    model = tiny_llama(len(tok), layers=3, dtype=torch.bfloat16).requires_grad_(False)
    covs = {1: factor_cov(collect_cov(model, 1))}
    hp = hp_for("emmet")
    w0 = weight_out_in(model, 1).float().clone()
    with EditSession(model) as s:
        tg = prepare_targets(model, tok, FACTS, hp, CTX)
        apply_edit(model, tok, FACTS, hp, covs, CTX, s, targets=tg)
        assert rel((s.master(1) - w0) @ tg.K, tg.R) < 1e-4
        assert torch.equal(weight_out_in(model, 1), s.master(1).to(torch.bfloat16))


# --------------------------------------------------------------------------- GPT-2 (Conv1D)


@pytest.mark.parametrize("method", ["rome", "emmet"])
def test_gpt2_conv1d_orientation(tok, method) -> None:
    model = tiny_gpt2(len(tok)).requires_grad_(False)
    assert tuple(edit_weight(model, 1).shape) == (128, 32)  # Conv1D: [d_in, d_out]
    covs = {1: factor_cov(collect_cov(model, 1))}
    n = 1 if method == "rome" else 4
    for ctx in (CTX, PLAIN):
        tg = prepare_targets(model, tok, FACTS[:n], hp_for(method), ctx)
        assert tg.K.shape == (128, n) and tg.R.shape == (32, n)
        p0 = edit_weight(model, 1).clone()
        with EditSession(model) as s:
            apply_edit(model, tok, FACTS[:n], hp_for(method), covs, ctx, s, targets=tg)
            dw = edit_weight(model, 1) - p0  # [d_in, d_out]
            assert rel(dw.T @ tg.K.to(F64), tg.R) < 1e-5
            if ctx is PLAIN:
                _, h = current_values(model, tok, FACTS[:n], 1)
                assert rel(h, tg.values.z) < 1e-6
        assert torch.equal(edit_weight(model, 1), p0)


# --------------------------------------------------------------------------- multi-layer MEMIT


def test_multilayer_memit(lm, tok, covs) -> None:
    """Multi-layer MEMIT (SPEC §2): layer 1 gets MEMIT's update for R/2 on its keys; layer 2 then
    gets MEMIT's update for the residual z − h recomputed on the model holding layer 1's edit, on
    layer-2 keys recomputed there too."""
    snap = _snapshot(lm)
    hp = hp_for("memit", layers=(1, 2), mom2_update_weight=1.0)
    tg = prepare_targets(lm, tok, FACTS, hp, CTX)
    w1, w2 = weight_out_in(lm, 1).to(F64).clone(), weight_out_in(lm, 2).to(F64).clone()
    with EditSession(lm) as s:
        stats = apply_edit(lm, tok, FACTS, hp, covs, CTX, s, targets=tg)
        assert s.layers == [1, 2] and stats.layer == 1 and stats.n == 4
        d1, d2 = s.master(1).to(F64) - w1, s.master(2).to(F64) - w2
    want1, _ = solve_delta(tg.R / 2, tg.K, covs[1], 1.0)
    assert rel(d1, want1) < 1e-5
    with EditSession(lm) as s:
        s.apply(1, want1)  # the model after the first layer's edit
        K2 = compute_keys(lm, tok, FACTS, 2, CTX)
        _, h2 = current_values(lm, tok, FACTS, 2)
    want2, _ = solve_delta(tg.values.z - h2, K2, covs[2], 1.0)
    assert rel(d2, want2) < 1e-4
    _assert_same(lm, snap)


def test_multilayer_residual_spreading(lm, tok, covs) -> None:
    """μ → 0, plain templates: layer 1 takes R/2 (its ΔW maps K1 to R/2), the last layer takes the
    whole recomputed residual, so the block output of the last layer ends exactly on z."""
    hp = hp_for("memit", layers=(1, 2), mom2_update_weight=1e-9)
    tg = prepare_targets(lm, tok, FACTS, hp, PLAIN)
    assert tg.layer == 1
    _, h2 = current_values(lm, tok, FACTS, 2)
    torch.testing.assert_close(tg.R, tg.values.z - h2)  # residual at the z layer (2)
    w1 = weight_out_in(lm, 1).clone()
    with EditSession(lm) as s:
        apply_edit(lm, tok, FACTS, hp, covs, PLAIN, s, targets=tg)
        assert rel((weight_out_in(lm, 1) - w1) @ tg.K.to(F64), tg.R / 2) < 1e-5
        _, h_after = current_values(lm, tok, FACTS, 2)
        assert rel(h_after, tg.values.z) < 1e-6


@pytest.mark.parametrize("method", ["rome", "emmet"])
def test_single_layer_methods_reject_two_layers(method) -> None:
    with pytest.raises(ValueError, match="single layer"):
        EditHParams(method=method, layers=(1, 2))


def test_apply_edit_input_checks(lm, tok, covs, targets) -> None:
    snap = _snapshot(lm)
    with EditSession(lm) as s:
        with pytest.raises(ValueError, match="one fact"):
            apply_edit(lm, tok, FACTS[:2], hp_for("rome"), covs, CTX, s, targets=targets[4, "ctx"])
        with pytest.raises(ValueError, match=r"covariance.*\[0\]"):
            apply_edit(lm, tok, FACTS, hp_for("emmet", layers=(0,)), covs, CTX, s)
    _assert_same(lm, snap)


# --------------------------------------------------------------------------- hyperparameters


def test_from_dict_flat_reference_keys() -> None:
    hp = EditHParams.from_dict({"method": "memit", "layers": [2], "v_lr": 0.1, "kl_factor": 0.5,
                                "v_num_grad_steps": 7, "clamp_norm_factor": 0.75,
                                "v_weight_decay": 0.01, "mom2_update_weight": 15000})
    assert hp.layers == (2,) and hp.mom2_update_weight == 15000 and hp.mu == 15000
    assert (hp.values.v_lr, hp.values.kl_factor, hp.values.v_num_grad_steps) == (0.1, 0.5, 7)
    assert (hp.values.clamp_norm_factor, hp.values.v_weight_decay) == (0.75, 0.01)
    # nested and flat together; a bare int layer
    hp = EditHParams.from_dict({"method": "emmet", "layers": 3, "values": {"v_lr": 0.2},
                                "early_stop_loss": 0.1, "emmet_lambda": 0.1, "mom2_update_weight": 10})
    assert hp.layers == (3,) and hp.values.v_lr == 0.2 and hp.values.early_stop_loss == 0.1
    assert hp.mu == pytest.approx(1.0)
    assert EditHParams.from_dict(hp.to_dict()) == hp


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown hyperparameter") as exc:
        EditHParams.from_dict({"method": "memit", "rewrite_module_tmp": "x", "fact_token": "subject_last",
                               "v_lr": 0.5})
    assert "rewrite_module_tmp" in str(exc.value) and "fact_token" in str(exc.value)
    assert "v_lr" not in str(exc.value)
    with pytest.raises(ValueError, match="v_lrr"):
        EditHParams.from_dict({"values": {"v_lrr": 0.5}})


def test_hparams_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        EditHParams(method="ft")
    with pytest.raises(ValueError, match="at least one"):
        EditHParams(layers=())
    with pytest.raises(ValueError, match=">= 0"):
        EditHParams(mom2_update_weight=-1.0)
    assert EditHParams(method="rome", mom2_update_weight=5.0).mu == 0.0
    assert EditHParams(method="emmet", mom2_update_weight=5.0, emmet_lambda=0.1).mu == pytest.approx(0.5)
    with pytest.raises(ValueError, match="context_text must be one of clean, reference, got 'raw'"):
        EditHParams(context_text="raw")


def test_context_text_enters_the_digest_only_when_not_clean() -> None:
    """``context_text: clean`` is what every stored result ran: left out of ``to_dict`` (their
    parameter digests stay valid); ``reference`` is kept (other templates, other units)."""
    assert "context_text" not in EditHParams().to_dict()
    ref = EditHParams(context_text="reference")
    assert ref.to_dict()["context_text"] == "reference" and EditHParams.from_dict(ref.to_dict()) == ref
    # plain templates sample no text: one set, one digest, however texts would be decoded
    from editlib.context import context_key
    plain = EditHParams(context_templates="plain")
    assert EditHParams(context_templates="plain", context_text="reference").to_dict() == plain.to_dict()
    assert context_key("plain", "reference") == "plain" and context_key("memit", "reference") == "memit/reference"


def test_check_model(lm) -> None:
    EditHParams(method="memit", layers=(0, 2)).check_model(lm)
    for layers in ((3,), (-1,), (1, 7)):
        with pytest.raises(ValueError, match=r"outside the model's 0\.\.2") as exc:
            EditHParams(method="memit", layers=layers).check_model(lm)
        assert str([l for l in layers if not 0 <= l < 3]) in str(exc.value)


def test_paper_llama3() -> None:
    memit, emmet, rome = (paper_llama3(m) for m in ("memit", "emmet", "rome"))
    assert memit.layers == emmet.layers == rome.layers == (1,)
    assert (memit.mu, emmet.mu, rome.mu) == (5e4, 0.0, 0.0)
    assert memit.values == ValueHParams() and memit.context_templates == "memit"
    assert paper_llama3("memit", mom2_update_weight=1.0).mu == 1.0
    assert paper_llama3("emmet", layers=(4,)).layers == (4,)  # overriding the layer


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_apply_factors_equals_the_dense_update(kind) -> None:
    """R X is added block by block without a dense float64 ΔW; the result equals adding ΔW (Linear
    and Conv1D layouts), and bad factors are refused before any write."""
    from _fixtures import tiny_gpt2
    tok = word_tokenizer()
    model = (tiny_llama(len(tok)) if kind == "llama" else tiny_gpt2(len(tok), dtype=torch.float32))
    W = weight_out_in(model, 1)
    g = torch.Generator().manual_seed(0)
    R = torch.randn(W.shape[0], 3, generator=g, dtype=F64)
    X = torch.randn(3, W.shape[1], generator=g, dtype=F64) * 1e-2
    with EditSession(model) as s:
        s.apply(1, R @ X)
        dense = s.master(1).clone()
    with EditSession(model) as s:
        s.apply_factors(1, R, X, block_rows=5)  # several blocks
        assert torch.allclose(s.master(1), dense, rtol=0, atol=1e-6)
        assert torch.equal(edit_weight(model, 1), to_param_layout(arch_for(model), s.master(1)))
        before = s.master(1).clone()
        for bad in (torch.full_like(X, float("nan")), X * 1e300):
            with pytest.raises(ValueError, match="non-finite"):
                s.apply_factors(1, R, bad)
            assert torch.equal(s.master(1), before)
        with pytest.raises(ValueError, match="do not match"):
            s.apply_factors(1, R, X.T)


def test_factor_log_replays_bit_for_bit(lm, tok, covs, targets) -> None:
    """The updates a session wrote, replayed from their logged factors into a fresh session,
    rebuild the master exactly (the sequential checkpoint log)."""
    with EditSession(lm) as s:
        apply_edit(lm, tok, FACTS, hp_for("emmet"), covs, CTX, s, targets=targets[4, "ctx"])
        apply_edit(lm, tok, FACTS[:1], hp_for("rome"), covs, CTX, s, targets=targets[1, "ctx"])
        log, master = s.take_log(), s.master(1).clone()
        assert len(log) == 2 and s.factor_log == [] and s.log_complete
    with EditSession(lm) as s:
        for layer, R, X in log:
            s.apply_factors(layer, R, X)
        assert torch.equal(s.master(1), master)
        s.apply(1, torch.zeros_like(master, dtype=F64))
        assert not s.log_complete  # a dense write cannot be replayed from factors


def test_an_update_that_overflows_the_weights_dtype_is_refused() -> None:
    """A float16 weight overflows at 65,504: an update whose sum is finite in the float32 master but
    not in float16 is refused (ValueError, which apply_edit turns into a failed edit) and leaves the
    master and the weight exactly as they were; the same for a dense update."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float16)
    W = weight_out_in(model, 1)
    R = torch.zeros(W.shape[0], 1, dtype=F64)
    R[0, 0] = 1e5
    X = torch.zeros(1, W.shape[1], dtype=F64)
    X[0, 0] = 1.0
    with EditSession(model) as s:
        s.apply_factors(1, R * 1e-3, X)  # 100: fine in float16
        before, weight = s.master(1).clone(), edit_weight(model, 1).clone()
        assert s.master(1).dtype == torch.float32
        with pytest.raises(ValueError, match="not finite in float16"):
            s.apply_factors(1, R, X)
        with pytest.raises(ValueError, match="not finite in float16"):
            s.apply(1, R @ X)
        assert torch.equal(s.master(1), before) and torch.equal(edit_weight(model, 1), weight)
        assert len(s.take_log()) == 1  # the refused update is not logged


def test_replay_multiplies_the_live_update_s_layout() -> None:
    """A solver may return X column-major (cholesky_solve does); the checkpoint stores it contiguous.
    Both are multiplied contiguous, so a float64 master replayed from the log equals the live one
    bit for bit at batch sizes where the two layouts' GEMMs sum differently."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    W = weight_out_in(model, 1)
    g = torch.Generator().manual_seed(0)
    for n in (16, 64):
        R = torch.randn(W.shape[0], n, generator=g, dtype=F64)
        X = torch.randn(W.shape[1], n, generator=g, dtype=F64).T * 1e-2  # column-major, as from a solve
        assert not X.is_contiguous()
        with EditSession(model) as s:
            s.apply_factors(1, R, X)
            live, (entry,) = s.master(1).clone(), s.take_log()
        with EditSession(model) as s:
            s.apply_factors(1, entry[1].contiguous(), entry[2].contiguous())
            assert torch.equal(s.master(1), live)
