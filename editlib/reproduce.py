"""``python -m editlib reproduce``: run the study notebooks 01-07 (the report, 06, last) with papermill, export them to
HTML, and time them; plus the stored-results helpers the report notebook uses (no model loads).

Executed notebooks, their HTML and ``timings.json`` go to ``runs/<name>/``; figures and tables to
``figures/<name>/`` (params ``figures_dir``); results to ``results/<name>/`` (params ``results_dir``).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from .numerics import Numerics, choose
from .params import ParamsError, StudyParams, find_params_file, resolve
from .paths import REPO_ROOT, anchor_params, repo_path, shown
from .store import atomic_write_bytes

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
REPORT = "06"
# the experiment each notebook runs (validated before any notebook starts)
NOTEBOOK_EXPERIMENTS = {"01": ["layer_search"], "02": ["singular"], "03": ["sweep"], "04": ["batch"],
                        "05": ["sequential"], "06": [], "07": []}
#: notebooks whose experiments run on the derived beyond-the-paper params (editlib.beyond)
BEYOND = "07"
EXPERIMENT_ORDER = ("layer_search", "singular", "sweep", "batch", "sequential")


class ReproduceError(RuntimeError):
    """A notebook failed (the message names the notebook and the cell) or a setup step did.
    ``ename``: the class name of the notebook's own exception, when one was raised there."""

    def __init__(self, message: str, ename: str | None = None):
        super().__init__(message)
        self.ename = ename


@dataclass
class NotebookRun:
    notebook: str
    output: Path
    html: Path | None
    seconds: float
    status: str = "ok"


# --------------------------------------------------------------------------- stored results

@dataclass
class StoredResult:
    """One experiment folder of the store: ``results/<name>/<experiment>/``."""

    experiment: str
    root: Path
    cases: pd.DataFrame
    batches: pd.DataFrame
    manifest: dict = field(default_factory=dict)

    @property
    def spec(self) -> dict:
        """What the experiment ran (sizes, methods, layer), as its manifest stored it: the report
        reads this, not the params it is given, which may have changed since."""
        return self.manifest.get("params", {}).get("spec", {})

    def reading(self, p: StudyParams) -> dict[str, str]:
        """``alignment`` and ``gen_text``: how these results were scored (the manifest's evaluation
        settings; ``p``'s for a folder without them), which the tables next to the paper's name."""
        ev = self.manifest.get("params", {}).get("evaluation")
        if not ev:
            return {"alignment": p.evaluation.alignment, "gen_text": p.evaluation.gen_text}
        return {"alignment": ev.get("alignment", "correct"), "gen_text": ev.get("gen_text", "clean")}  # clean: left out of the digest

    @property
    def label(self) -> str:
        prov = self.manifest.get("provenance", {})
        return prov.get("model_label") or Path(str(prov.get("model", "model"))).name


def results_root(p: StudyParams) -> Path:
    return repo_path(p.results_dir) / p.name


def stored_experiments(p: StudyParams) -> list[str]:
    """Experiment folders with a consolidated ``cases.parquet``, in the study's order (a second
    model's layer search, ``layer_search-<label>``, right after the main one)."""
    root = results_root(p)
    found = sorted(d.name for d in root.iterdir() if (d / "cases.parquet").is_file()) if root.is_dir() else []
    rank = {e: i for i, e in enumerate(EXPERIMENT_ORDER)}
    return sorted(found, key=lambda e: (rank.get(e.split("-", 1)[0], 99), e))


def incomplete_experiments(p: StudyParams) -> dict[str, int]:
    """Experiment folders a run started but did not finish (no consolidated ``cases.parquet``: a
    crash, a kill, a notebook still running), with the units they saved; rerunning the
    experiment's notebook resumes them."""
    root = results_root(p)
    if not root.is_dir():
        return {}
    rank = {e: i for i, e in enumerate(EXPERIMENT_ORDER)}
    found = [d for d in root.iterdir() if d.is_dir() and not (d / "cases.parquet").is_file()
             and ((d / "manifest.json").is_file() or (d / "parts").is_dir())]
    return {d.name: len(list((d / "parts").glob("*.unit.json")))
            for d in sorted(found, key=lambda d: (rank.get(d.name.split("-", 1)[0], 99), d.name))}


