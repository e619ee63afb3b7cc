"""editlib.solver: the shared ROME / MEMIT / EMMET closed form (SPEC §2–3, §8.5, §9)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from editlib.solver import (CovFactor, _factor_small, cond_estimate, factor_cov,
                            memit_normal_equations_residual, mu_for, solve_delta, solve_factors,
                            solve_rank_one, solved_keys)

D_IN, D_OUT = 64, 32
F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def C0() -> torch.Tensor:
    """A random SPD matrix with cond ≈ 1e2: E[kkᵀ] of 4·d_in Gaussian keys with a spread of scales."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * D_IN, D_IN, generator=g, dtype=F64) * torch.linspace(0.3, 3.0, D_IN, dtype=F64)
    return X.T @ X / X.shape[0]


@pytest.fixture(scope="module")
def cov(C0: torch.Tensor) -> CovFactor:
    return factor_cov(C0)


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D_OUT, D_IN, generator=g, dtype=F64)
    K = torch.randn(D_IN, n, generator=g, dtype=F64)
    R = torch.randn(D_OUT, n, generator=g, dtype=F64)
    return W, K, R


def test_factor_cov(C0: torch.Tensor, cov: CovFactor) -> None:
    assert cov.L.dtype == F64 and cov.jitter == 0.0
    assert torch.allclose(cov.L @ cov.L.T, C0, rtol=0, atol=1e-12)
    eig = torch.linalg.eigvalsh(C0)
    exact = (eig.max() / eig.min()).item()
    assert factor_cov(C0, compute_cond=True).cond == pytest.approx(exact, rel=1e-8)
    # default: the cheap estimate from the factor (a lower bound, close to the truth)
    assert exact * 0.99 < cov.cond <= exact * (1 + 1e-9)
    assert math.isnan(factor_cov(C0, compute_cond=False).cond)
    assert 1 < cov.cond < 1e4


def test_cond_estimate_on_ill_conditioned() -> None:
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=F64))
    C = Q @ torch.diag(torch.logspace(-8, 3, 200, dtype=F64)) @ Q.T
    est = cond_estimate(torch.linalg.cholesky((C + C.T) / 2))
    assert 0.9e11 < est <= 1.0e11 * (1 + 1e-6)


def test_rome_n1_mu0_exact(cov: CovFactor) -> None:
    W, K, R = data(1)
    delta, info = solve_delta(R, K, cov, mu=0.0)
    assert delta.shape == (D_OUT, D_IN) and delta.dtype == F64
    assert rel((W + delta) @ K, W @ K + R) < 1e-5
    assert rel(delta @ K, R) < 1e-10
    assert info.n == 1 and info.mu == 0.0 and not info.used_jitter and info.jitter == 0.0
    assert info.cond_D == pytest.approx(1.0)
    assert info.delta_norm == pytest.approx(torch.linalg.norm(delta).item())


def test_emmet_mu0_equality(cov: CovFactor) -> None:
    _, K, R = data(8)
    delta, info = solve_delta(R, K, cov, mu=0.0)
    assert rel(delta @ K, R) < 1e-5
    assert not info.used_jitter and info.n == 8


def test_memit_normal_equations(C0: torch.Tensor, cov: CovFactor) -> None:
    _, K, R = data(8)
    lam = 1.0
    delta, _ = solve_delta(R, K, cov, mu=lam)
    assert memit_normal_equations_residual(delta, R, K, C0, lam) < 1e-6


def test_memit_direct_formula(C0: torch.Tensor, cov: CovFactor) -> None:
    _, K, R = data(8)
    lam = 15000.0
    delta, _ = solve_delta(R, K, cov, mu=lam)
    # ΔW = R Kᵀ (λC0 + KKᵀ)⁻¹  ⇔  (λC0 + KKᵀ) ΔWᵀ = K Rᵀ (symmetric system)
    direct = torch.linalg.solve(lam * C0 + K @ K.T, K @ R.T).T
    assert rel(delta, direct) < 1e-8


def test_memit_to_emmet_as_mu_vanishes(cov: CovFactor) -> None:
    _, K, R = data(8)
    memit, _ = solve_delta(R, K, cov, mu=1e-8)
    emmet, _ = solve_delta(R, K, cov, mu=0.0)
    assert rel(memit, emmet) < 1e-4


