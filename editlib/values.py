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

``early_stop="mpes"`` replaces the loss threshold by ENCORE's most-probable early stopping (MPES; Gupta et
al. 2025, arXiv 2502.01636): f stops at the first iteration (checked before its update,
so a fact whose target is already predicted stops with 0 steps) at which every target token is the
argmax of the next-token distribution at its position under *every* rewriting prompt (the plain
prompt and each context template; teacher forcing) — the ``mpes_hits``-th time this holds (the
official ENCORE configs' ``prob_cutoff = -k`` is ``mpes_hits = k``: 2 for Llama-3-8B, 3 Llama-2-7B,
4 GPT-2 XL; the paper describes 1). Why: δ
is not over-optimised once the edit is already the model's top prediction (the paper's cause of
degradation). Deviations from the official code: its check skips the plain prompt (it indexes
rewriting prompts from 1), fires when exactly 5 (prompt, target token) positions are correct (any 5
of 5·T for a T-token target) and it also keeps the loss threshold; here every prompt counts and MPES
alone decides, so a fact never stops before its target is the argmax everywhere.

Batching: the loss is a sum of per-fact terms and Adam is element-wise, so one [N, d] parameter
optimised on all facts' sequences gives each fact its own trajectory, provided the early stop
freezes a row's parameter *and* Adam state (rows leave the batch), the clamp uses each fact's own
‖h_f‖ and NLL/KL are normalised per fact. Logits are computed only at label and KL positions.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from .arch import arch_for, backbone_and_head, block_output
from .context import ContextTemplates
from .cudagraphs import CapturedStep, shared_pool
from .generation import _cache_name, returned_kv
from .nethook import Trace
from .packed import PackedSuffix, check_compile_mode, unsupported
from .records import Record
from .tf32 import matmul_tf32
from .tokens import filled_ids, in_context, pad_right, target_ids

if TYPE_CHECKING:
    from .valuestore import ValueStore

KL_PROMPT = "{} is a"
EARLY_STOPS = ("loss", "mpes")


@dataclass(frozen=True)
class ValueHParams:
    """Value-optimisation hyperparameters (SPEC §7.1 names; paper-time Llama defaults, §7.4)."""

    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    early_stop: str = "loss"  # "loss" (L_f < early_stop_loss) | "mpes" (target is the argmax everywhere: ENCORE)
    mpes_hits: int = 1  # mpes: stop the mpes_hits-th time the argmax condition holds
    z_batch_size: int = 32  # facts optimised together (1 = the reference's per-fact loop)
    prefix_cache: bool = True  # reuse the KV of tokens before the subject (they do not depend on δ)
    packed: bool = True  # run only the blocks above `layer`, on packed tokens (editlib.packed; Llama family)
    compile_blocks: str = "off"  # opt-in torch.compile of the packed blocks (editlib.packed.COMPILE_MODES; z moves at float rounding)
    capture_steps: bool = False  # opt-in, CUDA: each step's eager kernels recorded as a CUDA graph and replayed (_GraphStep)

    def __post_init__(self):
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.z_batch_size < 1:
            raise ValueError(f"z_batch_size must be >= 1, got {self.z_batch_size}")
        if self.early_stop not in EARLY_STOPS:
            raise ValueError(f"early_stop must be one of {', '.join(EARLY_STOPS)}, got {self.early_stop!r}")
        if self.compile_blocks is False:  # YAML 1.1 reads an unquoted `off` as False
            object.__setattr__(self, "compile_blocks", "off")
        check_compile_mode(self.compile_blocks)
        if self.compile_blocks != "off" and not self.packed:
            raise ValueError("compile_blocks compiles the packed forward: it needs packed: true")
        if not isinstance(self.capture_steps, bool):
            raise ValueError(f"capture_steps must be true or false, got {self.capture_steps!r}")
        if self.capture_steps and not self.packed:
            raise ValueError("capture_steps records the packed forward's steps: it needs packed: true")
        if self.capture_steps and self.compile_blocks != "off":
            raise ValueError(f"capture_steps records the eager steps; compile_blocks {self.compile_blocks!r} "
                             "compiles them (reduce-overhead captures its own graphs): use one of the two")
        if self.mpes_hits < 1:
            raise ValueError(f"mpes_hits must be >= 1, got {self.mpes_hits}")
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
    fail_reason: list[str] = field(default_factory=list)  # per fact: "" or why its value is unusable
    stalled: torch.Tensor | None = None  # [N] bool: Adam steps taken, loss never below its start

    def __post_init__(self):
        if not self.fail_reason:
            self.fail_reason = [""] * int(self.steps.shape[0])
        if self.stalled is None:
            self.stalled = torch.zeros(int(self.steps.shape[0]), dtype=torch.bool)

    @property
    def failed(self) -> torch.Tensor:
        """[N] bool: facts whose optimisation diverged or degenerated (see :func:`value_failures`)."""
        return torch.tensor([bool(r) for r in self.fail_reason], dtype=torch.bool)


