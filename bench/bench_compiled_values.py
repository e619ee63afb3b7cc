"""Benchmark (a script, not a test): the value optimisation with the blocks above the edited layer
compiled (``hparams.common.compile_blocks``: ``torch.compile`` of each block,
:func:`editlib.packed.compiled_block`, the protocols' own path) against the eager default, on the
same facts, alternating rounds. Prints ms per fact and per Adam iteration, the compile time, and how
far the compiled z are from the eager ones (compiled kernels sum in another order, so z moves at
float32 rounding, amplified by the Adam steps; the default stays eager so that stored results do
not move).

    python bench/bench_compiled_values.py [--params params/tiny.yaml] [--n 30] [--layer 1]
        [--z-batch-size 1] [--rounds 2] [--mode default] [--threads 2] [--profile N] [--set KEY=VALUE ...]

``--z-batch-size 1`` is a one-fact sequential edit's value optimisation (B = 1); on a GPU
(``--set model.device=cuda``) ``--mode capture`` times ``hparams.common.capture_steps`` instead (the
eager steps recorded whole as CUDA graphs, :mod:`editlib.cudagraphs`: z should equal eager's, and
the line says for how many facts it does to the bit; with ``--z-batch-size 1`` a fact whose step
has the sizes of an earlier one's replays that fact's kept graph, so each captured round says how
many it recorded and reused, and later rounds reuse the first's), and ``--mode reduce-overhead`` captures CUDA graphs (each call then
starts a new CUDA-graph step, as ``torch.compiler.cudagraph_mark_step_begin`` asks when a call's
outputs are still alive at the next). A compiled path that fails (to compile or to run) is reported
with its error, and the eager numbers are still printed.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slice_phases import _build  # noqa: E402  (a Llama-3-8B shape named by the params is built first)

from editlib import protocols  # noqa: E402
from editlib.params import resolve  # noqa: E402
from editlib.values import KEPT_COUNTS, compute_values, keeping_graphs  # noqa: E402


def _timed(study, facts, layer, ctx, hp) -> tuple[float, object]:
    if str(study.model.device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = compute_values(study.model, study.tok, facts, layer, ctx, hp)
    if str(study.model.device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, res


def cuda_graphs_recorded(device) -> str:
    """How many CUDA graphs the process's CUDA-graph tree recorded on ``device`` (a private torch
    counter: "unknown" where it is missing) and the GPU memory reserved at the peak: what
    compile_blocks: reduce-overhead's recordings (one per block call for each new set of sizes
    and edited layer) cost, which the cost model leaves out."""
    try:
        from torch._inductor import cudagraph_trees
        mgr = cudagraph_trees.get_manager(torch.device(device).index or 0, create_if_none_exists=False)
        n = "0" if mgr is None else repr(mgr.graph_counter)[len("count("):-1]
    except Exception as e:  # a private API: report, do not fail the benchmark
        n = f"unknown ({_brief(e)})"
    return f"CUDA graphs recorded: {n}, peak GPU memory reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB"


def _brief(e: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def device_us(events) -> float:
    """Microseconds the device ran the kernels of ``events`` (``prof.key_averages()``): the device
    events' own time only. An operator's event carries the time of the kernels it launched as
    well, so summing over every event would count each kernel twice (torch's own table footer
    sums the device events alone, as here)."""
    return sum(getattr(e, "self_device_time_total", 0.0) for e in events
               if e.device_type.name != "CPU" and not getattr(e, "is_user_annotation", False))


def profile_path(study, facts, layer, ctx, hp, label: str) -> None:
    """The value optimisation of ``facts`` (``hp``: eager or compiled) under torch.profiler: wall
    time per Adam iteration against the device's own (kernel) time, the device kernels per
    iteration, and (eager) the operators that take the most of each. Where the device time is a
    small share of the wall time, the steps are bound by the host (kernel launches, Python), which
    CUDA graphs remove; the compiled path's kernels per iteration, against eager's, is what
    editlib.cost's ``kernels_fused_value`` estimates from the CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(study.model.device).startswith("cuda")
    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=acts) as prof:
        dt, res = _timed(study, facts, layer, ctx, hp)
    iters = float(res.steps.sum()) + len(facts)
    ev = prof.key_averages()
    dev_us = device_us(ev)
    kernels = sum(e.count for e in ev if getattr(e, "self_device_time_total", 0.0) > 0 and e.device_type.name != "CPU")
    print(f"profile ({label}): {len(facts)} facts, {iters:.0f} iterations, wall {1e3 * dt / iters:.1f} ms/iteration, device "
          f"{1e-3 * dev_us / iters:.1f} ms/iteration ({100 * 1e-6 * dev_us / dt:.0f} % of wall), "
          f"{kernels / iters:.0f} device kernels/iteration (wall includes the profiler's own overhead)")
    if label != "eager":
        return
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(ev.table(sort_by=key, row_limit=12, max_name_column_width=60))
    if cuda:
        print(ev.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def count_kernels(study, facts, layer, ctx, hp) -> dict[str, float]:
    """Kernels per block of one value iteration's packed forward + backward (the blocks above
    ``layer``, :func:`editlib.packed.run_blocks`), eager against compiled, on this machine.
    Eager: the aten operations dispatched that run a kernel (bench_decode's count). Compiled: the
    kernel and library calls in the code inductor generates for one block's forward and backward
    (:func:`editlib.packed.compiled_block`, which every block calls: the inner blocks' graph, and
    the last block's, which runs only where a loss reads; on a CPU, inductor's C++ fusion: a
    proxy for its Triton one). The run_blocks call of the first fact's optimisation is replayed
    in isolation, so the loss, Adam and the rest are not counted."""
    import torch._dynamo
    from bench_decode import _Dispatched, _kernel_calls
    from torch._inductor.codecache import PyCodeCache

    from editlib import packed
    seen: list = []
    real = packed.run_blocks

    def record(*args, **kw):
        if not seen:
            seen.append(args)
        return real(*args, **kw)

    packed.run_blocks = record
    try:
        compute_values(study.model, study.tok, facts[:1], layer, ctx, replace(hp, compile_blocks="off"))
    finally:
        packed.run_blocks = real
    blocks, x, cos, sin, kvs, kv_rows, mask, flat, need, R, W = seen[0]
    with torch.enable_grad():
        x_in = x.detach().clone().requires_grad_(True)
        with _Dispatched() as c:
            real(blocks, x_in, cos, sin, kvs, kv_rows, mask, flat, need, R, W).float().sum().backward()
        torch._dynamo.reset()
        packed._COMPILED.clear()
        block = packed.compiled_block("default")

        def kernels(need_arg) -> int:  # one block's forward and backward, compiled for this variant
            before = len(PyCodeCache.modules)
            x_in = x.detach().clone().requires_grad_(True)
            block(blocks[0], x_in, cos, sin, *kvs[0], kv_rows, mask, flat, need_arg, R, W).float().sum().backward()
            return sum(_kernel_calls(m) for m in PyCodeCache.modules[before:])

        inner, last = kernels(None), kernels(need)
    k = len(blocks)
    return {"blocks": k, "eager": c.n / k, "compiled": ((k - 1) * inner + last) / k,
            "inner": inner, "last": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/tiny.yaml")
    ap.add_argument("--n", type=int, default=30, help="facts per timed round")
    ap.add_argument("--warmup", type=int, default=4, help="facts run first on each path (compiles the graph)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--method", default="memit", help="whose value hyperparameters")
    ap.add_argument("--z-batch-size", type=int, default=1, help="facts optimised together (1: a B = 1 sequential edit)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", default="default", help="hparams.common.compile_blocks to time against eager "
                    "(default | reduce-overhead | max-autotune-no-cudagraphs), or capture: hparams.common.capture_steps "
                    "(the eager steps recorded as CUDA graphs; CUDA only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape build (params naming one)")
    ap.add_argument("--draw-device", default="cpu", help="where a shape build draws its random weights")
    ap.add_argument("--count-kernels", action="store_true",
                    help="only count kernels per block of the packed forward + backward, eager and compiled, and exit")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="first profile N facts of the eager path (device time against wall time, top operators), "
                         "then, after the rounds, of the compiled path")
    a = ap.parse_args()
    warnings.simplefilter("default")  # each warning once: a compile or CUDA-graph warning is a finding
    torch.set_num_threads(a.threads)
    p = resolve(a.params, overrides=a.set or None)
    print(_build(p, argparse.Namespace(draw_device=a.draw_device, tokenizer=a.tokenizer, build=False)))
    study = protocols.open_study(p, experiments=["layer_search"], log=lambda *x: None)
    ehp = p.method_hparams(a.method, a.layer, "sequential")
    hp = replace(ehp.values, z_batch_size=a.z_batch_size)
    if not hp.packed:
        raise SystemExit("the compiled path is the packed forward's: hparams.common.packed must be true")
    ctx = study.contexts(ehp.context_templates, ehp.context_text)
    facts = study.facts(a.warmup + a.n)
    warm, timed = facts[:a.warmup], facts[a.warmup:]
    eager_hp = replace(hp, compile_blocks="off", capture_steps=False)
    # --mode capture: hparams capture_steps (the eager steps recorded whole as CUDA graphs), else compile_blocks
    comp_hp = replace(eager_hp, capture_steps=True) if a.mode == "capture" else replace(eager_hp, compile_blocks=a.mode)
    other = "captured" if a.mode == "capture" else "compiled"
    print(f"model {study.label} ({study.n_layers} layers) on {study.model.device}, layer {a.layer}, "
          f"{a.n} facts, z_batch_size {a.z_batch_size}, threads {torch.get_num_threads()}, mode {a.mode}")

    if a.count_kernels:
        k = count_kernels(study, facts, a.layer, ctx, hp)
        print(f"kernels per block of the packed forward + backward ({k['blocks']} blocks): eager {k['eager']:.1f}, "
              f"compiled {k['compiled']:.1f} (ratio {k['compiled'] / k['eager']:.3f}; an inner block {k['inner']}, "
              f"the last {k['last']})")
        return

    def run(which, fs):  # the protocols' own path: hparams.common.compile_blocks
        return _timed(study, fs, a.layer, ctx, eager_hp if which == "eager" else comp_hp)

    run("eager", warm)
    if a.profile:
        profile_path(study, timed[:a.profile], a.layer, ctx, eager_hp, "eager")
    error = ""
    try:
        dt, _ = run(other, warm)
        print(f"{other} warm-up ({'recordings' if a.mode == 'capture' else 'compilation'} included): "
              f"{dt:.1f} s for {len(warm)} facts")
    except Exception as e:  # the eager numbers are still worth having
        error = _brief(e)
        print(f"{other} warm-up failed: {error}")
    eager_ms, comp_ms = [], []
    for r in range(a.rounds):
        for name, acc in (("eager", eager_ms), (other, comp_ms)):
            if name == other and error:
                continue
            before = dict(KEPT_COUNTS)
            try:
                dt, res = run(name, timed)
            except Exception as e:
                if name == "eager":
                    raise
                error = _brief(e)
                print(f"round {r + 1} {other} failed: {error}")
                continue
            iters = float(res.steps.sum()) + len(timed)  # the last forward of each fact takes no step
            acc.append(dt / len(timed) * 1000)
            kept = "" if name == "eager" or a.mode != "capture" else (
                f"  one-fact graphs kept: {KEPT_COUNTS['made'] - before['made']} recorded, "
                f"{KEPT_COUNTS['reused'] - before['reused']} reused")
            print(f"round {r + 1} {name:8s}: {acc[-1]:7.1f} ms/fact  {dt / iters * 1000:6.2f} ms/iteration  "
                  f"mean steps {res.steps.float().mean():.1f}{kept}")
            if name == "eager":
                ref = res
            else:
                dz = (res.z - ref.z).abs().max().item()
                rel = ((res.z - ref.z).norm(dim=0) / ref.z.norm(dim=0)).max().item()
                same = int((res.steps == ref.steps).sum())
                bits = int(sum(torch.equal(res.z[:, i], ref.z[:, i]) for i in range(len(timed))))
                print(f"         {other} vs eager: max |Δz| {dz:.2e}, max relative ‖Δz‖ {rel:.2e}, "
                      f"equal step counts {same}/{len(timed)}, z equal to the bit {bits}/{len(timed)}")
    if a.mode == "reduce-overhead" and str(study.model.device).startswith("cuda"):
        print(cuda_graphs_recorded(study.model.device))
    if a.mode == "capture" and str(study.model.device).startswith("cuda"):  # one graph per set of running facts
        from editlib import cudagraphs
        dev = torch.device(study.model.device)
        print(f"CUDA graphs recorded: {sum(cudagraphs.RECORDINGS.values())}, peak GPU memory reserved "
              f"{torch.cuda.max_memory_reserved(dev) / 2**30:.2f} GiB")
    if a.profile and comp_ms and not error:
        profile_path(study, timed[:a.profile], a.layer, ctx, comp_hp, other)
    if error or not comp_ms:
        print(f"eager {min(eager_ms):.1f}-{max(eager_ms):.1f} ms/fact, {other} failed: {error}")
        raise SystemExit(1)
    print(f"eager {min(eager_ms):.1f}-{max(eager_ms):.1f} ms/fact, {other} {min(comp_ms):.1f}-{max(comp_ms):.1f}: "
          f"{sum(eager_ms) / sum(comp_ms):.2f}x")


if __name__ == "__main__":
    with keeping_graphs():  # capture_steps at B = 1 keeps one-fact graphs for later facts, as a protocol unit does
        main()
