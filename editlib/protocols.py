"""The paper's three editing protocols plus the λ sweep and the layer search (paper §3, SPEC §5).

* singular: each fact edited alone on the unedited model, evaluated, restored (values batched:
  they do not depend on each other);
* batch: ``total`` facts in batches of B, each applied to the unedited model, evaluated, restored;
* sequential-batch: batches applied one after another without restoring; C0 fixed (exact for a
  single edited layer, SPEC §5); AlphaEdit and ENCORE keep the keys of the run's earlier edits
  (:func:`editlib.editors.run_state`, checkpointed with the run). Evaluation ``current`` (each
  fact right after its own batch, the paper's protocol) and ``final`` (all facts on the final
  model: retention), optionally after every k edited facts on all facts so far (``after_n``, n
  facts edited: a forgetting curve).

Every protocol writes into an :class:`editlib.store.Experiment` unit by unit and resumes. Its
independent units are explicit (:class:`UnitSpec`, :func:`run_unit`): the executor named by the
params (:mod:`editlib.executor`: ``local`` by default, or ``ray``) runs them; each writes its own
part files, and the experiment is consolidated once, after all of them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from . import arch, counterfact
from .arch import n_layers
from .beyond import s_over_orderings
from .context import ContextTemplates, context_key, make_templates
from .editing import BatchTargets, EditFailed, EditHParams, apply_edit, prepare_targets
from .editors import PriorKeys, encore_delta_bound, preservation, run_state
from .generation import sentence_splitter
from .metrics import check_generation_prompts, evaluate_records, format_summary, summarize_cases, with_unscored
from .models import fingerprint, hub_commit, load_model
from .params import ModelParams, ParamsError, StudyParams
from .records import Record
from .arch import weight_out_in
from .degradation import due as degradation_due
from .lmeval import due as lm_due, evaluate as lm_evaluate, parse as parse_lm_eval
from .lowrank import LayeredRowDeltas, LowRankEdits, RowDeltas, TrailingDeltas
from .below import SharedBelow, hooked_module
from .solver import CovFactor, factor_cov, solve_factors, solve_rank_one, solved_keys
from .stats import CorpusSpec, corpus_c0_cached, fast_gram_applies, layer_covariance
from .executor import inject_failure, run_units
from .store import Experiment, RunConflict
from .tf32 import set_tf32, tf32_applies
from .values import keeping_graphs
from .valuestore import FOLDER as VALUE_FOLDER, ValueStore
from .weights import EditSession, unedited

EXPERIMENTS = ("layer_search", "singular", "sweep", "batch", "sequential")
MIN_EDITS_FOR_FAILURE_CHECK = 16


class TooManyFailures(RuntimeError):
    """More than ``evaluation.max_failed_fraction`` of a configuration's edits failed."""


@dataclass
class _Failures:
    """Failed edits per configuration: logged as they happen, and a configuration whose failed
    share exceeds ``limit`` (once it has MIN_EDITS_FOR_FAILURE_CHECK edits) stops the run."""

    limit: float
    log: Callable
    counts: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # configuration -> its first failure's reason

    def add(self, config: str, cases: pd.DataFrame, *, stored: bool = False) -> None:
        """Count ``cases``' failed edits under ``config`` (per method) and stop past the limit.
        ``stored``: cases saved by an earlier session, counted on resume (the limit covers the
        whole configuration, not the edits since the resume), neither logged nor checked part by
        part: :meth:`check` judges the stored totals once (parts replayed in another order than
        they ran could cross the limit midway)."""
        if "failed" not in cases.columns:
            return
        cur = cases[cases["eval"] == "current"] if "eval" in cases.columns else cases
        groups = cur.groupby("method") if "method" in cur.columns else [("", cur)]
        for method, g in groups:
            name = f"{config} {method}".strip()
            f = g["failed"].to_numpy(dtype=bool)
            k, n = self.counts.get(name, (0, 0))
            self.counts[name] = (k + int(f.sum()), n + len(f))
            first = str(g["fail_reason"][f].iloc[0]) if f.any() else ""
            if f.any():
                self.reasons.setdefault(name, first)
            if stored:
                continue
            if f.any():
                self.log(f"{name}: {int(f.sum())} of {len(f)} edits failed ({first})")
            self._check(name)

    def check(self) -> None:
        """Every configuration's totals against the limit (after counting stored cases)."""
        for name in self.counts:
            self._check(name, stored=True)

    def _check(self, name: str, stored: bool = False) -> None:
        k, n = self.counts[name]
        if n >= MIN_EDITS_FOR_FAILURE_CHECK and k / n > self.limit:
            raise TooManyFailures(
                f"{name}: {k} of {n} edits failed ({k / n:.0%} > evaluation.max_failed_fraction = "
                f"{self.limit:g}){' counting the units stored by earlier sessions' if stored else ''}; "
                f"first reason: {self.reasons.get(name, '?')}. "
                "Fix the cause (e.g. hparams.common.v_lr) or raise the limit; finished units are kept")


# --------------------------------------------------------------------------- the study context

@dataclass
class Study:
    """A loaded model with everything the protocols share: facts, C0 factors, context templates."""

    params: StudyParams
    model: object
    tok: object
    model_dir: str
    label: str
    records: list[Record]
    log: Callable = print
    suffix: str = ""  # result-folder suffix: "" for the params' main model, "-<label>" otherwise
    which: str = "model"  # the params section the model came from: "model" or "second_model"
    _covs: dict = field(default_factory=dict)
    _cov_info: dict = field(default_factory=dict)
    _contexts: dict = field(default_factory=dict)
    _data: dict = field(default_factory=dict)  # data provenance per data params (hashes CounterFact once)
    _of_unedited: dict = field(default_factory=dict)  # see of_unedited
    _fp: str | None = None
    _commit: str | None = None  # the hub commit the model came from (models.hub_commit), None for a directory
    _values: ValueStore | None = None

    @property
    def n_layers(self) -> int:
        return n_layers(self.model)

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.model)
        return self._fp

    @property
    def title(self) -> str:
        """Figure-title name: label and params name, flagged when the model is an editlib
        miniature (its figures must never pass for Llama-3-8B results)."""
        from .reproduce import figure_title
        return figure_title(self.params, self.label, self.model_dir)

    def facts(self, n: int, ordering: int = 0) -> list[Record]:
        """The first ``n`` facts of ordering ``ordering`` (same for every method and batch size): a
        seeded unique-subject shuffle, or sample ``ordering`` of the reference's fact list
        (``data.fact_list``, SPEC §5)."""
        d = self.params.data
        return counterfact.sample(self.records, n, ordering, d.ordering_seed, fact_list=fact_list_for(self.params))

    def _stats(self, layers: Sequence[int], *, load: bool):
        cp = self.params.covariance
        return layer_covariance(self.model, self.tok, layers, corpus_spec(cp), records=self.records,
                                dtype=cp.dtype, batch_size=cp.batch_size,
                                max_batch_tokens=cp.max_batch_tokens, log=self.log,
                                fingerprint=self.fingerprint, max_layers_per_pass=cp.layers_per_pass,
                                load=load, fast_gram=cp.fast_gram)

    def prepare_covs(self, layers: Sequence[int]) -> None:
        """Make sure C0 of every layer is in the disk cache (missing layers collected in as few
        passes as memory allows) without keeping any of them in memory."""
        missing = [l for l in layers if l not in self._covs]
        if missing:
            self._stats(missing, load=False)

    def covs(self, layers: Sequence[int]) -> dict[int, CovFactor]:
        """Cholesky factors of C0 for ``layers``, factored on the model's device (every solve then
        runs there). Statistics are keyed by the *unedited* model's fingerprint, so a resumed
        sequential run never recollects them from edited weights; only the factors of the layers
        asked for last are kept (at d_in = 14336 a float64 factor is 1.6 GB)."""
        layers = list(dict.fromkeys(int(l) for l in layers))
        missing = [l for l in layers if l not in self._covs]
        for l in [l for l in self._covs if l not in layers]:
            del self._covs[l]
        if missing:
            device = next(self.model.parameters()).device
            for l, st in self._stats(missing, load=True).items():
                f = factor_cov(st.mom2, device=device, overwrite=True)  # C0 and its factor only
                del st.mom2
                self._covs[l] = f
                self._cov_info[l] = {"tokens": int(st.count), "cond_estimate": float(f.cond),
                                     "jitter": float(f.jitter)}
                self.log(f"C0 layer {l}: factored on {device}, cond ≈ {f.cond:.3g}"
                         + (f", jitter {f.jitter:.3g}·I" if f.jitter else ""))
        return {l: self._covs[l] for l in layers}

    @property
    def value_store(self) -> ValueStore | None:
        """Values kept in ``<results_dir>/_values`` and read back by every experiment that optimises
        the same chunk on the same weights (the unedited ones, or the same edits before it:
        editlib.valuestore); None when ``evaluation.share_values_gb`` is 0."""
        gb = float(self.params.evaluation.share_values_gb)
        if gb <= 0:
            return None
        root, limit = Path(self.params.results_dir) / VALUE_FOLDER, int(gb * 1e9)
        if self._values is None or (self._values.root, self._values.limit_bytes) != (root, limit):
            self._values = ValueStore(root, self.fingerprint, limit)
        return self._values

    def of_unedited(self, key: tuple, compute: Callable[[], dict]) -> dict:
        """``compute()``, a measurement of the model, kept per ``key`` while the weights are the
        unedited ones (:func:`editlib.weights.unedited`) and no forward hook is on the model: every
        sequential configuration measures the unedited model for reference (its held-out facts,
        its lm-eval scores). ``key`` must name everything the measurement depends on besides the
        model (the facts, the evaluation settings it reads): the same key then measures the same
        thing, to the bit. Computed afresh, and not kept, otherwise. The cache belongs to this
        study object and the copies made of it with ``dataclasses.replace`` (a Ray worker keeps
        one per loaded study)."""
        if not unedited(self.model) or hooked_module(self.model.modules()) is not None:
            return compute()
        if key not in self._of_unedited:
            self._of_unedited[key] = compute()
        return dict(self._of_unedited[key])

    def contexts(self, style: str, text: str = "clean") -> ContextTemplates:
        """Context templates generated once per study with the unedited model (seeded), keyed by
        :func:`editlib.context.context_key` (``text``: ``hparams.*.context_text``)."""
        key = context_key(style, text)
        if key not in self._contexts:
            if not unedited(self.model):  # a set first asked for mid-run would be sampled from edited weights
                raise RuntimeError(f"context templates {key!r} are sampled from the unedited model, and its "
                                   "weights are edited now: open the study with every set it uses (template_styles)")
            self._contexts[key] = make_templates(self.model, self.tok, style, seed=0, text=text)
        return self._contexts[key]

    def evaluate(self, records: Sequence[Record], **kw) -> pd.DataFrame:
        """Scores of ``records`` (``groups``/``deltas``: under independent per-row edits)."""
        ev = self.params.evaluation
        return evaluate_records(self.model, self.tok, records, alignment=ev.alignment,
                                also_alignment=ev.also_alignment, batch_size=ev.batch_size, generation=ev.generation,
                                gen_seed=ev.gen_seed, gen_max_len=ev.gen_max_len,
                                gen_batch_size=ev.gen_batch_size, gen_kv_gb=ev.gen_kv_gb, gen_text=ev.gen_text,
                                gen_decode=ev.gen_decode, **kw)

    def data_provenance(self) -> dict:
        key = json.dumps([asdict(self.params.data), self.model_dir], default=str)
        if key not in self._data:
            self._data[key] = _data_provenance(self.params, self.model_dir)
        return self._data[key]

    def provenance(self) -> dict:
        return {"model": self.model_dir, "model_label": self.label, "model_fingerprint": self.fingerprint,
                **({"model_commit": self._commit} if self._commit else {}),
                "n_layers": self.n_layers, "n_records_available": len(self.records),
                "data": self.data_provenance(), "covariance": self._cov_info,
                "context_templates": {k: [list(g) for g in v.groups] for k, v in self._contexts.items()}}


