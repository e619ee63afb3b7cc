"""Lean KV-cached decoding for GE's batched generation (``evaluation.gen_decode``, issue #13).

GE samples 100 tokens per prompt, one column at a time, every row of a batch at the *same*
position (rows whose prompt is longer are teacher-forced, editlib.generation), so a decode step
needs no padding mask and no per-row positions. The transformers forward does far more per step
than that needs: per layer it builds masks and position tensors, and its dynamic cache
concatenates the whole cache to append one column. At paper scale that is host time: a decode
step of the 32-layer Llama-3-8B shape took 82 ms on an H200 with 10 rows and with 1,020
(docs/paper-scale.md), the GPU idle for most of it.

:class:`Decoder` re-states one decode step of a Llama-style model (the blocks of
:mod:`editlib.packed`) with the model's own modules, so every forward hook on them (the per-row
edits of :mod:`editlib.lowrank`) still fires, on key/value buffers allocated once per batch:

* ``static``: the new column's keys/values are written in place and the attention reads the
  filled prefix of the buffers (a view, no copy, no mask): the arithmetic of the transformers
  step; tests hold texts equal to the transformers path and logits to float64 round-off.
* ``graph`` (CUDA): every step has the same shapes (the attention reads the whole buffer under a
  mask of the filled positions; the position is a device tensor), so one step is captured as a
  CUDA graph per batch and replayed for every column: a few hundred kernels without Python
  between them. Masked attention sums in another order: texts move at float rounding, as with
  another ``gen_batch_size``. The fixed-shape step also runs uncaptured (on a CPU too), which is
  how the tests check it.

The prefill (the prompts' common prefix) runs through the transformers forward; its cache is
copied into the buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arch import arch_for, get_module, n_layers
from .generation import _last_logits_kw, returned_kv

#: ``evaluation.gen_decode``: transformers (the reference path, default) | static | graph (CUDA)
DECODE_MODES = ("transformers", "static", "graph")

_ROPE_FIXED = (None, "default", "linear", "llama3", "yarn")  # cos/sin of a position do not depend on the length


def check_decode_mode(mode: str) -> None:
    """``mode`` is one of :data:`DECODE_MODES`."""
    if mode not in DECODE_MODES:
        raise ValueError(f"evaluation.gen_decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")


def unsupported(model, width: int) -> str | None:
    """Why :class:`Decoder` cannot decode ``model`` up to ``width`` tokens (None: it can)."""
    from .packed import unsupported as packed_unsupported
    cfg = model.config
    reason = packed_unsupported(model, width)  # Llama-style blocks, no sliding window within the width
    if reason:
        return reason
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in (None, "sdpa"):
        return f"attention implementation {impl!r} (the decode step re-states sdpa's)"
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind not in _ROPE_FIXED:
        return f"RoPE type {kind!r} (its frequencies depend on the sequence length)"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder:
    """Decode ``rows`` sequences, all at the same position, up to ``width`` tokens.

    :meth:`prefill` runs the transformers forward on the first columns and keeps its cache;
    :meth:`step` feeds one column at position ``t`` and returns the last logits ``[rows, vocab]``.
    ``mode`` ``static`` or ``graph`` (:data:`DECODE_MODES`); ``capture`` (``graph`` only, default:
    on CUDA) records the fixed-shape step as a CUDA graph at the first :meth:`step`.
    """

    def __init__(self, model, rows: int, width: int, mode: str, *, capture: bool | None = None):
        check_decode_mode(mode)
        if mode == "transformers":
            raise ValueError("Decoder runs the static and graph modes; transformers is the model's own forward")
        reason = unsupported(model, width)
        if reason:
            raise ValueError(f"evaluation.gen_decode: {mode} cannot decode this model: {reason}")
        spec = arch_for(model)
        p = next(model.parameters())
        self.model, self.rows, self.width, self.fixed = model, rows, width, mode == "graph"
        self.capture = (p.device.type == "cuda") if capture is None else capture
        if self.fixed and self.capture and p.device.type != "cuda":
            raise ValueError(f"evaluation.gen_decode: graph captures CUDA graphs; the model is on {p.device}")
        self.blocks = [get_module(model, spec.layer_name(i)) for i in range(n_layers(model))]
        self.embed = get_module(model, spec.embed)
        self.norm = get_module(model, spec.final_norm)
        self.head = get_module(model, spec.lm_head)
        att = self.blocks[0].self_attn
        self.head_dim = att.head_dim
        kv_heads = att.k_proj.out_features // att.head_dim
        self.gqa = att.q_proj.out_features // att.head_dim > kv_heads
        shape = (rows, kv_heads, width, self.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.blocks]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in self.blocks]
        rotary = get_module(model, spec.rotary)
        with torch.no_grad():
            cos, sin = rotary(p.new_empty(0), torch.arange(width, device=p.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [width, head_dim]
        self.filled = 0
        self._graph = None
        if self.fixed:
            self.col = torch.zeros(rows, dtype=torch.long, device=p.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=p.device)
            self.arange = torch.arange(width, device=p.device)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The transformers forward on ``ids`` [rows, P] (P < width); its cache fills the buffers.
        Returns the last position's logits."""
        P = ids.shape[1]
        if ids.shape[0] != self.rows or not 0 < P < self.width:
            raise ValueError(f"prefill of {tuple(ids.shape)} for {self.rows} rows of width {self.width}")
        out = self.model(input_ids=ids, use_cache=True, **_last_logits_kw(self.model))
        for i, (k, v) in enumerate(returned_kv(self.model, out)):
            self.k[i][:, :, :P].copy_(k)
            self.v[i][:, :, :P].copy_(v)
        self.filled = P
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, col: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token ids ``col`` [rows] at position ``t`` (the next unfilled one); the logits
        [rows, vocab] that predict position t + 1."""
        if t != self.filled or t >= self.width:
            raise ValueError(f"decode step at position {t}: {self.filled} of {self.width} positions are filled")
        self.filled = t + 1
        if not self.fixed:
            return self._step(col[:, None], t)
        self.col.copy_(col)
        self.pos.fill_(t)
        if not self.capture:
            with _static_hooks(self.model):
                return self._step(self.col[:, None], None)
        if self._graph is None:
            with _static_hooks(self.model):
                self._graph, self._out = self._record()
        self._graph.replay()
        return self._out

    def _record(self):
        """Capture the fixed-shape step as a CUDA graph (warm-up on a side stream first, as CUDA
        graphs require). The step is idempotent (it rewrites the same column), so the warm-up and
        the capture leave the buffers as one step would."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(self.col[:, None], None)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._step(self.col[:, None], None)
        return graph, out

    def _step(self, col: torch.Tensor, t: int | None) -> torch.Tensor:
        """One decode step; ``t`` None: the fixed-shape form (position ``self.pos``, whole buffers
        under a mask), else the filled prefix ``[: t + 1]`` of the buffers."""
        rows = col.shape[0]
        x = self.embed(col)                                                   # [rows, 1, d]
        if t is None:
            cos, sin = self.cos.index_select(0, self.pos), self.sin.index_select(0, self.pos)
            mask = (self.arange <= self.pos)[None, None, None]                # [1, 1, 1, width]
        else:
            cos, sin, mask = self.cos[t:t + 1], self.sin[t:t + 1], None
        cos, sin = cos[None, None], sin[None, None]                           # [1, 1, 1, head_dim]
        shape = (rows, 1, -1, self.head_dim)
        for i, blk in enumerate(self.blocks):
            att = blk.self_attn
            y = blk.input_layernorm(x)
            q = att.q_proj(y).view(shape).transpose(1, 2)                     # [rows, heads, 1, hd]
            k = att.k_proj(y).view(shape).transpose(1, 2)
            v = att.v_proj(y).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)                           # as apply_rotary_pos_emb
            k = (k * cos) + (_rotate_half(k) * sin)
            if t is None:
                self.k[i].index_copy_(2, self.pos, k)
                self.v[i].index_copy_(2, self.pos, v)
                keys, vals = self.k[i], self.v[i]
            else:
                self.k[i][:, :, t] = k[:, :, 0]
                self.v[i][:, :, t] = v[:, :, 0]
                keys, vals = self.k[i][:, :, :t + 1], self.v[i][:, :, :t + 1]
            extra = {"enable_gqa": True} if self.gqa else {}
            o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, dropout_p=0.0,
                                               scale=att.scaling, is_causal=False, **extra)
            o = o.transpose(1, 2).contiguous().reshape(rows, 1, -1).contiguous()
            x = x + att.o_proj(o)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        return self.head(self.norm(x))[:, -1]


class _static_hooks:
    """Around a fixed-shape step: the model's forward hooks must be editlib's per-row hooks
    (:mod:`editlib.lowrank`), switched to their form without data-dependent control flow or host
    synchronisation (what a CUDA graph can capture); any other hook fails, naming its module."""

    def __init__(self, model):
        from .lowrank import _RowHook
        self.hooks = []
        for name, mod in model.named_modules():
            for hook in list(mod._forward_hooks.values()) + list(mod._forward_pre_hooks.values()):
                owner = getattr(hook, "__self__", None)
                if not isinstance(owner, _RowHook):
                    raise ValueError(f"evaluation.gen_decode: graph cannot capture the forward hook {hook!r} "
                                     f"on {name or 'the model'}")
                self.hooks.append(owner)

    def __enter__(self):
        for h in self.hooks:
            h.static_shapes = True
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.static_shapes = False
        return False
