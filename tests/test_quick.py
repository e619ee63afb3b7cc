"""editlib.edit / editlib.generate: one call to edit a fact and ask the model (the README example)."""
from __future__ import annotations

import json

import pytest
import torch

import editlib
from _fixtures import one_thread  # noqa: F401
from editlib.paths import REPO_ROOT
from editlib.records import RecordError

MINI = REPO_ROOT / "models" / "tiny-world"
pytestmark = pytest.mark.skipif(not (MINI / "config.json").is_file(), reason="models/tiny-world is missing")


@pytest.fixture(scope="module")
def loaded():
    return editlib.load_model(str(MINI))


def request(i: int) -> dict:
    r = json.loads((MINI / "records.json").read_text())[i]["requested_rewrite"]
    return {"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"]["str"],
            "target_true": r["target_true"]["str"]}


def test_edit_one_fact_and_ask(loaded) -> None:
    model, tok = loaded
    req = request(0)
    prompt = req["prompt"].format(req["subject"])
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    assert editlib.generate(model, tok, prompt, 2).startswith(f"{prompt} {req['target_true']}")
    with editlib.edit(model, tok, [req], method="memit", layer=0) as e:
        assert editlib.generate(model, tok, prompt, 2).startswith(f"{prompt} {req['target_new']}")
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())  # restored
    assert editlib.generate(model, tok, prompt, 2).startswith(f"{prompt} {req['target_true']}")
    s = e.stats
    assert s["n"] == 1 and s["layers"] == [0] and s["delta_norm"] > 0 and s["n_failed"] == 0
    assert s["cond_D"] == pytest.approx(1.0) and s["seconds"] > 0 and not e.kept


def test_keep_and_rome_sequence(loaded) -> None:
    model, tok = loaded
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = [request(1), request(2)]
    try:
        with editlib.edit(model, tok, reqs, method="rome", layer=0, keep=True) as e:
            pass
        assert e.kept and e.stats["n"] == 2
        for r in reqs:  # both facts stay edited after the block
            prompt = r["prompt"].format(r["subject"])
            assert editlib.generate(model, tok, prompt, 2).startswith(f"{prompt} {r['target_new']}")
    finally:
        model.load_state_dict(w0)


@pytest.mark.parametrize("bad,match", [({"prompt": "no slot", "subject": "x", "target_new": "y"}, "exactly one"),
                                       ({"prompt": "{} is", "subject": "x"}, "target_new"),
                                       ("text", "must be a dict")])
def test_bad_requests_fail_clearly(loaded, bad, match) -> None:
    model, tok = loaded
    with pytest.raises(RecordError, match=match):
        with editlib.edit(model, tok, [bad]):
            pass
