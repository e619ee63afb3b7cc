"""Benchmark (a script, not a test): the blocks below the edited layer shared across evaluations.

Runs the layer search (``--ls-facts`` facts × every layer × ROME, MEMIT), the λ sweep (one batch
of ``--sweep-facts``, tiny.yaml's 16 + 16 λ) and batch editing (MEMIT and EMMET over
``--batch-facts`` facts at ``--batch-sizes``) once with ``evaluation.share_below_gb`` 0 (every
evaluation runs every block) and once with the params' value (editlib.below), alternating for
``--rounds`` rounds on the same study, and prints per experiment the summed evaluation seconds
(``seconds_eval`` of batches.parquet) and the wall time of each round. It then checks that the
two settings stored the same cases to the bit.

    python bench/bench_shared_below.py [--params params/tiny.yaml] [--rounds 2] [--threads 2]
        [--ls-facts 100] [--sweep-facts 128] [--batch-facts 128] [--batch-sizes 4 16 64 128] [--layer 1]
        [--skip layer_search,sweep,batch] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from editlib import protocols
from editlib.params import resolve

RUNNERS = {"layer_search": protocols.run_layer_search, "sweep": protocols.run_sweep, "batch": protocols.run_batch}
KEY = ["method", "layer", "lam", "batch_size", "batch_index", "case_id"]
SCORES = ["ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag", "ES_acc", "PS_acc", "NS_acc"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ls-facts", type=int, default=100)
    ap.add_argument("--sweep-facts", type=int, default=128)
    ap.add_argument("--batch-facts", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16, 64, 128])
    ap.add_argument("--layer", type=int, default=1, help="edited layer of the sweep and batch editing (1)")
    ap.add_argument("--skip", default="")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(RUNNERS):
        ap.error(f"--skip: unknown experiment(s) {sorted(skip - set(RUNNERS))}; known: {', '.join(RUNNERS)}")
    torch.set_num_threads(a.threads)
    log = lambda *_a, **_k: None  # noqa: E731
    sizes = {"layer_search": {"layer_search.n_facts": a.ls_facts, "layer_search.layers": "all",
                              "layer_search.methods": ["rome", "memit"]},
             "sweep": {"sweep.total": a.sweep_facts, "sweep.batch_size": a.sweep_facts, "sweep.layer": a.layer},
             "batch": {"batch.total": a.batch_facts, "batch.batch_sizes": a.batch_sizes, "batch.layer": a.layer,
                       "batch.methods": ["memit", "emmet"], "batch.windows": [1]}}
    with tempfile.TemporaryDirectory(prefix="editlib-bench-below-") as tmp:
        def params(name: str, **over):
            sets = [*a.set, f"results_dir={tmp}", f"name={name}", "data.orderings=[0]"]
            return resolve(a.params, overrides=sets + [f"{k}={json.dumps(v)}" for k, v in over.items()])

        p0 = params("open")
        study = protocols.open_study(p0, experiments=[], log=log)
        study.covs(range(study.n_layers))
        on_gb = float(p0.evaluation.share_below_gb)
        if on_gb <= 0:
            ap.error("the params turn sharing off (evaluation.share_below_gb 0): --set evaluation.share_below_gb=2")
        print(f"model {study.label} ({study.n_layers} layers), threads {torch.get_num_threads()}, "
              f"share_below_gb 0 against {on_gb:g}")
        seconds: dict = {}
        cases: dict = {}
        for r in range(a.rounds):
            for gb in ((0.0, on_gb) if r % 2 == 0 else (on_gb, 0.0)):
                for exp, runner in RUNNERS.items():
                    if exp in skip:
                        continue
                    p = params(f"r{r}-{gb:g}-{exp}", **{**sizes[exp], "evaluation.share_below_gb": gb})
                    t0 = time.perf_counter()
                    df = runner(dataclasses.replace(study, params=p), log=log)
                    wall = time.perf_counter() - t0
                    b = pd.read_parquet(Path(tmp) / p.name / exp / "batches.parquet")
                    seconds.setdefault((exp, gb), []).append((float(b.seconds_eval.sum()), wall))
                    k = [c for c in KEY if c in df.columns]
                    cases.setdefault((exp, gb), df.sort_values(k).reset_index(drop=True)[k + SCORES])
        print("| experiment | evaluation, every block (s) | evaluation, blocks below shared (s) | ratio | wall, every block (s) | wall, shared (s) |")
        print("|---|---|---|---|---|---|")
        for exp in [e for e in RUNNERS if e not in skip]:
            off, on = seconds[(exp, 0.0)], seconds[(exp, on_gb)]
            ev_off, ev_on = [x[0] for x in off], [x[0] for x in on]
            ratio = sum(ev_off) / sum(ev_on)
            print(f"| {exp} | {', '.join(f'{x:.2f}' for x in ev_off)} | {', '.join(f'{x:.2f}' for x in ev_on)} | "
                  f"{ratio:.2f}x | {', '.join(f'{x[1]:.1f}' for x in off)} | {', '.join(f'{x[1]:.1f}' for x in on)} |")
            same = cases[(exp, 0.0)].equals(cases[(exp, on_gb)])
            print(f"  {exp}: cases {'identical to the bit' if same else 'DIFFER'} between the two settings")
            if not same:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
