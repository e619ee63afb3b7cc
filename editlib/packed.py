"""Packed forward of the layers *above* an edited block, for the value optimisation (SPEC §9).

The value loss (SPEC §1A step 6) adds δ to block ``layer``'s output at each sequence's subject
token p. Everything that does not see δ is computed once per chunk of facts:

* the tokens before p, at every layer (causal attention): their keys/values are cached;
* every token at layers ≤ ``layer`` (δ is added *after* block ``layer``): the block's output
  at positions p, p+1, … is cached and is where each iteration starts.

Each iteration then runs only blocks ``layer``+1 … N−1, only on the tokens from p up to the last
position a loss reads (a KL prompt needs p alone), with the tokens of all sequences *packed* into
one ``[tokens, d]`` matrix, so the projections and the MLP (almost all of the FLOPs) do no work on
padding; only the attention scatters them into a padded ``[rows, heads, width, head_dim]`` layout.
The last block's output projection and MLP run only at the positions a loss reads.

This re-states a Llama-style block (RMSNorm → attention with RoPE → RMSNorm → MLP) with the
model's own modules; ``ArchSpec.rotary`` says which families have such blocks. Tests pin it to
the transformers forward in float64 (same Adam steps, h within 1e-10, z within 1e-8) for llama,
mistral and qwen2 (grouped-query attention, biases, scaled RoPE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import arch_for, block_output, get_module, n_layers
from .generation import returned_kv
from .nethook import Trace


def unsupported(model, max_len: int) -> str | None:
    """Why the packed forward cannot run this model on sequences of ``max_len`` tokens (None: it can)."""
    spec = arch_for(model)
    if spec.rotary is None:
        return f"{spec.model_type} blocks are not Llama-style"
    window = getattr(model.config, "sliding_window", None)
    if window is not None and max_len >= int(window):
        return f"sequences of {max_len} tokens reach the sliding window ({window})"
    return None


#: ``hparams.common.compile_blocks``: "off" (eager, the default: stored results are eager's) or a
#: torch.compile mode for :func:`run_blocks`; "reduce-overhead" also captures CUDA graphs (CUDA only)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
_COMPILED: dict[str, object] = {}


def check_compile_mode(mode: str) -> None:
    """``compile_blocks`` names one of :data:`COMPILE_MODES` (checked where params are read and
    where the blocks are compiled)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_blocks must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def blocks_fn(mode: str, device: torch.device):
    """:func:`run_blocks`, or its compiled form for ``mode`` (one per process and mode, so later
    chunks and facts reuse the compiled graphs). A one-fact value step of a 32-layer model is
    thousands of small kernels launched from Python: eager PyTorch issues them slower than a GPU
    runs them, which CUDA graphs remove (docs/performance.md). Compiled kernels sum in another
    order, so z moves at float rounding: opt-in, never the default."""
    check_compile_mode(mode)
    if mode == "off":
        return run_blocks
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"compile_blocks: reduce-overhead captures CUDA graphs; the model is on {device}")
    if mode not in _COMPILED:
        compiled = torch.compile(run_blocks, dynamic=True, mode=None if mode == "default" else mode)
        if mode == "reduce-overhead":
            def fn(*args, **kw):
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may still be alive
                return compiled(*args, **kw)
        else:
            fn = compiled
        _COMPILED[mode] = fn
    return _COMPILED[mode]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the Llama (rotate-half) convention, transformers' ``apply_rotary_pos_emb`` operation
    for operation; x [..., head_dim], cos/sin broadcastable to it (here [tokens, 1, head_dim];
    editlib.decode: [1, 1, 1, head_dim])."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


