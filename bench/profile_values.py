"""Benchmark (a script, not a test): where the packed value optimisation spends its time.

Prints, for N facts of the miniature: the tokens the packed forward runs per block against the
padded suffix layout, the share of real attention-score entries in the padded attention (and
with rows grouped by suffix length), and the top operators of one ``compute_values`` call under
``torch.profiler`` (matrix products and attention, the arithmetic, as a share of the self time).
``--z-batch-size 1`` profiles the reference's one-fact loop (a B = 1 sequential edit's values);
``--count-ops`` also counts the tensor operations dispatched per Adam iteration (forward, backward,
loss and update) with a ``TorchDispatchMode``.

    python bench/profile_values.py [--model models/tiny-world] [--n 64] [--z-batch-size N]
        [--layer 1] [--threads 1] [--count-ops]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from editlib.context import make_templates
from editlib.counterfact import sample
from editlib.models import load_model
from editlib.params import resolve
from editlib.tiny import load_tiny_records
from editlib.values import _build, compute_values


def _entries(w: torch.Tensor, p: torch.Tensor) -> int:
    """Attention-score entries of rows padded to the longest suffix w and prefix p."""
    return len(w) * int(w.max()) * (int(p.max()) + int(w.max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/tiny-world")
    ap.add_argument("--params", default="params/tiny.yaml", help="value hyperparameters come from here (MEMIT)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", type=int, default=3, help="suffix-length groups for the attention estimate")
    ap.add_argument("--z-batch-size", type=int, default=None, help="facts optimised together (default --n)")
    ap.add_argument("--count-ops", action="store_true", help="also count tensor operations per Adam iteration")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    facts = sample(load_tiny_records(a.model), a.n)
    ehp = resolve(a.params).hparams["memit"]
    hp = replace(ehp.values, z_batch_size=a.z_batch_size or a.n, packed=True)
    ctx = make_templates(model, tok, ehp.context_templates, seed=0, text=ehp.context_text)

    seq = _build(tok, facts, ctx)
    p = seq.lookup
    w = seq.mask.sum(1) - p
    w[seq.is_kl] = 1  # a KL prompt reads its subject token only
    padded = len(p) * int((seq.mask.sum(1) - p).max())
    real = int((w * (p + w)).sum())
    groups = torch.argsort(w * (int(p.max()) + 1) + p).chunk(a.groups)
    grouped = sum(_entries(w[g], p[g]) for g in groups)
    print(f"{a.n} facts, {len(p)} sequences, layer {a.layer}, threads {torch.get_num_threads()}")
    print(f"tokens per block: packed {int(w.sum())}, padded suffix layout {padded}")
    print(f"attention score entries: real {real / _entries(w, p):.0%} of the padded layout; "
          f"{a.groups} groups by suffix length would leave {grouped / _entries(w, p):.0%}")

    compute_values(model, tok, facts[:4], a.layer, ctx, hp)  # warm-up
    t0 = time.perf_counter()
    res = compute_values(model, tok, facts, a.layer, ctx, hp)
    wall = time.perf_counter() - t0
    # one forward per Adam iteration, and one more that reads the final loss: per chunk, its
    # longest fact's steps + 1
    iters = sum(int(c.max()) + 1 for c in res.steps.split(hp.z_batch_size))
    print(f"compute_values: {wall:.2f} s ({wall / a.n * 1e3:.1f} ms per fact, {wall / iters * 1e3:.2f} ms per "
          f"iteration; {iters} iterations of chunks of {hp.z_batch_size})")
    if a.count_ops:
        from arithmetic_floor import _OpCounter  # the same count as the floor's

        with _OpCounter() as ops:
            compute_values(model, tok, facts, a.layer, ctx, hp)
        print(f"  {ops.n / iters:.0f} tensor operations dispatched per iteration ({ops.n / a.n:.0f} per fact)")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        res = compute_values(model, tok, facts, a.layer, ctx, hp)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"compute_values: {res.seconds:.2f} s under the profiler, {float(res.steps.float().mean()):.1f} Adam steps per fact")
    attn = sum(e.self_cpu_time_total for e in ev if "scaled_dot_product" in e.key)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    print(f"  attention (scaled_dot_product*, forward + backward): {attn / total:.0%} of self CPU time; "
          f"matrix products (mm, addmm, bmm) {mm / total:.0%}")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / total:6.1%}  {e.count:7d} calls")


if __name__ == "__main__":
    main()