def stored_failed_units(p: StudyParams) -> dict[str, dict[str, dict]]:
    """Experiment -> its ``failed_units.json`` (unit -> error, attempts, ...): the units that failed
    on every try and are missing from the stored results until a later run finishes them."""
    root = results_root(p)
    out = {}
    for f in sorted(root.glob("*/failed_units.json")) if root.is_dir() else []:
        units = json.loads(f.read_text())
        if units:
            out[f.parent.name] = units
    return out


def load_stored(p: StudyParams, experiment: str) -> StoredResult:
    """Cases, batch diagnostics and manifest of a finished experiment (no model is loaded)."""
    root = results_root(p) / experiment
    if not (root / "cases.parquet").is_file():
        raise FileNotFoundError(f"no finished {experiment!r} results in {root} (run its notebook first)")
    batches = pd.read_parquet(root / "batches.parquet") if (root / "batches.parquet").is_file() else pd.DataFrame()
    man = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
    return StoredResult(experiment, root, pd.read_parquet(root / "cases.parquet"), batches, man)


def is_miniature(p: StudyParams, r: StoredResult) -> bool:
    """True for the offline miniatures (see :func:`is_miniature_model`)."""
    return is_miniature_model(p, r.manifest.get("provenance", {}).get("model"))


def is_miniature_model(p: StudyParams, model_dir: str | None) -> bool:
    """True for the offline miniatures: a ``tiny*`` params name, a ``tiny`` build spec, or a model
    directory written by :mod:`editlib.tiny`."""
    return (p.name.startswith("tiny") or p.model.tiny is not None
            or bool(model_dir and (Path(model_dir) / "editlib_tiny.json").is_file()))


MINIATURE_FLAG = "miniature: not Llama-3-8B"


def figure_title(p: StudyParams, label: str, model_dir: str | None) -> str:
    """The model part of a figure title: label and params name, flagged for miniatures so that a
    saved figure never passes for a Llama-3-8B result."""
    return f"{label} ({p.name})" + (f", {MINIATURE_FLAG}" if is_miniature_model(p, model_dir) else "")


def result_title(p: StudyParams, r: StoredResult) -> str:
    """:func:`figure_title` of a stored result (the report notebook re-plots from the store)."""
    return figure_title(p, r.label, r.manifest.get("provenance", {}).get("model"))


_DATA = {"model": "the miniature's own training facts", "counterfact": "CounterFact", "world": "synthetic world"}
_SIZE_KEYS = (("n_facts", "facts"), ("total", "facts in total"), ("layers", "layers"), ("layer", "layer"),
              ("batch_size", "batch size"), ("batch_sizes", "batch sizes"), ("methods", "methods"))


def _sizes(spec: dict, per: str = "") -> str:
    """The spec's sizes; with ``per`` (" per ordering") the fact counts read "facts per ordering"."""
    parts = [f"{'facts' + per if per and k in ('n_facts', 'total') else label} {_short(spec[k])}"
             for k, label in _SIZE_KEYS if k in spec]
    for m, grid in (spec.get("grids") or {}).items():
        parts.append(f"{m.upper()} λ ∈ {{{', '.join(f'{x:g}' for x in grid)}}}")
    return "; ".join(parts)


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x).upper() if isinstance(x, str) else str(x) for x in v)
    return str(v)


