"""Benchmark (a script, not a test): C0's rank-T update Σkkᵀ += KᵀK as one full GEMM against the
block upper triangle that ``editlib.stats.add_gram`` computes (mirrored once at the end).

Prints seconds per update for a d_in-wide batch of T tokens (Llama-3-8B's down-projection input by
default) and the agreement of the two results. ``--fast-gram``: bfloat16 keys instead, and the
update with float64 products (the default) against ``covariance.fast_gram``'s float32 products
(TF32 tensor cores on CUDA), both into a float64 sum; on CUDA with 16-bit products
(``editlib.stats.products_16bit``) a second line times fast_gram's products of the bfloat16 keys
themselves on 16-bit tensor cores, what a run uses there.

    python bench/bench_gram.py [--d 14336] [--tokens 2048] [--reps 3] [--device cpu|cuda] [--threads 2]
        [--fast-gram]
"""
from __future__ import annotations

import argparse
import time

import torch

from editlib import stats
from editlib.tf32 import tf32_matmuls


def _time(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fast-gram", action="store_true", help="bfloat16 keys: float64 against float32 products")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.fast_gram:
        return fast_gram(a)
    g = torch.Generator(device=a.device).manual_seed(0)
    k = torch.randn(a.tokens, a.d, generator=g, device=a.device, dtype=torch.float64)
    full, tri = (torch.zeros(a.d, a.d, dtype=torch.float64, device=a.device) for _ in range(2))
    t_full = _time(lambda: full.addmm_(k.T, k), a.reps, a.device)
    t_tri = _time(lambda: stats.add_gram(tri, k), a.reps, a.device)
    n = a.reps + 1
    got = stats.symmetrize_upper(tri)
    err = float((got - full).norm() / full.norm())
    b = stats.gram_blocks(a.d)
    print(f"d_in {a.d}, {a.tokens} tokens, float64 on {a.device} ({torch.get_num_threads()} threads): "
          f"one GEMM {t_full:.3f} s; block upper triangle ({b} column blocks, "
          f"{stats.gram_macs(a.d) / a.d ** 2:.0%} of the multiply-adds) {t_tri:.3f} s: "
          f"x{t_full / t_tri:.2f}; after {n} updates each, relative difference {err:.1e}")


def fast_gram(a) -> None:
    """The block-triangle update of bfloat16 keys: float64 products against float32 ones."""
    dev = torch.device(a.device)
    g = torch.Generator(device=a.device).manual_seed(0)
    k16 = torch.randn(a.tokens, a.d, generator=g, device=dev).to(torch.bfloat16)
    exact, fast = (torch.zeros(a.d, a.d, dtype=torch.float64, device=dev) for _ in range(2))

    def fast_update():
        with tf32_matmuls(dev):
            stats.add_gram(fast, k16.float())

    t_exact = _time(lambda: stats.add_gram(exact, k16.double()), a.reps, a.device)
    t_fast = _time(fast_update, a.reps, a.device)
    got, ref = stats.symmetrize_upper(fast), stats.symmetrize_upper(exact)
    err = float((got - ref).norm() / ref.norm())
    print(f"d_in {a.d}, {a.tokens} bfloat16 tokens on {a.device} ({torch.get_num_threads()} threads), "
          f"block upper triangle into float64: float64 products {t_exact:.3f} s, float32 products "
          f"(covariance.fast_gram{', TF32' if dev.type == 'cuda' else ''}) {t_fast:.3f} s: x{t_exact / t_fast:.2f}; "
          f"after {a.reps + 1} updates each, relative difference {err:.1e}")
    if stats.products_16bit(dev):
        half = torch.zeros(a.d, a.d, dtype=torch.float64, device=dev)
        t_half = _time(lambda: stats.add_gram(half, k16), a.reps, a.device)
        err16 = float((stats.symmetrize_upper(half) - ref).norm() / ref.norm())
        print(f"16-bit products (covariance.fast_gram on 16-bit tensor cores) {t_half:.3f} s: "
              f"x{t_exact / t_half:.2f} over float64 products, x{t_fast / t_half:.2f} over TF32; "
              f"relative difference {err16:.1e}")


if __name__ == "__main__":
    main()