def value_failures(delta: torch.Tensor, steps: torch.Tensor, first_loss: torch.Tensor,
                   nonfinite: torch.Tensor, overflow: torch.Tensor, had_grad: torch.Tensor) -> list[str]:
    """Why each fact's value is unusable ("" when it is fine): a non-finite loss, a non-finite δ, an
    update whose norm overflowed (the clamp then zeroes δ: v_lr = 1e30 did that), or δ exactly
    zero after Adam steps on a non-zero gradient. Such a value would be stored as a valid edit
    that does nothing (S = 0), so it is a failed edit instead.

    A loss that merely never went below its start is *not* a failure (see ``ValueResult.stalled``):
    at the last layer, for one, δ at the subject token cannot reach the target's positions, so an
    edit there truly does nothing, and the layer search must show that as a score, as the paper's
    Figure 1 does."""
    out = []
    for f in range(delta.shape[0]):
        if bool(nonfinite[f]) or not math.isfinite(float(first_loss[f])):
            out.append("value optimisation diverged: non-finite loss")
        elif not bool(torch.isfinite(delta[f]).all()):
            out.append("value optimisation diverged: non-finite δ")
        elif bool(overflow[f]):
            out.append("value optimisation diverged: the update's norm overflowed (v_lr too large?)")
        elif int(steps[f]) > 0 and bool(had_grad[f]) and not bool(delta[f].abs().sum() > 0):
            out.append(f"value optimisation degenerate: δ is exactly zero after {int(steps[f])} steps")
        else:
            out.append("")
    return out


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


def compute_values(model, tok, records: Sequence[Record], layer: int, contexts: ContextTemplates,
                   hp: ValueHParams, *, log=None, store: "ValueStore | None" = None) -> ValueResult:
    """Optimise z for every fact, ``hp.z_batch_size`` facts at a time. Model weights are untouched.
    ``store`` (:class:`editlib.valuestore.ValueStore`): a chunk it holds for the model as it is now
    is read back instead of optimised, and a chunk optimised here is kept in it."""
    t0 = time.time()
    parts, reused = [], 0
    with _deterministic_attention(model):
        for s in range(0, len(records), hp.z_batch_size):
            chunk = records[s:s + hp.z_batch_size]
            seq = _build(tok, chunk, contexts)
            key = store.key(model, layer, hp, seq) if store is not None and store.serves(model) else None
            part = store.load(key, len(chunk), model.config.hidden_size) if key else None
            reused += part is not None
            if part is None:
                part = _optimise_chunk(model, tok, chunk, layer, contexts, hp, seq=seq)
                if key:
                    store.save(key, part)
            parts.append(part)
    res = ValueResult(
        z=torch.cat([p.z for p in parts], 1), h=torch.cat([p.h for p in parts], 1),
        final_loss=torch.cat([p.final_loss for p in parts]), steps=torch.cat([p.steps for p in parts]),
        seconds=time.time() - t0, fail_reason=[r for p in parts for r in p.fail_reason],
        stalled=torch.cat([p.stalled for p in parts]))
    res.info = {"mean_steps": float(res.steps.float().mean()), "mean_final_loss": float(res.final_loss.mean()),
                "facts_per_s": len(records) / max(res.seconds, 1e-9), "chunks_read": reused, "chunks": len(parts)}
    if log:
        log(f"values: {len(records)} facts in {res.seconds:.1f}s ({res.info['facts_per_s']:.1f} facts/s"
            + (f"; {reused} of {len(parts)} chunks read from the value store)" if reused else ")"))
    return res


def _deterministic_on_gpu(model) -> bool:
    return torch.are_deterministic_algorithms_enabled() and next(model.parameters()).device.type == "cuda"


@contextlib.contextmanager
def _deterministic_attention(model):
    """Under ``model.deterministic`` on a GPU, the value optimisation's attention (the one backward
    editlib runs) on SDPA's math kernels: the fused kernels' backward may add its blocks in a
    varying order, which torch's warn-only deterministic mode (editlib.protocols.set_deterministic)
    only warns about, once per process. Elsewhere nothing changes."""
    if not _deterministic_on_gpu(model):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


