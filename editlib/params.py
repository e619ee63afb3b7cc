"""Study parameters: YAML files in ``params/`` validated into dataclasses before any model loads.

A params file has the sections below (every key a user can set is named in ``params/tiny.yaml``).
``extends: other.yaml`` deep-merges the file over another one (relative to its folder), so a
paper-scale or smoke file names only what differs. :func:`resolve` also deep-merges sections given
directly (how notebooks receive papermill's ``-f base.yaml -f override.yaml`` injections) and
``key.sub=value`` overrides (the command line's ``--set``).
"""
from __future__ import annotations

import copy
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import yaml

from .counterfact import FACT_LISTS
from .editing import METHODS, EditHParams
from .decode import DECODE_MODES
from .generation import GEN_TEXTS
from .metrics import check_also_alignment
from .scoring import ALIGNMENTS

SECTIONS = ("name", "model", "second_model", "data", "covariance", "evaluation", "hparams",
            "layer_search", "singular", "sweep", "batch", "sequential", "beyond", "executor", "results_dir",
            "figures_dir")
#: the sections that hold one value rather than a mapping of keys
SCALAR_SECTIONS = ("name", "results_dir", "figures_dir")


class ParamsError(ValueError):
    """A params file or override is invalid (the message names the key)."""


#: keys of a ``tiny:`` build spec (editlib.tiny.ensure_tiny); max_steps caps the training steps
TINY_KEYS = ("source", "n_records", "n_layers", "seed", "max_steps")


@dataclass(frozen=True)
class ModelParams:
    """``id``: HF hub id or local directory. ``tiny``: an on-demand miniature instead (source,
    n_records, n_layers, seed, optional max_steps), built once into the cache."""
    id: str | None = "models/tiny-world"
    label: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    revision: str | None = None  # a hub id's commit, branch or tag (null: main); the commit loaded is in the provenance
    tiny: dict | None = None
    tf32: bool = False  # CUDA only: TF32 matmuls (faster, ~1e-3 relative); off as in the reference
    deterministic: bool = False  # CUDA: deterministic kernels where torch has them (bit-exact reruns and resumes; slower)


@dataclass(frozen=True)
class DataParams:
    """``source``: "model" (the records a miniature was trained on), "counterfact" or "world"."""
    source: str = "model"
    counterfact_path: str | None = None
    world_records: int = 1000
    world_seed: int = 0
    ordering_seed: int = 37
    orderings: tuple[int, ...] = (0,)
    # which facts, in which order (editlib.counterfact): "seeded" (editlib's unique-subject shuffles
    # of ordering_seed) or "reference" (the paper's: the reference code's index file, SPEC §5;
    # source counterfact only; ordering i = its sample "i")
    fact_list: str = "seeded"
    fact_list_path: str | None = None  # reference: the index file (else EDITLIB_FACT_LIST, the cache, a download)


@dataclass(frozen=True)
class CovParams:
    """C0 corpus (SPEC §4): kind "records" (the model's own fact text, offline), "text_file" or
    "hf_dataset" (e.g. wikitext / a Wikipedia parquet dump)."""
    kind: str = "records"
    name: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    path: str | None = None
    n_samples: int | None = None
    max_length: int | None = None
    dtype: str = "float64"
    batch_size: int = 16
    max_batch_tokens: int | None = None  # padded tokens per forward (the reference: 3 × max positions)
    data_files: str | None = None  # hf_dataset: local files for a generic builder ("parquet", "text")
    group: str | None = None  # "wikitext_articles": wikitext line rows joined into articles
    layers_per_pass: int | None = None  # C0 accumulators per pass (null: as many as half the free memory holds)
    fast_gram: bool = False  # 16-bit models: each batch's Σkkᵀ in float32 (exact products; TF32 tensor cores on CUDA), summed in dtype


