"""Checks run before any model loads (``python -m editlib run`` and ``reproduce``): the model is
where the params say (a directory's config and weight files intact), and the facts exist, are
valid, are not empty and hold enough unique subjects for every experiment asked for.

:func:`editlib.protocols.check_before_loading` (layers, devices, corpora) runs after these; every
failure is an exception the command line reports in one line (ParamsError, RecordError,
DatasetNotFound, ModelNotFound, ModelLoadError).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .params import ModelParams, ParamsError, StudyParams
from .records import Record


def facts_needed(p: StudyParams, experiment: str) -> int:
    """How many unique-subject facts an experiment draws per ordering."""
    return {"layer_search": p.layer_search.n_facts, "singular": p.singular.n_facts, "sweep": p.sweep.total,
            "batch": p.batch.total, "sequential": p.sequential.total}.get(experiment, 0)


def check_study(p: StudyParams, experiments: Sequence[str], which: str = "model") -> None:
    """Model location and facts for ``experiments`` on ``which`` ("model" or "second_model")."""
    mp = p.second_model if which == "second_model" else p.model
    if mp is None:
        raise ParamsError(f"params have no {which!r} section")
    if mp.revision and (mp.tiny or not mp.id or Path(mp.id).expanduser().is_dir()):
        raise ParamsError(f"{which}.revision pins a hub id's commit, but {which} is "
                          + ("a miniature built here" if mp.tiny or not mp.id else f"the local directory {mp.id!r}")
                          + ": remove revision (a directory's files are what it loads)")
    if mp.id and not mp.tiny:
        from .models import ModelLoadError, ModelNotFound, locate_model

        try:
            locate_model(mp.id, revision=mp.revision)
        except (ModelNotFound, ModelLoadError) as e:
            raise type(e)(f"{which}.id: {e}") from None
    found = _records(p, mp)
    if found is None:  # a miniature built on demand: its facts exist once it is built
        return
    records, where = found
    from .counterfact import load_fact_list, reference_case_ids, resolve_fact_list, unique_subject_case_ids
    from .records import RecordError

    if p.data.fact_list == "reference":  # every ordering's first facts must be among the records
        fl = load_fact_list(resolve_fact_list(p.data.fact_list_path))
        for e in experiments:
            need = facts_needed(p, e)
            what = f"{_size_key(e)} {need}"
            if e == "sequential" and p.sequential.degradation_every:  # the held-out pool follows them
                from .degradation import pool_size
                need = pool_size(len(records), need, p.sequential.heldout_facts)
                what += f" and the held-out pool after them: {need} facts"
            for o in p.data.orderings if need else ():
                try:
                    reference_case_ids(records, fl, o, need)
                except RecordError as err:
                    raise RecordError(f"{e} ({what}) on {where}: {err}") from None
        return
    n = len(unique_subject_case_ids(records))
    for e in experiments:
        need = facts_needed(p, e)
        if need > n:
            raise ParamsError(f"{e} needs {need} facts but {where} has only {n} records with unique subjects "
                              f"(lower {_size_key(e)})")


def _size_key(experiment: str) -> str:
    return f"{experiment}.n_facts" if experiment in ("layer_search", "singular") else f"{experiment}.total"


def _records(p: StudyParams, mp: ModelParams) -> tuple[list[Record], str] | None:
    """The records a study will edit, loaded and validated, with a phrase naming where they are."""
    from . import counterfact

    src = p.data.source
    if src == "counterfact":
        path = counterfact.resolve_counterfact(p.data.counterfact_path, given_as="data.counterfact_path")
        return counterfact.load_counterfact(path), f"the CounterFact file {path}"
    if src == "world":
        from .world import make_world

        return make_world(p.data.world_records, p.data.world_seed), f"the synthetic world ({p.data.world_records} records)"
    if mp.tiny or not mp.id or not Path(mp.id).expanduser().is_dir():
        return None
    from .counterfact import DatasetNotFound
    from .tiny import load_tiny_records

    d = Path(mp.id).expanduser()
    if not any((d / f).is_file() for f in ("records.json", "case_ids.json")):
        raise DatasetNotFound(f"data.source is 'model' (the facts a miniature was trained on), but {mp.id} has "
                              "neither records.json nor case_ids.json: not an editlib miniature; set data.source: "
                              "counterfact (with data.counterfact_path) or world")
    return load_tiny_records(d, p.data.counterfact_path), f"model directory {mp.id}"
