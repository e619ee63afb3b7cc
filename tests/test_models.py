"""editlib.models: offline loading from a local directory, fail-fast errors, fingerprint."""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import pytest
import torch
import transformers

from editlib.arch import UnsupportedArchitecture, edit_weight, n_layers, weight_out_in
from editlib.models import ModelNotFound, fingerprint, load_model

from _fixtures import WORDS, word_tokenizer  # noqa: E402


def tiny_llama(seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The shared 18-word BOS tokenizer (without editlib's padding conventions applied)."""
    tok = word_tokenizer()
    tok.pad_token = None
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_load_from_local_dir(model_dir: Path) -> None:
    model, tok = load_model(str(model_dir))
    assert model.config.model_type == "llama"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.padding_side == "right" and tok.pad_token_id == tok.eos_token_id  # prepare_tokenizer
    ids = tok("the cat sat", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_weights_are_placed_as_they_are_read(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With accelerate (the .[gpu] extra, in .[dev]) from_pretrained gets device_map {"": device}, so a
    GPU model is never first built in host memory; the weights, buffers and logits equal those of
    loading on the host and moving (the path without accelerate)."""
    import importlib.util

    from editlib import models

    pytest.importorskip("accelerate")
    assert models.placement("cpu") == {"device_map": {"": torch.device("cpu")}}
    ids = torch.tensor([[1, 5, 9, 3]])
    placed, _ = load_model(str(model_dir))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    assert models.placement("cpu") == {}
    with pytest.warns(RuntimeWarning, match="accelerate is not installed: the model is built in host memory"):
        assert models.placement("cuda") == {}  # a GPU model then goes through host memory: said once per load
    moved, _ = load_model(str(model_dir))
    a = {**dict(placed.named_parameters()), **dict(placed.named_buffers())}
    b = {**dict(moved.named_parameters()), **dict(moved.named_buffers())}
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, moved(ids).logits)


def test_load_bfloat16(model_dir: Path) -> None:
    model, _ = load_model(str(model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(str(model_dir), dtype="auto")
    assert next(model.parameters()).dtype == torch.float32  # the checkpoint's dtype


def test_bad_dtype(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="float64"):
        load_model(str(model_dir), dtype="float64")


@pytest.mark.parametrize("cache_dir", [None, "empty"])
def test_missing_hub_id_offline_fails_fast(tmp_path: Path, cache_dir: str | None) -> None:
    repo = "editlib-tests/definitely-not-a-cached-model"
    start = time.monotonic()
    with pytest.raises(ModelNotFound) as exc:
        load_model(repo, cache_dir=None if cache_dir is None else str(tmp_path))
    assert time.monotonic() - start < 2.0
    assert repo in str(exc.value)
    assert "local directory" in str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)


def test_local_files_only_without_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(ModelNotFound):
        load_model("editlib-tests/not-cached", local_files_only=True, cache_dir=str(tmp_path))
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("rel", ["./no/such/model", "missing-dir/sub/model", "/nonexistent/editlib/model"])
def test_missing_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rel: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(rel)


def test_missing_slice_says_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound, match=r"does not exist; build it with `python bench/build_llama3_slice.py --layers 3`"):
        load_model(".cache/llama3-8b-shape-3L")
    with pytest.raises(ModelNotFound, match="save_pretrained"):  # any other missing directory
        load_model(".cache/llama3-8b-shape")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_arch_fails_before_weights(tmp_path: Path) -> None:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)
    cfg.save_pretrained(tmp_path)  # config only: no weights to load
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="bert"):
        load_model(str(tmp_path))


def test_fingerprint_stable_across_loads(model_dir: Path) -> None:
    a, _ = load_model(str(model_dir))
    b, _ = load_model(str(model_dir))
    fp = fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert fingerprint(b) == fp
    assert fingerprint(a) == fp  # deterministic on the same object
    # The in-memory original and its saved/reloaded copy are the same model.
    assert fingerprint(tiny_llama(seed=0)) == fp


def test_fingerprint_changes_with_one_down_proj_element(model_dir: Path) -> None:
    model, _ = load_model(str(model_dir))
    fp = fingerprint(model)
    w = weight_out_in(model, n_layers(model) - 1)
    original = w[3, 5].item()  # flat index 197: not on the sampling stride
    with torch.no_grad():
        w[3, 5] = original + 1e-3
    assert fingerprint(model) != fp
    with torch.no_grad():
        w[3, 5] = original
    assert fingerprint(model) == fp
    with torch.no_grad():
        edit_weight(model, 0).view(-1)[-1] *= -1.0
    assert fingerprint(model) != fp


def test_fingerprint_bfloat16(model_dir: Path) -> None:
    fp32, _ = load_model(str(model_dir))
    bf16, _ = load_model(str(model_dir), dtype="bfloat16")
    fp = fingerprint(bf16)
    assert fp == fingerprint(load_model(str(model_dir), dtype="bfloat16")[0])
    assert fp != fingerprint(fp32)
    with torch.no_grad():
        weight_out_in(bf16, 0)[7, 9] += 1.0
    assert fingerprint(bf16) != fp


def test_fingerprint_differs_between_inits_and_configs() -> None:
    assert fingerprint(tiny_llama(seed=0)) != fingerprint(tiny_llama(seed=1))
    a = tiny_llama(seed=0)
    b = tiny_llama(seed=0)
    b.config.rms_norm_eps = 1e-5
    assert fingerprint(a) != fingerprint(b)


def test_fingerprint_ignores_load_time_config_keys() -> None:
    model = tiny_llama(seed=0)
    fp = fingerprint(model)
    model.config._name_or_path = "/somewhere/else"
    model.config.use_cache = False
    assert fingerprint(model) == fp
    assert "_name_or_path" in json.loads(model.config.to_json_string(use_diff=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fingerprint_device_independent() -> None:
    model = tiny_llama(seed=0)
    fp = fingerprint(model)
    assert fingerprint(model.to("cuda")) == fp
    assert fingerprint(model.to("cpu")) == fp


def test_a_model_saved_without_its_tokenizer_fails_before_loading(model_dir: Path, tmp_path: Path) -> None:
    """transformers builds an empty tokenizer for some configs (Qwen2, GPT-2) when none was saved,
    and the run died much later reshaping 0 elements: the folder is refused first, by name."""
    from editlib.models import ModelLoadError, check_model_dir

    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(model_dir / f)
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*no tokenizer files.*tokenizer.save_pretrained"):
        check_model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(str(tmp_path))


def test_a_tokenizer_the_model_cannot_run_is_named(model_dir: Path) -> None:
    """An empty tokenizer, or one whose ids (text, BOS, EOS, pad) pass the embedding's rows, fails
    at load with the folder named, not as an index error inside C0 or the value optimisation."""
    from editlib.models import ModelLoadError, check_tokenizer

    model, tok = load_model(str(model_dir))
    check_tokenizer(tok, model, "m")
    import tokenizers
    empty = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({"</s>": 0}, unk_token="</s>")),
        eos_token="</s>")
    empty.backend_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    empty.backend_tokenizer.model = tokenizers.models.BPE({}, [])  # no vocabulary: any text -> no ids
    with pytest.raises(ModelLoadError, match="m: its tokenizer turns text into no ids"):
        check_tokenizer(empty, model, "m")
    tok.add_special_tokens({"pad_token": "<extra_pad>"})  # a new id, past an embedding sized for the rest
    rows = tok.pad_token_id
    small = types.SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(rows, 2))
    with pytest.raises(ModelLoadError, match=rf"\{{'pad': {rows}\}} are past the model's {rows} embedding rows"):
        check_tokenizer(tok, small, "m")
