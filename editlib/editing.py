"""ROME, MEMIT, EMMET, AlphaEdit and ENCORE as one algorithm (SPEC §1B, §2, §3; issue #15).

All share keys (:mod:`editlib.reprs`), values (:mod:`editlib.values`) and the closed-form solver
ΔW = R (KᵀC⁻¹K + μI)⁻¹ (C⁻¹K)ᵀ (:mod:`editlib.solver`); they differ only in μ and C:

* ROME ("unified ROME", what the paper ran): C = C0, N = 1, μ = 0;
* MEMIT: C = C0, μ = mom2_update_weight (the paper's λ), multi-layer with residual spreading;
* EMMET: C = C0, μ = mom2_update_weight · emmet_lambda (λ = 0: the equality constraint W'K = WK + R);
* AlphaEdit: C⁻¹ = AlphaEdit's null-space operator (L2, nullspace_threshold), μ = 1;
* ENCORE: C = mom2_update_weight·C0 + update_norm_lambda·I (+ earlier edits' keys), μ = 1, with
  most-probable early stopping of the values (:mod:`editlib.editors` has both).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch

from .arch import n_layers
from .context import ContextTemplates, check_context_text
from .editors import NullSpaceError, PriorKeys, encore_delta_bound, preservation
from .records import Record
from .reprs import compute_keys, current_values
from .solver import CovFactor, check_solve, mu_for, solve_factors
from .values import ValueHParams, ValueResult, compute_values
from .weights import EditSession

METHODS = ("rome", "memit", "emmet", "alphaedit", "encore")
#: hyperparameters of one method only: left out of the other methods' ``to_dict`` (so results
#: of the methods that predate them keep their parameter digests)
METHOD_ONLY = {"L2": "alphaedit", "nullspace_threshold": "alphaedit",
               "update_norm_lambda": "encore", "add_prev_edits": "encore"}


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
    # how their sampled texts are decoded (editlib.context): "clean" (special tokens skipped, SPEC
    # §8.3) or "reference" (as the reference's generate_fast: Llama-3 templates keep a literal
    # <|begin_of_text|>, so keys and values read two BOS tokens, as the paper's did)
    context_text: str = "clean"
    max_cond: float | None = None     # opt-in: regularise D + μI above this cond (default: exact, SPEC §3, §8.5)
    # how D + μI is solved (editlib.solver.SOLVES): "exact" (Cholesky, jitter only where it fails:
    # SPEC §8.5) or "reference" (LU, a pseudo-inverse only where LU fails: the reference's
    # torch.inverse, which a singular D from duplicated keys blows up instead of failing)
    solve: str = "exact"
    # AlphaEdit (editlib.editors): α of (P(KKᵀ + K_pK_pᵀ) + αI)Δᵀ = PKRᵀ, and the share of C0's
    # trace (E‖k‖²) in its null space P (relative, where the official code uses an absolute 2e-2)
    L2: float = 10.0
    nullspace_threshold: float = 1e-2
    # ENCORE (editlib.editors): λ_n of the norm penalty λ_n‖ΔW‖² (C = λ_p C0 + λ_n I), and whether
    # the keys edited earlier in a sequential run join the preserved ones (the official configs: 20, true)
    update_norm_lambda: float = 20.0
    add_prev_edits: bool = True

    def __post_init__(self):
        if self.context_templates not in ("memit", "rome", "plain"):
            raise ValueError(f"context_templates must be 'memit', 'rome' or 'plain', got {self.context_templates!r}")
        check_context_text(self.context_text)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        if self.method in ("rome", "emmet") and len(self.layers) != 1:
            raise ValueError(f"{self.method} edits a single layer, got layers={list(self.layers)}")
        check_solve(self.solve, self.max_cond)
        if self.mom2_update_weight < 0 or self.emmet_lambda < 0:
            raise ValueError("mom2_update_weight and emmet_lambda must be >= 0")
        if not (isinstance(self.L2, (int, float)) and math.isfinite(self.L2) and self.L2 > 0):
            raise ValueError(f"L2 (AlphaEdit's α) must be a finite number > 0, got {self.L2!r}")
        if not (isinstance(self.nullspace_threshold, (int, float)) and 0 < self.nullspace_threshold <= 1):
            raise ValueError(f"nullspace_threshold (share of C0's trace in AlphaEdit's null space) must be "
                             f"in (0, 1], got {self.nullspace_threshold!r}")
        if not (isinstance(self.update_norm_lambda, (int, float)) and math.isfinite(self.update_norm_lambda)
                and self.update_norm_lambda >= 0):
            raise ValueError(f"update_norm_lambda (ENCORE's λ_n) must be a finite number >= 0, "
                             f"got {self.update_norm_lambda!r}")
        if not isinstance(self.add_prev_edits, bool):
            raise ValueError(f"add_prev_edits must be true or false, got {self.add_prev_edits!r}")
        if self.method == "encore" and not self.mom2_update_weight + self.update_norm_lambda > 0:
            raise ValueError("encore needs mom2_update_weight > 0 or update_norm_lambda > 0 "
                             "(its preservation matrix would be zero)")

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
        """All fields, less those of other methods only (:data:`METHOD_ONLY`), the value
        optimisation's MPES knobs when a method other than ENCORE stops on the loss (its
        default), ``solve`` and ``context_text`` at their defaults and ``compile_blocks`` /
        ``capture_steps`` when off, so a method's parameter digest depends only on what it uses
        and the digests of results stored before a key existed stay valid."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        for k, m in METHOD_ONLY.items():
            if m != self.method:
                d.pop(k)
        if self.values.early_stop == "loss" and self.method != "encore":
            for k in ("early_stop", "mpes_hits"):
                d["values"].pop(k)
        for k, default in (("solve", "exact"), ("context_text", "clean")):  # as every stored result
            if d[k] == default:                                                  # ran: its digest is unchanged
                d.pop(k)
        if self.context_templates == "plain":  # no sampled text to decode: the same edits either way
            d.pop("context_text", None)
        for k, off in (("compile_blocks", "off"), ("capture_steps", False)):  # eager steps, as every stored
            if d["values"][k] == off:                                          # result: its digest is unchanged
                d["values"].pop(k)
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
        if d.get("method") == "encore":  # ENCORE = MPES values + the norm-constrained solve
            vals.setdefault("early_stop", "mpes")
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
    batches (1 for singular edits), EMMET λ = 0. AlphaEdit and ENCORE: their official Llama-3-8B
    solve settings (L2 = 10; λ_p = 15000, λ_n = 20, previous edits preserved) and, for ENCORE,
    MPES; AlphaEdit's nullspace_threshold is relative here (:func:`editlib.editors.nullspace`)."""
    base = {"rome": {}, "memit": {"mom2_update_weight": 5e4}, "emmet": {"emmet_lambda": 0.0},
            "alphaedit": {"L2": 10.0},
            "encore": {"mom2_update_weight": 15000.0, "update_norm_lambda": 20.0, "add_prev_edits": True,
                       "values": ValueHParams(early_stop="mpes")}}[method]
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
    # C⁻¹K of the last solved columns (solver.solved_keys); a slice or copy starts empty
    solved: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
    nullspace_frac: float = math.nan    # AlphaEdit: fraction of C0's eigenvectors in its null space P
    nullspace_energy: float = math.nan  # AlphaEdit: share of trace C0 (E‖k‖²) in P
    prior_keys: int = 0                 # AlphaEdit / ENCORE: keys of earlier edits in the run (K_p)
    delta_bound: float = math.nan       # ENCORE: ‖R‖_F / (2√λ_n) ≥ ‖ΔW‖_F
    solve_resid: float = math.nan       # largest relative residual of the N×N solve over the layers (solver.SolveInfo)

    def to_dict(self) -> dict:
        return asdict(self)