@dataclass(frozen=True)
class EvalParams:
    alignment: str = "correct"
    also_alignment: str | None = None  # the other alignment scored too, into ES@<it> ... (the paper's reading beside the correct one, from one run)
    generation: bool = False
    gen_max_len: int = 100
    gen_seed: int = 0
    gen_batch_size: int = 64  # prompts sampled together for GE (per-prompt random streams: texts depend on it only through rounding)
    batch_size: int = 128
    max_failed_fraction: float = 0.25  # a configuration stops once more of its edits fail (checked from 16 edits on)
    gen_kv_gb: float | None = None  # GE: rows per decode batch capped so that their KV cache fits in this many GB (null: no cap)
    batched_edits: bool = True  # independent edits evaluated together through per-row low-rank hooks (false: edit, evaluate, restore one at a time)
    share_below_gb: float = 2.0  # batched path: blocks below the edited layer run once per scoring batch for all methods / λ, keeping at most this many GB of their outputs (0: off; same numbers either way)
    share_values_gb: float = 2.0  # values kept in <results_dir>/_values (at most this many GB) and read back by every experiment that optimises the same chunk of facts on the same weights (unedited, or the same edits before it; 0: off; same numbers either way)
    gen_text: str = "clean"  # GE texts: clean (special tokens skipped) | reference (as the reference decodes them: Llama-3 keeps <|begin_of_text|>)
    gen_decode: str = "transformers"  # GE decode steps: transformers (the model's forward) | static (editlib.decode: same arithmetic, KV buffers written in place) | graph (CUDA graphs; texts move at rounding) | compiled (torch.compile'd step, captured on CUDA; texts move at rounding)


@dataclass(frozen=True)
class LayerSearchParams:
    n_facts: int = 100
    layers: Any = "all"
    methods: tuple[str, ...] = ("rome", "memit")
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


@dataclass(frozen=True)
class SingularParams:
    n_facts: int = 100
    layer: Any = "best"
    methods: tuple[str, ...] = ("rome", "memit")
    chunk_size: int | None = None  # facts per unit of work (null: one unit per ordering); for a cluster
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


@dataclass(frozen=True)
class SweepParams:
    batch_size: int = 256
    total: int = 256
    layer: Any = "best"
    memit_lambdas: tuple[float, ...] = (1, 10, 100, 1000, 10000, 50000, 100000, 500000, 1000000)
    emmet_lambdas: tuple[float, ...] = (0, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


@dataclass(frozen=True)
class BatchParams:
    total: int = 256
    batch_sizes: tuple[int, ...] = (16, 64, 256)
    methods: tuple[str, ...] = ("memit", "emmet")
    layer: Any = "best"
    # edited-layer windows: 1 = the chosen layer alone; w = it and the next w − 1 layers, the
    # residual spread over them (MEMIT's multi-layer update; methods that edit several layers only)
    windows: tuple[int, ...] = (1,)
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


@dataclass(frozen=True)
class SequentialParams:
    total: int = 256
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    methods: tuple[str, ...] = ("memit", "emmet")
    layer: Any = "best"
    eval_final: bool = True
    forgetting_every: int | None = None   # facts edited between evaluations of all facts so far (null: off)
    degradation_every: int | None = None  # facts edited between degradation measurements (null: off; editlib.degradation)
    heldout_facts: int = 64               # held-out known facts for them (unedited, outside every NS set)
    lm_eval: dict | None = None           # optional lm-eval downstream tasks per checkpoint (editlib.lmeval; off: null)
    windows: tuple[int, ...] = (1,)       # as batch.windows: also MEMIT over the chosen layer and the next w − 1
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}
    # evaluate up to this many consecutive batches in one call, each at its own batch's weights
    # (per-row low-rank corrections, editlib.protocols._evaluate_pending); 1 = right after each
    # batch, as the reference. Same scores up to float rounding; fuller forward passes and GE steps.
    eval_group: int = 1


@dataclass(frozen=True)
class BeyondParams:
    """Notebook 07 (beyond the paper, :mod:`editlib.beyond`): the batch and sequential protocols
    for every editor over several seeded orderings (error bars), with degradation. ``batch`` and
    ``sequential`` are overrides deep-merged over the study's own sections; the runs are stored
    under ``results/<name>-beyond/`` so they never mix with notebooks 04-05's."""
    methods: tuple[str, ...] = ("memit", "emmet", "rome", "alphaedit", "encore")
    orderings: tuple[int, ...] = (0, 1, 2)
    layer: Any = "best"  # best = the study's own layer search (notebook 01), or an integer
    batch: dict | None = None       # overrides of the batch section, e.g. {total: 64, batch_sizes: [1, 4, 16, 64]}
    sequential: dict | None = None  # overrides of the sequential section


#: where the independent units of an experiment run (editlib.executor)
EXECUTOR_KINDS = ("local", "ray")


@dataclass(frozen=True)
class ExecutorParams:
    """Where an experiment's independent units run: ``local`` (this process, one after another: the
    default) or ``ray`` (one Ray task per unit, on workers that load the model once; ``pip install -e
    '.[ray]'`` in the checkout). Results do not depend on it (it is not part of an experiment's identity)."""
    kind: str = "local"
    address: str = "auto"  # ray: auto (the running cluster, else a new local one), local (always a new one), ray://host:port
    cpus_per_unit: int = 1  # CPU cores (and torch threads) per unit
    gpus_per_unit: float | None = None  # GPUs per unit (null: 1 when the model's device is cuda, else 0)
    workers: int | None = None  # at most this many units at once (null: as many as the cluster fits)
    retries: int = 1  # a failed unit (exception, lost worker) runs again this many times, then is recorded as failed


