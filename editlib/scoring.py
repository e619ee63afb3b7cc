"""Teacher-forced target scoring: the probability test behind ES / PS / NS (SPEC §6).

For each (prefix, target) pair the model reads ``prefix_ids + target_ids`` (see :mod:`editlib.tokens`)
and we return the mean per-token NLL of the target and whether every target token is the argmax.

``alignment="correct"`` (default) scores exactly the target's tokens. ``alignment="reference"``
reproduces the reference evaluation on BOS-adding tokenizers (SPEC §8.1): the scored ids are
``tok(" " + target).input_ids`` *with* BOS and position j is read from logit ``prefix_len + j - 1``,
so every position is shifted by one (it scores BOS after the prefix, then the probability of
repeating the target). On tokenizers without BOS both alignments coincide.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .tokens import encode, pad_right, target_ids, with_space

ALIGNMENTS = ("correct", "reference")


@dataclass
class TargetScores:
    nll: np.ndarray       # [n] mean per-token negative log-likelihood of the target
    correct: np.ndarray   # [n] bool: every scored token is the argmax at its position


class _TokCache:
    """One tokenisation per distinct string."""

    def __init__(self, tok, alignment: str):
        self.tok, self.alignment = tok, alignment
        self._prefix: dict[str, list[int]] = {}
        self._target: dict[str, list[int]] = {}
        self._scored: dict[str, list[int]] = {}

    def prefix(self, s: str) -> list[int]:
        if s not in self._prefix:
            self._prefix[s] = encode(self.tok, s)
        return self._prefix[s]

    def target(self, s: str) -> list[int]:
        if s not in self._target:
            self._target[s] = target_ids(self.tok, s)
        return self._target[s]

    def scored(self, s: str) -> list[int]:
        """The ids whose log-probs are read (differs from :meth:`target` only in reference mode)."""
        if self.alignment == "correct":
            return self.target(s)
        if s not in self._scored:
            self._scored[s] = list(self.tok(with_space(s))["input_ids"])
        return self._scored[s]


@torch.no_grad()
def score_targets(model, tok, prefixes: Sequence[str], targets: Sequence[str], *,
                  alignment: str = "correct", batch_size: int = 128) -> TargetScores:
    """Mean-token NLL and all-argmax flag of ``targets[i]`` after ``prefixes[i]``, batched."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if len(prefixes) != len(targets):
        raise ValueError("prefixes and targets must have the same length")
    n = len(prefixes)
    nll = np.zeros(n, dtype=np.float64)
    correct = np.zeros(n, dtype=bool)
    if n == 0:
        return TargetScores(nll, correct)
    cache = _TokCache(tok, alignment)
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # sort by length so batches are tight; results go back to input order
    order = sorted(range(n), key=lambda i: len(cache.prefix(prefixes[i])) + len(cache.target(targets[i])))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        seqs, rows, cols, labels, owner = [], [], [], [], []
        for b, i in enumerate(idx):
            p = cache.prefix(prefixes[i])
            seqs.append(p + cache.target(targets[i]))
            for j, t in enumerate(cache.scored(targets[i])):
                rows.append(b)
                cols.append(len(p) + j - 1)
                labels.append(t)
                owner.append(b)
        ids, mask = pad_right(seqs, pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        r = torch.as_tensor(rows, device=device)
        c = torch.as_tensor(cols, device=device)
        lab = torch.as_tensor(labels, device=device)
        picked = logits[r, c].float()
        tok_nll = -torch.log_softmax(picked, dim=-1).gather(1, lab[:, None])[:, 0]
        tok_ok = picked.argmax(-1) == lab
        own = torch.as_tensor(owner, device=device)
        sums = torch.zeros(len(idx), device=device, dtype=torch.float32).index_add_(0, own, tok_nll)
        counts = torch.zeros(len(idx), device=device).index_add_(0, own, torch.ones_like(tok_nll))
        bad = torch.zeros(len(idx), device=device).index_add_(0, own, (~tok_ok).float())
        nll[idx] = (sums / counts).double().cpu().numpy()
        correct[idx] = (bad == 0).cpu().numpy()
    return TargetScores(nll, correct)
