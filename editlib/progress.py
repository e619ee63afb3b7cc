"""Progress bars that suit where they run.

* JupyterLab (a kernel with ipywidgets): a widget bar (``tqdm.auto``).
* A terminal: tqdm's text bar on stderr.
* A notebook executed without a person watching (``reproduce`` runs papermill with
  ``EDITLIB_PROGRESS=lines``), or a kernel without ipywidgets: a few plain lines on stdout — at
  the start, every ``interval`` seconds and at the end — so stored notebooks and their HTML
  exports show text, never a widget placeholder or an "IProgress not found" warning.

``EDITLIB_PROGRESS``: ``auto`` (default), ``lines`` or ``off``.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable

from tqdm.std import tqdm as _text_tqdm

ENV = "EDITLIB_PROGRESS"
MODES = ("auto", "lines", "off")


class ProgressModeError(ValueError):
    """``EDITLIB_PROGRESS`` holds a value that is not a mode."""


class LineProgress(_text_tqdm):
    """tqdm that prints each refresh as its own plain ASCII line on stdout (no carriage returns),
    at most every ``mininterval`` seconds, plus the first and the final state."""

    def __init__(self, *args, **kw):
        kw.setdefault("mininterval", 15.0)
        kw.update(file=sys.stdout, ascii=True, dynamic_ncols=False, ncols=80, leave=True)
        super().__init__(*args, **kw)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:  # noqa: ARG002
        line = self.__str__() if msg is None else msg
        if line.strip():
            print(line.strip(), file=sys.stdout, flush=True)
        return True

    def close(self) -> None:
        if self.disable:
            return
        if self.last_print_n != self.n:  # the final state, once
            self.display()
        self.disable = True  # tqdm's own close would print it again
        self._decr_instances(self)


def _in_kernel() -> bool:
    mod = sys.modules.get("IPython")
    shell = mod.get_ipython() if mod is not None and hasattr(mod, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def mode() -> str:
    """The mode in force: ``EDITLIB_PROGRESS`` (checked), ``lines`` in a kernel without
    ipywidgets, else ``auto``."""
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ProgressModeError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}")
    if m == "auto" and _in_kernel() and not _has_widgets():
        return "lines"
    return m


def progress(iterable: Iterable | None = None, *, disable: bool = False, **kw):
    """A progress bar over ``iterable`` (or ``total=``), with tqdm's arguments (desc, unit, ...)."""
    m = mode()
    if disable or m == "off":
        return _text_tqdm(iterable, disable=True, **kw)
    if m == "lines":
        return LineProgress(iterable, **kw)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)
