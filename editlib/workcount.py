"""The work a params file asks for, counted exactly as :mod:`editlib.protocols` runs it (issue 11).

:func:`count_grid` mirrors the protocols line by line: the layer search and the singular protocol
prepare targets (values, keys, residuals) once per distinct value setting
(``protocols._value_key``); with ``evaluation.batched_edits`` their one-fact edits are solved in
one multi-right-hand-side call per method and evaluated in one call through per-row low-rank
hooks (else one solve, weight write and evaluation per fact and method). The sweep prepares once
per chunk and re-solves per λ; batch mode prepares once per value setting for all its facts and
solves per batch (evaluating all batches of a size in one call when batched); the sequential
protocol prepares, solves, evaluates and checkpoints per batch (plus the forgetting and final
evaluations). Every notebook of ``python -m editlib reproduce`` opens its own
study (model load, context templates, C0 factor of the layers it edits); the layer search
collects C0 for all its layers, also on the second model when the params name one.
AlphaEdit adds one eigendecomposition of C0 per factored layer (``c0_eigh``: its null space) and
ENCORE one factorisation of λ_p C0 + λ_n I (``pres_factor``); in a sequential run both factor
their preservation matrix again for every batch after the first (the earlier keys K_p changed it).
:class:`TokenStats` holds the per-fact token counts that turn this work into FLOPs
(:mod:`editlib.cost`).
"""
from __future__ import annotations

