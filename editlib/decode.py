"""Lean KV-cached decoding for GE's batched generation (``evaluation.gen_decode``, issue #13).

GE samples 100 tokens per prompt, one column at a time, every row of a batch at the *same*
position (rows whose prompt is longer are teacher-forced, editlib.generation), so a decode step
needs no padding mask and no per-row positions. The transformers forward does far more per step
than that needs: per layer it builds masks and position tensors, and its dynamic cache
concatenates the whole cache to append one column. At paper scale that is host time: a decode
step of the 32-layer Llama-3-8B shape took 82 ms on an H200 with 10 rows and with 1,020
(docs/paper-scale.md), the GPU idle for most of it.

:class:`Decoder` re-states one decode step of a Llama-style model (the blocks of
:mod:`editlib.packed`) on key/value buffers allocated once per batch, with the per-row edits of
:mod:`editlib.lowrank` (hooks on the down-projections) still firing:

* ``static``: with the model's own modules (every forward hook on them fires); the new column's
  keys/values are written in place and the attention reads the filled prefix of the buffers (a
  view, no copy, no mask): the arithmetic of the transformers step; on the CPU the tests find
  every step's logits bitwise equal to the transformers path's.
* ``graph`` (CUDA): a fixed-shape step: the attention reads the whole buffer under a mask of the
  filled positions and the position is a device tensor, so every step has the same shapes and
  one is captured as a CUDA graph per batch and replayed for every column: thousands of kernels
  without Python between them. Each block's operations up to its MLP's down-projection, and the
  final norm and LM head, are two pure functions of tensors (:func:`_front`, :func:`_tail`: the
  weights are arguments); the down-projection stays a module call, so the per-row hooks fire on
  it (in their branch-free form). Masked attention sums in another order: texts move at float
  rounding, as with another ``gen_batch_size``. The step also runs uncaptured (on a CPU too),
  which is how the tests check it.
* ``compiled``: the same step with the two pure functions compiled by ``torch.compile``: inductor
  fuses the norms, RoPE, the cache write and the activation, so a block is about 20 kernels
  where the eager fixed-shape step dispatches 44 and the transformers forward 41 (a 32-layer
  bfloat16 Llama on the CPU, bench/bench_decode.py --count-kernels; on an H200 the transformers
  forward launched about 90 per block).
  Captured as a CUDA graph per batch on CUDA, as ``graph``; compiled and uncaptured on a CPU.
  Weights are arguments and sizes dynamic, so one compilation serves every block, batch and row
  count of a model (another model's sizes, dtype or bias layout compiles anew). Fused kernels
  round differently: texts move at float rounding.

The prefill (the prompts' common prefix) runs through the transformers forward; its cache is
copied into the buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .arch import arch_for, get_module, n_layers
from .compiling import compiled_or_eager, recompile_limit
from .cudagraphs import WARMUPS, CapturedStep
from .generation import _cache_name, _last_logits_kw
from .packed import _rope
from .packed import unsupported as packed_unsupported

#: ``evaluation.gen_decode``: transformers (the reference path, default) | static | graph (CUDA) |
#: compiled (torch.compile'd fixed-shape step; captured on CUDA)
DECODE_MODES = ("transformers", "static", "graph", "compiled")
#: modes whose step has fixed shapes (and is captured as a CUDA graph on a GPU)
FIXED_MODES = ("graph", "compiled")
#: what the fixed-shape step re-states as pure functions: transformers' RMSNorm classes (the same
#: operations) and the MLP activations it knows
_PURE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
_PURE_ACTS = {"silu": F.silu, "swish": F.silu}

_ROPE_FIXED = (None, "default", "linear", "llama3", "yarn")  # cos/sin of a position do not depend on the length


def check_decode_mode(mode: str) -> None:
    """``mode`` is one of :data:`DECODE_MODES`."""
    if mode not in DECODE_MODES:
        raise ValueError(f"evaluation.gen_decode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")


def check_decodable(model, mode: str, width: int) -> None:
    """``mode`` is a decode mode that can run ``model`` up to ``width`` tokens, else ValueError
    naming ``evaluation.gen_decode`` and the reason (the params check, the CLI and
    :func:`editlib.generation.sample_texts` all say it this way)."""
    check_decode_mode(mode)
    why = None if mode == "transformers" else unsupported(model, width, mode)
    if why:
        raise ValueError(f"evaluation.gen_decode: {mode} cannot decode this model: {why}")


def unsupported(model, width: int, mode: str = "static") -> str | None:
    """Why :class:`Decoder` cannot decode ``model`` up to ``width`` tokens in ``mode`` (None: it can)."""
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
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        return "accelerate hooks (a model split across devices or offloaded): the decode step would bypass them"
    if len({p.device for p in model.parameters()}) > 1:
        return "parameters on more than one device"
    return _pure_unsupported(model) if mode in FIXED_MODES else None


def _plain_linear(m) -> bool:
    return type(m) is torch.nn.Linear and not parametrize.is_parametrized(m)


def _pure_unsupported(model) -> str | None:
    """Why the fixed-shape step's pure functions would not compute ``model``'s blocks (None: they do)."""
    spec = arch_for(model)
    act = getattr(model.config, "hidden_act", None)
    if act not in _PURE_ACTS:
        return f"MLP activation {act!r} (the fixed-shape step knows {', '.join(_PURE_ACTS)})"
    norms = [get_module(model, spec.final_norm)]
    for i in range(n_layers(model)):
        blk = get_module(model, spec.layer_name(i))
        norms += [blk.input_layernorm, blk.post_attention_layernorm]
        mlp, att = blk.mlp, blk.self_attn
        linears = [getattr(m, n, None) for m, names in ((mlp, ("gate_proj", "up_proj", "down_proj")),
                                                       (att, ("q_proj", "k_proj", "v_proj", "o_proj"))) for n in names]
        # exactly nn.Linear: a subclass (a quantised layer) has a forward of its own, which F.linear
        # on .weight would not run; a parametrised weight would be read once, when the Decoder is built
        if not all(_plain_linear(m) for m in linears):
            return f"block {i}'s attention or MLP is not the Llama layout of plain nn.Linear projections"
    if not _plain_linear(get_module(model, spec.lm_head)):
        return "the LM head is not a plain nn.Linear"
    odd = sorted({type(n).__name__ for n in norms} - set(_PURE_NORMS))
    if odd:
        return f"norm {odd[0]} (the fixed-shape step re-states {', '.join(_PURE_NORMS)})"
    return None


def _inactive_capture_hook(hook) -> bool:
    """transformers' output-capturing hooks (installed for good by a forward that asked for hidden
    states or attentions): they record only inside such a forward, never in a decode step."""
    return getattr(hook, "__name__", "") == "output_capturing_hook"


def _hooks(module) -> list:
    return [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]


class Decoder:
    """Decode ``rows`` sequences, all at the same position, up to ``width`` tokens.

    :meth:`prefill` runs the transformers forward on the first columns and keeps its cache;
    :meth:`step` feeds one column at position ``t`` and returns the last logits ``[rows, vocab]``.
    ``mode`` ``static``, ``graph`` or ``compiled`` (:data:`DECODE_MODES`); ``capture`` (the
    fixed-shape modes only, default: on CUDA) records the step as a CUDA graph at the first
    :meth:`step`.
    """

    def __init__(self, model, rows: int, width: int, mode: str, *, capture: bool | None = None):
        if mode == "transformers":
            raise ValueError("Decoder runs the static, graph and compiled modes; transformers is the model's own forward")
        check_decodable(model, mode, width)
        spec = arch_for(model)
        p = next(model.parameters())
        self.model, self.rows, self.width, self.mode = model, rows, width, mode
        self.fixed = mode in FIXED_MODES
        self.capture = (p.device.type == "cuda") if capture is None else capture
        if self.fixed and self.capture and p.device.type != "cuda":
            raise ValueError(f"evaluation.gen_decode: {mode} captures CUDA graphs; the model is on {p.device}")
        self.blocks = [get_module(model, spec.layer_name(i)) for i in range(n_layers(model))]
        self.embed = get_module(model, spec.embed)
        self.norm = get_module(model, spec.final_norm)
        self.head = get_module(model, spec.lm_head)
        att = self.blocks[0].self_attn
        self.head_dim = att.head_dim
        self.kv_heads = att.k_proj.out_features // att.head_dim
        self.n_rep = att.q_proj.out_features // att.head_dim // self.kv_heads
        self.row_hooks = self._check_hooks(spec)
        rotary = get_module(model, spec.rotary)
        with torch.no_grad():
            cos, sin = rotary(p.new_empty(0), torch.arange(width, device=p.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [width, head_dim]
        self.device, self.dtype = p.device, p.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.filled = 0
        self._graph = None
        if self.fixed:
            self.col = torch.zeros(rows, dtype=torch.long, device=p.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=p.device)
            self.arange = torch.arange(width, device=p.device)
            self.zero = torch.zeros(rows, 1, self.embed.embedding_dim, device=p.device, dtype=p.dtype)
            self.weights = [_block_args(b) for b in self.blocks]

    def _check_hooks(self, spec) -> list:
        """The forward hooks a step would meet. A hook on a module the step bypasses (a block, an
        attention module, the model itself; under the fixed-shape modes every module but the
        embedding and the down-projections) would fire in the transformers forward and not here:
        refused, as is (fixed-shape modes) any hook on a called module but editlib's per-row
        edits, whose capture-safe form :meth:`step` switches on. Returns those per-row hooks."""
        from .lowrank import _RowHook
        if self.fixed:  # the pure functions read the other modules' weights, calling none
            called = {id(m) for m in [self.embed] + [b.mlp.down_proj for b in self.blocks]}
        else:
            called = {id(m) for top in [self.embed, self.norm, self.head] + [
                c for b in self.blocks for c in (b.input_layernorm, b.post_attention_layernorm, b.mlp,
                                                 b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj,
                                                 b.self_attn.o_proj)] for m in top.modules()}
        row_hooks = []
        for name, mod in self.model.named_modules():
            for hook in _hooks(mod):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, _RowHook):
                    row_hooks.append(owner)
                if _inactive_capture_hook(hook) or (id(mod) in called and (not self.fixed or isinstance(owner, _RowHook))):
                    continue
                where = "a module the decode step does not call" if id(mod) not in called else "a CUDA graph"
                raise ValueError(f"evaluation.gen_decode: {self.mode} cannot run the forward "
                                 f"hook {hook!r} on {name or 'the model'} ({where}); use gen_decode: transformers")
        return row_hooks

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """The transformers forward on ``ids`` [rows, P] (P < width); its cache fills the buffers.
        Returns the last position's logits."""
        P = ids.shape[1]
        if ids.shape[0] != self.rows or not 0 < P < self.width:
            raise ValueError(f"prefill of {tuple(ids.shape)} for {self.rows} rows of width {self.width}")
        if self._graph is not None:  # its recorded step reads the buffers this prefill would replace
            raise ValueError("a Decoder whose step is captured decodes one batch: prefill again with a new Decoder")
        out = self.model(input_ids=ids, use_cache=True, **_last_logits_kw(self.model))
        cache = getattr(out, _cache_name(self.model), None) or out.past_key_values
        shape = (self.rows, self.kv_heads, self.width, self.head_dim)
        self.k, self.v = [], []
        for layer in cache.layers:  # each layer's prefill cache is released once copied: the peak stays near the buffers'
            for bufs, t in ((self.k, layer.keys), (self.v, layer.values)):
                bufs.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
                bufs[-1][:, :, :P].copy_(t)
            layer.keys = layer.values = None
        del cache
        self.filled = P
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, col: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token ids ``col`` [rows] at position ``t`` (the next unfilled one); the logits
        [rows, vocab] that predict position t + 1. Under a captured graph the tensor is the
        graph's output, overwritten by the next step (read or copy it before)."""
        if t != self.filled or t >= self.width:
            raise ValueError(f"decode step at position {t}: {self.filled} of {self.width} positions are filled")
        if not self.fixed:
            out = self._step(col[:, None], t)
        else:
            self.col.copy_(col)
            self.pos.fill_(t)
            if not self.capture:
                with _static_form(self.row_hooks):
                    out = self._step(self.col[:, None], None)
            else:
                with torch.cuda.device(self.device):  # the graph, its stream and pool on the model's GPU
                    if self._graph is None:
                        self._graph, self._out = self._record()
                    self._graph.replay()
                out = self._out
        self.filled = t + 1
        return out

    def _record(self):
        """Capture the fixed-shape step as a CUDA graph (:func:`_capture`) with the per-row hooks in
        their capture-safe form and their labels on the device. The step is idempotent (it
        rewrites the same column), so warm-up and capture leave the buffers as one step would.
        Deterministic mode is off while capturing, as torch before 2.4 needed (its deterministic
        ``index_copy_`` checked the index on the host); a one-position copy is deterministic
        either way."""
        _rows_on(self.row_hooks, self.device)
        det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        try:
            with _static_form(self.row_hooks):
                return _capture(lambda: self._step(self.col[:, None], None), self.device)
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn_only)

    def _step(self, col: torch.Tensor, t: int | None) -> torch.Tensor:
        """One decode step; ``t`` None: the fixed-shape form (:meth:`_fixed_step`), else the filled
        prefix ``[: t + 1]`` of the buffers."""
        rows = col.shape[0]
        x = self.embed(col)                                                   # [rows, 1, d]
        if t is None:
            return self._fixed_step(x)
        cos, sin = self.cos[t:t + 1][None, None], self.sin[t:t + 1][None, None]  # [1, 1, 1, head_dim]
        shape = (rows, 1, -1, self.head_dim)
        gqa = {"enable_gqa": True} if self.n_rep > 1 else {}
        for i, blk in enumerate(self.blocks):
            att = blk.self_attn
            y = blk.input_layernorm(x)
            q = att.q_proj(y).view(shape).transpose(1, 2)                     # [rows, heads, 1, hd]
            k = att.k_proj(y).view(shape).transpose(1, 2)
            v = att.v_proj(y).view(shape).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)                     # as apply_rotary_pos_emb
            self.k[i][:, :, t] = k[:, :, 0]
            self.v[i][:, :, t] = v[:, :, 0]
            o = F.scaled_dot_product_attention(q, self.k[i][:, :, :t + 1], self.v[i][:, :, :t + 1],
                                               attn_mask=None, dropout_p=0.0, scale=att.scaling,
                                               is_causal=False, **gqa)
            o = o.transpose(1, 2).contiguous().reshape(rows, 1, -1).contiguous()
            x = x + att.o_proj(o)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        return self.head(self.norm(x))[:, -1]

    def _fixed_step(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed-shape step (position ``self.pos``, whole buffers under a mask): :func:`_front`
        per block, each followed by the block's down-projection module (its per-row hooks fire),
        then :func:`_tail`; both as they are (graph) or compiled (compiled), the whole step within
        :func:`editlib.compiling.recompile_limit`."""
        front, tail = (_compiled("front"), _compiled("tail")) if self.mode == "compiled" else (_front, _tail)
        act = self.model.config.hidden_act
        cos, sin = self.cos.index_select(0, self.pos)[None, None], self.sin.index_select(0, self.pos)[None, None]
        mask = (self.arange <= self.pos)[None, None, None]                    # [1, 1, 1, width]
        prev = self.zero
        with recompile_limit(RECOMPILED):
            for i, blk in enumerate(self.blocks):
                att = blk.self_attn
                x, h = front(x, prev, self.k[i], self.v[i], self.pos, cos, sin, mask, *self.weights[i],
                             self.kv_heads, self.head_dim, att.scaling, act)
                prev = blk.mlp.down_proj(h)
            return tail(x, prev, self.norm.weight, self.norm.variance_epsilon, self.head.weight, self.head.bias)


# ----------------------------------------------------------------- the fixed-shape step's pure functions

def _block_args(blk) -> tuple:
    """A block's weights, biases and norm epsilons in :func:`_front`'s order."""
    att, mlp = blk.self_attn, blk.mlp
    return (blk.input_layernorm.weight, blk.input_layernorm.variance_epsilon,
            att.q_proj.weight, att.q_proj.bias, att.k_proj.weight, att.k_proj.bias,
            att.v_proj.weight, att.v_proj.bias, att.o_proj.weight, att.o_proj.bias,
            blk.post_attention_layernorm.weight, blk.post_attention_layernorm.variance_epsilon,
            mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm (Mistral's, Qwen2's), operation for operation."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def _front(x, prev, kb, vb, pos, cos, sin, mask, ln1, eps1, wq, bq, wk, bk, wv, bv, wo, bo,
           ln2, eps2, wg, bg, wu, bu, kv_heads: int, head_dim: int, scaling: float, act: str):
    """One block of the fixed-shape decode step up to its MLP's down-projection: ``x + prev`` (the
    previous block's MLP output) is the block's input; writes the new key/value column into
    ``kb``/``vb`` at ``pos`` (``cos``/``sin`` its RoPE, ``mask`` the filled positions); returns the
    residual stream after attention and the down-projection's input. The same operations as the
    transformers forward's block, but for masked attention over the whole buffers (its query heads
    packed per key/value head, transformers' ``pack_gqa``: fused attention kernels take a mask
    this way, and none takes one with ``enable_gqa``)."""
    x = x + prev
    rows = x.shape[0]
    y = _rms(x, ln1, eps1)
    shape = (rows, 1, -1, head_dim)
    q = F.linear(y, wq, bq).view(shape).transpose(1, 2)
    k = F.linear(y, wk, bk).view(shape).transpose(1, 2)
    v = F.linear(y, wv, bv).view(shape).transpose(1, 2)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    kb.index_copy_(2, pos, k)
    vb.index_copy_(2, pos, v)
    qq = q.reshape(rows, kv_heads, -1, head_dim)
    o = F.scaled_dot_product_attention(qq, kb, vb, attn_mask=mask, dropout_p=0.0, scale=scaling, is_causal=False)
    o = o.reshape(rows, -1, 1, head_dim).transpose(1, 2).reshape(rows, 1, -1)
    x = x + F.linear(o, wo, bo)
    y = _rms(x, ln2, eps2)
    return x, _PURE_ACTS[act](F.linear(y, wg, bg)) * F.linear(y, wu, bu)


def _tail(x, prev, wn, eps, wh, bh):
    """The last block's residual sum, the final norm and the LM head: logits [rows, vocab]."""
    return F.linear(_rms(x + prev, wn, eps)[:, -1], wh, bh)


