"""Model degradation beside the edit scores (issue #15): how much a sequentially edited model still
knows of facts nobody edited, and how well it still models its own text.

* **Held-out known facts**: facts of the same seeded ordering that the run does *not* edit (taken
  after the edited ones) and whose rewrite prompt is none of the edited facts' neighbourhood
  prompts, so they are disjoint from both the edited and the NS sets. On the unedited miniature
  every record is a known fact. Measured as the share whose true target still beats the
  counterfactual one (``heldout_known``, % — 100 − ES of an unedited fact) and the mean
  probability margin P(true) − P(new) (``heldout_margin``, ×100).
* **Perplexity** of the held-out facts' sentences (rewrite prompt + true target): text of the
  miniature's own training distribution that the edits did not touch (``heldout_ppl``). At paper
  scale the same sentences are CounterFact facts the model was not asked to change.

:func:`measure` returns the three numbers; the sequential protocol records them after every
``sequential.degradation_every`` edited facts (and at its end) in ``batches.parquet``, with the
unedited model's values as ``*_0`` for reference.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .records import Record
from .tokens import encode, pad_right, with_space

KEYS = ("heldout_known", "heldout_margin", "heldout_ppl")


def due(every: int | None, start: int, stop: int, last: bool) -> bool:
    """Whether a measurement follows the batch of facts ``start:stop`` of a sequential run: it
    crossed a multiple of ``every`` edited facts, or it is the run's last (``every`` None: last only)."""
    return last or (every is not None and stop // every > start // every)


def pool_size(n_records: int, n_edited: int, n_heldout: int) -> int:
    """How many facts of an ordering a sequential run draws: its ``n_edited`` and after them a pool
    of 4 × ``n_heldout`` candidates for :func:`heldout_facts` (at most every record)."""
    return min(n_records, n_edited + 4 * n_heldout)


def heldout_facts(pool: Sequence[Record], edited: Sequence[Record], n: int) -> list[Record]:
    """The first ``n`` records of ``pool`` that are not edited and whose rewrite prompt is not
    one of the edited facts' neighbourhood prompts (nor shares a subject with an edited fact)."""
    ids = {r.case_id for r in edited}
    subjects = {r.subject for r in edited}
    neighbours = {p.strip() for r in edited for p in r.neighborhood_prompts}
    out = [r for r in pool if r.case_id not in ids and r.subject not in subjects
           and r.rewrite_prompt.strip() not in neighbours]
    return out[:n]


def sentences(records: Sequence[Record]) -> list[str]:
    """Each record's fact as a sentence: its rewrite prompt followed by the true target."""
    return [r.rewrite_prompt + with_space(r.target_true.str) for r in records]


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str], batch_size: int = 32) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of ``texts``
    (each encoded at the start of a sequence, with BOS when the tokenizer adds one)."""
    seqs = [encode(tok, t) for t in texts]
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise ValueError("no text with at least two tokens to score")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[i:i + batch_size], pad)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        nll -= float(lp[keep].double().sum())
        count += int(keep.sum())
    return math.exp(nll / count)


def measure(model, tok, heldout: Sequence[Record], evaluate: Callable[[Sequence[Record]], pd.DataFrame],
            batch_size: int = 32) -> dict[str, float]:
    """``heldout_known`` (%), ``heldout_margin`` (×100) and ``heldout_ppl`` of the model as it is
    now; ``evaluate`` scores records: the study's evaluation, of which ES and ES_mag (the rewrite
    prompt) are read, so it need score nothing else (the protocol scores the rewrite prompts alone)."""
    if not heldout:
        raise ValueError("no held-out facts to measure degradation on")
    c = evaluate(heldout)
    es = c["ES"].to_numpy(dtype=float)
    mag = c["ES_mag"].to_numpy(dtype=float)  # P(new) − P(true) on the rewrite prompt
    unscored = np.isnan(es)  # NaN/inf outputs (metrics.evaluate_records): such a fact is not known
    out = {"heldout_known": float(100 * np.nanmean(np.where(unscored, 0.0, 1 - es))),
           "heldout_margin": float(-100 * np.nanmean(mag)),
           "heldout_ppl": perplexity(model, tok, sentences(heldout), batch_size)}
    if unscored.any():  # the margin is over the scored facts only: say how many were not
        out["heldout_unscored"] = int(unscored.sum())
    return out
