"""The notebooks' setup in one call, and how they show tables.

Every notebook's ``parameters`` cell defines ``params_file``, ``overrides`` and one variable per
params section (papermill injects whole sections with ``-f FILE.yaml`` or ``-p``); :func:`setup`
reads them from the notebook's namespace, resolves the params (sections deep-merged over the
file, then the dotted overrides), anchors relative paths at the repository root, sets the display
options and prints a short header with repository-relative paths.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from .params import SECTIONS, StudyParams, resolve
from .paths import shown


def setup(namespace: Mapping[str, Any]) -> tuple[StudyParams, Path]:
    """``P, FIG_DIR = setup(globals())``: the resolved params and the figures folder of this run."""
    if "params_file" not in namespace:
        raise NameError("setup(globals()) needs the parameters cell's params_file (run that cell first)")
    sections = {k: namespace[k] for k in SECTIONS if namespace.get(k) is not None}
    clash = [k for k, v in sections.items() if isinstance(v, types.ModuleType)]
    if clash:  # e.g. `from editlib import beyond` before setup: the name belongs to a params section
        raise NameError(f"notebook variable(s) {clash} are modules, but those names are params sections: "
                        f"import them under another name (e.g. `import editlib.{clash[0]} as {clash[0]}_module`)")
    p = resolve(namespace["params_file"], overrides=namespace.get("overrides") or {}, **sections)
    pd.set_option("display.max_rows", 200)
    pd.set_option("display.width", 200)
    fig_dir = Path(p.figures_dir) / p.name
    print(f"params: {shown(p.source) if p.source else '(inline)'}\nrun: {p.name}\n"
          f"model: {p.model.label or p.model.id}\nresults: {shown(Path(p.results_dir) / p.name)}\n"
          f"figures: {shown(fig_dir)}")
    return p, fig_dir


def table(df: pd.DataFrame, hide: tuple[str, ...] = ()):
    """A table as the notebooks show it: without pandas' index (and without the ``hide``
    columns, e.g. the numeric ``lam`` beside the printed λ)."""
    cols = [c for c in df.columns if c not in hide]
    text = [c for c in cols if df[c].dtype == object]
    st = df[cols].style.hide(axis="index")
    if text:  # sentences and mean(std) strings read best left-aligned
        st = st.set_properties(subset=text, **{"text-align": "left"})
    return st
