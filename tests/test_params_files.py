"""Every committed params file resolves (the checks that run before any expensive work), the default
study runs on three orderings, and its full-size variant differs from it only in the trimmed sizes."""
from __future__ import annotations

import dataclasses

import pytest

from editlib.params import resolve
from editlib.paths import REPO_ROOT

FILES = sorted((REPO_ROOT / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_params_file_resolves(path) -> None:
    p = resolve(path)
    assert p.name == path.stem and len(p.data.orderings) >= 1


def test_the_default_runs_every_experiment_on_three_orderings() -> None:
    """Issue #15: error bars for every experiment of the default study, and no other committed
    miniature study silently tripled by it (smoke for the tests, tiny-counterfact's one ordering)."""
    assert list(resolve(REPO_ROOT / "params" / "tiny.yaml").data.orderings) == [0, 1, 2]
    for name in ("smoke", "tiny-counterfact", "llama3-8b"):
        assert list(resolve(REPO_ROOT / "params" / f"{name}.yaml").data.orderings) == [0], name


def test_tiny_full_is_tiny_at_the_untrimmed_sizes() -> None:
    tiny, full = resolve(REPO_ROOT / "params" / "tiny.yaml"), resolve(REPO_ROOT / "params" / "tiny-full.yaml")
    assert list(full.data.orderings) == [0, 1, 2]
    differ = {f.name for f in dataclasses.fields(tiny) if getattr(tiny, f.name) != getattr(full, f.name)}
    assert differ == {"name", "source", "sweep", "batch", "sequential"}, differ
    assert (full.sweep.batch_size, full.sweep.total) == (256, 256) and (tiny.sweep.batch_size, tiny.sweep.total) == (128, 128)
    assert (full.batch.total, list(full.batch.batch_sizes)) == (256, [4, 16, 64, 256])
    assert (full.sequential.total, list(full.sequential.batch_sizes)) == (128, [1, 4, 16, 32, 128])
    assert full.sequential.degradation_every == 32
    trimmed = {"sweep": ("batch_size", "total"), "batch": ("total", "batch_sizes"),
               "sequential": ("total", "batch_sizes", "degradation_every")}
    for sec, keys in trimmed.items():  # only the sizes differ
        assert dataclasses.replace(getattr(full, sec), **{k: getattr(getattr(tiny, sec), k) for k in keys}) == getattr(tiny, sec), sec
