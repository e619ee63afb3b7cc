"""One closed-form preservation–memorisation solver for ROME, MEMIT and EMMET (SPEC §2–3, §9).

All three methods share (SPEC §2 push-through identity, §3 "Scaling")::

    ΔW = R (D + μI)⁻¹ (C0⁻¹K)ᵀ,   D = Kᵀ C0⁻¹ K   (N×N)

with R ∈ R^{d_out×N} the residuals, K ∈ R^{d_in×N} the keys and C0 = E[k kᵀ]:

* unified ROME (SPEC §1B): N = 1, μ = 0  ⇒ ΔW = r (C0⁻¹k)ᵀ / (kᵀC0⁻¹k);
* MEMIT: μ = mom2_update_weight (the paper's λ)  ⇒ ΔW = R Kᵀ(λC0 + KKᵀ)⁻¹;
* EMMET: μ = mom2_update_weight · emmet_lambda; μ = 0 is the equality constraint W'K = WK + R.

Everything runs in float64 and never forms an explicit inverse (SPEC §8.4): C0 is Cholesky-factored
once per layer (:func:`factor_cov`, reused for every batch of a sequential run, SPEC §9), and the
N×N system is solved by Cholesky too.

Conditioning (``solve``, :data:`SOLVES`). ``exact`` (the default): D + μI is solved *exactly*,
however large its condition number, as long as it can be factored in float64, as the reference's
``torch.inverse`` does. Near-duplicate keys make cond(D) ~1e10–1e13 where the paper's EMMET λ = 0
large batches collapse (SPEC §8.5), still solvable in float64, and a regularised solve would miss the
equality constraints W'K = WK + R that the reference enforces. Only when the Cholesky factorisation
fails (a numerically singular D + μI: keys repeated bit for bit, facts sharing a subject and the
prompt before it) is a jitter τ·I added, loudly and recorded in :class:`SolveInfo`, as SPEC §8.5
recommends. The reference differs there: its LU inverse rarely fails on a singular matrix (a pivot
must be exactly zero) and returns an inverse of norm ~1e16 and more, so it writes an update that
wrecks the model; its pseudo-inverse runs only when ``torch.inverse`` raises. ``reference`` solves
as it does (LU of D as computed, a pseudo-inverse only where LU finds an exactly zero pivot), so
that a run can show that collapse (EMMET's N×N system is where it matters); what it writes there
is rounding, not arithmetic, and differs between machines. ``max_cond`` is an opt-in deviation of ``exact``: regularise whenever cond(D + μI)
exceeds it.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field

from typing import Protocol, Sequence

import torch

__all__ = [
    "CovFactor",
    "Preservation",
    "cond_estimate",
    "eig_or_cpu",
    "SOLVES",
    "SolveInfo",
    "check_solve",
    "factor_cov",
    "memit_normal_equations_residual",
    "mu_for",
    "solve_delta",
    "solve_factors",
    "solve_rank_one",
    "solved_keys",
]

F64 = torch.float64
#: how the N×N system D + μI is solved (module docstring): exact Cholesky with jitter where it cannot
#: be factored, or the reference's LU with a pseudo-inverse where LU fails
SOLVES = ("exact", "reference")
_COV_EPS0 = 1e-10  # first C0 jitter, relative to mean(diag C0)
_D_TAU0 = 1e-12  # first D jitter (only after a failed factorisation), relative to trace(D + μI)/N
_MAX_ATTEMPTS = 12  # jitter retries (×10 each) before giving up
_SYM_RTOL = 1e-5  # allowed |C0 - C0ᵀ| relative to max|C0| (float32 accumulation rounding)


# --------------------------------------------------------------------------- C0 factor


@dataclass
class CovFactor:
    """Cholesky factor of C0 (float64, lower), computed once per layer and reused (SPEC §9).

    ``jitter`` is what was added to C0's diagonal to make it factorable (0 normally);
    ``cond`` is C0's condition number: exact from its eigenvalues, or a cheap estimate from the
    factor (:func:`cond_estimate`), ``nan`` when not computed. ``cache`` holds what other editors
    derive from C0 once per layer (:mod:`editlib.editors`: AlphaEdit's null space, ENCORE's
    preservation factor), on the factor's device, for as long as the factor lives.
    """

    L: torch.Tensor
    jitter: float = 0.0
    cond: float = math.nan
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def matrix(self) -> torch.Tensor:
        """C0 itself (float64, a new matrix) rebuilt from the factor: L Lᵀ − jitter·I."""
        C = self.L @ self.L.T
        if self.jitter:
            C.diagonal().sub_(self.jitter)
        return C

    @property
    def dim(self) -> int:
        """d_in."""
        return int(self.L.shape[0])

    @property
    def device(self) -> torch.device:
        return self.L.device

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """C0⁻¹ K (two triangular solves, float64, on the factor's device)."""
        K = K.to(device=self.L.device, dtype=F64)
        if K.dim() != 2 or K.shape[0] != self.dim:
            raise ValueError(f"keys K must be [{self.dim}, N], got shape {tuple(K.shape)}")
        return _chol_solve(self.L, K)


def _chol_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(L Lᵀ)⁻¹ B as two triangular solves: on the CPU this is 16× faster than
    ``torch.cholesky_solve`` for one right-hand side at d_in = 14,336 (0.06 s against 1.02 s, one
    thread) and never slower for many (bench: python bench/bench_solve.py)."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


class Preservation(Protocol):
    """What the solve needs from its preservation term: ``solve(K)`` = C⁻¹K (float64, [d_in, N]) on
    ``device``. :class:`CovFactor` is C = C0; :mod:`editlib.editors` builds AlphaEdit's and
    ENCORE's operators."""

    @property
    def dim(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def solve(self, K: torch.Tensor) -> torch.Tensor: ...


_BLOCK = 2048  # rows per block when checking / symmetrising C0 without a full-size temporary


def _check_cov(C0: torch.Tensor) -> None:
    if not isinstance(C0, torch.Tensor) or C0.dim() != 2 or C0.shape[0] != C0.shape[1]:
        shape = tuple(C0.shape) if isinstance(C0, torch.Tensor) else type(C0).__name__
        raise ValueError(f"C0 must be a square [d_in, d_in] matrix, got {shape}")
    # block by block: no full-size temporary (a float64 |C0| is 1.6 GB at d_in = 14,336)
    blocks = range(0, C0.shape[0], _BLOCK)
    if not all(bool(torch.isfinite(C0[i:i + _BLOCK]).all()) for i in blocks):
        raise ValueError("C0 contains NaN/Inf")
    scale = max(C0[i:i + _BLOCK].abs().max() for i in blocks)
    asym = max((C0[i:i + _BLOCK] - C0[:, i:i + _BLOCK].T).abs().max() for i in range(0, C0.shape[0], _BLOCK))
    if asym > _SYM_RTOL * scale:
        raise ValueError(f"C0 is not symmetric: max|C0 - C0ᵀ| = {asym.item():.3g} "
                         f"(max|C0| = {scale.item():.3g})")


def _symmetrise_(C: torch.Tensor) -> torch.Tensor:
    """C ← (C + Cᵀ)/2 in place, block by block (bitwise the same as the out-of-place formula, without
    a second d_in × d_in float64 matrix: 1.6 GB at d_in = 14336)."""
    n = C.shape[0]
    for i in range(0, n, _BLOCK):
        for j in range(0, i + 1, _BLOCK):
            a, b = C[i:i + _BLOCK, j:j + _BLOCK], C[j:j + _BLOCK, i:i + _BLOCK]
            avg = (a + b.T) / 2
            a.copy_(avg)
            b.copy_(avg.T)
    return C


def _gpu_eig_failure(e: BaseException) -> bool:
    """Whether ``e`` is a GPU eigensolver giving up: no convergence (``LinAlgError``), out of
    memory (the workspace of a 14,336² float64 ``eigh`` beside the model), or a cuSOLVER / MAGMA
    error raised as a plain ``RuntimeError``."""
    if isinstance(e, (torch.linalg.LinAlgError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in ("cusolver", "magma"))


def eig_or_cpu(fn, M: torch.Tensor):
    """``fn(M)`` for a symmetric eigen-routine (``torch.linalg.eigvalsh`` or ``eigh``), retried in
    float64 on the CPU when a GPU eigensolver fails (:func:`_gpu_eig_failure`): cuSOLVER can raise
    on exactly the ill-conditioned systems this study produces (EMMET at λₑ = 0, near-duplicate
    keys; LAPACK on the CPU rarely does), or run out of memory at paper scale, and a diagnostic
    such as cond(D) or AlphaEdit's null space must not stop an experiment. Results come back on
    ``M``'s device; a failure on the CPU, or any other error, is raised as it is."""
    try:
        return fn(M)
    except RuntimeError as e:  # LinAlgError and OutOfMemoryError are RuntimeErrors
        if M.device.type == "cpu" or not _gpu_eig_failure(e):
            raise
        what = ("ran out of memory" if isinstance(e, torch.OutOfMemoryError) else
                "did not converge" if isinstance(e, torch.linalg.LinAlgError) else "failed")
        warnings.warn(f"{fn.__name__} {what} on {M.device} ({e}); recomputed on the CPU",
                      RuntimeWarning, stacklevel=2)
        del e
        if M.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed call's workspace, before the result comes back
        out = fn(M.cpu())
        return tuple(t.to(M.device) for t in out) if isinstance(out, tuple) else out.to(M.device)


def _cond_from_eigs(eigs: torch.Tensor, shift: float = 0.0) -> float:
    """Condition number of a symmetric matrix (+ shift·I) from its eigenvalues; inf if not PD."""
    lo, hi = eigs.min().item() + shift, eigs.max().item() + shift
    return hi / lo if lo > 0 else math.inf


def factor_cov(C0: torch.Tensor, *, compute_cond: bool | str = "estimate",
               device: torch.device | str | None = None, overwrite: bool = False) -> CovFactor:
    """Validate C0 (square, symmetric, finite), symmetrise it and Cholesky-factor it in float64 on
    ``device`` (default: C0's device; give the model's device so every later solve runs there).

    If the factorisation fails, ε·mean(diag C0)·I is added with ε = 1e-10, ×10 per retry, and
    recorded as ``jitter``. ``compute_cond``: "estimate" (default; power iterations on the factor,
    O(d_in²) each), True (exact eigenvalues, O(d_in³): 2 minutes at d_in = 14336 on 2 cores) or
    False. ``overwrite=True`` lets it symmetrise a float64 ``C0`` already on ``device`` in place
    (the caller gives up C0), so only C0 and its factor are ever in memory.
    """
    _check_cov(C0)
    C = C0.to(device=device if device is not None else C0.device, dtype=F64)
    C = _symmetrise_(C) if (overwrite or C is not C0) else (C + C.T) / 2
    cond = _cond_from_eigs(eig_or_cpu(torch.linalg.eigvalsh, C)) if compute_cond is True else math.nan
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) == 0:
        if compute_cond == "estimate":
            cond = cond_estimate(L)
        return CovFactor(L=L, jitter=0.0, cond=cond)
    mean_diag = C.diagonal().mean().item()
    if not mean_diag > 0:
        raise ValueError("C0 has a non-positive mean diagonal; it is not a second-moment matrix")
    # C is this function's own copy (or given up by the caller): jitter goes onto its diagonal in
    # place, each attempt from the saved diagonal (the same numbers as C + jitter·I, without a
    # second and third d_in × d_in matrix: 1.6 GB each at d_in = 14,336)
    diag0 = C.diagonal().clone()
    eps = _COV_EPS0
    for _ in range(_MAX_ATTEMPTS):
        jitter = eps * mean_diag
        C.diagonal().copy_(diag0 + jitter)
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) == 0:
            if compute_cond == "estimate":
                cond = cond_estimate(L)
            warnings.warn(f"C0 is not positive definite; added jitter {jitter:.3g}·I to factor it "
                          f"(cond afterwards ≈ {cond:.3g})", RuntimeWarning, stacklevel=2)
            return CovFactor(L=L, jitter=jitter, cond=cond)
        eps *= 10
    raise ValueError(f"C0 could not be Cholesky-factored even with jitter {jitter:.3g}·I (cond={cond:.3g})")


def cond_estimate(L: torch.Tensor, iters: int = 50, seed: int = 0) -> float:
    """cond(C) of C = L Lᵀ from its Cholesky factor, by power iteration for λ_max and inverse power
    iteration (two triangular solves per step) for λ_min: O(iters·d²) instead of an O(d³)
    eigendecomposition. Both are Rayleigh quotients, so the estimate never exceeds the true
    condition number and is typically within a few per cent of it."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = L.shape[0]
    x = torch.randn(d, 1, generator=g, dtype=F64).to(L.device)
    y = x.clone()
    hi = lo_inv = 0.0
    for _ in range(iters):
        x = x / x.norm()
        cx = L @ (L.T @ x)
        hi = float((x * cx).sum())
        x = cx
        y = y / y.norm()
        cy = _chol_solve(L, y)
        lo_inv = float((y * cy).sum())
        y = cy
    if not (hi > 0 and lo_inv > 0):
        return math.inf
    return hi * lo_inv


# --------------------------------------------------------------------------- the update


@dataclass
class SolveInfo:
    """Diagnostics of one :func:`solve_delta` call (SPEC §3 "Diagnostics", §8.5)."""

    n: int  # number of edits N
    mu: float  # μ added to D
    cond_D: float  # condition number of D + μI before any jitter
    jitter: float  # τ added to D + μI (0 for an exact solve)
    used_jitter: bool
    delta_norm: float  # ‖ΔW‖_F
    cond_solved: float = math.nan  # condition number of the matrix actually factored
    jitter_rel: float = 0.0  # τ / (trace(D + μI)/N)
    jitter_reason: str = ""  # "" | "factorisation failed" | "cond > max_cond" | "LU failed: pseudo-inverse" (solve: reference)
    solve_resid: float = math.nan  # ‖R E‖_F / ‖R‖_F, E = μ(D + μI)⁻¹ + X K − I: how far ΔW is from the method's equations

#: an exact (unjittered) solve whose ``solve_resid`` exceeds this is reported (a warning; batches.parquet):
#: D + μI factored, but too ill-conditioned for float64 to solve it (a numerically singular system)
SOLVE_RESID_WARN = 1e-3


def mu_for(alg: str, mom2_update_weight: float, emmet_lambda: float = 0.0) -> float:
    """μ of the shared formula for each method (SPEC §1B, §2, §3). AlphaEdit and ENCORE put their
    weights into the preservation operator instead of C0 (:mod:`editlib.editors`), so μ = 1:
    R (KᵀC⁻¹K + I)⁻¹ (C⁻¹K)ᵀ = R Kᵀ (C + KKᵀ)⁻¹."""
    alg = alg.lower()
    if alg == "rome":
        return 0.0
    if alg == "memit":
        return float(mom2_update_weight)
    if alg == "emmet":
        return float(mom2_update_weight) * float(emmet_lambda)
    if alg in ("alphaedit", "encore"):
        return 1.0
    raise ValueError(f"unknown algorithm {alg!r}; expected 'rome', 'memit', 'emmet', 'alphaedit' or 'encore'")


def check_solve(solve: str, max_cond: float | None) -> None:
    """``solve`` is one of :data:`SOLVES`, and ``max_cond`` (which regularises the exact solve) is
    not set beside ``reference``: ValueError otherwise."""
    if solve not in SOLVES:
        raise ValueError(f"solve must be one of {SOLVES}, got {solve!r}")
    if solve == "reference" and max_cond is not None:
        raise ValueError("max_cond regularises the exact solve: it cannot be set with solve: reference")


def _check_inputs(R: torch.Tensor, K: torch.Tensor, cov: Preservation, mu: float) -> None:
    if R.dim() != 2 or K.dim() != 2:
        raise ValueError(f"residual R and keys K must be 2-D, got R {tuple(R.shape)}, K {tuple(K.shape)}")
    if R.shape[1] != K.shape[1]:
        raise ValueError(f"residual R {tuple(R.shape)} and keys K {tuple(K.shape)} have different "
                         "numbers of columns N")
    if K.shape[0] != cov.dim:
        raise ValueError(f"keys K {tuple(K.shape)} do not match C0 [{cov.dim}, {cov.dim}]")
    if K.shape[1] == 0:
        raise ValueError("no edits: keys K have zero columns")
    for name, t in (("residual R", R), ("keys K", K)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf")
    if not (math.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be finite and >= 0, got {mu}")


def _given_or_solved(A: torch.Tensor | None, K: torch.Tensor, cov: Preservation) -> torch.Tensor:
    """``cov.solve(K)``, or the caller's copy of it after a check of its shape, dtype and device."""
    if A is None:
        return cov.solve(K)
    if tuple(A.shape) != tuple(K.shape) or A.dtype != F64 or A.device != cov.device:
        raise ValueError(f"a precomputed C⁻¹K must be float64 {tuple(K.shape)} on {cov.device}, got "
                         f"{A.dtype} {tuple(A.shape)} on {A.device}")
    return A


def solved_keys(memo: dict, cov: Preservation, K: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """``cov.solve(K[:, cols])``, remembered in ``memo`` for the next call with the same operator
    (by identity) and columns. One entry, so memory stays one [d_in, N] float64 block: ROME, MEMIT
    and EMMET solving the same singular keys at a layer, and every λ of a sweep on one batch, then
    pay for one multi-right-hand-side solve (issue #13). Same call, same bits as solving again.
    The operator is held by a weak reference, so a remembered solve never keeps a C0 factor
    (1.6 GB at d_in = 14336) alive."""
    cols = tuple(int(c) for c in cols)
    ref = memo.get("cov")
    if ref is None or ref() is not cov or memo.get("cols") != cols:
        memo.clear()
        memo.update(cov=weakref.ref(cov), cols=cols, A=cov.solve(K[:, list(cols)]))
    return memo["A"]


@dataclass
class _Factored:
    L: torch.Tensor  # the Cholesky factor (exact), or LU's factors (reference), or the pseudo-inverse
    cond: float
    tau: float = 0.0
    cond_after: float = math.nan
    scale: float = 1.0
    reason: str = ""
    how: str = "cholesky"  # "cholesky" | "lu" | "pinv"
    pivots: torch.Tensor | None = None

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """(the factored matrix)⁻¹ B."""
        if self.how == "cholesky":
            return torch.cholesky_solve(B, self.L)
        if self.how == "lu":
            return torch.linalg.lu_solve(self.L, self.pivots, B)
        return self.L @ B


def _factor_reference(M: torch.Tensor) -> _Factored:
    """EMMET's solve of D + μI as the reference code does it (SPEC §3 step 5): LU with partial
    pivoting, the factorisation ``torch.inverse`` takes, of D as computed (not symmetrised), and its
    pseudo-inverse only where LU fails (an exactly zero pivot). Not bit for bit: the reference
    multiplies by the explicit inverse, and its C0⁻¹K comes from ``torch.inverse(C)``; on a singular
    D both are rounding, which is the behaviour this shows, not its bits."""
    eigs = eig_or_cpu(torch.linalg.eigvalsh, (M + M.T) / 2)  # cond(D): of its symmetric part
    cond = _cond_from_eigs(eigs)
    LU, piv, info = torch.linalg.lu_factor_ex(M)
    scale = M.diagonal().sum().item() / M.shape[0]
    if int(info) == 0:
        return _Factored(LU, cond, 0.0, cond, scale, how="lu", pivots=piv)
    return _Factored(torch.linalg.pinv(M), cond, 0.0, cond, scale, "LU failed: pseudo-inverse", how="pinv")


def _factor_small(M: torch.Tensor, max_cond: float | None) -> _Factored:
    """Cholesky of the N×N system M = D + μI (SPEC §3, §8.5).

    Exact whenever M factors in float64 (the reference's behaviour). Jitter τ·I, from
    1e-12·trace(M)/N and ×10 per retry, only when the factorisation fails or — opt-in — while
    cond(M + τI) > ``max_cond``.
    """
    eigs = eig_or_cpu(torch.linalg.eigvalsh, M)
    cond = _cond_from_eigs(eigs)
    L, info = torch.linalg.cholesky_ex(M)
    n = M.shape[0]
    scale = M.diagonal().sum().item() / n
    failed = int(info) != 0
    if not failed and (max_cond is None or cond <= max_cond):
        return _Factored(L, cond, 0.0, cond, scale)
    if not scale > 0:
        raise ValueError("D + μI has a non-positive trace: the keys are all zero")
    eye = torch.eye(n, dtype=F64, device=M.device)
    tau = _D_TAU0 * scale
    for _ in range(_MAX_ATTEMPTS + 4):
        L, info = torch.linalg.cholesky_ex(M + tau * eye)
        cond_j = _cond_from_eigs(eigs, shift=tau)
        if int(info) == 0 and (max_cond is None or cond_j <= max_cond):
            return _Factored(L, cond, tau, cond_j, scale,
                             "factorisation failed" if failed else "cond > max_cond")
        tau *= 10
    raise ValueError(f"D + μI (cond={cond:.3g}) stays singular even with jitter {tau / 10:.3g}·I")


def solve_factors(R: torch.Tensor, K: torch.Tensor, cov: Preservation, mu: float, *,
                  max_cond: float | None = None, A: torch.Tensor | None = None, solve: str = "exact"
                  ) -> tuple[torch.Tensor, SolveInfo]:
    """The right factor X = (D + μI)⁻¹ (C0⁻¹K)ᵀ ([N, d_in], float64) of ΔW = R X, without forming
    the d_out × d_in update (SPEC §2–3). ``info.delta_norm`` is ‖R X‖_F from N×N products.

    ``cov`` is C0's factor or another editor's preservation operator (:class:`Preservation`).
    The N×N system is solved exactly unless it cannot be factored (then jitter, with a warning
    and ``info.used_jitter``); ``max_cond`` opts into regularising every system whose condition
    number exceeds it; ``solve="reference"`` solves it as the reference does (LU; its pseudo-inverse
    where LU fails), module docstring. ``A``: ``cov.solve(K)`` when the caller already has it
    (:func:`solved_keys`: the methods, λ of a sweep and batches that solve the same keys share it).
    Raises ValueError on bad shapes / non-finite inputs and FloatingPointError if the result is not
    finite."""
    mu = float(mu)
    check_solve(solve, max_cond)
    _check_inputs(R, K, cov, mu)
    A = _given_or_solved(A, K, cov)  # C0⁻¹K, d_in×N
    K = K.to(device=cov.device, dtype=F64)
    n = K.shape[1]
    M = K.T @ A + mu * torch.eye(n, dtype=F64, device=cov.device)
    # (the reference's D is not symmetrised: its LU reads it as it comes)
    f = _factor_small((M + M.T) / 2, max_cond) if solve == "exact" else _factor_reference(M)
    if f.how == "pinv":
        warnings.warn(f"D + μI (N={n}, μ={mu:g}, cond={f.cond:.3g}) has an exactly zero LU pivot: solved with "
                      f"its pseudo-inverse, as the reference does ({_repeated_keys(K)})", RuntimeWarning, stacklevel=3)
    if f.tau > 0:
        warnings.warn(f"D + μI could not be solved exactly ({f.reason}; N={n}, μ={mu:g}, "
                      f"cond={f.cond:.3g}): REGULARISED with jitter {f.tau:.3g}·I "
                      f"({f.tau / f.scale:.2g} of its mean eigenvalue; cond now {f.cond_after:.3g}). "
                      f"Likely keys sharing a subject's last token ({_repeated_keys(K)}; docs/correctness.md). "
                      "The edit does not satisfy the method's equations exactly; the case rows record it.",
                      RuntimeWarning, stacklevel=3)
    X = f.solve(A.T.contiguous())  # (D + μI)⁻¹ (C0⁻¹K)ᵀ, N×d_in
    Rd = R.to(device=cov.device, dtype=F64)
    if not (torch.isfinite(X).all() and torch.isfinite(Rd).all()):
        raise FloatingPointError(f"ΔW is not finite (N={n}, μ={mu:g}, cond(D+μI)={f.cond:.3g})")
    # how far ΔW = R X is from the method's equations: ΔW (μC0 + KKᵀ) − RKᵀ = R E Kᵀ with
    # E = μ M⁻¹ + X K − I (0 exactly; −τ M⁻¹ under jitter), so ‖R E‖ / ‖R‖ (for μ = 0: ‖ΔW K − R‖ / ‖R‖).
    # A Cholesky can succeed on a numerically singular D + μI and return an update that solves
    # nothing; backward-stable residuals would not show it. (M⁻¹ of the factored matrix: a diagnostic only.)
    eye = torch.eye(n, dtype=F64, device=M.device)
    E = X @ K - eye
    if mu:
        E = E + mu * f.solve(eye)
    resid = float(torch.linalg.matrix_norm(Rd @ E) / torch.linalg.matrix_norm(Rd).clamp(min=1e-300))
    if not resid <= SOLVE_RESID_WARN and f.tau == 0 and f.how != "pinv":  # (the pseudo-inverse has warned)
        warnings.warn(f"D + μI (N={n}, μ={mu:g}, cond={f.cond:.3g}) factored, but ΔW misses the method's "
                      f"equations by {resid:.2g} of ‖R‖: numerically singular ({_repeated_keys(K)}), so the "
                      "written update is inexact (batches.parquet: solve_resid)", RuntimeWarning, stacklevel=3)
    norm_sq = float(((Rd.T @ Rd) * (X @ X.T)).sum().clamp(min=0))
    if not math.isfinite(norm_sq):
        raise FloatingPointError(f"ΔW is not finite (N={n}, μ={mu:g}, cond(D+μI)={f.cond:.3g})")
    info = SolveInfo(n=n, mu=mu, cond_D=f.cond, jitter=f.tau, used_jitter=f.tau > 0,
                     delta_norm=math.sqrt(norm_sq), cond_solved=f.cond_after,
                     jitter_rel=f.tau / f.scale if f.tau > 0 else 0.0, jitter_reason=f.reason,
                     solve_resid=resid)
    return X, info


def _repeated_keys(K: torch.Tensor) -> str:
    """How many of the batch's keys repeat an earlier one bit for bit (facts that share their
    subject and the prompt before it: D + μI is then singular at μ = 0), for the warnings."""
    n = K.shape[1] - torch.unique(K.T, dim=0).shape[0]
    return f"{n} of the {K.shape[1]} keys repeat an earlier key bit for bit" if n else "no key repeats another bit for bit"


def solve_rank_one(R: torch.Tensor, K: torch.Tensor, cov: Preservation, mu: float, *,
                   A: torch.Tensor | None = None) -> tuple[torch.Tensor, list[str], list[float]]:
    """N independent singular edits at once (SPEC §1B, §2: N = 1 each): one multi-right-hand-side
    solve A = C0⁻¹K, then x_i = A_iᵀ / (k_iᵀA_i + μ), so ΔW_i = r_i x_i. Returns X [N, d_in]
    (float64), per edit "" or why it cannot be solved (k_iᵀC0⁻¹k_i + μ not positive, or a
    non-finite result: :func:`solve_delta` on that edit alone would raise), and per edit the
    relative residual of its 1×1 system (``SolveInfo.solve_resid``). ``A``: ``cov.solve(K)`` when
    the caller already has it (as :func:`solve_factors`)."""
    mu = float(mu)
    _check_inputs(R, K, cov, mu)
    A = _given_or_solved(A, K, cov)
    q = (K.to(device=cov.device, dtype=F64) * A).sum(0) + mu
    X = (A / q).T.contiguous()
    # per edit, SolveInfo.solve_resid of its 1×1 system: |E| with E = μ/q + x_iᵀk_i − 1 (‖r E‖ / ‖r‖ = |E|)
    resid = ((X * K.to(device=cov.device, dtype=F64).T).sum(1) - 1 + mu / q).abs().tolist()
    Rd = R.to(device=cov.device, dtype=F64)
    finite = torch.isfinite(X).all(1) & torch.isfinite(Rd).all(0)
    reasons = ["" if (qi > 0 and ok) else
               ("the closed-form update failed: kᵀC0⁻¹k + μ is not positive" if not qi > 0 else
                "the closed-form update failed: ΔW is not finite")
               for qi, ok in zip(q.tolist(), finite.tolist())]
    return X, reasons, resid


def solve_delta(R: torch.Tensor, K: torch.Tensor, cov: Preservation, mu: float, *,
                max_cond: float | None = None, solve: str = "exact") -> tuple[torch.Tensor, SolveInfo]:
    """ΔW = R (D + μI)⁻¹ (C0⁻¹K)ᵀ in float64 (SPEC §2–3); returns ``(ΔW [d_out, d_in], info)``.

    ROME: N = 1, μ = 0. MEMIT: μ = mom2_update_weight. EMMET: μ = mom2_update_weight·emmet_lambda.
    Computed on ``cov``'s device (see :func:`solve_factors` for conditioning and errors).
    """
    X, info = solve_factors(R, K, cov, mu, max_cond=max_cond, solve=solve)
    delta = R.to(device=cov.device, dtype=F64) @ X
    if not torch.isfinite(delta).all():
        raise FloatingPointError(f"ΔW is not finite (N={info.n}, μ={info.mu:g}, cond(D+μI)={info.cond_D:.3g})")
    info.delta_norm = torch.linalg.matrix_norm(delta).item()
    return delta, info


def memit_normal_equations_residual(delta: torch.Tensor, R: torch.Tensor, K: torch.Tensor,
                                    C0: torch.Tensor, lam: float) -> float:
    """‖ΔW(λC0 + KKᵀ) − RKᵀ‖_F / ‖RKᵀ‖_F: how well ΔW solves MEMIT's normal equations (SPEC §2)."""
    delta, R, K, C0 = (t.to(F64) for t in (delta, R, K, C0))
    rhs = R @ K.T
    lhs = delta @ (lam * C0 + K @ K.T)
    return (torch.linalg.matrix_norm(lhs - rhs) / torch.linalg.matrix_norm(rhs)).item()
