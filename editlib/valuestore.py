"""Values optimised once, kept on disk and read back instead of optimised again.

Every protocol optimises its values chunk by chunk (``z_batch_size`` facts at a time,
:func:`editlib.values.compute_values`). A chunk's result depends on nothing but its inputs and the
weights it runs on, and a study optimises the same chunks several times: on the unedited model the
first facts of an ordering at the chosen layer are a chunk of the layer search, of Table 1, of the
λ sweep, of batch editing and of every sequential run's first batch; on edited weights, a sequential
run shares its batches with any run that edits the same facts the same way before them (notebook
07's one-fact MEMIT and EMMET runs are the first 32 batches of notebook 05's, and a rerun with other
evaluation settings repeats every batch). A :class:`ValueStore` keeps each chunk's result under a
digest of everything it depends on (:meth:`ValueStore.key`) and hands it back to the next
experiment that asks for the same chunk; what it hands back is what that experiment would have
computed, so no stored number moves (``evaluation.share_values_gb``; 0 turns it off).

What the digest covers: the unedited model's fingerprint (config, weights, every down-projection
in full), the edits on it (:func:`editlib.weights.edit_history`: every low-rank update one edit
session wrote, in order, to the bit), the layer, every value hyperparameter, the chunk's token ids,
positions and loss weights (so its facts, their order, the context templates and the tokenizer),
how this process computes (torch and transformers versions, numerics mode and threads, the CPU
type, device, GPU type and CUDA versions, dtype, deterministic algorithms, TF32, the model's
attention implementation, and the process-wide switches that choose kernels: attention backends,
16-bit reductions, autocast on the CPU and the model's device) and the
source of editlib itself as the process imported it (a changed line of code is a new key). The
store serves only a model whose weights it can name that way (the unedited ones, or one session's
low-rank updates on them; not a dense update, a second session's write or a tensor written
otherwise) and that carries no forward hook. Saves stop at about ``share_values_gb`` per process
(workers of a cluster count apart); nothing is ever removed (delete the folder to reclaim the
space).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import warnings
from dataclasses import asdict, fields
from functools import lru_cache
from pathlib import Path

import torch

from . import numerics
from .below import hooked_module
from .store import atomic_write_bytes
from .tf32 import tf32_applies
from .values import ValueResult, _kernel_settings
from .weights import edit_history

#: the results folder's subfolder that holds the store (``<results_dir>/_values``)
FOLDER = "_values"
FORMAT = 1


def _source_digest() -> str:
    """sha256 of every Python source file of the editlib package (relative path and bytes)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


#: editlib's source as this process imported it (read at import: a file edited later is not the
#: code that runs here)
SOURCE_DIGEST = _source_digest()


@lru_cache(maxsize=1)
def _cpu() -> dict:
    """The CPU type: model name, family, model and stepping (two CPUs of one marketing name can
    differ in vector width), and torch's kernels for it."""
    info = numerics.cpu_info()
    if info is None:
        return {"capability": torch.backends.cpu.get_cpu_capability(), "processor": platform.processor()}
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            **{k: v for k, v in info.items() if k in ("model name", "cpu family", "model", "stepping")}}