_COMPILED_FNS: dict[str, object] = {}
#: the error past editlib.compiling.RECOMPILE_LIMIT compilations of a decode step's function
RECOMPILED = ("evaluation.gen_decode: compiled has compiled its decode step {limit} times in this process "
              "(other model sizes, dtypes or bias layouts); use gen_decode: graph")


def _compiled(name: str):
    """:func:`_front` or :func:`_tail` compiled (once per process, as one graph: ``fullgraph``).
    The weights are arguments and the sizes dynamic, so the blocks, batches and row counts of a
    model share the compiled code; :meth:`Decoder._fixed_step` calls them within
    :func:`editlib.compiling.recompile_limit` (a call fails rather than silently running eagerly),
    and under a ``TorchDispatchMode`` (bench/arithmetic_floor.py's counters, a tensor watch) they
    run as written."""
    if name not in _COMPILED_FNS:
        _COMPILED_FNS[name] = compiled_or_eager({"front": _front, "tail": _tail}[name], dynamic=True, fullgraph=True)
    return _COMPILED_FNS[name]


#: eager warm-up calls before each decode batch's step is recorded (each a whole eager step of the
#: batch). Not fewer once the stream has recorded, as the value steps take: a batch of another row
#: count may compile ``compiled``'s step anew, and inductor's first launches autotune, which
#: synchronises; that must happen in the first warm-up, not in the last, strict one
DECODE_WARMUPS = WARMUPS


