"""Command line: ``python -m editlib <command> ...`` (``--help`` lists the commands).

Exit codes: 0 done; 1 done but not all well (an edit or a unit of work failed under ``run``, the quality bar was
missed under ``tiny-*``, a notebook raised an unexpected error under ``reproduce``) or a bug (a
Python traceback); 2 bad input or an unusable state (params, records, model files, a locked or
conflicting results folder), reported as one line naming the culprit — ``--debug`` adds the
traceback; 130 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import traceback
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class UsageError(ValueError):
    """A command-line value or combination that cannot work (exit 2)."""


#: TinyConfig fields settable from ``tiny-train`` (besides --layers/--seed); build_tiny writes every
#: override into the model card's rebuild command, so each must be accepted here
_TINY_OVERRIDES = (("max_steps", int), ("vocab_size", int), ("hidden", int), ("intermediate", int),
                   ("heads", int), ("seq_len", int), ("batch_rows", int), ("lr", float), ("warmup", int),
                   ("weight_decay", float), ("check_every", int), ("target_rewrite", float),
                   ("target_other", float))


def _tiny_train(a: argparse.Namespace) -> int:
    from .tiny import build_tiny, passes_bar

    if (a.world is None) == (not a.counterfact):
        raise UsageError("give exactly one of --world N or --counterfact --n N")
    source, n = ("world", a.world) if a.world is not None else ("counterfact", a.n)
    if n < 1:
        raise UsageError(f"{'--world' if source == 'world' else '--n'} must be at least 1, got {n}")
    overrides = {k: getattr(a, k) for k, _ in _TINY_OVERRIDES if getattr(a, k) is not None}
    _check_tiny_sizes({"layers": a.layers, **overrides})
    out = build_tiny(source, n, a.out, seed=a.seed, n_layers=a.layers,
                     counterfact_path=a.counterfact_path, **overrides)
    meta = json.loads((out / "editlib_tiny.json").read_text())
    print(json.dumps({"out": str(out), "train_seconds": meta["train_seconds"], "steps": meta["steps"],
                      "quality": meta["quality"]}, indent=1))
    return 0 if passes_bar(meta["quality"]) else 1


#: tiny-train sizes that may be 0 (the rest must be at least 1)
_TINY_MAY_BE_ZERO = ("warmup", "weight_decay")


def _check_tiny_sizes(sizes: dict) -> None:
    """Miniature sizes that could not train, before any record is read (one line, exit 2)."""
    for k, v in sizes.items():
        low = 0 if k in _TINY_MAY_BE_ZERO else (1e-12 if isinstance(v, float) else 1)
        if v < low:
            raise UsageError(f"--{k.replace('_', '-')} must be {'>= 0' if low == 0 else '> 0'}, got {v}")
    hidden, heads = sizes.get("hidden"), sizes.get("heads")
    if hidden is not None or heads is not None:
        from .tinyconfig import TinyConfig

        h, n = hidden or TinyConfig.hidden, heads or TinyConfig.heads
        if h % n:
            raise UsageError(f"--hidden {h} must be a multiple of --heads {n}")


def _tiny_check(a: argparse.Namespace) -> int:
    from .models import load_model, locate_model
    from .tiny import fact_quality, load_tiny_records, passes_bar

    locate_model(a.model_dir)
    records = load_tiny_records(a.model_dir, a.counterfact_path)  # before the model loads
    model, tok = load_model(a.model_dir)
    q = fact_quality(model, tok, records)
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
    if n is None:
        return records
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    from .records import RecordError

    try:
        return sample(records, n)
    except RecordError as e:
        raise RecordError(f"{path}: {e}") from None


def _evaluate(a: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from .metrics import check_also_alignment, evaluate_records, format_summary, summarize_cases, with_alignment
    from .models import load_model, locate_model

    for flag in ("batch_size", "gen_batch_size", "gen_max_len"):
        if getattr(a, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    if a.gen_kv_gb is not None and not 0 < a.gen_kv_gb < float("inf"):
        raise UsageError(f"--gen-kv-gb must be a positive number of GB, got {a.gen_kv_gb}")
    try:
        check_also_alignment(a.alignment, a.also_alignment)
    except ValueError:
        raise UsageError(f"--also-alignment must be the alignment other than --alignment {a.alignment}") from None
    from .models import DTYPES

    if a.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {a.dtype!r}")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    if a.gen_decode == "graph" and not a.no_generation and not device.startswith("cuda"):
        raise UsageError(f"--gen-decode graph captures CUDA graphs; the device is {device}: use static")
    records = _load_eval_records(a.records, a.n)  # every input is checked before the model loads
    rs = _rs_resources(a.rs_dir) if a.rs_dir else None
    locate_model(a.model)
    model, tok = load_model(a.model, dtype=a.dtype, device=device)
    if not a.no_generation:  # a model the decode mode cannot run fails before scoring
        from .decode import check_decodable
        try:
            check_decodable(model, a.gen_decode, a.gen_max_len)
        except ValueError as e:
            raise UsageError(str(e).replace("evaluation.gen_decode: ", "--gen-decode ")) from None
    if a.gen_kv_gb is not None and not a.no_generation:  # a budget that holds no row fails before scoring
        from .generation import rows_per_batch
        try:
            rows_per_batch(model, a.gen_batch_size, a.gen_max_len, a.gen_kv_gb * 1e9)
        except ValueError as e:
            raise UsageError(str(e).replace("evaluation.gen_kv_gb", "--gen-kv-gb")) from None
    df = evaluate_records(model, tok, records, alignment=a.alignment, also_alignment=a.also_alignment, batch_size=a.batch_size,
                          generation=not a.no_generation, gen_seed=a.seed, gen_max_len=a.gen_max_len,
                          gen_batch_size=a.gen_batch_size, gen_kv_gb=a.gen_kv_gb, rs_resources=rs,
                          gen_text=a.gen_text, gen_decode=a.gen_decode)
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
        if a.also_alignment:
            print(f"\n{a.also_alignment} alignment:")
            print(format_summary(summarize_cases(with_alignment(df, a.also_alignment))).to_string(index=False))
    print(f"\n{len(df)} records in {df.attrs['seconds']:.1f} s: {df.attrs['records_per_s']:.2f} records/s "
          f"(alignment={a.alignment}, generation={'off' if a.no_generation else 'on'}) -> {a.out}")
    return 0


def _rs_resources(rs_dir: str):
    """ROME's RS files, or a UsageError naming the folder."""
    from .rs import RSResources

    try:
        return RSResources.from_dir(rs_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--rs-dir {rs_dir}: {e}") from e


_RUN_NAMES = {"layer-search": "layer_search", "singular": "singular", "batch": "batch",
              "sequential": "sequential", "sweep": "sweep"}


@contextlib.contextmanager
def _store_env(a: argparse.Namespace):
    """``--allow-mixed-versions`` / ``--wait`` as the environment variables the store reads, so
    that notebook kernels started by ``reproduce`` inherit them too (restored afterwards)."""
    from .store import ENV_ALLOW_MIXED, ENV_LOCK_WAIT

    from .paths import env_set

    want = {ENV_ALLOW_MIXED: a.allow_mixed_versions, ENV_LOCK_WAIT: a.wait}
    with env_set({k: "1" for k, on in want.items() if on}):
        yield


#: columns that identify one edited case (the same case evaluated again, e.g. "final", counts once)
_CASE_KEYS = ("method", "layer", "lam", "batch_size", "ordering", "case_id")
_SHOW_REASONS = 3


def _failed_cases(cases: "pd.DataFrame") -> "pd.DataFrame":
    """The cases frame's failed edits, one row per edited case (no ``failed`` column: none)."""
    if "failed" not in cases.columns:
        return cases.iloc[0:0]
    bad = cases[cases["failed"].fillna(False).astype(bool)]
    keys = [c for c in _CASE_KEYS if c in bad.columns]
    return bad.drop_duplicates(subset=keys) if keys else bad


def _report_failures(experiment: str, cases: "pd.DataFrame") -> int:
    """Print how many edits of ``experiment`` failed, with the first few reasons; the count."""
    bad = _failed_cases(cases)
    if bad.empty:
        print(f"{experiment}: 0 failed edits")
        return 0
    shown = []
    for _, row in bad.head(_SHOW_REASONS).iterrows():
        where = ", ".join(f"{k}={row[k]}" for k in ("method", "batch_size", "lam") if k in row and row[k] == row[k])
        reason = row["fail_reason"] if "fail_reason" in row and isinstance(row["fail_reason"], str) else "no reason recorded"
        shown.append(f"case_id={row.get('case_id', '?')} ({where}): {reason}")
    more = f"; ... {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    print(f"{experiment}: {len(bad)} failed edit(s): " + "; ".join(shown) + more)
    return len(bad)


def _run(a: argparse.Namespace) -> int:
    from .params import resolve
    from .protocols import RUNNERS, check_before_loading, open_study, summarize

    exps = [_RUN_NAMES[e] for e in a.experiments]
    which = "second_model" if a.second_model else "model"
    p = resolve(a.params, overrides=_with_executor(a))
    check_before_loading(p, exps, which)  # model files and facts (preflight.check_study) and more, before any model loads
    failed: dict[str, int] = {}
    from .executor import session

    with _store_env(a), session():  # one Ray connection and pool of workers for all experiments
        study = open_study(p, which=which, experiments=exps)
        for e in exps:
            print(f"== {e} ({p.name}, model {study.label})")
            cases = RUNNERS[e](study)
            print(summarize(cases, formatted=True).to_string(index=False))
            failed[e] = _report_failures(e, cases)
    if any(failed.values()):
        print("run: failed edits in " + ", ".join(f"{e} ({n})" for e, n in failed.items() if n)
              + " (their rows have failed=True and a fail_reason in cases.parquet)", file=sys.stderr)
        return 1
    return 0


def _with_executor(a: argparse.Namespace) -> list[str] | None:
    """``--set`` overrides plus ``--executor`` as ``executor.kind=...`` (notebooks receive it too)."""
    sets = list(a.set or []) + ([f"executor.kind={a.executor}"] if a.executor else [])
    return sets or None


def _reproduce(a: argparse.Namespace) -> int:
    from .reproduce import reproduce

    only = [x for part in (a.only or []) for x in part.split(",")] or None
    with _store_env(a):
        reproduce(a.params, _with_executor(a), only=only, runs_dir=a.runs_dir, threads=a.threads,
                  numerics=a.numerics)
    return 0


def _clean(a: argparse.Namespace) -> int:
    from .paths import repo_path
    from .store import clean_run

    done = clean_run(repo_path(a.results_dir), a.run, a.experiment, include_complete=a.include_complete,
                     dry_run=a.dry_run)
    for c in done:
        print(f"{'removed' if c.removed else 'kept'} {c.folder}: {c.why}")
    if not done:
        print(f"{repo_path(a.results_dir) / a.run} holds no experiments")
    return 0


# --------------------------------------------------------------------------- errors

def _expected() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or an unusable state: one line and exit 2. Anything else is
    a bug and keeps its traceback."""
    from .arch import UnsupportedArchitecture
    from .counterfact import DatasetNotFound
    from .editors import NullSpaceError
    from .models import ModelLoadError, ModelNotFound
    from .params import ParamsError
    from .progress import ProgressModeError
    from .records import RecordError
    from .reproduce import ReproduceError
    from .stats import CorpusUnavailable, CovCacheError
    from .store import StoreError
    from .summary import SummaryError

    return (UsageError, SummaryError, NullSpaceError, ParamsError, RecordError, DatasetNotFound, ModelNotFound, ModelLoadError,
            UnsupportedArchitecture, StoreError, CorpusUnavailable, CovCacheError, ReproduceError, ProgressModeError)


def _stopped() -> tuple[type[BaseException], ...]:
    """Runs stopped on purpose because too many of a configuration's edits failed, or that ended
    with units of work that failed on every try (listed): one line, exit 1."""
    found = []
    for module, name in (("editlib.protocols", "TooManyFailures"), ("editlib.executor", "UnitsFailed")):
        mod = sys.modules.get(module)  # only a run that got that far imported it
        cls = getattr(mod, name, None) if mod else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _exit_code(e: BaseException) -> int:
    """2 for bad input; a notebook that failed on something other than bad input is 1."""
    from .reproduce import ReproduceError

    if isinstance(e, ReproduceError) and e.ename is not None:
        return 2 if e.ename in {t.__name__ for t in _expected()} | {"RunConflict", "ExperimentLocked",
                                                                   "MixedVersions"} else 1
    return 2


def _executor_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=("local", "ray"), default=None,
                        help="where independent units run: local (this process, the default) or ray "
                             "(params executor section: address, cpus/gpus per unit; pip install -e '.[ray]')")


def _store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-mixed-versions", action="store_true",
                        help="resume experiments whose saved units were written by another editlib version/commit "
                             "(env EDITLIB_ALLOW_MIXED_VERSIONS=1)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for another process working on the same experiment folder instead of "
                             "failing at once (env EDITLIB_LOCK_WAIT=1)")


_DEBUG_HELP = "show the traceback of an error instead of one line"


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the examples' line breaks and shows every option's default (not for options
    without one: required, or unset unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help or ""
        return super()._get_help_string(action)


#: one example per subcommand, shown at the end of its --help
EXAMPLES = {
    "tiny-train": "python -m editlib tiny-train --world 1000 --seed 0 --layers 6 --out models/tiny-world",
    "tiny-check": "python -m editlib tiny-check models/tiny-world",
    "evaluate": "python -m editlib evaluate --model models/tiny-world --records models/tiny-world/records.json "
                "--n 500 --no-generation --out scores.parquet",
    "run": "python -m editlib run layer-search batch --params params/tiny.yaml --set 'data.orderings=[0]' --set name=tiny-o0",
    "reproduce": "python -m editlib reproduce --params params/tiny.yaml --only 01,04",
    "show": "python -m editlib show results/tiny",
    "compare": "python -m editlib compare results/tiny results/tiny-counterfact",
    "clean": "python -m editlib clean tiny --dry-run",
}


def _command(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand that also takes ``--debug`` after its name (SUPPRESS: it never overrides a
    ``--debug`` given before the name), with its defaults and an example in its --help."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    kw.setdefault("description", kw.get("help"))
    return sub.add_parser(name, parents=[debug], formatter_class=_Help,
                          epilog=f"example:\n  {EXAMPLES[name]}", **kw)


def _show(a: argparse.Namespace) -> int:
    from .summary import show

    print(show(a.run))
    return 0


def _compare(a: argparse.Namespace) -> int:
    from .summary import compare

    print(compare(a.run_a, a.run_b))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="python -m editlib", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python -m editlib COMMAND --help: the command's options, defaults and an example")
    p.add_argument("--version", action="version", version=f"editlib {__version__}")
    p.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    t = _command(sub, "tiny-train", help="train a miniature Llama on the synthetic world or CounterFact")
    t.add_argument("--world", type=int, metavar="N", help="train on make_world(N, seed)")
    t.add_argument("--counterfact", action="store_true", help="train on CounterFact (seeded sample)")
    t.add_argument("--n", type=int, default=2000, help="number of CounterFact records")
    t.add_argument("--counterfact-path", default=None, help="CounterFact file (else EDITLIB_COUNTERFACT / cache)")
    t.add_argument("--seed", type=int, default=0, help="seed of the world / record sample and of training")
    t.add_argument("--layers", type=int, default=6, help="decoder layers")
    from .tinyconfig import TinyConfig

    for name, typ in _TINY_OVERRIDES:
        t.add_argument("--" + name.replace("_", "-"), type=typ, default=None,
                       help=f"training setting TinyConfig.{name} (default: {getattr(TinyConfig, name)})")
    t.add_argument("--out", required=True, help="output model directory (save_pretrained layout, records.json, README.md)")
    t.set_defaults(func=_tiny_train)

    c = _command(sub, "tiny-check", help="re-check what a saved miniature knows (quality bar)")
    c.add_argument("model_dir", help="a miniature's directory, e.g. models/tiny-world")
    c.add_argument("--counterfact-path", default=None, help="CounterFact file for a CounterFact miniature (else EDITLIB_COUNTERFACT / cache)")
    c.set_defaults(func=_tiny_check)

    e = _command(sub, "evaluate", help="CounterFact metrics of an (unedited) model: ES/PS/NS, GE, S")
    e.add_argument("--model", required=True, help="model directory or Hugging Face id")
    e.add_argument("--records", required=True,
                   help="CounterFact file (.json/.jsonl[.gz]) or a miniature directory (records.json)")
    e.add_argument("--n", type=int, default=None, help="first N records of the seeded ordering")
    e.add_argument("--alignment", choices=("correct", "reference"), default="correct",
                   help="reference = the reference code's Llama-3 BOS shift (docs/correctness.md)")
    e.add_argument("--also-alignment", choices=("correct", "reference"), default=None,
                   help="the other alignment scored too, into ES@<it> ... columns, with its own summary line")
    e.add_argument("--no-generation", action="store_true", help="skip GE (sampling dominates the cost)")
    e.add_argument("--gen-text", choices=("clean", "reference"), default="clean",
                   help="reference = GE texts decoded as the reference code does (Llama-3 keeps <|begin_of_text|>)")
    e.add_argument("--gen-decode", choices=("transformers", "static", "graph", "compiled"), default="transformers",  # decode.DECODE_MODES
                   help="GE decode steps: the model's forward, editlib.decode's (same arithmetic), CUDA graphs, "
                        "or compiled (fused kernels; captured on CUDA)")
    e.add_argument("--rs-dir", default=None,
                   help="directory with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json (RS)")
    e.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    e.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    e.add_argument("--batch-size", type=int, default=128, help="sequences per scoring forward")
    e.add_argument("--gen-batch-size", type=int, default=64, help="prompts per generation batch (GE)")
    e.add_argument("--gen-kv-gb", type=float, default=None,
                   help="at most this many GB of KV cache per generation batch (fewer rows if need be)")
    e.add_argument("--gen-max-len", type=int, default=100, help="total tokens incl. the prompt")
    e.add_argument("--seed", type=int, default=0, help="generation sampling seed")
    e.add_argument("--show", type=int, default=20, help="print at most this many per-case rows")
    e.add_argument("--out", required=True, help="per-case results (.parquet)")
    e.set_defaults(func=_evaluate)
    r = _command(sub, "run", help="run protocols without a notebook (resumable; results/<name>/<experiment>)")
    r.add_argument("experiments", nargs="+", choices=sorted(_RUN_NAMES), metavar="EXPERIMENT",
                   help="one or more of: " + ", ".join(sorted(_RUN_NAMES)))
    r.add_argument("--params", required=True, help="params YAML (path, or a name in params/)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set layer_search.n_facts=50 (repeatable)")
    r.add_argument("--second-model", action="store_true", help="run on the params' second_model")
    _executor_flag(r)
    _store_flags(r)
    r.set_defaults(func=_run)

    rp = _command(sub, "reproduce", help="execute notebooks 01-07 (the report 06 last) with papermill into runs/<name>/, export HTML")
    rp.add_argument("--params", required=True, help="params YAML (path, or a name in params/)")
    rp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a parameter, e.g. --set layer_search.n_facts=50 (repeatable)")
    rp.add_argument("--only", action="append", metavar="NN[,NN...]",
                    help="run only these notebooks, e.g. --only 01,04 (repeatable)")
    rp.add_argument("--runs-dir", default=None, help="folder for <name>/ with the executed notebooks, HTML and timings.json "
                         "(default: runs; relative paths are relative to the repo root, like results_dir)")
    rp.add_argument("--threads", type=int, default=None,
                    help="OMP/MKL threads per notebook kernel (default: 2 under portable numerics, else inherited; "
                         "1 is often fastest on a busy small CPU)")
    rp.add_argument("--numerics", choices=("auto", "portable", "native"), default="auto",
                    help="portable: torch's AVX2 kernels, MKL_CBWR=COMPATIBLE and 2 threads, so that the numbers "
                         "are the same bits on any x86-64 CPU with AVX2 (the committed figures; about 1.7x slower on the miniature); "
                         "native: this CPU's fastest kernels; auto (default): portable when the study runs on "
                         "the CPU, native on a GPU")
    _executor_flag(rp)
    _store_flags(rp)
    rp.set_defaults(func=_reproduce)

    sh = _command(sub, "show", help="print a run's stored experiments as summary tables (no model is loaded)")
    sh.add_argument("run", metavar="RUN_DIR", help="a run's results folder, e.g. results/tiny")
    sh.set_defaults(func=_show)

    cm = _command(sub, "compare", help="two runs' summary tables side by side, configuration by configuration")
    cm.add_argument("run_a", metavar="RUN_DIR_A", help="first run's results folder (a)")
    cm.add_argument("run_b", metavar="RUN_DIR_B", help="second run's results folder (b)")
    cm.set_defaults(func=_compare)

    cl = _command(sub, "clean", help="remove a run's incomplete experiment folders (e.g. left by a crash)")
    cl.add_argument("run", metavar="RUN", help="run name (the params' name): results/RUN/")
    cl.add_argument("--results-dir", default="results",
                    help="folder holding RUN/ (default: results; relative paths are relative to the repo root)")
    cl.add_argument("--experiment", action="append", metavar="E",
                    help="only this experiment folder, e.g. layer_search or sequential (repeatable)")
    cl.add_argument("--include-complete", action="store_true", help="remove complete experiments too")
    cl.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    cl.set_defaults(func=_clean)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .progress import mode
        mode()  # a bad EDITLIB_PROGRESS fails here, not after a model has loaded
        return args.func(args)
    except KeyboardInterrupt:
        print(f"editlib {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        stopped = isinstance(e, _stopped())
        if not stopped and not isinstance(e, _expected()):
            raise  # a bug: Python prints the traceback and exits 1
        if args.debug:
            traceback.print_exc()
        print(f"editlib {args.command}: {'stopped' if stopped else 'error'}: {_one_line(e)}", file=sys.stderr)
        return 1 if stopped else _exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
