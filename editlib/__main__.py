"""Command line: ``python -m editlib <command> ...`` (``--help`` lists the commands)."""
from __future__ import annotations

import argparse
import json
import sys


#: TinyConfig fields settable from ``tiny-train`` (besides --layers/--seed); build_tiny writes every
#: override into the model card's rebuild command, so each must be accepted here
_TINY_OVERRIDES = (("max_steps", int), ("vocab_size", int), ("hidden", int), ("intermediate", int),
                   ("heads", int), ("seq_len", int), ("batch_rows", int), ("lr", float), ("warmup", int),
                   ("weight_decay", float), ("check_every", int), ("target_rewrite", float),
                   ("target_other", float))


def _tiny_train(a: argparse.Namespace) -> int:
    from .tiny import build_tiny, passes_bar

    if (a.world is None) == (not a.counterfact):
        raise SystemExit("tiny-train: give exactly one of --world N or --counterfact --n N")
    source, n = ("world", a.world) if a.world is not None else ("counterfact", a.n)
    overrides = {k: getattr(a, k) for k, _ in _TINY_OVERRIDES if getattr(a, k) is not None}
    out = build_tiny(source, n, a.out, seed=a.seed, n_layers=a.layers,
                     counterfact_path=a.counterfact_path, **overrides)
    meta = json.loads((out / "editlib_tiny.json").read_text())
    print(json.dumps({"out": str(out), "train_seconds": meta["train_seconds"], "steps": meta["steps"],
                      "quality": meta["quality"]}, indent=1))
    return 0 if passes_bar(meta["quality"]) else 1


def _tiny_check(a: argparse.Namespace) -> int:
    from .models import load_model
    from .tiny import fact_quality, load_tiny_records, passes_bar

    model, tok = load_model(a.model_dir)
    q = fact_quality(model, tok, load_tiny_records(a.model_dir, a.counterfact_path))
    for k, v in q.items():
        print(f"{k:32s} {v * 100:6.2f} %")
    ok = passes_bar(q)
    print("quality bar:", "passed" if ok else "NOT passed")
    return 0 if ok else 1


def _load_eval_records(path: str, n: int | None):
    """Records from a CounterFact file or a miniature directory; the first ``n`` of the seeded
    unique-subject ordering (:func:`editlib.counterfact.sample`) when ``n`` is given."""
    from pathlib import Path

    from .counterfact import load_counterfact, sample
    from .tiny import load_tiny_records

    p = Path(path)
    records = load_tiny_records(p) if p.is_dir() else load_counterfact(p)
    return sample(records, n) if n is not None else records


def _evaluate(a: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from .metrics import evaluate_records, format_summary, summarize_cases
    from .models import load_model
    from .rs import RSResources

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model(a.model, dtype=a.dtype, device=device)
    records = _load_eval_records(a.records, a.n)
    rs = RSResources.from_dir(a.rs_dir) if a.rs_dir else None
    df = evaluate_records(model, tok, records, alignment=a.alignment, batch_size=a.batch_size,
                          generation=not a.no_generation, gen_seed=a.seed, gen_max_len=a.gen_max_len,
                          gen_batch_size=a.gen_batch_size, rs_resources=rs)
    from pathlib import Path

    from .store import atomic_write_parquet

    atomic_write_parquet(Path(a.out), df)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 4):
        shown = df if a.show is None or len(df) <= a.show else df.head(a.show)
        print(shown.to_string(index=False))
        if len(shown) < len(df):
            print(f"... {len(df) - len(shown)} more cases in {a.out}")
        print()
        print(format_summary(summarize_cases(df)).to_string(index=False))
    print(f"\n{len(df)} records in {df.attrs['seconds']:.1f} s: {df.attrs['records_per_s']:.2f} records/s "
          f"(alignment={a.alignment}, generation={'off' if a.no_generation else 'on'}) -> {a.out}")
    return 0


_RUN_NAMES = {"layer-search": "layer_search", "singular": "singular", "batch": "batch",
              "sequential": "sequential", "sweep": "sweep"}


