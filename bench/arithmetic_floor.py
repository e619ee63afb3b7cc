"""Benchmark (a script, not a test): how far each protocol is from this machine's arithmetic floor.

Runs the protocol benchmark's sizes (``bench/bench_protocols.py``: a layer search, batch MEMIT at
B = 4 and 16, a sequential B = 1 run) once, counting per phase the floating-point operations of
every matrix product and attention (``torch.utils.flop_counter``, forward and backward) and the
number of tensor operations dispatched, then prints for each phase:

* the measured seconds (a first pass, with nothing but the clock; the counters run in a second);
* the *floor*: those FLOPs at this machine's measured large-matrix float32 GEMM rate, the time no
  exact restructuring can go below, since every operation counted is one the reference also does;
* for one-fact sequential edits, also the dispatch floor: operations × the measured cost of one
  small operation (eager mode pays it for every operation, whatever its size).

With ``--baseline SECONDS`` per part, it prints the speed-up over that baseline that the floor
would allow (the issue's targets are ratios over the earliest code's measured times).

    python bench/arithmetic_floor.py [--ls-facts 100] [--facts 256] [--seq-facts 32] [--layer 1]
        [--baseline layer_search=41.7 --baseline batch_eval_B4=2.5 ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from editlib import editing, protocols
from editlib.params import resolve


class _OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def gemm_rate(threads: int) -> float:
    """FLOP/s of a large float32 matrix product on ``threads`` threads (best of 3 sizes)."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def op_cost() -> float:
    """Seconds of one small eager operation (a [16, 128] multiply), the per-call overhead."""
    a, b = torch.randn(16, 128), torch.randn(16, 128)
    for _ in range(1000):
        a * b
    t0 = time.perf_counter()
    for _ in range(20000):
        a * b
    return (time.perf_counter() - t0) / 20000


