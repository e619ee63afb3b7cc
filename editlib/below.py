"""The blocks below an edited layer, run once for several evaluations of the same prompts (issue #13).

Independent edits of layer L change layer L's down-projection and nothing else, so for a given
batch of prompts the output of blocks 0 … L−1 is the same in every method's evaluation: ROME's and
MEMIT's singular edits of one layer (the layer search, Table 1), or every λ of a sweep, score the
same prompts. :class:`SharedBelow` remembers block L−1's output for each batch a scoring forward
runs, and when a later scoring forward runs the same batch (the same input ids and attention mask)
it returns that output without running blocks 0 … L−1 at all. Exact: the replayed tensor is the one
those blocks computed, and everything from block L on runs as before.

Only teacher-forced scoring (:func:`editlib.scoring.score_targets`, no KV cache) goes through it;
generation runs every block. Nothing is shared while any hook sits on a module of blocks
0 … L−1 (an :func:`editlib.nethook.observer` too: a replay skips those modules, or calls the block's
hooks on the kept tensor), a global hook does, or a hook that is not an observer sits on the
embeddings (its computation would be skipped or baked in; a ``RuntimeWarning`` names the
hooked module once), what was recorded is dropped when a weight of those
blocks is written in place (an edit, or its restore), and what is kept is capped at ``max_bytes``:
past it, further batches are computed as usual. A replay swaps the lower blocks' ``forward`` for
the duration of one forward pass, so a model must not be run from two threads while one is
replaying (editlib runs a study in one thread; Ray workers are separate processes).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .arch import arch_for, get_module, n_layers
from .nethook import is_observer
from .weights import tensor_state

__all__ = ["SharedBelow", "plain_forward"]


def plain_forward(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The backbone's final hidden states for a padded batch (scoring: no KV cache)."""
    return backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


def hooked_module(modules, observers: bool = False) -> nn.Module | str | None:
    """The first of ``modules`` carrying a forward (pre-)hook, "global" for a global one, else None.
    Hooks made by :func:`editlib.nethook.observer` (they only read) count only with ``observers``:
    where a computation is skipped whole (the value store) they see no wrong tensor, while a module
    whose call is faked (a replayed block) would hand them one."""
    glob = torch.nn.modules.module

    def acting(hooks: dict) -> bool:
        return any(observers or not is_observer(h) for h in hooks.values())

    if acting(glob._global_forward_hooks) or acting(glob._global_forward_pre_hooks):
        return "global"
    return next((m for m in modules if acting(m._forward_hooks) or acting(m._forward_pre_hooks)), None)


def _lower_modules(backbone: nn.Module, upper: list[nn.Module]) -> list[nn.Module]:
    """Every module of ``backbone`` (itself included) that is not inside one of the ``upper``
    blocks: the embeddings, position tables, rotary tables and blocks 0 … L−1 that decide what
    block L receives (the final norm too, conservatively)."""
    inside = {id(m) for b in upper for m in b.modules()}
    return [m for m in backbone.modules() if id(m) not in inside]


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (tuple, list)):
        return sum(_nbytes(v) for v in x)
    return 0


