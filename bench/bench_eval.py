"""Benchmark (a script, not a test): the probability test (ES/PS/NS, no generation) on N facts of
the miniature, all in one call and one fact per call (as the singular and B = 1 protocols do).

    python bench/bench_eval.py [--model models/tiny-world] [--n 256] [--batch-size 128] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from editlib.counterfact import sample
from editlib.metrics import evaluate_records
from editlib.models import load_model
from editlib.tiny import load_tiny_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/tiny-world")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    facts = sample(load_tiny_records(a.model), a.n)
    evaluate_records(model, tok, facts[:8], batch_size=a.batch_size)  # warm-up
    print(f"model {a.model}  facts {a.n}  threads {torch.get_num_threads()}  batch_size {a.batch_size}")
    for label, calls in (("one call", [facts]), ("one fact per call", [[f] for f in facts[:64]])):
        best = float("inf")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            for c in calls:
                evaluate_records(model, tok, c, batch_size=a.batch_size)
            best = min(best, time.perf_counter() - t0)
        n = sum(len(c) for c in calls)
        print(f"{label:18s}: {n:5d} facts {best:7.2f} s  {best / n * 1000:7.1f} ms/fact  {n / best:7.1f} facts/s")


if __name__ == "__main__":
    main()
