"""AlphaEdit and ENCORE: the shared closed-form solve with another preservation term (issue #15).

The solver (:mod:`editlib.solver`) computes ΔW = R X, X = (KᵀC⁻¹K + μI)⁻¹ (C⁻¹K)ᵀ, for whatever
preservation operator C⁻¹ it is handed. With μ = 1 this is ΔW = R Kᵀ (C + KKᵀ)⁻¹: MEMIT's normal
equations (SPEC §2, paper eq. 5) with C in place of λC0. Keys K, values and residuals R are
MEMIT's (:func:`editlib.editing.prepare_targets`); the two newer editors differ only in C:

* **AlphaEdit** (Fang et al., ICLR 2025; official ``AlphaEdit_main.py``) solves, for keys
  K ∈ R^{d_in×N} of a weight W [d_out, d_in] acting on k ∈ R^{d_in},

      (P (K Kᵀ + K_p K_pᵀ) + α I) Δᵀ = P K Rᵀ,   W ← W + Δ P,

  with P = Û Ûᵀ the projector onto the null space of the preserved keys (Û: eigenvectors of C0
  with negligible eigenvalues, :func:`nullspace`), K_p the keys edited earlier in the sequential
  run and α = ``L2``. For α > 0 every solution has Δᵀ = Û Y, and with G = ÛᵀK and
  B = Ûᵀ K_p K_pᵀ Û + α I the push-through identity gives Δ = R (KᵀQK + I)⁻¹ (QK)ᵀ with
  Q = Û B⁻¹ Ûᵀ: the shared formula with C⁻¹ := Q and μ = 1 (:class:`NullSpaceOperator`). So Δ
  is low-rank R X (rank ≤ N) and its rows lie in span(Û): Δ P = Δ and Δ k = 0 for every k ⟂ Û,
  i.e. for every key in the span of C0's kept (large-eigenvalue) eigenvectors. Only an r × r
  system (r = dim Û) is factored per batch; Û is computed once per layer (one ``eigh`` of C0) and
  cached with C0's factor.

* **ENCORE** (Gupta et al. 2025, "Lifelong Sequential Knowledge Editing without Model
  Degradation", arXiv 2502.01636; official ``encore_main.py`` and ``hparams/ENCORE/*.json``)
  adds to MEMIT's objective a Frobenius-norm penalty λ_n ‖Ŵ − W‖² on the change of the edited
  matrix (``update_norm_lambda``) and, with ``add_prev_edits``, the previously edited keys to
  the preserved ones:

      min_Ŵ λ_p ‖(Ŵ − W) K0‖² + ‖(Ŵ − W) K_p‖² + λ_n ‖Ŵ − W‖² + ‖Ŵ K − V‖²
      ⇒ ΔW = R Kᵀ (λ_p C0 + K_p K_pᵀ + λ_n I + K Kᵀ)⁻¹,   λ_p = mom2_update_weight,

  i.e. C := λ_p C0 + λ_n I + K_p K_pᵀ (:func:`encore_operator`), μ = 1. W is the matrix before the
  batch, as in the official code (``cov += update_norm_lambda·I``), so the penalty bounds every
  batch's update: C ⪰ λ_n I gives ‖ΔW‖_F ≤ ‖R‖_F / (2√λ_n) (:func:`encore_delta_bound`), and over
  a sequential run ‖W_T − W_0‖_F ≤ Σ_t ‖R_t‖_F / (2√λ_n). Its other half, most-probable early
  stopping, lives in the value optimisation (:mod:`editlib.values`, ``early_stop: mpes``).

The formulas follow the official code (read, not copied) and are derived again above;
tests/test_editors.py checks them against plain float64 re-derivations.

Per-run state (:class:`PriorKeys`, :func:`run_state`): the keys K_p of every fact edited earlier in
a sequential run, as a Gram matrix per layer in the coordinates the editor needs. The batch
protocol starts every batch from the unedited model, so it passes no state (K_p = 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .solver import CovFactor, Preservation, eig_or_cpu, factor_cov

__all__ = ["NullSpace", "NullSpaceError", "NullSpaceOperator", "PriorKeys", "encore_delta_bound", "encore_operator",
           "nullspace", "preservation", "run_state", "uses_prior_keys"]

F64 = torch.float64


# --------------------------------------------------------------------------- AlphaEdit


@dataclass(frozen=True)
class NullSpace:
    """Û: the eigenvectors of C0 that AlphaEdit's update may use (float64 [d_in, r], orthonormal,
    on C0's factor's device), and how much of C0's spectrum they hold."""

    U: torch.Tensor
    threshold: float
    dims: int      # r
    frac: float    # r / d_in: the fraction of the spectrum (eigenvectors) kept in P
    energy: float  # Σ_null eigenvalues / trace C0: the share of the preserved keys' E‖k‖² in P


class NullSpaceError(ValueError):
    """AlphaEdit's ``nullspace_threshold`` leaves no direction for the update on this C0: a
    parameter problem of the whole run (one line, exit 2), not a failed edit."""


