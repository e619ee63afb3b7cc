"""Shared fixtures: tiny random Llama models with BOS-adding tokenizers (built in memory, fast)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from editlib.records import Record

from _fixtures import WORDS, word_tokenizer  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(autouse=True, scope="session")
def single_threaded_suite():
    """The whole suite runs torch on one thread: its tiny models gain nothing from more, and a
    test's bitwise claims must not depend on which module ran before it (a product split over two
    threads may sum in another order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tiny_llama(vocab_size: int, seed: int = 0, bos: int = 1, eos: int = 2,
                    layers: int = 2) -> transformers.PreTrainedModel:
    """A random 2-layer Llama (hidden 32) in eval mode."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab_size,
                                   bos_token_id=bos, eos_token_id=eos, max_position_embeddings=256)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def make_word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The shared 18-word BOS tokenizer of :mod:`_fixtures` (one definition for all tests)."""
    return word_tokenizer()


@pytest.fixture(scope="session")
def word_lm():
    """(model, tokenizer) over the 18-word vocabulary: handy for hand-built prompts."""
    tok = make_word_tokenizer()
    return make_tiny_llama(len(tok), seed=0), tok


def _space_attached(tok, target: str) -> bool:
    """True when ``" " + target`` has no lone leading-space token. (``tokens.target_ids`` drops a
    lone "Ġ" as if it were sentencepiece's "▁", which mis-scores such byte-level targets; the
    fixture avoids them so that both alignments are well defined.)"""
    from editlib.tokens import target_ids

    return len(tok(" " + target)["input_ids"]) == len(target_ids(tok, target)) + 1


@pytest.fixture(scope="session")
def world_lm():
    """(model, tokenizer): a random Llama with a byte-level BPE tokenizer (BOS ``<s>`` = id 0, like
    the miniature's) trained on a synthetic world's texts; targets are multi-token."""
    from editlib.tiny import fact_units, train_tokenizer
    from editlib.tokens import prepare_tokenizer
    from editlib.world import make_world

    recs = make_world(16, seed=0)
    texts = fact_units(recs) + [p for r in recs for p in r.generation_prompts]
    tok = prepare_tokenizer(train_tokenizer(texts, 360))
    model = make_tiny_llama(len(tok), seed=1, bos=tok.bos_token_id, eos=tok.eos_token_id)
    return model, tok


@pytest.fixture(scope="session")
def world_records(world_lm) -> list[Record]:
    """Ten world records whose targets all tokenise with the leading space attached."""
    from editlib.world import make_world

    tok = world_lm[1]
    ok = [r for r in make_world(16, seed=0)
          if _space_attached(tok, r.target_new.str) and _space_attached(tok, r.target_true.str)]
    assert len(ok) >= 10
    return ok[:10]


@pytest.fixture(scope="session")
def world_model_dir(world_lm, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = world_lm
    path = tmp_path_factory.mktemp("world-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