@dataclass(frozen=True)
class StudyParams:
    name: str
    model: ModelParams
    data: DataParams
    covariance: CovParams
    evaluation: EvalParams
    hparams: dict  # method -> EditHParams (layers are set per experiment)
    layer_search: LayerSearchParams
    singular: SingularParams
    sweep: SweepParams
    batch: BatchParams
    sequential: SequentialParams
    second_model: ModelParams | None = None
    beyond: BeyondParams = field(default_factory=BeyondParams)
    executor: ExecutorParams = field(default_factory=ExecutorParams)
    results_dir: str = "results"
    figures_dir: str = "figures"
    source: str | None = field(default=None, compare=False)

    def value_hparams(self, experiments: Sequence[str] = ("layer_search", "singular", "sweep", "batch", "sequential")
                      ) -> dict:
        """Each experiment's value hyperparameters as its methods resolve them (``"section.method"
        -> ValueHParams``; the sweep runs MEMIT's and EMMET's λ), section overrides included."""
        out = {}
        for sec in experiments:
            for m in getattr(getattr(self, sec), "methods", ("memit", "emmet")):
                if m in self.hparams:
                    out[f"{sec}.{m}"] = self.method_hparams(m, 0, sec).values
        return out

    def method_hparams(self, method: str, layer: int, section: str | None = None, **over) -> EditHParams:
        """The method's hyperparameters at ``layer``: ``hparams`` (common + method), then the
        experiment section's own ``hparams`` overrides (e.g. the paper's MEMIT λ = 1 for singular
        edits but 5e4 for batches), then ``over``."""
        if method not in self.hparams:
            raise ParamsError(f"hparams has no section for method {method!r}")
        d = self.hparams[method].to_dict()
        if section is not None:
            sec = getattr(self, section).hparams or {}
            d = deep_merge(d, {**(sec.get("common") or {}), **(sec.get(method) or {})})
        d.update(layers=(layer,), **over)
        try:
            return EditHParams.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ParamsError(f"{section or 'hparams'}.hparams.{method}: {e}") from e


# --------------------------------------------------------------------------- loading

def deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def find_params_file(name_or_path: str | os.PathLike) -> Path:
    """A path (from the working directory, else from the repository root, as every relative path
    of a params file), or a bare name in the repo's ``params/`` folder (``tiny`` → params/tiny.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    root = Path(__file__).resolve().parent.parent
    repo_params = root / "params"
    for cand in (root / p, repo_params / str(name_or_path), repo_params / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise ParamsError(f"params file not found: {name_or_path} (looked in the working directory, {root} "
                      f"and {repo_params})")


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Safe-load a params file and resolve ``extends`` chains."""
    p = find_params_file(path).resolve()
    if p in _seen:
        raise ParamsError(f"params files extend each other in a cycle: {p}")
    with open(p, encoding="utf-8") as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ParamsError(f"{p} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ParamsError(f"{p} must hold a mapping of sections")
    parent = d.pop("extends", None)
    if parent:
        near = [p.parent / Path(parent).expanduser(), p.parent / f"{parent}.yaml"]  # next to this file first
        base = read_yaml(next((c for c in near if c.is_file()), parent), _seen + (p,))
        d = relabel(base, deep_merge(base, d), _labelled(d))
    return d


MODEL_SECTIONS = ("model", "second_model")


def _labelled(over: Mapping) -> set[str]:
    """The model sections whose label ``over`` (a params mapping) gives explicitly."""
    return {s for s in MODEL_SECTIONS if isinstance(over.get(s), Mapping) and "label" in over[s]}


def relabel(before: Mapping, after: Mapping, labelled: set[str]) -> dict:
    """``after`` with the label of a model section cleared where its model (id or tiny spec) differs
    from ``before``'s and no label was given with it: a label names one model (captions, result
    folders), so another model takes its folder's name instead of the old model's label."""
    out = dict(after)
    for s in MODEL_SECTIONS:
        b, a = before.get(s), after.get(s)
        if (isinstance(b, Mapping) and isinstance(a, Mapping) and s not in labelled
                and (a.get("id"), a.get("tiny")) != (b.get("id"), b.get("tiny"))):
            out[s] = {**a, "label": None}
    return out


def _parse_scalar(text: str, key: str = "?") -> Any:
    """A ``--set`` value parsed as YAML; a syntax error names the key (one line, no YAML dump)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ParamsError(f"override {key}={text!r}: the value is not valid YAML ({why})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` → (key, YAML-parsed value); ParamsError naming the key otherwise."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like key.sub=value")
    key, val = text.split("=", 1)
    if not key.strip():
        raise ParamsError(f"override {text!r} has no key before '='")
    return key.strip(), _parse_scalar(val, key.strip())


def apply_sets(d: dict, sets: list[str] | list[tuple[str, Any]] | Mapping[str, Any]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars / lists), in order; an item
    may also come parsed, as a (key, value) pair."""
    out = copy.deepcopy(d)
    items = sets.items() if isinstance(sets, Mapping) else [s if isinstance(s, tuple) else parse_override(s)
                                                            for s in sets]
    for key, val in items:
        parts = key.split(".")
        if parts[0] not in SECTIONS:
            raise ParamsError(f"unknown params section {parts[0]!r} in override {key!r}; known: {SECTIONS}")
        cur = out
        for p in parts[:-1]:
            if cur.get(p) is None:  # a missing or nulled section (e.g. `second_model: null`) is created
                cur[p] = {}
            cur = cur[p]
            if not isinstance(cur, dict):
                raise ParamsError(f"override {key!r}: {p!r} is not a section")
        cur[parts[-1]] = val
    return out


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          dict: "a mapping", type(None): "null"}


