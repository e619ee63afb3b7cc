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

import ast
import difflib
import types
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import yaml

from .params import SCALAR_SECTIONS, SECTIONS, ParamsError, StudyParams, resolve
from .paths import shown

#: names papermill injects from a whole params file but that no notebook parameter takes
_FILE_ONLY = ("extends",)
#: the notebook parameters that are not params sections
_OWN = ("params_file", "overrides")
#: sections whose null means something (no second model); any other section is ... or a mapping
_NULLABLE = ("second_model",)


def _overrides(raw: Any) -> Mapping | list:
    """The parameters cell's ``overrides``: a mapping of dotted keys or a list of ``key=value``
    strings; papermill's ``-p overrides '{"data.orderings": [0]}'`` passes that text, read as YAML."""
    if isinstance(raw, str):
        parsed = yaml.safe_load(raw) if raw.strip() else {}
        raw = [raw] if isinstance(parsed, str) else parsed
    if raw is None:
        return {}
    if not isinstance(raw, (Mapping, list, tuple)):
        raise ParamsError(f"overrides must be a mapping of dotted keys (e.g. {{'data.orderings': [0]}}) or a "
                          f"list of 'key.sub=value' strings, got {type(raw).__name__} {raw!r}")
    return raw


def _section(name: str, value: Any) -> Any:
    """A section as given: papermill's ``-p data '{orderings: [0]}'`` passes text, read as YAML."""
    if isinstance(value, str) and name not in SCALAR_SECTIONS:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, Mapping) or parsed is None:
            return parsed
    return value


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """The names papermill assigned in its injected ``# Parameters`` cell (the kernel's input
    history), [] outside papermill: only those are checked against the notebook's parameters,
    so a user's own variables (``models = [...]``) are never mistaken for a misspelt section."""
    history = namespace.get("In")
    if not isinstance(history, list):
        return []
    for src in reversed(history):
        if isinstance(src, str) and src.lstrip().startswith("# Parameters"):
            try:
                tree = ast.parse(src)
            except SyntaxError:
                return []
            return [t.id for node in tree.body if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)]
    return []


def setup(namespace: Mapping[str, Any]) -> tuple[StudyParams, Path]:
    """``P, FIG_DIR = setup(globals())``: the resolved params and the figures folder of this run."""
    if "params_file" not in namespace:
        raise NameError("setup(globals()) needs the parameters cell's params_file (run that cell first)")
    injected = injected_names(namespace)
    whole = [k for k in _FILE_ONLY if k in injected or k in namespace]
    if whole:  # papermill -f of a params file: its base would silently be params_file's instead
        raise ParamsError(f"the notebook was given {whole[0]!r} (= {namespace.get(whole[0])!r}), a key of a whole "
                          "params file (papermill -f FILE.yaml?): choose a params file with "
                          "`-p params_file FILE.yaml`; -f, -y and -p give sections merged over it")
    unknown = [k for k in injected if k not in SECTIONS and k not in _OWN]
    if unknown:  # papermill injects any name it is given, -y '{bacth: ...}' too, and only warns
        hints = {k: difflib.get_close_matches(k, SECTIONS, n=1, cutoff=0.6) for k in unknown}
        raise ParamsError("papermill gave " + ", ".join(f"{k!r}" + (f" (params section {h[0]!r}?)" if h else "")
                                                        for k, h in hints.items())
                          + f", which this notebook does not take; its parameters: {', '.join(_OWN + SECTIONS)}")
    nulls = [k for k in SECTIONS if k in namespace and namespace[k] is None and k not in _NULLABLE]
    if nulls:  # null would give the built-in defaults, in no params file, under this run's name
        raise ParamsError(f"section(s) {nulls} are None: a section is ... (as in the params file) or a mapping of "
                          "keys merged over it; null only turns second_model off (-y 'second_model: null')")
    sections = {k: _section(k, namespace[k]) for k in SECTIONS if k in namespace and namespace[k] is not Ellipsis}
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