def _capture(fn, device: torch.device):
    """``fn`` (a step without host synchronisation) captured as a CUDA graph on the capture stream of
    ``device`` after its warm-up calls there (:data:`DECODE_WARMUPS`, the last strict about host
    synchronisation: :class:`editlib.cudagraphs.CapturedStep`). Returns the graph and its output
    tensor (rewritten by every replay)."""
    step = CapturedStep(fn, device, "evaluation.gen_decode", warmups=DECODE_WARMUPS)
    for _ in range(step.warmups):
        step.warm()
    out = step.record()
    return step.graph, out


def _rows_on(hooks, device: torch.device) -> None:
    """Before a capture: every per-row hook's labels on the model's device (a host copy cannot be
    captured) and within its edits (an out-of-range label would be a device-side assert inside a
    replay, which ends the CUDA context)."""
    for h in hooks:
        if h.rows is None:
            continue
        if h.rows.numel() and (int(h.rows.min()) < -1 or int(h.rows.max()) >= len(h.edits)):
            raise ValueError(f"{type(h).__name__}: row labels {int(h.rows.min())}..{int(h.rows.max())} "
                             f"for {len(h.edits)} edits")
        h.rows = h.rows.to(device)


class _static_form:
    """editlib's per-row hooks (:mod:`editlib.lowrank`) in their form without data-dependent
    control flow or host synchronisation (what a CUDA graph can capture) while the block runs."""

    def __init__(self, hooks):
        self.hooks = hooks

    def __enter__(self):
        for h in self.hooks:
            h.static_shapes = True
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.static_shapes = False
        return False
