"""``torch.compile`` for code that a process compiles once and calls many times (GE's decode
steps, :mod:`editlib.decode`; the value steps' blocks, :mod:`editlib.packed`).

torch recompiles a function for each new guard failure (another dtype, a size of 0 or 1, another
module layout) and, past ``recompile_limit`` (8 by default), runs it eagerly with nothing but a
logged warning: a run that asked for compiled steps would then mix compiled and eager arithmetic
(another rounding) and cost what the eager steps cost. Within :func:`recompile_limit` (entered
once around a step's calls of :func:`compiled_or_eager` functions) torch raises instead, past
:data:`RECOMPILE_LIMIT` compilations of one function, with a message naming the key that asked
for it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

#: compilations of one function allowed in a process: the code is written so that one compilation
#: serves every block, batch and layer of a model; a model of other sizes, dtype or bias layout, a
#: one-row batch or deterministic mode adds one
RECOMPILE_LIMIT = 64


@contextmanager
def recompile_limit(message: str):
    """Within: past :data:`RECOMPILE_LIMIT` compilations of one function torch fails rather than
    running it eagerly, and the failure is raised as ``RuntimeError(message.format(limit=...))``.
    Entered once around many calls (a step's blocks), it costs one config patch, not one per call."""
    import torch._dynamo

    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            yield
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise RuntimeError(message.format(limit=RECOMPILE_LIMIT)) from e


def compiled_or_eager(fn: Callable, **compile_kw) -> Callable:
    """``fn`` through ``torch.compile(fn, **compile_kw)``, except under a ``TorchDispatchMode`` (an
    operation or FLOP counter, which a compiled graph cannot run under), where ``fn`` runs as
    written: the same operations, uncompiled. Call it within :func:`recompile_limit`."""
    compiled = torch.compile(fn, **compile_kw)

    def run(*args, **kw):
        if _get_current_dispatch_mode() is not None:
            return fn(*args, **kw)
        return compiled(*args, **kw)

    return run
