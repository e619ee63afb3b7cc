"""Run a whole study phase by phase and print seconds and peak RSS per phase (issue 11).

Made for ``params/llama3-shape-slice.yaml`` (a 2-layer Llama-3-8B-shaped model with random
weights): every phase goes through editlib's public functions (``open_study``, ``Study.covs``,
``run_layer_search`` … ``run_sequential``, ``evaluate_records``) in a fresh results folder, with a
fresh C0 cache unless ``--reuse-c0``. Besides time and memory, each phase reports what it
materialised (``bench/phase_meter.py``): the most rows the LM head projected in one call, the
widest vocabulary-sized tensor, and how many weight-sized (d × d_in) and C0-sized (d_in × d_in)
tensors were alive at once. Writes ``phases.json`` next to the results: the phases, host unit
costs for ``bench/paper_cost.py --slice-costs`` and, under ``units``, the unit seconds that
``--unit-costs`` takes (meaningful on a GPU with a 32-layer shape model).

    EDITLIB_COUNTERFACT=/path/to/counterfact.json.gz \\
        python bench/slice_phases.py --params params/llama3-shape-slice.yaml [--reuse-c0 | --cache DIR]
            [--no-watch] [--c0-layers 0 1] [--tokenizer DIR] [--draw-device cuda] [--set KEY=VALUE ...]

A shape directory named ``llama3-8b-shape-<N>L`` that does not exist yet is built first, in the
params' ``model.dtype`` (``--tokenizer``, ``--draw-device``: see ``bench/build_llama3_slice.py``).
``--c0-layers``: the layers whose C0 is collected as its own phase (default: every layer; a
32-layer model on a GPU wants the edited ones only, with ``--set layer_search.layers=[0,1]``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phase_meter import GIB, BigTensorWatch, HeadRows, PhaseMeter, rss  # noqa: E402

from editlib import protocols  # noqa: E402
from editlib.arch import backbone_and_head, key_dim, value_dim  # noqa: E402
from editlib.generation import rows_per_batch  # noqa: E402
from editlib.metrics import evaluate_records  # noqa: E402
from editlib.params import resolve  # noqa: E402
from editlib.paths import repo_path  # noqa: E402
from editlib.workcount import shape_of  # noqa: E402


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} rss {rss() / GIB:5.2f} GiB] {msg}", flush=True)


def _batches(p, exp: str) -> pd.DataFrame:
    path = Path(p.results_dir) / p.name / exp / "batches.parquet"
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def warm_gen_len(tok, records, gen_max_len: int, steps: int = 2) -> int:
    """A GE length for a warm-up that decodes ``steps`` tokens after ``records``' shortest
    generation prompt (at most ``gen_max_len``). GE extends a prompt up to the length asked for,
    so a length at or below every prompt's own decodes nothing, and would warm nothing up."""
    from editlib.tokens import encode
    return min(gen_max_len, min(len(encode(tok, g)) for r in records for g in r.generation_prompts) + steps)


def _build(p, args) -> str:
    """Build the slice named by the params' model id when it is an editlib shape directory."""
    from editlib.shapes import BUILD_DTYPES, SHAPE_MARKER, build_llama3_shape_model
    mdir = Path(p.model.id)
    if not (mdir / "config.json").is_file() or (mdir / SHAPE_MARKER).is_file() or args.build:
        n_layers = int(mdir.name.rsplit("-", 1)[-1].rstrip("L")) if mdir.name[-1] == "L" else 2
        dtype = p.model.dtype if p.model.dtype in BUILD_DTYPES else "float32"
        build_llama3_shape_model(mdir, n_layers=n_layers, dtype=dtype, log=_log, draw_device=args.draw_device,
                                 tokenizer=args.tokenizer and str(repo_path(args.tokenizer)))
        return f"{n_layers}-layer shape model ({dtype}) in {mdir}"
    return f"{mdir} exists (not an editlib shape build)"


