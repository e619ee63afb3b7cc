"""Many independent edits evaluated in one forward pass, without writing a weight (issue #13).

Every edit of the paper's singular and batch protocols starts from the unedited model and changes
one matrix W (the down-projection of layer L) by a low-rank update ΔW_e = R_e X_e (SPEC §2–3: a
singular edit is rank one, r (C0⁻¹k)ᵀ/(kᵀC0⁻¹k + μ); a batch of B facts is rank B). So the edited
module's output for a token of a prompt that belongs to edit e is

    (W + ΔW_e) x = W x + R_e (X_e x),

and a forward pass over the prompts of *many* edits, each row adding its own edit's low-rank term
at that module, gives every edit's outputs at once. :class:`RowDeltas` is that hook: a context
manager on the down-projection that adds, to each row of a batch, the update of the edit the row
belongs to (``hook.rows``, set by the caller before each forward; ``-1`` = unedited). The weights
are never touched, so nothing needs restoring.

The product is formed as (X_e x) first (r_e numbers per token), then R_e times that, in the
activation dtype — the same arithmetic as the edited weight up to rounding (tests: float32
scores within 1e-6 relative, float64 within 1e-10, of editing the weight). Under a 16-bit model
the term and its sum with W x are formed in float32 and rounded once (:func:`term_dtype`): an
intermediate (X_e x, or a later batch's term subtracted by :class:`TrailingDeltas`) that overflows
float16 at 65,504 where the written weight's output would not must not fail the case.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .arch import arch_for, get_module
from .nethook import Hooked
from .tf32 import tf32_matmuls

__all__ = ["LayeredRowDeltas", "LowRankEdits", "RowDeltas", "TrailingDeltas", "rank_one"]


@dataclass
class LowRankEdits:
    """Independent edits of layer ``layer``'s down-projection: edit e adds ``R[e] @ X[e]``
    ([d_out, r_e] @ [r_e, d_in]). Rank-one edits are stacked for a gather-only fast path."""

    layer: int
    R: list[torch.Tensor]
    X: list[torch.Tensor]

    def __post_init__(self):
        if len(self.R) != len(self.X):
            raise ValueError(f"{len(self.R)} left factors but {len(self.X)} right factors")
        for e, (r, x) in enumerate(zip(self.R, self.X)):
            if r.dim() != 2 or x.dim() != 2 or r.shape[1] != x.shape[0]:
                raise ValueError(f"edit {e}: R {tuple(r.shape)} and X {tuple(x.shape)} do not form R @ X")
            if not (torch.isfinite(r).all() and torch.isfinite(x).all()):
                raise ValueError(f"edit {e}: its low-rank factors contain NaN/Inf")

    def __len__(self) -> int:
        return len(self.R)

    def delta(self, e: int) -> torch.Tensor:
        """ΔW of edit e as a dense [d_out, d_in] matrix (tests and diagnostics only)."""
        return self.R[e].to(torch.float64) @ self.X[e].to(torch.float64)

    def fro_norm(self, e: int) -> float:
        """‖R_e X_e‖_F without forming the product: sqrt(tr((RᵀR)(XXᵀ)))."""
        r, x = self.R[e].to(torch.float64), self.X[e].to(torch.float64)
        return float(((r.T @ r) * (x @ x.T)).sum().clamp(min=0).sqrt())


def term_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the hooks form an update's term in: float32 for 16-bit activations (their range and
    rounding), else the activation dtype (float32 and float64 models: no cast at all)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def rank_one(layer: int, R: torch.Tensor, X: torch.Tensor) -> LowRankEdits:
    """Rank-one edits from columns ``R[:, e]`` ([d_out, E]) and rows ``X[e]`` ([E, d_in])."""
    return LowRankEdits(layer, [R[:, e:e + 1] for e in range(R.shape[1])], [X[e:e + 1] for e in range(X.shape[0])])


class _RowHook(Hooked):
    """A forward hook on layer ``edits.layer``'s down-projection that adds a per-row term (``rows``:
    a [batch] long tensor of labels, set before every forward; None = nothing added); removed on
    exit, also on error. Subclasses build their factors in :meth:`_setup`, then the hook is attached."""

    #: set by editlib.decode around a fixed-shape decode step: the hook must then run without
    #: data-dependent control flow or host synchronisation (what a CUDA graph can capture)
    static_shapes: bool = False

    def __init__(self, model, edits: LowRankEdits):
        self.edits = edits
        self.rows: torch.Tensor | None = None
        self._setup(model)
        module = get_module(model, arch_for(model).down_name(edits.layer))
        self._handle = module.register_forward_hook(self._run)

    def _run(self, module, inputs, output):
        """The subclass's :meth:`_hook`. Under a 16-bit model its float32 terms are IEEE float32 on
        CUDA, TF32 off whatever ``model.tf32`` says: ``model.tf32`` rounds a float32 model's
        products only, which is what a results folder's digest and the value store record
        (:func:`editlib.tf32.tf32_applies`); a no-op on other devices."""
        x = inputs[0]
        if term_dtype(x.dtype) != x.dtype:  # float32 terms beside 16-bit activations
            with tf32_matmuls(x.device, on=False):
                return self._hook(module, inputs, output)
        return self._hook(module, inputs, output)

    def _rows_for(self, x: torch.Tensor) -> torch.Tensor | None:
        rows = self.rows
        if rows is not None and x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"{type(self).__name__}: {rows.shape[0]} row labels for a batch of {x.shape[0]}")
        return None if rows is None else rows.to(x.device)


class RowDeltas(_RowHook):
    """Forward hook on layer ``edits.layer``'s down-projection adding each row's edit.

    Set ``rows`` (a [batch] long tensor of edit indices, -1 = none) before every forward; with
    ``rows`` None the hook does nothing. The hook is removed on exit, also on error.
    """

    def _setup(self, model) -> None:
        edits = self.edits
        dev = next(model.parameters()).device
        self._R = [r.to(dev) for r in edits.R]
        self._X = [x.to(dev) for x in edits.X]
        self._casts: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        ranks = {x.shape[0] for x in edits.X}
        self._stack = None
        if ranks == {1} and len(edits):  # rank-one edits: one gather + two row-wise products
            self._stack = (torch.cat(self._R, 1).T.contiguous(), torch.cat(self._X, 0))  # [E, d_out], [E, d_in]

    def _hook(self, module, inputs, output):
        x = inputs[0]
        rows = self._rows_for(x)
        if rows is None:
            return output
        dt = term_dtype(x.dtype)
        if self.static_shapes:
            return self._static_hook(x, rows, output, dt)
        out = output.to(dt, copy=True)
        if self._stack is not None:
            R, X = self._stack
            has = rows >= 0
            if has.any():
                idx = rows[has]
                coef = torch.einsum("btd,bd->bt", x[has].to(dt), X[idx].to(dt))  # X_e x per token
                out[has] += coef[..., None] * R[idx].to(dt)[:, None, :]
            return out.to(output.dtype)
        Xs, Rs = self._factors(dt)
        for e in rows.unique().tolist():
            if e < 0 or Xs[e].shape[0] == 0:  # unedited rows, rank-0 edits: nothing to add
                continue
            m = rows == e
            out[m] += (x[m].to(dt) @ Xs[e].T) @ Rs[e].T
        return out.to(output.dtype)

    def _factors(self, dt: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The rank-N factors in ``dt``, cast once per hook, not at every forward: float64 factors
        of a B = 4,096 edit at d_in = 14,336 would be a 235 MB cast per scoring forward and decode
        step. The same tensors ``.to(dt)`` gives (no cast at all when the dtype matches)."""
        if dt not in self._casts:
            self._casts[dt] = ([x.to(dt) for x in self._X], [r.to(dt) for r in self._R])
        return self._casts[dt]

    def _static_hook(self, x: torch.Tensor, rows: torch.Tensor, output: torch.Tensor, dt: torch.dtype):
        """The same terms without branching on ``rows``: rank-one edits gather every row's factors
        (an unedited row's coefficient is set to 0), higher ranks form X x for all stacked
        factors and keep each row's own (an ownership mask, as :class:`TrailingDeltas`). Same values
        as :meth:`_hook` up to the order of sums (the mask adds exact zeros)."""
        if self._stack is not None:
            R, X = self._stack
            idx = rows.clamp(min=0)
            coef = torch.einsum("btd,bd->bt", x.to(dt), X[idx].to(dt))
            coef = torch.where((rows >= 0)[:, None], coef, 0)  # not × 0: an overflowed coefficient stays out, not NaN
            return (output.to(dt) + coef[..., None] * R[idx].to(dt)[:, None, :]).to(output.dtype)
        if not self._X:
            return output
        if not hasattr(self, "_owned"):
            ranks = torch.as_tensor([xe.shape[0] for xe in self._X], dtype=torch.long)
            owner = torch.repeat_interleave(torch.arange(len(ranks)), ranks)
            own = owner[None, :] == torch.arange(-1, len(ranks))[:, None]  # row 0: label -1, nothing
            self._owned = (own.to(x.device), torch.cat(self._X, 0).to(dt), torch.cat(self._R, 1).T.to(dt))
        own, Xc, Rc = self._owned
        coef = torch.where(own[rows + 1][:, None, :], x.to(dt) @ Xc.T, 0)  # another edit's X x never reaches a row
        return (output.to(dt) + coef @ Rc).to(output.dtype)


