"""Profile (a script, not a test): where one sequential B = 1 edit spends its time on the miniature.

Runs ``--warmup`` one-fact sequential edits, then profiles ``--n`` more (prepare_targets: values,
keys, residual; the solve and weight write; the one-fact evaluation) with cProfile, one thread, and
prints the time per fact and the top functions by cumulative time.

    python bench/profile_sequential.py [--n 20] [--layer 0] [--method memit] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import torch

from editlib import protocols
from editlib.editing import prepare_targets
from editlib.params import resolve
from editlib.weights import EditSession


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--method", default="memit")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    p = resolve(a.params)
    st = protocols.open_study(p, experiments=["layer_search"], log=lambda *x: None)
    facts = st.facts(a.warmup + a.n)
    hp = p.method_hparams(a.method, a.layer, "sequential")
    ctx = st.contexts(hp.context_templates, hp.context_text)
    st.covs([a.layer])

    def edits(fs) -> None:
        with EditSession(st.model) as s:
            for f in fs:
                tg = prepare_targets(st.model, st.tok, [f], hp, ctx)
                protocols._edit_and_eval(st, [f], hp, ctx, tg, s)

    edits(facts[:a.warmup])
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    edits(facts[a.warmup:])
    prof.disable()
    print(f"{(time.perf_counter() - t0) / a.n * 1000:.1f} ms per one-fact sequential edit "
          f"(layer {a.layer}, {a.method}, 1 thread, incl. evaluation)")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
