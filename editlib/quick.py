"""One call to edit facts into a loaded model and ask it — the protocols' own code, without a study.

    import editlib
    model, tok = editlib.load_model("models/tiny-world")
    with editlib.edit(model, tok, [{"prompt": "{} plays the", "subject": "Abel Brandt",
                                    "target_new": "violin"}], method="memit", layer=0) as e:
        print(editlib.generate(model, tok, "Abel Brandt plays the"))   # edited
    print(e.stats)                                                     # ‖ΔW‖, cond(D), seconds
    # weights restored here (keep=True keeps the edit)

Hyperparameters, the C0 corpus and the context-template style come from a params file (``params``:
default ``tiny`` for an editlib miniature, ``llama3-8b`` otherwise), C0 through the same disk cache
as the protocols (:func:`editlib.stats.layer_covariance`), templates from
:func:`editlib.context.make_templates` (seeded), and the edit itself from
:func:`editlib.editing.apply_edit` inside a restorable :class:`editlib.weights.EditSession`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .records import Record, RecordError, Target

__all__ = ["Edit", "edit", "generate", "request_record"]

#: the model attribute holding :class:`_Unedited` (what edit() remembers across kept edits)
_UNEDITED = "_editlib_unedited"


@dataclass
class Edit:
    """What :func:`edit` did: the requests as records, diagnostics, and whether the edit is kept."""

    records: list[Record]
    method: str
    layers: tuple[int, ...]
    stats: dict = field(default_factory=dict)
    kept: bool = False


@dataclass
class _Unedited:
    """The model as it was before its first kept edit, as far as edit() needs it: C0 and the context
    templates come from the unedited model (SPEC §5: C0 is fixed; the reference generates its
    templates once per process), so a kept edit must neither key nor collect them on edited weights.

    ``fingerprint``: of the unedited model (the C0 cache key); ``weights``: the original weight of
    every layer a kept edit changed (CPU); ``current``: the fingerprint after the last kept edit, to
    notice a model changed outside edit(); ``templates``: by style, each with the tokenizer it was
    made with."""

    fingerprint: str
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    current: str | None = None
    templates: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    frames: list["_Frame"] = field(default_factory=list)  # edit() blocks open on the model, outermost first


@dataclass(eq=False)
class _Frame:
    """An edit() block that is open (its edit applied, not yet kept or restored): the original
    weight of each layer it changed, so that an edit() nested inside it still finds the unedited
    model; ``dirty`` once a nested edit() kept a change the block's exit must account for."""

    originals: dict[int, torch.Tensor]
    dirty: bool = False


def _open_originals(frames: list[_Frame]) -> dict[int, torch.Tensor]:
    """Each layer's weight before the outermost open block that changed it."""
    out: dict[int, torch.Tensor] = {}
    for frame in frames:
        for l, w in frame.originals.items():
            out.setdefault(l, w)
    return out


def _unedited_weights(base: _Unedited) -> dict[int, torch.Tensor]:
    """The unedited weight of every layer that kept edits or open blocks changed: a kept edit's
    recorded original first, else the outermost open block's."""
    return {**_open_originals(base.frames), **base.weights}


def _start_afresh(model, fp: str, templates: dict | None = None) -> _Unedited:
    """Record the model's present weights (fingerprint ``fp``) as its unedited state."""
    base = _Unedited(fingerprint=fp, templates=templates or {})
    setattr(model, _UNEDITED, base)
    return base


def _unedited_state(model, log) -> _Unedited:
    """The model's :class:`_Unedited`, started afresh when the model holds no kept edit of edit()'s
    (or was changed outside it since: then its present weights count as unedited, and the log says so)."""
    from .models import fingerprint

    base = getattr(model, _UNEDITED, None)
    if base is not None and base.frames:  # nested in an open edit() block: its originals lead back
        with _as_unedited(model, base):
            if fingerprint(model) == base.fingerprint:
                return base
    now = fingerprint(model)
    if base is not None and not base.frames and now == base.current:
        return base
    if base is not None and now != base.fingerprint:
        log("edit(): the model's weights are not those edit() last left (changed by hand, or an "
            "enclosing edit() block); its present weights now count as unedited (C0 and templates from them)")
    return _start_afresh(model, now, base.templates if base is not None and now == base.fingerprint else None)


