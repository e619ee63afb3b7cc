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


def test_kept_edits_take_c0_and_templates_from_the_unedited_model(tmp_path, monkeypatch) -> None:
    """SPEC §5: C0 is the unedited model's. After a kept edit at layer 0, the next edit() neither
    recollects layer 0's C0 (its cache key is the unedited fingerprint) nor collects layer 2's on
    the edited weights, and its context templates are the unedited model's."""
    import editlib.context
    from editlib.arch import edit_weight
    from editlib.models import fingerprint
    from editlib.stats import layer_covariance

    model, tok = editlib.load_model(str(MINI))  # a model no edit() has seen
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path / "cache"))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    fp0 = fingerprint(model)
    made = []
    real = editlib.context.make_templates

    def spy(m, *a, **k):
        made.append(fingerprint(m))
        return real(m, *a, **k)

    monkeypatch.setattr(editlib.context, "make_templates", spy)
    logs: list[str] = []
    try:
        with editlib.edit(model, tok, [request(3)], method="memit", layer=0, keep=True, log=logs.append):
            pass
        edited = edit_weight(model, 0).detach().clone()
        assert not torch.equal(edited, w0["model.layers.0.mlp.down_proj.weight"])
        with editlib.edit(model, tok, [request(4)], method="memit", layer=0, log=logs.append):
            pass
        with editlib.edit(model, tok, [request(5)], method="memit", layer=2, log=logs.append) as e:
            pass
        assert e.stats["n_failed"] == 0
        assert torch.equal(edit_weight(model, 0), edited)  # the kept edit is back after C0's collection
        assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items()
                   if k != "model.layers.0.mlp.down_proj.weight")
        collected = [s for s in logs if "collecting" in s]
        assert len(collected) == 2, collected  # layer 0 once, layer 2 once
        assert made == [fp0]  # templates generated once, from the unedited model
        assert [p.name for p in (tmp_path / "cache" / "stats").iterdir()] == [fp0]
        edited_c0 = layer_covariance(model, tok, [2], editlib.protocols.corpus_spec(
            editlib.params.resolve("tiny").covariance), records=editlib.tiny.load_tiny_records(MINI),
            cache_dir=tmp_path / "edited", progress=False, log=lambda *a: None)[2].mom2
        model.load_state_dict(w0)
        cached = layer_covariance(model, tok, [2], editlib.protocols.corpus_spec(
            editlib.params.resolve("tiny").covariance), records=editlib.tiny.load_tiny_records(MINI),
            progress=False, log=logs.append)[2].mom2
        assert len([s for s in logs if "collecting" in s]) == 2  # read from the cache
        fresh = layer_covariance(model, tok, [2], editlib.protocols.corpus_spec(
            editlib.params.resolve("tiny").covariance), records=editlib.tiny.load_tiny_records(MINI),
            cache_dir=tmp_path / "fresh", progress=False, log=lambda *a: None)[2].mom2
        assert torch.equal(cached, fresh)  # what edit() collected is the unedited model's C0
        assert not torch.allclose(edited_c0, fresh)  # (and the edited model's would differ)
    finally:
        model.load_state_dict(w0)


def test_a_model_changed_outside_edit_counts_as_unedited_again(tmp_path, monkeypatch) -> None:
    """Weights changed by hand after a kept edit: edit() says so and takes C0 from the present weights."""
    from editlib.models import fingerprint

    model, tok = editlib.load_model(str(MINI))
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    logs: list[str] = []
    with editlib.edit(model, tok, [request(6)], method="memit", layer=0, keep=True, log=logs.append):
        pass
    assert not any("not those edit() last left" in s for s in logs)
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.mul_(1.01)
    fp = fingerprint(model)
    with editlib.edit(model, tok, [request(7)], method="memit", layer=0, log=logs.append):
        pass
    assert any("not those edit() last left" in s for s in logs)
    assert fp in {p.name for p in (tmp_path / "stats").iterdir()}


def test_weights_changed_inside_a_kept_block_are_not_filed_under_the_unedited_model(tmp_path, monkeypatch) -> None:
    """C0 collected after such a change is keyed by the changed model, never by the unedited one."""
    from editlib.models import fingerprint

    model, tok = editlib.load_model(str(MINI))
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    fp0 = fingerprint(model)
    logs: list[str] = []
    with editlib.edit(model, tok, [request(8)], method="memit", layer=0, keep=True, log=logs.append):
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.mul_(1.01)
    assert any("changed during the kept edit" in s for s in logs)
    with editlib.edit(model, tok, [request(9)], method="memit", layer=2, log=logs.append):
        pass
    assert not list((tmp_path / "stats" / fp0).glob("model.layers.2.*"))
    assert fingerprint(model) in {p.name for p in (tmp_path / "stats").iterdir()}


