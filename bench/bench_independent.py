"""Benchmark (a script, not a test): independent edits evaluated together (editlib.lowrank) against
the reference path (edit, evaluate, restore one edit at a time), on the same prepared targets.

For ``--facts`` facts at ``--layer`` of params/tiny.yaml's miniature it times, per method, the part
of the singular protocol (the layer search / Table 1) and of the batch protocol (``--batch-sizes``)
that comes after the value optimisation: solves, weight writes/restores and evaluation (ES/PS/NS,
and GE with ``--ge``). Both paths get the very same targets; it also checks that they agree
(largest |ΔES_mag| over all cases).

    python bench/bench_independent.py [--facts 128] [--layer 0] [--batch-sizes 4 16 64]
        [--ge] [--gen-max-len 30] [--threads 2] [--params params/tiny.yaml]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from editlib import protocols
from editlib.editing import prepare_targets
from editlib.params import resolve
from editlib.weights import EditSession


def _reference(study, facts, hp, ctx, tg, chunks):
    out = []
    for idx in chunks:
        with EditSession(study.model) as s:
            out.append(protocols._edit_and_eval(study, [facts[i] for i in idx], hp, ctx,
                                                protocols._slice(tg, list(idx)), s))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--facts", type=int, default=128)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--methods", nargs="+", default=["memit", "emmet"])
    ap.add_argument("--ge", action="store_true", help="evaluate GE too (batched generation)")
    ap.add_argument("--gen-max-len", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = resolve(a.params, overrides={"evaluation.generation": a.ge, "evaluation.gen_max_len": a.gen_max_len})
    study = protocols.open_study(p, experiments=["layer_search"], log=lambda *x: None)
    facts = study.facts(a.facts)
    study.covs([a.layer])
    print(f"{a.facts} facts, layer {a.layer}, GE {'on (' + str(a.gen_max_len) + ' tokens)' if a.ge else 'off'}, "
          f"{a.threads} threads")
    print("| protocol | method | reference path (s) | batched (s) | speed-up | max abs diff ES_mag |")
    print("|---|---|---|---|---|---|")
    for method in a.methods:
        hp = p.method_hparams(method, a.layer, "batch")
        ctx = study.contexts(hp.context_templates, hp.context_text)
        tg = prepare_targets(study.model, study.tok, facts, hp, ctx)
        for label, size in [("singular", 1), *((f"batch B={b}", b) for b in a.batch_sizes)]:
            chunks = [list(range(s, min(s + size, len(facts)))) for s in range(0, len(facts), size)]
            t0 = time.perf_counter()
            ref = _reference(study, facts, hp, ctx, tg, chunks)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = protocols._independent_edits(study, facts, hp, tg, chunks)
            t_bat = time.perf_counter() - t0
            diff = max(float(np.nanmax(np.abs(g[0]["ES_mag"].to_numpy() - r[0]["ES_mag"].to_numpy())))
                       for g, r in zip(got, ref))
            print(f"| {label} | {method} | {t_ref:.2f} | {t_bat:.2f} | {t_ref / t_bat:.1f}× | {diff:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
