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

from dataclasses import dataclass

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
#: torch.compile mode for :func:`_block`; "reduce-overhead" also captures CUDA graphs (CUDA only)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
#: modes whose steps pad their sizes to :func:`bucket` sizes: CUDA graphs are recorded once for
#: each distinct set of input sizes, and the facts' subject, prompt and target lengths (B = 1), and
#: every set of facts still running in a chunk, bring many (bench/value_shapes.py: 100 and 3,485
#: sets over 4,096 CounterFact facts; 33 and 550 bucketed)
BUCKET_MODES = ("reduce-overhead",)
_COMPILED: dict[str, object] = {}


def bucket(n: int) -> int:
    """The smallest size ≥ ``n`` of the form m·2^k with m in 4 … 7 (every size up to 8 is its
    own): four sizes per octave, at most 25 % of padding."""
    if n <= 8:
        return n
    k = n.bit_length() - 3
    return -(-n // (1 << k)) << k


def check_compile_mode(mode: str) -> None:
    """``compile_blocks`` names one of :data:`COMPILE_MODES` (checked where params are read and
    where the blocks are compiled)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_blocks must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def compiled_block(mode: str):
    """:func:`_block` compiled for ``mode`` (once per process and mode). The block is an argument
    and the sizes are dynamic, so one compilation serves every block of every edited layer (and a
    second the last block, which runs only where a loss reads): a graph of the blocks above the
    edited layer would be compiled anew for each layer, and past torch's limit of 8 the later
    layers' steps would run eagerly with nothing but a logged warning. :func:`blocks_fn` calls it
    within :func:`editlib.compiling.recompile_limit`, past which a step fails instead."""
    check_compile_mode(mode)
    if mode not in _COMPILED:
        from .compiling import compiled_or_eager
        _COMPILED[mode] = compiled_or_eager(_block, dynamic=True, fullgraph=True,
                                            mode=None if mode == "default" else mode)
    return _COMPILED[mode]


def blocks_fn(mode: str, device: torch.device):
    """:func:`run_blocks`, with each block compiled for ``mode`` unless it is "off". A one-fact
    value step of a 32-layer model is thousands of small kernels launched from Python: eager
    PyTorch issues them slower than a GPU runs them, which CUDA graphs remove
    (docs/performance.md). Compiled kernels sum in another order, so z moves at float rounding:
    opt-in, never the default."""
    from .compiling import recompile_limit
    check_compile_mode(mode)
    if mode == "off":
        return run_blocks
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"compile_blocks: reduce-overhead captures CUDA graphs; the model is on {device}")
    block = compiled_block(mode)
    message = (f"hparams.common.compile_blocks: {mode} has compiled a value step's block {{limit}} times in "
               "this process (other model sizes, dtypes or layouts); use compile_blocks: off")

    def run(*args):
        with recompile_limit(message):  # once per step, not per block
            if mode != "reduce-overhead":
                return run_blocks(*args, block=block)
            _no_cudagraph_skips()  # one in the previous step's backward
            # one CUDA-graph step per forward: the previous step's outputs may still be alive,
            # and this forward's blocks (and their backward) are the nodes of one step
            torch.compiler.cudagraph_mark_step_begin()
            out = run_blocks(*args, block=block)
            _no_cudagraph_skips()
            return out
    return run


def _no_cudagraph_skips() -> None:
    """torch runs a graph it cannot capture (an input on the host, a mutated input, too many
    re-recordings) without CUDA graphs, and only logs it; under compile_blocks: reduce-overhead
    that would be a run priced and labelled as captured that is not: fail instead, naming the key."""
    from torch._dynamo.utils import counters
    skips = counters["inductor"]["cudagraph_skips"]
    if _SKIPS_AT_START.setdefault("n", skips) < skips:
        raise RuntimeError("hparams.common.compile_blocks: reduce-overhead: torch ran a value step's blocks "
                           "without CUDA graphs (it only logs why: TORCH_LOGS=cudagraphs shows it); use "
                           "compile_blocks: default")


_SKIPS_AT_START: dict[str, int] = {}  # torch's count of skipped CUDA graphs when the first captured step ran


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

    ``buckets`` (default: on under :data:`BUCKET_MODES`) pads every size a step's blocks see
    (sequences, rows, width, prefix, tokens, read positions) to a :func:`bucket` size, so that a
    process records few CUDA graphs. The rows gain at least one row of their own, whose first
    slot receives every padding token (no real row attends it: each row attends only its own
    slots) and which attends only that slot (every softmax row stays finite); the padded prefix
    positions and width slots are masked, and the padding tokens' outputs are never read (so
    their gradients are zero). The real tokens' arithmetic is the same but for the sizes of the
    products, so their outputs move at float rounding at most.
    """

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, lookup: torch.Tensor,
                 need_seq: torch.Tensor, need_pos: torch.Tensor, layer: int, compile_blocks: str = "off",
                 buckets: bool | None = None):
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
        self.buckets = compile_blocks in BUCKET_MODES if buckets is None else buckets

        with torch.no_grad(), Trace(model, spec.layer_name(layer)) as tr:
            out = model.base_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=True)
        h_all = block_output(tr.output)
        self.h = h_all[torch.arange(S, device=dev), lookup.to(dev)]
        self.x0 = h_all[self.tok_seq.to(dev), tok_abs.to(dev)]
        self.kv = [(k[:, :, : self.p_max], v[:, :, : self.p_max]) for k, v in returned_kv(model, out)[layer + 1:]]
        if self.buckets:  # zero sequences and prefix positions (masked) up to bucket sizes
            self.p_max = bucket(self.p_max)
            self.kv = [tuple(_zero_padded(t, (bucket(S), t.shape[1], self.p_max, t.shape[3])) for t in kv)
                       for kv in self.kv]
        rotary = get_module(model, spec.rotary)
        with torch.no_grad():
            cos, sin = rotary(self.x0[None], tok_abs.to(dev)[None])
        self.cos, self.sin = cos[0, :, None, :], sin[0, :, None, :]

    def __call__(self, rows: torch.Tensor, delta_rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), width, d]: final-normed hidden states of sequences ``rows`` at the needed
        positions (relative to the subject token; zero elsewhere); ``delta_rows`` [len(rows), d]."""
        return self.run(self.plan(rows), delta_rows)

    def plan(self, rows: torch.Tensor) -> "_Plan":
        """Everything a step over sequences ``rows`` reads that does not depend on δ: its index
        tensors on the model's device, the attention mask, RoPE's cos/sin. Made on the host once
        per set of rows, so that :meth:`run` issues device work only (what a CUDA graph captures)."""
        dev, R = self.device, len(rows)
        row_of_seq = torch.full((len(self.lookup),), -1, dtype=torch.long)
        row_of_seq[rows] = torch.arange(R)
        r_tok = row_of_seq[self.tok_seq]
        sel = (r_tok >= 0).nonzero()[:, 0]
        r_tok, rel = r_tok[sel], self.tok_rel[sel]
        W = int(self.width[rows].max())
        flat = (r_tok * W + rel).to(dev)
        need = self.tok_need[sel].nonzero()[:, 0].to(dev)
        pl = _Plan(R=R, W=W, sel=sel.to(dev), r_tok=r_tok.to(dev), first=(rel == 0).to(dev)[:, None],
                   flat=flat, need=need)
        if not self.blocks:
            return pl
        if self.buckets:
            return self._bucketed_plan(rows, pl, sel, r_tok, rel)
        all_rows = R == len(self.lookup) and bool((rows == torch.arange(R)).all())
        pl.cos, pl.sin = self.cos[pl.sel], self.sin[pl.sel]
        w_r, p_r = self.width[rows].to(dev), self.lookup[rows].to(dev)
        pl.kv_rows = None if all_rows else rows.to(dev)
        pl.mask = _attn_mask(w_r, p_r, W, self.p_max)
        pl.b_flat, pl.b_need, pl.b_R, pl.b_W = flat, need, R, W
        return pl

    def run(self, pl: "_Plan", delta_rows: torch.Tensor) -> torch.Tensor:
        """:meth:`__call__` for the rows of ``pl`` (:meth:`plan`): device work only."""
        x = self.x0[pl.sel]
        x = torch.where(pl.first, x + delta_rows[pl.r_tok], x).to(self.dtype)  # bf16 models: δ is fp32
        if not self.blocks:
            x = x[pl.need]
        else:
            if pl.pad_tokens:  # bucketed: token 0's input, detached (no gradient reaches δ through it)
                x = torch.cat([x, x[:1].detach().expand(pl.pad_tokens, -1)])
            x = self.run_blocks(self.blocks, x, pl.cos, pl.sin, self.kv, pl.kv_rows, pl.mask, pl.b_flat,
                                pl.b_need, pl.b_R, pl.b_W)
            if pl.pad_tokens is not None:
                x = x[:len(pl.need)]
        x = self.norm(x)
        return x.new_zeros(pl.R * pl.W, x.shape[-1]).index_copy(0, pl.flat[pl.need], x).view(pl.R, pl.W, -1)

    def _bucketed_plan(self, rows, pl: "_Plan", sel, r_tok, rel) -> "_Plan":
        """:meth:`plan` with the blocks' inputs padded to bucket sizes (the class docstring)."""
        dev, R, T, N = self.device, len(rows), len(sel), len(pl.need)
        Rb, Wb, Tb, Nb = bucket(R + 1), bucket(int(self.width[rows].max())), bucket(T), bucket(N)
        # padding tokens: token 0's input and position
        src = torch.cat([sel, sel.new_zeros(Tb - T)]).to(dev)
        pl.pad_tokens = Tb - T
        pl.b_flat = torch.cat([r_tok * Wb + rel, torch.full((Tb - T,), R * Wb)]).to(dev)
        pad_rows = Rb - R  # a padding row: no prefix, one slot (the padding tokens' own)
        w_r = torch.cat([self.width[rows], torch.ones(pad_rows, dtype=torch.long)]).to(dev)
        p_r = torch.cat([self.lookup[rows], torch.zeros(pad_rows, dtype=torch.long)]).to(dev)
        pl.kv_rows = torch.cat([rows, rows.new_zeros(pad_rows)]).to(dev)
        pl.b_need = torch.cat([pl.need, pl.need.new_zeros(Nb - N)])
        pl.cos, pl.sin = self.cos[src], self.sin[src]
        pl.mask = _attn_mask(w_r, p_r, Wb, self.p_max)
        pl.b_R, pl.b_W = Rb, Wb
        return pl


