"""Serial vs local Ray: wall time of the layer search (issue #14; a script, not a timed test).

    python bench/bench_executor.py                       # params smoke and tiny
    python bench/bench_executor.py --params smoke --workers 2 --serial-threads 2

For each params file, in fresh results folders, with C0 of every layer collected first (not timed):

* serial: ``run_layer_search`` in this process, the local executor, torch using
  ``--serial-threads`` threads (default: all cores);
* Ray: a new local Ray cluster of ``--workers`` CPUs, one CPU (one torch thread) per unit; its wall
  time includes starting the workers, each of which loads the model once (what
  ``python -m editlib run layer-search --executor ray`` costs), and the cluster's start is shown
  apart.

Prints both times, the speed-up, and whether both stored the same ``cases.parquet`` (compared
after sorting by unit keys; torch's thread count may change float rounding, so a difference
with several serial threads is not an error).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from editlib import executor, protocols  # noqa: E402
from editlib.params import resolve  # noqa: E402

KEYS = ["method", "layer", "ordering", "batch_index", "case_id"]


def quiet(*_a, **_k) -> None:
    pass


def timed_layer_search(study, results_dir: str, kind: str) -> float:
    """Wall seconds of one layer search into ``results_dir`` on executor ``kind``."""
    p = resolve(study.params.source, overrides={"results_dir": results_dir, "executor.kind": kind})
    t0 = time.perf_counter()
    protocols.run_layer_search(dataclasses.replace(study, params=p), log=quiet)
    return time.perf_counter() - t0


def same_cases(a: str, b: str, name: str) -> bool:
    x, y = (pd.read_parquet(Path(d) / name / "layer_search" / "cases.parquet") for d in (a, b))
    x, y = (d.sort_values(KEYS).reset_index(drop=True) for d in (x, y))
    return x.equals(y)


def bench(params: str, workers: int, serial_threads: int) -> dict:
    import ray

    p = resolve(params)
    study = protocols.open_study(p, experiments=["layer_search"], log=quiet)
    layers = list(range(study.n_layers)) if p.layer_search.layers == "all" else list(p.layer_search.layers)
    study.prepare_covs(layers)  # C0 cached before timing
    ls = p.layer_search
    units = len(layers) * len(p.data.orderings)
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(serial_threads)
        serial = timed_layer_search(study, f"{tmp}/serial", "local")
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        start = time.perf_counter() - t0
        try:
            on_ray = timed_layer_search(study, f"{tmp}/ray", "ray")
        finally:
            executor.shutdown()
            ray.shutdown()
        same = same_cases(f"{tmp}/serial", f"{tmp}/ray", p.name)
    return {"params": p.name, "units": units, "facts": ls.n_facts, "methods": len(ls.methods),
            "serial_s": serial, "ray_start_s": start, "ray_s": on_ray, "same": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", nargs="+", default=["smoke", "tiny"])
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray cluster (one unit each)")
    ap.add_argument("--serial-threads", type=int, default=os.cpu_count(), help="torch threads of the serial run")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"{os.cpu_count()} CPU cores; serial: {a.serial_threads} torch thread(s); Ray: {a.workers} worker(s) x 1 thread")
    print(f"{'params':8s} {'units':>5s} {'serial s':>9s} {'Ray s':>8s} {'(+start)':>9s} {'speed-up':>8s}  same cases")
    for params in a.params:
        r = bench(params, a.workers, a.serial_threads)
        total = r["ray_s"] + r["ray_start_s"]
        print(f"{r['params']:8s} {r['units']:5d} {r['serial_s']:9.1f} {r['ray_s']:8.1f} {r['ray_start_s']:+9.1f} "
              f"{r['serial_s'] / total:7.2f}x  {'yes' if r['same'] else 'no'}"
              f"   ({r['facts']} facts x {r['methods']} methods per unit; speed-up counts the cluster start)",
              flush=True)


if __name__ == "__main__":
    main()