def _describe(hint: Any) -> str:
    """A field's type in words, for messages ("a list of integers or null")."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a dataclass field's annotation (bools are not numbers)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        ok = (int,) if hint is int else (int, float)
        return isinstance(value, ok) and not isinstance(value, bool)
    if hint is dict:
        return isinstance(value, Mapping)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_types(cls, kw: Mapping, section: str) -> None:
    """Every given key has its field's type: ``n_facts: abc`` fails here, naming the key."""
    hints = typing.get_type_hints(cls)
    for k, v in kw.items():
        if not _type_ok(v, hints[k]):
            hint = ("" if not (isinstance(v, tuple) and any(isinstance(x, str) for x in v)) else
                    " (YAML reads 1e-3 as text: write 1.0e-3)")
            raise ParamsError(f"{section}.{k} must be {_describe(hints[k])}, got {_show(v)}{hint}")


def _show(v: Any) -> str:
    return repr(list(v) if isinstance(v, tuple) else v)


def _build(cls, raw: Any, section: str):
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"section {section!r} must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ParamsError(f"unknown key(s) in section {section!r}: {unknown}; known: {sorted(known)}")
    kw = {}
    for k, v in raw.items():
        if isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    _check_types(cls, kw, section)
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"section {section!r}: {e}") from e


def _check_methods(methods, section):
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ParamsError(f"{section}.methods has unknown method(s) {bad}; known: {list(METHODS)}")


#: counts that must be at least 1 (0 would load the model and then edit nothing)
#: (the batch and sequential sections' own sizes: _check_runs)
_POSITIVE = (("layer_search", "n_facts"), ("singular", "n_facts"), ("sweep", "total"), ("sweep", "batch_size"),
             ("data", "world_records"), ("evaluation", "batch_size"), ("evaluation", "gen_max_len"),
             ("evaluation", "gen_batch_size"),
             ("covariance", "batch_size"))
_NON_EMPTY = (("layer_search", "methods"), ("singular", "methods"), ("batch", "methods"),
              ("sequential", "methods"), ("data", "orderings"))