def fact_list_for(p: StudyParams, *, download: bool | None = False) -> dict[int, list[int]] | None:
    """The reference's fact list when ``data.fact_list`` is 'reference' (None: seeded orderings)."""
    d = p.data
    if d.fact_list != "reference":
        return None
    return counterfact.load_fact_list(counterfact.resolve_fact_list(d.fact_list_path, download=download))


def corpus_spec(cp) -> CorpusSpec:
    """The stats module's corpus description from the params' ``covariance`` section."""
    return CorpusSpec(kind=cp.kind, name=cp.name, config=cp.config, split=cp.split,
                      text_field=cp.text_field, path=cp.path, n_samples=cp.n_samples,
                      max_length=cp.max_length, data_files=cp.data_files, group=cp.group)


def _data_provenance(p: StudyParams, model_dir: str) -> dict:
    """Where the facts came from; CounterFact (directly, or through a CounterFact miniature's
    case_ids) with its file path and sha256."""
    d = {"source": p.data.source}
    via_model = p.data.source == "model" and (Path(model_dir) / "case_ids.json").is_file()
    if p.data.source == "counterfact" or via_model:
        path = counterfact.resolve_counterfact(p.data.counterfact_path, download=False, given_as="data.counterfact_path")
        d.update(path=str(path), sha256=counterfact.sha256_file(path, uncompressed=True))
    if via_model:
        ids = Path(model_dir) / "case_ids.json"
        d.update(case_ids=str(ids), case_ids_sha256=counterfact.sha256_file(ids))
    elif p.data.source == "model" and (Path(model_dir) / "records.json").is_file():
        recs = Path(model_dir) / "records.json"  # the miniature's own records: hashed as well
        d.update(path=str(recs), sha256=counterfact.sha256_file(recs))
    elif p.data.source == "world":
        d.update(world_records=p.data.world_records, world_seed=p.data.world_seed)
    if p.data.fact_list == "reference":
        fl = counterfact.resolve_fact_list(p.data.fact_list_path, download=False)
        d.update(fact_list=str(fl), fact_list_sha256=counterfact.sha256_file(fl))
    return d


def model_dir_for(mp: ModelParams, log=print, counterfact_path: str | None = None) -> str:
    """The model's directory: ``model.id``, or a ``model.tiny`` miniature (built on first use, a
    CounterFact one from ``counterfact_path``: the file its facts are read from, ``data.counterfact_path``)."""
    if mp.tiny:
        from .tiny import ensure_tiny
        t = dict(mp.tiny)
        return str(ensure_tiny(t.pop("source", "world"), int(t.pop("n_records", 1000)), log=log,
                               counterfact_path=counterfact_path, **t))
    return mp.id


def load_records_for(p: StudyParams, model_dir: str) -> list[Record]:
    src = p.data.source
    if src == "model":
        from .tiny import load_tiny_records
        return load_tiny_records(model_dir, p.data.counterfact_path)
    if src == "counterfact":
        return counterfact.load_counterfact(p.data.counterfact_path, given_as="data.counterfact_path")
    from .world import make_world
    return make_world(p.data.world_records, p.data.world_seed)


def check_before_loading(p: StudyParams, experiments: Sequence[str], which: str = "model") -> None:
    """Fail fast, before any model is loaded: executor usable, data present, sizes and layers possible."""
    from .executor import check_executor
    from .preflight import check_study
    check_executor(p)  # kind: ray without Ray installed
    if "sequential" in experiments and p.sequential.lm_eval:
        from .lmeval import check_installed
        check_installed(parse_lm_eval(p.sequential.lm_eval))
    check_study(p, experiments, which)  # model files and facts (also for notebooks run by hand)
    mp = p.second_model if which == "second_model" else p.model  # present: check_study said so
    if str(mp.device).startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"{which}.device is {mp.device!r} but this torch ({torch.__version__}) sees no "
                          "CUDA device: install a CUDA build of torch or set device: cpu")
    if p.evaluation.generation and p.evaluation.gen_decode == "graph" and not str(mp.device).startswith("cuda"):
        raise ParamsError(f"evaluation.gen_decode: graph captures CUDA graphs, but {which}.device is "
                          f"{mp.device!r}: use static (or transformers) on a CPU")
    vals = p.value_hparams([e for e in experiments if e in EXPERIMENTS])  # section overrides too
    graphs = any(v.compile_blocks == "reduce-overhead" for v in [*vals.values(), *(hp.values for hp in p.hparams.values())])
    if graphs and not str(mp.device).startswith("cuda"):
        raise ParamsError(f"hparams compile_blocks: reduce-overhead captures CUDA graphs, but {which}.device is "
                          f"{mp.device!r}: use default (or off) on a CPU")
    captured = [k for k, v in vals.items() if v.capture_steps]
    if (captured or any(hp.values.capture_steps for hp in p.hparams.values())) and not str(mp.device).startswith("cuda"):
        raise ParamsError(f"hparams capture_steps records CUDA graphs ({', '.join(captured) or 'hparams'}), but "
                          f"{which}.device is {mp.device!r}: use capture_steps: false on a CPU")
    _check_corpus_offline(p)
    if p.data.source == "counterfact":
        cf = counterfact.resolve_counterfact(p.data.counterfact_path, download=None, given_as="data.counterfact_path")
        if p.data.fact_list == "reference":
            _warn_unless_canonical(cf)
    fact_list_for(p, download=None)  # data.fact_list reference: found or fetched now, not mid-run
    depth = None
    cfg = _model_config(mp, which)
    if cfg is not None:
        _check_config(p, cfg, which, mp, vals)
        depth = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if mp.tiny:  # (the facts each experiment needs: check_study, above)
        from .tiny import TinyConfig
        depth = int(mp.tiny.get("n_layers") or TinyConfig.n_layers)
    if depth is not None:
        for e in experiments:
            sec = getattr(p, e)
            layers = [sec.layer] if hasattr(sec, "layer") else ([] if sec.layers == "all" else list(sec.layers))
            bad = [l for l in layers if isinstance(l, int) and not 0 <= l < depth]
            if bad:
                raise ParamsError(f"{e}: layer(s) {bad} outside the model's 0..{depth - 1} decoder layers")
            if hasattr(sec, "windows") and isinstance(sec.layer, int) and any(m in MULTI_LAYER for m in sec.methods):
                check_windows(e, sec.windows, sec.layer, depth)  # as batch_windows does once the model is loaded
    cp = p.covariance
    if cp.kind == "text_file" and not (cp.path and Path(cp.path).is_file()) and not _c0_cached(cp, p.model.device):
        raise ParamsError(f"covariance.path {cp.path!r} is not a file and no C0 computed from it is cached "
                          "(covariance.kind text_file reads texts separated by blank lines)")
    for i, e in enumerate(experiments):  # layer 'best' reads this run's layer search (best_layer)
        if getattr(getattr(p, e), "layer", None) == "best" and "layer_search" not in experiments[:i]:
            path = _layer_search_cases(p, which)
            if path is not None and not path.is_file():
                raise ParamsError(f"{e}.layer is 'best', which needs a finished layer search ({path} is "
                                  "missing): run the layer search first (notebook 01, or `python -m editlib run "
                                  f"--params <file> layer-search {e.replace('_', '-')}`), or give an integer layer")


def _warn_unless_canonical(path: Path) -> None:
    """``data.fact_list: reference`` names facts of the canonical counterfact.json by case_id: a
    CounterFact file with other bytes (a subset, a re-serialised or re-numbered copy) is said so,
    since its case_ids may not be the canonical ones (a fact it lacks fails in the preflight)."""
    sha = counterfact.sha256_file(path, uncompressed=True)
    if sha != counterfact.CANONICAL_SHA256:
        warnings.warn(f"data.fact_list: reference names facts of the canonical counterfact.json by case_id (sha256 "
                      f"{counterfact.CANONICAL_SHA256[:12]}…), but data.counterfact_path {str(path)!r} has sha256 "
                      f"{sha[:12]}…: the facts are those of this file's case_ids", RuntimeWarning, stacklevel=3)