def test_emmet_n1_is_rome_formula(C0: torch.Tensor, cov: CovFactor) -> None:
    _, K, R = data(1, seed=3)
    delta, _ = solve_delta(R, K, cov, mu=0.0)
    c_inv_k = torch.linalg.solve(C0, K)  # (paper eq. 3) r (C0⁻¹k)ᵀ / (kᵀC0⁻¹k)
    rome = R @ c_inv_k.T / (K.T @ c_inv_k)
    assert rel(delta, rome) < 1e-10


def _near_duplicate(n: int, eps: float, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose last column nearly repeats the first (a subject sharing its last token with
    another, SPEC §8.5), and conflicting residuals for them."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(D_IN, n, generator=g, dtype=F64)
    K[:, -1] = K[:, 0] + eps * torch.randn(D_IN, generator=g, dtype=F64)
    R = torch.randn(D_OUT, n, generator=g, dtype=F64)
    return K, R


def _plain_reference(R, K, C0, mu):
    """The reference's formula, plainly in float64: R (KᵀC0⁻¹K + μI)⁻¹ KᵀC0⁻¹ (SPEC §3)."""
    C_inv_K = torch.linalg.solve(C0, K)
    D = K.T @ C_inv_K + mu * torch.eye(K.shape[1], dtype=F64)
    return R @ torch.linalg.solve(D, C_inv_K.T)


@pytest.mark.parametrize("eps", [2e-5, 3e-6, 8e-7])
def test_ill_conditioned_emmet_is_solved_exactly(C0: torch.Tensor, cov: CovFactor, eps: float) -> None:
    """cond(D) 1e10-1e13 is invertible in float64: the default solve is exact (the reference's
    behaviour), where the old opt-in regularisation (max_cond=1e10) misses the constraints."""
    K, R = _near_duplicate(6, eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no jitter, no warning
        delta, info = solve_delta(R, K, cov, mu=0.0)
    assert 1e10 <= info.cond_D <= 1e13 and not info.used_jitter and info.jitter_reason == ""
    ref = _plain_reference(R, K, C0, 0.0)
    # W'K = WK + R holds as well as float64 allows at this cond, at least as well as the plain formula
    assert rel(delta @ K, R) < 1e-3 and rel(delta @ K, R) <= 10 * rel(ref @ K, R) + 1e-9
    assert rel(delta, ref) < 1e-3
    with pytest.warns(RuntimeWarning, match="REGULARISED"):
        reg, rinfo = solve_delta(R, K, cov, mu=0.0, max_cond=1e10)
    assert rinfo.used_jitter and rinfo.jitter_reason == "cond > max_cond" and rinfo.jitter_rel > 0
    assert rel(reg @ K, R) > 1e-2  # what the old default stored


def test_ill_conditioned_memit_is_solved_exactly(C0: torch.Tensor, cov: CovFactor) -> None:
    K, R = _near_duplicate(6, 1e-5)
    mu = 1e-8  # small enough that D + μI keeps cond > 1e10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delta, info = solve_delta(R, K, cov, mu=mu)
    assert info.cond_D > 1e10 and not info.used_jitter
    ref = _plain_reference(R, K, C0, mu)
    res = memit_normal_equations_residual(delta, R, K, C0, mu)
    assert res < 1e-5 and res <= 10 * memit_normal_equations_residual(ref, R, K, C0, mu) + 1e-9
    assert rel(delta, ref) < 1e-3


def test_unfactorable_system_is_jittered_loudly() -> None:
    """Exactly duplicated keys make D singular (here a pivot exactly 0): the factorisation fails, a
    jitter is added with a warning and recorded (the reference's LU fails on this D too and takes
    its pseudo-inverse: test_reference_solve_*)."""
    eye = factor_cov(torch.eye(D_IN, dtype=F64))
    K = torch.zeros(D_IN, 2, dtype=F64)
    K[0, :] = 1.0  # D = [[1, 1], [1, 1]] exactly
    R = torch.tensor([[1.0, -1.0]] * D_OUT, dtype=F64)
    with pytest.warns(RuntimeWarning, match="could not be solved exactly.*factorisation failed") as rec:
        delta, info = solve_delta(R, K, eye, mu=0.0)
    assert len([w for w in rec if "REGULARISED" in str(w.message)]) == 1
    assert info.used_jitter and info.jitter > 0 and info.jitter_reason == "factorisation failed"
    assert torch.isfinite(delta).all()
    f = _factor_small(torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64), None)
    assert f.tau > 0 and f.reason == "factorisation failed"


def test_reference_solve_equals_exact_where_the_system_is_sound(cov: CovFactor) -> None:
    """solve='reference' (LU, as the reference's torch.inverse) and the exact Cholesky give the same
    update on a well-conditioned system (float64 round-off), with no warning."""
    _, K, R = data(8)
    for mu in (0.0, 3.0):
        exact, _ = solve_delta(R, K, cov, mu=mu)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ref, info = solve_delta(R, K, cov, mu=mu, solve="reference")
        assert rel(ref, exact) < 1e-10 and info.jitter == 0 and info.jitter_reason == ""


def test_reference_solve_blows_up_where_the_exact_solve_does_not() -> None:
    """A key repeated bit for bit at μ = 0 (EMMET λₑ = 0, two facts sharing a subject and its prompt
    prefix) makes D singular. The exact Cholesky path writes a bounded, averaged update (about the
    pseudo-inverse's), loudly; solve='reference' solves it as the reference's LU inverse does, with
    no jitter: about 1e17 in norm, as the explicit inverse, an update that wrecks a model. An exactly zero pivot takes the pseudo-inverse, as the reference's fallback, with a
    warning that counts the repeated keys."""
    g = torch.Generator().manual_seed(1)
    d, n = 512, 64
    eye = factor_cov(torch.eye(d, dtype=F64))
    K = torch.randn(d, n, generator=g, dtype=F64)
    K[:, 40] = K[:, 3]
    R = torch.randn(D_OUT, n, generator=g, dtype=F64)
    with pytest.warns(RuntimeWarning, match="1 of the 64 keys repeat an earlier key bit for bit"):
        X_exact, info_exact = solve_factors(R, K, eye, 0.0)
    with pytest.warns(RuntimeWarning, match="numerically singular"):
        X_ref, info_ref = solve_factors(R, K, eye, 0.0, solve="reference")
    M = K.T @ K
    assert info_ref.jitter == 0 and info_ref.jitter_reason == ""
    # what the reference's inverse writes here is rounding: its size, not its bits, is the behaviour
    assert torch.linalg.norm(X_ref) > 1e10 and torch.linalg.norm(torch.inverse(M) @ K.T) > 1e10
    assert rel(X_exact, torch.linalg.pinv(M) @ K.T) < 0.2  # bounded: near the minimum-norm solution
    K0 = torch.zeros(D_IN, 2, dtype=F64)
    K0[0, :] = 1.0  # D = [[1, 1], [1, 1]] exactly: LU's second pivot is 0
    eye0 = factor_cov(torch.eye(D_IN, dtype=F64))
    with pytest.warns(RuntimeWarning, match="exactly zero LU pivot.*pseudo-inverse.*1 of the 2 keys"):
        X0, info0 = solve_factors(torch.ones(D_OUT, 2, dtype=F64), K0, eye0, 0.0, solve="reference")
    assert info0.jitter_reason == "LU failed: pseudo-inverse" and info0.jitter == 0
    assert torch.allclose(X0, torch.linalg.pinv(K0.T @ K0) @ K0.T, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="max_cond regularises the exact solve"):
        solve_factors(R, K, eye, 0.0, solve="reference", max_cond=1e10)
    with pytest.raises(ValueError, match=r"solve must be one of \('exact', 'reference'\)"):
        solve_factors(R, K, eye, 0.0, solve="lu")


def test_no_warning_when_well_conditioned(cov: CovFactor) -> None:
    _, K, R = data(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_delta(R, K, cov, mu=0.0)


@pytest.mark.parametrize("which,match", [("R", "residual"), ("K", "keys")])
def test_non_finite_inputs(cov: CovFactor, which: str, match: str) -> None:
    _, K, R = data(3)
    (R if which == "R" else K)[0, 1] = math.nan if which == "R" else math.inf
    with pytest.raises(ValueError, match=match):
        solve_delta(R, K, cov, mu=1.0)


def test_shape_errors(cov: CovFactor) -> None:
    _, K, R = data(3)
    with pytest.raises(ValueError, match=r"\(32, 2\)"):
        solve_delta(R[:, :2], K, cov, mu=1.0)
    with pytest.raises(ValueError, match="do not match C0"):
        solve_delta(R, K[:10], cov, mu=1.0)


def test_factor_cov_validation() -> None:
    with pytest.raises(ValueError, match="square"):
        factor_cov(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="symmetric"):
        factor_cov(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        factor_cov(torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))


def test_factor_cov_jitter_on_singular() -> None:
    v = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    C = v @ v.T  # rank 2, not factorable
    with pytest.warns(RuntimeWarning, match="jitter"):
        f = factor_cov(C)
    assert f.jitter > 0 and f.cond > 1e8  # cond of the jittered C0 (estimate)
    assert torch.isfinite(f.L).all()


def test_edited_layers_c0_is_unchanged_by_its_edit() -> None:
    """SPEC §5: sequential editing keeps the C0 factor of its first batch. C0 is the statistic of
    the edited down-projection's *input*, which that projection's own weight does not touch, so
    after a batch's edit at layer L a C0 recomputed on the edited model is bit-identical to the
    reused one (single-layer editing), and so would be every later solve. The layer above does
    change: the edit was real."""
    from _fixtures import collect_cov, tiny_llama, word_tokenizer

    from editlib.arch import weight_out_in

    model = tiny_llama(len(word_tokenizer()), layers=3, dtype=F64)
    layer = 1
    before, above_before = collect_cov(model, layer), collect_cov(model, layer + 1)
    reused = factor_cov(before)
    _, K, R = data(8, seed=5)
    delta, _ = solve_delta(R, K, reused, mu=2.0)
    with torch.no_grad():
        weight_out_in(model, layer).add_(delta)  # the first sequential batch, written at `layer`
    assert rel(collect_cov(model, layer + 1), above_before) > 1e-6  # the model state changed
    assert torch.equal(collect_cov(model, layer), before)


def test_float32_inputs_are_promoted(cov: CovFactor) -> None:
    _, K, R = data(4)
    d64, _ = solve_delta(R, K, cov, mu=1.0)
    d32, _ = solve_delta(R.float(), K.float(), cov, mu=1.0)
    assert d32.dtype == F64 and rel(d32, d64) < 1e-6


def test_mu_for() -> None:
    assert mu_for("ROME", 15000) == 0.0
    assert mu_for("memit", 15000) == 15000.0
    assert mu_for("emmet", 15000, 0.1) == pytest.approx(1500.0)
    assert mu_for("emmet", 15000, 0.0) == 0.0
    with pytest.raises(ValueError):
        mu_for("ft", 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_factor_with_cpu_inputs(C0: torch.Tensor, cov: CovFactor) -> None:
    _, K, R = data(8)
    gpu, _ = solve_delta(R, K, factor_cov(C0, device="cuda"), mu=1.0)
    cpu, _ = solve_delta(R, K, cov, mu=1.0)
    assert gpu.device.type == "cuda" and rel(gpu.cpu(), cpu) < 1e-10


def test_symmetrise_in_place_is_bitwise_the_formula() -> None:
    """The blockwise in-place symmetrisation (no second d_in × d_in copy) gives exactly (C + Cᵀ)/2,
    and factor_cov(overwrite=True) the same factor bit for bit."""
    from editlib import solver
    g = torch.Generator().manual_seed(1)
    X = torch.randn(300, 130, generator=g, dtype=F64)
    C = X.T @ X / 300 + 1e-9 * torch.randn(130, 130, generator=g, dtype=F64)  # slightly asymmetric
    want = (C + C.T) / 2
    old = solver._BLOCK
    try:
        solver._BLOCK = 32  # several blocks, ragged edge
        assert torch.equal(solver._symmetrise_(C.clone()), want)
        a = factor_cov(C.clone(), overwrite=True)
        b = factor_cov(C)  # out of place: C untouched
        assert torch.equal(a.L, b.L) and not torch.equal(C, want)
    finally:
        solver._BLOCK = old


def test_cov_factor_rebuilds_c0(C0, cov) -> None:
    """CovFactor.matrix() is C0 again (L Lᵀ less the jitter), the input of the newer editors'
    preservation terms (editlib.editors); μ of those editors is 1."""
    assert rel(cov.matrix(), C0) < 1e-13
    rank_deficient = C0.clone()
    rank_deficient[:, 0] = rank_deficient[0, :] = 0.0
    with pytest.warns(RuntimeWarning, match="jitter"):
        f = factor_cov(rank_deficient)
    assert f.jitter > 0 and rel(f.matrix(), rank_deficient) < 1e-12
    assert mu_for("alphaedit", 123.0) == mu_for("encore", 5.0, 0.1) == 1.0
    with pytest.raises(ValueError, match="unknown algorithm"):
        mu_for("ft", 1.0)


def test_solve_resid_shows_a_numerically_singular_system() -> None:
    """A Cholesky of D + μI can succeed on a numerically singular system (near-duplicate keys,
    μ = 0: EMMET's collapse regime) and return an update that misses the equations: solve_resid
    (‖R E‖/‖R‖, E = μM⁻¹ + XK − I; for μ = 0 ‖ΔW K − R‖/‖R‖) shows it and a warning names it, while
    well-posed systems at any μ, and rank-one solves, stay at float64 round-off."""
    g = torch.Generator().manual_seed(0)
    d, n = 64, 32
    cov = factor_cov(torch.eye(d, dtype=F64))
    R = torch.randn(16, n, generator=g, dtype=F64)
    base = torch.randn(d, n // 2, generator=g, dtype=F64)
    for gap, bad in ((1e-2, False), (1e-7, True)):
        K = torch.cat([base, base + gap * torch.randn(d, n // 2, generator=g, dtype=F64)], 1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            X, info = solve_factors(R, K, cov, 0.0)
        assert info.jitter == 0.0
        assert (info.solve_resid > 1e-2) is bad and (info.solve_resid < 1e-9) is not bad, (gap, info.solve_resid)
        assert any("misses the method's equations" in str(m.message) for m in w) is bad
        if not bad:
            assert torch.allclose(R @ X @ K, R, atol=1e-9)
    K = torch.randn(d, n, generator=g, dtype=F64)
    for mu in (0.0, 1.0, 5e4):
        assert solve_factors(R, K, cov, mu)[1].solve_resid < 1e-12


def test_precomputed_solve_gives_the_same_bits(cov: CovFactor) -> None:
    """Passing C0⁻¹K (how ROME / MEMIT / EMMET and a sweep's λ share it) changes nothing."""
    _, K, R = data(6, seed=5)
    A = cov.solve(K)
    X, info = solve_factors(R, K, cov, 3.0)
    Xa, info_a = solve_factors(R, K, cov, 3.0, A=A)
    assert torch.equal(X, Xa) and info == info_a
    one = solve_rank_one(R, K, cov, 0.5)
    one_a = solve_rank_one(R, K, cov, 0.5, A=A)
    assert torch.equal(one[0], one_a[0]) and one[1:] == one_a[1:]
    for bad in (A[:, :5], A.float(), A.T.contiguous()):
        with pytest.raises(ValueError, match="precomputed C⁻¹K"):
            solve_factors(R, K, cov, 3.0, A=bad)


def test_solved_keys_remembers_one_solve(C0: torch.Tensor, cov: CovFactor, monkeypatch) -> None:
    """One entry per memo: the same operator and columns reuse it, anything else solves again; the
    operator is not kept alive by the memo."""
    import gc
    import weakref

    _, K, _ = data(8, seed=6)
    calls = []
    real = CovFactor.solve
    monkeypatch.setattr(CovFactor, "solve", lambda self, K: calls.append(K.shape[1]) or real(self, K))
    memo: dict = {}
    A = solved_keys(memo, cov, K, [0, 2, 5])
    assert torch.equal(A, cov.solve(K[:, [0, 2, 5]])) and calls == [3, 3]
    assert solved_keys(memo, cov, K, (0, 2, 5)) is A and calls == [3, 3]
    solved_keys(memo, cov, K, [0, 2])  # other columns
    other = factor_cov(C0)
    solved_keys(memo, other, K, [0, 2])  # another operator, same matrix
    assert calls == [3, 3, 2, 2]
    ref = weakref.ref(other)
    del other
    gc.collect()
    assert ref() is None
    solved_keys(memo, cov, K, [0, 2])  # the dead operator's entry is not reused
    assert calls == [3, 3, 2, 2, 2]


def test_factor_cov_jitter_is_c0_plus_jitter_identity_and_leaves_c0_alone() -> None:
    """The jitter goes onto the diagonal of factor_cov's own copy of C0, in place: the factor is
    the Cholesky of (C0 + C0ᵀ)/2 + jitter·I to the bit, and the caller's C0 is unchanged."""
    v = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    C = v @ v.T
    before = C.clone()
    with pytest.warns(RuntimeWarning, match="jitter"):
        f = factor_cov(C)
    assert torch.equal(C, before)
    sym = (before + before.T) / 2
    expect = torch.linalg.cholesky(sym + f.jitter * torch.eye(6, dtype=F64))
    assert torch.equal(f.L, expect)


def _indefinite(d: int, rel_min: float, seed: int = 5) -> torch.Tensor:
    """Symmetric Q diag(λ) Qᵀ (float64) whose eigenvalues are rand + 0.5, but one equals
    −rel_min · mean(diag)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.rand(d, generator=g, dtype=F64) + 0.5
    others = lam[1:].sum()
    lam[0] = -rel_min * others / (d + rel_min)  # mean(diag) = trace / d = (others + λ₀) / d
    C = Q @ torch.diag(lam) @ Q.T
    return (C + C.T) / 2


def test_factor_cov_retries_from_the_saved_diagonal() -> None:
    """A C0 the first jitters (1e-10, 1e-9, ... of mean(diag)) cannot factor: every retry starts
    from the saved diagonal, so the factor is of C0 + jitter·I for the recorded jitter alone (not
    of C0 plus every jitter tried), and the jitter is the first sufficient ε = 1e-10·10^k."""
    d = 64
    C = _indefinite(d, 3e-5)
    mean_diag = C.diagonal().mean().item()
    lam_min = torch.linalg.eigvalsh(C).min().item()
    assert lam_min == pytest.approx(-3e-5 * mean_diag, rel=1e-6)  # 1e-5 of mean(diag) is short of it
    before = C.clone()
    with pytest.warns(RuntimeWarning, match="jitter"):
        f = factor_cov(C)
    assert torch.equal(C, before)
    assert f.jitter / mean_diag == pytest.approx(1e-4, rel=1e-9)
    eye = torch.eye(d, dtype=F64)
    assert (f.L @ f.L.T - (C + f.jitter * eye)).abs().max().item() < 1e-12
    # the same in place (overwrite=True: the retries write on the caller's C0)
    with pytest.warns(RuntimeWarning, match="jitter"):
        g = factor_cov(C.clone(), overwrite=True)
    assert g.jitter == f.jitter and torch.equal(g.L, f.L)
    # beyond the last jitter (1e-10·10^11 = 10 mean(diag)): refused
    bad = _indefinite(d, 100.0)
    assert bad.diagonal().mean() > 0
    with pytest.raises(ValueError, match="could not be Cholesky-factored even with jitter"):
        factor_cov(bad)


@pytest.mark.parametrize("mu", [-1.0, -1e-12, math.nan, math.inf])
def test_mu_must_be_finite_and_non_negative(cov: CovFactor, mu: float) -> None:
    """μ < 0 makes D + μI indefinite (a jittered, meaningless ΔW) and NaN poisons it: refused by
    both public solves before any work."""
    _, K, R = data(3)
    for solve in (solve_delta, solve_factors):
        with pytest.raises(ValueError, match="mu must be finite and >= 0"):
            solve(R, K, cov, mu)


def test_eigensolver_failure_off_the_cpu_is_retried_on_the_cpu() -> None:
    """A GPU eigensolver that does not converge (cuSOLVER can, on ill-conditioned systems) is
    retried on the CPU with a warning, the result returned on the input's device; on the CPU
    the error is raised as it is."""
    from editlib.solver import eig_or_cpu

    M = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    calls = []

    class OffCpu:  # stands in for a tensor on a device whose eigensolver fails
        device = torch.device("meta")

        def cpu(self):
            return M

    def eigh(x):
        calls.append(type(x).__name__)
        if isinstance(x, OffCpu):
            raise torch.linalg.LinAlgError("failed to converge")
        return torch.linalg.eigh(x)

    with pytest.warns(RuntimeWarning, match="eigh did not converge on meta.*recomputed on the CPU"):
        e, V = eig_or_cpu(eigh, OffCpu())
    assert calls == ["OffCpu", "Tensor"]
    assert e.device.type == V.device.type == "meta" and e.shape == (3,) and V.shape == (3, 3)

    def fails(x):
        raise torch.linalg.LinAlgError("failed to converge")

    with pytest.raises(torch.linalg.LinAlgError):
        eig_or_cpu(fails, M)
    for err, said in ((torch.OutOfMemoryError("CUDA out of memory"), "ran out of memory"),
                      (RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED"), "failed")):
        def gives_up(x, err=err):  # paper scale: a 14,336² eigh beside the model, or cuSOLVER itself
            if isinstance(x, OffCpu):
                raise err
            return torch.linalg.eigvalsh(x)
        with pytest.warns(RuntimeWarning, match=f"gives_up {said} on meta.*recomputed on the CPU"):
            assert eig_or_cpu(gives_up, OffCpu()).device.type == "meta"

    def device_mismatch(x):  # any other error is a bug to see, not to retry
        raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        eig_or_cpu(device_mismatch, OffCpu())
    assert torch.equal(eig_or_cpu(torch.linalg.eigvalsh, M), torch.tensor([1.0, 2.0, 3.0], dtype=F64))
