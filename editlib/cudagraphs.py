"""A step of device work recorded once as a CUDA graph and replayed (GE's fixed-shape decode steps,
:mod:`editlib.decode`; the value steps under ``hparams.common.capture_steps``, :mod:`editlib.values`).

A replay launches the recorded kernels with no Python, no operator dispatch and no autograd engine
around them: the same kernels on the same addresses, so the same arithmetic as the calls that were
recorded. What a step may not do: synchronise with the host (``.item()``, a boolean mask, a
``nonzero``) or copy from it; its inputs must sit in tensors that every replay reads (copy new values
into them), and its outputs are tensors that every replay rewrites.
"""
from __future__ import annotations

from typing import Callable

import torch

#: eager calls on the capture stream before the recording (lazy initialisation: cuBLAS handles and
#: workspaces, the autograd engine's device thread); the last one under the strict sync-debug mode
WARMUPS = 2


class CapturedStep:
    """``fn`` (device work only) called through :meth:`__call__`: the first :data:`WARMUPS` calls
    run it eagerly on a side stream of ``device`` and return its results (they are real steps),
    the last of them with ``torch.cuda.set_sync_debug_mode("error")``, so that a host
    synchronisation fails naming its operation (``what`` says which setting asked for the capture)
    rather than breaking the recording; the next call records it on that stream and replays it, and
    every later call replays it. Returns ``fn``'s outputs (after the recording: the graph's, which
    every replay rewrites)."""

    def __init__(self, fn: Callable, device: torch.device, what: str):
        self.fn, self.device, self.what = fn, torch.device(device), what
        self.stream = torch.cuda.Stream(device=self.device)
        self.calls = 0
        self.graph = None
        self.out = None

    def warm(self):
        """One eager call on the capture stream (the strict one when it is the last warm-up)."""
        strict = self.calls == WARMUPS - 1
        self.calls += 1
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            mode = torch.cuda.get_sync_debug_mode()
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                out = self.fn()
            except RuntimeError as e:
                if strict and "synchroniz" in str(e).lower():
                    raise RuntimeError(f"{self.what}: the step synchronises with the host, which a CUDA graph "
                                       f"cannot record ({e})") from e
                raise
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return out

    def record(self):
        """Record ``fn`` on the capture stream (nothing runs); returns the graph's outputs."""
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.out = self.fn()
        return self.out

    def __call__(self):
        if self.graph is None and self.calls < WARMUPS:
            return self.warm()
        if self.graph is None:
            self.record()
        self.graph.replay()
        return self.out
