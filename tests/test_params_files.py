"""Every committed params file resolves (the checks that run before any expensive work), and the
three-ordering variant of the default study differs from it only where it says."""
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


def test_tiny_orderings_is_tiny_over_three_orderings() -> None:
    tiny, three = resolve(REPO_ROOT / "params" / "tiny.yaml"), resolve(REPO_ROOT / "params" / "tiny-orderings.yaml")
    assert list(three.data.orderings) == [0, 1, 2]
    differ = {f.name for f in dataclasses.fields(tiny) if getattr(tiny, f.name) != getattr(three, f.name)}
    assert differ <= {"name", "data", "source"}, differ
    assert dataclasses.replace(three.data, orderings=tiny.data.orderings) == tiny.data
