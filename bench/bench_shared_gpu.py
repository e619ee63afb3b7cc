"""Benchmark (a script, not a test): processes sharing one device, each running one-fact value
optimisations (a B = 1 sequential edit's values, eagerly), at the same time and then each alone.
The device check for ``executor.gpus_per_unit`` below 1 (issue 13): on the 32-layer Llama-3-8B
shape a one-fact value step is bound by the host (on an H200, 193 ms of wall time per Adam iteration
against 17.5 ms of GPU time), so units that share a GPU could overlap their host time, if the GPU
interleaves their kernels well enough without MPS. Each process computes exactly what it computes
alone; only the time is in question. It measures one-fact values only, not a whole unit.

    python bench/bench_shared_gpu.py [--params params/tiny.yaml] [--procs 2] [--n 6] [--layer 1]
        [--warmup 1] [--threads N] [--solo-threads M] [--set KEY=VALUE ...] [--tokenizer DIR]
        [--draw-device cuda]

Every process opens the study itself (as a Ray worker would) and optimises ``--warmup`` facts; then,
after a barrier, all time ``--n`` facts at once, with ``--threads`` torch threads each (default:
cores / procs, as Ray's ``cpus_per_unit`` would share them); then each in turn times the same
facts alone, with ``--solo-threads`` (default: every core, as one unit per GPU would have), while
the others wait. So the baselines come from the same processes, right after the shared run. The
throughput of the processes together over one alone is given twice: over the whole shared run
(first start to last end: a fixed batch of work) and as the sum of the processes' own rates (each
over its own shared run: what long units sharing the GPU would see). The GPU's compute mode is
printed first (an exclusive-process GPU refuses the second process). A process that fails ends
the others. The last line is JSON.
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
sys.path.insert(0, str(BENCH))
from device_checks import last_json  # noqa: E402  (a process's summary line, library output after it)


def _wait_for(paths: list[Path], timeout: float, who: str) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if time.time() > deadline:
            raise SystemExit(f"{who}: waited {timeout:.0f} s for {', '.join(p.name for p in paths if not p.exists())}")
        time.sleep(0.005)


def child(a: argparse.Namespace) -> None:
    """One process: open the study, warm up; at the barrier, time ``a.n`` facts with the others;
    then, in its turn, the same facts alone."""
    import torch

    from editlib import protocols
    from editlib.params import resolve
    from editlib.values import compute_values

    torch.set_num_threads(a.threads)
    p = resolve(a.params, overrides=a.set or None)
    study = protocols.open_study(p, experiments=["layer_search"], log=lambda *x: None)
    ehp = p.method_hparams("memit", a.layer, "sequential")
    one = replace(ehp.values, z_batch_size=1, compile_blocks="off", capture_steps=False)
    ctx = study.contexts(ehp.context_templates, ehp.context_text)
    facts = study.facts(a.warmup + a.n)
    timed_facts = facts[a.warmup:]
    cuda = str(study.model.device).startswith("cuda")
    d = Path(a.barrier)
    who = f"process {a.index}"

    def run() -> tuple[float, float, float]:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.time()
        res = compute_values(study.model, study.tok, timed_facts, a.layer, ctx, one)
        if cuda:
            torch.cuda.synchronize()
        return t0, time.time(), float(res.steps.float().mean())

    if a.warmup:
        compute_values(study.model, study.tok, facts[:a.warmup], a.layer, ctx, one)
    (d / f"ready-{a.index}").touch()
    _wait_for([d / f"ready-{i}" for i in range(a.parties)], a.barrier_timeout, who)
    start, end, steps = run()
    (d / f"shared-{a.index}").touch()
    _wait_for([d / f"shared-{i}" for i in range(a.parties)], a.barrier_timeout, who)
    _wait_for([d / f"solo-{i}" for i in range(a.index)], a.barrier_timeout * a.parties, who)  # the earlier turns
    torch.set_num_threads(a.solo_threads)
    solo_start, solo_end, solo_steps = run()
    (d / f"solo-{a.index}").touch()
    print(json.dumps({"index": a.index, "facts": a.n, "start": start, "end": end, "mean_steps": steps,
                      "solo_start": solo_start, "solo_end": solo_end, "solo_mean_steps": solo_steps,
                      "threads": a.threads, "solo_threads": a.solo_threads, "device": str(study.model.device)}),
          flush=True)


def run_group(a: argparse.Namespace) -> list[dict]:
    """The ``a.procs`` processes; their JSON lines, in index order. The first that fails ends the others."""
    with tempfile.TemporaryDirectory(prefix="shared-gpu-") as barrier:
        base = [sys.executable, str(Path(__file__).resolve()), "--child", "--barrier", barrier,
                "--parties", str(a.procs), "--params", a.params, "--n", str(a.n), "--layer", str(a.layer),
                "--warmup", str(a.warmup), "--threads", str(a.threads), "--solo-threads", str(a.solo_threads),
                "--barrier-timeout", str(a.barrier_timeout), *[x for s in a.set for x in ("--set", s)]]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)}
        logs = [open(Path(barrier) / f"out-{i}.txt", "w+") for i in range(a.procs)]
        procs = [subprocess.Popen([*base, "--index", str(i)], stdout=logs[i], text=True, env=env)
                 for i in range(a.procs)]
        try:
            while True:
                codes = [pr.poll() for pr in procs]  # every process polled each time
                if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break
                time.sleep(0.2)
        finally:
            for pr in procs:
                if pr.poll() is None:
                    pr.kill()
                    pr.wait()
        outs = []
        for f in logs:
            f.seek(0)
            outs.append(f.read())
            f.close()
    if any(pr.returncode for pr in procs):
        raise SystemExit(f"{a.procs} processes: exit statuses {[pr.returncode for pr in procs]} "
                         "(a process that failed ended the others; its traceback is above)")
    return [last_json(o) for o in outs]


def summary(rows: list[dict]) -> dict:
    """ms per fact of each process together and alone, and the group's throughput over one alone
    (the mean of the processes' lone rates): over the whole shared run (first start to last end),
    and as the sum of the processes' own rates in it (``throughput_window``)."""
    ms = lambda r, k="": 1e3 * (r[f"{k}end"] - r[f"{k}start"]) / r["facts"]  # noqa: E731
    rate_alone = sum(r["facts"] / (r["solo_end"] - r["solo_start"]) for r in rows) / len(rows)
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    rate_window = sum(r["facts"] / (r["end"] - r["start"]) for r in rows)
    return {"procs": len(rows), "alone_ms_per_fact": [round(ms(r, "solo_"), 2) for r in rows],
            "together_ms_per_fact": [round(ms(r), 2) for r in rows],
            "throughput": round(sum(r["facts"] for r in rows) / span / rate_alone, 3),
            "throughput_window": round(rate_window / rate_alone, 3),
            "start_skew_s": round(max(r["start"] for r in rows) - min(r["start"] for r in rows), 4),
            "end_spread_s": round(max(r["end"] for r in rows) - min(r["end"] for r in rows), 4),
            "mean_steps": [r["mean_steps"] for r in rows], "solo_mean_steps": [r["solo_mean_steps"] for r in rows],
            "threads": rows[0]["threads"], "solo_threads": rows[0]["solo_threads"], "device": rows[0]["device"]}


def compute_mode() -> str | None:
    """The GPU's compute mode (an exclusive-process GPU refuses a second process), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--procs", type=int, default=2, help="processes sharing the device")
    ap.add_argument("--n", type=int, default=6, help="facts each process times, one at a time, together and alone")
    ap.add_argument("--warmup", type=int, default=1, help="facts each process optimises before the barrier")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process together (default: cores / procs)")
    ap.add_argument("--solo-threads", type=int, default=None, help="torch threads of a process alone (default: cores)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape build (params naming one)")
    ap.add_argument("--draw-device", default="cpu", help="where a shape build draws its random weights")
    ap.add_argument("--barrier-timeout", type=float, default=120.0, help="seconds a process waits for the others")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    ap.add_argument("--parties", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.procs < 2 or a.n < 1:
        ap.error("--procs must be at least 2 and --n at least 1")
    cores = os.cpu_count() or 2
    a.threads = a.threads or max(1, cores // a.procs)
    a.solo_threads = a.solo_threads or cores
    if a.child:
        child(a)
        return 0
    from slice_phases import _build  # a Llama-3-8B shape named by the params is built once, here

    from editlib.params import resolve

    print(_build(resolve(a.params, overrides=a.set or None),
                 argparse.Namespace(draw_device=a.draw_device, tokenizer=a.tokenizer, build=False)), flush=True)
    mode = compute_mode()
    print(f"GPU compute mode: {mode}", flush=True)
    s = {**summary(run_group(a)), "compute_mode": mode}
    print(f"one-fact values at layer {a.layer} on {s['device']} ({a.n} facts each): {a.procs} together "
          f"{', '.join(f'{x:.1f}' for x in s['together_ms_per_fact'])} ms/fact ({s['threads']} threads each), alone "
          f"{', '.join(f'{x:.1f}' for x in s['alone_ms_per_fact'])} ms/fact ({s['solo_threads']} threads); throughput "
          f"x{s['throughput']:.2f} over one alone (x{s['throughput_window']:.2f} from their own rates; starts "
          f"{1e3 * s['start_skew_s']:.1f} ms apart)")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
