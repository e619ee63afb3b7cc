"""Benchmark (a script, not a test): processes sharing one device, each running one-fact value
optimisations (a B = 1 sequential edit's values, eagerly), first one process alone, then
``--procs`` of them at the same time. The device check for ``executor.gpus_per_unit`` below 1
(issue 13): on the 32-layer Llama-3-8B shape a one-fact value step is bound by the host (on an
H200, 193 ms of wall time per Adam iteration against 17.5 ms of GPU time), so units that share a
GPU could overlap their host time, if the GPU interleaves their kernels well enough without MPS.
Each process computes exactly what it computes alone; only the time is in question.

    python bench/bench_shared_gpu.py [--params params/tiny.yaml] [--procs 2] [--n 6] [--layer 1]
        [--warmup 1] [--threads N] [--set KEY=VALUE ...] [--tokenizer DIR] [--draw-device cuda]

Every process opens the study itself (as a Ray worker would), optimises ``--warmup`` facts, waits
for the others at a barrier, then times ``--n`` facts one at a time. Prints ms per fact of each
process alone and together, and the throughput of the processes together over one alone, from the
first start to the last end (``procs``: each ran at its speed alone; 1.0: sharing gained nothing).
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def child(a: argparse.Namespace) -> None:
    """One process: open the study, warm up, meet the others at the barrier, time ``a.n`` facts."""
    import torch

    sys.path.insert(0, str(BENCH))
    from editlib import protocols
    from editlib.params import resolve
    from editlib.values import compute_values

    torch.set_num_threads(a.threads)
    p = resolve(a.params, overrides=a.set or None)
    study = protocols.open_study(p, experiments=["layer_search"], log=lambda *x: None)
    ehp = p.method_hparams("memit", a.layer, "sequential")
    one = replace(ehp.values, z_batch_size=1, compile_blocks="off", capture_steps=False)
    ctx = study.contexts(ehp.context_templates)
    facts = study.facts(a.warmup + a.n)
    cuda = str(study.model.device).startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if a.warmup:
        compute_values(study.model, study.tok, facts[:a.warmup], a.layer, ctx, one)
    barrier = Path(a.barrier)
    (barrier / f"ready-{a.index}").touch()
    deadline = time.time() + a.barrier_timeout
    while len(list(barrier.glob("ready-*"))) < a.parties:
        if time.time() > deadline:
            raise SystemExit(f"process {a.index}: the others did not reach the barrier in {a.barrier_timeout} s")
        time.sleep(0.01)
    sync()
    start = time.time()
    res = compute_values(study.model, study.tok, facts[a.warmup:], a.layer, ctx, one)
    sync()
    end = time.time()
    print(json.dumps({"index": a.index, "facts": a.n, "start": start, "end": end,
                      "mean_steps": float(res.steps.float().mean()), "device": str(study.model.device)}))


def run_group(a: argparse.Namespace, k: int) -> list[dict]:
    """``k`` child processes at once; their JSON lines, in index order."""
    with tempfile.TemporaryDirectory(prefix="shared-gpu-") as barrier:
        base = [sys.executable, str(Path(__file__).resolve()), "--child", "--barrier", barrier, "--parties", str(k),
                "--params", a.params, "--n", str(a.n), "--layer", str(a.layer), "--warmup", str(a.warmup),
                "--threads", str(a.threads), "--barrier-timeout", str(a.barrier_timeout),
                *[x for s in a.set for x in ("--set", s)]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
        procs = [subprocess.Popen([*base, "--index", str(i)], stdout=subprocess.PIPE, text=True, env=env)
                 for i in range(k)]
        outs = [pr.communicate()[0] for pr in procs]
    if any(pr.returncode for pr in procs):
        raise SystemExit(f"{k} process(es): exit statuses {[pr.returncode for pr in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def summary(alone: dict, together: list[dict]) -> dict:
    """ms per fact alone and per process together, and the throughput of the group over one alone
    (facts per second from the group's first start to its last end, over the lone process's)."""
    ms = lambda r: 1e3 * (r["end"] - r["start"]) / r["facts"]  # noqa: E731
    span = max(r["end"] for r in together) - min(r["start"] for r in together)
    rate_alone = alone["facts"] / (alone["end"] - alone["start"])
    return {"procs": len(together), "alone_ms_per_fact": round(ms(alone), 2),
            "together_ms_per_fact": [round(ms(r), 2) for r in together],
            "throughput": round(sum(r["facts"] for r in together) / span / rate_alone, 3),
            "mean_steps": alone["mean_steps"], "device": alone["device"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--procs", type=int, default=2, help="processes sharing the device in the second run")
    ap.add_argument("--n", type=int, default=6, help="facts each process times, one at a time")
    ap.add_argument("--warmup", type=int, default=1, help="facts each process optimises before the barrier")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / procs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape build (params naming one)")
    ap.add_argument("--draw-device", default="cpu", help="where a shape build draws its random weights")
    ap.add_argument("--barrier-timeout", type=float, default=600.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    ap.add_argument("--parties", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.procs < 2 or a.n < 1:
        ap.error("--procs must be at least 2 and --n at least 1")
    a.threads = a.threads or max(1, (os.cpu_count() or 2) // a.procs)
    if a.child:
        child(a)
        return 0
    sys.path.insert(0, str(BENCH))
    from slice_phases import _build  # a Llama-3-8B shape named by the params is built once, here

    from editlib.params import resolve

    print(_build(resolve(a.params, overrides=a.set or None),
                 argparse.Namespace(draw_device=a.draw_device, tokenizer=a.tokenizer, build=False)), flush=True)
    (alone,) = run_group(a, 1)
    together = run_group(a, a.procs)
    s = summary(alone, together)
    print(f"one-fact values at layer {a.layer} on {s['device']} ({a.n} facts each, {s['mean_steps']:.1f} steps, "
          f"{a.threads} threads per process): alone {s['alone_ms_per_fact']:.1f} ms/fact; {a.procs} together "
          f"{', '.join(f'{x:.1f}' for x in s['together_ms_per_fact'])} ms/fact; throughput x{s['throughput']:.2f} "
          f"over one alone")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
