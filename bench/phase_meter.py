"""Per-phase wall time, peak RSS and "what got materialised" for benchmark scripts.

* :class:`PhaseMeter`: ``with meter.phase("load"): ...`` records seconds and the phase's peak
  resident set size. The peak comes from the kernel's high-water mark (``VmHWM``, reset at each
  phase through ``/proc/self/clear_refs``) when the kernel allows the reset, and from a background
  thread sampling ``VmRSS`` every 20 ms otherwise (the larger of the two is kept).
* :class:`BigTensorWatch` (a ``TorchDispatchMode``): every op output of at least ``min_bytes``
  that is not a view or an in-place result is counted by kind, and the tensors still alive are
  tracked (weak references), so a phase reports how many copies of a weight-sized or C0-sized
  tensor existed *at the same time*, and the widest full-vocabulary logits tensor (rows).
* :func:`head_rows`: a forward hook on the LM head counting the rows it projects (vocab logits
  are only needed where a score or loss reads them).
"""
from __future__ import annotations

import contextlib
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from editlib.nethook import observer

GIB = 1024 ** 3


def _status(key: str) -> int:
    """A ``/proc/self/status`` value in bytes (0 when unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss() -> int:
    return _status("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_rss: int = 0
    start_rss: int = 0
    end_rss: int = 0
    big: dict = field(default_factory=dict)  # BigTensorWatch summary
    head: dict = field(default_factory=dict)  # LM-head rows
    note: str = ""


class PhaseMeter:
    """Times phases and records each one's peak RSS (see the module docstring)."""

    def __init__(self, interval: float = 0.02):
        self.phases: list[Phase] = []
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.process_peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            r = rss()
            with self._lock:
                self._peak = max(self._peak, r)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def phase(self, name: str, watch: "BigTensorWatch | None" = None, head: "HeadRows | None" = None):
        ph = Phase(name, start_rss=rss())
        hwm_ok = _reset_hwm()
        with self._lock:
            self._peak = ph.start_rss
        if watch is not None:
            watch.reset()
        if head is not None:
            head.reset()
        t0 = time.perf_counter()
        try:
            yield ph
        finally:
            ph.seconds = time.perf_counter() - t0
            ph.end_rss = rss()
            with self._lock:
                ph.peak_rss = max(self._peak, ph.end_rss, _status("VmHWM") if hwm_ok else 0)
            if watch is not None:
                ph.big = watch.summary()
            if head is not None:
                ph.head = head.summary()
            self.phases.append(ph)
            self.process_peak = max(self.process_peak, ph.peak_rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


class BigTensorWatch(TorchDispatchMode):
    """Counts large op outputs by kind and the most that were alive at once (see module doc).

    ``kinds``: name -> predicate(tensor); the first matching kind wins, "other" otherwise.
    """

    def __init__(self, kinds: dict, min_bytes: int = 64 << 20, vocab: int | None = None):
        super().__init__()
        self.kinds, self.min_bytes, self.vocab = kinds, min_bytes, vocab
        self.reset()

    def reset(self) -> None:
        self.count: dict[str, int] = {}
        self.live: dict[str, int] = {}
        self.peak_live: dict[str, int] = {}
        self.peak_live_bytes: dict[str, int] = {}
        self._live_bytes: dict[str, int] = {}
        self.max_logit_rows = 0
        self.ops: dict[str, int] = {}

    def _kind(self, t: torch.Tensor) -> str:
        for k, pred in self.kinds.items():
            if pred(t):
                return k
        return "other"

    def _gone(self, kind: str, nbytes: int) -> None:
        self.live[kind] = self.live.get(kind, 0) - 1
        self._live_bytes[kind] = self._live_bytes.get(kind, 0) - nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        ins = set()
        for a in list(args) + list((kwargs or {}).values()):
            for t in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    ins.add(t.untyped_storage().data_ptr())
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            nbytes = t.numel() * t.element_size()
            if self.vocab and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.max_logit_rows = max(self.max_logit_rows, t.numel() // self.vocab)
            if nbytes < self.min_bytes or t.untyped_storage().data_ptr() in ins:
                continue
            kind = self._kind(t)
            self.count[kind] = self.count.get(kind, 0) + 1
            name = str(func).split(".")[1] if "." in str(func) else str(func)
            self.ops[f"{kind}:{name}"] = self.ops.get(f"{kind}:{name}", 0) + 1
            self.live[kind] = self.live.get(kind, 0) + 1
            self._live_bytes[kind] = self._live_bytes.get(kind, 0) + nbytes
            self.peak_live[kind] = max(self.peak_live.get(kind, 0), self.live[kind])
            self.peak_live_bytes[kind] = max(self.peak_live_bytes.get(kind, 0), self._live_bytes[kind])
            weakref.finalize(t, self._gone, kind, nbytes)
        return out

    def summary(self) -> dict:
        return {"count": dict(self.count), "peak_live": dict(self.peak_live),
                "peak_live_gib": {k: round(v / GIB, 2) for k, v in self.peak_live_bytes.items()},
                "max_logit_rows": self.max_logit_rows, "ops": dict(self.ops)}


class HeadRows:
    """Forward hook on the LM head: calls and rows projected to the vocabulary."""

    def __init__(self, head: torch.nn.Module):
        self.reset()
        # an observer: the value store stays on under it, as in a run without it
        self._h = head.register_forward_hook(observer(self._hook))

    def reset(self) -> None:
        self.calls, self.rows, self.max_rows = 0, 0, 0

    def _hook(self, mod, inputs, output) -> None:
        n = inputs[0].numel() // inputs[0].shape[-1]
        self.calls += 1
        self.rows += n
        self.max_rows = max(self.max_rows, n)

    def summary(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "max_rows": self.max_rows}

    def close(self) -> None:
        self._h.remove()