def _synced_time(device: torch.device) -> float:
    """``time.time()`` once ``device`` has finished its queued work: CUDA kernels run
    asynchronously, so without it a phase's GPU time is counted in the next phase that waits for
    the device (the keys' in the solve, a weight write in the evaluation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def prepare_targets(model, tok, records: Sequence[Record], hp: EditHParams, contexts: ContextTemplates,
                    *, values: ValueResult | None = None, log=None, store=None) -> BatchTargets:
    """Values at the last edited layer, keys at the first, residuals on the current model.
    ``store``: an :class:`editlib.valuestore.ValueStore` the values are read from and kept in."""
    z_layer = max(hp.layers)
    vals = values if values is not None else compute_values(model, tok, records, z_layer, contexts, hp.values,
                                                           log=log, store=store)
    t0 = time.time()
    layer = min(hp.layers)
    K = compute_keys(model, tok, records, layer, contexts)
    _, h = current_values(model, tok, records, z_layer)
    # z comes back on the CPU, h on the model's device: the residual lives with the keys (the solve's device)
    R = vals.z.to(h.device) - h
    return BatchTargets(layer=layer, K=K, R=R, values=vals, seconds_keys=_synced_time(R.device) - t0)


def apply_edit(model, tok, records: Sequence[Record], hp: EditHParams, covs: dict[int, CovFactor],
               contexts: ContextTemplates, session: EditSession, *, targets: BatchTargets | None = None,
               log=None, prior: PriorKeys | None = None) -> EditStats:
    """Edit ``records`` into the model through ``session`` (restorable). Multi-layer edits spread
    the residual over the layers, recomputing keys and residuals after each layer (SPEC §2).

    ``prior``: a sequential run's keys of earlier edits (AlphaEdit's K_p, ENCORE's previous edits;
    :func:`editlib.editors.run_state`); this batch's keys are added to it once all its layers are
    written. Every update goes through ``session.apply_factors`` (NaN/Inf refused before a write);
    a failure leaves neither the weights nor ``prior`` changed."""
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
    total_delta_sq, info, jit, jit_rel, resid = 0.0, None, 0.0, 0.0, 0.0
    bound_sq, extra, used_keys = 0.0, {}, []
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
                R = z.to(h.device) - h
                t_keys += _synced_time(R.device) - t0
            t0 = time.time()
            Ri = R / (len(layers) - i)
            op, mu, extra = preservation(hp, covs[layer], prior, layer)
            X, info = solve_factors(Ri, K, op, mu, max_cond=hp.max_cond, solve=hp.solve)
            session.apply_factors(layer, Ri, X)  # ΔW = R X, never a dense float64 d_out × d_in
            t_solve += _synced_time(X.device) - t0
            total_delta_sq += info.delta_norm ** 2
            jit, jit_rel = max(jit, info.jitter), max(jit_rel, info.jitter_rel)
            if not info.solve_resid <= resid:  # a NaN residual is kept, never read as exact
                resid = info.solve_resid
            used_keys.append((layer, K))
            if hp.method == "encore":
                bound_sq += encore_delta_bound(Ri, hp.update_norm_lambda) ** 2
    except (ValueError, FloatingPointError) as e:
        for l, m in saved.items():
            session.set_master(l, m)
        del session.factor_log[n_logged:]  # rolled back: not part of the model any more
        if isinstance(e, NullSpaceError):  # the run's parameters, not this batch: stop
            raise
        raise EditFailed(f"the closed-form update failed: {e}") from e
    if prior is not None:  # the run's K_p grows only by edits that were written
        for layer, K in used_keys:
            prior.add(layer, K)
    dist, rel = session.distance(layers[0])
    return EditStats(
        n=len(records), layer=layers[0], mu=hp.mu, n_failed=int((~ok).sum()), cond_D=info.cond_D, jitter=jit, jitter_rel=jit_rel,
        delta_norm=total_delta_sq ** 0.5, w_dist=dist, w_rel_dist=rel,
        mean_resid_norm=float(tg.R[:, ok].norm(dim=0).mean()),
        mean_value_steps=float(tg.values.steps[ok].float().mean()),
        seconds_values=tg.values.seconds, seconds_keys=t_keys, seconds_solve=t_solve,
        delta_bound=bound_sq ** 0.5 if hp.method == "encore" else math.nan, solve_resid=resid, **extra)