def unit_costs(p, phases: dict, study) -> dict:
    """Per-unit seconds on this machine from the protocols' own diagnostics (batches.parquet)."""
    ls, sq, bt, sw = (_batches(p, e) for e in ("layer_search", "sequential", "batch", "sweep"))
    out: dict = {"machine": f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
                 "model": p.model.id, "dtype": p.model.dtype, "n_layers": study.n_layers,
                 "d": value_dim(study.model, 0), "d_in": key_dim(study.model, 0)}
    # solves written into the weights (sequential, sweep); the layer search's and batch mode's
    # solves are per-fact shares of joint solves when independent edits are batched
    by_exp = {"layer_search": ls, "batch": bt, "sweep": sw, "sequential": sq}
    out["solve_s_by_experiment_n"] = {e: {int(n): round(float(g.seconds_solve.median()), 4)
                                          for n, g in b.groupby("n")} for e, b in by_exp.items() if not b.empty}
    done = [b for b in (sq, sw) if not b.empty]  # none yet while the run is under way
    written = pd.concat(done, ignore_index=True) if done else pd.DataFrame()
    if not written.empty:
        out["solve_apply_s_by_n"] = {int(n): round(float(g.seconds_solve.median()), 4)
                                     for n, g in written.groupby("n")}
    if not ls.empty:  # values are charged to the first method that needed them: sum, per fact
        per = {int(l): g.batch_index.nunique() for l, g in ls.groupby("layer")}
        out["values_s_per_fact_by_layer"] = {int(l): round(float(g.seconds_values.sum()) / per[int(l)], 4)
                                             for l, g in ls.groupby("layer")}
        out["keys_s_per_fact_by_layer"] = {int(l): round(float(g.seconds_keys.sum()) / per[int(l)], 4)
                                           for l, g in ls.groupby("layer")}
        out["mean_value_steps"] = round(float(ls.mean_value_steps.mean()), 2)
        out["eval_s_per_singular_case_ge"] = round(float(ls.seconds_eval.mean()), 4)
    for k, v in phases.items():
        if k.startswith(("C0 ", "evaluate ")):
            out[f"phase_s:{k}"] = round(v["seconds"], 2)
    if study._cov_info:
        out["c0"] = {str(l): v for l, v in study._cov_info.items()}
    return out


def measured_units(costs: dict, phases: dict) -> dict:
    """The same numbers as ``bench/paper_cost.py --unit-costs`` keys (editlib.cost.UNIT_KEYS): valid
    for this model, device and dtype (run the script on the GPU with a 32-layer shape model and
    the paper's gen_max_len to replace the cost model's estimates)."""
    ph = {k: v["seconds"] for k, v in phases.items()}
    u: dict = {}
    if "solve_apply_s_by_n" in costs:
        u["solve_s_by_n"] = {str(n): s for n, s in costs["solve_apply_s_by_n"].items()}
    if costs.get("n_layers", 0) > 2 and 1 in costs.get("values_s_per_fact_by_layer", {}):
        u["values_s_per_fact"] = costs["values_s_per_fact_by_layer"][1]
    one, one_ge = ph.get("evaluate 1 case, no GE"), ph.get("evaluate 1 case, GE")
    eight, eight_ge = ph.get("evaluate 8 cases, no GE"), ph.get("evaluate 8 cases, GE")
    # GE's unit is the difference of two timings: one lost in their noise (not above zero) is left to
    # the cost model's estimate rather than passed on as a measured zero
    if one is not None:
        u["eval_s_per_case_single"] = one
        if one_ge is not None and one_ge > one:
            u["ge_s_per_case_single"] = one_ge - one
    if eight is not None:
        u["eval_s_per_case"] = eight / 8
        if eight_ge is not None and eight_ge > eight:
            u["ge_s_per_case"] = (eight_ge - eight) / 8
    collect = [(k, v) for k, v in ph.items() if k.startswith("C0 collect layer")]
    tokens = [v.get("tokens") for v in costs.get("c0", {}).values()]
    if collect and tokens and tokens[0]:
        u["c0_s_per_token_layer"] = sum(v for _, v in collect) / len(collect) / tokens[0]
    factor = [v for k, v in ph.items() if k.startswith("C0 load + factor")]
    if factor:
        u["c0_factor_s"] = sum(factor) / len(factor)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in u.items()}