def _check_sizes(sp: StudyParams) -> None:
    """Sizes, layers and orderings that no run could use fail here, before any model loads."""
    for sec, key in _POSITIVE:
        v = getattr(getattr(sp, sec), key)
        if v < 1:
            raise ParamsError(f"{sec}.{key} must be at least 1, got {v}")
    for sec, key in _NON_EMPTY:
        if not getattr(getattr(sp, sec), key):
            raise ParamsError(f"{sec}.{key} must not be empty")
    kv = sp.evaluation.gen_kv_gb
    if kv is not None and not (isinstance(kv, (int, float)) and not isinstance(kv, bool) and 0 < kv < math.inf):
        raise ParamsError(f"evaluation.gen_kv_gb must be a positive number of GB or null, got {kv!r}")
    for key in ("share_below_gb", "share_values_gb"):
        sb = getattr(sp.evaluation, key)
        if isinstance(sb, bool) or not isinstance(sb, (int, float)) or not 0 <= sb < math.inf:
            raise ParamsError(f"evaluation.{key} must be a number of GB >= 0 (0: off), got {sb!r}")
    if any(o < 0 for o in sp.data.orderings) or len(set(sp.data.orderings)) != len(sp.data.orderings):
        raise ParamsError(f"data.orderings must be distinct integers >= 0, got {list(sp.data.orderings)}")
    mf = sp.evaluation.max_failed_fraction
    if isinstance(mf, bool) or not isinstance(mf, (int, float)) or not mf >= 0:
        raise ParamsError(f"evaluation.max_failed_fraction must be a number >= 0 (1 or more: never stop), "
                          f"got {_show(mf)}")
    for sec in ("batch", "sequential"):
        wins = getattr(sp, sec).windows
        if not wins or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in wins):
            raise ParamsError(f"{sec}.windows must be a non-empty list of integers >= 1, got {_show(wins)}")
    if sp.singular.chunk_size is not None and sp.singular.chunk_size < 1:
        raise ParamsError(f"singular.chunk_size must be null or at least 1, got {sp.singular.chunk_size}")
    for sec in ("singular", "sweep", "batch", "sequential"):
        layer = getattr(sp, sec).layer
        if layer != "best" and not _is_layer(layer):
            raise ParamsError(f"{sec}.layer: layer(s) [{layer!r}] must be an integer >= 0 or 'best'")
    _check_covariance(sp.covariance)
    _check_executor(sp.executor)
    for sec in ("model", "second_model"):
        _check_tiny(getattr(sp, sec), sec)
        _check_placement(getattr(sp, sec), sec)
    if not sp.name or not isinstance(sp.name, str) or sp.name in (".", "..") or any(c in sp.name for c in "/\\"):
        raise ParamsError(f"name must be a plain folder name (it names results/<name>/ and figures/<name>/), "
                          f"got {_show(sp.name)}")
    layers = sp.layer_search.layers
    if layers != "all" and (not isinstance(layers, tuple) or not layers):
        raise ParamsError(f"layer_search.layers must be 'all' or a non-empty list of layers, got {_show(layers)}")
    bad = [l for l in layers if not _is_layer(l)] if layers != "all" else []
    if bad:
        raise ParamsError(f"layer_search.layers: layer(s) {bad} must be integers >= 0")


def _check_runs(e: BatchParams | SequentialParams, name: str) -> None:
    """A batch or sequential section (``name`` in messages: "batch", "beyond.sequential", ...):
    its sizes, ROME's batch size 1, and a sequential section's measurement intervals and lm_eval."""
    if e.total < 1:
        raise ParamsError(f"{name}.total must be at least 1, got {e.total}")
    if not e.batch_sizes:
        raise ParamsError(f"{name}.batch_sizes must not be empty")
    bad = [b for b in e.batch_sizes if not isinstance(b, int) or b < 1 or b > e.total]
    if bad:
        raise ParamsError(f"{name}.batch_sizes {bad} must be integers between 1 and {name}.total={e.total}")
    if "rome" in e.methods and 1 not in e.batch_sizes:
        raise ParamsError(f"{name}.methods has rome, which edits one fact at a time (it runs at batch size 1 "
                          f"only), but {name}.batch_sizes {_show(e.batch_sizes)} has no 1")
    if not isinstance(e, SequentialParams):
        return
    for key in ("degradation_every", "forgetting_every"):
        v = getattr(e, key)
        if v is not None and v < 1:
            raise ParamsError(f"{name}.{key} must be null or at least 1, got {v}")
    if e.heldout_facts < 1:
        raise ParamsError(f"{name}.heldout_facts must be at least 1, got {e.heldout_facts}")
    if not isinstance(e.eval_group, int) or isinstance(e.eval_group, bool) or e.eval_group < 1:
        raise ParamsError(f"{name}.eval_group must be an integer >= 1 (1: evaluate right after each batch), "
                          f"got {_show(e.eval_group)}")
    from .lmeval import parse as parse_lm_eval
    parse_lm_eval(e.lm_eval, f"{name}.lm_eval")


def _check_section_hparams(sp: StudyParams, sec: str, name: str) -> None:
    """Section ``sec``'s per-method ``hparams`` overrides: known methods, values every method accepts."""
    extra = getattr(sp, sec).hparams or {}
    if not isinstance(extra, Mapping):
        raise ParamsError(f"{name}.hparams must be a mapping of method -> overrides")
    bad = sorted(set(extra) - set(METHODS) - {"common"})
    if bad:
        raise ParamsError(f"unknown method section(s) {bad} in {name}.hparams")
    for m in METHODS:
        sp.method_hparams(m, 0, sec)  # validates every override now, before any model loads


