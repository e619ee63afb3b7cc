"""Which CPU kernels compute the numbers: portable (the same bits on any x86-64 CPU with AVX2) or
native (each CPU's fastest kernels).

Float32 sums are not associative, so the last bits of a result depend on the order in which the
kernels add: torch's own vectorised kernels follow the CPU's vector width (AVX2, AVX-512), MKL's
BLAS and LAPACK pick a code path per CPU type and vendor, and both split work by thread count. On
the miniature that moves numerically sensitive configurations (large-batch MEMIT, small λ, the
sequential diagnostics) in their last printed digits from one CPU type to another. Portable numerics
pins all three before torch starts: torch's kernels at ``ATEN_CPU_CAPABILITY=avx2``, MKL in its
conditional-numerical-reproducibility mode ``MKL_CBWR=COMPATIBLE`` (the one branch Intel documents as
reproducible across vendors) and a fixed thread count. It costs time (measured on the miniature:
about 1.5x for value optimisation, 1.7x for make reproduce), so only ``reproduce`` of a CPU study
uses it by default (docs/correctness.md). Environment variables only: they must be set before torch
is imported, which is why they are applied to the notebook kernels ``reproduce`` starts, not to
this process.
This module does not import torch.
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

__all__ = ["MODES", "PORTABLE_THREADS", "PINS", "ENV", "Numerics", "choose", "cpu_flags", "cpu_info", "current", "cache_tag"]

MODES = ("auto", "portable", "native")
#: the thread count of the committed figures: portable bits also depend on it (work is split per thread)
PORTABLE_THREADS = 2
#: what portable numerics set besides the thread counts: torch's kernels and MKL's branch
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
#: set in a kernel's environment to the mode it runs under (recorded in manifests)
ENV = "EDITLIB_NUMERICS"


@dataclass(frozen=True)
class Numerics:
    """A chosen mode: the environment the kernels get, and one line for the log."""

    mode: str
    env: dict
    note: str


def cpu_info(path: str = "/proc/cpuinfo") -> dict[str, str] | None:
    """The first processor's fields of ``/proc/cpuinfo`` (Linux: "model name", "cpu family",
    "model", "stepping", "flags", ...), or None where they cannot be read."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return out


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (Linux), or None where they cannot be read."""
    flags = (cpu_info(path) or {}).get("flags")
    return set(flags.split()) if flags is not None else None


def choose(mode: str, *, devices: tuple[str, ...] = ("cpu",), threads: int | None = None) -> Numerics:
    """The numerics for ``mode``: ``auto`` is portable when every model of the study runs on the
    CPU (its numbers are the CPU's) and native otherwise; ``portable`` falls back to native, saying
    why, on a CPU without AVX2 (torch would not check, and stop on an illegal instruction).
    ``threads``: OMP/MKL threads (portable default: :data:`PORTABLE_THREADS`)."""
    if mode not in MODES:
        raise ValueError(f"numerics: {mode!r} is not one of {', '.join(MODES)}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads: must be at least 1, got {threads}")

    def native(note: str) -> Numerics:  # threads as given, else inherited
        env = {k: str(int(threads)) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} if threads else {}
        return Numerics("native", {**env, ENV: "native"},
                        f"native numerics ({note}" + (f"; {int(threads)} thread(s) per kernel)" if threads else ")"))

    if mode == "auto":
        gpu = [d for d in devices if not str(d or "cpu").startswith("cpu")]
        if gpu:
            return native(f"the study runs on {gpu[0]}; --numerics portable pins its CPU kernels")
        mode = "portable"
    if mode == "native":
        return native("this CPU's fastest kernels")
    arch, fl = platform.machine(), cpu_flags()
    x86 = arch.lower() in ("x86_64", "amd64")
    if not x86 or fl is None or "avx2" not in fl:
        why = (f"this CPU is {arch or 'of unknown architecture'}" if not x86
               else "no AVX2 in the CPU's flags" if fl is not None else "the CPU's flags cannot be read")
        return native(f"portable needs an x86-64 CPU with AVX2: {why}; the last digits of sensitive "
                      "configurations may differ from the committed figures")
    n = int(threads) if threads else PORTABLE_THREADS
    env = {**PINS, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n), ENV: "portable"}
    note = (f"portable numerics (torch AVX2 kernels, MKL_CBWR=COMPATIBLE, {n} threads"
            + ("" if n == PORTABLE_THREADS else f"; the committed figures used {PORTABLE_THREADS}") + ")")
    return Numerics("portable", env, note)


def current() -> dict:
    """This process's numerics settings, for manifests (what the environment asked for: the mode
    reproduce set, else portable where the pins were set by hand)."""
    pinned = all(os.environ.get(k) == v for k, v in PINS.items()) and bool(os.environ.get("OMP_NUM_THREADS"))
    return {"mode": os.environ.get(ENV) or ("portable" if pinned else "native"),
            **{k.lower(): os.environ[k] for k in PINS if os.environ.get(k)}}


def cache_tag() -> str | None:
    """What a cached result computed in this process depends on beyond its inputs: ``portable-<threads>``
    under portable numerics (the same bits on any x86-64 CPU with AVX2 at that thread count), None
    natively (a native entry's bits are this machine's, as they always were). The C0 cache keys its
    entries by it, so a portable study never reads a C0 collected natively (it moves the sequential
    diagnostics at about 1e-6 relative) and native and portable entries live side by side."""
    cur = current()
    if cur["mode"] != "portable":
        return None
    return f"portable-{os.environ.get('OMP_NUM_THREADS') or os.environ.get('MKL_NUM_THREADS') or 'default'}"
