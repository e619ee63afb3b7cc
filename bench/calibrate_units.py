"""Measure the cost model's units at the paper's own sizes (issue 13), for ``bench/paper_cost.py
--unit-costs``. Benchmark script, not a test: meaningful on a GPU with the 32-layer Llama-3-8B
shape (``bench/device_checks.py`` runs it as its ``calibrate`` step).

    python bench/calibrate_units.py --out calibration.json [--params params/llama3-shape-slice.yaml]
        [--grid params/llama3-8b.yaml] [--set KEY=VALUE ...] [--smoke]

The slice (``bench/slice_phases.py``) times whole phases at the slice's sizes, which do not
extrapolate: its C0 unit carries the per-layer fixed costs spread over 22k tokens, its GE unit was
decoded 80 rows at a time. Here each unit is measured the way the grid of ``--grid`` spends it:

* **C0 collection**: one pass over every layer the device holds at once (editlib.stats.
  layers_per_pass, all 32 on an H200), on batches shaped as the grid's (``covariance.batch_size``,
  ``max_batch_tokens``, ``fast_gram``) of random token ids 650 long (the cost model's Wikipedia
  article). Timed at two corpus sizes: the slope is ``c0_s_per_token_layer``; the per-layer tail
  (the sum copied to the host, symmetrised and written to its cache entry) is ``c0_layer_fixed_s``;
  reading that entry back and factoring it on the device is ``c0_factor_s``.
* **Scoring and GE**: ``evaluate_records`` on as many cases as fill one decode batch of the grid's
  ``gen_batch_size`` (capped by ``gen_kv_gb``), each case under its own random rank-one edit through
  :class:`editlib.lowrank.RowDeltas` (the layer search's path), with and without GE of
  ``gen_max_len`` tokens (``eval_s_per_case``, ``ge_s_per_case`` = the difference per case); and one
  case alone (``*_single``).
* **Values** at layer 1: a chunk of ``z_batch_size`` facts (``values_s_per_fact``) and facts one at a
  time as a B = 1 sequential edit does (``values_s_per_fact_single``), with the mean Adam steps
  taken (random weights rarely stop early: about the cost model's bound of 25). Under ``--grid-set
  hparams.common.capture_steps=true`` the one-fact unit is the grid's mix of facts that record their
  own graph and facts that replay a kept one (:func:`single_fact_unit`), and the chunk's time is
  recorded but is no unit: random weights run every fact to the bound, so the chunk's one set of
  running facts is recorded once, where real facts stop apart and record more (the cost model
  prices chunks eagerly).

Random weights make the scores meaningless; only the seconds count. The JSON is rewritten after
every part, so a stopped run keeps what it measured (``complete`` says whether all ran).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slice_phases import _build, warm_gen_len  # noqa: E402

from editlib import protocols  # noqa: E402
from editlib.arch import key_dim, value_dim  # noqa: E402
from editlib.generation import rows_per_batch  # noqa: E402
from editlib.lowrank import LowRankEdits, RowDeltas  # noqa: E402
from editlib.metrics import evaluate_records  # noqa: E402
from editlib.params import resolve  # noqa: E402
from editlib.paths import repo_path  # noqa: E402
from editlib.solver import factor_cov  # noqa: E402
from editlib.stats import (_read_cache, _write_cache, collect_second_moments, fast_gram_applies, products_16bit,  # noqa: E402
                           layers_per_pass, symmetrize_upper)
from editlib.values import compute_values  # noqa: E402
from editlib.workcount import shape_of  # noqa: E402

#: tokens per C0 text (the cost model's Wikipedia article, bench/paper_cost.py TOKENS_PER_TEXT)
C0_TEXT_TOKENS = 650


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kw):
    """(seconds, result) of ``fn``, the device's queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    res = fn(*args, **kw)
    _sync(device)
    return time.perf_counter() - t0, res


