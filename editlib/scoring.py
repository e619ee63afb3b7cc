"""Teacher-forced target scoring: the probability test behind ES / PS / NS (SPEC §6).

For each (prefix, target) pair the model reads ``prefix_ids + target_ids`` (see :mod:`editlib.tokens`)
and we return the mean per-token NLL of the target and whether every target token is the argmax.

``alignment="correct"`` (default) scores exactly the target's tokens. ``alignment="reference"``
reproduces the reference evaluation on BOS-adding tokenizers (SPEC §8.1): the scored ids are
``tok(" " + target).input_ids`` *with* BOS and position j is read from logit ``prefix_len + j - 1``,
so every position is shifted by one (it scores BOS after the prefix, then the probability of
repeating the target). On tokenizers without BOS, and on sentencepiece tokenizers (Llama-2), both
alignments coincide.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .arch import backbone_and_head
from .below import plain_forward
from .tokens import encode, pad_right, target_ids, tokenizer_memo, with_space

ALIGNMENTS = ("correct", "reference")


@dataclass
class TargetScores:
    nll: np.ndarray       # [n] mean per-token negative log-likelihood of the target
    correct: np.ndarray   # [n] bool: every scored token is the argmax at its position


class _TokCache:
    """One tokenisation per distinct target string (:func:`_tok_cache`: kept per tokenizer across
    calls); prefixes are remembered by :func:`editlib.tokens.encode` itself."""

    def __init__(self, tok, alignment: str):
        try:  # weakly: _TOK_CACHES is keyed by the tokenizer, and a strong reference would keep it forever
            self._tok = weakref.ref(tok)
        except TypeError:  # not weak-referenceable (then never kept in _TOK_CACHES either)
            self._tok = lambda: tok
        self.alignment = alignment
        self._target: dict[str, list[int]] = {}
        self._scored: dict[str, list[int]] = {}

    @property
    def tok(self):
        return self._tok()

    def prefix(self, s: str) -> list[int]:
        return encode(self.tok, s)

    def target(self, s: str) -> list[int]:
        if s not in self._target:
            self._target[s] = target_ids(self.tok, s)
        return self._target[s]

    def scored(self, s: str) -> list[int]:
        """The ids whose log-probs are read (differs from :meth:`target` only in reference mode)."""
        if self.alignment == "correct":
            return self.target(s)
        if s not in self._scored:
            self._scored[s] = reference_scored(self.tok, s, self.target(s))
        return self._scored[s]


def reference_scored(tok, target: str, ids: list[int]) -> list[int]:
    """The reference evaluation's scored ids of ``target`` (SPEC §8.1), given its correct ids:
    ``tok(" " + target)`` with special tokens, i.e. one leading BOS (Llama-3: every position read
    one early) or none. On Llama-2 the reference strips BOS and the lone "▁" that its legacy
    sentencepiece tokenizer puts before the target (its ``[2:]``), which is the correct alignment:
    so a tokenizer that marks word starts with sentencepiece's "▁" is read correctly, whether it
    gives that lone "▁" or (transformers 5's Llama-2 tokenizer: no legacy normalizer) not. Anything
    else has no reference reading: a ValueError naming the target."""
    full = list(tok(with_space(target))["input_ids"])
    if full[1:] == ids and _sentencepiece_words(tok, ids):  # BOS + the target: Llama-2 without the lone "▁"
        return list(ids)
    if full == ids or full[1:] == ids:
        return full
    if full[2:] == ids:
        return list(ids)
    raise ValueError(f"evaluation.alignment 'reference': the tokenizer encodes {with_space(target)!r} as {full}, "
                     f"which is neither the target's ids {ids} nor them after one BOS (or BOS and a lone '▁'); "
                     f"the reference's scoring is undefined here: use alignment 'correct'")


def _sentencepiece_words(tok, ids: list[int]) -> bool:
    """Whether the target's first piece starts with sentencepiece's word marker "▁" (Llama-2), not
    byte-level BPE's "Ġ" (Llama-3, GPT-2). It stands in for the reference's test of the model's
    name ("llama-2" in its path), which editlib does not read: so every sentencepiece tokenizer
    (Mistral's, Gemma's too) is read as the reference reads Llama-2, where the reference itself
    would shift the other models as it shifts Llama-3; the paper's models are Llama-3 and Llama-2."""
    pieces = tok.convert_ids_to_tokens(list(ids[:1]))
    return bool(pieces) and isinstance(pieces[0], str) and pieces[0].startswith("\u2581")


#: per tokenizer (weakly held), per alignment and vocabulary size: the caches that score_targets
#: reuses, so the same prompts evaluated again (every batch size and method of the batch protocol,
#: every layer of the layer search, each degradation measurement of the same held-out facts) are
#: not tokenised again. Bounded: a cache past _TOK_CACHE_MAX strings starts over.
_TOK_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_TOK_CACHE_MAX = 500_000


def _tok_cache(tok, alignment: str) -> _TokCache:
    """The tokenizer's persistent cache for ``alignment`` (a fresh one, for this call only, if it
    cannot be kept)."""
    cache = tokenizer_memo(_TOK_CACHES, tok, lambda: _TokCache(tok, alignment),
                           lambda c: len(c._target) + len(c._scored), _TOK_CACHE_MAX, tag=alignment)
    return _TokCache(tok, alignment) if cache is None else cache


def _read_plan(cache: _TokCache, prefix: str, target: str) -> tuple[tuple[int, ...], list[int], list[int]]:
    """(input ids, logit positions, label ids) of one pair. Position j of the scored ids is read
    from logit ``len(prefix) + j - 1``; the input stops at the last position read (logits there do
    not depend on later tokens), so a one-token target needs only the prefix itself."""
    p = cache.prefix(prefix)
    lab = cache.scored(target)
    cols = [len(p) + j - 1 for j in range(len(lab))]
    ids = (p + cache.target(target))[: max(cols) + 1]
    return tuple(ids), cols, list(lab)


def score_pairs(model, tok, prefixes: Sequence[str], targets_a: Sequence[str], targets_b: Sequence[str],
                **kw) -> tuple[TargetScores, TargetScores]:
    """Scores of ``targets_a[i]`` and ``targets_b[i]`` after ``prefixes[i]`` in one
    :func:`score_targets` call, so each prompt with one-token targets runs once."""
    n = len(prefixes)
    if kw.get("groups") is not None:
        kw["groups"] = [*kw["groups"], *kw["groups"]]
    both = score_targets(model, tok, [*prefixes, *prefixes], [*targets_a, *targets_b], **kw)
    return (TargetScores(both.nll[:n], both.correct[:n]), TargetScores(both.nll[n:], both.correct[n:]))


@torch.no_grad()
def score_targets(model, tok, prefixes: Sequence[str], targets: Sequence[str], *,
                  alignment: str = "correct", batch_size: int = 128,
                  groups: Sequence[int] | None = None, deltas=None, below=None) -> TargetScores:
    """Mean-token NLL and all-argmax flag of ``targets[i]`` after ``prefixes[i]``, batched.

    Pairs whose model inputs coincide share one sequence: scoring ``target_new`` and
    ``target_true`` after the same prompt in one call runs each prompt once when both targets
    are single tokens. Logits are computed only at the positions read.

    ``groups[i]`` / ``deltas``: pair i is scored under independent edit ``groups[i]`` of an active
    :class:`editlib.lowrank.RowDeltas` hook (-1: unedited), so many edits are scored in one pass;
    sequences are shared only within a group. ``below``: an :class:`editlib.below.SharedBelow`
    that runs the blocks below the edited layer once for batches another call already ran."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if len(prefixes) != len(targets):
        raise ValueError("prefixes and targets must have the same length")
    n = len(prefixes)
    nll = np.zeros(n, dtype=np.float64)
    correct = np.zeros(n, dtype=bool)
    if n == 0:
        return TargetScores(nll, correct)
    if (groups is None) != (deltas is None):
        raise ValueError("groups and deltas go together")
    if groups is not None and len(groups) != n:
        raise ValueError("groups must have one entry per pair")
    grp = [-1] * n if groups is None else [int(g) for g in groups]
    cache = _tok_cache(tok, alignment)
    plans = [_read_plan(cache, prefixes[i], targets[i]) for i in range(n)]
    seq_of: dict[tuple, int] = {}
    for i, (ids, _, _) in enumerate(plans):
        seq_of.setdefault((grp[i], ids), len(seq_of))
    unique = [ids for _, ids in seq_of]
    unique_group = [g for g, _ in seq_of]
    readers: list[list[int]] = [[] for _ in unique]  # pairs read from each unique sequence
    for i, (ids, _, _) in enumerate(plans):
        readers[seq_of[(grp[i], ids)]].append(i)
    backbone, head = backbone_and_head(model)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # sort by length so batches are tight; results go back to input order
    order = sorted(range(len(unique)), key=lambda u: len(unique[u]))
    for start in range(0, len(order), batch_size):
        useqs = order[start:start + batch_size]
        rows, cols, labels, owner = [], [], [], []
        pairs = [i for u in useqs for i in readers[u]]
        slot = {i: k for k, i in enumerate(pairs)}
        for b, u in enumerate(useqs):
            for i in readers[u]:
                _, c, lab = plans[i]
                rows += [b] * len(c)
                cols += c
                labels += lab
                owner += [slot[i]] * len(c)
        ids, mask = pad_right([list(unique[u]) for u in useqs], pad)
        if deltas is not None:
            deltas.rows = torch.as_tensor([unique_group[u] for u in useqs], dtype=torch.long)
        hidden = (plain_forward(backbone, ids.to(device), mask.to(device)) if below is None
                  else below.forward(backbone, ids, mask, device))
        r = torch.as_tensor(rows, device=device)
        c = torch.as_tensor(cols, device=device)
        lab = torch.as_tensor(labels, device=device)
        picked = head(hidden[r, c]).float()
        tok_nll = -torch.log_softmax(picked, dim=-1).gather(1, lab[:, None])[:, 0]
        tok_ok = picked.argmax(-1) == lab
        own = torch.as_tensor(owner, device=device)
        k = len(pairs)
        sums = torch.zeros(k, device=device, dtype=torch.float32).index_add_(0, own, tok_nll)
        counts = torch.zeros(k, device=device).index_add_(0, own, torch.ones_like(tok_nll))
        bad = torch.zeros(k, device=device).index_add_(0, own, (~tok_ok).float())
        nll[pairs] = (sums / counts).double().cpu().numpy()
        correct[pairs] = (bad == 0).cpu().numpy()
    if deltas is not None:
        deltas.rows = None
    return TargetScores(nll, correct)