class _Forward:
    """Runs the backbone with δ added at block ``layer``'s output at each sequence's subject token.

    With ``prefix_cache`` the tokens *before* the subject's last token are run once per chunk and
    their keys/values reused: their states do not depend on δ (causal attention, δ is added at the
    subject position), so only the suffix (subject token onwards) is recomputed every iteration.
    Positions returned by :meth:`pos` are in the coordinates of the returned hidden states.
    """

    def __init__(self, model, seq: _Seqs, layer: int, prefix_cache: bool):
        self.model, self.seq = model, seq
        self.backbone = model.base_model
        self.block = arch_for(model).layer_name(layer)
        self.device = next(model.parameters()).device
        self.cached = prefix_cache
        if prefix_cache:
            self._build_prefix()

    def _build_prefix(self) -> None:
        seq, dev = self.seq, self.device
        p = seq.lookup  # prefix = tokens [0, p)
        lengths = seq.mask.sum(1)
        self.p_max = int(p.max())
        s_max = int((lengths - p).max())
        n = len(p)
        ar = torch.arange(max(self.p_max, 1))
        pre_mask = (ar[None, : self.p_max] < p[:, None]).long()
        pre_ids = torch.where(pre_mask.bool(), seq.ids[:, : self.p_max], seq.ids.new_tensor(0))
        idx = (p[:, None] + torch.arange(s_max)[None]).clamp(max=seq.ids.shape[1] - 1)
        self.suf_mask = (torch.arange(s_max)[None] < (lengths - p)[:, None]).long()
        self.suf_ids = torch.where(self.suf_mask.bool(), seq.ids.gather(1, idx), seq.ids.new_tensor(0))
        self.pre_mask = pre_mask
        self.cache_arg = _cache_name(self.model)
        self.kv = None
        if self.p_max > 0:
            with torch.no_grad():
                out = self.backbone(input_ids=pre_ids.to(dev), attention_mask=pre_mask.to(dev), use_cache=True)
            self.kv = returned_kv(self.model, out)
        self.n = n

    def pos(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Map absolute positions of sequences ``rows`` to positions in the hidden states."""
        return positions - self.seq.lookup[rows].to(positions.device) if self.cached else positions

    def plan(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def run(self, rows: torch.Tensor, delta_rows: torch.Tensor, record_h=None, plain=None):
        return self(rows, delta_rows, record_h, plain)

    def __call__(self, rows: torch.Tensor, delta_rows: torch.Tensor, record_h=None, plain=None):
        """Hidden states [len(rows), T, d]; ``delta_rows`` [len(rows), d] is added at the subject
        token; when ``record_h`` is given, the block output at the plain rows' subject tokens is
        written into it (target_init)."""
        dev = self.device
        if self.cached:
            width = int(self.suf_mask[rows].sum(1).max())
            ids, smask = self.suf_ids[rows, :width].to(dev), self.suf_mask[rows, :width].to(dev)
            at = torch.zeros(len(rows), dtype=torch.long, device=dev)
            kw = {"position_ids": self.seq.lookup[rows, None].to(dev) + torch.arange(width, device=dev)[None]}
            if self.kv is not None:
                from transformers import DynamicCache
                r = rows.to(dev)
                kw[self.cache_arg] = DynamicCache(ddp_cache_data=[(k[r], v[r]) for k, v in self.kv],
                                                  config=self.model.config)
                kw["attention_mask"] = torch.cat([self.pre_mask[rows].to(dev), smask], 1)
                kw["use_cache"] = True
            else:
                kw["attention_mask"] = smask
        else:
            width = int(self.seq.mask[rows].sum(1).max())
            ids = self.seq.ids[rows, :width].to(dev)
            at = self.seq.lookup[rows].to(dev)
            kw = {"attention_mask": self.seq.mask[rows, :width].to(dev)}
        ar = torch.arange(len(rows), device=dev)

        def add_delta(out):
            hs = block_output(out)
            if record_h is not None:
                record_h[...] = hs[plain, at[plain]].detach()
            hs = hs.clone()
            hs[ar, at] = (hs[ar, at] + delta_rows).to(hs.dtype)  # bf16 models: δ is fp32
            return hs if isinstance(out, torch.Tensor) else (hs, *out[1:])

        with Trace(self.model, self.block, retain_output=False, edit_output=add_delta):
            return self.backbone(input_ids=ids, **{"use_cache": False, **kw}).last_hidden_state


class _Packed:
    """:class:`_Forward`'s interface over :class:`editlib.packed.PackedSuffix` (positions are
    relative to the subject token; only label and KL positions are filled). :meth:`plan` does a
    step's host work once per set of rows, :meth:`run` its device work."""

    def __init__(self, model, seq: _Seqs, layer: int, compile_blocks: str = "off", buckets: bool | None = None):
        kl = seq.is_kl.nonzero()[:, 0]
        self.seq = seq
        self.packed = PackedSuffix(model, seq.ids, seq.mask, seq.lookup, torch.cat([seq.lab_seq, kl]),
                                   torch.cat([seq.lab_pos, seq.lookup[kl]]), layer, compile_blocks, buckets)

    def pos(self, positions: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return positions - self.seq.lookup[rows].to(positions.device)

    def plan(self, rows: torch.Tensor):
        return self.packed.plan(rows)

    def run(self, pl, delta_rows: torch.Tensor, record_h=None, plain=None):
        if record_h is not None:  # the plain rows' block output without δ: computed once per chunk
            record_h[...] = self.packed.h[plain]
        return self.packed.run(pl, delta_rows)


def _forward_for(model, seq: _Seqs, layer: int, hp: ValueHParams):
    """The packed forward when ``hp.packed`` and the model allows it, else the transformers one."""
    why = unsupported(model, seq.ids.shape[1]) if hp.packed else "packed: false"
    if why is None:
        return _Packed(model, seq, layer, hp.compile_blocks)
    if hp.compile_blocks != "off":  # asked for, and it would silently not happen
        raise ValueError(f"compile_blocks {hp.compile_blocks!r} compiles the packed forward, which this "
                         f"model cannot run ({why})")
    if hp.capture_steps:
        raise ValueError(f"capture_steps records the packed forward's steps, which this model cannot run ({why})")
    # The prefix cache pads every row's prefix to the longest one and puts its suffix after it, so
    # a row's key slots are no longer its positions: p_max + s_max slots in all. A sliding window
    # counts slots, and would cover the wrong tokens once they pass it.
    window = getattr(model.config, "sliding_window", None)
    lengths = seq.mask.sum(1)
    slots = int(seq.lookup.max()) + int((lengths - seq.lookup).max())
    within = window is None or slots <= int(window)
    return _Forward(model, seq, layer, hp.prefix_cache and within)


@dataclass
class _StepPlan:
    """A value step's δ-independent indices for the facts still running (on the model's device but
    ``facts``): made on the host once per set of running facts (:func:`_plan_step`), so that
    :func:`_step_loss` issues device work only."""

    facts: torch.Tensor     # running facts (host)
    rows: torch.Tensor      # their sequences (host)
    fwd: object             # the forward's own plan (_Packed.plan / _Forward.plan)
    facts_dev: torch.Tensor
    seq_slot: torch.Tensor  # each row's fact, as a row of the running facts' δ
    lab_rows: torch.Tensor  # label positions: row, position in the hidden states, token, weight, fact
    lab_pos: torch.Tensor
    lab_tok: torch.Tensor   # [labels, 1]
    lab_w: torch.Tensor
    lab_slot: torch.Tensor
    kl_rows: torch.Tensor   # the KL prompts: row, position, fact
    kl_pos: torch.Tensor
    kl_slot: torch.Tensor


def _plan_step(fwd, seq: _Seqs, facts: torch.Tensor, n: int, device) -> _StepPlan:
    rows = torch.isin(seq.owner, facts).nonzero()[:, 0]
    slot = torch.full((n,), -1, dtype=torch.long)  # fact index (within chunk) -> row of d_act
    slot[facts] = torch.arange(len(facts))
    seq_slot = slot[seq.owner[rows]].to(device)
    row_of_seq = torch.full((seq.ids.shape[0],), -1, dtype=torch.long)
    row_of_seq[rows] = torch.arange(len(rows))
    keep_lab = row_of_seq[seq.lab_seq] >= 0
    lab_rows = row_of_seq[seq.lab_seq[keep_lab]].to(device)
    kl_rows = seq.is_kl[rows].nonzero()[:, 0]
    kl_pos = fwd.pos(seq.lookup[rows[kl_rows]], rows[kl_rows])
    kl_rows = kl_rows.to(device)
    return _StepPlan(
        facts=facts, rows=rows, fwd=fwd.plan(rows), facts_dev=facts.to(device), seq_slot=seq_slot,
        lab_rows=lab_rows, lab_pos=fwd.pos(seq.lab_pos[keep_lab], seq.lab_seq[keep_lab]).to(device),
        lab_tok=seq.lab_tok[keep_lab, None].to(device), lab_w=seq.lab_w[keep_lab].to(device),
        lab_slot=seq_slot[lab_rows], kl_rows=kl_rows, kl_pos=kl_pos.to(device), kl_slot=seq_slot[kl_rows])


def _step_loss(fwd, pl: _StepPlan, lm_head, d_act: torch.Tensor, h: torch.Tensor, log_p_init, hp: ValueHParams,
               record_h=None, plain=None):
    """Per running fact: the loss (the module docstring's L_f) and, under ``early_stop: mpes``, how
    many of its label positions do not hold the target as the argmax (else None); and the KL
    reference, made here from this forward when ``log_p_init`` is None (the first iteration).
    Device work only: no host synchronisation, nothing moved from the host."""
    device = d_act.device
    hid = fwd.run(pl.fwd, d_act[pl.seq_slot], record_h, plain)
    # rewriting NLL at label positions only (SPEC §9: logits only where a loss needs them)
    logits = lm_head(hid[pl.lab_rows, pl.lab_pos]).float()
    tok_nll = -torch.log_softmax(logits, -1).gather(1, pl.lab_tok)[:, 0]
    nll = torch.zeros(len(pl.facts), device=device).index_add(0, pl.lab_slot, tok_nll * pl.lab_w)
    miss = None
    if hp.early_stop == "mpes":
        miss = torch.zeros(len(pl.facts), device=device).index_add(
            0, pl.lab_slot, (logits.argmax(-1) != pl.lab_tok[:, 0]).float())
    # KL at the subject's last token of the KL prompt (SPEC §1A step 6)
    kl_logp = torch.log_softmax(lm_head(hid[pl.kl_rows, pl.kl_pos]).float(), -1)
    if log_p_init is None:
        log_p_init = torch.zeros(h.shape[0], kl_logp.shape[-1], device=device)
        log_p_init[pl.facts_dev[pl.kl_slot]] = kl_logp.detach()
    ref = log_p_init[pl.facts_dev][pl.kl_slot]
    kl = torch.zeros(len(pl.facts), device=device).index_add(
        0, pl.kl_slot, (kl_logp.exp() * (kl_logp - ref)).sum(-1))
    h_act = h[pl.facts_dev]
    wd = hp.v_weight_decay * d_act.norm(dim=1) / h_act.norm(dim=1).pow(2)
    return nll + hp.kl_factor * kl + wd, miss, log_p_init


def check_capture_device(hp: ValueHParams, device) -> None:
    """``capture_steps`` records CUDA graphs: refused for a model elsewhere."""
    if hp.capture_steps and torch.device(device).type != "cuda":
        raise ValueError(f"hparams capture_steps records CUDA graphs, but the model is on {device}: "
                         "use capture_steps: false")


#: eager steps of a set of running facts before its step is recorded: the capture stream is the
#: process's one (editlib.cudagraphs.capture_stream), initialised by the first set's warm-up
GRAPH_WARMUPS = 1


class _GraphStep:
    """``hparams.common.capture_steps``: the value step of the running facts of ``pl`` (forward,
    losses and backward) recorded once as a CUDA graph and replayed
    (:class:`editlib.cudagraphs.CapturedStep`: its :data:`GRAPH_WARMUPS` warm-ups are real steps),
    reading δ from a tensor that each call copies the facts' δ into. A one-fact step of a 32-layer
    model is thousands of small kernels, each costing eager PyTorch more host time than the GPU
    spends on it (docs/performance.md); a replay costs their GPU time. The kernels are the eager
    step's, so z is what the eager step gives on that device (to the bit where the eager step is
    itself reproducible: on CUDA under deterministic algorithms). The gradient is that of the sum of
    every running fact's loss, where the eager step differentiates the sum over the facts that go
    on: a fact's δ reaches its own loss alone, so the rows that are used are the same. The step
    closes over its input tensor, not over this object, so dropping the object frees the graph
    at once (:meth:`close` does so explicitly).

    ``pool`` and ``inputs`` (a kept one-fact graph, :func:`_graph_for`): recorded into the shared
    pool, and :meth:`load` copies another fact's inputs of the same sizes into ``inputs``, the
    step's (:func:`_step_inputs`)."""

    def __init__(self, fwd, pl: _StepPlan, lm_head, h: torch.Tensor, log_p_init: torch.Tensor, hp: ValueHParams,
                 pool=None, inputs: list[torch.Tensor] | None = None):
        d = torch.zeros(len(pl.facts), h.shape[1], device=h.device, requires_grad=True)

        def step():
            loss, miss, _ = _step_loss(fwd, pl, lm_head, d, h, log_p_init, hp)
            grad, = torch.autograd.grad(loss.sum(), d)
            return loss.detach(), miss, grad

        self.d = d
        self.inputs = inputs
        self.step = CapturedStep(step, h.device, "hparams.common.capture_steps", warmups=GRAPH_WARMUPS, pool=pool)

    def __call__(self, d_act: torch.Tensor):
        with torch.no_grad():
            self.d.copy_(d_act)
        return self.step()

    def load(self, inputs: list[torch.Tensor]) -> None:
        """Another fact's step inputs (:func:`_step_inputs`, the same sizes) copied into this
        graph's, which every later call reads."""
        with torch.no_grad():
            for mine, new in zip(self.inputs, inputs, strict=True):
                mine.copy_(new)

    @property
    def recorded(self) -> bool:
        """Whether a call now replays the graph (no warm-up or recording left)."""
        return self.step.graph is not None

    def close(self) -> None:
        self.step.close()


def _field_values(obj) -> list:
    """The values of the dataclass ``obj``'s fields, in order (tensors among them)."""
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


def _step_inputs(fwd, pl: _StepPlan, h: torch.Tensor, log_p_init: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor a value step reads but the model's weights and δ, in a fixed order: the packed
    forward's block inputs and prefix keys/values, the step plans' index tensors, mask and RoPE
    tables on the device, h and the KL reference (the host tensors of the plans only give sizes)."""
    dev = h.device
    pk = fwd.packed
    out = [pk.x0, *(t for kv in pk.kv for t in kv)]
    out += [t for t in _field_values(pl.fwd) if isinstance(t, torch.Tensor)]
    out += [t for t in _field_values(pl) if isinstance(t, torch.Tensor) and t.device == dev]
    return out + [h, log_p_init]


def _reuse_key(fwd, pl: _StepPlan, lm_head, inputs: list[torch.Tensor], hp: ValueHParams) -> tuple:
    """What a kept one-fact graph's kernels depend on besides the values of its inputs: the modules
    it runs and their hooks (:func:`_hook_ids`); the address, shape and dtype of each parameter (a
    graph reads the addresses it recorded); the sizes of every input (``inputs``, the step's
    :func:`_step_inputs`); the plans' integers and which of their tensors are absent; the device,
    the hyperparameters, and the global settings that choose kernels (:func:`_kernel_settings`).
    Keys [0] and [1] name the modules and weights."""
    modules = (*fwd.packed.blocks, fwd.packed.norm, lm_head)
    weights = tuple((p.data_ptr(), tuple(p.shape), p.dtype) for m in modules for p in m.parameters())
    sizes = tuple((tuple(t.shape), t.dtype) for t in inputs)
    scalars = tuple("tensor" if isinstance(v, torch.Tensor) else v for v in _field_values(pl.fwd))
    return (tuple(id(m) for m in modules), weights, _hook_ids(modules), sizes, scalars, str(inputs[0].device),
            repr(hp), _kernel_settings())


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _hook_ids(modules) -> tuple:
    """The handles of every module hook (global, and on ``modules`` and their submodules), forward
    and backward: a graph runs what its recording ran. Handle ids, unlike function ids, are never
    reused in a process."""
    glob = torch.nn.modules.module
    out = [tuple(getattr(glob, f"_global{name}", {})) for name in _HOOK_DICTS]
    return tuple(out) + tuple(tuple(getattr(sub, name)) for m in modules for sub in m.modules() for name in _HOOK_DICTS)


def _kernel_settings() -> tuple:
    """The process-wide settings that choose a value step's kernels: TF32 and 16-bit reduced
    precision reductions of matmuls, the BLAS library, deterministic algorithms, autocast, and the
    attention backends (each switch, their priority order, the math backend's 16-bit reduction)."""
    b, c = torch.backends.cuda, torch._C
    optional = [getattr(c, name)() if hasattr(c, name) else None
                for name in ("_get_fa3_sdp_enabled", "_get_sdp_priority_order")]
    return (matmul_tf32(), b.matmul.allow_bf16_reduced_precision_reduction, b.matmul.allow_fp16_reduced_precision_reduction,
            str(b.preferred_blas_library()), torch.are_deterministic_algorithms_enabled(),
            torch.is_autocast_enabled(), torch.get_autocast_dtype("cuda"), b.flash_sdp_enabled(),
            b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled(),
            b.fp16_bf16_reduction_math_sdp_allowed(), *(tuple(v) if isinstance(v, list) else v for v in optional))


#: one-fact value graphs kept for reuse (:func:`_graph_for`), oldest use first, and their number's
#: bound: 4,096 CounterFact facts bring 100 sets of step sizes (bench/value_shapes.py --kept). Each
#: holds its first fact's packed inputs, mostly the prefix keys/values of the blocks above the
#: edited layer: about 17 MB on Llama-3-8B at layer 1, 1.7 GB for a B = 1 run's 100
_KEPT: "OrderedDict[tuple, _GraphStep]" = OrderedDict()
KEPT_GRAPHS = 128
#: counts of kept graphs made and reused in this process (bench/bench_compiled_values.py prints them)
KEPT_COUNTS = {"made": 0, "reused": 0}
_KEEPING = {"depth": 0}


@contextlib.contextmanager
def keeping_graphs():
    """Within it, one-fact value graphs are kept for later facts of their sizes (:func:`_graph_for`);
    at its exit they are released. :func:`editlib.protocols.run_unit` runs every unit within it;
    elsewhere (editlib.quick, a notebook's own calls) a one-fact graph lives as long as its chunk."""
    _KEEPING["depth"] += 1
    try:
        yield
    finally:
        _KEEPING["depth"] -= 1
        if not _KEEPING["depth"]:
            release_value_graphs()


def release_value_graphs() -> None:
    """Release every kept one-fact value graph (their memory goes with the last of the pool's)."""
    while _KEPT:
        _, g = _KEPT.popitem(last=False)
        g.close()


def _graph_for(fwd, pl: _StepPlan, lm_head, h: torch.Tensor, log_p_init: torch.Tensor, hp: ValueHParams,
               n: int) -> tuple[_GraphStep, bool]:
    """The captured step of the running facts of ``pl``, and whether it is kept beyond the chunk.

    A chunk of several facts records a graph of its own for each set of running facts (its facts
    stop apart, and such sets rarely recur). Within :func:`keeping_graphs`, a one-fact chunk (a
    B = 1 sequential edit) keeps its graph, in the device's shared pool
    (:func:`editlib.cudagraphs.shared_pool`), for later facts whose step has the same sizes
    (:func:`_reuse_key`): those copy their inputs into it and replay it from their first step, with
    no warm-up or recording once the first fact of those sizes recorded it. The same kernels run on
    the same sizes, so z is what the fact's own graph, or its eager steps, would give. At most
    :data:`KEPT_GRAPHS` are kept (the least recently used goes), all of one set of modules and
    weights (another model's, or another edited layer's, are released when a step of these is
    recorded); a graph made while no kept graph has recorded into the current pool gets a fresh
    one (a graph whose recording failed may also have left the old one held)."""
    if n != 1 or not _KEEPING["depth"]:
        return _GraphStep(fwd, pl, lm_head, h, log_p_init, hp), False
    inputs = _step_inputs(fwd, pl, h, log_p_init)
    key = _reuse_key(fwd, pl, lm_head, inputs, hp)
    g = _KEPT.get(key)
    if g is not None:
        _KEPT.move_to_end(key)
        g.load(inputs)
        KEPT_COUNTS["reused"] += 1
        return g, True
    for other in [k for k in _KEPT if k[0] != key[0] or k[1] != key[1]]:  # other modules' or weights'
        _KEPT.pop(other).close()
    pool = shared_pool(h.device)
    if not any(g.recorded and g.step.pool is pool for g in _KEPT.values()):  # no kept graph holds it
        pool = shared_pool(h.device, fresh=True)
    g = _KEPT[key] = _GraphStep(fwd, pl, lm_head, h, log_p_init, hp, pool=pool, inputs=inputs)
    KEPT_COUNTS["made"] += 1
    while len(_KEPT) > KEPT_GRAPHS:
        _KEPT.popitem(last=False)[1].close()
    return g, True


def _forget(g: _GraphStep) -> None:
    """Drop a kept graph (a step of it raised: it may hold a half-made recording)."""
    for k in [k for k, v in _KEPT.items() if v is g]:
        _KEPT.pop(k)
    g.close()


def _optimise_chunk(model, tok, records: Sequence[Record], layer: int, contexts: ContextTemplates,
                    hp: ValueHParams, *, seq: _Seqs | None = None) -> ValueResult:
    if contexts.flat[0] != "{}":
        raise ValueError("the first context template must be the plain prompt '{}'")
    device = next(model.parameters()).device
    check_capture_device(hp, device)
    seq = seq if seq is not None else _build(tok, records, contexts)
    n = len(records)
    _, lm_head = backbone_and_head(model)
    fwd = _forward_for(model, seq, layer, hp)
    d = model.config.hidden_size
    delta = torch.zeros(n, d, device=device)
    m_adam, v_adam = torch.zeros_like(delta), torch.zeros_like(delta)
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam defaults, as the reference
    active = torch.ones(n, dtype=torch.bool)
    steps = torch.zeros(n, dtype=torch.long)
    final_loss = torch.zeros(n)
    first_loss = torch.full((n,), math.nan)
    best_loss = torch.full((n,), math.inf)
    nonfinite = torch.zeros(n, dtype=torch.bool)
    overflow = torch.zeros(n, dtype=torch.bool)
    had_grad = torch.zeros(n, dtype=torch.bool)
    hits = torch.zeros(n, dtype=torch.long)  # mpes: iterations at which the target was the argmax everywhere
    h = torch.zeros(n, d, device=device)
    log_p_init = None  # [n, V] at the KL position, recorded at the first forward
    # sequences are laid out fact by fact: the plain template first, the KL prompt last
    plain = torch.arange(n, device=device) * (len(contexts.flat) + 1)
    pl = graph = None
    kept = False
    try:
        for it in range(hp.v_num_grad_steps):
            facts = active.nonzero()[:, 0]
            if pl is None or not torch.equal(facts, pl.facts):
                if graph is not None and not kept:
                    graph.close()
                pl, graph = _plan_step(fwd, seq, facts, n, device), None
            grad = None
            if log_p_init is None:  # the first forward (every fact runs): records target_init h and the KL reference
                assert len(facts) == n
                d_act = delta[facts].clone().requires_grad_(True)
                loss, miss, log_p_init = _step_loss(fwd, pl, lm_head, d_act, h, None, hp, record_h=h, plain=plain)
            elif hp.capture_steps and (it < hp.v_num_grad_steps - 1 or (graph is not None and graph.recorded)):
                # the last forward takes no step: a replay of a recorded graph (its gradient unused)
                # costs the GPU less than the eager forward costs the host; else it runs eagerly
                if graph is None:
                    graph, kept = _graph_for(fwd, pl, lm_head, h, log_p_init, hp, n)
                # the outputs hold until the next replay (a kept graph's may lie in another's
                # scratch, cudagraphs.shared_pool): this iteration reads loss, miss and grad first
                try:
                    loss, miss, grad = graph(delta[facts])
                except BaseException:
                    if kept:
                        _forget(graph)
                        graph = None
                    raise
            else:
                d_act = delta[facts].clone().requires_grad_(True)
                loss, miss, _ = _step_loss(fwd, pl, lm_head, d_act, h, log_p_init, hp)
            if hp.early_stop == "mpes":  # facts all of whose label positions hold the target as the argmax
                most_probable = miss.cpu() == 0
            lc = loss.detach().float().cpu()
            bad = ~torch.isfinite(lc)
            nonfinite[facts[bad]] = True
            if hp.early_stop == "mpes":
                hits[facts[most_probable]] += 1
                reached = hits[facts] >= hp.mpes_hits
            else:
                reached = lc < hp.early_stop_loss
            done = reached | bad  # a diverged fact stops (and is reported failed)
            final_loss[facts] = lc
            if it == 0:
                first_loss[facts] = lc
            else:
                best_loss[facts] = torch.minimum(best_loss[facts], torch.where(bad, best_loss[facts], lc))
            if it == hp.v_num_grad_steps - 1:
                break
            keep = ~done
            if not keep.any():
                break
            if grad is None:
                grad, = torch.autograd.grad(loss[keep.to(device)].sum(), d_act)
            upd = facts[keep].to(device)
            g = grad[keep.to(device)]
            t = it + 1  # every active row has taken exactly `it` steps before this one
            m_adam[upd] = beta1 * m_adam[upd] + (1 - beta1) * g
            v_adam[upd] = beta2 * v_adam[upd] + (1 - beta2) * g * g
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            denom = v_adam[upd].sqrt() / math.sqrt(bc2) + eps
            new = delta[upd] - (hp.v_lr / bc1) * m_adam[upd] / denom
            max_norm = hp.clamp_norm_factor * h[upd].norm(dim=1, keepdim=True)
            norm = new.norm(dim=1, keepdim=True)
            overflow[facts[keep]] |= ~torch.isfinite(norm[:, 0]).cpu()
            had_grad[facts[keep]] |= (g.abs().sum(1) > 0).cpu()
            delta[upd] = torch.where(norm > max_norm, new * (max_norm / norm), new)
            steps[facts[keep]] += 1
            active[facts[done]] = False
    finally:  # the chunk's own graph and its memory pool go now, also when a step raised
        if graph is not None and not kept:
            graph.close()
    z = (h + delta).T.contiguous().float().cpu()
    reasons = value_failures(delta.cpu(), steps, first_loss, nonfinite, overflow, had_grad)
    stalled = (steps > 0) & ~(best_loss < first_loss)
    # h copied out: a kept one-fact graph holds this chunk's h among its inputs and the next fact of
    # its sizes loads its own into it, while for one fact h.T.contiguous() is a view (and .cpu() of
    # a CPU tensor the tensor itself)
    return ValueResult(z=z, h=h.T.contiguous().to("cpu", torch.float32, copy=True), final_loss=final_loss,
                       steps=steps, fail_reason=reasons, stalled=stalled)