def random_corpus(n_texts: int, length: int, vocab: int, bos: int | None, seed: int) -> list[torch.Tensor]:
    """``n_texts`` random id sequences of ``length`` (BOS first): C0's cost does not depend on the
    words, only on how many tokens and how they batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_texts, length), generator=g, dtype=torch.int32)
    if bos is not None:
        ids[:, 0] = bos
    return list(ids)


def c0_units(study, grid, *, batches: tuple[int, int], text_tokens: int, save) -> dict:
    """C0 collection at two corpus sizes (slope and intercept), the per-layer tail and a factor."""
    model, tok = study.model, study.tok
    device = next(model.parameters()).device
    cp = grid.covariance
    d_in = key_dim(model, 0)
    per = layers_per_pass(d_in, device, override=cp.layers_per_pass)
    layers = list(range(min(per, study.n_layers)))
    gram32 = fast_gram_applies(bool(cp.fast_gram), next(model.parameters()).dtype)
    texts_per_batch = cp.batch_size or 16
    if cp.max_batch_tokens:
        texts_per_batch = max(1, min(texts_per_batch, cp.max_batch_tokens // text_tokens))
    vocab = min(model.config.vocab_size, len(tok))
    bos = tok.bos_token_id

    def collect(n_batches: int, seed: int) -> tuple[float, dict]:
        enc = random_corpus(n_batches * texts_per_batch, text_tokens, vocab, bos, seed)
        return timed(device, collect_second_moments, model, tok, [], layers, batch_size=cp.batch_size or 16,
                     max_length=text_tokens, max_batch_tokens=cp.max_batch_tokens, dtype=torch.float64,
                     progress=False, gram32=gram32, on_device=True, encoded=enc)

    out = {"layers_per_pass": len(layers), "tokens_per_batch": texts_per_batch * text_tokens,
           "gram32": gram32, "gram16": gram32 and products_16bit(device, next(model.parameters()).dtype),
           "batches": list(batches)}
    _log(f"C0: warm-up pass of {len(layers)} layer(s), 1 batch of {texts_per_batch} × {text_tokens} tokens")
    _, sums = collect(1, 0)
    del sums
    secs = []
    for i, n in enumerate(batches):
        t, sums = collect(n, 1 + i)
        secs.append(t)
        _log(f"C0: {n} batch(es), {len(layers)} layer(s): {t:.2f} s")
        if i < len(batches) - 1:
            del sums
    out["pass_s"] = secs
    tokens = [n * texts_per_batch * text_tokens for n in batches]
    slope = (secs[1] - secs[0]) / (tokens[1] - tokens[0])  # seconds per token, all layers of the pass
    out["pass_fixed_s"] = secs[0] - slope * tokens[0]
    units = {"c0_s_per_token_layer": slope / len(layers)} if slope > 0 else {}
    save(out, units)
    # the per-layer tail as editlib.stats._collect_into_cache runs it, then the study's read + factor
    last = layers[-1]
    on_dev, count = sums.pop(last)
    del sums
    with tempfile.TemporaryDirectory(dir=repo_path("runs")) as tmp:
        path = Path(tmp) / "c0.safetensors"
        _sync(device)
        t0 = time.perf_counter()
        total = symmetrize_upper(on_dev.cpu())
        del on_dev
        _write_cache(path, {"calibration": True}, total, count, float("nan"))
        out["layer_tail_s"] = time.perf_counter() - t0
        del total
        t_factor, f = timed(device, lambda: factor_cov(_read_cache(path)[1].to(torch.float64) / count,
                                                        device=device, overwrite=True))
        out["factor_s"], out["factor_jitter"] = t_factor, float(f.jitter)
        del f
    units.update(c0_layer_fixed_s=out["layer_tail_s"], c0_factor_s=t_factor)
    _log(f"C0: per layer {1e6 * units.get('c0_s_per_token_layer', float('nan')):.3f} µs/token, tail "
         f"{out['layer_tail_s']:.2f} s, read + factor {t_factor:.2f} s")
    return {"raw": out, "units": units}


def _row_edits(model, layer: int, n: int, seed: int) -> LowRankEdits:
    """``n`` random rank-one edits of ``layer`` (small, so that nothing overflows)."""
    g = torch.Generator().manual_seed(seed)
    d, d_in = value_dim(model, layer), key_dim(model, layer)
    R = torch.randn(d, n, generator=g) * 1e-3
    X = torch.randn(n, d_in, generator=g) * 1e-3
    return LowRankEdits(layer, [R[:, e:e + 1] for e in range(n)], [X[e:e + 1] for e in range(n)])


def eval_units(study, grid, *, gen_max_len: int, max_cases: int | None) -> dict:
    """Scoring and GE of one full decode batch of cases (and of one case), under per-row edits."""
    model, tok = study.model, study.tok
    device = next(model.parameters()).device
    ev = grid.evaluation
    kv = None if ev.gen_kv_gb is None else ev.gen_kv_gb * 1e9
    rows = rows_per_batch(model, ev.gen_batch_size, gen_max_len, kv)
    facts, used = [], 0
    for r in study.facts(min(max_cases or rows, rows), 0):  # a case has at least one prompt
        if used + len(r.generation_prompts) > rows:
            break
        facts.append(r)
        used += len(r.generation_prompts)
    kw = dict(alignment=ev.alignment, batch_size=ev.batch_size, gen_seed=ev.gen_seed, gen_max_len=gen_max_len,
              gen_batch_size=ev.gen_batch_size, gen_kv_gb=ev.gen_kv_gb, gen_text=ev.gen_text,
              gen_decode=ev.gen_decode)  # --grid-set evaluation.gen_decode=graph: GE's units under CUDA graphs

    def run(cases, generation: bool, **over) -> float:
        with RowDeltas(model, _row_edits(model, 1, len(cases), 0)) as hook:
            t, _ = timed(device, evaluate_records, model, tok, cases, generation=generation,
                         groups=list(range(len(cases))), deltas=hook, **{**kw, **over})
        return t

    _log(f"eval: warm-up; then {len(facts)} cases ({used} generation rows, one decode batch of ≤ {rows})")
    # untimed, as the timed calls run (under the per-row edit hook, GE through the grid's decode
    # mode) and decoding a few tokens, so that no unit pays a first call's costs (under
    # gen_decode: compiled, the decode step's compilation)
    run(facts[:1], True, gen_max_len=warm_gen_len(tok, facts[:1], gen_max_len))
    raw = {"cases": len(facts), "gen_rows": used, "rows_per_batch": rows, "gen_max_len": gen_max_len}
    raw["one_s"], raw["one_ge_s"] = run(facts[:1], False), run(facts[:1], True)
    raw["many_s"], raw["many_ge_s"] = run(facts, False), run(facts, True)
    n = len(facts)
    units = {"eval_s_per_case_single": raw["one_s"], "eval_s_per_case": raw["many_s"] / n}
    # GE is a difference of two timings: one lost in their noise is not passed on as a measured zero
    if raw["one_ge_s"] > raw["one_s"]:
        units["ge_s_per_case_single"] = raw["one_ge_s"] - raw["one_s"]
    if raw["many_ge_s"] > raw["many_s"]:
        units["ge_s_per_case"] = (raw["many_ge_s"] - raw["many_s"]) / n
    _log(f"eval: 1 case {raw['one_s']:.3f} s (GE {raw['one_ge_s']:.2f} s); {n} cases {raw['many_s']:.2f} s "
         f"(GE {raw['many_ge_s']:.2f} s)")
    return {"raw": raw, "units": units}


def single_fact_unit(own_s: float, kept_s: float, reuse: float) -> float:
    """Seconds per one-fact value optimisation under ``capture_steps`` in a run where a share
    ``reuse`` of the facts replays a kept graph of an earlier fact's sizes (``kept_s`` per fact) and
    the rest record their own (``own_s`` per fact): editlib.cost's ``kept_reuse`` mix, measured."""
    if not 0.0 <= reuse <= 1.0:
        raise ValueError(f"reuse must lie in [0, 1], got {reuse}")
    return (1.0 - reuse) * own_s + reuse * kept_s


