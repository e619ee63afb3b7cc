"""Keys and current values at the subject's last token (SPEC §2 "Keys", "Residual").

* key k̄ of a fact = the down-projection **input** at the subject's last token, averaged within each
  context-template type and then across types (MEMIT templates: ½ k_plain + ½ mean of 5 contexts);
* current value h = the decoder block's output at the subject's last token of the **plain** prompt,
  under the current weights (the residual is z − h).

Forward passes stop right after the edited block (SPEC §9) and run in large batches.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .arch import arch_for, block_output
from .context import ContextTemplates
from .nethook import TraceDict
from .records import Record
from .tokens import filled_ids, in_context, pad_right


@torch.no_grad()
def _reprs_at(model, tok, seqs: Sequence[tuple[list[int], int]], layer: int, *,
              want_key: bool, want_out: bool, batch_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Down-proj input and/or block output at one index per sequence, [n, dim] float32."""
    spec = arch_for(model)
    down, block = spec.down_name(layer), spec.layer_name(layer)
    device = next(model.parameters()).device
    pad = tok.pad_token_id
    keys, outs = [], []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s:s + batch_size]
        ids, mask = pad_right([c[0] for c in chunk], pad)
        rows = torch.arange(len(chunk), device=device)
        idx = torch.as_tensor([c[1] for c in chunk], device=device)
        names = [n for n, w in ((down, want_key), (block, want_out)) if w]
        with TraceDict(model, names, retain_input=True, retain_output=True, stop=True) as td:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)  # no KV cache to fill
        if want_key:
            keys.append(td[down].input[rows, idx].float())
        if want_out:
            outs.append(block_output(td[block].output)[rows, idx].float())
    return (torch.cat(keys) if want_key else None, torch.cat(outs) if want_out else None)


def compute_keys(model, tok, records: Sequence[Record], layer: int, contexts: ContextTemplates,
                 *, batch_size: int = 256) -> torch.Tensor:
    """K ∈ R^{d_in × N}: type-weighted average key of each fact (SPEC §2 compute_ks)."""
    seqs = [filled_ids(tok, in_context(c, r.prompt), r.subject)
            for r in records for g in contexts.groups for c in g]
    k, _ = _reprs_at(model, tok, seqs, layer, want_key=True, want_out=False, batch_size=batch_size)
    per_fact = k.view(len(records), len(contexts.flat), -1)
    out, start = [], 0
    for g in contexts.groups:
        out.append(per_fact[:, start:start + len(g)].mean(1))
        start += len(g)
    return torch.stack(out, 0).mean(0).T.contiguous()


def current_values(model, tok, records: Sequence[Record], layer: int, *,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_plain, h) at the plain prompt: down-proj input [d_in, N] and block output [d, N]."""
    seqs = [filled_ids(tok, r.prompt, r.subject) for r in records]
    k, h = _reprs_at(model, tok, seqs, layer, want_key=True, want_out=True, batch_size=batch_size)
    return k.T.contiguous(), h.T.contiguous()