import bisect
import functools
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["KNOWN_SHAPES", "SOLVES", "ExperimentCount", "ModelShape", "TokenStats", "Work", "count_grid",
           "measure_token_stats", "shape_for"]


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's sizes (all that the cost of editing depends on)."""

    name: str
    n_layers: int
    d: int
    d_in: int  # MLP width = key size of the edited down-projection
    vocab: int
    n_heads: int
    n_kv: int
    head_dim: int

    @property
    def block_params(self) -> int:
        q_o = 2 * self.d * self.n_heads * self.head_dim
        k_v = 2 * self.d * self.n_kv * self.head_dim
        return q_o + k_v + 3 * self.d * self.d_in + 2 * self.d

    def kv_bytes_per_token(self, bpp: int) -> int:
        """KV-cache bytes per token at ``bpp`` bytes per number (editlib.arch.kv_bytes_per_token)."""
        return 2 * self.n_layers * self.n_kv * self.head_dim * bpp

    @property
    def head_params(self) -> int:
        return self.vocab * self.d

    @property
    def params(self) -> int:
        """All parameters (blocks, final norm, LM head, embedding)."""
        return self.n_layers * self.block_params + 2 * self.head_params + self.d

    @classmethod
    def from_config(cls, cfg: dict, name: str) -> "ModelShape":
        heads = int(cfg["num_attention_heads"])
        return cls(name, int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["intermediate_size"]),
                   int(cfg["vocab_size"]), heads, int(cfg.get("num_key_value_heads") or heads),
                   int(cfg.get("head_dim") or cfg["hidden_size"] // heads))


def shape_of(model, name: str) -> ModelShape:
    """A loaded model's shape (its config's sizes): what a units file records it was timed on."""
    return ModelShape.from_config(model.config.to_dict(), name)


#: shapes of the paper's models (their hub config.json), so counting needs no download
KNOWN_SHAPES = {
    "meta-llama/Meta-Llama-3-8B": ModelShape("Llama-3-8B", 32, 4096, 14336, 128256, 32, 8, 128),
    "meta-llama/Llama-2-7b-hf": ModelShape("Llama-2-7B", 32, 4096, 11008, 32000, 32, 32, 128),
}


def shape_for(model_id: str | None, label: str | None = None) -> ModelShape:
    """The shape of a hub id in :data:`KNOWN_SHAPES` or of a local directory's config.json."""
    if model_id in KNOWN_SHAPES:
        return KNOWN_SHAPES[model_id]
    cfg = Path(str(model_id)).expanduser() / "config.json"
    if model_id and cfg.is_file():
        return ModelShape.from_config(json.loads(cfg.read_text()), label or Path(str(model_id)).name)
    raise ValueError(f"no shape known for model {model_id!r}: give a local directory with config.json "
                     f"or one of {sorted(KNOWN_SHAPES)}")


# --------------------------------------------------------------------------- token counts


@dataclass(frozen=True)
class TokenStats:
    """Per-fact token counts of the Llama-3 tokenizer on CounterFact (means; see
    :func:`measure_token_stats`). The defaults were measured on the first 1,000 facts of
    ordering 0 of the 10,459-record CounterFact subset with the real Llama-3 tokenizer and
    MEMIT-style context templates of 10 tokens (``python bench/paper_cost.py --token-stats``)."""

    value_seqs: float = 7.0        # sequences per fact in the value loss (6 templates + KL prompt)
    value_tokens: float = 109.3    # their tokens (run once per chunk, every layer)
    value_packed: float = 26.5     # tokens per fact and Adam iteration (subject token → last read)
    value_labels: float = 7.1      # label positions per fact (NLL) + the KL position
    key_tokens: float = 110.9      # tokens of the 6 key sequences + the plain prompt (residual)
    eval_prompts: float = 13.0     # probability prompts per case (rewrite, 2 paraphrases, 10 neighbours)
    eval_seqs: float = 13.4        # distinct scored sequences per case (one per prompt when both targets are 1 token)
    eval_tokens: float = 143.6     # their tokens
    eval_reads: float = 26.4       # logit rows read per case
    # (length, share) of the distinct scored sequences (BOS included): each forward is padded to its longest
    eval_len_hist: tuple = ((3, 0.0004), (4, 0.0092), (5, 0.0332), (6, 0.0723), (7, 0.1166),
                            (8, 0.1428), (9, 0.1433), (10, 0.1217), (11, 0.0953), (12, 0.0568),
                            (13, 0.037), (14, 0.0211), (15, 0.015), (16, 0.0141), (17, 0.0127),
                            (18, 0.0134), (19, 0.013), (20, 0.0124), (21, 0.0125), (22, 0.0128),
                            (23, 0.0093), (24, 0.0082), (25, 0.0061), (26, 0.0054), (27, 0.004),
                            (28, 0.0028), (29, 0.0019), (30, 0.0017), (31, 0.0013), (32, 0.0007),
                            (33, 0.0008), (34, 0.0003), (35, 0.0002), (36, 0.0003), (37, 0.0004),
                            (38, 0.0001), (39, 0.0001), (40, 0.0003), (42, 0.0001), (44, 0.0001),
                            (47, 0.0001), (55, 0.0001), (64, 0.0001))
    gen_prompts: float = 10.0      # generation prompts per case (GE)
    gen_len_hist: tuple = ((5, 0.007), (6, 0.035), (7, 0.103), (8, 0.141), (9, 0.166), (10, 0.155),
                           (11, 0.125), (12, 0.09), (13, 0.068), (14, 0.049), (15, 0.028), (16, 0.017),
                           (17, 0.006), (18, 0.005), (19, 0.003), (20, 0.001))
    gen_case_min_len: float = 8.4  # mean over cases of their shortest generation prompt (tokens, BOS included)
    source: str = "defaults (Llama-3 tokenizer, CounterFact subset, 1,000 facts)"

    def gen_lengths(self, n: int) -> tuple[int, ...]:
        """``n`` generation-prompt lengths following the histogram, sorted (as sample_texts sorts).
        Remembered per histogram and ``n``: the cost model asks for the same lengths thousands of
        times over a grid."""
        return _quantile_lengths(self.gen_len_hist, n)

    def eval_padding(self, cases: float, batch: int) -> float:
        """Padded over real tokens of one scoring call of ``cases`` cases (``eval_seqs`` sequences
        each) run ``batch`` sequences per forward: :func:`editlib.scoring.score_targets` sorts the
        sequences by length and pads each forward to its longest. 1 without ``eval_len_hist``."""
        if not self.eval_len_hist:
            return 1.0
        return _padding(self.eval_len_hist, max(1, int(round(cases * self.eval_seqs))), int(batch))


@functools.lru_cache(maxsize=256)
def _padding(hist: tuple, n: int, batch: int) -> float:
    """Padded over real tokens of ``n`` sequences whose lengths follow ``hist``, sorted and cut into
    forwards of ``batch`` (each padded to its last, longest, sequence)."""
    lens = _quantile_lengths(hist, n)
    padded = sum(lens[min(i + batch, n) - 1] * (min(i + batch, n) - i) for i in range(0, n, batch))
    return padded / sum(lens)


@functools.lru_cache(maxsize=256)
def _quantile_lengths(hist: tuple, n: int) -> tuple[int, ...]:
    """Quantile i of ``n`` of the length histogram ``hist``, for i = 0 … n−1 (each the first length
    whose cumulative weight reaches (i + 0.5) / n)."""
    total = sum(w for _, w in hist)
    edges, lengths, acc = [], [], 0.0
    for length, w in hist:
        acc += w / total
        edges.append(acc + 1e-12)
        lengths.append(length)
    return tuple(lengths[bisect.bisect_left(edges, (i + 0.5) / n)] for i in range(n))


def measure_token_stats(records: Sequence, tok, n: int = 1000, context_len: int = 10) -> TokenStats:
    """:class:`TokenStats` of ``records[:n]`` exactly as :mod:`editlib.values`, :mod:`editlib.reprs`,
    :mod:`editlib.scoring` and :mod:`editlib.generation` tokenise them, with MEMIT-style context
    templates of ``context_len`` tokens (the reference samples 10-token texts)."""
    import torch

    from .context import MEMIT_SEEDS, ContextTemplates
    from .metrics import _flatten
    from .scoring import _read_plan, _TokCache
    from .tokens import encode, filled_ids, in_context
    from .values import _build

    recs = list(records[:n])
    filler = " the" * 40
    ctx_texts = []
    for seed in MEMIT_SEEDS:  # a seed word followed by filler up to context_len tokens (BOS included)
        ids = encode(tok, seed + filler)[1:context_len]
        ctx_texts.append(tok.decode(ids, clean_up_tokenization_spaces=False) + ". {}")
    ctx = ContextTemplates(groups=(("{}",), tuple(ctx_texts)))
    seq = _build(tok, recs, ctx)
    kl = seq.is_kl.nonzero()[:, 0]
    need_seq = torch.cat([seq.lab_seq, kl])
    need_pos = torch.cat([seq.lab_pos, seq.lookup[kl]])
    width = torch.ones(len(seq.lookup), dtype=torch.long).scatter_reduce(
        0, need_seq, need_pos - seq.lookup[need_seq] + 1, "amax")
    key_tok = sum(len(filled_ids(tok, in_context(c, r.prompt), r.subject)[0]) for r in recs for c in ctx.flat)
    key_tok += sum(len(filled_ids(tok, r.prompt, r.subject)[0]) for r in recs)
    fl = _flatten(recs)
    cache = _TokCache(tok, "correct")
    reads = 0
    eval_lens: Counter = Counter()  # lengths of each case's distinct scored sequences
    for i in range(len(recs)):
        plans = {}
        for j in (fl.owner == i).nonzero()[0]:
            for tgt in (fl.new[j], fl.true[j]):
                ids, cols, _ = _read_plan(cache, fl.prefixes[j], tgt)
                plans.setdefault(ids, 0)
                reads += len(cols)
        eval_lens.update(len(s) for s in plans)
    lens = [len(encode(tok, g)) for r in recs for g in r.generation_prompts]
    hist = Counter(lens)
    mins = [min(len(encode(tok, g)) for g in r.generation_prompts) for r in recs if r.generation_prompts]
    k = len(recs)
    seqs, tokens = sum(eval_lens.values()), sum(l * c for l, c in eval_lens.items())
    return TokenStats(
        value_seqs=round(len(seq.lookup) / k, 2), value_tokens=round(float(seq.mask.sum()) / k, 1),
        value_packed=round(float(width.sum()) / k, 1), value_labels=round(float(len(need_seq)) / k, 1),
        key_tokens=round(key_tok / k, 1), eval_prompts=round(len(fl.prefixes) / k, 2),
        eval_seqs=round(seqs / k, 1), eval_tokens=round(tokens / k, 1), eval_reads=round(reads / k, 1),
        eval_len_hist=tuple((l, round(c / seqs, 4)) for l, c in sorted(eval_lens.items())),
        gen_prompts=round(len(lens) / k, 2),
        gen_len_hist=tuple((l, round(c / len(lens), 3)) for l, c in sorted(hist.items())),
        gen_case_min_len=round(sum(mins) / max(len(mins), 1), 1),
        source=f"measured: {k} facts, tokenizer {type(tok).__name__} ({len(tok)} ids)")


# --------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class Work:
    """``count`` repetitions of one unit of work. ``size``: facts per value/key call, N of a
    solve, cases per evaluation call, layers per C0 pass, edits per checkpoint; ``layer``: the
    edited layer (the deepest one for a C0 pass). ``held``: for an evaluation whose blocks below
    ``layer`` replay an earlier evaluation's (editlib.below), the cases whose outputs must be kept
    for it (0: every block runs)."""

    kind: str  # one of SOLVES, values | keys | eval | degradation | c0_collect | c0_factor | c0_eigh | pres_factor | ckpt | load
    count: int
    size: int = 1
    layer: int = 0
    held: int = 0


#: solve kinds: ``solve`` N edits solved together and written into the weights (EditSession);
#: ``solve_lr`` solved only (batched batch mode: evaluated through per-row low-rank hooks);
#: ``solve_r1`` N independent one-fact edits in one multi-right-hand-side solve (batched
#: singular edits: the layer search and Table 1)
SOLVES = ("solve", "solve_lr", "solve_r1")


@dataclass
class ExperimentCount:
    """The work of one experiment (one notebook's study) on one model."""

    name: str
    shape: ModelShape
    generation: bool
    gen_max_len: int
    eval_batch: int
    items: list[Work] = field(default_factory=list)
    #: scoring calls per evaluation: 2 with ``evaluation.also_alignment`` (the second alignment's)
    scorings: int = 1

    def add(self, kind: str, count: int = 1, size: int = 1, layer: int = 0, held: int = 0) -> None:
        if count > 0:
            self.items.append(Work(kind, count, size, layer, held))

    def total(self, kind: str, weight: str = "size") -> int:
        return sum(w.count * (w.size if weight == "size" else 1) for w in self.items if w.kind == kind)

    @property
    def edits(self) -> int:
        """Edits solved (a batch of N counts N)."""
        return sum(self.total(k) for k in SOLVES)

    @property
    def solves(self) -> Counter:
        """Solve calls by N; one-fact edits solved together are keyed ``"1×N"``."""
        c: Counter = Counter()
        for w in self.items:
            if w.kind in ("solve", "solve_lr"):
                c[w.size] += w.count
            elif w.kind == "solve_r1":
                c[f"1×{w.size}"] += w.count
        return c


def _value_chunks(exp: ExperimentCount, n: int, zb: int, layer: int) -> None:
    """compute_values: ``n`` facts in chunks of ``zb`` (the last one smaller), then keys and residuals."""
    full, rest = divmod(n, zb)
    exp.add("values", full, zb, layer)
    exp.add("values", 1 if rest else 0, rest, layer)
    exp.add("keys", 1, n, layer)


def _chunks(n: int, b: int) -> list[int]:
    return [min(b, n - s) for s in range(0, n, b)]


def _new_exp(p, name: str, shape: ModelShape) -> ExperimentCount:
    ev = p.evaluation
    return ExperimentCount(name, shape, bool(ev.generation), int(ev.gen_max_len), int(ev.batch_size),
                           scorings=1 if ev.also_alignment is None else 2)


def _one_layer_exp(p, name: str, methods, layer: int) -> ExperimentCount:
    """An experiment at one edited layer of the main model: the model loaded, that layer's C0
    factored, and the newer editors' per-C0 preparation (:func:`_editor_prep`)."""
    exp = _new_exp(p, name, shape_for(p.model.id, p.model.label))
    exp.add("load")
    exp.add("c0_factor", 1)
    _editor_prep(exp, p, methods, name, layer, 1)
    return exp


def _editor_prep(exp: ExperimentCount, p, methods, section: str, layer: int, factors: int) -> None:
    """editlib.editors, once per factored C0 (cached with it): AlphaEdit's eigendecomposition,
    ENCORE's factor of λ_p C0 + λ_n I."""
    for m in dict.fromkeys(methods):
        hp = p.method_hparams(m, layer, section)
        if hp.method == "alphaedit":
            exp.add("c0_eigh", factors, 1, layer)
        elif hp.method == "encore":
            exp.add("pres_factor", factors, 1, layer)


def _batched(p, hp) -> bool:
    """protocols._batched: independent edits evaluated together unless the params ask for the
    reference path or the edit spans several layers."""
    return bool(getattr(p.evaluation, "batched_edits", False)) and len(hp.layers) == 1


def _shares_below(p, layer: int) -> bool:
    """protocols._shared_below: the blocks below ``layer`` replayed for later evaluations."""
    return layer > 0 and float(getattr(p.evaluation, "share_below_gb", 0) or 0) > 0


def _eval_after(exp: ExperimentCount, p, cases: int, layer: int, held: int) -> None:
    """One batched evaluation call of ``cases`` cases whose prompts an earlier call of the same
    shared object ran (``held`` cases kept): its blocks below ``layer`` replayed when sharing is on."""
    exp.add("eval", 1, cases, layer, held if _shares_below(p, layer) else 0)


def _singular(exp: ExperimentCount, p, facts: int, methods, layer: int, section: str) -> None:
    """protocols._singular_unit: values once per value setting; per method either one
    multi-right-hand-side solve and one evaluation call for all facts (batched; every method
    after the first replays the blocks below the layer), or per fact an N = 1 solve written into
    the weights and a one-case evaluation."""
    from .protocols import _value_key

    seen, scored = set(), False
    for m in methods:
        hp = p.method_hparams(m, layer, section)
        key = _value_key(hp)
        if key not in seen:
            seen.add(key)
            _value_chunks(exp, facts, hp.values.z_batch_size, layer)
        if _batched(p, hp):
            exp.add("solve_r1", 1, facts, layer)
            _eval_after(exp, p, facts, layer, facts if scored else 0)
            scored = True
        else:
            exp.add("solve", facts, 1, layer)
            exp.add("eval", facts, 1, layer)


def count_layer_search(p, which: str = "model") -> ExperimentCount:
    """run_layer_search (+ its notebook's study): C0 of every layer, then per layer the singular
    edits of every method (:func:`_singular`)."""
    mp = p.second_model if which == "second_model" else p.model
    shape = shape_for(mp.id, mp.label)
    ls = p.layer_search
    layers = list(range(shape.n_layers)) if ls.layers == "all" else [int(l) for l in ls.layers]
    exp = _new_exp(p, "layer_search" + ("" if which == "model" else f" ({shape.name})"), shape)
    exp.add("load")
    exp.add("c0_collect", 1, len(layers), max(layers))
    exp.add("c0_factor", len(layers))
    for layer in layers:
        _editor_prep(exp, p, ls.methods, "layer_search", layer, 1)
    for _ in p.data.orderings:
        for layer in layers:
            _singular(exp, p, ls.n_facts, ls.methods, layer, "layer_search")
    return exp


def count_singular(p, layer: int) -> ExperimentCount:
    sp = p.singular
    exp = _one_layer_exp(p, "singular", sp.methods, layer)
    for _ in p.data.orderings:
        _singular(exp, p, sp.n_facts, sp.methods, layer, "singular")
    return exp


def count_sweep(p, layer: int) -> ExperimentCount:
    """protocols._sweep_unit: per chunk, values once per value setting (shared by the chunk's
    units), then per method and λ one solve and one evaluation call (batched: the update added by
    a hook, no weight written; else written into the weights and restored)."""
    from .protocols import _value_key

    sw = p.sweep
    grids = {"memit": list(sw.memit_lambdas), "emmet": list(sw.emmet_lambdas)}
    exp = _one_layer_exp(p, "sweep", list(grids), layer)
    for _ in p.data.orderings:
        for n in _chunks(sw.total, sw.batch_size):
            seen, scored = set(), False
            for method, lams in grids.items():
                for lam in lams:
                    over = {"mom2_update_weight": float(lam)} if method == "memit" else {"emmet_lambda": float(lam)}
                    hp = p.method_hparams(method, layer, "sweep", **over)
                    key = _value_key(hp)
                    if key not in seen:
                        seen.add(key)
                        _value_chunks(exp, n, hp.values.z_batch_size, layer)
                    if _batched(p, hp):  # settings after the chunk's first replay the blocks below
                        exp.add("solve_lr", 1, n, layer)
                        _eval_after(exp, p, n, layer, n if scored else 0)
                        scored = True
                    else:
                        exp.add("solve", 1, n, layer)
                        exp.add("eval", 1, n, layer)
    return exp


def count_batch(p, layer: int) -> ExperimentCount:
    """protocols._batch_unit: values of all facts once per value setting (shared by the
    ordering's units); per method and batch size either every batch solved and all evaluated in
    one call (batched) or each batch written, evaluated and restored."""
    from dataclasses import replace

    from .protocols import MULTI_LAYER, _value_key, runs_at

    bp = p.batch
    exp = _one_layer_exp(p, "batch", bp.methods, layer)
    configs = [(m, w) for m in bp.methods for w in getattr(bp, "windows", (1,)) if w == 1 or m in MULTI_LAYER]
    for _ in p.data.orderings:
        seen, first = set(), None  # the first batched method's evaluations are kept for the later ones
        for method, win in configs:
            hp = p.method_hparams(method, layer, "batch")
            if win > 1:  # a window: values at its last layer, one multi-layer solve per batch
                hp = replace(hp, layers=tuple(range(layer, layer + win)))
            key = _value_key(hp)
            if key not in seen:
                seen.add(key)
                _value_chunks(exp, bp.total, hp.values.z_batch_size, layer)
            for B in [B for B in bp.batch_sizes if runs_at(method, B)]:
                sizes = _chunks(bp.total, B)
                if _batched(p, hp):
                    for n in sizes:
                        exp.add("solve_lr", 1, n, layer)
                    if first is None:
                        first = method
                    n_first = sum(1 for b in bp.batch_sizes if runs_at(first, b))
                    replayed = method != first and runs_at(first, B)
                    _eval_after(exp, p, bp.total, layer, bp.total * n_first if replayed else 0)
                else:
                    for n in sizes:
                        exp.add("solve", 1, n, layer)
                        exp.add("eval", 1, n, layer)
    return exp


def count_sequential(p, layer: int) -> ExperimentCount:
    """protocols._sequential_config: per batch values, keys, a solve written into the weights,
    a checkpoint (the batch's low-rank factors) and one evaluation call (per group of
    consecutive batches holding ``sequential.eval_group`` facts: :func:`editlib.protocols.closes_group`); forgetting evaluations
    after every k edited facts; the final evaluation of all facts. AlphaEdit and ENCORE (with
    add_prev_edits) factor their preservation matrix again for every batch after a run's first."""
    from .degradation import due as degradation_due
    from .editors import uses_prior_keys
    from .lmeval import parse as parse_lm_eval
    from .protocols import MULTI_LAYER, closes_group, measurements_after, runs_at

    sq = p.sequential
    lm_spec = parse_lm_eval(getattr(sq, "lm_eval", None))  # a measurement that also ends an evaluation group
    exp = _one_layer_exp(p, "sequential", sq.methods, layer)
    configs = [(m, w) for m in sq.methods for w in getattr(sq, "windows", (1,)) if w == 1 or m in MULTI_LAYER]
    every = getattr(sq, "degradation_every", None)
    for _ in p.data.orderings:
        if every:  # the unedited model's degradation: once per ordering's held-out set (Study.of_unedited)
            exp.add("degradation", 1, sq.heldout_facts, layer)
        for method, _win in configs:  # a window's values and solve cost as one layer's (counts, not time)
            hp = p.method_hparams(method, layer, "sequential")
            for B in [B for B in sq.batch_sizes if runs_at(method, B)]:
                sizes = _chunks(sq.total, B)
                done = 0
                ends = list(itertools.accumulate(sizes))
                ranges = [range(e - n, e) for e, n in zip(ends, sizes)]
                pend_facts = 0  # edited, not yet evaluated (sequential.eval_group facts)
                for bi, n in enumerate(sizes):
                    _value_chunks(exp, n, hp.values.z_batch_size, layer)
                    if bi > 0 and uses_prior_keys(hp):
                        exp.add("pres_factor", 1, 1, layer)
                    exp.add("solve", 1, n, layer)
                    pend_facts += n
                    if closes_group(sq, ranges, bi, pend_facts, bool(every), lm_spec):  # one evaluation call
                        exp.add("eval", 1, pend_facts, layer)
                        pend_facts = 0
                    exp.add("ckpt", 1, n)
                    if every and degradation_due(every, done, done + n, bi + 1 == len(sizes)):
                        exp.add("degradation", 1, sq.heldout_facts, layer)
                    done += n
                    if measurements_after(sq, ranges, bi, False)[0]:  # forgetting: all facts so far
                        exp.add("eval", 1, done, layer)
                if sq.eval_final:
                    exp.add("eval", 1, sq.total, layer)
    return exp


def count_grid(p, *, layer: int = 1, experiments: Iterable[str] | None = None,
               second_model: bool = True) -> list[ExperimentCount]:
    """Every experiment ``python -m editlib reproduce`` runs for params ``p`` (notebooks 01-05;
    the second model's layer search when ``p.second_model`` is set). ``layer``: the edited layer
    where a section says ``best`` (the paper finds layer 1 on Llama-3-8B)."""
    want = list(experiments or ("layer_search", "singular", "sweep", "batch", "sequential"))

    def lay(sec) -> int:
        v = getattr(p, sec).layer
        return layer if v == "best" else int(v)

    out = []
    if "layer_search" in want:
        out.append(count_layer_search(p))
        if second_model and p.second_model is not None:
            out.append(count_layer_search(p, "second_model"))
    fns = {"singular": count_singular, "sweep": count_sweep, "batch": count_batch,
           "sequential": count_sequential}
    out += [fns[e](p, lay(e)) for e in want if e in fns]
    return out
