"""What a params file costs on a named GPU: work counted exactly as editlib's protocols run it,
turned into hours by the documented model of :mod:`editlib.cost` (every assumption printed).

    python bench/paper_cost.py --params params/llama3-8b.yaml [--gpu h200|h100|a100]
        [--ge | --no-ge] [--unit-costs GPU.json ...] [--slice-costs runs/slice-phases/<run>/phases.json]
        [--solve-on auto|host|device] [--host-speedup 1.0] [--layer 1] [--value-iters 25]
        [--c0-tokens-per-text N] [--graph-node-us 2] [--set KEY=VALUE ...] [--json OUT.json]
    python bench/paper_cost.py --token-stats [--n 1000]   # re-measure the per-fact token counts

``--slice-costs``: host-side unit costs (one N = 1 solve + apply, the C0 factorisation) from a
``bench/slice_phases.py`` run on the Llama-3-8B-shaped slice, instead of the defaults measured the
same way. ``--unit-costs``: seconds measured on a real GPU (keys: editlib.cost.UNIT_KEYS), each
replacing the model's estimate of that unit (several files: a later one's unit wins, e.g. the
slice's phases.json, then bench/calibrate_units.py's units measured at the paper's sizes).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from editlib.cost import GPUS, KINDS, CostModel, TokenStats, count_grid, with_unit_costs
from editlib.decode import DECODE_WARMUPS
from editlib.params import resolve

#: model dtypes the cost model has rates for (a GPU's float32/TF32 and bfloat16 peaks)
PRICED_DTYPES = ("float32", "bfloat16", "float16")

#: tokens per C0 text (BOS included) before truncation, by corpus (assumptions, printed)
TOKENS_PER_TEXT = {
    "wikipedia": 650,          # SPEC §4: ≈ 2.9 k characters per article
    "wikitext_articles": 4500,  # wikitext-103: 28,475 articles, ≈ 103 M words
    "wikitext": 70,            # wikitext-103 rows are lines (many empty): ≈ 129 M tokens / 1.8 M rows
    "records": 110,            # 8 CounterFact fact sentences per text (measured on the slice: 108)
}


def c0_tokens(p, shape, per_text: float | None) -> tuple[float, str]:
    """C0 corpus tokens = n_samples × tokens per text (capped at the truncation length)."""
    cp = p.covariance
    cap = cp.max_length or (8192 if shape.name.startswith("Llama-3") else 4096 if "Llama-2" in shape.name else 1024)
    name = f"{cp.name or ''} {cp.config or ''} {cp.group or ''}".lower()
    if per_text is None:
        key = ("records" if cp.kind == "records" else "wikitext_articles" if "wikitext_articles" in name
               else "wikipedia" if "wikipedia" in name else "wikitext" if "wikitext" in name else None)
        per_text = TOKENS_PER_TEXT[key] if key else 100.0
        how = f"{key or 'unknown corpus'}: {per_text} tokens per text (assumed)"
    else:
        how = f"{per_text} tokens per text (--c0-tokens-per-text)"
    n = cp.n_samples or (2000 if cp.kind == "records" else 100_000)
    eff = min(per_text, cap)
    return n * eff, f"{n:,} texts × {eff:,.0f} tokens ({how}, truncated at {cap})"


def solve_location(arg: str) -> tuple[str, str]:
    """Where the C0 factor (and so every solve) lives: read from Study.covs unless given."""
    if arg != "auto":
        return arg, "--solve-on"
    from editlib.protocols import Study
    src = inspect.getsource(Study.covs)
    line = next((ln for ln in src.splitlines() if "factor_cov(" in ln), "")
    return ("device" if "device=" in line else "host"), f"auto: Study.covs calls `{line.strip()}`"


def slice_host_costs(path: str) -> dict:
    """host_solve_s / host_factor_s from a bench/slice_phases.py phases.json."""
    d = json.loads(Path(path).read_text())
    u = d.get("unit_costs", d)
    out = {}
    if "solve_apply_s_by_n" in u and ("1" in u["solve_apply_s_by_n"] or 1 in u["solve_apply_s_by_n"]):
        by_n = u["solve_apply_s_by_n"]
        out["host_solve_s"] = float(by_n.get("1", by_n.get(1)))
    fac = [v for k, v in u.items() if k.startswith("phase_s:C0 load + factor") or k.startswith("phase_s:C0 layer")]
    if fac:
        out["host_factor_s"] = sum(fac) / len(fac)
    return out


#: units measured on a GPU (bench/calibrate_units.py), named <gpu>-<dtype>-<what>.json
UNITS_DIR = Path(__file__).resolve().parent / "units"


def measured_elsewhere(model: CostModel, exps, eval_batch: int,
                       shape=None) -> list[tuple[Path, float, list[str]]]:
    """The grid's hours with each committed measured-units file of this GPU and dtype, so that a
    modelled estimate is never shown without the measurement that contradicts it; with the units
    left out because the file timed them otherwise than the params run them (captured or not,
    :func:`editlib.cost.timed_as`; scoring at another ``eval_batch``), each with how."""
    key = next(k for k, g in GPUS.items() if g is model.gpu)
    out = []
    for path in sorted(UNITS_DIR.glob(f"{key}-{model.dtype}-*.json")):
        skipped: list[tuple[str, str, str]] = []
        m = with_unit_costs(model, path, skipped=skipped, eval_batch=eval_batch, shape=shape)
        secs = sum(sum(m.seconds(e, TokenStats())[k] for k in KINDS) for e in exps)
        out.append((path.relative_to(UNITS_DIR.parent.parent), secs / 3600,
                    [f"{unit} (timed {how})" for _, unit, how in skipped]))
    return out


def unit_scaling_notes(model: CostModel, shapes, max_len: int) -> list[str]:
    """Where measured units price work other than what they were timed on (another model's shape;
    for GE, a call of other cases, rows per decode batch or length), and so are scaled by the model's ratio
    (:meth:`editlib.cost.CostModel.unit_ratio`)."""
    from editlib.cost import GE_UNITS, same_sizes
    out = []
    for s in shapes:
        keys = sorted(k for k, t in model.unit_timed.items() if t.shape is not None and not same_sizes(t.shape, s))
        if keys:
            names = sorted({model.unit_timed[k].shape.name for k in keys})
            out.append(f"measured units timed on {', '.join(names)} price {s.name} scaled by the model's ratio of "
                       f"the same work on the two: {', '.join(keys)}")
    for k in GE_UNITS:
        t = model.unit_timed.get(k)
        if t is None:
            continue
        if t.gen_rows is None and t.gen_max_len is None:
            out.append(f"{k}: its file records no decode batch it was timed on: taken as these params' "
                       "rows per decode batch and length, in proportion to a call's cases")
            continue
        what = ", ".join(x for x in (None if t.cases is None else f"one call of {t.cases} case{'s' * (t.cases > 1)}",
                                     None if t.gen_rows is None else f"{t.gen_rows} rows per decode batch",
                                     None if t.gen_max_len is None else f"{t.gen_max_len} tokens") if x)
        out.append(f"{k} timed on {what}: calls of other cases, rows per batch ("
                   + ", ".join(f"{s.name} {model.gen_rows(s, max_len)}" for s in shapes)
                   + f") or length ({max_len}) priced scaled by the model's ratio")
    return out


def value_graphs(p) -> bool:
    """Whether the grid's value steps' blocks are compiled and captured (compile_blocks:
    reduce-overhead), as each experiment section resolves it; the cost model captures all of them
    or none."""
    return _all_or_none(p, "compile_blocks: reduce-overhead", lambda v: v.compile_blocks == "reduce-overhead")


def step_graphs(p) -> bool:
    """Whether the grid's value steps are recorded whole as CUDA graphs of their eager kernels
    (capture_steps), likewise all or none."""
    return _all_or_none(p, "capture_steps: true", lambda v: v.capture_steps)


def _all_or_none(p, what: str, on) -> bool:
    vals = p.value_hparams()
    captured = sorted(k for k, v in vals.items() if on(v))
    if captured and len(captured) != len(vals):
        raise SystemExit(f"{what} for {', '.join(captured)} only: the cost model prices every value step "
                         "captured or none; set it in hparams.common")
    return bool(captured)


def _h(s: float) -> str:
    return f"{s / 3600:.1f}" if s >= 360 else f"{s / 3600:.2f}"


def report(p, exps, model: CostModel, ts: TokenStats, args, notes: list[str]) -> dict:
    rows, total, consumers = [], 0.0, []
    for e in exps:
        sec = model.seconds(e, ts)
        t = sum(sec[k] for k in KINDS)
        total += t
        consumers += [(sec[k], f"{e.name}: {KINDS[k]}") for k in KINDS]
        rows.append((e, sec, t))
    print(f"# Cost of `{args.params}` on {model.gpu.name} ({model.dtype})\n")
    print("| experiment | model | edits | value opts | solves (N: count) | eval cases | prompts scored | GE tokens decoded |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for e, sec, _ in rows:
        sol = ", ".join(f"{n}: {c:,}" for n, c in sorted(e.solves.items()))
        cases = e.total("eval")
        print(f"| {e.name} | {e.shape.name} | {e.edits:,} | {e.total('values'):,} | {sol} | {cases:,} | "
              f"{round(cases * ts.eval_prompts):,} | {int(sec['ge_tokens']):,} |")
    print(f"\nEstimated hours per work kind (one {model.gpu.name}):\n")
    print("| experiment | " + " | ".join(KINDS.values()) + " | total h |")
    print("|---|" + "---:|" * (len(KINDS) + 1))
    for e, sec, t in rows:
        print(f"| {e.name} | " + " | ".join(_h(sec[k]) for k in KINDS) + f" | **{_h(t)}** |")
    col = {k: sum(sec[k] for _, sec, _ in rows) for k in KINDS}
    print("| **all** | " + " | ".join(_h(col[k]) for k in KINDS) + f" | **{_h(total)}** |")
    top = sorted(consumers, reverse=True)[:3]
    print(f"\n**Total: {total / 3600:.1f} GPU-hours** ({total / 86400:.1f} days on one GPU). Biggest consumers: "
          + "; ".join(f"{name} {s / 3600:.1f} h ({100 * s / total:.0f} %)" for s, name in top) + ".")
    fl = [model.floor().seconds(e, ts) for e in exps]
    fcol = {k: sum(f[k] for f in fl) for k in KINDS}
    floor = sum(fcol.values())
    print(f"\n**Arithmetic floor: {floor / 3600:.1f} GPU-hours**: the same work with every matmul at 100 % of "
          f"the {model.dtype}{' (TF32)' if model.tf32 and model.bpp == 4 else ''} peak and nothing else "
          "(no memory traffic, kernel launches, Python, host or disk): the floor of this implementation's "
          "work on this GPU in this dtype (GE's part binds any implementation: every decoded token passes "
          "through the model). Of it: " + ", ".join(
              f"{KINDS[k]} {fcol[k] / 3600:.1f} h" for k in sorted(fcol, key=fcol.get, reverse=True)[:4]) + ".")
    print("\nAssumptions:")
    for n in notes:
        print(f"- {n}")
    print(f"- GPU {model.gpu.name}: fp32 {model.gpu.fp32 / 1e12:g} TFLOP/s (no TF32), bf16 {model.gpu.bf16 / 1e12:g}, "
          f"fp64 {model.gpu.fp64 / 1e12:g} TFLOP/s, HBM {model.gpu.bw / 1e12:g} TB/s, {model.gpu.mem_gb:g} GB")
    print("- cost model: " + "; ".join(model.assumptions()))
    for line in model.derived(exps[0].shape, ts, p.evaluation.gen_max_len):
        print(f"- implied: {line}")
    if model.unit_s:
        print(f"- measured unit costs replacing the model: {json.dumps(model.unit_s)}")
    print(f"- token counts per fact ({ts.source}): " + ", ".join(
        f"{k} {v}" for k, v in asdict(ts).items() if k not in ("gen_len_hist", "eval_len_hist", "source")))
    return {"gpu": model.gpu.name, "total_gpu_hours": total / 3600, "floor_gpu_hours": floor / 3600,
            "floor_hours": {k: fcol[k] / 3600 for k in KINDS},
            "experiments": [{"name": e.name, "model": e.shape.name, "edits": e.edits,
                             "value_opts": e.total("values"), "solves": dict(e.solves),
                             "eval_cases": e.total("eval"), "hours": {k: sec[k] / 3600 for k in KINDS},
                             "ge_tokens": sec["ge_tokens"]} for e, sec, _ in rows],
            "top3": [(name, s / 3600) for s, name in top], "assumptions": model.assumptions() + notes}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/llama3-8b.yaml")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ge = ap.add_mutually_exclusive_group()
    ge.add_argument("--ge", dest="ge", action="store_true", default=None, help="GE on (default: the params)")
    ge.add_argument("--no-ge", dest="ge", action="store_false")
    ap.add_argument("--unit-costs", nargs="+", default=None,
                    help="JSON(s) of unit seconds measured on a GPU (a later file's unit wins)")
    ap.add_argument("--slice-costs", default=None, help="phases.json of bench/slice_phases.py (host units)")
    ap.add_argument("--solve-on", default="auto", choices=["auto", "host", "device"])
    ap.add_argument("--host-speedup", type=float, default=1.0, help="GPU machine's CPU vs this 2-core VM")
    ap.add_argument("--layer", type=int, default=1, help="edited layer where the params say 'best'")
    ap.add_argument("--value-iters", type=int, default=None, help="value iterations per chunk (default: v_num_grad_steps)")
    ap.add_argument("--c0-tokens-per-text", type=float, default=None)
    ap.add_argument("--dtype", default=None, choices=PRICED_DTYPES,
                    help="model dtype (default: the params)")
    ap.add_argument("--graph-node-us", type=float, default=None,
                    help="GPU µs per kernel replayed from a CUDA graph (gen_decode: graph or compiled, compile_blocks: "
                         "reduce-overhead; default: editlib.cost's assumption)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    ap.add_argument("--token-stats", action="store_true", help="measure per-fact token counts and exit")
    ap.add_argument("--n", type=int, default=1000, help="facts for --token-stats")
    args = ap.parse_args(argv)

    if args.token_stats:
        from editlib import counterfact
        from editlib.cost import measure_token_stats
        from editlib.llama3_tokenizer import build_llama3_tokenizer
        from editlib.tokens import prepare_tokenizer
        facts = counterfact.sample(counterfact.load_counterfact(None), args.n, 0)
        print(measure_token_stats(facts, prepare_tokenizer(build_llama3_tokenizer()), args.n))
        return

    sets = list(args.set)
    if args.ge is not None:
        sets.append(f"evaluation.generation={str(args.ge).lower()}")
    p = resolve(args.params, overrides=sets)
    from editlib.cost import shape_for
    shape = shape_for(p.model.id, p.model.label)
    tokens, how = c0_tokens(p, shape, args.c0_tokens_per_text)
    if p.second_model is not None and not p.second_model.id:
        raise SystemExit("second_model is a miniature built on demand (its tiny spec): there is no shape to price; "
                         "give it an id (a hub id or a folder with config.json) or --set second_model=null")
    shapes = [shape] + ([shape_for(p.second_model.id, p.second_model.label)]
                        if p.second_model and p.second_model.id else [])
    sm = p.second_model if p.second_model and p.second_model.id else None
    if sm is not None and (sm.dtype, bool(sm.tf32)) != (p.model.dtype, bool(p.model.tf32)):
        raise SystemExit(f"second_model runs in {sm.dtype} (tf32 {sm.tf32}) but model in {p.model.dtype} "
                         f"(tf32 {p.model.tf32}); the estimate prices both models alike: set them equal "
                         "(leave second_model's dtype and tf32 unset to inherit model's)")
    where, why = solve_location(args.solve_on)
    if (args.dtype or p.model.dtype) not in PRICED_DTYPES:
        raise SystemExit(f"model.dtype is {p.model.dtype!r}: give the dtype to price with --dtype (auto loads a "
                         "checkpoint in its own dtype: bfloat16 for Llama-3-8B)")
    model = CostModel(GPUS[args.gpu], dtype=args.dtype or p.model.dtype, tf32=bool(getattr(p.model, "tf32", False)),
                      solve_on=where, c0_tokens=tokens, gen_batch=p.evaluation.gen_batch_size,
                      gen_kv_gb=getattr(p.evaluation, "gen_kv_gb", None),
                      share_below_gb=float(getattr(p.evaluation, "share_below_gb", 0) or 0),
                      c0_batch_tokens=p.covariance.max_batch_tokens or p.covariance.batch_size * tokens / (
                          p.covariance.n_samples or 1e5),
                      fast_gram=bool(getattr(p.covariance, "fast_gram", False)),
                      host_speedup=args.host_speedup,
                      decode_graphs=bool(p.evaluation.generation) and p.evaluation.gen_decode in ("graph", "compiled"),
                      decode_fused=bool(p.evaluation.generation) and p.evaluation.gen_decode == "compiled",
                      value_graphs=value_graphs(p), step_graphs=step_graphs(p),
                      value_iters=args.value_iters or p.hparams["memit"].values.v_num_grad_steps)
    notes = [f"C0 corpus: {how}; every layer search collects C0 of all its layers",
             f"solves and C0 factors on the {where} ({why})",
             f"edited layer {args.layer} where a section says 'best'; GE {'on' if p.evaluation.generation else 'off'}"
             f" (gen_max_len {p.evaluation.gen_max_len}); {len(p.data.orderings)} ordering(s)",
             f"C0 accumulators per pass: {model.c0_per_pass(shape)} ({shape.name}, half the memory left beside the model)",
             "independent edits (layer search, singular, batch) " + (
                 "batched: one multi-right-hand-side solve / all batches of a size, one evaluation call "
                 "through per-row low-rank hooks" if getattr(p.evaluation, "batched_edits", False) else
                 "one at a time (reference path): solve, write, evaluate, restore per edit"),
             (f"blocks below the edited layer replayed for the later methods / λ of the same prompts, up to "
              f"{model.share_below_gb:g} GB kept (evaluation.share_below_gb)" if model.share_below_gb > 0 and
              getattr(p.evaluation, "batched_edits", False) else "every evaluation runs every block"),
             (f"ES/PS/NS scored twice per evaluation: under evaluation.alignment {p.evaluation.alignment} and "
              f"also_alignment {p.evaluation.also_alignment}" if getattr(p.evaluation, "also_alignment", None)
              else f"ES/PS/NS scored once per evaluation (evaluation.alignment {p.evaluation.alignment})"),
             f"float32 matmuls {'on TF32 tensor cores' if model.tf32 else 'in full float32 (model.tf32 off)'}; "
             "local executor (one process: targets shared as protocols' UnitContext groups share them)",
             "C0 Gram " + ((f"per batch: float32 products of the 16-bit keys on "
                            f"{'16-bit' if model.gram16 else 'TF32'} tensor cores, summed in float64 "
                            "(covariance.fast_gram, 16-bit model)"
                            + ("; the measured C0 unit, timed on TF32 tensor cores, bounds it"
                               if model.gram16 and "c0_s_per_token_layer" in model.unit_s else ""))
                           if model.gram32 else "in float64"),
             "GE rows per decode batch: " + ", ".join(
                 f"{s.name} {model.gen_rows(s, p.evaluation.gen_max_len)}" for s in shapes)
             + (f" (evaluation.gen_batch_size {model.gen_batch}, gen_kv_gb {model.gen_kv_gb})")]
    if args.graph_node_us is not None:
        if args.graph_node_us < 0:
            raise SystemExit(f"--graph-node-us must be >= 0, got {args.graph_node_us}")
        model = replace(model, graph_node_s=args.graph_node_us * 1e-6)
    decode_what = (f"compiled, {model.kernels_fused_fwd} fused kernels per block" if model.decode_fused
                   else f"graph, the eager step's {model.kernels_fwd} kernels per block")
    graphs = [what for flag, what in (("decode_graphs", f"GE's decode steps (evaluation.gen_decode: {decode_what})"),
                                      ("value_graphs", "the value steps' blocks (compile_blocks: reduce-overhead, "
                                                       f"{model.kernels_fused_value} fused kernels per block forward "
                                                       f"and backward, {model.graph_call_s * 1e6:g} µs of host time per "
                                                       "block call, forward and backward)"),
                                      ("step_graphs", "one-fact value steps whole but Adam, their eager kernels "
                                                      f"({model.kernels_fwd + model.kernels_bwd} per block, forward and "
                                                      "backward, and the loss's; capture_steps: the first forward and a "
                                                      "warm-up eager, one recording (the last forward replays), except for the "
                                                      f"{model.kept_reuse:.1%} of facts whose step has the sizes of an "
                                                      "earlier fact's in the run and replays its kept graph from the "
                                                      "first step on; chunks of several facts, whose "
                                                      "every stop is a new set to record, priced eagerly)"))
              if getattr(model, flag)]
    if graphs:
        notes.append("captured as CUDA graphs, modelled and not measured: " + "; ".join(graphs) + f": a step's "
                     f"block kernels replay without host time, {model.graph_node_s * 1e6:g} µs each on the GPU "
                     + ("(--graph-node-us)" if args.graph_node_us is not None else
                        "(fitted to an eager H200 profile's GPU time; --graph-node-us sets it)")
                     + ", the rest of the step stays eager (sampling; the loss and Adam, or Adam alone under capture_steps); fused counts are the H200's eager counts scaled by the "
                     "compiled/eager ratio counted on the CPU (editlib.cost); each decode batch's capture is priced "
                     f"as its {DECODE_WARMUPS} eager warm-up steps (decode.DECODE_WARMUPS) and its recording (an eager "
                     "step's host time); compilation is not priced")
    elif args.graph_node_us is not None:
        notes.append("--graph-node-us has no effect: these params capture no step (evaluation.gen_decode: graph or compiled "
                     "with GE on, compile_blocks: reduce-overhead, or capture_steps: true)")
    if p.evaluation.generation and p.evaluation.gen_decode == "static":
        notes.append("evaluation.gen_decode: static is priced as the transformers forward (the same kernels)")
    if args.slice_costs:
        host = slice_host_costs(args.slice_costs)
        model = replace(model, **host)
        notes.append(f"host units from {args.slice_costs}: {host}")
    if args.unit_costs:
        skipped: list[tuple[str, str, str]] = []
        model = with_unit_costs(model, *args.unit_costs, skipped=skipped, eval_batch=p.evaluation.batch_size,
                                shape=shape)
        notes += [f"measured unit left out (these params run that part otherwise than it was timed): "
                  f"{path}: {unit} (timed {how})" for path, unit, how in skipped]
        notes += unit_scaling_notes(model, shapes, p.evaluation.gen_max_len)
    exps = count_grid(p, layer=args.layer)
    out = report(p, exps, model, TokenStats(), args, notes)
    if not args.unit_costs:
        measured = measured_elsewhere(model, exps, p.evaluation.batch_size, shape)
        for path, hours, left in measured:
            also = f"; modelled, not measured: {', '.join(left)}, which these params run otherwise" if left else ""
            print(f"\n**Measured units exist for this GPU and dtype**: with `--unit-costs {path}` the same grid is "
                  f"**{hours:.1f} GPU-hours** (the model above estimates those units{also}; docs/paper-scale.md)")
        out["with_measured_units"] = {str(path): hours for path, hours, _ in measured}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
