"""TF32 matmuls on CUDA: the one place that reads and switches them (``model.tf32``, fast_gram).

torch has two switches for one state: the legacy ``allow_tf32`` booleans and, from 2.9, the
``fp32_precision`` strings ("ieee", "tf32", "none": inherit ``torch.backends.fp32_precision``).
Once anything (a notebook, another library) sets ``fp32_precision`` to "tf32", *reading* a legacy
boolean raises ("mix of the legacy and new APIs", torch 2.13), while writing one never does and
keeps both readable. So editlib reads the new string where torch has it and writes the legacy
booleans.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["matmul_tf32", "set_tf32", "tf32_applies", "tf32_matmuls"]


def matmul_tf32() -> bool:
    """Whether float32 matmuls on CUDA may use TF32 tensor cores now (whichever API set it)."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):  # torch before 2.9: only the legacy switch exists
        return bool(m.allow_tf32)
    p = m.fp32_precision
    if p == "none":
        p = getattr(torch.backends, "fp32_precision", "ieee")
    return p == "tf32"


def tf32_applies(model) -> bool:
    """Whether ``model``'s forward passes run float32 matmuls on TF32 tensor cores now: float32
    weights on a CUDA device while TF32 is on (``model.tf32``, or whatever else set it). Its
    outputs then move by ~1e-3 relative, so what they produce (C0 entries, results folders) is
    keyed apart; nowhere else does TF32 change a number."""
    p = next(model.parameters())
    return p.device.type == "cuda" and p.dtype == torch.float32 and matmul_tf32()


def set_tf32(on: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN (``model.tf32``): off by default, as the reference ran
    (torch's default since 1.12); on, GEMMs round their inputs to 10-bit mantissas (~1e-3
    relative). Process-wide."""
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    torch.backends.cudnn.allow_tf32 = bool(on)


@contextlib.contextmanager
def tf32_matmuls(device: torch.device, on: bool = True) -> Iterator[None]:
    """TF32 tensor cores for float32 matmuls on a CUDA ``device`` inside the block (``on=False``:
    IEEE float32 products, whatever ``model.tf32`` set), the previous state restored after; a
    no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    before = matmul_tf32()
    torch.backends.cuda.matmul.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