def kept_reuse() -> float:
    """editlib.cost's share of a B = 1 run's facts that replay a kept one-fact graph."""
    from dataclasses import fields

    from editlib.cost import CostModel
    return next(f.default for f in fields(CostModel) if f.name == "kept_reuse")


def values_units(study, grid, *, n_single: int, layer: int = 1) -> dict:
    """Values at ``layer``: one chunk of the grid's z_batch_size, and facts one at a time (B = 1).

    Under ``capture_steps`` the one-fact steps run as a protocol's unit runs them
    (``values.keeping_graphs``): the facts are timed twice, first recording their graphs (``own``),
    then replaying the kept ones (``kept``), and the unit is the grid's mix of the two
    (editlib.cost's ``kept_reuse``: a B = 1 run of 4,096 CounterFact facts replays 3,996)."""
    from editlib.values import KEPT_COUNTS, keeping_graphs

    model, tok = study.model, study.tok
    device = next(model.parameters()).device
    ehp = grid.method_hparams("memit", layer, "sequential")
    ctx = study.contexts(ehp.context_templates, ehp.context_text)
    chunk = ehp.values.z_batch_size
    facts = study.facts(1 + max(chunk, n_single), 0)
    one = replace(ehp.values, z_batch_size=1)
    compute_values(model, tok, facts[:1], layer, ctx, one)  # warm-up: first calls pay their set-up
    t_chunk, r_chunk = timed(device, compute_values, model, tok, facts[1:1 + chunk], layer, ctx, ehp.values)
    raw = {"layer": layer, "chunk": chunk, "chunk_s": t_chunk, "chunk_mean_steps": float(r_chunk.steps.float().mean()),
           "single_facts": n_single}
    singles = facts[1:1 + n_single]
    if one.capture_steps:
        with keeping_graphs():
            made0, reused0 = KEPT_COUNTS["made"], KEPT_COUNTS["reused"]
            t_own, r_one = timed(device, compute_values, model, tok, singles, layer, ctx, one)
            made1, reused1 = KEPT_COUNTS["made"], KEPT_COUNTS["reused"]
            t_kept, _ = timed(device, compute_values, model, tok, singles, layer, ctx, one)
            reuse = kept_reuse()
            raw |= {"single_own_s": t_own, "single_kept_s": t_kept, "kept_reuse": reuse,
                    "own_graphs_made": made1 - made0, "own_graphs_reused": reused1 - reused0,
                    "kept_graphs_reused": KEPT_COUNTS["reused"] - reused1}
            t_one = n_single * single_fact_unit(t_own / n_single, t_kept / n_single, reuse)
    else:
        t_one, r_one = timed(device, compute_values, model, tok, singles, layer, ctx, one)
    raw |= {"single_s": t_one, "single_mean_steps": float(r_one.steps.float().mean())}
    units = {"values_s_per_fact_single": t_one / n_single}
    if not one.capture_steps:
        units["values_s_per_fact"] = t_chunk / chunk
    # else the chunk's time stays in raw: a chunk records a graph per set of running facts, and random
    # weights run every fact to the bound, so its one set is recorded once; real facts stop apart and
    # record more. The cost model prices chunks eagerly under capture_steps (editlib.cost.step_graphs)
    kept = (f"; recording its own graph {1e3 * raw['single_own_s'] / n_single:.0f} ms, replaying a kept one "
            f"{1e3 * raw['single_kept_s'] / n_single:.0f} ms" if one.capture_steps else "")
    _log(f"values at layer {layer}: {1e3 * t_chunk / chunk:.0f} ms/fact in a chunk of {chunk} "
         f"({raw['chunk_mean_steps']:.1f} steps), {1e3 * units['values_s_per_fact_single']:.0f} ms/fact alone "
         f"({raw['single_mean_steps']:.1f} steps{kept})")
    return {"raw": raw, "units": units}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="the JSON written (rewritten after every part)")
    ap.add_argument("--params", default="params/llama3-shape-slice.yaml", help="the model to measure on")
    ap.add_argument("--grid", default="params/llama3-8b.yaml", help="the params whose sizes are measured")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of --params")
    ap.add_argument("--grid-set", action="append", default=[], metavar="KEY=VALUE", help="override of --grid")
    ap.add_argument("--c0-batches", type=int, nargs=2, default=(2, 6), help="the two corpus sizes, in batches")
    ap.add_argument("--c0-text-tokens", type=int, default=C0_TEXT_TOKENS)
    ap.add_argument("--gen-max-len", type=int, default=None, help="default: the grid's evaluation.gen_max_len")
    ap.add_argument("--max-cases", type=int, default=None, help="at most this many cases in the GE batch")
    ap.add_argument("--single-facts", type=int, default=6, help="facts timed one at a time (values)")
    ap.add_argument("--parts", nargs="+", choices=("c0", "eval", "values"), default=("c0", "eval", "values"))
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape build")
    ap.add_argument("--draw-device", default="cpu", help="where a shape build draws its random weights")
    ap.add_argument("--counterfact", default=None, help="CounterFact file (else EDITLIB_COUNTERFACT)")
    a = ap.parse_args(argv)
    if a.counterfact:
        os.environ["EDITLIB_COUNTERFACT"] = str(Path(a.counterfact).resolve())
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    repo_path("runs").mkdir(exist_ok=True)
    p = resolve(a.params, overrides=a.set or None)
    grid = resolve(a.grid, overrides=a.grid_set or None)
    doc = {"params": a.params, "grid": a.grid, "sets": a.set, "grid_sets": a.grid_set, "command": " ".join(sys.argv), "complete": False,
           "device": None, "raw": {}, "units": {}, "errors": {}}

    def save(raw_part: dict | None = None, units: dict | None = None, name: str | None = None) -> None:
        if name and raw_part is not None:
            doc["raw"][name] = raw_part
        if units:
            doc["units"].update({k: round(v, 8) for k, v in units.items()})
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, out)

    t0 = time.perf_counter()
    _log(_build(p, argparse.Namespace(draw_device=a.draw_device, tokenizer=a.tokenizer, build=False)))
    study = protocols.open_study(p, experiments=["layer_search"], log=_log)
    dev = next(study.model.parameters()).device
    doc["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    # what the GE and values units were timed with (editlib.cost.measured_with_graphs reads it)
    vhp = grid.method_hparams("memit", 1, "sequential").values
    doc["graphs"] = {"decode_graphs": grid.evaluation.gen_decode in ("graph", "compiled") and dev.type == "cuda",
                     "decode_fused": grid.evaluation.gen_decode == "compiled",
                     "value_graphs": vhp.compile_blocks == "reduce-overhead", "step_graphs": vhp.capture_steps}
    # the scoring batch the eval units were timed at (editlib.cost.with_unit_costs compares it)
    doc["evaluation"] = {"batch_size": int(grid.evaluation.batch_size)}
    doc["model"] = {"id": p.model.id, "dtype": p.model.dtype, "n_layers": study.n_layers,
                    "d": value_dim(study.model, 0), "d_in": key_dim(study.model, 0)}
    # the shape the units were timed on (editlib.cost.timed_shape: another model's work is scaled from it)
    doc["shape"] = asdict(shape_of(study.model, p.model.label or str(p.model.id)))
    doc["raw"]["load_s"] = time.perf_counter() - t0
    save()
    gen_len = a.gen_max_len or grid.evaluation.gen_max_len
    parts = {
        "c0": lambda: c0_units(study, grid, batches=tuple(a.c0_batches), text_tokens=a.c0_text_tokens,
                               save=lambda raw, u: save(raw, u, "c0")),
        "eval": lambda: eval_units(study, grid, gen_max_len=gen_len, max_cases=a.max_cases),
        "values": lambda: values_units(study, grid, n_single=a.single_facts),
    }
    for name in a.parts:
        try:
            got = parts[name]()
            save(got["raw"], got["units"], name)
        except Exception as e:  # one part's failure (out of memory, say) does not cost the others theirs
            doc["errors"][name] = f"{type(e).__name__}: {e}"
            _log(f"{name} FAILED: {doc['errors'][name]}")
            save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    doc["complete"] = not doc["errors"]
    doc["wall_s"] = time.perf_counter() - t0
    save()
    print(json.dumps({"units": doc["units"]}))
    return 0 if doc["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
