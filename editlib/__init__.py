"""editlib: locate-and-edit model editing (ROME / MEMIT / EMMET) reproduced on Llama-style models.

Modules, one concept each: ``records``/``counterfact``/``world`` (data), ``arch``/``models``/
``tokens``/``nethook`` (models), ``tiny`` (the offline miniature), ``scoring`` (teacher-forced
target scores). docs/usage.md has the map of the rest.
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import editlib` stays light (no torch) until these are used
    if name == "summarize":
        from .protocols import summarize
        return summarize
    if name == "load_model":
        from .models import load_model
        return load_model
    if name in ("edit", "generate"):
        from . import quick
        return getattr(quick, name)
    raise AttributeError(f"module 'editlib' has no attribute {name!r}")
