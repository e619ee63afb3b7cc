"""Teacher-forced scoring's tokenisation cache (editlib.scoring): kept per tokenizer across calls,
renewed when the vocabulary changes."""
from __future__ import annotations

import numpy as np
import torch

from _fixtures import WORDS, one_thread, tiny_llama, word_tokenizer  # noqa: F401
from editlib.scoring import score_targets


def pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefixes = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
    targets = [" ".join(rng.choice(WORDS, size=rng.integers(1, 3))) for _ in range(n)]
    return prefixes, targets


def test_token_cache_is_kept_per_tokenizer_and_renewed_when_tokens_are_added(monkeypatch) -> None:
    """score_targets keeps one tokenisation per string across calls (editlib.scoring._tok_cache for
    targets, editlib.tokens.encode's memo for prefixes): the same scores again without calling the
    tokenizer, per tokenizer and alignment; adding a token to the vocabulary starts new memos, so
    its ids are used."""
    from editlib import scoring, tokens

    tok = word_tokenizer()
    model = tiny_llama(len(tok) + 1, dtype=torch.float64)
    prefixes, targets = pairs(12, seed=11)
    first = score_targets(model, tok, prefixes, targets).nll
    cache = scoring._tok_cache(tok, "correct")
    assert targets[0] in cache._target and prefixes[0] in tokens._ENCODED[tok][len(tok)]
    calls = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, **k: calls.append(text) or real(self, text, **k))
    again = score_targets(model, tok, prefixes, targets).nll
    assert calls == [] and np.array_equal(first, again)  # nothing tokenised twice
    assert scoring._tok_cache(tok, "reference") is not cache and scoring._tok_cache(word_tokenizer(), "correct") is not cache
    tok.add_tokens(["zzznew"])
    assert scoring._tok_cache(tok, "correct") is not cache
    assert tokens.encode(tok, "zzznew " + prefixes[0]) == list(real(tok, "zzznew " + prefixes[0])["input_ids"])
    score_targets(model, tok, [prefixes[0]], targets[:1])
    assert prefixes[0] in calls  # the new vocabulary's memo tokenises afresh


def test_scoring_and_key_forwards_fill_no_kv_cache(monkeypatch) -> None:
    """Scoring, keys and current values read hidden states once: their forwards must not fill a
    KV cache (transformers' default use_cache=True would, 1 MiB per token for Llama-2 in float32)."""
    from transformers import cache_utils

    from editlib.reprs import compute_keys, current_values
    from _fixtures import CTX, FACTS

    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    updates = []
    real = cache_utils.DynamicCache.update
    monkeypatch.setattr(cache_utils.DynamicCache, "update",
                        lambda self, *a, **k: updates.append(1) or real(self, *a, **k))
    model(input_ids=torch.tensor([[1, 5, 6]]))  # the spy sees a default forward's cache
    assert updates
    updates.clear()
    prefixes, targets = pairs(6, seed=3)
    score_targets(model, tok, prefixes, targets)
    compute_keys(model, tok, FACTS, 1, CTX)
    current_values(model, tok, FACTS, 1)
    assert updates == []


def test_the_token_caches_let_a_tokenizer_go() -> None:
    """The per-tokenizer caches are weakly keyed and must not keep their tokenizer alive (a
    notebook that closes one model's study and opens another's would hold both, with every
    string they tokenised)."""
    import gc
    import weakref

    from editlib import scoring, tokens

    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    score_targets(model, tok, *pairs(3, seed=5))
    assert tok in scoring._TOK_CACHES and tok in tokens._ENCODED
    gone = weakref.ref(tok)
    del tok
    gc.collect()
    assert gone() is None
