"""A step of device work recorded once as a CUDA graph and replayed (GE's fixed-shape decode steps,
:mod:`editlib.decode`; the value steps under ``hparams.common.capture_steps``, :mod:`editlib.values`).

A replay launches the recorded kernels with no Python, no operator dispatch and no autograd engine
around them: the same kernels on the same addresses, so the same arithmetic as the calls that were
recorded. What a step may not do: synchronise with the host (``.item()``, a boolean mask, a
``nonzero``) or copy from it; its inputs must sit in tensors that every replay reads (copy new values
into them), and its outputs are tensors that every replay rewrites.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable

import torch

#: eager calls on the capture stream before a step is recorded (lazy initialisation: cuBLAS
#: handles and workspaces, the autograd engine's device thread), the last one under the strict
#: sync-debug mode; a step may ask for fewer once its stream has recorded a graph
WARMUPS = 2

_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_POOLS: dict[torch.device, tuple] = {}
#: graphs recorded in this process, per device (bench/bench_compiled_values.py prints them; a
#: device here has a capture stream that has recorded)
RECORDINGS: dict[torch.device, int] = {}


def capture_stream(device) -> torch.cuda.Stream:
    """The process's one capture stream on ``device``. cuBLAS keeps a workspace for each (handle,
    stream) it has run on, so a stream of torch's pool per recording would end up holding one for
    each of the pool's streams. No graph uses the stream's own workspace: each recording gets one
    in its graph's pool (:func:`workspace_in_pool`)."""
    d = _indexed(device)
    if d not in _STREAMS:
        _STREAMS[d] = torch.cuda.Stream(device=d)
    return _STREAMS[d]


def shared_pool(device, fresh: bool = False) -> tuple:
    """The process's one memory pool on ``device`` for graphs that share theirs (the value steps kept
    for reuse, :mod:`editlib.values`), at about the footprint of the largest instead of their sum.

    torch's notes ("Sharing memory across captures") call sharing safe for graphs always replayed
    in the order they were captured and never concurrently: a memory block that one capture freed
    (its intermediates, or a tensor it made and the caller later dropped) may hold another
    capture's tensors. Kept value graphs replay in any order, and sharing stays safe under stricter
    rules, which their caller keeps: a graph's inputs live outside the pool; every tensor a capture
    makes is either scratch, written before it is read within each replay, or one of its outputs,
    which stay referenced as long as the graph (so no later capture takes their blocks); and since
    an output may lie in another graph's scratch, it holds only until the next replay of *any*
    graph of the pool: read it before. Replays are one at a time (one stream, one thread).

    ``fresh``: a new pool, for a caller none of whose graphs holds the current one. A pool whose
    graphs are all released may still hold a tensor (an output that a stored traceback keeps
    alive), and while it does torch refuses to record into that pool id (an internal assert)."""
    d = _indexed(device)
    if fresh or d not in _POOLS:
        _POOLS[d] = torch.cuda.graph_pool_handle()
    return _POOLS[d]


def clear_cublas_workspaces() -> None:
    """Drop cuBLAS's cached workspaces: the next matrix product allocates its workspace anew, inside
    a graph's pool when it is being recorded. In torch 2.13 the workspace map is process-wide
    (keyed by handle and stream), so this also reaches the handle of the autograd engine's device
    thread, which runs a recorded value step's backward products (torch.compile's graph trees clear
    it around each compiled backward in that thread instead; were the map made per thread,
    pytorch#180283, the backward's products would use the stream's cached workspace again)."""
    torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def workspace_in_pool():
    """cuBLAS's workspaces dropped before a recording and again after it (also when it fails), as
    torch.compile's CUDA-graph trees do. The recorded products then use a workspace allocated in
    the graph's own pool (scratch within each product's kernels, kept as long as the pool), not
    the capture stream's cached one. That one a recorded graph must not use: torch frees a stream's
    workspace when a graph recorded on that stream is reset (pytorch#175276), and every other
    graph recorded on it would then replay into freed memory (pytorch#193402) — here, a kept
    value graph after a GE decode graph or an evicted kept graph was released, all of them
    recorded on the one capture stream. In a shared pool the workspace is scratch like the
    captures' others (:func:`shared_pool`'s rules), so the graphs may share it."""
    clear_cublas_workspaces()
    try:
        yield
    finally:
        clear_cublas_workspaces()


def _indexed(device) -> torch.device:
    d = torch.device(device)
    return torch.device(d.type, torch.cuda.current_device()) if d.index is None else d


class CapturedStep:
    """``fn`` (device work only) called through :meth:`__call__`: the first ``warmups`` calls
    (:data:`WARMUPS` at least until the stream has recorded a graph) run it eagerly on the
    capture stream of ``device`` and return its results (they are real steps), the
    last of them with ``torch.cuda.set_sync_debug_mode("error")``, so that a host synchronisation
    fails naming its operation (``what`` says which setting asked for the capture) rather than
    breaking the recording; the next call records it on that stream and replays it, and every
    later call replays it. Returns ``fn``'s outputs (after the recording: the graph's, which every
    replay rewrites). :meth:`close` releases the graph and its memory pool (a shared pool's memory
    goes with its last graph). ``pool``: a pool shared with other graphs (:func:`shared_pool`;
    default: the graph's own)."""

    def __init__(self, fn: Callable, device: torch.device, what: str, warmups: int = WARMUPS, pool=None):
        if warmups < 1:
            raise ValueError(f"a capture needs at least one warm-up call, got {warmups}")
        self.fn, self.device, self.what = fn, _indexed(device), what
        self.warmups = warmups if self.device in RECORDINGS else max(warmups, WARMUPS)
        self.stream = capture_stream(self.device)
        self.pool = pool
        self.calls = 0
        self.graph = None
        self.out = None

    def warm(self):
        """One eager call on the capture stream (the strict one when it is the last warm-up)."""
        strict = self.calls == self.warmups - 1
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
        """Record ``fn`` on the capture stream (nothing runs); returns the graph's outputs. Its
        products get a cuBLAS workspace of their own in the graph's pool (:func:`workspace_in_pool`).
        The garbage collector is off meanwhile: a collection that destroyed some other, unreachable
        graph inside the recording would invalidate it (torch 2.13's ``torch.cuda.graph`` does not
        collect before it records)."""
        graph = torch.cuda.CUDAGraph()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with workspace_in_pool(), torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = self.fn()
        except Exception as e:
            raise RuntimeError(f"{self.what}: recording the step as a CUDA graph failed "
                               f"({type(e).__name__}: {e})") from e
        finally:
            if collecting:
                gc.enable()
        self.graph, self.out = graph, out
        RECORDINGS[self.device] = RECORDINGS.get(self.device, 0) + 1
        return out

    def __call__(self):
        with torch.cuda.device(self.device):  # a model on cuda:1: its graph, stream and pool there
            if self.graph is None and self.calls < self.warmups:
                return self.warm()
            if self.graph is None:
                self.record()
            self.graph.replay()
            return self.out

    def close(self) -> None:
        """Release the graph and its memory pool now, not whenever its last reference goes."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.out = None
