"""editlib.cudagraphs.CapturedStep on a CPU, with the CUDA calls it makes stood in for: warm-ups on
the capture stream (the last strict about host synchronisation), one recording with the garbage
collector off and cuBLAS's workspaces dropped around it, replays, the stream shared per device, fewer warm-ups once it has recorded, a
failed recording named, and close() releasing the graph."""
from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from editlib import cudagraphs


class _Stream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


@pytest.fixture()
def cuda(monkeypatch):
    """torch.cuda's calls stood in for; returns what they saw."""
    seen = {"strict": [], "gc_in_capture": [], "graphs": [], "pools": [], "events": []}

    class Graph:
        def __init__(self):
            self.replays, self.was_reset = 0, False
            seen["graphs"].append(self)

        def replay(self):
            self.replays += 1

        def reset(self):
            self.was_reset = True

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        seen["gc_in_capture"].append(gc.isenabled())
        seen["pools"].append(pool)
        seen["events"].append("capture")
        try:
            yield
        finally:
            seen["events"].append("end")

    mode = {"now": 0}

    def set_mode(m):
        mode["now"] = m

    monkeypatch.setattr(cudagraphs, "_STREAMS", {})
    monkeypatch.setattr(cudagraphs, "RECORDINGS", {})
    monkeypatch.setattr(cudagraphs, "_POOLS", {})
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(cudagraphs, "clear_cublas_workspaces", lambda: seen["events"].append("clear"))
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", set_mode)
    seen["mode"] = mode
    return seen


def test_warm_ups_then_one_recording_then_replays(cuda) -> None:
    calls = []

    def fn():
        calls.append(cuda["mode"]["now"])
        return torch.tensor([float(len(calls))])

    step = cudagraphs.CapturedStep(fn, "cuda:0", "some.key", warmups=1)
    assert step.warmups == cudagraphs.WARMUPS  # the stream has not recorded yet
    outs = [step() for _ in range(5)]
    assert calls == [0, "error", 0]  # two warm-ups (the last strict), then the recording's own call
    assert [float(o) for o in outs[:2]] == [1.0, 2.0]  # the warm-ups' results are returned
    assert outs[2] is outs[3] is outs[4] is step.out  # then the graph's outputs, rewritten by each replay
    (g,) = cuda["graphs"]
    assert g.replays == 3 and cuda["gc_in_capture"] == [False] and gc.isenabled()
    # cuBLAS's cached workspaces dropped around the recording: its products get one in its own pool
    assert cuda["events"] == ["clear", "capture", "end", "clear"]
    assert cudagraphs.RECORDINGS == {torch.device("cuda:0"): 1}
    later = cudagraphs.CapturedStep(fn, "cuda:0", "some.key", warmups=1)
    assert later.warmups == 1 and later.stream is step.stream  # one capture stream per device
    other = cudagraphs.CapturedStep(fn, "cuda:1", "some.key", warmups=1)
    assert other.warmups == cudagraphs.WARMUPS and other.stream is not step.stream
    step.close()
    assert g.was_reset and step.graph is None and step.out is None
    assert cuda["pools"] == [None]  # a graph of its own pool by default
    with pytest.raises(ValueError, match="at least one warm-up"):
        cudagraphs.CapturedStep(fn, "cuda:0", "some.key", warmups=0)


def test_a_synchronising_step_and_a_failed_recording_are_named(cuda) -> None:
    def sync():
        if cuda["mode"]["now"] == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        return torch.zeros(1)

    step = cudagraphs.CapturedStep(sync, "cuda:0", "hparams.common.capture_steps", warmups=2)
    step()
    with pytest.raises(RuntimeError, match="hparams.common.capture_steps: the step synchronises with the host"):
        step()
    assert cuda["mode"]["now"] == 0  # the debug mode is restored

    state = {"n": 0}

    def fails_in_capture():
        state["n"] += 1
        if state["n"] > 2:
            raise RuntimeError("operation not permitted when stream is capturing")
        return torch.zeros(1)

    step = cudagraphs.CapturedStep(fails_in_capture, "cuda:0", "evaluation.gen_decode", warmups=2)
    step(), step()
    with pytest.raises(RuntimeError, match="evaluation.gen_decode: recording the step as a CUDA graph failed"):
        step()
    assert step.graph is None and gc.isenabled()
    assert cuda["events"] == ["clear", "capture", "end", "clear"]  # dropped again after a failed recording too


def test_graphs_of_the_shared_pool_record_into_one_pool_per_device(cuda) -> None:
    """shared_pool: one pool per device, which the graphs given it are recorded into."""
    pool = cudagraphs.shared_pool("cuda:0")
    assert cudagraphs.shared_pool(torch.device("cuda", 0)) is pool and cudagraphs.shared_pool("cuda:1") is not pool
    steps = [cudagraphs.CapturedStep(lambda: torch.zeros(1), "cuda:0", "some.key", pool=pool) for _ in range(2)]
    for s in steps:
        for _ in range(s.warmups + 2):
            s()
    assert cuda["pools"] == [pool, pool] and [g.replays for g in cuda["graphs"]] == [2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_graph_replays_after_another_recorded_on_its_stream_is_released() -> None:
    """Every graph is recorded on the one capture stream. Releasing one (a GE decode batch's graph,
    an evicted kept value graph) frees that stream's cached cuBLAS workspace in torch versions that
    clear it on a graph's reset; a graph whose products used it would then write their partial sums
    into whatever takes that memory next. Each recording's products use a workspace of their own
    pool, so after B's release a tensor allocated on the capture stream (where the freed workspace
    would be handed out first) keeps its values through A's replays, and A replays what it did at
    its recording: a skinny bfloat16 product of Llama-3-8B's MLP width (the shape cuBLAS splits over
    a workspace), in a pool of its own and in the shared one."""
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(14336, 4096, device=dev, dtype=torch.bfloat16, generator=gen) / 64
    for m in (8, 50):
        for pool in (None, cudagraphs.shared_pool(dev, fresh=True)):
            x = torch.randn(m, 14336, device=dev, dtype=torch.bfloat16, generator=gen)
            a = cudagraphs.CapturedStep(lambda: x @ w, dev, "test", pool=pool)
            for _ in range(a.warmups):
                a()
            first = a().clone()  # recorded, then its first replay
            b = cudagraphs.CapturedStep(lambda: (2 * x) @ w, dev, "test", pool=pool)
            for _ in range(b.warmups + 2):
                b()
            b.close()
            with torch.cuda.stream(a.stream):  # where a freed workspace of that stream goes first
                taken = torch.full((1 << 20,), float("nan"), device=dev)
            a.stream.synchronize()
            for _ in range(2):
                got = a().clone()
            torch.cuda.synchronize()
            assert torch.equal(got, first), (m, pool is None)
            assert torch.isnan(taken).all(), (m, pool is None)  # nothing wrote into it
            del taken
            a.close()


def test_every_decode_batch_warms_up_twice_before_its_recording(cuda) -> None:
    """editlib.decode._capture: every decode batch's step warms up DECODE_WARMUPS (2) times, also
    once the stream has recorded (a new row count may compile and autotune, which synchronises, in
    the first, lenient warm-up), then records; it returns the graph and its outputs."""
    from editlib import decode
    calls = []

    def fn():
        calls.append(cuda["mode"]["now"])
        return torch.zeros(1)

    for i in range(2):
        calls.clear()
        graph, out = decode._capture(fn, "cuda:0")
        assert calls == [0, "error", 0] and graph is cuda["graphs"][i] and out is not None
    assert decode.DECODE_WARMUPS == 2