def beyond_sections(sp: StudyParams) -> dict[str, Any]:
    """The batch and sequential sections of the beyond-the-paper runs: the study's own, with
    ``beyond.methods``, ``beyond.layer`` and one layer window, then ``beyond.batch`` /
    ``beyond.sequential`` deep-merged over them (validated like any section)."""
    b = sp.beyond
    out = {}
    for sec, cls in (("batch", BatchParams), ("sequential", SequentialParams)):
        base = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(getattr(sp, sec)).items()}
        base.update(methods=list(b.methods), layer=b.layer, windows=[1])
        if sec == "sequential":  # lm-eval passes are costly: only when beyond.sequential asks for them
            base["lm_eval"] = None
        over = getattr(b, sec) or {}
        if not isinstance(over, Mapping):
            raise ParamsError(f"beyond.{sec} must be a mapping of {sec} keys, got {type(over).__name__}")
        for key, instead in (("methods", "beyond.methods"), ("layer", "beyond.layer"),
                             ("windows", "one layer (notebook 07 compares editors)")):
            if key in over:
                raise ParamsError(f"beyond.{sec}.{key} is not used: notebook 07's runs take {instead}")
        out[sec] = _build(cls, deep_merge(base, over), f"beyond.{sec}")
    return out


def check_beyond(sp: StudyParams) -> None:
    """The beyond section and the sections it derives (notebook 07), checked like any section.
    A params file without a ``beyond:`` section is checked only when notebook 07 uses it (its
    defaults may not fit the file's own sizes, and notebooks 01-06 never read it)."""
    b = sp.beyond
    _check_methods(b.methods, "beyond")
    if not b.methods or not b.orderings:
        raise ParamsError("beyond.methods and beyond.orderings must not be empty")
    if any(not _is_layer(o) for o in b.orderings) or len(set(b.orderings)) != len(b.orderings):
        raise ParamsError(f"beyond.orderings must be distinct integers >= 0, got {_show(b.orderings)}")
    if b.layer != "best" and not _is_layer(b.layer):
        raise ParamsError(f"beyond.layer must be an integer >= 0 or 'best', got {b.layer!r}")
    secs = beyond_sections(sp)
    derived = replace(sp, **secs)
    for name, e in secs.items():
        _check_runs(e, f"beyond.{name}")
        _check_section_hparams(derived, name, f"beyond.{name}")


def _is_layer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_covariance(cp: CovParams) -> None:
    """The C0 corpus as the stats module will build it (kind, sample budget, lengths)."""
    from .stats import DTYPES, CorpusSpec

    try:
        CorpusSpec(kind=cp.kind, name=cp.name, config=cp.config, split=cp.split, text_field=cp.text_field,
                   path=cp.path, n_samples=cp.n_samples, max_length=cp.max_length,
                   data_files=cp.data_files, group=cp.group)
    except ValueError as e:
        raise ParamsError(f"covariance: {e}") from None
    if cp.dtype not in DTYPES:
        raise ParamsError(f"covariance.dtype must be one of {', '.join(DTYPES)}, got {cp.dtype!r}")
    for key in ("max_batch_tokens", "layers_per_pass"):
        v = getattr(cp, key)
        if v is not None and v < 1:
            raise ParamsError(f"covariance.{key} must be null or at least 1, got {v}")
    if cp.max_batch_tokens is not None and cp.max_length is not None and cp.max_batch_tokens < cp.max_length:
        raise ParamsError(f"covariance.max_batch_tokens ({cp.max_batch_tokens}) is below covariance.max_length "
                          f"({cp.max_length}): a text of that length alone would pass it; raise it or lower max_length")


def _check_executor(ep: ExecutorParams) -> None:
    """The executor section: a known kind and address form, resources that a unit can hold."""
    if ep.kind not in EXECUTOR_KINDS:
        raise ParamsError(f"executor.kind must be one of {', '.join(EXECUTOR_KINDS)}, got {ep.kind!r}")
    if ep.address not in ("auto", "local") and not ep.address.startswith("ray://") and ":" not in ep.address:
        raise ParamsError(f"executor.address must be auto, local, ray://host:port or host:port, got {ep.address!r}")
    if ep.cpus_per_unit < 1:
        raise ParamsError(f"executor.cpus_per_unit must be at least 1, got {ep.cpus_per_unit}")
    if ep.gpus_per_unit is not None and ep.gpus_per_unit < 0:
        raise ParamsError(f"executor.gpus_per_unit must be null or >= 0, got {ep.gpus_per_unit}")
    if ep.workers is not None and ep.workers < 1:
        raise ParamsError(f"executor.workers must be null or at least 1, got {ep.workers}")
    if ep.retries < 0:
        raise ParamsError(f"executor.retries must be >= 0, got {ep.retries}")