def nullspace(cov: CovFactor, threshold: float) -> NullSpace:
    """The null space of the preserved keys for ``nullspace_threshold`` (cached on ``cov``).

    The official code keeps the eigenvectors whose eigenvalue (singular value of C0) is below an
    *absolute* 2e-2, tuned to its models' C0 scale. Here the threshold is relative: Û holds the
    smallest-eigenvalue eigenvectors whose eigenvalues sum to at most ``threshold`` × trace(C0),
    the largest such set. Why: trace(C0) = E‖k‖², so the threshold is the share of the preserved
    keys' energy that the update may touch (E‖ΔW k‖² ≤ ‖ΔW‖₂² · threshold · E‖k‖²), whatever the
    scale of the model's activations. A threshold relative to the *largest* eigenvalue would not
    do: C0's top eigenvalues are outliers (on the miniature λ_max is 100–300 × the mean
    eigenvalue), so such a threshold swings from no null space to almost all of the spectrum
    within one decade. ``frac`` / ``energy`` report what was kept.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"nullspace_threshold must be in (0, 1], got {threshold}")
    key = ("nullspace", float(threshold))
    if key not in cov.cache:
        e, V = eig_or_cpu(torch.linalg.eigh, cov.matrix())  # ascending, float64, on the factor's device
        e = e.clamp(min=0)
        total = float(e.sum())
        if not total > 0:
            raise NullSpaceError("C0 has a zero trace: no preserved keys to define a null space")
        cum = torch.cumsum(e, 0) / total
        # 1 keeps every direction: the running sum's last entry can round a hair above 1
        r = e.shape[0] if threshold >= 1 else int((cum <= threshold).sum())
        if r == 0:
            raise NullSpaceError(f"hparams.alphaedit.nullspace_threshold={threshold:g} keeps no direction: "
                                 f"C0's smallest eigenvalue alone holds {float(e[0]) / total:.3g} of its "
                                 "trace (raise the threshold)")
        # only Û is kept (not all d_in eigenvectors: 1.6 GB at d_in = 14,336)
        cov.cache[key] = NullSpace(U=V[:, :r].contiguous(), threshold=float(threshold), dims=r,
                                   frac=r / e.shape[0], energy=float(cum[r - 1]))
        del e, V
    return cov.cache[key]


@dataclass
class NullSpaceOperator:
    """AlphaEdit's preservation operator Q = Û (Ûᵀ K_p K_pᵀ Û + α I)⁻¹ Ûᵀ (module docstring).

    ``prior_gram`` is Ûᵀ K_p K_pᵀ Û (r × r, :class:`PriorKeys`); without it Q = P / α."""

    U: torch.Tensor
    alpha: float
    prior_gram: torch.Tensor | None = None
    _L: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"AlphaEdit needs L2 > 0 (P(KKᵀ) + αI is singular otherwise), got {self.alpha}")
        if self.prior_gram is not None:
            B = self.prior_gram.to(device=self.U.device, dtype=F64).clone()
            B = (B + B.T) / 2
            B.diagonal().add_(self.alpha)
            L, info = torch.linalg.cholesky_ex(B)
            if int(info) != 0 or not torch.isfinite(L).all():
                raise ValueError("Ûᵀ K_p K_pᵀ Û + αI could not be factored (non-finite prior keys?)")
            self._L = L

    @property
    def dim(self) -> int:
        return int(self.U.shape[0])

    @property
    def device(self) -> torch.device:
        return self.U.device

    def solve(self, K: torch.Tensor) -> torch.Tensor:
        """Q K (float64, [d_in, N])."""
        K = K.to(device=self.U.device, dtype=F64)
        if K.dim() != 2 or K.shape[0] != self.dim:
            raise ValueError(f"keys K must be [{self.dim}, N], got shape {tuple(K.shape)}")
        G = self.U.T @ K
        Y = G / self.alpha if self._L is None else torch.cholesky_solve(G, self._L)
        return self.U @ Y


# --------------------------------------------------------------------------- ENCORE


def encore_operator(cov: CovFactor, mom2_update_weight: float, update_norm_lambda: float,
                    prior_gram: torch.Tensor | None = None) -> CovFactor:
    """The Cholesky factor of ENCORE's C = λ_p C0 + λ_n I (+ K_p K_pᵀ) (module docstring).

    Without prior keys it is cached on ``cov`` per (λ_p, λ_n); with them it is factored afresh
    (one d_in × d_in Cholesky per sequential batch, as the official code's solve), from λ_p C0 +
    λ_n I kept on ``cov`` (rebuilding it took a d_in³ product per batch: ~0.15 s on an H200 at
    d_in = 14,336, 4,096 times in a one-fact run)."""
    lp, ln = float(mom2_update_weight), float(update_norm_lambda)
    if lp < 0 or ln < 0 or not lp + ln > 0:
        raise ValueError(f"ENCORE needs mom2_update_weight >= 0, update_norm_lambda >= 0 and not both 0 "
                         f"(got {lp:g}, {ln:g})")
    def base() -> torch.Tensor:  # λ_p C0 + λ_n I, a fresh d_in × d_in matrix
        C = cov.matrix()
        C.mul_(lp)
        C.diagonal().add_(ln)
        return C

    if prior_gram is None:  # batch / singular edits, or no earlier keys: one factor per (λ_p, λ_n)
        fkey = ("encore_factor", lp, ln)
        if fkey not in cov.cache:
            cov.cache[fkey] = factor_cov(base(), compute_cond=False, overwrite=True)
        return cov.cache[fkey]
    bkey = ("encore_base", lp, ln)  # a sequential run with earlier keys: factored afresh each batch
    if bkey not in cov.cache:
        cov.cache[bkey] = base()
    C = cov.cache[bkey].clone()
    C += prior_gram.to(device=cov.device, dtype=F64)
    return factor_cov(C, compute_cond=False, overwrite=True)


def encore_delta_bound(R: torch.Tensor, update_norm_lambda: float) -> float:
    """‖R‖_F / (2√λ_n): ENCORE's bound on ‖ΔW‖_F for residuals R (C ⪰ λ_n I; inf for λ_n = 0)."""
    if not update_norm_lambda > 0:
        return math.inf
    return float(R.to(F64).norm()) / (2 * math.sqrt(update_norm_lambda))


# --------------------------------------------------------------------------- per-run state


@dataclass
class PriorKeys:
    """K_p: the keys of the facts edited earlier in one sequential run, per edited layer, kept as
    the Gram matrix G = (BᵀK_p)(BᵀK_p)ᵀ in the editor's coordinates B (AlphaEdit: Û, r × r;
    ENCORE: the identity, d_in × d_in). :meth:`add` is called once a batch's update is written;
    ``log`` holds the keys added since :meth:`take_log` (the sequential checkpoint replays them)."""

    basis: dict[int, torch.Tensor | None]
    device: dict[int, torch.device] = field(default_factory=dict)  # where each layer's Gram lives (C0's factor)
    gram: dict[int, torch.Tensor] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    log: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def add(self, layer: int, K: torch.Tensor) -> None:
        if layer not in self.basis:
            raise ValueError(f"no prior-key basis for layer {layer}")
        B = self.basis[layer]
        # on the layer's factor device whatever device K comes from: keys replayed from a
        # checkpoint are on the CPU, live keys on the model's device
        dev = B.device if B is not None else self.device.get(layer, K.device)
        Kd = K.to(device=dev, dtype=F64)
        if not torch.isfinite(Kd).all():
            raise ValueError("refusing to accumulate non-finite keys")
        G = Kd if B is None else B.T @ Kd
        gg = G @ G.T
        if layer in self.gram:
            self.gram[layer].add_(gg)  # in place: ENCORE's d_in × d_in Gram is 1.6 GB at Llama-3-8B
        else:
            self.gram[layer] = gg
        self.count[layer] = self.count.get(layer, 0) + int(K.shape[1])
        self.log.append((layer, K.detach().to(device="cpu", dtype=F64)))

    def take_log(self) -> list[tuple[int, torch.Tensor]]:
        out, self.log = self.log, []
        return out


def uses_prior_keys(hp) -> bool:
    """Whether a sequential run of ``hp`` keeps K_p (AlphaEdit always; ENCORE with add_prev_edits)."""
    return hp.method == "alphaedit" or (hp.method == "encore" and bool(hp.add_prev_edits))


def run_state(hp, covs: dict[int, CovFactor]) -> PriorKeys | None:
    """A fresh per-run state for a sequential run of ``hp`` (None when the method keeps none)."""
    if not uses_prior_keys(hp):
        return None
    basis = {l: (nullspace(covs[l], hp.nullspace_threshold).U if hp.method == "alphaedit" else None)
             for l in hp.layers}
    return PriorKeys(basis=basis, device={l: covs[l].device for l in hp.layers})


def preservation(hp, cov: CovFactor, prior: PriorKeys | None = None,
                 layer: int | None = None) -> tuple[Preservation, float, dict]:
    """The preservation operator, μ and diagnostics of ``hp.method`` at one layer: C0's factor and
    ``hp.mu`` for ROME / MEMIT / EMMET; AlphaEdit's and ENCORE's operators with μ = 1."""
    gram = prior.gram.get(layer) if prior is not None else None
    n_prior = prior.count.get(layer, 0) if prior is not None else 0
    if hp.method == "alphaedit":
        ns = nullspace(cov, hp.nullspace_threshold)
        op = NullSpaceOperator(ns.U, float(hp.L2), gram)
        return op, 1.0, {"nullspace_frac": ns.frac, "nullspace_energy": ns.energy, "prior_keys": n_prior}
    if hp.method == "encore":
        op = encore_operator(cov, hp.mom2_update_weight, hp.update_norm_lambda,
                             gram if hp.add_prev_edits else None)
        return op, 1.0, {"prior_keys": n_prior}
    return cov, hp.mu, {}