@dataclass
class _Plan:
    """:meth:`PackedSuffix.plan`: a step's δ-independent inputs (tensors on the model's device)."""

    R: int                      # rows (sequences) of the step
    W: int                      # their widest suffix
    sel: torch.Tensor           # packed tokens of those rows
    r_tok: torch.Tensor         # each selected token's row
    first: torch.Tensor         # [tokens, 1] the subject token (δ is added there)
    flat: torch.Tensor          # each token's slot in the [R·W] output layout
    need: torch.Tensor          # the tokens a loss reads
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    b_flat: torch.Tensor | None = None   # the blocks' layout (bucketed: padded sizes)
    b_need: torch.Tensor | None = None
    b_R: int = 0
    b_W: int = 0
    pad_tokens: int | None = None        # bucketed: padding tokens appended (None: not bucketed)


def _zero_padded(t: torch.Tensor, shape: tuple) -> torch.Tensor:
    """``t`` in the leading corner of a zero tensor of ``shape``."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _attn_mask(w_r: torch.Tensor, p_r: torch.Tensor, W: int, P: int) -> torch.Tensor:
    """[R, 1, W, P + W]: row r's queries see its ``p_r`` prefix positions and, causally, its first
    ``w_r`` slots."""
    R, dev = len(w_r), w_r.device
    pre = torch.arange(P, device=dev)[None] < p_r[:, None]                                # [R, P]
    ar = torch.arange(W, device=dev)
    suf = (ar[None, None] <= ar[None, :, None]) & (ar[None, None] < w_r[:, None, None])  # [R, W, W]
    return torch.cat([pre[:, None].expand(R, W, P), suf], 2)[:, None]


def run_blocks(blocks, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kvs, kv_rows: torch.Tensor | None,
               attn_mask: torch.Tensor, flat: torch.Tensor, need: torch.Tensor, R: int, W: int,
               block=None) -> torch.Tensor:
    """Blocks ``blocks`` (Llama-style, in order) on packed tokens ``x`` [tokens, d]: ``kvs`` the
    cached prefix keys/values per block ([S, kv_heads, P, head_dim]; rows ``kv_rows`` of them, or
    all S = R when None), ``attn_mask`` [R, 1, W, P + W], ``flat`` each token's slot in the padded
    [R·W] layout, ``need`` the tokens the last block must produce (its attention output,
    projection and MLP run only there). Each block is one call of ``block`` (:func:`_block`, or
    its compiled form: :func:`compiled_block`)."""
    block = block or _block
    last = len(blocks) - 1
    for i, blk in enumerate(blocks):
        x = block(blk, x, cos, sin, kvs[i][0], kvs[i][1], kv_rows, attn_mask, flat, need if i == last else None, R, W)
    return x


def _block(blk, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
           kv_rows: torch.Tensor | None, attn_mask: torch.Tensor, flat: torch.Tensor, need: torch.Tensor | None,
           R: int, W: int) -> torch.Tensor:
    """One block of :func:`run_blocks`; ``need`` (the last block only): the tokens whose output is
    read. Pure tensor code with no data-dependent control flow, so it compiles as one graph, and
    the block's modules are an argument, so one graph serves every block."""
    att = blk.self_attn
    hd = att.head_dim
    y = blk.input_layernorm(x)
    q = _rope(att.q_proj(y).view(x.shape[0], -1, hd), cos, sin)
    k = _rope(att.k_proj(y).view(x.shape[0], -1, hd), cos, sin)
    v = att.v_proj(y).view(x.shape[0], -1, hd)
    if kv_rows is not None:
        pk, pv = pk[kv_rows], pv[kv_rows]

    def pad(t):  # [tokens, h, hd] -> [R, h, W, hd]
        z = t.new_zeros(R * W, *t.shape[1:]).index_copy(0, flat, t)
        return z.view(R, W, *t.shape[1:]).transpose(1, 2)

    keys, vals = torch.cat([pk, pad(k)], 2), torch.cat([pv, pad(v)], 2)
    rep = q.shape[1] // keys.shape[1]  # grouped-query attention: as transformers' repeat_kv
    if rep > 1:
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
    o = F.scaled_dot_product_attention(pad(q), keys, vals, attn_mask=attn_mask, scale=att.scaling)
    o = o.transpose(1, 2).reshape(R * W, -1)[flat]
    if need is not None:  # nothing after the last block reads other positions
        o, x = o[need], x[need]
    x = x + att.o_proj(o)
    return x + blk.mlp(blk.post_attention_layernorm(x))
