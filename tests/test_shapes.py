"""The Llama-3-8B-shaped slice builder (editlib.shapes) on small configs, and the prefill of
generation projecting only the sampled position to the vocabulary."""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from editlib import generation, shapes
from editlib.models import load_model
from editlib.paths import REPO_ROOT


def small_config(vocab: int = 3072):
    return transformers.LlamaConfig(hidden_size=16, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def test_llama3_8b_config_shapes():
    c = shapes.llama3_8b_config(2)
    got = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
           c.vocab_size, c.max_position_embeddings, c.rms_norm_eps, c.rope_parameters["rope_theta"],
           c.tie_word_embeddings, c.bos_token_id, c.eos_token_id, c.num_hidden_layers)
    assert got == (4096, 14336, 32, 8, 128, 128256, 8192, 1e-5, 500000.0, False, 128000, 128001, 2)
    with pytest.raises(ValueError):
        shapes.llama3_8b_config(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_weights_load_and_are_seeded(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(shapes, "CHUNK_BYTES", 4096)  # many chunks per tensor
    cfg = small_config()
    n = shapes.write_random_weights(tmp_path / "model.safetensors", cfg, seed=3, dtype=dtype)
    cfg.save_pretrained(tmp_path)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    sd = m.state_dict()
    assert n == sum(p.numel() for p in m.parameters())
    assert torch.equal(sd["model.layers.1.input_layernorm.weight"], torch.ones(16))
    w = sd["model.embed_tokens.weight"]
    assert abs(w.std().item() - 0.02) < 2e-3 and abs(w.mean().item()) < 1e-3
    again = tmp_path / "again.safetensors"
    shapes.write_random_weights(again, cfg, seed=3, dtype=dtype)
    assert again.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    shapes.write_random_weights(again, cfg, seed=4, dtype=dtype)
    assert again.read_bytes() != (tmp_path / "model.safetensors").read_bytes()


def test_build_is_idempotent_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "llama3_8b_config", lambda n_layers=2: small_config())
    out = tmp_path / "slice"
    logs = []
    tok_dir = REPO_ROOT / "models" / "tiny-world"
    shapes.build_llama3_shape_model(out, 2, seed=0, tokenizer=tok_dir, log=logs.append)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    shapes.build_llama3_shape_model(out, 2, seed=0, tokenizer=tok_dir, log=logs.append)
    assert "already built" in logs[-1] and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / shapes.SHAPE_MARKER).read_text())["seed"] == 0
    shapes.build_llama3_shape_model(out, 2, seed=1, tokenizer=tok_dir, log=logs.append)  # other seed: rebuilt
    assert json.loads((out / shapes.SHAPE_MARKER).read_text())["seed"] == 1
    model, tok = load_model(str(out))
    assert model.config.num_hidden_layers == 2 and tok("a b")["input_ids"][0] == tok.bos_token_id


def test_draw_device_is_part_of_a_build(tmp_path, monkeypatch):
    """A marker written before draw_device existed counts as a CPU draw (not rebuilt); another draw
    device is another model (rebuilt); an unusable one fails before any file is written."""
    monkeypatch.setattr(shapes, "llama3_8b_config", lambda n_layers=2: small_config())
    out, tok_dir, logs = tmp_path / "slice", REPO_ROOT / "models" / "tiny-world", []
    shapes.build_llama3_shape_model(out, 2, tokenizer=tok_dir, log=logs.append)
    marker = json.loads((out / shapes.SHAPE_MARKER).read_text())
    assert marker["draw_device"] == "cpu"
    del marker["draw_device"]
    (out / shapes.SHAPE_MARKER).write_text(json.dumps(marker))
    shapes.build_llama3_shape_model(out, 2, tokenizer=tok_dir, log=logs.append)
    assert "already built" in logs[-1]
    calls = []
    monkeypatch.setattr(shapes, "write_random_weights", lambda *a, **k: calls.append(k["draw_device"]) or 1)
    shapes.build_llama3_shape_model(out, 2, tokenizer=tok_dir, draw_device="meta", log=logs.append)
    assert calls == ["meta"] and json.loads((out / shapes.SHAPE_MARKER).read_text())["draw_device"] == "meta"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_draw_device_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="draw_device 'cuda'"):
        shapes.write_random_weights(tmp_path / "m.safetensors", small_config(), draw_device="cuda")
    assert not list(tmp_path.iterdir())


def test_build_with_the_real_llama3_tokenizer(tmp_path, monkeypatch):
    llama3 = pytest.importorskip("editlib.llama3_tokenizer")
    try:
        llama3.llama3_tokenizer_file()
    except llama3.TokenizerUnavailable as e:
        pytest.skip(str(e))
    monkeypatch.setattr(shapes, "llama3_8b_config", lambda n_layers=2: small_config(vocab=128256))
    out = shapes.build_llama3_shape_model(tmp_path / "s", 2, log=lambda *_: None)
    model, tok = load_model(str(out))
    ids = tok("Danielle Darrieux's mother tongue is")["input_ids"]
    assert ids[0] == 128000 and len(tok) == 128256
    assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == 128256


def test_generation_prefill_projects_only_the_last_position(word_lm):
    """sample_texts feeds the shortest prompt's tokens at once; only its last position is sampled
    from, so the LM head must see one row per prompt there, not one per prompt token."""
    model, tok = word_lm
    rows: list[int] = []
    h = model.lm_head.register_forward_hook(lambda m, i, o: rows.append(i[0].numel() // i[0].shape[-1]))
    try:
        prompts = ["the cat sat on the mat", "a dog ran", "the red fox"]
        texts = generation.sample_texts(model, tok, prompts, max_len=12, seed=0)
    finally:
        h.remove()
    assert len(texts) == 3 and max(rows) == 3  # 3 prompts per step, whatever their lengths
