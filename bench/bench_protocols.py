"""Benchmark (a script, not a test): wall-clock seconds of the editing protocols on the miniature.

Prints, for params/tiny.yaml's hyperparameters (25 value steps, z_batch_size 64) unless overridden:

* layer search: ``--ls-facts`` facts (200) x every layer x 2 methods (ROME, MEMIT);
* batch MEMIT at B = total = ``--facts`` (the paper's B = 1024; the miniature has only 1000
  records, so the default is B = total = 1000, one batch), or at each of ``--batch-sizes``;
* sequential-batch MEMIT at B = ``--seq-batch`` (64) over ``--facts`` facts (1000: 16 batches),
  once with tiny.yaml's z_batch_size and once with ``hparams.common.z_batch_size = 1`` (the
  reference's per-fact value loop), and the ratio;
* evaluation records/s (ES/PS/NS, no generation) on ``--facts`` facts of the unedited model, and as
  measured inside the protocols.

Every run writes into a fresh temporary results_dir, so nothing is reused (C0 comes from the user
cache when present; its time is reported separately and not included). The full run takes a long
time on 2 shared cores; ``--quick`` divides the fact counts by 5 (40-fact layer search, 200 facts;
the sequential batch size stays 64, so 4 batches).

    python bench/bench_protocols.py [--quick] [--facts 1000] [--ls-facts 200] [--seq-batch 64]
        [--batch-sizes 4 16] [--layer 1] [--threads 2] [--set KEY=VALUE ...]
        [--skip layer_search,batch,...] [--keep DIR] [--json FILE]

Only parameter keys that every version of editlib knows are set, so the same script times an older
checkout (``PYTHONPATH=<checkout> python bench/bench_protocols.py ...``) for before/after tables.
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

PARTS = ("layer_search", "batch", "sequential", "sequential_z1", "evaluation")


def _batches(p, experiment: str) -> pd.DataFrame:
    path = Path(p.results_dir) / p.name / experiment / "batches.parquet"
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def _timed(study, runner, p, label: str, log) -> tuple[float, pd.DataFrame, pd.DataFrame]:
    st = dataclasses.replace(study, params=p)
    if hasattr(st, "_of_unedited"):  # each timed run measures the unedited model itself (a fresh study would)
        st._of_unedited = {}
    t0 = time.perf_counter()
    cases = runner(st, log=log)
    dt = time.perf_counter() - t0
    return dt, cases, _batches(p, label)


def _phase_split(b: pd.DataFrame, shared_values: bool = False) -> str:
    """Summed phase times from batches.parquet. ``shared_values``: the methods share each fact's
    values (the layer search, same value settings) and every method's row carries its share, so
    they are counted once."""
    if b.empty:
        return ""
    s = {k: b[f"seconds_{k}"].sum() for k in ("values", "keys", "solve", "eval") if f"seconds_{k}" in b}
    if shared_values and "seconds_values" in b:
        s["values"] = b.groupby(["layer", "batch_index"]).seconds_values.max().sum()
    return "  [" + ", ".join(f"{k} {v:.1f}s" for k, v in s.items()) + "]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--facts", type=int, default=1000, help="facts for batch / sequential / evaluation (1000)")
    ap.add_argument("--ls-facts", type=int, default=200, help="facts of the layer search (200)")
    ap.add_argument("--seq-batch", type=int, default=64, help="sequential batch size (64)")
    ap.add_argument("--seq-facts", type=int, default=None, help="facts of the sequential runs (default --facts)")
    ap.add_argument("--layer", type=int, default=1, help="edited layer of batch / sequential (1)")
    ap.add_argument("--quick", action="store_true", help="5x smaller: facts / 5 (40-fact layer search, 200 facts); B stays 64 (4 batches)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2: the target machine's cores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra parameter override for every run, e.g. hparams.common.v_num_grad_steps=5")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=None,
                    help="batch protocol batch sizes over --facts facts (default: one batch of all)")
    ap.add_argument("--keep", default=None, help="results folder to keep (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = ap.parse_args(argv)

    div = 5 if a.quick else 1
    n, n_ls = max(1, a.facts // div), max(1, a.ls_facts // div)
    n_seq = max(1, (a.seq_facts or a.facts) // div)
    B = min(a.seq_batch, n_seq)  # the batch size stays: fewer batches, same work per batch
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}; known: {', '.join(PARTS)}")
    torch.set_num_threads(a.threads)
    log = lambda *_a, **_k: None  # noqa: E731

    with tempfile.TemporaryDirectory(prefix="editlib-bench-") as tmp:
        if a.keep:
            tmp = str(Path(a.keep).resolve())
            Path(tmp).mkdir(parents=True, exist_ok=True)
        base = {"results_dir": tmp, "name": "bench", **dict(s.split("=", 1) for s in a.set)}
        sets = [f"{k}={v}" for k, v in base.items()]

        def params(**over):  # --set strings, then this run's sizes (JSON is YAML)
            return resolve(a.params, overrides=sets + [f"{k}={json.dumps(v)}" for k, v in over.items()])

        p0 = params()
        t0 = time.perf_counter()
        study = protocols.open_study(p0, experiments=[], log=log)
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        study.covs(range(study.n_layers))
        t_cov = time.perf_counter() - t0
        hp = p0.method_hparams("memit", a.layer, "sequential")
        out: dict = {"model": study.label, "threads": torch.get_num_threads(), "quick": a.quick,
                     "facts": n, "layer_search_facts": n_ls, "sequential_batch": B, "layer": a.layer,
                     "v_num_grad_steps": hp.values.v_num_grad_steps, "z_batch_size": hp.values.z_batch_size,
                     "seconds_open_study": round(t_open, 2), "seconds_c0_all_layers": round(t_cov, 2)}
        print(f"model {study.label} ({study.n_layers} layers, {len(study.records)} records)  threads "
              f"{out['threads']}  {'QUICK (sizes / 5)  ' if a.quick else ''}value steps "
              f"{hp.values.v_num_grad_steps}  z_batch_size {hp.values.z_batch_size}")
        print(f"open study {t_open:.1f} s, C0 of all {study.n_layers} layers {t_cov:.1f} s (cache or collect; "
              "not in the times below)")

        if "layer_search" not in skip:
            p = params(**{"layer_search.n_facts": n_ls, "layer_search.layers": "all",
                          "layer_search.methods": ["rome", "memit"]})
            dt, cases, b = _timed(study, protocols.run_layer_search, p, "layer_search", log)
            edits = n_ls * study.n_layers * 2
            out["layer_search"] = {"seconds": round(dt, 2), "edits": edits}
            print(f"layer search   {n_ls:5d} facts x {study.n_layers} layers x 2 methods = {edits} singular "
                  f"edits: {dt:8.1f} s  ({edits / dt:.1f} edits/s){_phase_split(b, shared_values=True)}")

        if "batch" not in skip:
            sizes = a.batch_sizes or [n]
            p = params(**{"batch.total": n, "batch.batch_sizes": sizes, "batch.methods": ["memit"],
                          "batch.layer": a.layer})
            dt, cases, b = _timed(study, protocols.run_batch, p, "batch", log)
            out["batch"] = {"seconds": round(dt, 2), "B": sizes, "total": n}
            what = (f"B = total = {n} (one batch{'; the paper: B = 1024, the miniature has 1000 records' if n == 1000 else ''})"
                    if sizes == [n] else f"B = {', '.join(map(str, sizes))} over {n} facts")
            print(f"batch MEMIT    {what}: {dt:8.1f} s{_phase_split(b)}")
            for B_ in sizes if len(sizes) > 1 and not b.empty else []:
                bb = b[b.batch_size == B_]
                out["batch"][f"B{B_}"] = {k: round(float(bb[f"seconds_{k}"].sum()), 2)
                                          for k in ("values", "keys", "solve", "eval") if f"seconds_{k}" in bb}
                print(f"               B = {B_}:{_phase_split(bb)}")

        seq = {}
        for part, zb in (("sequential", None), ("sequential_z1", 1)):
            if part in skip:
                continue
            over = {"sequential.total": n_seq, "sequential.batch_sizes": [B], "sequential.methods": ["memit"],
                    "sequential.layer": a.layer, "name": f"bench-{part}"}
            if zb is not None:
                over["hparams.common.z_batch_size"] = zb
            p = params(**over)
            zbs = p.method_hparams("memit", a.layer, "sequential").values.z_batch_size
            dt, cases, b = _timed(study, protocols.run_sequential, p, "sequential", log)
            sv = float(b.seconds_values.sum()) if not b.empty else float("nan")
            seq[part] = (dt, sv)
            out[part] = {"seconds": round(dt, 2), "seconds_values": round(sv, 2), "B": B, "total": n_seq,
                         "batches": -(-n_seq // B), "seconds_per_fact": round(dt / n_seq, 4), "z_batch_size": zbs, "eval_final": p.sequential.eval_final}
            print(f"sequential     MEMIT B = {B} over {n_seq} facts ({-(-n_seq // B)} batches), z_batch_size {zbs:3d}: "
                  f"{dt:8.1f} s ({1000 * dt / n_seq:.0f} ms/fact){_phase_split(b)}")
        if len(seq) == 2:
            (d64, v64), (d1, v1) = seq["sequential"], seq["sequential_z1"]
            out["sequential_speedup"] = {"total": round(d1 / d64, 2), "values": round(v1 / v64, 2)}
            print(f"               z_batch_size {out['sequential']['z_batch_size']} vs 1: x{d1 / d64:.2f} overall, "
                  f"x{v1 / v64:.2f} in the value optimisation")

        if "evaluation" not in skip:
            facts = study.facts(n)
            study.evaluate(facts[: min(8, n)])  # warm-up
            t0 = time.perf_counter()
            study.evaluate(facts)
            dt = time.perf_counter() - t0
            out["evaluation"] = {"records": n, "seconds": round(dt, 3), "records_per_s": round(n / dt, 1)}
            print(f"evaluation     {n} records (ES/PS/NS, batch {p0.evaluation.batch_size}, no generation): "
                  f"{dt:8.2f} s  {n / dt:8.1f} records/s")
            runs = [params(name=f"bench-{x}") for x in ("sequential", "sequential_z1")]
            inside = [_batches(q, "sequential") for q in runs] + [_batches(params(), "batch")]
            inside = [b for b in inside if not b.empty and "seconds_eval" in b]
            if inside:
                b = pd.concat(inside, ignore_index=True)
                rps = float(b.n.sum() / b.seconds_eval.sum())
                out["evaluation"]["records_per_s_in_protocols"] = round(rps, 1)
                print(f"               inside the batch / sequential runs (each batch's current evaluation): "
                      f"{rps:8.1f} records/s")

    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