def caption(p: StudyParams, r: StoredResult, what: str) -> str:
    """A Markdown caption: what the item is, model, data, sizes and seeds from the manifest."""
    man = r.manifest
    prov, prm = man.get("provenance", {}), man.get("params", {})
    data, ev = prm.get("data", {}), prm.get("evaluation", {})
    src = data.get("source", "?")
    seeds = f"ordering seed {data.get('ordering_seed')}, orderings {_short(data.get('orderings', []))}"
    if data.get("fact_list_sha256"):  # data.fact_list reference: the orderings are its samples
        seeds = (f"the reference's fact list (sha256 {data['fact_list_sha256'][:12]}), samples "
                 f"{_short(data.get('orderings', []))}")
    if ev.get("generation"):
        seeds += f", generation seed {ev.get('gen_seed')}"
    facts = _DATA.get(src, src)
    pd_ = prov.get("data", {})
    if src == "model" and pd_.get("case_ids"):  # a CounterFact miniature
        facts = f"the CounterFact records the miniature was trained on (file sha256 {pd_['sha256'][:12]})"
    elif src == "model" and pd_.get("sha256"):  # the miniature's own records.json
        facts = f"{facts} (records.json sha256 {pd_['sha256'][:12]})"
    text = (f"**{what}.** Model `{r.label}` ({prov.get('n_layers', '?')} decoder layers, fingerprint "
            f"`{str(prov.get('model_fingerprint', '?'))[:12]}`); data: {facts} "
            f"({prov.get('n_records_available', '?')} records available); "
            f"{_sizes(prm.get('spec', {}), ' per ordering' if len(data.get('orderings', [])) > 1 else '')}; "
            f"seeds: {seeds}. Results: `{shown(r.root)}`" + ("" if man.get("complete") else " (incomplete run)") + ".")
    if is_miniature(p, r):
        text = (f"*Miniature result (offline model `{r.label}`, params `{p.name}`), not Llama-3-8B: compare trends "
                f"with the paper, not numbers.* " + text)
    return text


# --------------------------------------------------------------------------- kernel and notebooks

def _runs_here(argv0: str) -> bool:
    """A kernelspec's argv[0] runs this interpreter (jupyter_client maps bare "python" to it)."""
    bare = {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}
    return argv0 in bare or Path(argv0) == Path(sys.executable)


def ensure_kernel(preferred: str = "python3") -> str:
    """Name of a kernelspec that runs ``sys.executable``: ``python3`` when it does, else an
    ``editlib-python`` spec installed into this environment (``sys.prefix``), never the user's."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    fallback = "editlib-python"
    for name in (preferred, fallback):
        try:
            if _runs_here(ksm.get_kernel_spec(name).argv[0]):
                return name
        except NoSuchKernel:
            pass
    from ipykernel.kernelspec import install
    install(kernel_name=fallback, display_name=f"Python ({sys.prefix})", prefix=sys.prefix)
    return fallback


def notebooks(only: Sequence[str] | None = None, nb_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The study notebooks ``NN_*.ipynb`` in order, the report (``REPORT``) last, since it shows
    every other notebook's results; optionally only those whose NN is in ``only``."""
    found = sorted(nb_dir.glob("[0-9][0-9]_*.ipynb"), key=lambda p: (p.name[:2] == REPORT, p.name))
    if not found:
        raise ReproduceError(f"no notebooks NN_*.ipynb in {nb_dir} (a checkout of the repository has them)")
    if only:
        want = {o.strip().zfill(2) for o in only if o.strip()}
        unknown = want - {p.name[:2] for p in found}
        if unknown:
            raise ReproduceError(f"--only names unknown notebook(s) {sorted(unknown)}; have "
                                 f"{[p.name[:2] for p in found]}")
        found = [p for p in found if p.name[:2] in want]
    return found


