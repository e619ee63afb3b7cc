"""editlib: locate-and-edit model editing (ROME / MEMIT / EMMET) reproduced on Llama-style models.

Modules, one concept each: ``records``/``counterfact``/``world`` (data), ``arch``/``models``/
``tokens``/``nethook`` (models), ``tiny`` (the offline miniature), ``scoring`` (teacher-forced
target scores). See the README for the map of the rest.
"""
__version__ = "0.1.0"
