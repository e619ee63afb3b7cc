"""Benchmark (a script, not a test): C0⁻¹K from C0's Cholesky factor, ``torch.cholesky_solve``
against two ``torch.linalg.solve_triangular`` calls (what editlib.solver uses), at Llama-3-8B's
d_in = 14,336 on the CPU, for 1, 64 and 1,000 right-hand sides (a sequential B = 1 edit or the
condition estimate's inverse iteration; a batch; the singular edits of a layer). Prints seconds
and the largest relative difference of the two results.

    python bench/bench_solve.py [--d 14336] [--n 1 64 1000] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=14336)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 64, 1000])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    L = torch.randn(a.d, a.d, dtype=torch.float64, generator=g).tril_() / a.d ** 0.5
    L.diagonal().add_(2.0)  # a well-conditioned lower factor; no O(d³) factorisation needed
    print(f"d = {a.d}, {torch.get_num_threads()} thread(s)")
    for n in a.n:
        K = torch.randn(a.d, n, dtype=torch.float64, generator=g)
        t = time.perf_counter()
        x1 = torch.cholesky_solve(K, L)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        x2 = torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, K, upper=False), upper=True)
        t2 = time.perf_counter() - t
        rel = float((x1 - x2).abs().max() / x1.abs().max())
        print(f"N = {n:5d}: cholesky_solve {t1:7.3f} s   two triangular solves {t2:7.3f} s   "
              f"x{t1 / t2:5.1f}   max rel. difference {rel:.1e}")


if __name__ == "__main__":
    main()
