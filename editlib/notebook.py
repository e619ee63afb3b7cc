"""The notebooks' setup in one call, and how they show tables.

Every notebook's ``parameters`` cell defines ``params_file``, ``overrides`` and one variable per
params section, ``...`` (as in the params file) by default; papermill replaces them with ``-p``,
``-y`` or an override file ``-f FILE.yaml`` (sections only: a whole params file is chosen with
``-p params_file FILE``). :func:`setup` reads them from the notebook's namespace, resolves the
params (given sections deep-merged over the file, ``null`` replacing one, then the dotted
overrides), anchors relative paths at the repository root, sets the display options and prints a
short header with repository-relative paths.
"""
from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from .params import SECTIONS, ParamsError, StudyParams, resolve
from .paths import shown

#: names papermill injects from a whole params file but that no notebook parameter takes
_FILE_ONLY = ("extends",)


def _overrides(raw: Any) -> Mapping | list:
    """The parameters cell's ``overrides``: a mapping of dotted keys or a list of ``key=value``
    strings; papermill's ``-p overrides '{"batch.total": 64}'`` passes that text, read as YAML."""
    if isinstance(raw, str):
        parsed = yaml.safe_load(raw) if raw.strip() else {}
        raw = [raw] if isinstance(parsed, str) else parsed
    if raw is None:
        return {}
    if not isinstance(raw, (Mapping, list, tuple)):
        raise ParamsError(f"overrides must be a mapping of dotted keys (e.g. {{'batch.total': 64}}) or a "
                          f"list of 'key.sub=value' strings, got {type(raw).__name__} {raw!r}")
    return raw


def _misspelt_sections(namespace: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Notebook variables that look like a misspelt params section (papermill injects any name it
    is given, ``-y '{bacth: ...}'`` too), with the section each resembles."""
    out = []
    for k, v in namespace.items():
        if k in SECTIONS or k.startswith("_") or not isinstance(v, (Mapping, str, int, float, list)):
            continue
        close = difflib.get_close_matches(k, SECTIONS, n=1, cutoff=0.8)
        if close:
            out.append((k, close[0]))
    return out


def setup(namespace: Mapping[str, Any]) -> tuple[StudyParams, Path]:
    """``P, FIG_DIR = setup(globals())``: the resolved params and the figures folder of this run."""
    if "params_file" not in namespace:
        raise NameError("setup(globals()) needs the parameters cell's params_file (run that cell first)")
    whole = [k for k in _FILE_ONLY if k in namespace]
    if whole:  # papermill -f of a params file: its base would silently be params_file's instead
        raise ParamsError(f"the notebook was given {whole[0]!r} (= {namespace[whole[0]]!r}), a key of a whole "
                          "params file (papermill -f FILE.yaml?): choose a params file with "
                          "`-p params_file FILE.yaml`; -f, -y and -p give sections merged over it")
    typos = _misspelt_sections(namespace)
    if typos:
        raise ParamsError("notebook variable(s) " + ", ".join(f"{k!r} (params section {s!r}?)" for k, s in typos)
                          + f" are not params sections; the sections are: {', '.join(SECTIONS)}")
    sections = {k: namespace[k] for k in SECTIONS if k in namespace and namespace[k] is not Ellipsis}
    clash = [k for k, v in sections.items() if isinstance(v, types.ModuleType)]
    if clash:  # e.g. `from editlib import beyond` before setup: the name belongs to a params section
        raise NameError(f"notebook variable(s) {clash} are modules, but those names are params sections: "
                        f"import them under another name (e.g. `import editlib.{clash[0]} as {clash[0]}_module`)")
    p = resolve(namespace["params_file"], overrides=_overrides(namespace.get("overrides")), sections=sections)
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