def _check_placement(mp: ModelParams | None, sec: str) -> None:
    """A known dtype and a device torch can name (cpu, cuda, cuda:1, mps, ...)."""
    if mp is None:
        return
    from .models import DTYPES

    if mp.dtype not in DTYPES:
        raise ParamsError(f"{sec}.dtype must be one of {', '.join(DTYPES)}, got {_show(mp.dtype)}")
    try:
        import torch
        torch.device(mp.device)
    except (RuntimeError, TypeError):
        raise ParamsError(f"{sec}.device must be a torch device such as cpu, cuda or cuda:0, got {_show(mp.device)}") from None


def _check_tiny(mp: ModelParams | None, sec: str) -> None:
    """A ``tiny`` build spec: a known source and positive integer sizes."""
    if mp is None or not mp.tiny:
        return
    if not isinstance(mp.tiny, Mapping):
        raise ParamsError(f"{sec}.tiny must be a mapping ({', '.join(TINY_KEYS)}) or null")
    src = mp.tiny.get("source", "world")
    if src not in ("world", "counterfact"):
        raise ParamsError(f"{sec}.tiny.source must be 'world' or 'counterfact', got {src!r}")
    for key in ("n_records", "n_layers", "seed", "max_steps"):
        v = mp.tiny.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "seed" else 1)):
            raise ParamsError(f"{sec}.tiny.{key} must be an integer >= {0 if key == 'seed' else 1}, got {v!r}")


def from_dict(d: Mapping, source: str | None = None) -> StudyParams:
    """Validate a params mapping (unknown sections/keys, bad values -> ParamsError naming them)."""
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"unknown params section(s) {unknown}; known: {list(SECTIONS)}")
    flat = [k for k in SECTIONS if k not in SCALAR_SECTIONS and d.get(k) is not None and not isinstance(d[k], Mapping)]
    if flat:
        raise ParamsError(f"params section {flat[0]!r} must be a mapping of keys (or null), got "
                          f"{type(d[flat[0]]).__name__} {d[flat[0]]!r}")
    if not d.get("name"):
        raise ParamsError("params need a 'name' (used for results/<name> and figures/<name>)")
    hp_raw = d.get("hparams") or {}
    common = dict(hp_raw.get("common") or {})
    for sec, over in [("hparams", hp_raw)] + [(f"{s}.hparams", (d.get(s) or {}).get("hparams") or {})
                                               for s in ("layer_search", "singular", "sweep", "batch", "sequential")]:
        for m, keys in (over.items() if isinstance(over, Mapping) else ()):
            fixed = sorted({"layers", "method"} & set(keys or {})) if isinstance(keys, Mapping) else []
            if fixed:  # each experiment sets them: its layer (and windows) and the method it runs
                raise ParamsError(f"{sec}.{m}: {fixed} cannot be set here; the layer comes from the experiment "
                                  "sections' layer (and windows), the method from the section name")
    hparams = {}
    for m in METHODS:
        try:
            hparams[m] = EditHParams.from_dict({**common, **(hp_raw.get(m) or {}), "method": m})
        except (TypeError, ValueError) as e:
            try:  # name the section the bad value was written in: the method's own, else common
                EditHParams.from_dict({**common, "method": m})
                where = f"hparams.{m}"
            except (TypeError, ValueError):
                where = "hparams.common"
            raise ParamsError(f"{where}: {e}") from e
    bad_hp = sorted(set(hp_raw) - set(METHODS) - {"common"})
    if bad_hp:
        raise ParamsError(f"unknown hparams section(s) {bad_hp}; known: common, {', '.join(METHODS)}")
    main_model = _build(ModelParams, d.get("model"), "model")
    sp = StudyParams(
        name=str(d["name"]),
        model=main_model,
        second_model=_build(ModelParams, _as_model(d["second_model"], main_model), "second_model")
        if d.get("second_model") else None,
        data=_build(DataParams, d.get("data"), "data"),
        covariance=_build(CovParams, d.get("covariance"), "covariance"),
        evaluation=_build(EvalParams, d.get("evaluation"), "evaluation"),
        hparams=hparams,
        layer_search=_build(LayerSearchParams, d.get("layer_search"), "layer_search"),
        singular=_build(SingularParams, d.get("singular"), "singular"),
        sweep=_build(SweepParams, d.get("sweep"), "sweep"),
        batch=_build(BatchParams, d.get("batch"), "batch"),
        sequential=_build(SequentialParams, d.get("sequential"), "sequential"),
        beyond=_build(BeyondParams, d.get("beyond"), "beyond"),
        executor=_build(ExecutorParams, d.get("executor"), "executor"),
        results_dir=str(d.get("results_dir", "results")),
        figures_dir=str(d.get("figures_dir", "figures")),
        source=source,
    )
    _check_sizes(sp)
    for sec in ("layer_search", "singular", "batch", "sequential"):
        _check_methods(getattr(sp, sec).methods, sec)
    for sec in ("layer_search", "singular", "sweep", "batch", "sequential"):
        _check_section_hparams(sp, sec, sec)
    if sp.evaluation.alignment not in ALIGNMENTS:
        raise ParamsError(f"evaluation.alignment must be 'correct' or 'reference', got {sp.evaluation.alignment!r}")
    try:
        check_also_alignment(sp.evaluation.alignment, sp.evaluation.also_alignment)
    except ValueError as e:
        raise ParamsError(f"evaluation.{e} (or null)") from None
    if sp.evaluation.gen_decode not in DECODE_MODES:
        raise ParamsError(f"evaluation.gen_decode must be one of {', '.join(DECODE_MODES)}, "
                          f"got {_show(sp.evaluation.gen_decode)}")
    if sp.evaluation.gen_text not in GEN_TEXTS:
        raise ParamsError(f"evaluation.gen_text must be 'clean' or 'reference', got {_show(sp.evaluation.gen_text)}")
    if sp.data.source not in ("model", "counterfact", "world"):
        raise ParamsError(f"data.source must be 'model', 'counterfact' or 'world', got {sp.data.source!r}")
    if sp.data.fact_list not in FACT_LISTS:
        raise ParamsError(f"data.fact_list must be 'seeded' or 'reference', got {_show(sp.data.fact_list)}")
    if sp.data.fact_list == "reference" and sp.data.source != "counterfact":
        raise ParamsError(f"data.fact_list 'reference' indexes CounterFact's case_ids: it needs data.source "
                          f"counterfact, not {sp.data.source!r}")
    for sec in ("batch", "sequential"):
        _check_runs(getattr(sp, sec), sec)
    if sp.sweep.batch_size > sp.sweep.total:
        raise ParamsError(f"sweep.batch_size={sp.sweep.batch_size} is larger than sweep.total={sp.sweep.total}")
    if d.get("beyond"):
        check_beyond(sp)
    if sp.model.id is None and sp.model.tiny is None:
        raise ParamsError("model needs an 'id' (hub id or directory) or a 'tiny' build spec")
    for sec in ("model", "second_model"):
        mp = getattr(sp, sec)
        bad = sorted(set((mp.tiny or {}) if mp else {}) - set(TINY_KEYS))
        if bad:
            raise ParamsError(f"unknown key(s) {bad} in {sec}.tiny; known: {', '.join(TINY_KEYS)}")
    return sp


