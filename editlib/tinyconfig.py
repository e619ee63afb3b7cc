"""Size and training schedule of a miniature, kept apart from :mod:`editlib.tiny` so that the
command line can show its defaults (``--help``) without importing torch."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyConfig:
    """Size and training schedule of a miniature (defaults: the committed tiny-world model)."""

    n_layers: int = 6
    hidden: int = 128
    intermediate: int = 512
    heads: int = 4
    vocab_size: int = 3072
    seq_len: int = 64
    batch_rows: int = 48
    lr: float = 3e-3
    warmup: int = 100
    max_steps: int = 4000
    weight_decay: float = 0.0
    check_every: int = 200
    seed: int = 0
    # stop once the quality bar holds with this margin on a probe of the records
    target_rewrite: float = 0.97
    target_other: float = 0.93
