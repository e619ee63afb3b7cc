"""Target values z: the value-optimisation loss of SPEC §1A step 6 / §2, batched across facts (§9).

Per fact f, a free vector δ_f ∈ R^d is added to the output of decoder block ``layer`` at the
subject's last token of each of its sequences (the rewriting prompts = every context template with
the prompt, followed by all but the last target token, plus one KL prompt "{} is a"). Loss:

    L_f = mean_prompts( Σ_j NLL(target_j) / n_tgt )                        (rewriting NLL)
        + kl_factor · KL(p_now ‖ p_init) at the KL prompt's subject token  (essence drift)
        + v_weight_decay · ‖δ_f‖ / ‖h_f‖²                                   (note: norm, not squared)

with h_f = the block output at the plain prompt (``target_init``). Adam(lr = v_lr) on δ only;
per iteration: compute L_f; stop f once L_f < early_stop_loss; stop everyone at the last iteration
before the backward pass (so at most n_steps − 1 updates); after each step project δ_f onto the
ball of radius clamp_norm_factor · ‖h_f‖. z_f = h_f + δ_f.

Batching: the loss is a sum of per-fact terms and Adam is element-wise, so one [N, d] parameter
optimised on all facts' sequences gives each fact its own trajectory, provided the early stop
freezes a row's parameter *and* Adam state (rows leave the batch), the clamp uses each fact's own
‖h_f‖ and NLL/KL are normalised per fact. Logits are computed only at label and KL positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .arch import arch_for, block_output, get_module
from .context import ContextTemplates
from .nethook import Trace
from .records import Record
from .tokens import filled_ids, in_context, pad_right, target_ids

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class ValueHParams:
    """Value-optimisation hyperparameters (SPEC §7.1 names; paper-time Llama defaults, §7.4)."""

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    z_batch_size: int = 32  # facts optimised together (1 = the reference's per-fact loop)

    def __post_init__(self):
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.z_batch_size < 1:
            raise ValueError(f"z_batch_size must be >= 1, got {self.z_batch_size}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "early_stop_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ValueResult:
    z: torch.Tensor            # [d, N] target values (float32)
    h: torch.Tensor            # [d, N] block output at the plain prompt before optimisation
    final_loss: torch.Tensor   # [N] loss at the iteration each fact stopped
    steps: torch.Tensor        # [N] Adam steps taken per fact
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class _Seqs:
    """All sequences of a chunk of facts, pre-tokenised and pre-padded once."""

    ids: torch.Tensor        # [S, T]
    mask: torch.Tensor       # [S, T]
    owner: torch.Tensor      # [S] fact index within the chunk
    lookup: torch.Tensor     # [S] subject-last-token index
    is_kl: torch.Tensor      # [S] bool
    lab_seq: torch.Tensor    # [P] sequence of each label position
    lab_pos: torch.Tensor    # [P] logit position predicting the label
    lab_tok: torch.Tensor    # [P] label token id
    lab_w: torch.Tensor      # [P] 1 / (n_tgt · n_prompts) so summing per fact gives the mean NLL


def _build(tok, records: Sequence[Record], contexts: ContextTemplates) -> _Seqs:
    seqs, owner, lookup, is_kl = [], [], [], []
    lab_seq, lab_pos, lab_tok, lab_w = [], [], [], []
    n_prompts = len(contexts.flat)
    for f, r in enumerate(records):
        tgt = target_ids(tok, r.target_new.str)
        for c in contexts.flat:
            ids, idx = filled_ids(tok, in_context(c, r.prompt), r.subject)
            start = len(ids)
            s = len(seqs)
            seqs.append(ids + tgt[:-1])
            owner.append(f), lookup.append(idx), is_kl.append(False)
            for j, t in enumerate(tgt):  # logit at start-1+j predicts target token j
                lab_seq.append(s), lab_pos.append(start - 1 + j), lab_tok.append(t)
                lab_w.append(1.0 / (len(tgt) * n_prompts))
        ids, idx = filled_ids(tok, KL_PROMPT, r.subject)
        seqs.append(ids)
        owner.append(f), lookup.append(idx), is_kl.append(True)
    ids, mask = pad_right(seqs, tok.pad_token_id)
    t = torch.as_tensor
    return _Seqs(ids, mask, t(owner), t(lookup), t(is_kl), t(lab_seq), t(lab_pos), t(lab_tok),
                 t(lab_w, dtype=torch.float32))


def _head(model):
    """(backbone returning final-normed hidden states, lm_head) for logits at chosen positions."""
    spec = arch_for(model)
    return model.base_model, get_module(model, spec.lm_head)


def compute_values(model, tok, records: Sequence[Record], layer: int, contexts: ContextTemplates,
                   hp: ValueHParams, *, log=None) -> ValueResult:
    """Optimise z for every fact, ``hp.z_batch_size`` facts at a time. Model weights are untouched."""
    t0 = time.time()
    parts = [_optimise_chunk(model, tok, records[s:s + hp.z_batch_size], layer, contexts, hp)
             for s in range(0, len(records), hp.z_batch_size)]
    res = ValueResult(
        z=torch.cat([p.z for p in parts], 1), h=torch.cat([p.h for p in parts], 1),
        final_loss=torch.cat([p.final_loss for p in parts]), steps=torch.cat([p.steps for p in parts]),
        seconds=time.time() - t0)
    res.info = {"mean_steps": float(res.steps.float().mean()), "mean_final_loss": float(res.final_loss.mean()),
                "facts_per_s": len(records) / max(res.seconds, 1e-9)}
    if log:
        log(f"values: {len(records)} facts in {res.seconds:.1f}s ({res.info['facts_per_s']:.1f} facts/s)")
    return res


def _optimise_chunk(model, tok, records: Sequence[Record], layer: int, contexts: ContextTemplates,
                    hp: ValueHParams) -> ValueResult:
    if contexts.flat[0] != "{}":
        raise ValueError("the first context template must be the plain prompt '{}'")
    device = next(model.parameters()).device
    seq = _build(tok, records, contexts)
    n = len(records)
    backbone, lm_head = _head(model)
    block = arch_for(model).layer_name(layer)
    d = model.config.hidden_size
    delta = torch.zeros(n, d, device=device)
    m_adam, v_adam = torch.zeros_like(delta), torch.zeros_like(delta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, as the reference
    active = torch.ones(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    final_loss = torch.zeros(n)
    h = torch.zeros(n, d, device=device)
    log_p_init = None  # [n, V] at the KL position, recorded at the first forward
    # sequences are laid out fact by fact: the plain template first, the KL prompt last
    plain = torch.arange(n, device=device) * (len(contexts.flat) + 1)
    for it in range(hp.v_num_grad_steps):
        facts = active.nonzero()[:, 0]
        rows = torch.isin(seq.owner, facts).nonzero()[:, 0]
        sub_owner = seq.owner[rows]
        width = int(seq.mask[rows].sum(1).max())
        ids, mask = seq.ids[rows, :width].to(device), seq.mask[rows, :width].to(device)
        lookup = seq.lookup[rows].to(device)
        d_act = delta[facts].clone().requires_grad_(True)
        # map fact index (within chunk) -> row of d_act
        slot = torch.full((n,), -1, dtype=torch.long)
        slot[facts] = torch.arange(len(facts))
        seq_slot = slot[sub_owner].to(device)
        ar = torch.arange(len(rows), device=device)

        def add_delta(out):
            hs = block_output(out)
            if it == 0:  # target_init: block output at the plain prompt (template 0 = "{}")
                h[...] = hs[plain, lookup[plain]].detach()
            hs = hs.clone()
            hs[ar, lookup] = (hs[ar, lookup] + d_act[seq_slot]).to(hs.dtype)  # bf16 models: δ is fp32
            return hs if isinstance(out, torch.Tensor) else (hs, *out[1:])

        with Trace(model, block, retain_output=False, edit_output=add_delta):
            hid = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        # rewriting NLL at label positions only (SPEC §9: logits only where a loss needs them)
        row_of_seq = torch.full((seq.ids.shape[0],), -1, dtype=torch.long)
        row_of_seq[rows] = torch.arange(len(rows))
        lab_keep = row_of_seq[seq.lab_seq] >= 0
        lr_rows = row_of_seq[seq.lab_seq[lab_keep]].to(device)
        logits = lm_head(hid[lr_rows, seq.lab_pos[lab_keep].to(device)]).float()
        tok_nll = -torch.log_softmax(logits, -1).gather(1, seq.lab_tok[lab_keep, None].to(device))[:, 0]
        fact_slot = seq_slot[lr_rows]
        nll = torch.zeros(len(facts), device=device).index_add(
            0, fact_slot, tok_nll * seq.lab_w[lab_keep].to(device))
        # KL at the subject's last token of the KL prompt
        kl_rows = seq.is_kl[rows].nonzero()[:, 0].to(device)
        kl_logp = torch.log_softmax(lm_head(hid[kl_rows, lookup[kl_rows]]).float(), -1)
        kl_slot = seq_slot[kl_rows]
        if log_p_init is None:
            log_p_init = torch.zeros(n, kl_logp.shape[-1], device=device)
            log_p_init[facts[kl_slot.cpu()].to(device)] = kl_logp.detach()
        ref = log_p_init[facts.to(device)][kl_slot]
        kl = torch.zeros(len(facts), device=device).index_add(
            0, kl_slot, (kl_logp.exp() * (kl_logp - ref)).sum(-1))
        h_act = h[facts.to(device)]
        wd = hp.v_weight_decay * d_act.norm(dim=1) / h_act.norm(dim=1).pow(2)
        loss = nll + hp.kl_factor * kl + wd
        done = (loss.detach() < hp.early_stop_loss).cpu()
        final_loss[facts] = loss.detach().float().cpu()
        if it == hp.v_num_grad_steps - 1:
            break
        keep = ~done
        if not keep.any():
            active[facts] = False
            break
        grad, = torch.autograd.grad(loss[keep.to(device)].sum(), d_act)
        upd = facts[keep]
        g = grad[keep.to(device)]
        t = it + 1  # every active row has taken exactly `it` steps before this one
        m_adam[upd] = beta1 * m_adam[upd] + (1 - beta1) * g
        v_adam[upd] = beta2 * v_adam[upd] + (1 - beta2) * g * g
        bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
        denom = v_adam[upd].sqrt() / math.sqrt(bc2) + eps
        new = delta[upd] - (hp.v_lr / bc1) * m_adam[upd] / denom
        max_norm = hp.clamp_norm_factor * h[upd].norm(dim=1, keepdim=True)
        norm = new.norm(dim=1, keepdim=True)
        delta[upd] = torch.where(norm > max_norm, new * (max_norm / norm), new)
        steps[upd.cpu()] += 1
        active[facts[done]] = False
    z = (h + delta).T.contiguous().float().cpu()
    return ValueResult(z=z, h=h.T.contiguous().float().cpu(), final_loss=final_loss, steps=steps)