#: second_model keys that, left out or null, take the main model's value: one `--set model.dtype=bfloat16`
#: (or tf32, or device) then runs Figure 6's second model the same way, as the cost estimate assumes
INHERITED_MODEL_KEYS = ("dtype", "device", "tf32", "deterministic")


def _as_model(raw: Mapping, model: ModelParams) -> dict:
    """The second_model section with its unset :data:`INHERITED_MODEL_KEYS` taken from ``model``."""
    if not isinstance(raw, Mapping):
        return raw  # _build names the section in its error
    out = dict(raw)
    for k in INHERITED_MODEL_KEYS:
        if out.get(k) is None:
            out[k] = getattr(model, k)
    return out


def resolve(params_file: str | os.PathLike, *, overrides: Mapping | list | None = None,
            sections: Mapping[str, Any] | None = None) -> StudyParams:
    """Load ``params_file``, deep-merge ``sections`` (papermill injections; a None section replaces
    the file's with null, e.g. ``second_model: null``: none), then apply dotted ``overrides``;
    validate."""
    d = read_yaml(params_file)
    for k, v in (sections or {}).items():
        if k not in SECTIONS:
            raise ParamsError(f"unknown params section {k!r}")
        d = relabel(d, {**d, k: None} if v is None else deep_merge(d, {k: v}), _labelled({k: v}))
    if overrides:
        items = list(overrides.items()) if isinstance(overrides, Mapping) else [parse_override(s) for s in overrides]
        given = {k.split(".")[0] for k, v in items if k.endswith(".label") or isinstance(v, Mapping) and "label" in v}
        d = relabel(d, apply_sets(d, items), given)
    from .paths import anchor_params  # relative paths are relative to the repository root
    return anchor_params(from_dict(d, source=str(find_params_file(params_file))))
