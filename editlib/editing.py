"""ROME, MEMIT and EMMET as one algorithm (SPEC §1B, §2, §3).

All three share keys (:mod:`editlib.reprs`), values (:mod:`editlib.values`) and the closed-form
solver ΔW = R (D + μI)⁻¹ (C0⁻¹K)ᵀ (:mod:`editlib.solver`); they differ only in μ:

* ROME ("unified ROME", what the paper ran): N = 1, μ = 0;
* MEMIT: μ = mom2_update_weight (the paper's λ), multi-layer with residual spreading supported;
* EMMET: μ = mom2_update_weight · emmet_lambda (λ = 0: the equality constraint W'K = WK + R).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from .arch import n_layers
from .context import ContextTemplates
from .records import Record
from .reprs import compute_keys, current_values
from .solver import CovFactor, mu_for, solve_factors
from .values import ValueHParams, ValueResult, compute_values
from .weights import EditSession

METHODS = ("rome", "memit", "emmet")


@dataclass(frozen=True)
class EditHParams:
    """Hyperparameters of one editing method (SPEC §7.1 key names). Defaults: paper-time Llama-3
    reproduction config (SPEC §7.4)."""

    method: str = "memit"
    layers: tuple[int, ...] = (1,)
    values: ValueHParams = field(default_factory=ValueHParams)
    mom2_update_weight: float = 1.0   # MEMIT's λ (paper eq. 4-5)
    emmet_lambda: float = 0.0         # EMMET's λ (paper Table 4); μ = mom2_update_weight · emmet_lambda
    context_templates: str = "memit"  # "memit" (6 in 2 types), "rome" (21) or "plain"
    max_cond: float | None = None     # opt-in: regularise D + μI above this cond (default: exact, SPEC §3, §8.5)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if self.method in ("rome", "emmet") and len(self.layers) != 1:
            raise ValueError(f"{self.method} edits a single layer, got layers={list(self.layers)}")
        if self.mom2_update_weight < 0 or self.emmet_lambda < 0:
            raise ValueError("mom2_update_weight and emmet_lambda must be >= 0")

    @property
    def mu(self) -> float:
        return mu_for(self.method, self.mom2_update_weight, self.emmet_lambda)

    def check_model(self, model) -> None:
        """Fail fast when a layer is outside the model."""
        n = n_layers(model)
        bad = [l for l in self.layers if not 0 <= l < n]
        if bad:
            raise ValueError(f"layer(s) {bad} outside the model's 0..{n - 1} decoder layers")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EditHParams":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        vknown = {f.name for f in fields(ValueHParams)}
        vals = dict(d.pop("values", {}) or {})
        for k in list(d):  # flat keys of the reference JSONs (v_lr, kl_factor, ...) are accepted too
            if k in vknown:
                vals[k] = d.pop(k)
        unknown = sorted(set(d) - known) + sorted(set(vals) - vknown)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {unknown}")
        if "layers" in d:
            d["layers"] = tuple(int(x) for x in (d["layers"] if isinstance(d["layers"], (list, tuple)) else [d["layers"]]))
        return cls(**_coerce(cls, d), values=ValueHParams(**_coerce(ValueHParams, vals)))


def _coerce(cls, d: dict) -> dict:
    """Numbers written as YAML strings (PyYAML reads ``1.0e10`` as a string) become numbers."""
    types = {f.name: str(f.type) for f in fields(cls)}
    out = {}
    for k, v in d.items():
        t = types.get(k, "")
        if isinstance(v, str) and t.startswith(("float", "int")):
            try:
                v = float(v) if t.startswith("float") else int(v)
            except ValueError:
                raise ValueError(f"{k} must be a number, got {v!r}") from None
        out[k] = v
    return out


def paper_llama3(method: str, **over) -> EditHParams:
    """SPEC §7.4: layer 1, 25 steps, lr 0.5, clamp 4, wd 1e-3, kl 0.0625; MEMIT λ = 5e4 for
    batches (1 for singular edits), EMMET λ = 0."""
    base = {"rome": {}, "memit": {"mom2_update_weight": 5e4}, "emmet": {"emmet_lambda": 0.0}}[method]
    return EditHParams(**{"method": method, "layers": (1,), **base, **over})


class EditFailed(RuntimeError):
    """No fact of a batch could be edited (every value failed, or the system could not be solved);
    nothing was written into the model."""


@dataclass
class BatchTargets:
    """What a batch needs before the solve; independent of μ (so λ sweeps re-solve only)."""

    layer: int
    K: torch.Tensor          # [d_in, N] keys
    R: torch.Tensor          # [d, N] residuals z − h at the plain prompt under the current weights
    values: ValueResult
    seconds_keys: float = 0.0

    @property
    def fail_reason(self) -> list[str]:
        """Per fact: "" or why it cannot be edited (its value failed, or its key / residual is not
        finite). Failed facts are left out of the solve and recorded as failed cases."""
        out = []
        for f, r in enumerate(self.values.fail_reason):
            if not r and not bool(torch.isfinite(self.K[:, f]).all()):
                r = "key is not finite"
            elif not r and not bool(torch.isfinite(self.R[:, f]).all()):
                r = "residual z − h is not finite"
            out.append(r)
        return out


@dataclass
class EditStats:
    """Per-batch diagnostics (issue: ‖ΔW‖, distance, cond(D), ‖z − h‖, μ, jitter, timings)."""

    n: int
    layer: int
    mu: float
    n_failed: int        # facts left out of the solve (their value, key or residual failed)
    cond_D: float
    jitter: float       # τ added to D + μI (0: solved exactly, as the reference)
    jitter_rel: float   # τ relative to D + μI's mean eigenvalue
    delta_norm: float
    w_dist: float
    w_rel_dist: float
    mean_resid_norm: float
    mean_value_steps: float
    seconds_values: float
    seconds_keys: float
    seconds_solve: float

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_targets(model, tok, records: Sequence[Record], hp: EditHParams, contexts: ContextTemplates,
                    *, values: ValueResult | None = None, log=None) -> BatchTargets:
    """Values at the last edited layer, keys at the first, residuals on the current model."""
    z_layer = max(hp.layers)
    vals = values if values is not None else compute_values(model, tok, records, z_layer, contexts, hp.values, log=log)
    t0 = time.time()
    layer = min(hp.layers)
    K = compute_keys(model, tok, records, layer, contexts)
    _, h = current_values(model, tok, records, z_layer)
    return BatchTargets(layer=layer, K=K, R=vals.z - h, values=vals, seconds_keys=time.time() - t0)


def apply_edit(model, tok, records: Sequence[Record], hp: EditHParams, covs: dict[int, CovFactor],
               contexts: ContextTemplates, session: EditSession, *, targets: BatchTargets | None = None,
               log=None) -> EditStats:
    """Edit ``records`` into the model through ``session`` (restorable). Multi-layer MEMIT spreads
    the residual over the layers, recomputing keys and residuals after each layer (SPEC §2)."""
    if hp.method == "rome" and len(records) != 1:
        raise ValueError(f"ROME edits one fact at a time, got {len(records)}")
    missing = [l for l in hp.layers if l not in covs]
    if missing:
        raise ValueError(f"no covariance factor for layer(s) {missing}")
    tg = targets or prepare_targets(model, tok, records, hp, contexts, log=log)
    if tg.layer != min(hp.layers) or tg.K.shape[1] != len(records):
        raise ValueError(f"targets were prepared for layer {tg.layer} and {tg.K.shape[1]} facts, not "
                         f"layer {min(hp.layers)} and {len(records)} facts")
    layers = sorted(hp.layers)
    reasons = tg.fail_reason
    ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
    if not ok.any():
        raise EditFailed(f"all {len(records)} facts failed before the solve: {reasons[0]}")
    recs = [r for r, k in zip(records, ok.tolist()) if k]
    z = tg.values.z[:, ok]
    t_keys, t_solve = tg.seconds_keys, 0.0
    total_delta_sq, info, jit, jit_rel = 0.0, None, 0.0, 0.0
    # multi-layer MEMIT writes layer by layer: keep the masters so a failure leaves no half edit
    saved = {l: session.master(l).clone() for l in layers} if len(layers) > 1 else {}
    n_logged = len(session.factor_log)
    try:
        for i, layer in enumerate(layers):
            if i == 0:
                K, R = tg.K[:, ok], tg.R[:, ok]
            else:
                t0 = time.time()
                K = compute_keys(model, tok, recs, layer, contexts)
                _, h = current_values(model, tok, recs, layers[-1])
                R = z - h
                t_keys += time.time() - t0
            t0 = time.time()
            Ri = R / (len(layers) - i)
            X, info = solve_factors(Ri, K, covs[layer], hp.mu, max_cond=hp.max_cond)
            session.apply_factors(layer, Ri, X)  # ΔW = R X, never a dense float64 d_out × d_in
            t_solve += time.time() - t0
            total_delta_sq += info.delta_norm ** 2
            jit, jit_rel = max(jit, info.jitter), max(jit_rel, info.jitter_rel)
    except (ValueError, FloatingPointError) as e:
        for l, m in saved.items():
            session.set_master(l, m)
        del session.factor_log[n_logged:]  # rolled back: not part of the model any more
        raise EditFailed(f"the closed-form update failed: {e}") from e
    dist, rel = session.distance(layers[0])
    return EditStats(
        n=len(records), layer=layers[0], mu=hp.mu, n_failed=int((~ok).sum()), cond_D=info.cond_D, jitter=jit, jitter_rel=jit_rel,
        delta_norm=total_delta_sq ** 0.5, w_dist=dist, w_rel_dist=rel,
        mean_resid_norm=float(tg.R[:, ok].norm(dim=0).mean()),
        mean_value_steps=float(tg.values.steps[ok].float().mean()),
        seconds_values=tg.values.seconds, seconds_keys=t_keys, seconds_solve=t_solve)