def test_a_kept_edit_that_raises_before_the_block_is_restored(loaded, monkeypatch) -> None:
    import editlib.editing

    model, tok = loaded
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    real, calls = editlib.editing.apply_edit, []

    def second_fails(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("second request fails")
        return real(*a, **k)

    monkeypatch.setattr(editlib.editing, "apply_edit", second_fails)
    with pytest.raises(RuntimeError, match="second request"):
        with editlib.edit(model, tok, [request(10), request(11)], method="rome", layer=0, keep=True):
            pass
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def _fresh(tmp_path, monkeypatch):
    """A model no edit() has seen, a C0 cache of its own: (model, tok, its weights, fingerprint, log)."""
    from editlib.models import fingerprint

    model, tok = editlib.load_model(str(MINI))
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    return model, tok, {k: v.clone() for k, v in model.state_dict().items()}, fingerprint(model), []


def test_a_nested_edit_takes_c0_and_templates_from_the_unedited_model(tmp_path, monkeypatch) -> None:
    """An edit() inside another's block: the inner one collects C0 with the outer edit's layer
    swapped back to its original (no recollection, nothing filed under an edited model, nothing
    logged as changed), and both blocks leave the model as they found it."""
    model, tok, w0, fp0, logs = _fresh(tmp_path, monkeypatch)
    with editlib.edit(model, tok, [request(12)], method="memit", layer=0, log=logs.append):
        with editlib.edit(model, tok, [request(13)], method="memit", layer=2, log=logs.append) as inner:
            assert inner.stats["n_failed"] == 0
            with editlib.edit(model, tok, [request(14)], method="memit", layer=0, log=logs.append):
                pass
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert [p.name for p in (tmp_path / "stats").iterdir()] == [fp0]
    assert len([s for s in logs if "collecting" in s]) == 2, logs  # layer 0 once, layer 2 once
    assert not [s for s in logs if "unedited" in s], logs
    with editlib.edit(model, tok, [request(15)], method="memit", layer=0, log=logs.append):
        pass
    assert not [s for s in logs if "unedited" in s], logs


def test_an_edit_kept_inside_a_restored_block_stays_and_is_remembered(tmp_path, monkeypatch) -> None:
    """A kept inner edit on another layer survives the outer block's restore; its original is the
    unedited weight, so the next edit() still takes C0 from the unedited model, without a log line."""
    from editlib.arch import edit_weight

    model, tok, w0, fp0, logs = _fresh(tmp_path, monkeypatch)
    with editlib.edit(model, tok, [request(16)], method="memit", layer=0, log=logs.append):
        with editlib.edit(model, tok, [request(17)], method="memit", layer=2, keep=True, log=logs.append):
            pass
        kept = edit_weight(model, 2).detach().clone()
    assert torch.equal(edit_weight(model, 0), w0["model.layers.0.mlp.down_proj.weight"])
    assert torch.equal(edit_weight(model, 2), kept)
    assert not torch.equal(kept, w0["model.layers.2.mlp.down_proj.weight"])
    with editlib.edit(model, tok, [request(18)], method="memit", layer=1, log=logs.append):
        pass
    assert torch.equal(edit_weight(model, 2), kept)  # back after layer 1's C0 was collected
    assert [p.name for p in (tmp_path / "stats").iterdir()] == [fp0]
    assert not [s for s in logs if "unedited" in s], logs
    base = getattr(model, "_editlib_unedited")
    assert torch.equal(base.weights[2], w0["model.layers.2.mlp.down_proj.weight"]) and not base.frames


def test_layer_defaults_and_a_layer_window(loaded, tmp_path, monkeypatch) -> None:
    """Without layer=, the tiny params' singular layer ("best": none fixed) falls back to layer 1;
    layer=[0, 1] spreads one MEMIT edit over both layers (both weights change), not just the first;
    targets given as {"str": ...} are the strings themselves."""
    from editlib.arch import edit_weight
    from editlib.quick import request_record

    model, tok = loaded
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    w0 = {l: edit_weight(model, l).detach().clone() for l in range(3)}
    with editlib.edit(model, tok, [request(19)], method="memit") as e:
        assert [l for l in range(3) if not torch.equal(edit_weight(model, l), w0[l])] == [1]
    assert e.stats["layers"] == [1]
    with editlib.edit(model, tok, [request(20)], method="memit", layer=[0, 1]) as e:
        assert [l for l in range(3) if not torch.equal(edit_weight(model, l), w0[l])] == [0, 1]
    assert e.stats["layers"] == [0, 1] and e.stats["n_failed"] == 0
    assert all(torch.equal(edit_weight(model, l), w0[l]) for l in range(3))
    r = request_record({"prompt": "{} is in", "subject": "Oslo", "target_new": {"str": "Peru"},
                        "target_true": {"str": "Norway"}})
    assert (r.target_new.str, r.target_true.str) == ("Peru", "Norway")