def export_html(nb_path: Path, html_path: Path, *, exclude_input: bool = False) -> Path:
    """nbconvert HTML of an executed notebook (input cells hidden when ``exclude_input``)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(exclude_input=exclude_input).from_filename(str(nb_path))
    atomic_write_bytes(html_path, body.encode("utf-8"))
    return html_path


def _failure(nb: Path, out: Path, e: Exception) -> ReproduceError:
    src = (getattr(e, "source", "") or "").strip().splitlines()
    return ReproduceError(
        f"notebook {nb.name} failed in cell {getattr(e, 'cell_index', '?')} (0-based index in the executed "
        f"copy, which has papermill's injected-parameters cell after the parameters cell; execution count "
        f"{getattr(e, 'exec_count', '?')}): "
        f"{getattr(e, 'ename', type(e).__name__)}: {getattr(e, 'evalue', e)}\n"
        f"  cell begins: {src[0] if src else '?'}\n  executed copy with the traceback: {out}",
        ename=getattr(e, "ename", None))


#: the notebook kernels' own log at errors only: ipykernel warns on every start that its local
#: TCP sockets are unencrypted (the kernel and this process share the machine), which read as an
#: error before each notebook; the notebooks' own warnings go to their cells, not this log
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]


def run_notebook(nb: Path, out: Path, parameters: dict, kernel: str) -> float:
    """Execute ``nb`` into ``out`` (cwd = the notebooks folder); wall seconds."""
    import papermill as pm

    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(nb), str(out), parameters=parameters, cwd=str(nb.parent),
                            kernel_name=kernel, progress_bar=False, extra_arguments=KERNEL_ARGS)
    except pm.PapermillExecutionError as e:
        raise _failure(nb, out, e) from None
    except Exception as e:  # kernel died, timed out, could not start ...
        raise ReproduceError(f"notebook {nb.name} could not run: {type(e).__name__}: {e} "
                             f"(partial copy: {out})") from e
    return time.perf_counter() - t0


def _overrides(sets: Mapping | Sequence[str] | None) -> dict:
    """``--set key=value`` strings (values parsed as YAML) or a mapping, as a JSON-able dict."""
    if not sets:
        return {}
    if isinstance(sets, Mapping):
        return dict(sets)
    from .params import parse_override  # a bad value names its key in one line (ParamsError)

    return dict(parse_override(s) for s in sets)


def validate(params_file: str | Path, overrides: dict, nbs: Sequence[Path]) -> StudyParams:
    """Resolve the params and run the pre-load checks (model location, facts, then the
    protocols' own) for the selected notebooks."""
    from .preflight import check_study
    from .protocols import check_before_loading, check_second_model

    p = anchor_params(resolve(params_file, overrides=overrides))
    exps = [e for nb in nbs for e in NOTEBOOK_EXPERIMENTS.get(nb.name[:2], [])]
    if exps:
        check_before_loading(p, exps)  # preflight.check_study's model and facts, then the rest
    if "layer_search" in exps:  # notebook 01 also searches the second model's layers (Figure 6)
        check_second_model(p)
    if any(nb.name[:2] == BEYOND for nb in nbs):  # its own sizes and editors (layer: best is read later)
        from .beyond import study_params

        bp = study_params(p, resolve_layer=False)
        check_study(bp, ["batch", "sequential"])
        if p.beyond.layer != "best":  # its layer and windows against the model's depth, named as set
            try:
                check_before_loading(bp, ["batch", "sequential"])
            except ParamsError as e:
                raise ParamsError(f"beyond (notebook 07; beyond.layer {p.beyond.layer}): {e}") from None
    return p


@contextlib.contextmanager
def kernel_env(numerics: Numerics | None = None):
    """The environment of the kernels started inside (they inherit it): the numerics' kernel pins
    and OMP/MKL thread counts (:mod:`editlib.numerics`; on a small shared CPU one thread can be several
    times faster than oversubscribed OpenMP), and plain-line progress (editlib.progress) so stored
    notebooks and their HTML show text, not widgets; a user's own ``EDITLIB_PROGRESS`` wins."""
    from .paths import env_set
    from .progress import ENV

    env = dict(numerics.env) if numerics is not None else {}
    env[ENV] = os.environ.get(ENV) or "lines"
    if env[ENV] != "auto":  # the libraries' own bars (model loading, datasets) would be widgets
        for k in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
            env[k] = os.environ.get(k) or "1"
    with env_set(env):
        yield


def study_devices(p: StudyParams) -> tuple[str, ...]:
    """The devices of the study's models (the second model's, when it has one)."""
    return tuple(str(m.device or "cpu") for m in (p.model, p.second_model) if m is not None)


def previous_seconds(path: Path) -> dict[str, float]:
    """Notebook -> seconds of its last successful run, from a ``timings.json`` (empty if none)."""
    try:
        runs = json.loads(path.read_text(encoding="utf-8")).get("notebooks", [])
    except (OSError, ValueError):
        return {}
    return {r["notebook"]: float(r["seconds"]) for r in runs if r.get("status", "ok") == "ok"}


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def reproduce(params_file: str | Path, overrides: Mapping | Sequence[str] | None = None, *,
              only: Sequence[str] | None = None, runs_dir: str | Path | None = None,
              threads: int | None = None, numerics: str = "auto",
              log: Callable[[str], None] = print) -> list[NotebookRun]:
    """Validate the params, execute the notebooks in order into ``<runs_dir>/<name>/`` and export
    each to HTML (the report without its code). Stops at the first failing cell with a
    :class:`ReproduceError` naming the notebook and the cell. ``numerics``: ``auto`` (portable on a
    CPU study, native on a GPU one), ``portable`` (the same bits on any x86-64 CPU with AVX2: the
    committed figures) or ``native`` (:mod:`editlib.numerics`). ``threads``: OMP/MKL threads of the
    notebook kernels (default: portable 2, native inherited)."""
    params_path = find_params_file(params_file).resolve()
    over = _overrides(overrides)
    nbs = notebooks(only)
    p = validate(params_path, over, nbs)
    try:
        num = choose(numerics, devices=study_devices(p), threads=threads)
    except ValueError as e:
        raise ParamsError(f"reproduce: {e}") from None
    out_dir = repo_path(runs_dir or "runs") / p.name
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel = ensure_kernel()
    parameters = {"params_file": str(params_path), "overrides": over}
    log(f"reproduce {p.name}: params {params_path}, kernel {kernel}, {len(nbs)} notebook(s) -> {out_dir}; "
        + num.note)
    runs: list[NotebookRun] = []
    before = previous_seconds(out_dir / "timings.json")
    if before and all(nb.name in before for nb in nbs):
        log(f"  the last run of these notebooks took {_clock(sum(before[nb.name] for nb in nbs))}")
    try:
        for i, nb in enumerate(nbs):
            out = out_dir / nb.name
            left = [before.get(n.name) for n in nbs[i:]]
            eta = (f" (last time {_clock(left[0])}; about {_clock(sum(left))} to go)"
                   if all(x is not None for x in left) else "")
            log(f"  [{i + 1}/{len(nbs)}] running {nb.name}{eta} ...")
            t0 = time.perf_counter()
            try:
                with kernel_env(num):
                    secs = run_notebook(nb, out, parameters, kernel)
            except ReproduceError:
                runs.append(NotebookRun(nb.name, out, _try_html(out), time.perf_counter() - t0, "failed"))
                raise
            html = export_html(out, out.with_suffix(".html"), exclude_input=nb.name.startswith(REPORT))
            runs.append(NotebookRun(nb.name, out, html, secs))
            log(f"  {nb.name}: {secs:6.1f} s  -> {out.name}, {html.name}")
    finally:
        _write_timings(out_dir / "timings.json", p, params_path, over, runs,
                       num.env.get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"), num.mode)
    total = sum(r.seconds for r in runs)
    log(f"done in {total:.1f} s: notebooks and HTML in {out_dir}; figures and tables in "
        f"{repo_path(p.figures_dir) / p.name}; results in {results_root(p)}; timings in {out_dir / 'timings.json'}")
    return runs


def _try_html(out: Path) -> Path | None:
    """HTML of a failed notebook when possible (to read the traceback in a browser)."""
    try:
        return export_html(out, out.with_suffix(".html")) if out.is_file() else None
    except Exception:  # noqa: BLE001 - best effort only
        return None


def _write_timings(path: Path, p: StudyParams, params_path: Path, over: dict, runs: list[NotebookRun],
                   threads, numerics: str) -> None:
    """This run's notebooks, and the earlier entries (marked ``earlier_run``) of notebooks it did not
    run (``--only``, a stop), so that every notebook keeps its last time (the next run's
    estimates); ``total_seconds`` is this run's."""
    mine = [{"notebook": r.notebook, "seconds": round(r.seconds, 2), "status": r.status,
             "output": str(r.output), "html": str(r.html) if r.html else None} for r in runs]
    try:
        before = json.loads(path.read_text(encoding="utf-8")).get("notebooks", [])
    except (OSError, ValueError):
        before = []
    ran = {e["notebook"] for e in mine}
    kept = [{**e, "earlier_run": True} for e in before
            if isinstance(e, dict) and e.get("notebook") and e["notebook"] not in ran]
    atomic_write_bytes(path, (json.dumps({
        "name": p.name, "params_file": str(params_path), "overrides": over,
        "threads_per_kernel": threads, "numerics": numerics,
        "notebooks": sorted(kept + mine, key=lambda e: str(e["notebook"])),
        "total_seconds": round(sum(r.seconds for r in runs), 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n").encode("utf-8"))
