"""Forward hooks as context managers that always restore the model (the Trace/TraceDict idea of
the MEMIT codebase's ``util/nethook.py``, written anew).

``Trace(model, "model.layers.3.mlp.down_proj", retain_input=True)`` records the module's input
and/or output during the ``with`` block; ``edit_output=fn`` replaces the output by ``fn(output)``;
``on_input=fn`` hands the input to ``fn`` at once (nothing retained);
``stop=True`` raises :class:`StopForward` after the module ran, so a forward pass can end early
(use :func:`run_until` to swallow it). Hooks are removed when the block exits, also on error.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch

from .arch import get_module


def observer(fn: Callable[..., Any]) -> Callable[..., None]:
    """``fn`` as a forward (pre-)hook that only reads: it is called with the hook's arguments and
    its result is dropped, so the module's inputs and output are what they would be without it
    (``fn`` must not change them in place). Where a hook would make editlib recompute what it
    otherwise reuses because a hook can change a forward (the value store, the unedited model's
    kept measurements: :func:`editlib.below.hooked_module`), an observer does not: instrumentation
    such as counting the LM head's rows (``bench/phase_meter.py``) measures the run as it runs
    without it, and sees the module calls that run (none for a chunk of values read back). Two
    exceptions: on blocks below the edited layer an observer still stops their replay
    (:class:`editlib.below.SharedBelow`, which skips those modules' calls), and a value step
    replayed from a CUDA graph (``capture_steps``) runs no Python, so an observer there sees only
    the calls that warmed up and recorded it. GE's fixed-shape decode steps (``gen_decode`` other
    than ``transformers``) refuse it, as any hook on a module they do not call."""
    def hook(*args: Any, **kw: Any) -> None:
        fn(*args, **kw)

    hook.editlib_observer = True
    return hook


def is_observer(hook: Any) -> bool:
    """Whether ``hook`` was made by :func:`observer`."""
    return getattr(hook, "editlib_observer", False) is True


class StopForward(Exception):
    """Raised by a hook with ``stop=True`` to end a forward pass after the traced module."""


def _first_tensor(x: Any) -> Any:
    return x[0] if isinstance(x, (tuple, list)) else x


class Hooked(contextlib.AbstractContextManager):
    """One registered hook (``_handle``), removed by :meth:`close` and on leaving the ``with``
    block, also on error (editlib.lowrank's per-row hooks build on it as well)."""

    _handle = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False


class Trace(Hooked):
    """Hook one module. ``.input`` / ``.output`` hold the first positional input / the output."""

    def __init__(self, model: torch.nn.Module, layer: str, *, retain_input: bool = False,
                 retain_output: bool = True, detach: bool = True, clone: bool = False,
                 edit_output: Callable[[Any], Any] | None = None, stop: bool = False,
                 on_input: Callable[[torch.Tensor], None] | None = None):
        self.layer = layer
        self.input: torch.Tensor | None = None
        self.output: Any = None
        module = get_module(model, layer)

        def hook(mod, inputs, output):
            if on_input is not None:  # consume the input now instead of retaining it
                on_input(_first_tensor(inputs).detach())
            if retain_input:
                self.input = _prep(_first_tensor(inputs), detach, clone)
            if edit_output is not None:
                output = edit_output(output)
            if retain_output:
                self.output = _prep(output, detach, clone)
            if stop:
                raise StopForward()
            return output

        self._handle = module.register_forward_hook(hook)

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward  # swallow the early stop of this trace


def _prep(x: Any, detach: bool, clone: bool) -> Any:
    if isinstance(x, torch.Tensor):
        if detach:
            x = x.detach()
        if clone:
            x = x.clone()
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_prep(v, detach, clone) for v in x)
    return x


class TraceDict(contextlib.AbstractContextManager, dict):
    """Hook several modules at once; ``td[name]`` is that module's :class:`Trace`.

    With ``stop=True`` the forward pass stops after the *last* module of ``layers`` to run
    (give them in execution order).
    """

    def __init__(self, model: torch.nn.Module, layers: Iterable[str], *, retain_input: bool = False,
                 retain_output: bool = True, detach: bool = True, clone: bool = False,
                 edit_output: Callable[[Any, str], Any] | None = None, stop: bool = False,
                 on_input: Callable[[torch.Tensor, str], None] | None = None):
        super().__init__()
        names = list(dict.fromkeys(layers))
        try:
            for i, name in enumerate(names):
                self[name] = Trace(
                    model, name, retain_input=retain_input, retain_output=retain_output,
                    detach=detach, clone=clone,
                    edit_output=(lambda out, n=name: edit_output(out, n)) if edit_output else None,
                    stop=stop and i == len(names) - 1,
                    on_input=(lambda x, n=name: on_input(x, n)) if on_input else None)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for t in self.values():
            t.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is StopForward


def run_until(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` and swallow a :class:`StopForward` (returns None when the pass was stopped)."""
    try:
        return fn()
    except StopForward:
        return None