def _run(a: argparse.Namespace) -> int:
    from .counterfact import DatasetNotFound
    from .models import ModelNotFound
    from .params import ParamsError, resolve
    from .protocols import RUNNERS, open_study, summarize
    from .store import RunConflict

    exps = [_RUN_NAMES[e] for e in a.experiments]
    try:
        p = resolve(a.params, overrides=a.set or None)  # validated before any model loads
        study = open_study(p, which="second_model" if a.second_model else "model", experiments=exps)
        for e in exps:
            print(f"== {e} ({p.name}, model {study.label})")
            cases = RUNNERS[e](study)
            print(summarize(cases, formatted=True).to_string(index=False))
    except (ParamsError, DatasetNotFound, ModelNotFound, RunConflict) as e:
        print(f"run failed: {e}", file=sys.stderr)
        return 1
    return 0


def _reproduce(a: argparse.Namespace) -> int:
    from .params import ParamsError
    from .reproduce import ReproduceError, reproduce

    only = [x for part in (a.only or []) for x in part.split(",")] or None
    try:
        reproduce(a.params, a.set or None, only=only, runs_dir=a.runs_dir, threads=a.threads)
    except (ReproduceError, ParamsError) as e:
        print(f"reproduce failed: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m editlib", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny-train", help="train a miniature Llama on the synthetic world or CounterFact")
    t.add_argument("--world", type=int, metavar="N", help="train on make_world(N, seed)")
    t.add_argument("--counterfact", action="store_true", help="train on CounterFact (seeded sample)")
    t.add_argument("--n", type=int, default=2000, help="number of CounterFact records")
    t.add_argument("--counterfact-path", default=None, help="CounterFact file (else EDITLIB_COUNTERFACT / cache)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--layers", type=int, default=6)
    for name, typ in _TINY_OVERRIDES:
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"TinyConfig.{name}")
    t.add_argument("--out", required=True)
    t.set_defaults(func=_tiny_train)

    c = sub.add_parser("tiny-check", help="re-check what a saved miniature knows (quality bar)")
    c.add_argument("model_dir")
    c.add_argument("--counterfact-path", default=None)
    c.set_defaults(func=_tiny_check)

    e = sub.add_parser("evaluate", help="CounterFact metrics of an (unedited) model: ES/PS/NS, GE, S")
    e.add_argument("--model", required=True, help="model directory or Hugging Face id")
    e.add_argument("--records", required=True,
                   help="CounterFact file (.json/.jsonl[.gz]) or a miniature directory (records.json)")
    e.add_argument("--n", type=int, default=None, help="first N records of the seeded ordering")
    e.add_argument("--alignment", choices=("correct", "reference"), default="correct",
                   help="reference = the reference code's Llama-3 BOS shift (SPEC §8.1)")
    e.add_argument("--no-generation", action="store_true", help="skip GE (sampling dominates the cost)")
    e.add_argument("--rs-dir", default=None,
                   help="directory with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json (RS)")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--gen-batch-size", type=int, default=64)
    e.add_argument("--gen-max-len", type=int, default=100, help="total tokens incl. the prompt")
    e.add_argument("--seed", type=int, default=0, help="generation sampling seed")
    e.add_argument("--show", type=int, default=20, help="print at most this many per-case rows")
    e.add_argument("--out", required=True, help="per-case results (.parquet)")
    e.set_defaults(func=_evaluate)
    r = sub.add_parser("run", help="run protocols without a notebook (resumable; results/<name>/<experiment>)")
    r.add_argument("experiments", nargs="+", choices=sorted(_RUN_NAMES), metavar="EXPERIMENT",
                   help="one or more of: " + ", ".join(sorted(_RUN_NAMES)))
    r.add_argument("--params", required=True, help="params YAML (path, or a name in params/)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set batch.total=64 (repeatable)")
    r.add_argument("--second-model", action="store_true", help="run on the params' second_model")
    r.set_defaults(func=_run)

    rp = sub.add_parser("reproduce", help="execute notebooks 01-06 with papermill into runs/<name>/, export HTML")
    rp.add_argument("--params", required=True, help="params YAML (path, or a name in params/)")
    rp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a parameter, e.g. --set batch.total=64 (repeatable)")
    rp.add_argument("--only", action="append", metavar="NN[,NN...]",
                    help="run only these notebooks, e.g. --only 01,04 (repeatable)")
    rp.add_argument("--runs-dir", default=None, help="folder for <name>/ with the executed notebooks, HTML and timings.json "
                         "(default: runs; relative paths are relative to the repo root, like results_dir)")
    rp.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads per notebook kernel (default: inherited; 1 is often fastest on a busy small CPU)")
    rp.set_defaults(func=_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
