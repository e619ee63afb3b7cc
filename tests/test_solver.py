"""editlib.solver: the shared ROME / MEMIT / EMMET closed form (SPEC §2–3, §8.5, §9)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from editlib.solver import (CovFactor, factor_cov, memit_normal_equations_residual, mu_for,
                            solve_delta)

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
    assert cov.cond == pytest.approx((eig.max() / eig.min()).item(), rel=1e-8)
    assert 1 < cov.cond < 1e4


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


def test_duplicate_keys_use_jitter(cov: CovFactor) -> None:
    _, K, R = data(4)
    K = torch.cat([K, K[:, :1]], dim=1)  # two identical key columns (shared subject last token)
    R = torch.cat([R, torch.randn(D_OUT, 1, dtype=F64)], dim=1)  # conflicting targets
    with pytest.warns(RuntimeWarning, match="near-singular") as rec:
        delta, info = solve_delta(R, K, cov, mu=0.0)
    assert len([w for w in rec if "near-singular" in str(w.message)]) == 1
    assert info.used_jitter and info.jitter > 0
    assert info.cond_D > 1e10 and info.cond_solved <= 1e10
    assert torch.isfinite(delta).all()
    # the non-duplicated constraints are still (nearly) met
    assert rel(delta @ K[:, 1:4], R[:, 1:4]) < 1e-3


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
    assert f.jitter > 0 and (math.isinf(f.cond) or f.cond > 1e12)
    assert torch.isfinite(f.L).all()


def test_factor_reused_matches_fresh(C0: torch.Tensor, cov: CovFactor) -> None:
    for seed, n in ((5, 1), (6, 8), (7, 3)):
        _, K, R = data(n, seed=seed)
        reused, _ = solve_delta(R, K, cov, mu=2.0)
        fresh, _ = solve_delta(R, K, factor_cov(C0), mu=2.0)
        assert torch.equal(reused, fresh)


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