def _environment(model) -> dict:
    """How this process computes: what decides the last bits of a value besides its inputs."""
    import transformers
    p = next(model.parameters())
    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "numerics": numerics.current(), "threads": torch.get_num_threads(), "cpu": _cpu(),
           "device": str(p.device), "dtype": str(p.dtype),
           "deterministic": torch.are_deterministic_algorithms_enabled(), "tf32": tf32_applies(model),
           "kernels": [str(v) for v in _kernel_settings()],  # SDPA backends, 16-bit reductions, CUDA autocast
           "autocast": [str(v) for d in dict.fromkeys(("cpu", p.device.type))
                        for v in (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))],
           "attention": str(getattr(model.config, "_attn_implementation", None)),  # eager / sdpa / flash
           "editlib_source": SOURCE_DIGEST}
    if p.device.type == "cuda":
        env["gpu"] = {"name": torch.cuda.get_device_name(p.device),
                      "capability": list(torch.cuda.get_device_capability(p.device)),
                      "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return env


def _tensor_digest(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


class ValueStore:
    """One folder of chunk results (``root``) for the unedited model of ``fingerprint``. Saves stop
    once the folder holds about ``limit_bytes`` (reads never do); ``hits`` and ``misses`` count
    this object's lookups."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, limit_bytes: int):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.limit_bytes = int(limit_bytes)
        self.hits = 0
        self.misses = 0
        self._used: int | None = None
        self._full_warned = False
        self._hook_warned = False

    def serves(self, model) -> bool:
        """Whether values of ``model`` as it is now may be read or kept: its weights are known
        (:func:`editlib.weights.edit_history`: the unedited ones, or those one edit session wrote
        on them by low-rank updates, which the key then covers) and no forward hook is on it (a hook
        can change what a forward computes)."""
        if edit_history(model) is None:
            return False
        hook = hooked_module(model.modules())
        if hook is not None and not self._hook_warned:
            self._hook_warned = True
            where = "a global forward hook" if hook == "global" else "a forward hook on " + next(
                (n or "the model" for n, m in model.named_modules() if m is hook), type(hook).__name__)
            warnings.warn(f"value store: {where}: values are optimised, not read back or kept, while it is "
                          f"there", RuntimeWarning, stacklevel=2)
        return hook is None

    def key(self, model, layer: int, hp, seq) -> str:
        """The digest of one chunk's value optimisation (``seq``: the chunk's
        :class:`editlib.values._Seqs`, ``hp``: its :class:`editlib.values.ValueHParams`)."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT, "model": self.fingerprint, "edits": edit_history(model),
                             "layer": int(layer), "hparams": asdict(hp), "environment": _environment(model)},
                            sort_keys=True, default=str).encode())
        for f in fields(seq):
            _tensor_digest(h, f.name, getattr(seq, f.name))
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def load(self, key: str, n: int, d: int):
        """The stored :class:`editlib.values.ValueResult` of ``key`` (``n`` facts, width ``d``), or
        None. A file that cannot be read or does not hold ``n`` facts of width ``d`` is left to be
        overwritten, with a warning."""
        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
            res = ValueResult(z=doc["z"], h=doc["h"], final_loss=doc["final_loss"], steps=doc["steps"],
                              fail_reason=list(doc["fail_reason"]), stalled=doc["stalled"])
            ok = (tuple(res.z.shape) == (d, n) and tuple(res.h.shape) == (d, n) and len(res.fail_reason) == n
                  and all(t.shape == (n,) for t in (res.final_loss, res.steps, res.stalled)))
        except Exception as e:  # noqa: BLE001 - any unreadable file is recomputed
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = f"it does not hold {n} facts of width {d}"
        if not ok:
            warnings.warn(f"value store: {path} cannot be used ({why}); the chunk is optimised again",
                          RuntimeWarning, stacklevel=2)
            self.misses += 1
            return None
        self.hits += 1
        return res

    def save(self, key: str, res) -> None:
        """Keep ``res`` (one chunk's :class:`editlib.values.ValueResult`) under ``key``, atomically,
        unless the folder is full."""
        buf = io.BytesIO()
        torch.save({"z": res.z.detach().cpu(), "h": res.h.detach().cpu(), "final_loss": res.final_loss.cpu(),
                    "steps": res.steps.cpu(), "stalled": res.stalled.cpu(), "fail_reason": list(res.fail_reason)},
                   buf)
        data = buf.getvalue()
        if self._used is None:
            self._used = sum(p.stat().st_size for p in self.root.glob("*.pt")) if self.root.is_dir() else 0
        if self._used + len(data) > self.limit_bytes:
            if not self._full_warned:
                warnings.warn(f"value store: {self.root} holds {self._used / 1e9:.2f} GB, the limit of "
                              f"evaluation.share_values_gb; later chunks are not kept", RuntimeWarning, stacklevel=2)
                self._full_warned = True
            return
        atomic_write_bytes(self._path(key), data)
        self._used += len(data)