class PackedSuffix:
    """Hidden states after the final norm, with δ added at block ``layer``'s output at each
    sequence's subject token, for the positions in ``need``.

    ``ids``/``mask`` [S, T] right-padded sequences, ``lookup`` [S] subject-last-token index,
    ``need_seq``/``need_pos`` the (sequence, absolute position) pairs whose hidden state a loss
    reads (every one ≥ its sequence's lookup). ``h`` [S, d] is block ``layer``'s output at the
    subject token without δ (target_init).
    """

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, lookup: torch.Tensor,
                 need_seq: torch.Tensor, need_pos: torch.Tensor, layer: int, compile_blocks: str = "off"):
        spec = arch_for(model)
        reason = unsupported(model, ids.shape[1])
        if reason:
            raise ValueError(f"packed forward: {reason}")
        self.device = dev = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.run_blocks = blocks_fn(compile_blocks, dev)
        self.blocks = [get_module(model, spec.layer_name(i)) for i in range(layer + 1, n_layers(model))]
        self.norm = get_module(model, spec.final_norm)
        S = ids.shape[0]
        lookup = lookup.long()
        rel_need = need_pos.long() - lookup[need_seq]
        if (rel_need < 0).any():
            raise ValueError("packed forward: a loss reads a position before the subject token")
        # the subject token itself always runs (it carries δ), so every width is at least 1
        width = torch.ones(S, dtype=torch.long).scatter_reduce(0, need_seq.long(), rel_need + 1, "amax")
        self.lookup, self.width = lookup, width
        # packed tokens: sequence s contributes positions lookup[s] … lookup[s] + width[s] - 1
        self.tok_seq = torch.repeat_interleave(torch.arange(S), width)
        starts = torch.cumsum(width, 0) - width
        self.tok_rel = torch.arange(len(self.tok_seq)) - starts[self.tok_seq]
        tok_abs = lookup[self.tok_seq] + self.tok_rel
        need = torch.zeros(S, int(width.max()), dtype=torch.bool)
        need[need_seq.long(), rel_need] = True
        self.tok_need = need[self.tok_seq, self.tok_rel]
        self.p_max = int(lookup.max())

        with torch.no_grad(), Trace(model, spec.layer_name(layer)) as tr:
            out = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
        h_all = block_output(tr.output)
        self.h = h_all[torch.arange(S, device=dev), lookup.to(dev)]
        self.x0 = h_all[self.tok_seq.to(dev), tok_abs.to(dev)]
        self.kv = [(k[:, :, : self.p_max], v[:, :, : self.p_max]) for k, v in returned_kv(model, out)[layer + 1:]]
        rotary = get_module(model, spec.rotary)
        with torch.no_grad():
            cos, sin = rotary(self.x0[None], tok_abs.to(dev)[None])
        self.cos, self.sin = cos[0, :, None, :], sin[0, :, None, :]

    def __call__(self, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), width, d]: final-normed hidden states of sequences ``rows`` at the needed
        positions (relative to the subject token; zero elsewhere); ``delta_rows`` [len(rows), d]."""
        dev, R = self.device, len(rows)
        row_of_seq = torch.full((len(self.lookup),), -1, dtype=torch.long)
        row_of_seq[rows] = torch.arange(R)
        r_tok = row_of_seq[self.tok_seq]
        sel = (r_tok >= 0).nonzero()[:, 0]
        r_tok, rel = r_tok[sel], self.tok_rel[sel]
        W = int(self.width[rows].max())
        flat = (r_tok * W + rel).to(dev)
        need = self.tok_need[sel].nonzero()[:, 0].to(dev)
        first = (rel == 0).to(dev)[:, None]
        x = self.x0[sel.to(dev)]
        x = torch.where(first, x + delta_rows[r_tok.to(dev)], x).to(self.dtype)  # bf16 models: δ is fp32
        all_rows = R == len(self.lookup) and bool((rows == torch.arange(R)).all())
        if self.blocks:
            cos, sin = self.cos[sel.to(dev)], self.sin[sel.to(dev)]
            w_r, p_r = self.width[rows].to(dev), self.lookup[rows].to(dev)
            pre = torch.arange(self.p_max, device=dev)[None] < p_r[:, None]                # [R, P]
            ar = torch.arange(W, device=dev)
            suf = (ar[None, None] <= ar[None, :, None]) & (ar[None, None] < w_r[:, None, None])  # [R, W, W]
            attn_mask = torch.cat([pre[:, None].expand(R, W, self.p_max), suf], 2)[:, None]
            x = self.run_blocks(self.blocks, x, cos, sin, self.kv, None if all_rows else rows.to(dev),
                           attn_mask, flat, need, R, W)
        else:
            x = x[need]
        x = self.norm(x)
        return x.new_zeros(R * W, x.shape[-1]).index_copy(0, flat[need], x).view(R, W, -1)


def run_blocks(blocks, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kvs, kv_rows: torch.Tensor | None,
               attn_mask: torch.Tensor, flat: torch.Tensor, need: torch.Tensor, R: int, W: int) -> torch.Tensor:
    """Blocks ``blocks`` (Llama-style, in order) on packed tokens ``x`` [tokens, d]: ``kvs`` the
    cached prefix keys/values per block ([S, kv_heads, P, head_dim]; rows ``kv_rows`` of them, taken
    one block at a time, or all S = R when None), ``attn_mask`` [R, 1, W, P + W],
    ``flat`` each token's slot in the padded [R·W] layout, ``need`` the tokens the last block must
    produce (its attention output, projection and MLP run only there). Pure tensor code with no
    data-dependent control flow, so it can be compiled as one graph (bench/bench_compiled_values.py)."""
    for i, blk in enumerate(blocks):
        att = blk.self_attn
        hd = att.head_dim
        y = blk.input_layernorm(x)
        q = _rope(att.q_proj(y).view(x.shape[0], -1, hd), cos, sin)
        k = _rope(att.k_proj(y).view(x.shape[0], -1, hd), cos, sin)
        v = att.v_proj(y).view(x.shape[0], -1, hd)
        pk, pv = kvs[i] if kv_rows is None else (kvs[i][0][kv_rows], kvs[i][1][kv_rows])

        def pad(t):  # [tokens, h, hd] -> [R, h, W, hd]
            z = t.new_zeros(R * W, *t.shape[1:]).index_copy(0, flat, t)
            return z.view(R, W, *t.shape[1:]).transpose(1, 2)

        keys, vals = torch.cat([pk, pad(k)], 2), torch.cat([pv, pad(v)], 2)
        rep = q.shape[1] // keys.shape[1]  # grouped-query attention: as transformers' repeat_kv
        if rep > 1:
            keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(pad(q), keys, vals, attn_mask=attn_mask, scale=att.scaling)
        o = o.transpose(1, 2).reshape(R * W, -1)[flat]
        if i == len(blocks) - 1:  # nothing after the last block reads other positions
            o, x = o[need], x[need]
        x = x + att.o_proj(o)
        x = x + blk.mlp(blk.post_attention_layernorm(x))
    return x
