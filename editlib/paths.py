"""Repository-relative paths: notebooks run with cwd = notebooks/ (papermill), the command line
from the repo root; both must find ``models/``, ``results/`` and ``figures/`` in the same place.

:func:`repo_path` anchors a relative path at the repository root; :func:`anchor_params` applies it
to every path-valued parameter of a :class:`~editlib.params.StudyParams`.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(p: str | os.PathLike) -> Path:
    """``p`` itself when absolute (``~`` expanded), else ``REPO_ROOT / p``."""
    path = Path(p).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def shown(p: str | os.PathLike) -> str:
    """A path as reports show it: relative to the repository root when under it, ``~/...`` under
    the home folder, else as given — never this machine's absolute repository path."""
    path = Path(p).expanduser()
    if not path.is_absolute():
        return str(p)
    for base, label in ((REPO_ROOT, None), (Path.home(), "~")):
        try:
            rel = path.resolve().relative_to(base.resolve())
        except ValueError:
            continue
        return str(rel) if label is None else f"{label}/{rel}"
    return str(path)


def model_ref(model_id: str | None) -> str | None:
    """A model id as given, or its absolute path when it names a directory under the repo root
    (``models/tiny-world``). Hub ids (``meta-llama/Meta-Llama-3-8B``) are left alone."""
    if model_id is None or Path(model_id).expanduser().is_absolute():
        return model_id
    cand = REPO_ROOT / model_id
    return str(cand) if cand.exists() else model_id


def anchor_params(p):
    """A copy of study params with results_dir, figures_dir, model ids that are repo directories,
    data.counterfact_path, data.fact_list_path, covariance.path and covariance.data_files made absolute (anchored at the repo root)."""
    def _opt(x: str | None) -> str | None:
        return None if x is None else str(repo_path(x))

    model = replace(p.model, id=model_ref(p.model.id))
    second = replace(p.second_model, id=model_ref(p.second_model.id)) if p.second_model else None
    return replace(p, model=model, second_model=second,
                   data=replace(p.data, counterfact_path=_opt(p.data.counterfact_path),
                                fact_list_path=_opt(p.data.fact_list_path)),
                   covariance=replace(p.covariance, path=_opt(p.covariance.path),
                                      data_files=_opt(p.covariance.data_files)),
                   results_dir=str(repo_path(p.results_dir)), figures_dir=str(repo_path(p.figures_dir)))


@contextlib.contextmanager
def env_set(values: dict[str, str]):
    """Set environment variables for the ``with`` block (child processes such as notebook kernels
    inherit them) and restore the previous values, or their absence, afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
