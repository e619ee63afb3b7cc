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


def test_token_cache_is_kept_per_tokenizer_and_renewed_when_tokens_are_added() -> None:
    """score_targets keeps one tokenisation per string across calls (editlib.scoring._tok_cache):
    the same scores again without re-tokenising, per tokenizer and alignment; adding a token to the
    vocabulary starts a new cache, so its ids are used."""
    from editlib import scoring

    tok = word_tokenizer()
    model = tiny_llama(len(tok) + 1, dtype=torch.float64)
    prefixes, targets = pairs(12, seed=11)
    first = score_targets(model, tok, prefixes, targets).nll
    cache = scoring._tok_cache(tok, "correct")
    assert prefixes[0] in cache._prefix
    calls = []
    real = scoring.encode
    scoring.encode = lambda t, s: calls.append(s) or real(t, s)
    try:
        again = score_targets(model, tok, prefixes, targets).nll
        assert calls == [] and np.array_equal(first, again)  # nothing tokenised twice
        assert scoring._tok_cache(tok, "reference") is not cache and scoring._tok_cache(word_tokenizer(), "correct") is not cache
        tok.add_tokens(["zzznew"])
        assert scoring._tok_cache(tok, "correct") is not cache
        score_targets(model, tok, ["zzznew " + prefixes[0]], targets[:1])
        assert calls  # the new vocabulary's cache tokenises afresh
    finally:
        scoring.encode = real
