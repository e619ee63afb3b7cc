"""Study parameters: YAML files in ``params/`` validated into dataclasses before any model loads.

A params file has the sections below (every key a user can set is named in ``params/tiny.yaml``).
``extends: other.yaml`` deep-merges the file over another one (relative to its folder), so a
paper-scale or smoke file names only what differs. :func:`resolve` also deep-merges sections given
directly (how notebooks receive papermill's ``-f base.yaml -f override.yaml`` injections) and
``key.sub=value`` overrides (the command line's ``--set``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .editing import METHODS, EditHParams

SECTIONS = ("name", "model", "second_model", "data", "covariance", "evaluation", "hparams",
            "layer_search", "singular", "sweep", "batch", "sequential", "results_dir", "figures_dir")


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
    tiny: dict | None = None
    tf32: bool = False  # CUDA only: TF32 matmuls (faster, ~1e-3 relative); off as in the reference


@dataclass(frozen=True)
class DataParams:
    """``source``: "model" (the records a miniature was trained on), "counterfact" or "world"."""
    source: str = "model"
    counterfact_path: str | None = None
    world_records: int = 1000
    world_seed: int = 0
    ordering_seed: int = 37
    orderings: tuple[int, ...] = (0,)


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


@dataclass(frozen=True)
class EvalParams:
    alignment: str = "correct"
    generation: bool = False
    gen_max_len: int = 100
    gen_seed: int = 0
    batch_size: int = 128
    max_failed_fraction: float = 0.25  # a configuration stops once more of its edits fail (checked from 16 edits on)
    batched_edits: bool = True  # independent edits evaluated together through per-row low-rank hooks (false: edit, evaluate, restore one at a time)


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
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


@dataclass(frozen=True)
class SequentialParams:
    total: int = 256
    batch_sizes: tuple[int, ...] = (1, 16, 64, 256)
    methods: tuple[str, ...] = ("memit", "emmet")
    layer: Any = "best"
    eval_final: bool = True
    forgetting_every: int | None = None
    hparams: dict | None = None  # per-method overrides for this experiment, e.g. {memit: {mom2_update_weight: 100}}


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
    results_dir: str = "results"
    figures_dir: str = "figures"
    source: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hparams"] = {m: hp.to_dict() for m, hp in self.hparams.items()}
        d.pop("source", None)
        return d

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
    """A path, or a bare name looked up in the repo's ``params/`` folder (``tiny`` → params/tiny.yaml)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    repo_params = Path(__file__).resolve().parent.parent / "params"
    for cand in (repo_params / str(name_or_path), repo_params / f"{name_or_path}.yaml"):
        if cand.is_file():
            return cand
    raise ParamsError(f"params file not found: {name_or_path} (looked in the working directory and {repo_params})")


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
        base = read_yaml(p.parent / parent if not Path(parent).is_absolute() else parent, _seen + (p,))
        d = deep_merge(base, d)
    return d


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_sets(d: dict, sets: list[str] | Mapping[str, Any]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars / lists)."""
    out = copy.deepcopy(d)
    items = sets.items() if isinstance(sets, Mapping) else [s.split("=", 1) if "=" in s else (s, None) for s in sets]
    for key, val in items:
        if val is None and not isinstance(sets, Mapping):
            raise ParamsError(f"override {key!r} must look like key.sub=value")
        if not isinstance(sets, Mapping):
            val = _parse_scalar(val)
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
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"section {section!r}: {e}") from e


def _check_methods(methods, section):
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ParamsError(f"{section}.methods has unknown method(s) {bad}; known: {list(METHODS)}")


def from_dict(d: Mapping, source: str | None = None) -> StudyParams:
    """Validate a params mapping (unknown sections/keys, bad values -> ParamsError naming them)."""
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"unknown params section(s) {unknown}; known: {list(SECTIONS)}")
    if not d.get("name"):
        raise ParamsError("params need a 'name' (used for results/<name> and figures/<name>)")
    hp_raw = d.get("hparams") or {}
    common = dict(hp_raw.get("common") or {})
    hparams = {}
    for m in METHODS:
        try:
            hparams[m] = EditHParams.from_dict({**common, **(hp_raw.get(m) or {}), "method": m})
        except (TypeError, ValueError) as e:
            raise ParamsError(f"hparams.{m}: {e}") from e
    bad_hp = sorted(set(hp_raw) - set(METHODS) - {"common"})
    if bad_hp:
        raise ParamsError(f"unknown hparams section(s) {bad_hp}; known: common, {', '.join(METHODS)}")
    sp = StudyParams(
        name=str(d["name"]),
        model=_build(ModelParams, d.get("model"), "model"),
        second_model=_build(ModelParams, d["second_model"], "second_model") if d.get("second_model") else None,
        data=_build(DataParams, d.get("data"), "data"),
        covariance=_build(CovParams, d.get("covariance"), "covariance"),
        evaluation=_build(EvalParams, d.get("evaluation"), "evaluation"),
        hparams=hparams,
        layer_search=_build(LayerSearchParams, d.get("layer_search"), "layer_search"),
        singular=_build(SingularParams, d.get("singular"), "singular"),
        sweep=_build(SweepParams, d.get("sweep"), "sweep"),
        batch=_build(BatchParams, d.get("batch"), "batch"),
        sequential=_build(SequentialParams, d.get("sequential"), "sequential"),
        results_dir=str(d.get("results_dir", "results")),
        figures_dir=str(d.get("figures_dir", "figures")),
        source=source,
    )
    for sec in ("layer_search", "singular", "batch", "sequential"):
        _check_methods(getattr(sp, sec).methods, sec)
    for sec in ("layer_search", "singular", "sweep", "batch", "sequential"):
        extra = getattr(sp, sec).hparams or {}
        if not isinstance(extra, Mapping):
            raise ParamsError(f"{sec}.hparams must be a mapping of method -> overrides")
        bad = sorted(set(extra) - set(METHODS) - {"common"})
        if bad:
            raise ParamsError(f"unknown method section(s) {bad} in {sec}.hparams")
        for m in METHODS:
            sp.method_hparams(m, 0, sec)  # validates every override now, before any model loads
    if sp.evaluation.alignment not in ("correct", "reference"):
        raise ParamsError(f"evaluation.alignment must be 'correct' or 'reference', got {sp.evaluation.alignment!r}")
    if sp.data.source not in ("model", "counterfact", "world"):
        raise ParamsError(f"data.source must be 'model', 'counterfact' or 'world', got {sp.data.source!r}")
    for sec in ("batch", "sequential"):
        e = getattr(sp, sec)
        bad = [b for b in e.batch_sizes if not isinstance(b, int) or b < 1 or b > e.total]
        if bad:
            raise ParamsError(f"{sec}.batch_sizes {bad} must be integers between 1 and {sec}.total={e.total}")
    if sp.sweep.batch_size > sp.sweep.total:
        raise ParamsError(f"sweep.batch_size={sp.sweep.batch_size} is larger than sweep.total={sp.sweep.total}")
    if sp.model.id is None and sp.model.tiny is None:
        raise ParamsError("model needs an 'id' (hub id or directory) or a 'tiny' build spec")
    for sec in ("model", "second_model"):
        mp = getattr(sp, sec)
        bad = sorted(set((mp.tiny or {}) if mp else {}) - set(TINY_KEYS))
        if bad:
            raise ParamsError(f"unknown key(s) {bad} in {sec}.tiny; known: {', '.join(TINY_KEYS)}")
    return sp


def resolve(params_file: str | os.PathLike, *, overrides: Mapping | list | None = None,
            **sections: Any) -> StudyParams:
    """Load ``params_file``, deep-merge non-None ``sections`` (papermill injections), then apply
    dotted ``overrides``; validate."""
    d = read_yaml(params_file)
    for k, v in sections.items():
        if v is None:
            continue
        if k not in SECTIONS:
            raise ParamsError(f"unknown params section {k!r}")
        d = deep_merge(d, {k: v})
    if overrides:
        d = apply_sets(d, overrides)
    from .paths import anchor_params  # relative paths are relative to the repository root
    return anchor_params(from_dict(d, source=str(find_params_file(params_file))))
