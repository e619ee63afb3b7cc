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


def test_the_second_model_runs_as_the_main_model_unless_set() -> None:
    """Figure 6's second model takes the main model's dtype, device and tf32 when its own are left
    out or null, so one `--set model.dtype=bfloat16` (the cost estimate's bfloat16 grid) runs
    Llama-2-7B in bfloat16 too; its own setting wins."""
    paper = REPO_ROOT / "params" / "llama3-8b.yaml"
    p = resolve(paper)
    assert (p.second_model.dtype, p.second_model.device, p.second_model.tf32) == ("float32", "cuda", False)
    p = resolve(paper, overrides=["model.dtype=bfloat16", "model.tf32=true"])
    assert (p.second_model.dtype, p.second_model.tf32, p.second_model.id) == ("bfloat16", True, "meta-llama/Llama-2-7b-hf")
    p = resolve(paper, overrides=["model.dtype=bfloat16", "second_model.dtype=float32"])
    assert (p.model.dtype, p.second_model.dtype) == ("bfloat16", "float32")
    tiny = resolve(REPO_ROOT / "params" / "tiny.yaml")
    assert (tiny.second_model.dtype, tiny.second_model.device, tiny.second_model.tf32) == ("float32", "cpu", False)


def test_a_new_model_file_does_not_inherit_the_label_and_extends_like_any_path(tmp_path, monkeypatch):
    """A params file or override for another model (a new model.id or tiny spec) does not keep the
    parent's label, which captions and result folders use (the model's folder name then serves); a
    label given with it is kept, and so is the parent's when the model is the same (a restated id,
    another device). extends: takes a file next to the child (with or without .yaml) before a
    repository path or a name in params/; --params resolves from any working directory."""
    from editlib.params import resolve

    (tmp_path / "new.yaml").write_text("extends: params/tiny.yaml\nname: new\nmodel:\n  id: models/tiny-world-4l\n"
                                       "second_model: null\n")
    (tmp_path / "named.yaml").write_text("extends: tiny\nname: named\nmodel:\n  id: models/tiny-world-4l\n"
                                         "  label: four\nsecond_model: null\n")
    (tmp_path / "child.yaml").write_text("extends: named.yaml\nname: child\nmodel:\n  id: models/tiny-world-4l\n")
    (tmp_path / "tiny.yaml").write_text("extends: params/tiny.yaml\nname: mine\nlayer_search:\n  n_facts: 7\n")
    (tmp_path / "bare.yaml").write_text("extends: tiny\nname: bare\n")
    monkeypatch.chdir(tmp_path)
    assert resolve(tmp_path / "new.yaml").model.label is None
    assert resolve(tmp_path / "named.yaml").model.label == "four"
    assert resolve(tmp_path / "child.yaml").model.label == "four"  # the same model restated: its label
    assert resolve(tmp_path / "bare.yaml").layer_search.n_facts == 7  # the tiny.yaml next to it, not params/tiny.yaml
    assert resolve("params/tiny.yaml").model.label == "tiny-world-6L"
    paper = REPO_ROOT / "params" / "llama3-8b.yaml"
    assert resolve(paper, overrides={"model.id": "meta-llama/Llama-2-7b-hf"}).model.label is None
    assert resolve(paper, overrides=["model.id=meta-llama/Llama-2-7b-hf", "model.label=L2"]).model.label == "L2"
    assert resolve(paper, overrides={"model.device": "cuda:1"}).model.label == "Llama-3-8B"
    assert resolve(paper, overrides={"second_model.device": "cuda:1"}).second_model.label == "Llama-2-7B"


@pytest.mark.parametrize("name, norm_lambda, hits", [("llama3-8b", 20.0, 2), ("llama2-7b", 10.0, 3)])
def test_paper_scale_encore_follows_its_official_config(name, norm_lambda, hits) -> None:
    """ENCORE's official configs (scalable-model-editing/encore hparams/ENCORE/<model>.json):
    mom2_update_weight 15000, add_prev_edits, update_norm_lambda 20 / 10 and prob_cutoff -2 / -3,
    its most-probable early stopping at the 2nd / 3rd hit."""
    hp = resolve(REPO_ROOT / "params" / f"{name}.yaml").method_hparams("encore", 1, "sequential")
    assert (hp.mom2_update_weight, hp.update_norm_lambda, hp.add_prev_edits) == (15000.0, norm_lambda, True)
    assert (hp.values.early_stop, hp.values.mpes_hits) == ("mpes", hits)
