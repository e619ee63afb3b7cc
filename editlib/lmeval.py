"""Optional downstream evaluation of sequentially edited models with EleutherAI's
lm-evaluation-harness (``lm-eval``), the tool model-editing papers use to show degradation on
general tasks (ENCORE, AlphaEdit report GLUE-style tasks this way).

Off by default and never needed offline: ``sequential.lm_eval`` in a params file, e.g.
``{tasks: [arc_easy, hellaswag], every: 1024, limit: 500}``, runs the harness on the model being
edited (the unedited model first, then after every ``every`` edited facts and at the end of each
sequential configuration), in process, on the edited weights, without writing a checkpoint. Each
``<task>_<metric>`` lands in the run's ``batches.parquet`` as ``lmeval_<task>_<metric>`` (with
``_<filter>`` for a filter other than ``none``; ``..._0`` for the unedited model), beside the
degradation columns. Install with ``pip install -e ".[lmeval]"``; the harness downloads its task
datasets on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

KEYS = ("tasks", "every", "limit", "num_fewshot", "batch_size")


@dataclass(frozen=True)
class LmEvalSpec:
    tasks: tuple[str, ...]
    every: int | None = None  # edited facts between runs (null: the unedited and the final model only)
    limit: int | None = None  # examples per task (null: all; the harness warns that limits are for testing)
    num_fewshot: int = 0
    batch_size: int = 8


def _int_at_least(v: Any, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def parse(raw: Mapping[str, Any] | None, where: str = "sequential.lm_eval") -> LmEvalSpec | None:
    """The validated spec of ``raw`` (None when off); a bad key or value raises ParamsError naming it."""
    from .params import ParamsError

    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{where} must be a mapping with keys {list(KEYS)}, got {type(raw).__name__}")
    bad = sorted(set(raw) - set(KEYS))
    if bad:
        raise ParamsError(f"unknown key(s) {bad} in {where}; known: {list(KEYS)}")
    tasks = raw.get("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ParamsError(f"{where}.tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    spec = LmEvalSpec(tasks=tuple(tasks), **{k: raw[k] for k in KEYS if k in raw and k != "tasks"})
    for key in ("every", "limit"):
        v = getattr(spec, key)
        if v is not None and not _int_at_least(v, 1):
            raise ParamsError(f"{where}.{key} must be null or an integer >= 1, got {v!r}")
    if not _int_at_least(spec.num_fewshot, 0):
        raise ParamsError(f"{where}.num_fewshot must be an integer >= 0, got {spec.num_fewshot!r}")
    if not _int_at_least(spec.batch_size, 1):
        raise ParamsError(f"{where}.batch_size must be an integer >= 1, got {spec.batch_size!r}")
    return spec


def check_installed(spec: LmEvalSpec | None = None) -> None:
    """Fail fast, before any model loads, when the harness is not installed, or (given ``spec``)
    when a task it names is none of the harness's tasks, groups or tags, nor a task file
    (ParamsError): a misspelt task would otherwise stop the sequential notebook after the notebooks
    before it. ``simple_evaluate`` takes names as they are (only the harness's command line expands
    glob patterns), so a pattern is refused too, with the names it matches. A harness whose task
    registry cannot be read here is left to say so itself."""
    from .params import ParamsError

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ParamsError("sequential.lm_eval needs EleutherAI's lm-evaluation-harness: "
                          "pip install -e '.[lmeval]' in the editlib checkout (or pip install lm-eval), or set sequential.lm_eval: null") from None
    if spec is None:
        return
    try:
        from lm_eval.tasks import TaskManager
        known = set(TaskManager().all_tasks)  # lm-eval >= 0.4.2: every task, group and tag name
    except Exception:
        return
    import fnmatch
    import os

    unknown = [t for t in spec.tasks if t not in known and not os.path.isfile(t)]
    if unknown:
        near = {t: sorted(fnmatch.filter(known, t if any(c in t for c in "*?[") else f"*{t.replace('-', '_')}*"))[:3]
                for t in unknown}
        raise ParamsError(f"sequential.lm_eval.tasks: {unknown} are not tasks, groups or tags of the installed "
                          "lm-evaluation-harness" + "".join(f"; {t!r}: did you mean {n}?" for t, n in near.items() if n))


def evaluate(model, tok, spec: LmEvalSpec) -> dict[str, float]:
    """Run the harness on ``model`` as it is now (the edited weights) and flatten its numeric
    results (:func:`flatten`)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    import random

    import numpy as np
    import torch

    was_training = model.training
    # the harness seeds Python's, NumPy's and torch's global generators: give them back afterwards
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=spec.batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                              log_samples=False)
    finally:
        model.train(was_training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])
    return flatten(out)


def flatten(out: Mapping | None) -> dict[str, float]:
    """The harness's numeric results as ``lmeval_<task>_<metric>`` for its default filter
    (``acc,none``) and ``lmeval_<task>_<metric>_<filter>`` for any other, so that a task scored
    under two filters (gsm8k's ``exact_match,strict-match`` and ``exact_match,flexible-extract``)
    keeps both numbers instead of one overwriting the other; stderr kept, aliases and "N/A"
    dropped."""
    flat: dict[str, float] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # aliases, "N/A"
            metric, _, filt = key.partition(",")
            flat[f"lmeval_{task}_{metric}" + (f"_{filt}" if filt and filt != "none" else "")] = float(v)
    return flat


def due(spec: LmEvalSpec, start: int, stop: int, last: bool) -> bool:
    """Whether the harness runs after the batch of facts ``start:stop`` (:func:`editlib.degradation.due`)."""
    from .degradation import due as crossed

    return crossed(spec.every, start, stop, last)
