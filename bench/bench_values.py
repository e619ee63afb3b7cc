"""Benchmark (a script, not a test): value optimisation for N facts on the miniature with
z_batch_size 1 (the reference's per-fact loop) vs larger batches. Prints facts/s and the ratio.

    python bench/bench_values.py [--model models/tiny-world] [--n 256] [--layer 1] [--sizes 1 32 128] [--set KEY=VALUE]
"""
from __future__ import annotations

import argparse
import time

import torch

from editlib.context import make_templates
from editlib.models import load_model
from editlib.params import resolve
from editlib.tiny import load_tiny_records
from editlib.counterfact import sample
from editlib.values import compute_values
from dataclasses import replace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/tiny-world")
    ap.add_argument("--params", default="params/tiny.yaml", help="value hyperparameters come from here (MEMIT)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="params override, e.g. --set hparams.common.v_lr=0.5")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    facts = sample(load_tiny_records(a.model), a.n)
    ehp = resolve(a.params, overrides=a.set or None).hparams["memit"]
    hp = ehp.values
    ctx = make_templates(model, tok, ehp.context_templates, seed=0, text=ehp.context_text)
    print(f"model {a.model}  facts {a.n}  layer {a.layer}  threads {torch.get_num_threads()}  "
          f"steps {hp.v_num_grad_steps}  lr {hp.v_lr}")
    base = None
    for zb in a.sizes:
        t0 = time.perf_counter()
        res = compute_values(model, tok, facts, a.layer, ctx, replace(hp, z_batch_size=zb))
        dt = time.perf_counter() - t0
        fps = a.n / dt
        base = base or fps
        print(f"z_batch_size {zb:4d}: {dt:7.2f} s  {fps:8.2f} facts/s  {dt / a.n * 1000:7.1f} ms/fact  "
              f"x{fps / base:5.2f}  mean Adam steps {res.steps.float().mean():.1f}")


if __name__ == "__main__":
    main()
