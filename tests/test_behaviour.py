"""Behaviour of the editing core on the committed miniature (issue 3): singular ROME edits work at
its best early layer and do not work at its last layer, where the subject position is no longer
read by later layers (the miniature retrieves facts early; see the README's layer search)."""
from __future__ import annotations

import pytest
import torch

from editlib.metrics import summarize_cases
from editlib.params import resolve
from editlib.protocols import _singular_unit, open_study
from editlib.tiny import COMMITTED_MINIATURE

pytestmark = pytest.mark.skipif(not COMMITTED_MINIATURE.is_dir(), reason="committed miniature missing")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    p = resolve("params/tiny.yaml", overrides={"results_dir": str(tmp_path_factory.mktemp("res")),
                                               "second_model": None})
    return open_study(p, experiments=())


@pytest.fixture(scope="module")
def facts(study):
    return study.facts(50)


def _scores(study, facts, layer):
    before = [p.detach().clone() for p in study.model.parameters()]
    cases, diags = _singular_unit(study, facts, ["rome"], layer, unit_cols={})
    assert all(torch.equal(a, b) for a, b in zip(before, study.model.parameters())), "edits not restored"
    assert len(cases) == len(facts) and (diags.n == 1).all()
    return summarize_cases(cases).iloc[0]


def test_rome_singular_edits_work_at_the_best_early_layer(study, facts):
    s = _scores(study, facts, 0)
    assert s.ES_mean >= 90 and s.NS_mean >= 85, s.to_dict()


def test_rome_singular_edits_fail_at_the_last_layer(study, facts):
    s = _scores(study, facts, study.n_layers - 1)
    assert s.ES_mean <= 20, s.to_dict()