class _Phases:
    """Wraps the phase functions so that each call's FLOPs, operations and seconds are added to its phase."""

    PATCH = {"values": (editing, "compute_values"), "keys": (editing, "compute_keys"),
             "residual": (editing, "current_values"), "eval": (protocols.Study, "evaluate")}

    def __init__(self, count: bool):
        self.count = count
        self.stats = defaultdict(lambda: {"flops": 0, "ops": 0, "seconds": 0.0})
        self.saved = {}

    def _wrap(self, name, f):
        def g(*a, **k):
            s = self.stats[name]
            if not self.count:  # the timing pass: nothing but the clock
                t0 = time.perf_counter()
                out = f(*a, **k)
                s["seconds"] += time.perf_counter() - t0
                return out
            fc, oc = FlopCounterMode(display=False), _OpCounter()
            with fc, oc:
                out = f(*a, **k)
            s["flops"] += fc.get_total_flops()
            s["ops"] += oc.n
            return out
        return g

    def __enter__(self):
        for name, (owner, attr) in self.PATCH.items():
            self.saved[name] = getattr(owner, attr)
            setattr(owner, attr, self._wrap(name, self.saved[name]))
        return self

    def __exit__(self, *exc):
        for name, (owner, attr) in self.PATCH.items():
            setattr(owner, attr, self.saved[name])

    def take(self) -> dict:
        out = {k: dict(v) for k, v in self.stats.items()}
        self.stats.clear()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--ls-facts", type=int, default=100)
    ap.add_argument("--facts", type=int, default=256, help="facts of the batch runs")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--seq-facts", type=int, default=32, help="facts of the sequential B = 1 run")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", action="append", default=[], metavar="PART=SECONDS",
                    help="a part's measured baseline (layer_search, batch_eval_B4, sequential_per_fact, ...)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: layer_search, batch, sequential")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rate = gemm_rate(a.threads)
    per_op = op_cost()
    print(f"{a.threads} threads: float32 GEMM {rate / 1e9:.0f} GFLOP/s (1024-3072 square), "
          f"one small eager operation {per_op * 1e6:.2f} µs")
    baseline = {k: float(v) for k, v in (s.split("=", 1) for s in a.baseline)}
    report: dict = {"gemm_gflops": round(rate / 1e9, 1), "op_us": round(per_op * 1e6, 3)}

    def show(part: str, timed: dict, counted: dict, per: int = 1) -> None:
        stats = {k: {**counted[k], "seconds": timed[k]["seconds"]} for k in counted}
        flops = sum(s["flops"] for s in stats.values())
        ops = sum(s["ops"] for s in stats.values())
        secs = sum(s["seconds"] for s in stats.values())
        floor = flops / rate
        rows = {k: {"seconds": round(s["seconds"] / per, 4), "gflop": round(s["flops"] / per / 1e9, 2),
                    "floor_seconds": round(s["flops"] / per / rate, 4), "ops": s["ops"] // per}
                for k, s in stats.items()}
        line = (f"{part:22s} {secs / per:8.3f} s  {flops / per / 1e9:8.1f} GFLOP  floor {floor / per:7.3f} s "
                f"({secs / max(floor, 1e-12):4.1f}x above)  {ops // per:,} operations")
        if part == "sequential_per_fact":
            line += f", dispatch floor {ops / per * per_op:.3f} s"
        if part in baseline:
            line += f"  | baseline {baseline[part]:.3f} s: the floor allows at most {baseline[part] / (floor / per):.1f}x"
        print(line)
        for k, r in rows.items():
            print(f"    {k:18s} {r['seconds']:8.3f} s  {r['gflop']:8.1f} GFLOP  floor {r['floor_seconds']:7.3f} s  "
                  f"{r['ops']:,} operations")
        report[part] = {"seconds": round(secs / per, 4), "gflop": round(flops / per / 1e9, 2),
                        "floor_seconds": round(floor / per, 4), "ops": ops // per, "phases": rows}

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="editlib-floor-") as tmp:
        def params(**over):
            base = {"results_dir": tmp, "name": "floor", "data.orderings": [0], **over}
            return resolve(a.params, overrides=[f"{k}={json.dumps(v)}" for k, v in base.items()])

        study = protocols.open_study(params(), experiments=[], log=lambda *_: None)
        study.covs(range(study.n_layers))
        quiet = lambda *_: None  # noqa: E731

        def twice(runner, p, keep=None) -> tuple[dict, dict]:
            """(timed, counted) phase stats of two runs of ``runner`` into separate folders."""
            out = []
            for count in (False, True):
                q = dataclasses.replace(p, name=f"{p.name}-{'count' if count else 'time'}")
                with _Phases(count) as ph:
                    runner(dataclasses.replace(study, params=q), log=quiet)
                out.append({k: v for k, v in ph.take().items() if keep is None or k in keep})
            return out[0], out[1]

        skip = {x.strip() for x in a.skip.split(",") if x.strip()}
        if "layer_search" not in skip:
            show("layer_search", *twice(protocols.run_layer_search, params(**{
                "layer_search.n_facts": a.ls_facts, "layer_search.layers": "all",
                "layer_search.methods": ["rome", "memit"]})))
        for B in [] if "batch" in skip else a.batch_sizes:
            show(f"batch_eval_B{B}", *twice(protocols.run_batch, params(**{
                "batch.total": a.facts, "batch.batch_sizes": [B], "batch.methods": ["memit"],
                "batch.layer": a.layer, "batch.windows": [1], "name": f"floor-b{B}"}), keep={"eval"}))
        if "sequential" not in skip:
            show("sequential_per_fact", *twice(protocols.run_sequential, params(**{
                "sequential.total": a.seq_facts, "sequential.batch_sizes": [1], "sequential.methods": ["memit"],
                "sequential.layer": a.layer, "sequential.degradation_every": None, "sequential.eval_final": False,
                "name": "floor-seq"})), per=a.seq_facts)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