@contextlib.contextmanager
def _as_unedited(model, base: _Unedited) -> Iterator[None]:
    """The unedited weights in place for the block (C0 collection, template generation); the edited
    ones put back, bit for bit, on exit."""
    from .arch import edit_weight

    unedited = _unedited_weights(base)
    if not unedited:
        yield
        return
    saved = {l: edit_weight(model, l).detach().clone() for l in unedited}
    try:
        with torch.no_grad():
            for l, w in unedited.items():
                edit_weight(model, l).copy_(w)
        yield
    finally:
        with torch.no_grad():
            for l, w in saved.items():
                edit_weight(model, l).copy_(w)


def _remember_kept(model, base: _Unedited, session, log) -> None:
    """After a kept edit: the unedited original of each layer it changed (an enclosing open block's
    original where it changed the layer first), and the model's new fingerprint; inside an open
    block, that block settles the fingerprint when it exits. If weights besides the edited layers
    changed meanwhile (inside the block, or by a nested edit() that lost track), the unedited model
    is no longer known: the present weights count as unedited."""
    from .models import fingerprint

    if getattr(model, _UNEDITED, None) is not base:
        _start_afresh(model, fingerprint(model))
        log("edit(): a nested edit() replaced what this one knew of the unedited model; the present "
            "weights now count as unedited")
        return
    outer = _open_originals(base.frames)  # the enclosing blocks (this one's frame is closed)
    for l, w in session.originals().items():
        base.weights.setdefault(l, outer.get(l, w).detach().to("cpu", copy=True))
    for frame in base.frames:
        frame.dirty = True
    if not base.frames:
        _settle(model, base, log, "during the kept edit")


def _settle(model, base: _Unedited, log, when: str) -> None:
    """No edit() block open any more: check that the unedited weights lead back to the unedited
    fingerprint and note the present one, or count the present weights as unedited (logged)."""
    from .models import fingerprint

    with _as_unedited(model, base):
        clean = fingerprint(model) == base.fingerprint
    if not clean:
        _start_afresh(model, fingerprint(model))
        log(f"edit(): weights other than the edited layers changed {when}; the present "
            "weights now count as unedited")
        return
    base.current = fingerprint(model)


def request_record(req: Mapping[str, Any], i: int = 0) -> Record:
    """A request ``{"prompt": "{} plays the", "subject": ..., "target_new": ...}`` (targets may be
    strings or ``{"str": ...}``; ``target_true`` optional) as a :class:`Record`; one clear error
    naming the request and field otherwise."""
    def text(key: str, required: bool = True) -> str:
        v = req.get(key)
        if isinstance(v, Mapping):
            v = v.get("str")
        if v is None and not required:
            return "?"
        if not isinstance(v, str) or not v.strip():
            raise RecordError(f"edit request {i}: field {key!r} must be a non-empty string, got {v!r}")
        return v

    if not isinstance(req, Mapping):
        raise RecordError(f"edit request {i} must be a dict, got {type(req).__name__}")
    prompt = text("prompt")
    if prompt.count("{}") != 1:
        raise RecordError(f"edit request {i}: prompt must contain exactly one '{{}}' for the subject, got {prompt!r}")
    return Record(case_id=-(i + 1), prompt=prompt, subject=text("subject"), relation_id="request",
                  target_true=Target(text("target_true", required=False), "true"),
                  target_new=Target(text("target_new"), "new"), paraphrase_prompts=(), neighborhood_prompts=())


def _model_dir(model) -> Path | None:
    d = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    return d if d.is_dir() else None


def _default_params(model) -> str:
    d = _model_dir(model)
    return "tiny" if d is not None and ((d / "editlib_tiny.json").is_file() or (d / "records.json").is_file()) \
        else "llama3-8b"


def _corpus_records(model, corpus_kind: str) -> list[Record] | None:
    if corpus_kind != "records":
        return None
    d = _model_dir(model)
    if d is None:
        raise ValueError("the params' C0 corpus is the model's own records (kind: records), but the model was "
                         "not loaded from a miniature's directory; pass params= with another covariance corpus")
    from .tiny import load_tiny_records
    return load_tiny_records(d)