class TrailingDeltas(_RowHook):
    """Forward hook on layer ``edits.layer``'s down-projection that adds to each row labelled j
    ``sign`` × Σ_{s > j} R_s X_s: the updates *after* its own (a sequential run's later batches,
    subtracted with ``sign`` -1 to score batch j at its own weights). All factors are stacked once,
    [d_out, r] and [r, d_in] in :func:`term_dtype` of the model's (memory linear in the group, not quadratic), and a
    row's terms are selected by zeroing the coefficients of updates s ≤ j: a row whose mask is all
    zero (the last update's, or ``-1``) gets exactly +0. Set ``rows`` before every forward."""

    def __init__(self, model, edits: LowRankEdits, sign: float = -1.0):
        self._sign = sign
        super().__init__(model, edits)

    def _setup(self, model) -> None:
        edits, sign = self.edits, self._sign
        p = next(model.parameters())
        ranks = [x.shape[0] for x in edits.X]
        owner = torch.repeat_interleave(torch.arange(len(ranks)), torch.as_tensor(ranks, dtype=torch.long))
        # mask[j + 1, c]: column c belongs to an update after j (row 0: label -1, nothing)
        mask = owner[None, :] > torch.arange(-1, len(ranks))[:, None]
        mask[0] = False
        dt = term_dtype(p.dtype)
        self._mask = mask.to(device=p.device, dtype=dt)
        self._R = (sign * torch.cat([r.to(torch.float64) for r in edits.R], 1)).T.contiguous().to(p.device, dt)
        self._X = torch.cat([x.to(torch.float64) for x in edits.X], 0).to(p.device, dt)  # [r, d_in]

    def _hook(self, module, inputs, output):
        x = inputs[0]
        rows = self._rows_for(x)
        if rows is None:
            return output
        dt = term_dtype(x.dtype)
        m = self._mask[rows + 1].to(dt)                                        # [batch, r]
        coef = (x.to(dt) @ self._X.to(dt).T) * m[:, None, :]                   # X_s x, kept for s > j
        return (output.to(dt) + coef @ self._R.to(dt)).to(output.dtype)


class LayeredRowDeltas(contextlib.ExitStack):
    """Per-row hooks at several layers at once (edit e of every layer belongs to the same rows):
    setting ``rows`` sets it on each hook. ``edits``: :class:`LowRankEdits` (a :class:`RowDeltas`
    is made for each) or hooks already built (:class:`TrailingDeltas`). Edits that span a window of
    layers, or a sequential run's later batches, are evaluated this way. Every hook is removed on exit."""

    def __init__(self, model, edits: Sequence):
        super().__init__()
        if len({len(e.edits if hasattr(e, "edits") else e) for e in edits}) > 1:
            raise ValueError("every layer needs the same number of edits (rank 0 where a layer has none)")
        self.hooks = [self.enter_context(e if hasattr(e, "rows") else RowDeltas(model, e)) for e in edits]

    @property
    def rows(self) -> torch.Tensor | None:
        return self.hooks[0].rows if self.hooks else None

    @rows.setter
    def rows(self, value: torch.Tensor | None) -> None:
        for h in self.hooks:
            h.rows = value