def run_protocols(runs, study, phase, phases: dict, save) -> list[str]:
    """Each protocol as its own phase; one protocol's failure (out of memory, say) is recorded in
    ``phases`` and does not cost the others theirs. Returns the names that failed."""
    failed: list[str] = []
    for name, fn in runs:
        try:
            with phase(name):
                fn(study, log=_log)
        except Exception as e:
            failed.append(name)
            phases[name] = {**phases.get(name, {}), "seconds": None, "error": f"{type(e).__name__}: {e}"}
            _log(f"    {name} FAILED: {type(e).__name__}: {e}")
            save(complete=False)
    return failed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params/llama3-shape-slice.yaml")
    ap.add_argument("--out", default=None, help="run folder (default runs/slice-phases/<time>)")
    ap.add_argument("--reuse-c0", action="store_true", help="use the user's C0 cache (default: a fresh one)")
    ap.add_argument("--cache", default=None, help="editlib cache folder to use (e.g. an earlier run's <out>/cache)")
    ap.add_argument("--build", action="store_true", help="(re)build the slice even if a directory exists")
    ap.add_argument("--no-watch", action="store_true", help="no tensor watch (it adds a little Python per op)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--counterfact", default=None, help="CounterFact file (else EDITLIB_COUNTERFACT)")
    ap.add_argument("--c0-layers", type=int, nargs="+", default=None, help="C0 phases for these layers (default: all)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a build (default: the real Llama-3 one)")
    ap.add_argument("--draw-device", default="cpu", help="where a build draws its random weights (cpu | cuda)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    ap.add_argument("--phases-copy", default=None, metavar="PATH",
                    help="also write phases.json here after every phase (a device run's returned folder)")
    args = ap.parse_args(argv)
    if args.counterfact:
        os.environ["EDITLIB_COUNTERFACT"] = str(Path(args.counterfact).resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    out = repo_path(args.out or f"runs/slice-phases/{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    if args.cache:
        os.environ["EDITLIB_CACHE"] = str(repo_path(args.cache))
    elif not args.reuse_c0:
        os.environ["EDITLIB_CACHE"] = str(out / "cache")  # fresh C0 statistics (and tokenizer cache)
    p = resolve(args.params, overrides=[*args.set, f"results_dir={out / 'results'}"])
    meter = PhaseMeter()
    phases: dict[str, dict] = {}
    t_all = time.perf_counter()
    head = None
    cm = {"watch": None}
    st: dict = {"study": None}

    def save(complete: bool) -> None:
        """phases.json, rewritten (atomically) after every phase: a run stopped by a time limit keeps
        what it measured; ``complete`` says whether every phase ran."""
        try:
            costs = unit_costs(p, phases, st["study"]) if st["study"] is not None else {}
        except Exception as e:  # a half-written run's files: keep the phases, say why the units are missing
            costs = {"error": f"{type(e).__name__}: {e}"}
        text = json.dumps({
            "params": str(args.params), "command": " ".join(sys.argv), "complete": complete,
            "wall_s": time.perf_counter() - t_all, "process_peak_rss_gib": meter.process_peak / GIB,
            "phases": phases, "unit_costs": costs, "units": measured_units(costs, phases),
            "evaluation": {"batch_size": int(p.evaluation.batch_size)},  # what the eval units scored at
            "shape": None if st["study"] is None else asdict(  # ... and on which shape (editlib.cost.timed_shape)
                shape_of(st["study"].model, p.model.label or str(p.model.id))),
            "raw": {"eval": st.get("eval")}},
            indent=1, default=str) + "\n"
        for dest in (out / "phases.json", *([Path(args.phases_copy)] if args.phases_copy else [])):
            tmp = dest.with_name(dest.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, dest)

    def cuda_peak() -> dict:
        """The GPU's peak since the last phase ended (or the warm-up), and a new start."""
        if not torch.cuda.is_available():
            return {}
        peak = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
        return {"cuda_peak_gib": peak}

    @contextlib.contextmanager
    def phase(name: str):
        try:
            with warnings.catch_warnings(record=True) as caught, meter.phase(name, cm["watch"], head) as ph:
                warnings.simplefilter("always")
                _log(f"--- {name}")
                if cm["watch"] is not None:
                    with cm["watch"]:
                        yield ph
                else:
                    yield ph
        except BaseException:  # a failed phase keeps its GPU peak (an out-of-memory one, say)
            phases[name] = {"seconds": None, **cuda_peak()}
            raise
        msgs = sorted({str(w.message)[:160] for w in caught})
        phases[name] = {"seconds": ph.seconds, "peak_rss_gib": ph.peak_rss / GIB,
                        "start_rss_gib": ph.start_rss / GIB, "end_rss_gib": ph.end_rss / GIB,
                        "big": ph.big, "head": ph.head, "warnings": msgs, **cuda_peak()}
        save(complete=False)
        _log(f"    {name}: {ph.seconds:.1f} s, peak RSS {ph.peak_rss / GIB:.2f} GiB"
             + (f", {len(msgs)} distinct warning(s): {msgs[0][:100]}" if msgs else ""))

    with phase("build tokenizer + model (if needed)"):
        built = _build(p, args)
    _log(built)
    with phase("load (model, CounterFact, context templates)"):
        study = protocols.open_study(p, log=_log)
        st["study"] = study
    _, lm_head = backbone_and_head(study.model)
    head = HeadRows(lm_head)
    d, d_in, vocab = value_dim(study.model, 0), key_dim(study.model, 0), study.model.config.vocab_size
    if not args.no_watch:
        cm["watch"] = BigTensorWatch({
            "weight d×d_in": lambda t: t.numel() == d * d_in,
            "C0 d_in×d_in f64": lambda t: t.numel() == d_in * d_in and t.dtype == torch.float64,
            "C0 d_in×d_in other": lambda t: t.numel() == d_in * d_in,
            "vocab-wide": lambda t: t.dim() >= 1 and t.shape[-1] == vocab,
        }, vocab=vocab)
    layers = list(range(study.n_layers)) if args.c0_layers is None else args.c0_layers
    bad = [l for l in layers if not 0 <= l < study.n_layers]
    if bad:
        raise SystemExit(f"--c0-layers {bad}: the model has layers 0..{study.n_layers - 1}")
    for l in layers:
        if hasattr(study, "prepare_covs"):
            with phase(f"C0 collect layer {l}"):
                study.prepare_covs([l])
            with phase(f"C0 load + factor layer {l}"):
                study.covs([l])
        else:
            with phase(f"C0 layer {l} (collect + factor)"):
                study.covs([l])
    # the unedited model's evaluation units first: they do not depend on the protocols, and a run
    # stopped by a time limit (bench/device_checks.py) still has them in phases.json
    ev = p.evaluation
    facts = study.facts(8, 0)
    _log("--- warm-up (untimed): one evaluation with GE, so that no unit pays first-call costs")
    evaluate_records(study.model, study.tok, facts[:1], alignment=ev.alignment, batch_size=ev.batch_size,
                     generation=True, gen_seed=ev.gen_seed,
                     gen_max_len=warm_gen_len(study.tok, facts[:1], ev.gen_max_len))
    cuda_peak()  # the warm-up's peak is no phase's
    # what GE's units are timed on (editlib.cost.timed: a call of 8 cases, its rows per decode batch
    # and length; the single-case unit one case): the paper grid's decode batches, as it sizes them
    kv = None if ev.gen_kv_gb is None else ev.gen_kv_gb * 1e9
    st["eval"] = {"cases": len(facts), "gen_rows": sum(len(r.generation_prompts) for r in facts),
                  "rows_per_batch": rows_per_batch(study.model, ev.gen_batch_size, ev.gen_max_len, kv),
                  "gen_max_len": ev.gen_max_len}
    for label, n, gen in (("evaluate 1 case, no GE", 1, False), ("evaluate 1 case, GE", 1, True),
                          ("evaluate 8 cases, no GE", 8, False), ("evaluate 8 cases, GE", 8, True)):
        with phase(label):
            evaluate_records(study.model, study.tok, facts[:n], alignment=ev.alignment,
                             batch_size=ev.batch_size, generation=gen, gen_seed=ev.gen_seed,
                             gen_max_len=ev.gen_max_len, gen_batch_size=ev.gen_batch_size, gen_kv_gb=ev.gen_kv_gb)
    runs = [("layer search", protocols.run_layer_search), ("singular", protocols.run_singular),
            ("sweep", protocols.run_sweep), ("batch MEMIT + EMMET", protocols.run_batch),
            ("sequential", protocols.run_sequential)]
    failed = run_protocols(runs, study, phase, phases, save)
    total = time.perf_counter() - t_all
    meter.close()
    head.close()

    save(complete=not failed)
    print()
    print("| phase | seconds | peak RSS (GiB) | LM-head rows (max/call) | weight-sized live | C0 f64 live | vocab-wide max rows |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, ph in phases.items():
        if ph.get("error"):
            print(f"| {name} | FAILED: {ph['error'][:120]} | | | | | |")
            continue
        big = ph.get("big") or {}
        live = big.get("peak_live", {})
        hd = ph.get("head") or {}
        print(f"| {name} | {ph['seconds']:.1f} | {ph['peak_rss_gib']:.2f} | "
              f"{hd.get('rows', '')}/{hd.get('max_rows', '')} | {live.get('weight d×d_in', 0) if big else ''} | "
              f"{live.get('C0 d_in×d_in f64', 0) if big else ''} | {big.get('max_logit_rows', '') if big else ''} |")
    print(f"\nwall {total:.1f} s; process-wide peak RSS {meter.process_peak / GIB:.2f} GiB; "
          f"details and unit costs: {out / 'phases.json'}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (the other phases ran; see phases.json)")


if __name__ == "__main__":
    main()