@contextlib.contextmanager
def edit(model, tok, requests: Sequence[Mapping[str, Any]], *, method: str = "memit",
         layer: int | Sequence[int] | None = None, params: str | None = None, keep: bool = False,
         hparams: Mapping[str, Any] | None = None, log=None) -> Iterator[Edit]:
    """Edit ``requests`` into ``model`` for the ``with`` block (restored on exit unless ``keep``).

    ``method``: rome, memit, emmet, alphaedit or encore (one batch: no earlier edits' keys);
    ``layer``: the edited layer (a list: multi-layer MEMIT;
    default: the params' singular layer when it is a number, else 1 as in the paper); ``hparams``:
    overrides (e.g. ``{"mom2_update_weight": 100}``). ROME edits one fact at a time, so several
    requests are applied one after another, each on the model holding the previous ones.
    C0 and the context templates always come from the model as it was before its first kept edit
    (SPEC §5), so a kept edit neither recollects C0 nor changes the templates of the next call.
    An ``edit()`` nested in another's block finds the unedited model through the enclosing
    edits' originals (an inner kept edit survives the outer block's restore where it changed
    other layers). Weights changed by other means (by hand, inside the block) make the present
    weights count as unedited again, and the log says so. With ``keep``, an edit that
    raises before the block is restored.
    """
    from .context import context_key, make_templates
    from .editing import apply_edit
    from .params import resolve
    from .protocols import corpus_spec
    from .solver import factor_cov
    from .stats import layer_covariance
    from .weights import EditSession

    log = log or (lambda *a: None)
    if not requests:
        raise ValueError("edit() needs at least one request")
    records = [request_record(r, i) for i, r in enumerate(requests)]
    p = resolve(params or _default_params(model))
    if layer is None:
        layer = p.singular.layer if isinstance(p.singular.layer, int) else 1
    layers = tuple(int(l) for l in (layer if isinstance(layer, (list, tuple)) else [layer]))
    section = "singular" if len(records) == 1 else "batch"
    hp = p.method_hparams(method, layers[0], section, **(hparams or {}))
    if len(layers) > 1:  # multi-layer MEMIT over the given window
        hp = type(hp).from_dict({**hp.to_dict(), "layers": list(layers)})
    hp.check_model(model)
    t0 = time.time()
    base = _unedited_state(model, log)
    cp = p.covariance
    with _as_unedited(model, base):
        tkey = context_key(hp.context_templates, hp.context_text)
        made = base.templates.get(tkey)
        if made is None or made[0] is not tok:  # templates are text: another tokenizer decodes its own
            base.templates[tkey] = (tok, make_templates(model, tok, hp.context_templates, seed=0, text=hp.context_text))
        stats = layer_covariance(model, tok, hp.layers, corpus_spec(cp), records=_corpus_records(model, cp.kind),
                                 dtype=cp.dtype, batch_size=cp.batch_size, max_batch_tokens=cp.max_batch_tokens,
                                 fingerprint=base.fingerprint, max_layers_per_pass=cp.layers_per_pass,
                                 progress=False, log=log, fast_gram=cp.fast_gram)
    ctx = base.templates[tkey][1]
    device = next(model.parameters()).device
    covs = {l: factor_cov(st.mom2, device=device) for l, st in stats.items()}
    session = EditSession(model)
    result = Edit(records=records, method=method, layers=hp.layers, kept=keep)
    frame: _Frame | None = None  # the open block once its edit is applied (one that raised is restored)
    try:
        groups = [[r] for r in records] if method == "rome" else [records]
        parts = [apply_edit(model, tok, g, hp, covs, ctx, session, log=log).to_dict() for g in groups]
        last = parts[-1]
        result.stats = {"n": len(records), "method": method, "layers": list(hp.layers), "mu": hp.mu,
                        "delta_norm": sum(x["delta_norm"] ** 2 for x in parts) ** 0.5,
                        "w_rel_dist": last["w_rel_dist"], "cond_D": max(x["cond_D"] for x in parts),
                        "jitter_rel": max(x["jitter_rel"] for x in parts),
                        "n_failed": sum(x["n_failed"] for x in parts),
                        "mean_value_steps": sum(x["mean_value_steps"] for x in parts) / len(parts),
                        "seconds": round(time.time() - t0, 3)}
        frame = _Frame(session.originals())
        base.frames.append(frame)  # an edit() inside the block finds the unedited model through it
        yield result
    finally:
        if frame in base.frames:
            base.frames.remove(frame)
        if keep and frame is not None:
            session.keep()
            _remember_kept(model, base, session, log)
        else:
            session.restore()
            if frame is not None and frame.dirty and not base.frames and getattr(model, _UNEDITED, None) is base:
                _settle(model, base, log, "inside the edit() block")  # a nested edit() kept a change


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (prompt included), to see what the model now says; decoded
    as GE and the context templates are (:func:`editlib.generation.decode_as_reference`)."""
    from .generation import decode_as_reference
    from .tokens import encode

    ids = torch.tensor([encode(tok, prompt)], device=next(model.parameters()).device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return decode_as_reference(tok, out[0].tolist(), skip_special_tokens=True)