def _model_config(mp, which: str = "model") -> dict | None:
    """A model's ``config.json`` as a dict, before its weights load: read from a local folder, or
    from the Hugging Face cache (or a small download online) for a hub id, which fails fast when
    the id is missing offline, and online when the hub refuses it (a gated model whose licence the
    token has not accepted, an unknown id, no access or no connection: the weights could not load
    either, and Figure 6's second model would otherwise fail after the main model's whole layer
    search); None for a miniature's build spec or a config that cannot be read here (the loader
    then says why)."""
    if not mp.id or mp.tiny:
        return None
    local = os.path.expanduser(mp.id)
    if os.path.isdir(local):
        try:
            return json.loads((Path(local) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    from .models import _offline, _resolve_source
    source = _resolve_source(mp.id, _offline(False), None)
    try:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(source, local_files_only=_offline(False),
                                          trust_remote_code=mp.trust_remote_code).to_dict()
    except OSError as e:  # transformers' form of the hub's gated / not-found / connection errors
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise ParamsError(f"{which}.id {mp.id!r} cannot be read from the Hugging Face hub: "
                          + " ".join(lines[:2])) from None
    except Exception:
        return None


def _check_config(p: StudyParams, cfg: dict, which: str, mp, vals: dict | None = None) -> None:
    """What a model's config alone rules out: an architecture editlib has no module map for, a
    C0 truncation length past the positions the model has (GPT-2's learned positions fail there;
    RoPE models would be read at positions they never saw), and compiled or recorded value steps
    (``compile_blocks``, ``capture_steps``: the packed forward of Llama-style blocks) for a model
    without such blocks, which would otherwise fail at its first value step, after C0 (``vals``:
    :meth:`editlib.params.StudyParams.value_hparams` of the experiments that run)."""
    import types

    try:
        spec = arch.arch_for(types.SimpleNamespace(model_type=cfg.get("model_type")))
    except arch.UnsupportedArchitecture as e:
        raise ParamsError(f"{which}.id {mp.id!r}: {e}") from None
    asks = sorted({f"compile_blocks: {v.compile_blocks}" if v.compile_blocks != "off" else "capture_steps: true"
                   for v in (vals or {}).values() if v.compile_blocks != "off" or v.capture_steps})
    if asks and spec.rotary is None:
        raise ParamsError(f"hparams {' and '.join(asks)} runs the packed forward of Llama-style blocks, which "
                          f"{which}.id {mp.id!r} ({spec.model_type}) does not have: set it off")
    npos = arch.max_positions(cfg)
    ml = p.covariance.max_length
    if npos and ml and int(ml) > npos:
        raise ParamsError(f"covariance.max_length {ml} exceeds {which}.id {mp.id!r}'s {npos} positions "
                          "(null: truncate at the model's max positions, as the reference)")


def _c0_cached(cp, device: str = "cpu") -> bool:
    """Whether editlib's stats cache holds a C0 computed from corpus ``cp`` that a run on
    ``device`` would read (then the corpus is never read)."""
    return corpus_c0_cached(counterfact.cache_dir() / "stats", corpus_spec(cp).key(), device)


def _check_corpus_offline(p: StudyParams) -> None:
    """Offline, a Hugging Face C0 corpus must be in the local datasets cache, unless C0 for it is
    already in editlib's stats cache (then the corpus is never read)."""
    cp = p.covariance
    offline = any(os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "EDITLIB_OFFLINE"))
    if cp.kind != "hf_dataset" or not offline or cp.data_files:
        return
    if _c0_cached(cp, p.model.device):
        return
    root = counterfact.cache_dir() / "stats"
    try:
        import datasets
        datasets.load_dataset_builder(cp.name, cp.config)
    except Exception as exc:
        raise ParamsError(f"covariance corpus {cp.name!r} ({cp.config!r}) is not available offline "
                          f"({type(exc).__name__}) and no C0 computed from it is cached in {root}: "
                          "download it once online, or use covariance.kind records / text_file, or a "
                          "local parquet file (kind hf_dataset, name parquet, data_files ...)") from None


def _layer_search_cases(p: StudyParams, which: str) -> Path | None:
    """Where :func:`best_layer` will look (see ``Study.suffix``); None when that depends on a
    miniature not built yet."""
    mp = p.second_model if which == "second_model" else p.model
    if which == "model" or (mp.id and not mp.tiny and not p.model.tiny and mp.id == p.model.id):
        suffix = ""
    elif mp.label or (mp.id and not mp.tiny):
        suffix = f"-{mp.label or Path(str(mp.id)).name}"
    else:
        return None
    return Path(p.results_dir) / p.name / f"layer_search{suffix}" / "cases.parquet"


def set_deterministic(on: bool) -> None:
    """``model.deterministic``: on CUDA, index_add and the accumulating index backward (value
    losses, scoring) and cuBLAS's split reductions sum in an order that varies between runs, so a
    rerun or a resumed sequential run differs from an uninterrupted one at float rounding (the CPU
    is deterministic). On, torch uses its deterministic kernels where it has them and warns where
    it has none (``warn_only``), and cuBLAS a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read
    when cuBLAS first starts in the process).
    Process-wide, and only ever switched on: a later study of the process (Figure 6's second
    model) does not switch it off."""
    if not on:
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        warnings.warn("model.deterministic: CUDA already started in this process, so cuBLAS keeps a "
                      "non-deterministic workspace; set CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting",
                      RuntimeWarning, stacklevel=2)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _check_gen_budget(p: StudyParams, model) -> None:
    """A GE KV budget that holds no row of this model, or a decode mode that cannot run it, fails
    here, not after hours of edits."""
    ev = p.evaluation
    if ev.generation:
        from .decode import check_decodable
        try:
            check_decodable(model, ev.gen_decode, ev.gen_max_len)
        except ValueError as e:
            raise ParamsError(str(e)) from None
    if ev.generation and ev.gen_kv_gb is not None:
        from .generation import rows_per_batch
        try:
            rows_per_batch(model, ev.gen_batch_size, ev.gen_max_len, ev.gen_kv_gb * 1e9)
        except ValueError as e:
            raise ParamsError(str(e)) from None


def _check_alignment(p: StudyParams, tok, records: Sequence[Record]) -> None:
    """``evaluation.alignment`` (or ``also_alignment``) ``reference`` on a tokenizer where the
    reference's reading is undefined for some target fails here, naming it, not at the first
    evaluation after hours of edits."""
    if "reference" not in (p.evaluation.alignment, p.evaluation.also_alignment):
        return
    from .scoring import _tok_cache
    cache = _tok_cache(tok, "reference")  # kept: the evaluations reuse these tokenisations
    try:
        for s in dict.fromkeys(t.str for r in records for t in (r.target_new, r.target_true)):
            cache.scored(s)
    except ValueError as e:
        raise ParamsError(str(e)) from None


def _check_generation_prompts(p: StudyParams, records: Sequence[Record], experiments: Sequence[str]) -> None:
    """With GE on, every fact an experiment will edit has generation prompts: checked here, not at
    its first evaluation after its edits (held-out facts are scored without generation)."""
    if not p.evaluation.generation:
        return
    from .preflight import facts_needed
    fl = fact_list_for(p)
    for e in experiments:
        n = facts_needed(p, e)
        for o in p.data.orderings if n else ():
            facts = counterfact.sample(records, n, o, p.data.ordering_seed, fact_list=fl)
            check_generation_prompts(facts, f" among {e}'s {n} facts of ordering {o}")


def check_second_model(p: StudyParams) -> None:
    """The layer search runs on ``model``, then on ``second_model`` (Figure 6): the second is
    checked before anything loads (the main model is checked by :func:`open_study` or
    :func:`check_before_loading`), so a layer past its depth fails now, not after the main
    model's whole search."""
    if p.second_model is not None:
        try:
            check_before_loading(p, ["layer_search"], "second_model")
        except ParamsError as e:
            raise ParamsError(f"second_model (Figure 6's layer search): {e}") from None


def open_study(p: StudyParams, *, which: str = "model", experiments: Sequence[str] = EXPERIMENTS,
               log=print) -> Study:
    """Validate, then load the model (``which``: "model" or "second_model") and its facts."""
    check_before_loading(p, experiments, which)
    mp = p.second_model if which == "second_model" else p.model
    mdir = model_dir_for(mp, log, p.data.counterfact_path)
    set_tf32(mp.tf32)
    set_deterministic(mp.deterministic)
    model, tok = load_model(mdir, dtype=mp.dtype, device=mp.device, trust_remote_code=mp.trust_remote_code,
                            revision=mp.revision)
    _check_gen_budget(p, model)
    records = load_records_for(p, mdir)
    _check_alignment(p, tok, records)
    _check_generation_prompts(p, records, experiments)
    if p.evaluation.generation and sentence_splitter() != "nltk punkt":
        log(f"GE: nltk's punkt data not found, sentences are split by {sentence_splitter()}; for nltk.word_tokenize's "
            f"words exactly: pip install -e '.[ge]' && python -m nltk.downloader punkt (docs/methods.md)")
    label = mp.label or Path(str(mdir)).name
    main_dir = mdir if which == "model" else str(model_dir_for(p.model, lambda *_: None, p.data.counterfact_path))
    suffix = "" if str(mdir) == str(main_dir) else f"-{label}"
    study = Study(params=p, model=model, tok=tok, model_dir=str(mdir), label=label, records=records,
                  log=log, suffix=suffix, which=which)
    study._fp = fingerprint(model)  # the unedited model: keys results and C0, whatever is edited later
    study._commit = getattr(model.config, "_commit_hash", None) or hub_commit(mdir, mp.revision)  # a hub id's snapshot
    unedited(model)  # marks the weights as loaded as the unedited ones (editlib.weights.unedited)
    for style, text in template_styles(p):  # templates come from the unedited model, every set a section asks for
        study.contexts(style, text)
    return study


#: the experiment sections whose ``hparams`` may override a method's (params.method_hparams)
SECTIONS = ("layer_search", "singular", "sweep", "batch", "sequential")


def template_styles(p: StudyParams) -> list[tuple[str, str]]:
    """Every context-template set, (style, text), the params' methods use, in ``hparams`` or as an
    experiment section's overrides make them: sampled when the study opens, so that every unit's
    settings record their digests, a resume compares them and Ray workers receive them with the
    driver's others."""
    sets = {(hp.context_templates, hp.context_text) for hp in p.hparams.values()}
    for name in SECTIONS:
        over = getattr(p, name).hparams or {}
        for m, hp in p.hparams.items():  # a section's overrides: its common part, then the method's
            part = {**(over.get("common") or {}), **(over.get(m) or {})}
            sets.add((part.get("context_templates", hp.context_templates), part.get("context_text", hp.context_text)))
    return sorted(sets)


# --------------------------------------------------------------------------- helpers

def _slice(tg: BatchTargets, idx: Sequence[int]) -> BatchTargets:
    i = torch.as_tensor(list(idx))
    v = replace(tg.values, z=tg.values.z[:, i], h=tg.values.h[:, i],
                final_loss=tg.values.final_loss[i], steps=tg.values.steps[i],
                seconds=tg.values.seconds * len(idx) / tg.K.shape[1],
                fail_reason=[tg.values.fail_reason[j] for j in idx], stalled=tg.values.stalled[i])
    return replace(tg, K=tg.K[:, i], R=tg.R[:, i], values=v, seconds_keys=tg.seconds_keys * len(idx) / tg.K.shape[1])


def _charge(charged: dict, key: str, idx: Sequence[int], d: dict) -> dict:
    """Shared target preparation is timed once: each fact's share of the value/key time goes to the
    first row that uses it (later methods, batch sizes or λ reuse it for free), so summing
    ``seconds_values`` over batches.parquet gives the real time spent. ``shared_targets`` marks rows
    that reused targets prepared for an earlier row."""
    seen = charged.setdefault(key, set())
    new = [i for i in idx if i not in seen]
    frac = len(new) / max(len(idx), 1)
    seen.update(new)
    return {**d, "seconds_values": d.get("seconds_values", 0.0) * frac,
            "seconds_keys": d.get("seconds_keys", 0.0) * frac, "shared_targets": frac < 1}


def _value_key(hp: EditHParams) -> str:
    """What a fact's key, value and residual on a given model depend on (not μ, not the batch)."""
    return json.dumps([asdict(hp.values), context_key(hp.context_templates, hp.context_text), list(hp.layers)])


def _label(cases: pd.DataFrame, **cols) -> pd.DataFrame:
    cases = cases.copy()
    for k, v in reversed(list(cols.items())):
        cases.insert(1, k, v)
    return cases


def _resolve_layer(study: Study, layer, method: str = "memit") -> int:
    if isinstance(layer, int):
        if not 0 <= layer < study.n_layers:
            raise ParamsError(f"layer {layer} outside the model's 0..{study.n_layers - 1} decoder layers")
        return layer
    if layer == "best":
        return best_layer(study)
    raise ParamsError(f"layer must be an integer or 'best', got {layer!r}")


def best_layer(study: Study) -> int:
    """The layer with the highest S in this run's layer search (method ``memit`` when present)."""
    p = study.params
    path = Path(p.results_dir) / p.name / f"layer_search{study.suffix}" / "cases.parquet"
    if not path.is_file():
        raise ParamsError(f"layer 'best' needs a finished layer search ({path} is missing): run notebook "
                          "01_layer_search (or `python -m editlib run layer-search --params ...`) first, "
                          "or give an integer layer")
    return best_layer_of(pd.read_parquet(path))


def best_layer_of(cases: pd.DataFrame) -> int:
    """The layer with the highest S in layer-search ``cases`` (MEMIT's when present; ties: the lowest)."""
    s = summarize_cases(cases, by=["method", "layer"])
    pick = s[s.method == "memit"] if (s.method == "memit").any() else s
    return int(pick.sort_values(["S", "layer"], ascending=[False, True]).iloc[0]["layer"])


#: evaluation keys that change how scores are computed, not what they are, or (max_failed_fraction)
#: only when a run stops: left out of an experiment's params digest, so changing one (e.g. to fit GE
#: in memory, or raising the failed-edit limit after a run stopped on it) still reopens the folder
EVAL_NOT_IN_DIGEST = ("gen_batch_size", "gen_kv_gb", "share_below_gb", "gen_decode", "share_values_gb",
                      "max_failed_fraction")
#: params keys that may differ from a folder's manifest when it reopens (Experiment.open's
#: free_keys): the evaluation keys above (a manifest written before one was left out may still hold
#: it), and C0's accumulators per pass, which change how many passes run, never a layer's sum
#: (lowering it after running out of GPU memory resumes the folder)
FREE_KEYS = (*(f"evaluation.{k}" for k in EVAL_NOT_IN_DIGEST), "covariance.layers_per_pass")


def _exp(study: Study, name: str, spec: dict, *, lock: bool = True) -> Experiment:
    ev = {k: v for k, v in asdict(study.params.evaluation).items() if k not in EVAL_NOT_IN_DIGEST}
    for k, default in (("gen_text", "clean"), ("also_alignment", None)):
        if ev[k] == default:
            del ev[k]  # the default: the digest it had before the key existed
    if ev["generation"]:  # GE's words depend on whether punkt is installed: a folder never mixes the two
        ev["ge_sentence_splitter"] = sentence_splitter()
    cov = asdict(study.params.covariance)
    if not fast_gram_applies(cov["fast_gram"], next(study.model.parameters()).dtype):
        del cov["fast_gram"]  # no effect (off, or a float32 model): the digest it had before the key existed
    data = asdict(study.params.data)
    if data.pop("fact_list") == "reference":  # by content, not path; seeded adds no key
        data["fact_list_sha256"] = study.data_provenance()["fact_list_sha256"]
    del data["fact_list_path"]
    params = {"experiment": name, "spec": spec, "model_fingerprint": study.fingerprint,
              "evaluation": ev, "data": data, "covariance": cov}
    if tf32_applies(study.model):  # float32 products on TF32 tensor cores move every number by ~1e-3
        params["tf32"] = True      # (absent otherwise: the digest it had before the key existed)
    sets = {(h["context_templates"], h.get("context_text", "clean")) for h in spec.get("hparams", {}).values()}
    for style, text in sorted(sets):  # sampled when the study opened (template_styles); a study given
        study.contexts(style, text)   # other params since samples them here, before the provenance is read
    return Experiment.open(study.params.results_dir, study.params.name, name + study.suffix,
                           json.loads(json.dumps(params, default=str)), study.provenance(), lock=lock,
                           free_keys=FREE_KEYS, settings=_settings(study, {context_key(*s) for s in sets}))


#: evaluation keys outside the digest that move GE's texts at float rounding (the rows of a decode
#: batch, its decode form): recorded in every unit saved, so that a resumed run says when it changed them
GE_SETTINGS = ("gen_batch_size", "gen_kv_gb", "gen_decode")


def _settings(study: Study, styles: set) -> dict:
    """How this session computes and checks what the digest defines
    (:attr:`editlib.store.Experiment.settings`): the digests of the context templates (sampled
    from the model) of ``styles`` (the experiment's), the failed-edit limit its units passed, and
    with GE on, :data:`GE_SETTINGS`."""
    ev = study.params.evaluation
    ge = {f"evaluation.{k}": getattr(ev, k) for k in GE_SETTINGS} if ev.generation else {}
    ctx = {style: hashlib.sha256(json.dumps(groups).encode()).hexdigest()[:16]
           for style, groups in study.provenance()["context_templates"].items() if style in styles}
    commit = {"model_commit": study._commit} if study._commit else {}  # a hub id's snapshot: its tokenizer
    return {"context_templates": ctx, "evaluation.max_failed_fraction": float(ev.max_failed_fraction), **ge, **commit}


def _clean_command(study: Study, exp: Experiment) -> str:
    """The command that removes ``exp``'s saved units, quoted for a message."""
    p = study.params
    return f"`python -m editlib clean {p.name} --results-dir {p.results_dir} --experiment {exp.root.name}`"


def _check_resume(study: Study, exp: Experiment, log: Callable) -> None:
    """A resumed experiment's saved units came from the same context templates as this session's
    (sampled from the model: another GPU type, TF32 or package version can round a logit
    differently and sample other ones, which change every key and value) and, for a hub id, the
    same hub commit (its tokenizer files can change with the same weights): else RunConflict. Saved
    units that ran with other settings (:func:`_settings`: GE's, which move texts at float
    rounding, and the failed-edit limit) are said in the log. Each unit's ``unit.json`` records
    its settings; units of code that recorded none are not compared."""
    mine = exp.settings.get("context_templates", {})
    stored = exp.stored_settings()  # read once: every saved unit's unit.json
    for other in stored:
        theirs = other.get("context_templates", {})
        differ = sorted(k for k in theirs if k in mine and theirs[k] != mine[k])
        if differ:
            raise RunConflict(
                f"{exp.root}: its saved units used other context templates ({', '.join(differ)}) than this session sampled from "
                "the model (another GPU type, TF32 or package version rounds a logit differently); finish "
                f"the run where it started, or remove its units with {_clean_command(study, exp)}")
    commits = sorted({o["model_commit"] for o in stored if "model_commit" in o} - {exp.settings.get("model_commit")})
    if commits:  # the same weights can come with other tokenizer files under a moved `main`
        raise RunConflict(
            f"{exp.root}: its saved units were computed from the hub commit(s) {', '.join(commits)} of "
            f"{study.model_dir}, this session loaded {exp.settings.get('model_commit') or 'a local directory'}; "
            f"resume with model.revision: {commits[0]} (or remove its units with {_clean_command(study, exp)})")
    for other in stored:
        changed = {k: v for k, v in sorted(other.items())
                   if k not in ("context_templates", "model_commit") and exp.settings.get(k) != v}
        if changed:
            what = ["GE texts of the new units move at float rounding"] if set(changed) - {"evaluation.max_failed_fraction"} else []
            if "evaluation.max_failed_fraction" in changed:
                what.append("the saved units passed another failed-edit limit")
            log(f"{exp.root.name}: saved units ran with " + ", ".join(f"{k} = {v}" for k, v in changed.items())
                + "; this session with " + ", ".join(f"{k} = {exp.settings.get(k)}" for k in changed)
                + f" ({'; '.join(what)}; each unit's unit.json records its settings)")


WHAT = {"layer_search": "layer search", "singular": "singular edits", "sweep": "λ sweep",
        "batch": "batch editing", "sequential": "sequential-batch editing"}


def _search_layers(study: Study) -> list[int]:
    ls = study.params.layer_search
    return list(range(study.n_layers)) if ls.layers == "all" else [int(l) for l in ls.layers]


def _grids(study: Study) -> dict[str, list]:
    sw = study.params.sweep
    return {"memit": list(sw.memit_lambdas), "emmet": list(sw.emmet_lambdas)}


def _exp_spec(study: Study, name: str, layer: int | None) -> dict:
    """What defines experiment ``name``'s results (recorded in and checked against its manifest):
    sizes, methods, the edited ``layer`` (resolved), per-method hparams and orderings."""
    p = study.params
    if name == "layer_search":
        ls = p.layer_search
        spec, methods, layer = {"n_facts": ls.n_facts, "layers": _search_layers(study),
                                "methods": list(ls.methods)}, ls.methods, 0
    elif name == "singular":
        sp = p.singular
        spec, methods = {"n_facts": sp.n_facts, "layer": layer, "methods": list(sp.methods)}, sp.methods
        if sp.chunk_size:  # its units' names depend on it: a change must not mix two sets of parts
            spec["chunk_size"] = sp.chunk_size
    elif name == "sweep":
        sw = p.sweep
        spec = {"total": sw.total, "batch_size": sw.batch_size, "layer": layer, "grids": _grids(study)}
        methods = list(spec["grids"])
    elif name == "batch":
        bp = p.batch
        spec = {"total": bp.total, "batch_sizes": list(bp.batch_sizes), "methods": list(bp.methods), "layer": layer}
        if tuple(bp.windows) != (1,):
            spec["windows"] = list(bp.windows)
        methods = bp.methods
    else:
        sq = p.sequential
        spec = {"total": sq.total, "batch_sizes": list(sq.batch_sizes), "methods": list(sq.methods), "layer": layer,
                "eval_final": sq.eval_final,  # forgetting: its key names its unit (facts); off: null, as in default digests
                **({"forgetting_every_facts": sq.forgetting_every} if sq.forgetting_every else {"forgetting_every": None})}
        if sq.degradation_every:  # only when on: default runs keep their spec (and digests)
            spec.update(degradation_every=sq.degradation_every, heldout_facts=sq.heldout_facts)
        if tuple(sq.windows) != (1,):
            spec["windows"] = list(sq.windows)
        if sq.lm_eval:
            spec["lm_eval"] = dict(sq.lm_eval)
        if sq.eval_group != 1:  # scores move at float rounding: a run does not mix two settings
            spec["eval_group_facts"] = sq.eval_group  # a group's size in facts
        methods = sq.methods
    return {**spec, "hparams": {m: p.method_hparams(m, layer, name).to_dict() for m in methods},
            "orderings": list(p.data.orderings)}


def _open(study: Study, name: str, layer: int | None, log: Callable) -> Experiment:
    """The experiment folder (locked by this process, the run's driver); says so when it is
    already complete (the caller then returns its stored cases)."""
    exp = _exp(study, name, _exp_spec(study, name, layer))
    if exp.complete:
        log(f"{WHAT[name]} already complete in {exp.root}: nothing to do")
        return exp
    try:
        _check_resume(study, exp, log)
    except RunConflict:
        exp.close()
        raise
    return exp


def open_unit_experiment(study: Study, spec: "UnitSpec") -> Experiment:
    """The experiment folder an executor worker writes ``spec``'s parts into: same parameters as
    its driver's (checked), opened without the lock, which the driver holds."""
    layer = None if spec.experiment == "layer_search" else spec.layer
    return _exp(study, spec.experiment, _exp_spec(study, spec.experiment, layer), lock=False)


def _run_experiment(study: Study, name: str, layer: int | None, log: Callable, *,
                    before: Callable[[], None] | None = None, fail_after: int | None = None) -> pd.DataFrame:
    """Open the experiment, run its units not yet done on the params' executor, consolidate once."""
    exp = _open(study, name, layer, log)
    if exp.complete:
        return exp.cases()
    t0 = time.time()
    units = experiment_units(study, name, layer)
    stray = foreign_parts(exp, units, study.params)
    if stray:
        exp.close()
        raise RunConflict(f"{exp.root / 'parts'}: {len(stray)} file(s) belong to no unit of these params "
                          f"({', '.join(stray[:4])}{' ...' if len(stray) > 4 else ''}; saved by other code?): "
                          "consolidating would count them beside the units' own. Delete those files (the units "
                          f"they stood for run again), or the whole experiment with {_clean_command(study, exp)}")
    if before is not None:
        before()
    run_units(study, exp, units, log=log, fail_after=fail_after)
    return _finish(study, exp, t0)


def _finish(study: Study, exp: Experiment, t0: float) -> pd.DataFrame:
    exp.provenance = study.provenance()
    exp.finish({"seconds": round(time.time() - t0, 2)})
    # every unit is stored: no checkpoint log is needed any more (one left by a run that died after
    # a configuration's last unit but before removing its log holds ~1 GB at paper scale)
    shutil.rmtree(exp.root / "checkpoints", ignore_errors=True)
    return exp.cases()


def _edit_and_eval(study: Study, facts: Sequence[Record], hp: EditHParams, ctx: ContextTemplates,
                   tg: BatchTargets, session: EditSession, prior: PriorKeys | None = None
                   ) -> tuple[pd.DataFrame, dict]:
    """Edit and evaluate one batch. Facts whose value, key or residual failed are left out of the
    solve; if nothing can be solved, no weight is written. Either way every fact gets a row:
    ``failed`` / ``fail_reason`` say which rows carry no scores (NaN), so a failure is counted and
    shown, never averaged in as a valid zero. ``prior``: the sequential run's earlier keys."""
    stats, reasons = _edit(study, facts, hp, ctx, tg, session, prior)
    t0 = time.time()
    cases = _mark(study.evaluate(facts), reasons, tg.values.stalled.numpy(), stats["jitter_rel"],
                  stats.get("solve_resid", np.nan))
    return cases, {**stats, "seconds_eval": time.time() - t0}


def _edit(study: Study, facts: Sequence[Record], hp: EditHParams, ctx: ContextTemplates,
          tg: BatchTargets, session: EditSession, prior: PriorKeys | None = None) -> tuple[dict, list[str]]:
    """Write one batch's edit into the session's weights: (diagnostics, each fact's failure reason,
    "" for an edited fact). A batch that cannot be solved writes nothing and fails all its facts."""
    reasons = tg.fail_reason
    try:
        stats = apply_edit(study.model, study.tok, facts, hp, study.covs(hp.layers), ctx, session,
                           targets=tg, prior=prior).to_dict()
    except EditFailed as e:
        reasons = [r or str(e) for r in reasons]
        stats = {"n": len(facts), "layer": min(hp.layers), "mu": hp.mu, "n_failed": len(facts),
                 "jitter_rel": 0.0, "seconds_values": tg.values.seconds, "seconds_keys": tg.seconds_keys}
        study.log(f"edit failed ({len(facts)} facts): {e}")
    return stats, list(reasons)


def _mark(cases: pd.DataFrame, reasons: Sequence[str], stalled: np.ndarray,
          jitter_rel: float | np.ndarray, resid: float | np.ndarray = np.nan) -> pd.DataFrame:
    """A batch's evaluated cases with its failures blanked (NaN scores, ``failed``, ``fail_reason``),
    value stalls (loss never below its start: not a failure) and ``jitter_rel``, τ of the solve that
    wrote these edits relative to D + μI's mean eigenvalue (0: exact, SPEC §8.5): one number, or
    one per row when the rows come from several batches; ``resid``, the solve's ``solve_resid``
    (NaN: no solve), likewise, so that an edit from a numerically singular solve is counted and
    shown (:func:`editlib.metrics.singular_rows`). A case left without scores by NaN/inf model
    outputs is a failed edit too (:func:`editlib.metrics.with_unscored`)."""
    reasons = with_unscored(cases, reasons)
    failed = np.array([bool(r) for r in reasons], dtype=bool)
    cases.loc[failed, [c for c in cases.columns if c != "case_id"]] = np.nan
    cases["failed"] = failed
    cases["fail_reason"] = list(reasons)
    cases["value_stalled"] = stalled
    cases["solve_jitter"] = np.broadcast_to(np.asarray(jitter_rel, dtype=np.float64), len(cases)).copy()
    cases["solve_resid"] = np.broadcast_to(np.asarray(resid, dtype=np.float64), len(cases)).copy()
    return cases


def _shared_below(study: Study, layer: int, shared: dict | None = None) -> SharedBelow:
    """The blocks below ``layer`` run once per scoring batch for every evaluation that uses this
    object (editlib.below; ``evaluation.share_below_gb`` caps what it keeps, 0 turns it off). With
    ``shared`` (a UnitContext group) it lives with the group's targets, so the methods, batch sizes
    and λ of one group share it."""
    gb = float(study.params.evaluation.share_below_gb)
    if shared is None:
        return SharedBelow(study.model, layer, gb * 1e9)
    key = ("below", layer)
    if key not in shared:
        shared[key] = SharedBelow(study.model, layer, gb * 1e9)
    return shared[key]


def _batched(study: Study, hp: EditHParams) -> bool:
    """Independent edits are evaluated together (editlib.lowrank) unless the params ask for the
    reference path (edit, evaluate, restore one at a time) or the edit spans several layers.
    Every method's single-layer update is a rank-N product R X (AlphaEdit's Δ P and ENCORE's
    norm-constrained update included, editlib.editors), so every method can take this path."""
    return bool(study.params.evaluation.batched_edits) and len(hp.layers) == 1


def _independent_edits(study: Study, facts: Sequence[Record], hp: EditHParams, tg: BatchTargets,
                       chunks: Sequence[Sequence[int]], below: SharedBelow | None = None
                       ) -> list[tuple[pd.DataFrame, dict]]:
    """Every chunk of ``facts`` edited on the *unedited* model and evaluated — all in one
    evaluation pass, with each chunk's update added to its own rows by a hook, never written into
    the weights (issue #13). Same rows and diagnostics as :func:`_edit_and_eval` per chunk.

    Singular chunks (one fact each) are solved together with one multi-right-hand-side solve.
    Every chunk starts from the unedited model, so AlphaEdit / ENCORE have no earlier keys here.
    ``below`` (:func:`_shared_below`): the blocks under the edited layer, shared with the other
    evaluations of the same prompts."""
    layer = hp.layers[0]
    cov, mu, extra = preservation(hp, study.covs([layer])[layer])
    reasons = tg.fail_reason
    w0 = float(weight_out_in(study.model, layer).detach().double().norm())
    R_list, X_list, group, diags = [], [], np.full(len(facts), -1), []
    singular = all(len(c) == 1 for c in chunks)
    t0 = time.time()
    if singular:
        ok = np.array([not reasons[c[0]] for c in chunks])
        cols = [c[0] for c in chunks]
        X1, row_of, resid1 = torch.zeros(0), {}, []
        if ok.any():
            sel = [c for c, k in zip(cols, ok) if k]
            X1, why, resid1 = solve_rank_one(tg.R[:, sel], tg.K[:, sel], cov, mu,
                                             A=solved_keys(tg.solved, cov, tg.K, sel))
            row_of = {c: k for k, c in enumerate(sel)}
            for c, w in zip(sel, why):
                reasons[c] = reasons[c] or w
    t_solve = time.time() - t0
    for idx in chunks:
        idx = list(idx)
        t1 = time.time()
        ok_idx = [i for i in idx if not reasons[i]]
        d = {"n": len(idx), "layer": layer, "mu": hp.mu, "n_failed": len(idx) - len(ok_idx),
             "cond_D": np.nan, "jitter": 0.0, "jitter_rel": 0.0, "delta_norm": np.nan,
             "w_dist": np.nan, "w_rel_dist": np.nan, "mean_resid_norm": np.nan, "mean_value_steps": np.nan,
             "seconds_values": tg.values.seconds * len(idx) / max(len(facts), 1),
             "seconds_keys": tg.seconds_keys * len(idx) / max(len(facts), 1), "seconds_solve": 0.0,
             "nullspace_frac": np.nan, "nullspace_energy": np.nan, "prior_keys": 0, "delta_bound": np.nan,
             "solve_resid": np.nan, **extra}
        if singular and ok_idx:
            X = X1[row_of[idx[0]]:row_of[idx[0]] + 1]
            R = tg.R[:, ok_idx].to(device=X.device, dtype=torch.float64)
            d.update(cond_D=1.0, seconds_solve=t_solve / max(len(chunks), 1), solve_resid=resid1[row_of[idx[0]]])
        elif ok_idx:
            A = solved_keys(tg.solved, cov, tg.K, ok_idx)  # outside the try: a bad A is a bug, not a failed edit
            try:
                X, info = solve_factors(tg.R[:, ok_idx], tg.K[:, ok_idx], cov, mu, max_cond=hp.max_cond, A=A,
                                         solve=hp.solve)
                R = tg.R[:, ok_idx].to(device=X.device, dtype=torch.float64)
                d.update(cond_D=info.cond_D, jitter=info.jitter, jitter_rel=info.jitter_rel, solve_resid=info.solve_resid)
            except (ValueError, FloatingPointError) as e:
                for i in ok_idx:
                    reasons[i] = f"the closed-form update failed: {e}"
                study.log(f"edit failed ({len(idx)} facts): {e}")
                ok_idx = []
            d["seconds_solve"] = time.time() - t1
        if ok_idx:
            e = len(R_list)
            R_list.append(R)
            X_list.append(X)
            group[idx] = e  # failed facts are masked below; their rows need no edit
            dist = LowRankEdits(layer, [R], [X]).fro_norm(0)
            if hp.method == "encore":
                d["delta_bound"] = encore_delta_bound(R, hp.update_norm_lambda)
            d.update(n_failed=len(idx) - len(ok_idx), delta_norm=dist, w_dist=dist, w_rel_dist=dist / max(w0, 1e-30),
                     mean_resid_norm=float(tg.R[:, ok_idx].norm(dim=0).mean()),
                     mean_value_steps=float(tg.values.steps[ok_idx].float().mean()))
        else:
            d["n_failed"] = len(idx)
        diags.append(d)
    t_eval = time.time()
    if R_list:
        with RowDeltas(study.model, LowRankEdits(layer, R_list, X_list)) as hook:
            cases = study.evaluate(facts, groups=group.tolist(), deltas=hook, below=below)
    else:
        cases = study.evaluate(facts, below=below)
    t_eval = time.time() - t_eval
    # every chunk's rows marked in one pass, then cut per chunk (a layer search has 1,200 chunks)
    order = [i for idx in chunks for i in idx]
    ends = np.cumsum([len(idx) for idx in chunks])
    sizes = [len(idx) for idx in chunks]
    jitter = np.repeat([d["jitter_rel"] for d in diags], sizes)
    resid = np.repeat([d.get("solve_resid", np.nan) for d in diags], sizes)
    marked = _mark(cases.iloc[order].reset_index(drop=True), [reasons[i] for i in order],
                   tg.values.stalled.numpy()[order], jitter, resid)
    return [(marked.iloc[e - len(idx):e].reset_index(drop=True), {**d, "seconds_eval": t_eval * len(idx) / max(len(facts), 1)})
            for idx, d, e in zip(chunks, diags, ends)]


# --------------------------------------------------------------------------- singular / layer search

def _singular_unit(study: Study, facts, methods, layer, *, unit_cols: dict, section: str = "singular",
                   offset: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each fact edited alone at ``layer`` by each method; values computed once per distinct
    value setting (they do not depend on μ) and batched across facts. ``offset``: the position
    of ``facts[0]`` in the experiment's facts (its ``batch_index``)."""
    frames, diags = [], []
    targets: dict[str, BatchTargets] = {}
    charged: dict = {}
    below = _shared_below(study, layer)  # one per unit: every method scores the same prompts
    for method in methods:
        hp = study.params.method_hparams(method, layer, section)
        ctx = study.contexts(hp.context_templates, hp.context_text)
        key = _value_key(hp)
        if key not in targets:
            targets[key] = prepare_targets(study.model, study.tok, facts, hp, ctx, store=study.value_store)
        tg = targets[key]
        study.covs([layer])
        if _batched(study, hp):
            results = _independent_edits(study, facts, hp, tg, [[i] for i in range(len(facts))], below)
        else:
            results = []
            for i, fact in enumerate(facts):
                with EditSession(study.model) as s:
                    results.append(_edit_and_eval(study, [fact], hp, ctx, _slice(tg, [i]), s))
        # one fact per chunk: labelled together (per-row batch_index) rather than chunk by chunk
        frames.append(_label(pd.concat([c for c, _ in results], ignore_index=True), method=method, layer=layer,
                             batch_size=1, batch_index=offset + np.arange(len(results), dtype=np.int64), eval="current",
                             **unit_cols))
        for i, (_, d) in enumerate(results):
            diags.append({"method": method, "layer": layer, "batch_index": offset + i, **unit_cols,
                          **_charge(charged, key, [i], d)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(diags)


def run_layer_search(study: Study, *, log=None) -> pd.DataFrame:
    """Figure 1: singular edits of ``n_facts`` facts at every layer, each method. C0 of every layer
    is collected first, in as few passes as memory allows."""
    log = log or study.log
    return _run_experiment(study, "layer_search", None, log,
                           before=lambda: study.prepare_covs(_search_layers(study)))


def run_singular(study: Study, *, log=None) -> pd.DataFrame:
    """Table 1: singular edits at the chosen layer, each method."""
    log = log or study.log
    return _run_experiment(study, "singular", _resolve_layer(study, study.params.singular.layer), log)


def _one_line(cases: pd.DataFrame) -> str:
    """A configuration's scores in one line: S, ES, PS, NS (×100) and its failed edits."""
    r = summarize_cases(cases).iloc[0]
    return (f"S {r['S']:.1f} (ES {r['ES_mean']:.1f}, PS {r['PS_mean']:.1f}, NS {r['NS_mean']:.1f}; "
            f"{int(r['n'])} facts, {int(r.get('n_failed', 0))} failed)")


def unit_edits(spec: "UnitSpec", p: StudyParams) -> int:
    """How many facts ``spec`` edits (its share of an experiment's progress bar)."""
    e = spec.experiment
    if e == "layer_search":
        return p.layer_search.n_facts * len(p.layer_search.methods)
    if e == "singular":
        n = p.singular.n_facts if spec.chunk is None else len(_chunks(p.singular.n_facts, p.singular.chunk_size)[spec.chunk])
        return n * len(p.singular.methods)
    if e == "sweep":
        return len(_chunks(p.sweep.total, p.sweep.batch_size)[spec.chunk])
    return getattr(p, e).total


def _layer_search_unit(spec: "UnitSpec", study: Study, exp: Experiment, uc: "UnitContext") -> "UnitResult":
    """One layer of the layer search for one ordering: every method's singular edits."""
    ls = study.params.layer_search
    tl = time.time()
    cases, diags = _singular_unit(study, study.facts(ls.n_facts, spec.ordering), ls.methods, spec.layer,
                                  unit_cols={"ordering": spec.ordering}, section="layer_search")
    exp.save_unit(spec.name, cases, diags)
    uc.log(f"layer {spec.layer}: " + ", ".join(
        f"{m} S={summarize_cases(cases[cases.method == m]).S.iloc[0]:.1f}" for m in ls.methods)
        + f" ({time.time() - tl:.1f}s)")
    return UnitResult(spec.name, [("", f"layer search, layer {spec.layer}:", cases)])


def _singular_edits_unit(spec: "UnitSpec", study: Study, exp: Experiment, uc: "UnitContext") -> "UnitResult":
    """Table 1 for one ordering (or one chunk of its facts, ``singular.chunk_size``): every
    method's singular edits at the chosen layer."""
    sp = study.params.singular
    facts, offset = study.facts(sp.n_facts, spec.ordering), 0
    if spec.chunk is not None:
        idx = _chunks(len(facts), sp.chunk_size)[spec.chunk]
        facts, offset = facts[idx.start:idx.stop], idx.start
    cases, diags = _singular_unit(study, facts, sp.methods, spec.layer,
                                  unit_cols={"ordering": spec.ordering}, offset=offset)
    exp.save_unit(spec.name, cases, diags)
    return UnitResult(spec.name, [(f"o{spec.ordering}", "singular edits:", cases)])


# --------------------------------------------------------------------------- batch and sweep

def _chunks(n: int, b: int) -> list[range]:
    return [range(s, min(s + b, n)) for s in range(0, n, b)]


#: methods whose update can spread over a window of layers (ROME and EMMET edit one layer)
MULTI_LAYER = ("memit", "alphaedit", "encore")


def runs_at(method: str, batch_size: int) -> bool:
    """Whether ``method`` has a batch of ``batch_size``: ROME edits one fact (B = 1 only; its
    batched generalisation is EMMET, SPEC §3), every other method any size."""
    return method != "rome" or batch_size == 1


def window_label(method: str, window: int) -> str:
    """The method name a windowed configuration's rows carry: "memit" or "memit-w3"."""
    return method if window == 1 else f"{method}-w{window}"


def batch_windows(study: Study, method: str, layer: int, section: str = "batch") -> list[int]:
    """``<section>.windows`` (batch or sequential) for ``method`` (only 1 for single-layer
    methods); a window running past the model's last layer is a parameter error."""
    wins = [w for w in getattr(study.params, section).windows if w == 1 or method in MULTI_LAYER]
    check_windows(section, wins, layer, study.n_layers)
    return wins


def check_windows(section: str, windows: Sequence[int], layer: int, depth: int) -> None:
    """A window of layers from ``layer`` running past a ``depth``-layer model's last layer is a
    parameter error naming ``<section>.windows``."""
    too_far = [w for w in windows if layer + w > depth]
    if too_far:
        raise ParamsError(f"{section}.windows {too_far} from layer {layer} run past the model's last layer "
                          f"{depth - 1}")


def windowed_hparams(hp: EditHParams, layer: int, window: int) -> EditHParams:
    """The MEMIT family's (MEMIT, AlphaEdit, ENCORE) update over ``layer`` … ``layer + window − 1`` (the residual spread)."""
    return hp if window == 1 else replace(hp, layers=tuple(range(layer, layer + window)))


def run_batch(study: Study, *, log=None) -> pd.DataFrame:
    """Figures 2-3: every batch applied to the unedited model, evaluated on its facts, restored."""
    log = log or study.log
    return _run_experiment(study, "batch", _resolve_layer(study, study.params.batch.layer), log)


def _batch_unit(spec: "UnitSpec", study: Study, exp: Experiment, uc: "UnitContext") -> "UnitResult":
    """All batches of one size for one method and ordering (those not saved yet), evaluated together."""
    bp = study.params.batch
    o, method, B, layer = spec.ordering, spec.method, spec.batch_size, spec.layer
    facts = study.facts(bp.total, o)
    # Every batch starts from the unedited model, so a fact's key, value and residual do not
    # depend on its batch, its batch size or the method's μ: compute them once per value
    # setting for all facts and slice (the singular protocol does the same). Units of the same
    # ordering share them within a process (UnitContext.group).
    shared = uc.group(("batch", o))
    targets, charged = shared["targets"], shared["charged"]
    hp = windowed_hparams(study.params.method_hparams(method, layer, "batch"), layer, spec.window)  # w > 1: reference path
    label = window_label(method, spec.window)
    ctx = study.contexts(hp.context_templates, hp.context_text)
    key = _value_key(hp)
    todo = [(bi, idx) for bi, idx in enumerate(_chunks(len(facts), B))
            if not exp.has_unit(f"{spec.name}-b{bi:05d}")]
    if todo and key not in targets:
        targets[key] = prepare_targets(study.model, study.tok, facts, hp, ctx, store=study.value_store)
    if todo and _batched(study, hp):  # all pending batches of this size in one pass
        pos = [i for _, idx in todo for i in idx]
        sub = _slice(targets[key], pos)
        local, k = [], 0
        for _, idx in todo:
            local.append(list(range(k, k + len(idx))))
            k += len(idx)
        done = _independent_edits(study, [facts[i] for i in pos], hp, sub, local,
                                  _shared_below(study, layer, shared))
    else:
        done = []
        for _, idx in todo:
            with EditSession(study.model) as s:
                done.append(_edit_and_eval(study, [facts[i] for i in idx], hp, ctx,
                                           _slice(targets[key], idx), s))
    checks = []
    for (bi, idx), (cases, d) in zip(todo, done):
        cols = dict(method=label, layer=layer, batch_size=B, batch_index=bi, eval="current", ordering=o)
        exp.save_unit(f"{spec.name}-b{bi:05d}", _label(cases, **cols),
                      pd.DataFrame([{**cols, **_charge(charged, key, list(idx), d)}]))
        checks.append((f"o{o}", f"batch B={B}:", _label(cases, **cols)))
    if done:
        uc.log(f"batch {label} B={B}: " + _one_line(pd.concat([c for *_, c in checks], ignore_index=True)))
    return UnitResult(spec.name, checks)


def run_sweep(study: Study, *, log=None) -> pd.DataFrame:
    """Tables 3-4: batch editing at one batch size for each λ; keys, values and residuals are
    computed once per batch and only the solve is repeated (values do not depend on λ)."""
    log = log or study.log
    return _run_experiment(study, "sweep", _resolve_layer(study, study.params.sweep.layer), log)


def _sweep_unit(spec: "UnitSpec", study: Study, exp: Experiment, uc: "UnitContext") -> "UnitResult":
    """One method × λ on one batch (chunk) of one ordering; the batch's targets are shared with
    the other λ and methods of that batch run in the same process (UnitContext.group)."""
    sw = study.params.sweep
    o, bi, method, lam, layer = spec.ordering, spec.chunk, spec.method, spec.lam, spec.layer
    facts = study.facts(sw.total, o)
    idx = _chunks(len(facts), sw.batch_size)[bi]
    chunk = [facts[i] for i in idx]
    shared = uc.group(("sweep", o, bi))
    targets, charged = shared["targets"], shared["charged"]
    over = {"mom2_update_weight": float(lam)} if method == "memit" else {"emmet_lambda": float(lam)}
    hp = study.params.method_hparams(method, layer, "sweep", **over)
    ctx = study.contexts(hp.context_templates, hp.context_text)
    key = _value_key(hp)
    if key not in targets:
        targets[key] = prepare_targets(study.model, study.tok, chunk, hp, ctx, store=study.value_store)
    if _batched(study, hp):  # the batch's update added by a hook at evaluation, no weight written
        [(cases, d)] = _independent_edits(study, chunk, hp, targets[key], [range(len(chunk))],
                                          _shared_below(study, layer, shared))
    else:
        with EditSession(study.model) as s:
            cases, d = _edit_and_eval(study, chunk, hp, ctx, targets[key], s)
    cols = dict(method=method, layer=layer, lam=float(lam), batch_size=sw.batch_size,
                batch_index=bi, eval="current", ordering=o)
    exp.save_unit(spec.name, _label(cases, **cols),
                  pd.DataFrame([{**cols, **_charge(charged, key, list(idx), d)}]))
    uc.log(f"sweep {method} λ={lam:g} batch {bi}: " + _one_line(cases))
    return UnitResult(spec.name, [("", f"sweep λ={lam:g}:", _label(cases, **cols))])


# --------------------------------------------------------------------------- sequential-batch

def _save_ckpt(path: Path, session: EditSession, entries: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
               batch: int, prior_entries: Sequence[tuple[int, torch.Tensor]] = ()) -> None:
    """Append batch ``batch``'s low-rank updates (``entries``: the session's factor log of that
    batch) to the run's checkpoint log: one small file per batch (R and X of each layer written,
    float64) instead of the whole edited weight (235 MB at 8B: 4,096 rewrites for one B = 1 run
    would be ~1 TB; the log is ~600 MB in all). Replaying the log with the same arithmetic rebuilds
    the weights bit for bit. ``prior_entries`` (AlphaEdit / ENCORE): the batch's keys added to K_p,
    logged as "p<k>.<layer>.K"."""
    if not session.log_complete:
        raise RuntimeError("a dense update was written in this session: the factor log cannot replay it")
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, (layer, R, X) in enumerate(entries):
        tensors[f"{k:04d}.{layer}.R"] = R.contiguous()
        tensors[f"{k:04d}.{layer}.X"] = X.contiguous()
    for k, (layer, K) in enumerate(prior_entries):
        tensors[f"p{k:04d}.{layer}.K"] = K.contiguous()
    final = path / f"b{batch:06d}.safetensors"
    tmp = path / f".{final.name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"batch": str(batch), "entries": str(len(entries))})
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no stray file


def _load_ckpt(path: Path, session: EditSession, layers: Sequence[int], prior: PriorKeys | None = None,
               limit: int | None = None) -> int:
    """Replay the consecutive batches of the checkpoint log (0, 1, ...; at most ``limit``) into
    ``session`` (and the logged keys into ``prior``); returns the next batch to run. A gap (a batch
    whose file is missing) ends the replay there."""
    n = 0
    while (limit is None or n < limit) and (f := path / f"b{n:06d}.safetensors").is_file():
        tensors = load_file(str(f))
        factors = {name for name in tensors if not name.startswith("p")}
        for k in sorted({name.split(".")[0] for name in factors}):
            layer = int(next(name for name in factors if name.startswith(k + ".")).split(".")[1])
            session.apply_factors(layer, tensors[f"{k}.{layer}.R"], tensors[f"{k}.{layer}.X"])
        keys = sorted(name for name in tensors if name.startswith("p"))
        if keys and prior is None:
            raise RuntimeError(f"{f} holds earlier edits' keys but this run keeps none (different method?)")
        for name in keys:
            prior.add(int(name.split(".")[1]), tensors[name])
        n += 1
    session.take_log()  # replayed updates are already on disk
    if prior is not None:
        prior.take_log()
    return n


def run_sequential(study: Study, *, log=None, fail_after: int | None = None) -> pd.DataFrame:
    """Figures 4-5, Table 2: batches applied one after another on the same model.

    ``fail_after`` (tests, local executor) raises after that many batches of a configuration, to
    exercise resume.
    """
    log = log or study.log
    return _run_experiment(study, "sequential", _resolve_layer(study, study.params.sequential.layer), log,
                           fail_after=fail_after)


def _sequential_unit(spec: "UnitSpec", study: Study, exp: Experiment, uc: "UnitContext") -> "UnitResult":
    """One method × batch size × ordering: its batches one after another (checkpoint log inside)."""
    sq = study.params.sequential
    hp = windowed_hparams(study.params.method_hparams(spec.method, spec.layer, "sequential"), spec.layer, spec.window)
    ctx = study.contexts(hp.context_templates, hp.context_text)
    _sequential_config(study, exp, study.facts(sq.total, spec.ordering), hp, ctx, window_label(spec.method, spec.window),
                       spec.batch_size, spec.ordering, sq, uc.log, uc.fail_after)
    return UnitResult(spec.name)


def _sequential_config(study, exp, facts, hp, ctx, method, B, o, sq, log, fail_after) -> None:
    cfg = f"{method}-B{B:05d}-o{o}"
    chunks = _chunks(len(facts), B)
    final_unit = f"{cfg}-final"
    if exp.has_unit(final_unit) or (not sq.eval_final and exp.has_unit(f"{cfg}-b{len(chunks) - 1:05d}")):
        return
    ckpt = exp.checkpoint_path(cfg)
    base = dict(method=method, layer=hp.layers[0], batch_size=B, ordering=o)
    covs = study.covs(hp.layers)  # before any checkpoint is loaded: C0 belongs to the unedited model
    prior = run_state(hp, covs)  # this run's keys of earlier edits (AlphaEdit, ENCORE), else None
    heldout = _heldout(study, sq, facts, o) if sq.degradation_every else []
    lm_spec = parse_lm_eval(sq.lm_eval)
    # degradation of the unedited model, the reference for every later measurement
    deg0 = {f"{k}_0": v for k, v in _unedited_degradation(study, heldout).items()} if heldout else {}
    if lm_spec is not None:  # the unedited model's scores: one harness pass per study, not per configuration
        deg0.update({f"{k}_0": v for k, v in study.of_unedited(
            ("lm_eval", repr(lm_spec)), lambda: lm_evaluate(study.model, study.tok, lm_spec)).items()})
    own_jitter = np.zeros(len(facts))  # each fact's own batch's solve jitter, for re-evaluations
    own_resid = np.full(len(facts), np.nan)  # ... and its solve_resid
    own_reason = [""] * len(facts)  # ... and why its own edit failed ("" = edited)
    fails = _Failures(study.params.evaluation.max_failed_fraction, log)
    current: list[pd.DataFrame] = []  # every batch's cases right after it (resumed ones too), for the closing line
    with EditSession(study.model) as s:
        start = _load_ckpt(ckpt, s, hp.layers, prior, limit=_stored_batches(exp, cfg, len(chunks))) if ckpt.is_dir() else 0
        if start:
            log(f"sequential {cfg}: resuming at batch {start}/{len(chunks)}")
            for bi in range(start):
                done = exp.load_unit(f"{cfg}-b{bi:05d}")
                done = done[done["eval"] == "current"]
                current.append(done)
                fails.add(f"sequential B={B}:", done, stored=True)
                own_jitter[list(chunks[bi])] = done["solve_jitter"].iloc[0]
                own_resid[list(chunks[bi])] = done["solve_resid"].iloc[0] if "solve_resid" in done else np.nan
                for i, r in zip(chunks[bi], done["fail_reason"] if "fail_reason" in done else [""] * len(done)):
                    own_reason[i] = r
        fails.check()  # the stored batches' totals, once
        tl = time.time()
        pending: list[_Pending] = []  # edited, not yet evaluated (sequential.eval_group > 1)
        for bi in range(start, len(chunks)):
            chunk = [facts[i] for i in chunks[bi]]
            # the store keys later batches by the session's updates so far (weights.edit_history):
            # a run that edits the same facts the same way before this batch reads it back
            tg = prepare_targets(study.model, study.tok, chunk, hp, ctx, store=study.value_store)
            s.take_log()  # only this batch's updates go into its checkpoint file
            if prior is not None:
                prior.take_log()
            stats, reasons = _edit(study, chunk, hp, ctx, tg, s, prior)
            pending.append(_Pending(bi, chunk, tg, stats, reasons, s.take_log(),
                                    prior.take_log() if prior is not None else []))
            forget, degrade, lm = measurements_after(sq, chunks, bi, bool(heldout), lm_spec)
            if not closes_group(sq, chunks, bi, sum(len(q.facts) for q in pending), bool(heldout), lm_spec):
                if fail_after is not None and bi + 1 - start >= fail_after:
                    raise RuntimeError(f"injected failure after batch {bi} of {cfg} (batches {pending[0].bi}-{bi} "
                                       f"edited, not evaluated)")
                continue
            evaluated = _evaluate_pending(study, pending, s)
            for p_, (cases, d) in zip(pending, evaluated):
                own_jitter[list(chunks[p_.bi])] = d["jitter_rel"]
                own_resid[list(chunks[p_.bi])] = d.get("solve_resid", np.nan)
                for i, r in zip(chunks[p_.bi], cases["fail_reason"]):
                    own_reason[i] = r
            for p_, (cases, d) in zip(pending, evaluated):
                frames = [_label(cases, **base, batch_index=p_.bi, eval="current")]
                current.append(frames[0])
                if p_.bi == bi:  # the group's last batch: the model is as it is now
                    if forget:
                        so_far = facts[: chunks[bi].stop]
                        frames.append(_label(_with_own(study.evaluate(so_far), own_jitter, own_reason, own_resid), **base,
                                             batch_index=bi, eval=f"after_{chunks[bi].stop}"))
                    if degrade:  # a multiple of `every` facts crossed, or the end; heldout_n: over how many
                        d = {**d, **_degradation(study, heldout), "heldout_n": len(heldout), **deg0}
                    if lm:
                        d = {**d, **lm_evaluate(study.model, study.tok, lm_spec), **deg0}
                exp.save_unit(f"{cfg}-b{p_.bi:05d}", pd.concat(frames, ignore_index=True),
                              pd.DataFrame([{**base, "batch_index": p_.bi, **d}]))
                fails.add(f"sequential B={B}:", frames[0])
                _save_ckpt(ckpt, s, p_.entries, p_.bi, p_.prior_entries)
            pending = []
            if fail_after is not None and bi + 1 - start >= fail_after:
                raise RuntimeError(f"injected failure after batch {bi} of {cfg}")
        if sq.eval_final:
            exp.save_unit(final_unit, _label(_with_own(study.evaluate(facts), own_jitter, own_reason, own_resid), **base,
                                             batch_index=len(chunks) - 1, eval="final"))
        log(f"sequential {cfg}: {len(chunks)} batches ({time.time() - tl:.1f}s); right after each batch "
            + _one_line(pd.concat(current, ignore_index=True)) if current else
            f"sequential {cfg}: {len(chunks)} batches (all stored before)")
    # the model is restored when the session exits; the checkpoint log is no longer needed
    shutil.rmtree(ckpt, ignore_errors=True)


def measurements_after(sq, chunks: Sequence[range], bi: int, degradation: bool, lm_spec=None) -> tuple[bool, bool, bool]:
    """Which measurements of the model follow batch ``bi`` of a sequential run: (forgetting —
    all facts so far, after every ``forgetting_every`` edited facts before the last batch (counted
    in facts, like degradation, so that runs of different batch sizes are measured at the same
    points and a one-fact run does not evaluate quadratically often); degradation, when
    ``degradation``; lm-eval)."""
    last = bi + 1 == len(chunks)
    k = sq.forgetting_every
    return (bool(k) and not last and degradation_due(k, chunks[bi].start, chunks[bi].stop, False),
            degradation and degradation_due(sq.degradation_every, chunks[bi].start, chunks[bi].stop, last),
            lm_spec is not None and lm_due(lm_spec, chunks[bi].start, chunks[bi].stop, last))


def closes_group(sq, chunks: Sequence[range], bi: int, n_pending: int, degradation: bool, lm_spec=None) -> bool:
    """Whether batch ``bi`` of a sequential run ends an evaluation group (its pending batches,
    holding ``n_pending`` facts with this one's, are evaluated now): the group holds at least
    ``sq.eval_group`` facts, the run ends, or a measurement follows this batch
    (:func:`measurements_after`) and needs every batch so far evaluated. With eval_group 1, every
    batch. Counting facts bounds what a crash inside a group loses (nothing is stored before its
    group closes): a batch of ``eval_group`` facts or more is evaluated alone."""
    return (n_pending >= sq.eval_group or bi + 1 == len(chunks)
            or any(measurements_after(sq, chunks, bi, degradation, lm_spec)))


@dataclass
class _Pending:
    """A sequential batch edited into the weights but not evaluated yet: its facts, targets,
    diagnostics, failure reasons and the factor (and prior-key) log entries of its update."""
    bi: int
    facts: list[Record]
    tg: BatchTargets
    stats: dict
    reasons: list[str]
    entries: list[tuple[int, torch.Tensor, torch.Tensor]]
    prior_entries: list[tuple[int, torch.Tensor]]


def _stored_batches(exp: Experiment, cfg: str, n: int) -> int:
    """How many consecutive batches of configuration ``cfg`` (0, 1, ...) have their cases stored:
    a resumed run replays its checkpoint log no further (batches edited but not yet evaluated when
    the run stopped are edited again)."""
    k = 0
    while k < n and exp.has_unit(f"{cfg}-b{k:05d}"):
        k += 1
    return k


def _evaluate_pending(study: Study, pending: Sequence[_Pending], session: EditSession) -> list[tuple[pd.DataFrame, dict]]:
    """Cases and diagnostics of consecutive sequential batches, each as if evaluated right after its
    own edit, in one evaluation call (``sequential.eval_group``).

    The weights now hold every pending batch's update: W = W_j + Σ_{s>j} R_s X_s for batch j, so the
    rows of batch j's prompts get −Σ_{s>j} R_s X_s added at each edited layer (:class:`TrailingDeltas`:
    the group's factors stacked once), which is batch j's weights up to rounding (the last batch's
    rows get exactly +0: its scores are bit-identical to evaluating right after it). In float32 the
    margins agree to ~1e-6; in bfloat16 the written weights are rounded to bfloat16 after every
    batch, and batch j's rows see another rounding of the same sum (margins up to 3e-2 apart on the
    miniature). One pending batch is the reference path."""
    facts = [f for p in pending for f in p.facts]
    t0 = time.time()
    layers = sorted({layer for p in pending for layer, _, _ in p.entries})
    if len(pending) == 1 or not layers:
        cases = study.evaluate(facts)
    else:
        if not session.log_complete:  # the hooks can only take back updates they have the factors of
            raise RuntimeError("a dense update was written: grouped sequential evaluation needs every update's factors")
        groups = [j for j, p in enumerate(pending) for _ in p.facts]
        with contextlib.ExitStack() as stack:  # every hook removed on the way out, also on error
            hooks = []
            for layer in layers:
                R, X = [], []
                d_out, d_in = next((r.shape[0], x.shape[1]) for q in pending for l, r, x in q.entries if l == layer)
                for p in pending:  # update s of this layer: its batch's factors (rank 0 if none)
                    mine = [(r, x) for l, r, x in p.entries if l == layer]
                    R.append(torch.cat([r for r, _ in mine], 1) if mine else torch.zeros(d_out, 0, dtype=torch.float64))
                    X.append(torch.cat([x for _, x in mine], 0) if mine else torch.zeros(0, d_in, dtype=torch.float64))
                hooks.append(stack.enter_context(TrailingDeltas(study.model, LowRankEdits(layer, R, X), sign=-1.0)))
            hook = stack.enter_context(LayeredRowDeltas(study.model, hooks))
            cases = study.evaluate(facts, groups=groups, deltas=hook)
    seconds = (time.time() - t0) / max(len(facts), 1)
    out, at = [], 0
    for p in pending:
        c = cases.iloc[at:at + len(p.facts)].reset_index(drop=True).copy()
        at += len(p.facts)
        out.append((_mark(c, p.reasons, p.tg.values.stalled.numpy(), p.stats["jitter_rel"],
                          p.stats.get("solve_resid", np.nan)),
                    {**p.stats, "seconds_eval": seconds * len(p.facts)}))
    return out


def _heldout(study: Study, sq, facts: Sequence[Record], ordering: int) -> list[Record]:
    """The run's held-out known facts (editlib.degradation.heldout_facts): after the edited facts in
    the same ordering, outside their neighbourhood prompts."""
    from .degradation import heldout_facts, pool_size

    pool = study.facts(pool_size(len(study.records), len(facts), sq.heldout_facts), ordering)[len(facts):]
    held = heldout_facts(pool, facts, sq.heldout_facts)
    if not held:
        raise ParamsError(f"sequential.degradation_every needs held-out facts, but all {len(study.records)} "
                          f"records are edited or in an edited fact's neighbourhood (lower sequential.total)")
    if len(held) < sq.heldout_facts:  # degradation is measured on fewer facts than asked: say so
        study.log(f"sequential, ordering {ordering}: {len(held)} held-out facts, not sequential.heldout_facts="
                  f"{sq.heldout_facts} (the records after the {len(facts)} edited ones hold no more outside "
                  "their neighbourhoods)")
    return held


def _degradation(study: Study, heldout: Sequence[Record]) -> dict[str, float]:
    from .degradation import measure

    ev = study.params.evaluation  # the rewrite prompts' scores only: no paraphrases, neighbours, generation
    return measure(study.model, study.tok, heldout,
                   lambda rs: evaluate_records(study.model, study.tok, rs, alignment=ev.alignment,
                                               batch_size=ev.batch_size, generation=False,
                                               families=("rewrite",)),
                   batch_size=ev.batch_size)


def _unedited_degradation(study: Study, heldout: Sequence[Record]) -> dict[str, float]:
    """:func:`_degradation` of the unedited model, measured once per study for these held-out
    facts and the evaluation settings it reads (:meth:`Study.of_unedited`), not per configuration."""
    ev = study.params.evaluation
    return study.of_unedited(("degradation", ev.alignment, ev.batch_size, tuple(r.case_id for r in heldout)),
                             lambda: _degradation(study, heldout))


def _with_own(cases: pd.DataFrame, own_jitter: np.ndarray, own_reason: Sequence[str],
              own_resid: np.ndarray | None = None) -> pd.DataFrame:
    """Re-evaluated facts (in fact order) carry the solve jitter and residual of the batch that
    edited them, and a fact whose own edit failed stays a failed row (no scores) in every later
    evaluation."""
    cases = cases.copy()
    n = len(cases)
    reasons = with_unscored(cases, own_reason[:n])
    failed = np.array([bool(r) for r in reasons])
    cases.loc[failed, [c for c in cases.columns if c != "case_id"]] = np.nan
    cases["failed"] = failed
    cases["fail_reason"] = reasons
    cases["solve_jitter"] = own_jitter[:n]
    cases["solve_resid"] = np.full(n, np.nan) if own_resid is None else own_resid[:n]
    return cases


# --------------------------------------------------------------------------- units of work

@dataclass(frozen=True)
class UnitSpec:
    """One independent unit of an experiment (issue #14). It runs with nothing but this spec, the
    params and the results folder (:func:`run_unit`), and writes its rows through
    :meth:`Experiment.save_unit`. Units: layer search (ordering, layer); singular (ordering, or
    ordering × chunk of ``singular.chunk_size`` facts); sweep
    (ordering, chunk, method, λ); batch (method, batch size, ordering: all its batches evaluated
    together); sequential (method, batch size, ordering: its batches in order, checkpointed)."""

    experiment: str
    ordering: int
    layer: int  # the edited layer (resolved: never 'best')
    method: str | None = None
    batch_size: int | None = None
    lam: float | None = None
    chunk: int | None = None  # the sweep's batch index; the singular chunk
    which: str = "model"  # the params section of the model: "model" or "second_model"
    window: int = 1  # batch, sequential: edited layers layer … layer + window − 1

    @property
    def name(self) -> str:
        """The unit's name: its part file's name, or the prefix of its parts (batch, sequential)."""
        o = self.ordering
        if self.experiment == "layer_search":
            return f"o{o}-L{self.layer:03d}"
        if self.experiment == "singular":
            return f"o{o}" if self.chunk is None else f"o{o}-c{self.chunk:05d}"
        if self.experiment == "sweep":
            return f"{self.method}-lam{_lam_name(self.lam)}-o{o}-b{self.chunk:05d}"
        w = f"-w{self.window}" if self.window > 1 else ""
        return f"{self.method}{w}-B{self.batch_size:05d}-o{o}"


def _lam_name(lam: float) -> str:
    """λ in a unit's name: ``{:g}`` (1e+04, 0.001) where that names it exactly, else every digit
    (``repr``), so that two λ of a grid never share a part file (``{:g}`` keeps six digits)."""
    short = f"{lam:g}"
    return short if float(short) == lam else repr(float(lam))


@dataclass
class UnitContext:
    """What the units of one run share inside one process: the log, the tests' ``fail_after``, and
    targets prepared for a group of units (one ordering in batch mode, one batch of the sweep) with
    the accounting that charges their time once. One group is kept at a time, so memory stays that
    of one group; a worker that meets a group again recomputes it (the same numbers)."""

    log: Callable = print
    fail_after: int | None = None
    shared: dict = field(default_factory=dict)

    def group(self, key: tuple) -> dict:
        """The group ``key`` (its experiment first), made empty if new; any other group goes."""
        if key not in self.shared:
            self.shared.clear()
            self.shared[key] = {"targets": {}, "charged": {}}
        return self.shared[key]

    def keep_only(self, experiment: str) -> None:
        """Drop groups of other experiments (a Ray worker's context outlives an experiment: a batch
        group's targets and shared block outputs, GBs on a GPU, would stay through the sequential
        units, which make no group)."""
        for key in [k for k in self.shared if k[0] != experiment]:
            del self.shared[key]


@dataclass
class UnitResult:
    """What a unit hands back to the driver: ``checks`` (scope, configuration, cases) for the
    failed-edit limit, which the driver applies across units; the executor adds where and how long
    it ran, and a worker's log lines and C0 information."""

    unit: str
    checks: list = field(default_factory=list)
    log: list = field(default_factory=list)
    cov_info: dict = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""


_UNIT_RUNNERS = {"layer_search": _layer_search_unit, "singular": _singular_edits_unit, "sweep": _sweep_unit,
                 "batch": _batch_unit, "sequential": _sequential_unit}


def run_unit(spec: UnitSpec, study: Study, exp: Experiment, uc: UnitContext) -> UnitResult:
    """Run one unit on ``study`` into ``exp`` (the same function for every executor). Its one-fact
    value graphs (``capture_steps``) are kept for its later facts of the same sizes and go with
    it, also when it fails: the next unit may edit another layer, and the next experiment's GE
    wants their memory (:func:`editlib.values.keeping_graphs`)."""
    inject_failure(spec.name)
    uc.keep_only(spec.experiment)
    with keeping_graphs():
        return _UNIT_RUNNERS[spec.experiment](spec, study, exp, uc)


def stored_checks(spec: UnitSpec, exp: Experiment, p: StudyParams) -> list[tuple[str, str, pd.DataFrame]]:
    """The failed-edit checks (:class:`UnitResult`'s) of ``spec``'s parts saved by earlier sessions,
    as the unit made them: a resumed run's limit counts them too. A sequential unit counts its own
    stored batches when it resumes (``_sequential_config``): none here."""
    e, o = spec.experiment, spec.ordering
    if e == "batch":
        return [(f"o{o}", f"batch B={spec.batch_size}:", exp.load_unit(u)) for u in unit_parts(spec, p) if exp.has_unit(u)]
    if e == "sequential" or not exp.has_unit(spec.name):
        return []
    if e == "sweep":
        scope, config = "", f"sweep λ={spec.lam:g}:"
    else:
        scope, config = ("", f"layer search, layer {spec.layer}:") if e == "layer_search" else (f"o{o}", "singular edits:")
    return [(scope, config, exp.load_unit(spec.name))]


def unit_parts(spec: UnitSpec, p: StudyParams) -> list[str]:
    """The names of the parts ``spec`` saves: its name, or a batch unit's batches, or a sequential
    unit's batches and its final evaluation."""
    if spec.experiment == "batch":
        return [f"{spec.name}-b{bi:05d}" for bi in range(len(_chunks(p.batch.total, spec.batch_size)))]
    if spec.experiment == "sequential":
        n = len(_chunks(p.sequential.total, spec.batch_size))
        return [f"{spec.name}-b{bi:05d}" for bi in range(n)] + [f"{spec.name}-final"]
    return [spec.name]


#: the files a saved part consists of (editlib.store.Experiment.save_unit), each consolidated or read
PART_SUFFIXES = (".cases.parquet", ".batches.parquet", ".unit.json")


def foreign_parts(exp: Experiment, units: Sequence[UnitSpec], p: StudyParams) -> list[str]:
    """Files under ``parts/`` that no unit of ``units`` saves (:func:`unit_parts`): consolidation
    would count them beside the units' own, e.g. a sweep λ's part under the name earlier code gave
    it, or the chunks of a singular run chunked otherwise."""
    parts = exp.root / "parts"
    if not parts.is_dir():
        return []
    mine = {exp.part_stem(u) + suffix for spec in units for u in unit_parts(spec, p) for suffix in PART_SUFFIXES}
    return sorted(f.name for f in parts.iterdir() if f.name.endswith(PART_SUFFIXES) and f.name not in mine)


def unit_done(spec: UnitSpec, exp: Experiment, p: StudyParams) -> bool:
    """Whether every part ``spec`` writes is saved (a partly saved unit runs again for the rest)."""
    if spec.experiment == "batch":
        return all(exp.has_unit(u) for u in unit_parts(spec, p))
    if spec.experiment == "sequential":
        last = len(_chunks(p.sequential.total, spec.batch_size)) - 1
        return exp.has_unit(f"{spec.name}-final") or (
            not p.sequential.eval_final and exp.has_unit(f"{spec.name}-b{last:05d}"))
    return exp.has_unit(spec.name)


def experiment_units(study: Study, name: str, layer: int | None) -> list[UnitSpec]:
    """Experiment ``name``'s independent units, in the order a serial run takes them."""
    p, w = study.params, study.which
    out: list[UnitSpec] = []
    for o in p.data.orderings:
        if name == "layer_search":
            out += [UnitSpec(name, o, l, which=w) for l in _search_layers(study)]
        elif name == "singular" and p.singular.chunk_size:
            out += [UnitSpec(name, o, layer, chunk=c, which=w)
                    for c in range(len(_chunks(p.singular.n_facts, p.singular.chunk_size)))]
        elif name == "singular":
            out.append(UnitSpec(name, o, layer, which=w))
        elif name == "sweep":
            out += [UnitSpec(name, o, layer, method=m, lam=lam, batch_size=p.sweep.batch_size, chunk=bi, which=w)
                    for bi in range(len(_chunks(p.sweep.total, p.sweep.batch_size)))
                    for m, lams in _grids(study).items() for lam in lams]
        elif name == "batch":
            out += [UnitSpec(name, o, layer, method=m, batch_size=B, which=w, window=win)
                    for m in p.batch.methods for win in batch_windows(study, m, layer)
                    for B in p.batch.batch_sizes if runs_at(m, B)]
        else:
            sec = getattr(p, name)
            out += [UnitSpec(name, o, layer, method=m, batch_size=B, which=w, window=win)
                    for m in sec.methods for win in batch_windows(study, m, layer, name)
                    for B in sec.batch_sizes if runs_at(m, B)]
    return out


RUNNERS = {"layer_search": run_layer_search, "singular": run_singular, "sweep": run_sweep,
           "batch": run_batch, "sequential": run_sequential}


# --------------------------------------------------------------------------- summaries

def summarize(cases: pd.DataFrame, by: Sequence[str] | None = None, *, formatted: bool = False) -> pd.DataFrame:
    """The paper's tables from a cases frame: ``mean(std)`` per metric ×100, S, GE per group.
    Default groups: every labelling column present (method, layer, lam, batch_size, eval). With
    several data orderings the formatted table adds "S over orderings" (mean ± std of per-ordering S)
    beside the S of the pooled cases."""
    if by is None:
        by = [c for c in ("method", "layer", "lam", "batch_size", "eval") if c in cases.columns
              and cases[c].nunique(dropna=False) > 1] or None
    s = summarize_cases(cases, by=by)
    if not formatted:
        return s
    out = format_summary(s)
    col = s_over_orderings(cases, by)  # several orderings: beside the pooled S (docs/methods.md, error bars)
    if col is not None:
        out["S over orderings"] = col
    return out