def _copied(x: Any) -> Any:
    """A detached copy of a block output (a tensor, or a tuple holding tensors): the blocks above
    may work in place on what they are given, and neither the kept nor the replayed tensor may change."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_copied(v) for v in x)
    return x


class SharedBelow:
    """Block ``layer``−1's output per scoring batch, recorded once and replayed (see the module doc).

    ``forward(backbone, ids, mask)`` stands in for :func:`plain_forward`; ``ids`` and ``mask`` are
    the batch on the host (its key), ``device`` where the model runs. ``hits`` / ``misses`` count
    replayed and computed batches, ``hooked`` those computed because a hook sat below (warned once).
    ``layer`` 0 has nothing below it: every batch is computed."""

    def __init__(self, model: nn.Module, layer: int, max_bytes: float):
        self.layer = int(layer)
        self.max_bytes = float(max_bytes)
        arch = arch_for(model)
        self._blocks = [get_module(model, arch.layer_name(l)) for l in range(self.layer)]
        upper = [get_module(model, arch.layer_name(l)) for l in range(self.layer, n_layers(model))]
        self._lower = _lower_modules(model.base_model, upper)
        # a replay fakes the lower blocks' calls (their hooks would see the kept tensor as input
        # and output) and skips their submodules: any hook there stops sharing, an observer too;
        # the modules outside them (embeddings, tables) still run, so an observer there may stay
        inside = {id(m) for b in self._blocks for m in b.modules()}
        self._faked = [m for m in self._lower if id(m) in inside]
        self._run = [m for m in self._lower if id(m) not in inside]
        self._model = model  # only to name a hooked module in the warning
        self.hooked = 0  # scoring forwards that ran every block because of a hook below
        self._store: dict[tuple, Any] = {}
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._seen_versions: tuple = ()

    def _versions(self) -> tuple:
        """What the outputs below depend on: every parameter and buffer outside blocks L … N−1 (the
        embeddings and tables as well as blocks 0 … L−1), each by identity, storage, dtype, device
        and in-place write counter. Any write through the tensor (an edit, its restore), a moved or
        cast model or a replaced parameter changes it, so nothing recorded before is replayed
        after. (Writes through ``.data`` bypass the counter; editlib never writes that way.)"""
        return tensor_state(t for m in self._lower for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))

    def _which(self, hooked: nn.Module | str) -> str:
        """The hook that stopped sharing, for the warning: global, or on the module it names."""
        if hooked == "global":
            return "a global forward hook"
        name = next((n for n, m in self._model.named_modules() if m is hooked), type(hooked).__name__)
        return f"a forward hook on {name}"

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    def forward(self, backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                device: torch.device) -> torch.Tensor:
        def run() -> torch.Tensor:
            return plain_forward(backbone, ids.to(device), mask.to(device))

        if not self._blocks or self.max_bytes <= 0:
            self.misses += 1
            return run()
        hooked = hooked_module(self._faked, observers=True) or hooked_module(self._run)
        if hooked is not None:
            self.misses += 1
            self.hooked += 1
            if self.hooked == 1:  # said once per object; Python's filter then shows it once per hook place
                warnings.warn(f"evaluation.share_below_gb: the blocks below the edited layer run in every "
                              f"evaluation, because of {self._which(hooked)} (the scores are unaffected; only the time "
                              f"the sharing saves is lost)", RuntimeWarning, stacklevel=2)
            return run()
        versions = self._versions()
        if versions != self._seen_versions:  # a weight below was written (and maybe restored): start over
            self.clear()
            self._seen_versions = versions
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
        kept = self._store.get(key)
        if kept is not None:
            self.hits += 1
            with self._replaying(kept):
                return run()
        self.misses += 1
        if self.bytes >= self.max_bytes:  # full: nothing more to keep
            return run()
        seen: list = []
        handle = self._blocks[-1].register_forward_hook(lambda mod, inp, out: seen.append(_copied(out)))
        try:
            hidden = run()
        finally:
            handle.remove()
        if len(seen) == 1 and self.bytes + _nbytes(seen[0]) <= self.max_bytes:
            self._store[key] = seen[0]
            self.bytes += _nbytes(seen[0])
        return hidden

    @contextlib.contextmanager
    def _replaying(self, kept: Any):
        """Blocks 0 … L−1 return ``kept`` (block L−1's recorded output) without computing: only the
        last one's output reaches block L, the others' go to blocks that ignore their input. Each
        block's own ``forward`` attribute (an accelerate device hook, say) is put back on exit."""
        saved = [b.__dict__.get("forward") for b in self._blocks]
        try:
            for b in self._blocks[:-1]:  # their outputs go to replaced blocks only
                b.forward = lambda *a, **k: kept
            self._blocks[-1].forward = lambda *a, **k: _copied(kept)
            yield
        finally:
            for b, f in zip(self._blocks, saved):
                if f is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f
