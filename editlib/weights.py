"""Writing edits into a model with a way back.

:class:`EditSession` keeps, for every down-projection it touches, the original parameter (bit-exact,
in its own dtype) and an **fp32 master copy** in [d_out, d_in] layout (SPEC §8.4; float64 for a
float64 weight, so the master never has fewer bits than the weight): updates are added to the
master and the master is written into the parameter, so the rounding of a bf16 weight does not
accumulate over sequential edits (each forward still reads the bf16-rounded weight).
``restore()`` puts the originals back bit-identically; used as a context manager it restores on
exit unless ``keep()`` was called. :func:`written` says whether a model carries weights that a
session wrote and has not restored, :func:`unedited` whether its weights are its unedited ones
(what may be reused from the unedited model depends on it), and :func:`edit_history` names edited
weights by the low-rank updates one session wrote on the unedited ones (what may be reused from a
run that edited them the same way). Anything else that writes a weight (outside a session, or a
second session beside the first) makes both say "unknown", never a wrong name.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import weakref

import torch

from .arch import arch_for, edit_weight, to_param_layout, weight_out_in


#: model -> the (session number, layer) pairs of every session holding a master of one of its
#: weights (a write is always through a master); a restore drops the session's pairs, a kept
#: session's stay
_SESSIONS = itertools.count()
_HELD: "weakref.WeakKeyDictionary[torch.nn.Module, set[tuple[int, int]]]" = weakref.WeakKeyDictionary()
#: model -> its tensors' state (:func:`_tensor_state`) when its weights were last known unedited
_CLEAN: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: model -> (session number, digest, tensor state) after the last write of the one session whose
#: low-rank updates on the unedited weights made them what they are (:func:`edit_history`)
_HISTORY: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, str, tuple]]" = weakref.WeakKeyDictionary()
#: model -> its tensors' state after the last write or restore of any session: a tensor written any
#: other way (outside a session, moved, cast) differs from it
_EXPECT: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()
#: model -> the numbers of sessions that held a write while another one did (cleared once none holds)
_MIXED: "weakref.WeakKeyDictionary[torch.nn.Module, set[int]]" = weakref.WeakKeyDictionary()


def written(model) -> bool:
    """Whether an :class:`EditSession` has (or may have) written a weight of ``model`` that is not
    restored: inside a session once it touched a layer, and forever after a kept one."""
    return bool(_HELD.get(model))


def tensor_state(tensors) -> tuple:
    """``tensors`` by identity, storage, dtype, device and in-place write counter: any write through
    a tensor, a replaced, moved or cast tensor changes it (writes through ``.data`` bypass the
    counter; editlib never writes that way)."""
    return tuple((id(t), t.data_ptr(), t.dtype, t.device, t._version) for t in tensors)


def _tensor_state(model) -> tuple:
    """:func:`tensor_state` of every parameter and buffer of ``model``."""
    return tensor_state((*model.parameters(), *model.buffers()))


def unedited(model) -> bool:
    """Whether ``model``'s weights are those it had when first asked (its unedited ones): no session
    holds a write, and no tensor was written or replaced since, other than by sessions that have
    restored what they wrote, in order. The first call takes the model as it is."""
    if written(model):
        return False
    now = _tensor_state(model)
    return _CLEAN.setdefault(model, now) == now


def edit_history(model) -> str | None:
    """What ``model``'s weights are, for results that depend on nothing else (the value store): ""
    for its unedited ones (:func:`unedited`); for weights that one :class:`EditSession` wrote on the
    unedited ones by low-rank updates alone (:meth:`EditSession.apply_factors`, or their replay from
    a checkpoint), a digest of those updates in order (layer, block size, the float64 factors' bits),
    which determine the weights bit for bit; None for anything else (a dense update, a master set
    by hand, a second session's write, any write outside a session). Identical digests mean
    identical weights."""
    if unedited(model):
        return ""
    rec = _HISTORY.get(model)
    if rec is None:
        return None
    number, digest, state = rec
    held = _HELD.get(model, set())
    if not held or any(n != number for n, _ in held) or _tensor_state(model) != state:
        return None
    return digest


def remark_unedited(model) -> None:
    """Takes ``model``'s tensors as they are now as its unedited ones. For a caller that moved an
    unedited model to another device and back (which replaces every tensor) and knows nothing
    else changed; refuses while an edit session holds a write."""
    if written(model):
        raise RuntimeError("remark_unedited: an edit session holds a write on this model")
    _CLEAN[model] = _tensor_state(model)


class EditSession(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model
        self.number = next(_SESSIONS)
        self.spec = arch_for(model)
        self._orig: dict[int, torch.Tensor] = {}
        self._master: dict[int, torch.Tensor] = {}
        self._keep = False
        self._from_unedited = False  # the weights were unedited when this session first wrote
        #: every low-rank update written since the last :meth:`take_log`, as (layer, R, X) in
        #: float64 on the CPU: replaying them with :meth:`apply_factors` rebuilds the masters
        #: bit for bit (the sequential protocol's append-only checkpoint)
        self.factor_log: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.log_complete = True  # False once a dense update was written (not replayable)
        self._history = None  # the digest of the updates written on the unedited weights (edit_history)
        self._tainted = False  # the weights were changed by something but this session while it held them

    @property
    def layers(self) -> list[int]:
        return sorted(self._orig)

    def originals(self) -> dict[int, torch.Tensor]:
        """Each edited layer's weight as it was when this session first touched it (parameter
        layout and dtype, on the weight's device; not copies: do not modify)."""
        return dict(self._orig)

    def master(self, layer: int) -> torch.Tensor:
        """fp32 (float64 for a float64 weight) [d_out, d_in] master copy of the edited weight
        (created on first use)."""
        if layer not in self._master:
            others = {n for n, _ in _HELD.get(self.model, ()) if n != self.number}
            if others:  # sessions interleaved: none of them can name the weights any more
                _MIXED.setdefault(self.model, set()).update(others | {self.number})
            if not self._orig and not written(self.model):  # the first layer any session touches
                self._from_unedited = unedited(self.model)
                self._history = hashlib.sha256(b"editlib edit history 1") if self._from_unedited else None
                _EXPECT[self.model] = _tensor_state(self.model)
            _HELD.setdefault(self.model, set()).add((self.number, layer))
            p = edit_weight(self.model, layer)
            self._orig[layer] = p.detach().clone()
            dtype = torch.promote_types(p.dtype, torch.float32)
            self._master[layer] = weight_out_in(self.model, layer).detach().to(dtype).clone()
        return self._master[layer]

    @torch.no_grad()
    def apply(self, layer: int, delta_out_in: torch.Tensor) -> None:
        """W ← W + ΔW for a [d_out, d_in] update; refuses NaN/Inf before touching the weight."""
        if not torch.isfinite(delta_out_in).all():
            raise ValueError(f"refusing to write a non-finite update into layer {layer}")
        m = self.master(layer)
        self._check_own()
        if tuple(delta_out_in.shape) != tuple(m.shape):
            raise ValueError(f"update shape {tuple(delta_out_in.shape)} does not match the "
                             f"[d_out, d_in] weight {tuple(m.shape)} of layer {layer}")
        backup = m.clone()
        m.add_(delta_out_in.to(device=m.device, dtype=m.dtype))
        self._write(layer, m, backup)
        self.log_complete = False
        self._forget_history()

    @torch.no_grad()
    def apply_factors(self, layer: int, R: torch.Tensor, X: torch.Tensor, *, block_rows: int = 1024) -> None:
        """W ← W + R X for a low-rank update ([d_out, N] @ [N, d_in]) without materialising the
        d_out × d_in float64 ΔW: the product is formed block of rows by block of rows in float64
        and added to the master (at d_in = 14336, d_out = 4096 a dense float64 ΔW is 470 MB).
        Refuses non-finite factors, or factors whose product could overflow, before any write.
        The factors are made contiguous first, so a live update and its replay from the
        checkpoint log (stored contiguous) multiply the same layouts: the same float64 sums."""
        m = self.master(layer)
        self._check_own()
        if R.dim() != 2 or X.dim() != 2 or R.shape[1] != X.shape[0] or (R.shape[0], X.shape[1]) != tuple(m.shape):
            raise ValueError(f"update factors R {tuple(R.shape)} @ X {tuple(X.shape)} do not match the "
                             f"[d_out, d_in] weight {tuple(m.shape)} of layer {layer}")
        R = R.to(device=m.device, dtype=torch.float64).contiguous()
        X = X.to(device=m.device, dtype=torch.float64).contiguous()
        bound = float(R.norm()) * float(X.norm())  # ‖RX‖_F ≤ ‖R‖_F ‖X‖_F
        if not (torch.isfinite(R).all() and torch.isfinite(X).all() and bound < 1e300):
            raise ValueError(f"refusing to write a non-finite update into layer {layer}")
        backup = m.clone()
        try:
            for s in range(0, m.shape[0], block_rows):
                m[s:s + block_rows].add_((R[s:s + block_rows] @ X).to(m.dtype))
        except BaseException:  # (out of memory mid-loop): no half-added update stays in the master
            m.copy_(backup)
            raise
        self._write(layer, m, backup)
        self.factor_log.append((layer, R.cpu(), X.cpu()))
        self._extend_history(layer, block_rows, *self.factor_log[-1][1:])

    def _extend_history(self, layer: int, block_rows: int, R: torch.Tensor, X: torch.Tensor) -> None:
        """Add one written update to this session's :func:`edit_history` digest (float64, contiguous,
        on the CPU: what the checkpoint log keeps, so a replay gives the same digest)."""
        if self._history is None:
            _HISTORY.pop(self.model, None)  # no history describes the weights now
            return
        h = self._history
        h.update(f"{layer}:{block_rows}:{self._master[layer].dtype}:{tuple(R.shape)}:{tuple(X.shape)}:".encode())
        for t in (R, X):
            h.update(memoryview(t.contiguous().numpy()).cast("B"))  # hashed in place, not copied
        _HISTORY[self.model] = (self.number, h.hexdigest(), _tensor_state(self.model))

    def _check_own(self) -> None:
        """Before this session writes (or restores): have the weights changed since its
        own last write by anything else (a write outside any session, a moved or cast tensor, another
        session holding a write beside it)? Then no digest of its updates describes them, for the
        rest of the session, and its restore does not give the unedited weights back."""
        if self.number in _MIXED.get(self.model, ()) or _tensor_state(self.model) != _EXPECT.get(self.model):
            self._tainted = True
            self._forget_history()

    def _forget_history(self) -> None:
        """A write that no digest describes (dense, a master set by hand, or another's write)."""
        self._history = None
        _HISTORY.pop(self.model, None)

    def _write(self, layer: int, m: torch.Tensor, backup: torch.Tensor) -> None:
        """Write the updated master ``m`` into the parameter, unless the result is not finite in the
        master's or the parameter's own dtype (a bfloat16 / float16 weight overflows at its own
        maximum, 65,504 for float16): then the master is put back from ``backup`` and the edit
        refused, so a model is never left with infinite weights scored as a valid edit."""
        p = edit_weight(self.model, layer)
        new = to_param_layout(self.spec, m).to(p.dtype)
        if not (torch.isfinite(m).all() and torch.isfinite(new).all()):
            m.copy_(backup)
            raise ValueError(f"refusing to write layer {layer}: the updated weight is not finite in "
                             f"{str(p.dtype).replace('torch.', '')}")
        p.copy_(new)
        _EXPECT[self.model] = _tensor_state(self.model)

    def take_log(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """The updates written since the last call (and forget them)."""
        out, self.factor_log = self.factor_log, []
        return out

    @torch.no_grad()
    def set_master(self, layer: int, master_out_in: torch.Tensor) -> None:
        """Replace the master of ``layer`` (resuming a checkpointed sequential run)."""
        m = self.master(layer)
        self._check_own()
        if tuple(master_out_in.shape) != tuple(m.shape) or not torch.isfinite(master_out_in).all():
            raise ValueError(f"checkpointed weight for layer {layer} has the wrong shape or non-finite values")
        m.copy_(master_out_in.to(device=m.device, dtype=m.dtype))
        p = edit_weight(self.model, layer)
        p.copy_(to_param_layout(self.spec, m).to(p.dtype))
        _EXPECT[self.model] = _tensor_state(self.model)
        self._forget_history()

    def distance(self, layer: int) -> tuple[float, float]:
        """(‖W − W0‖_F, ‖W − W0‖_F / ‖W0‖_F) from the master."""
        orig = self._orig[layer].to(self.master(layer).dtype)
        w0 = orig.T if self.spec.conv1d else orig
        diff = float((self.master(layer) - w0).norm())
        return diff, diff / max(float(w0.norm()), 1e-30)

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight back (bit-identical) and forget the masters. The model counts
        as unedited again (:func:`unedited`) only if this session found it unedited, wrote it alone
        and nothing else wrote it meanwhile: a tensor written outside it stays as written."""
        if self._orig:
            self._check_own()
        for layer, orig in self._orig.items():
            edit_weight(self.model, layer).copy_(orig)
        held = _HELD.get(self.model, set())
        held.difference_update({(self.number, layer) for layer in self._orig})
        if self._orig:
            _EXPECT[self.model] = _tensor_state(self.model)
            if not held and self._from_unedited and not self._tainted:  # back to the unedited weights
                _CLEAN[self.model] = _EXPECT[self.model]
        if not held:
            _MIXED.pop(self.model, None)
        if _HISTORY.get(self.model, (None,))[0] == self.number:
            del _HISTORY[self.model]
        self._history = None
        self._tainted = False
        self._orig.clear()
        self._master.clear()

    def keep(self) -> "EditSession":
        """Do not restore on exit (sequential editing keeps the weights)."""
        self._keep = True
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._keep:
            self.restore()
        return False
