"""Seconds on a named GPU for the work of :mod:`editlib.workcount` (issue 11): a documented
roofline model, every constant a named field that ``bench/paper_cost.py`` prints.

Per work item: max(FLOPs / (peak · efficiency), bytes / (bandwidth · efficiency)), or the host's
kernel-launch and Python time when that is longer (eager PyTorch launches asynchronously), from
the model's shapes and the token counts of :class:`~editlib.workcount.TokenStats`. Solves run on
the host (CPU seconds measured on the Llama-3-8B-shaped slice, scaled) or on the device (float64
FLOPs), wherever ``Study.covs`` puts the C0 factor. A JSON of per-unit seconds measured on a real
GPU (``--unit-costs``, keys :data:`UNIT_KEYS`) replaces the model unit by unit where the work is
what it was timed on (:class:`Timed`), and is scaled by the model's ratio where it is not (another
model's shape, other GE batches: :meth:`CostModel.unit_ratio`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .decode import DECODE_WARMUPS
from .generation import rows_within
from .values import GRAPH_WARMUPS
from .stats import TC_CHUNK_TOKENS, gram_macs, pass_groups
from .workcount import (KNOWN_SHAPES, SOLVES, ExperimentCount, ModelShape, TokenStats, Work, count_grid,
                        measure_token_stats, shape_for)

__all__ = ["GPUS", "KINDS", "KNOWN_SHAPES", "UNIT_KEYS", "CostModel", "ExperimentCount", "GPU", "ModelShape",
           "TokenStats", "Work", "count_grid", "measure_token_stats", "shape_for", "with_unit_costs",
           "GRAPH_UNITS", "EVAL_BATCH_UNITS", "GE_UNITS", "Timed", "measured_with_graphs", "same_sizes", "scored_batch",
           "timed", "timed_shape"]


# --------------------------------------------------------------------------- GPUs and the model


@dataclass(frozen=True)
class GPU:
    """Dense peak rates (no sparsity) and memory of one accelerator (vendor data sheets)."""

    name: str
    fp32: float  # FLOP/s, CUDA cores (PyTorch's default float32 matmul precision "highest": no TF32)
    tf32: float  # FLOP/s, tensor cores (float32 matmuls with params model.tf32: true)
    bf16: float  # FLOP/s, tensor cores
    fp64: float  # FLOP/s, tensor cores (cuBLAS DGEMM)
    bw: float    # HBM bytes/s
    mem_gb: float


GPUS = {
    "h100": GPU("NVIDIA H100 SXM5 80GB", 67e12, 495e12, 989e12, 67e12, 3.35e12, 80),
    "h200": GPU("NVIDIA H200 SXM 141GB", 67e12, 495e12, 989e12, 67e12, 4.8e12, 141),
    "a100": GPU("NVIDIA A100 SXM4 80GB", 19.5e12, 156e12, 312e12, 19.5e12, 2.039e12, 80),
}

#: work kinds in report order, with a short label
KINDS = {"values": "values", "keys": "keys+resid", "solve": "solves", "eval": "eval ES/PS/NS",
         "ge": "GE", "degradation": "degradation", "c0_collect": "C0 collect", "c0_factor": "C0 factor", "c0_eigh": "C0 eigh",
         "pres_factor": "pres. factor", "ckpt": "ckpt", "load": "load"}


@dataclass(frozen=True)
class Timed:
    """What a measured unit (``--unit-costs``) was timed on: the model's ``shape`` and, for GE's
    units, the rows per decode batch, the generation length and the cases of the timed call
    (None: not recorded, taken as the priced work's). Priced elsewhere (another model, such as
    Figure 6's Llama-2-7B, other GE batches, a call of other size), a unit is scaled by the model's
    own ratio between the two (:meth:`CostModel.unit_ratio`)."""

    shape: ModelShape | None = None
    gen_rows: int | None = None
    gen_max_len: int | None = None
    cases: int | None = None


def same_sizes(a: ModelShape, b: ModelShape) -> bool:
    """Two shapes of the same sizes, whatever their names."""
    return all(getattr(a, f.name) == getattr(b, f.name) for f in fields(a) if f.name != "name")


@dataclass(frozen=True)
class CostModel:
    """Seconds per work item on ``gpu`` (every field is an assumption printed by paper_cost).

    Host-side units (a solve and the C0 factorisation when C0 is factored on the CPU; the Python
    of each evaluated case and of each GE text) are CPU seconds measured on this project's 2-core
    machine, on the Llama-3-8B-shaped slice (``bench/slice_phases.py``: sequential B = 1 solves and
    the "C0 load + factor" phases) and with the real Llama-3 tokenizer (``bench/host_units.py``),
    divided by ``host_speedup`` for the GPU machine's host.
    """

    gpu: GPU
    dtype: str = "float32"
    tf32: bool = False             # float32 matmuls on TF32 tensor cores (params model.tf32)
    solve_on: str = "device"       # host | device: where factor_cov's factor lives (Study.covs)
    mm_eff: float = 0.6            # fraction of peak reached by large matmuls (forwards, backward)
    small_mm_eff: float = 0.3      # ... by skinny matmuls (decoding, B = 1 value steps)
    bw_eff: float = 0.8            # fraction of HBM bandwidth reached by weight streaming
    f64_eff: float = 0.5           # float64 GEMM-rich work (C0 accumulation, Cholesky, big solves)
    trsv_eff: float = 0.05         # triangular solves with few right-hand sides (latency-bound)
    # host time per kernel and kernels per block: fitted to one H200's measurements on the
    # Llama-3-8B shape (docs/paper-scale.md, "Calibrated on an H200"): a one-fact value step of 30
    # blocks took 112 ms of host time for 4,498 kernels (torch.profiler: 17.5-35 ms on the GPU), a decode
    # step of 32 blocks 82 ms whether it carried 10 rows or 1,020
    kernel_s: float = 25e-6        # host time per CUDA kernel: launch + eager PyTorch / module Python / autograd
    kernels_fwd: int = 90          # kernels per decoder block forward (transformers: norms, RoPE, cache, SDPA, MLP)
    kernels_bwd: int = 60          # ... per block backward of the packed value step (fwd + bwd: 150 measured)
    step_py_s: float = 2e-3        # Python per value iteration / decode step (indexing, Adam, sampling)
    # captured CUDA graphs (modelled, not measured): the blocks' kernels of a step replay without
    # host time, each costing ``graph_node_s`` on the GPU; the rest of the step stays eager
    decode_graphs: bool = False    # GE's decode steps captured (params evaluation.gen_decode: graph or compiled)
    decode_fused: bool = False     # ... their blocks' kernels fused by torch.compile (gen_decode: compiled)
    # kernels per block of the compiled decode step: the eager count scaled by the CPU's ratio of
    # compiled to transformers kernels (bench/bench_decode.py --count-kernels on a 32-layer bfloat16
    # Llama: 20.2 against 40.7 per block; 90 × 20.2 / 40.7 = 44.7, rounded up). Both CPU counts
    # take a generated C++ function's outermost loop nests as its kernels; not yet measured on a GPU
    kernels_fused_fwd: int = 45
    value_graphs: bool = False     # value steps' blocks, forward and backward, captured (compile_blocks: reduce-overhead)
    # ... which torch.compile also fuses: kernels per block of the compiled forward + backward, the
    # eager count scaled by the CPU's ratio (bench/bench_compiled_values.py --count-kernels on the
    # bfloat16 miniature, every block a call of the one compiled block: 46.8 against 117.5 per
    # block; 150 × 46.8 / 117.5 = 59.7, rounded up)
    kernels_fused_value: int = 60
    # value steps recorded whole (forward, loss, backward) as CUDA graphs of their eager kernels
    # (hparams capture_steps), priced for one-fact chunks only: the first forward and the warm-up
    # run eagerly, the recording costs one step's host time, the other steps (the last forward
    # too) replay the step's kernels at graph_node_s each and then run Adam's Python (the loss is
    # read on the host every step, so the two add). A chunk's facts stop at different iterations,
    # each stop a new set of running facts to record anew (up to one per fact), so whether a
    # chunk gains depends on how long its sets live: chunks are priced eagerly (a set that lives
    # two steps costs more recorded than eager)
    step_graphs: bool = False
    # ... of those one-fact chunks, the share whose step has the sizes of an earlier fact's in its
    # run, whose kept graph it replays from its first step (no warm-up and no recording once the first
    # fact of those sizes recorded it: values._graph_for):
    # bench/value_shapes.py --kept, the first 4,096 CounterFact facts with the Llama-3 tokenizer:
    # 100 sets of sizes, so 3,996 of 4,096 facts (a B = 1 sequential run; 200 of the first 256)
    kept_reuse: float = 3996 / 4096
    # GPU time per kernel beyond the roofline's matmuls and weight traffic (small kernels run for
    # microseconds each, captured or not): fitted to the same H200 profile, (17.5 ms − the step's
    # 7.4 ms of modelled weight traffic) / 4,498 kernels. 17.5 ms is half the 35 ms its sum over all
    # events printed, which counts a kernel launched under a recorded operator twice
    # (bench_compiled_values.device_us counts it once): a lower bound of the GPU time, so this is
    # the optimistic end (35 ms: 6 µs; paper_cost.py --graph-node-us)
    graph_node_s: float = 2.2e-6
    # host time of each call of the compiled block in a captured value step (each block's forward
    # and its backward are one node of the step's CUDA-graph tree, a Python call with its guards):
    # a compiled block's forward on tiny tensors took 127 µs on this 2-core VM (eager 174 µs), its
    # forward and backward 388 µs; cudagraph trees' own bookkeeping is not measured
    graph_call_s: float = 1e-4
    value_iters: int = 25          # forward passes per value chunk (v_num_grad_steps; an upper bound)
    gen_batch: int = 64            # prompts decoded together (params evaluation.gen_batch_size; paper_cost sets it)
    gen_kv_gb: float | None = None  # ... fewer where their KV cache would exceed this (params evaluation.gen_kv_gb)
    share_below_gb: float = 0.0    # blocks below the edited layer replayed across evaluations (params evaluation.share_below_gb)
    key_batch: int = 256           # reprs batch size (sequences per forward)
    c0_tokens: float = 7.0e6       # C0 corpus tokens (n_samples × tokens per text; set by the CLI)
    c0_batch_tokens: float = 24576  # tokens per C0 forward (params covariance.max_batch_tokens)
    fast_gram: bool = False        # 16-bit models: C0's per-batch Gram in float32 (params covariance.fast_gram) ...
    gram16: bool = True            # ... its products on 16-bit tensor cores (editlib.stats.products_16bit: torch's CUDA
                                   # torch.mm with a float32 result), else the keys made float32 on TF32 ones
    host_speedup: float = 1.0      # GPU machine's CPU vs this 2-core VM for the host-side units
    host_solve_s: float = 0.95     # one N = 1 solve written into the weights at d_in = 14336 on this VM (slice)
    host_f64: float = 100e9        # float64 GEMM FLOP/s of this VM (torch addmm, 2 threads)
    host_factor_s: float = 53.0    # C0 read + checks + Cholesky + cond estimate per layer on this VM (slice)
    disk_bw: float = 2e9           # bytes/s: model and C0 cache reads, checkpoint writes
    pcie_bw: float = 12e9          # bytes/s: host <-> device copies (pageable memory)
    ckpt_fixed_s: float = 0.01     # per checkpoint file (open, metadata, fsync)
    load_fixed_s: float = 10.0     # per study open: CounterFact, tokenizer, context templates, fingerprint
    # host time per evaluated case outside the model's forwards (prompts, read plans, batches,
    # results) and per GE text after its tokens are sampled (its random stream, its text, its
    # n-gram entropy), on this VM: `python bench/host_units.py` 0.40-0.49 ms (256 sequences per
    # scoring forward) and 0.27-0.29 ms (CounterFact texts of 100 Llama-3 tokens), rounded up for
    # what it does not run (per-row edits' and replayed blocks' bookkeeping, a GE prompt's
    # encoding and its row of the sample); divided by host_speedup
    case_py_s: float = 6e-4
    gen_row_py_s: float = 3e-4
    call_s: float = 5e-3           # small calls and syncs around a device solve
    flops_only: bool = False       # a pass costs its FLOPs alone (no memory traffic): see floor()
    unit_s: dict = field(default_factory=dict)  # measured overrides (see UNIT_KEYS)
    unit_timed: dict = field(default_factory=dict)  # unit key -> Timed: what it was measured on

    # ----------------------------------------------------------------- helpers
    @property
    def bpp(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}.get(self.dtype, 4)

    @property
    def peak(self) -> float:
        if self.bpp == 4:
            return self.gpu.tf32 if self.tf32 else self.gpu.fp32
        return self.gpu.bf16

    def _pass(self, flops: float, nbytes: float, kernels: int, eff: float | None = None,
              py_s: float = 0.0, captured: int = 0) -> float:
        """One GPU pass: compute- or memory-bound, whichever is slower, unless the host cannot
        launch its kernels (and run its Python) faster than the GPU runs them (eager PyTorch
        launches asynchronously, so the two overlap). ``captured`` kernels replay from a CUDA
        graph: no host time, ``graph_node_s`` each on the GPU."""
        gpu = flops / (self.peak * (eff or self.mm_eff))
        if not self.flops_only:
            gpu = max(gpu, nbytes / (self.gpu.bw * self.bw_eff)) + captured * self.graph_node_s
        return max(gpu, kernels * self.kernel_s + py_s)

    def _launch(self, blocks: int, captured: bool) -> dict:
        """``_pass``'s kernel arguments for a step whose ``blocks`` kernels are ``captured`` in a
        CUDA graph or not; the step's own eager kernels (sampling, or the loss and Adam) are 10,
        plus the replay when captured."""
        return {"kernels": 11, "captured": blocks} if captured else {"kernels": blocks + 10}

    def _recording(self, kernels: int) -> float:
        """Recording a step of ``kernels`` kernels as a CUDA graph: their launches' and the step's
        Python host time; nothing runs on the GPU."""
        return kernels * self.kernel_s + self.step_py_s

    def _decode_kernels(self, s: ModelShape) -> int:
        """The blocks' kernels of one GE decode step (fused under gen_decode: compiled)."""
        return s.n_layers * (self.kernels_fused_fwd if self.decode_fused else self.kernels_fwd)

    def decode_step(self, s: ModelShape, rows: int, kv_bytes: float = 0.0) -> float:
        """One GE decode step of ``rows`` rows reading ``kv_bytes`` of KV cache."""
        return self._pass(2 * (s.n_layers * s.block_params + s.head_params) * rows,
                          (s.n_layers * s.block_params + s.head_params) * self.bpp + kv_bytes,
                          eff=self.mm_eff if rows >= 64 else self.small_mm_eff, py_s=self.step_py_s,
                          **self._launch(self._decode_kernels(s), self.decode_graphs))

    def floor(self) -> "CostModel":
        """The arithmetic floor of the same work: every matmul at 100 % of the peak of its dtype
        (float64 work at the float64 peak), no memory traffic, no kernel launch, Python, host or
        disk time. The floor of this implementation's work (its C0 schedule and block-triangle
        accumulation, value steps at their maximum), not of every possible one; its GE part (every
        decoded token through the model) binds any implementation."""
        inf = math.inf
        return replace(self, mm_eff=1.0, small_mm_eff=1.0, bw_eff=1.0, f64_eff=1.0, trsv_eff=inf,
                       kernel_s=0.0, step_py_s=0.0, graph_call_s=0.0, case_py_s=0.0, ckpt_fixed_s=0.0, gen_row_py_s=0.0, call_s=0.0,
                       load_fixed_s=0.0, disk_bw=inf, pcie_bw=inf, flops_only=True, solve_on="device",
                       unit_s={}, unit_timed={})

    # ----------------------------------------------------------------- units
    def unit_ratio(self, key: str, s: ModelShape, price, max_len: int | None = None,
                   cases: int | None = None) -> float:
        """The factor measured unit ``key`` takes where it prices shape ``s`` (GE: a call of
        ``cases`` cases generating ``max_len`` tokens): 1 where it was timed so (:class:`Timed`: the
        same sizes, and for GE the same rows per decode batch, length and cases), else the model's
        own ratio between the two, ``price(m, s, max_len, cases) / price(m_timed, timed shape,
        timed length, timed cases)``, both priced without measured units, ``m_timed`` at the timed
        rows per decode batch. So a unit timed on Llama-3-8B's shape prices Llama-2-7B's C0 at its
        smaller d_in and its GE at the 610 rows a batch its KV cache allows, and a GE unit timed on
        one full decode batch prices a call of 64 cases, a part of one batch, as about a batch."""
        t = self.unit_timed.get(key)
        if t is None:
            return 1.0
        shape = s if t.shape is None else t.shape
        length = max_len if t.gen_max_len is None else t.gen_max_len
        n = cases if t.cases is None else t.cases
        bare = replace(self, unit_s={}, unit_timed={})
        at = bare if t.gen_rows is None else replace(bare, gen_batch=t.gen_rows, gen_kv_gb=None)
        if same_sizes(shape, s) and (max_len is None or (
                length == max_len and n == cases and at.gen_rows(s, max_len) == bare.gen_rows(s, max_len))):
            return 1.0
        return price(bare, s, max_len, cases) / price(at, shape, length, n)

    def timed_cases(self, key: str, cases: int) -> int:
        """The cases a measured per-case unit was timed on (:class:`Timed`), else ``cases``."""
        t = self.unit_timed.get(key)
        return cases if t is None or t.cases is None else t.cases

    def values(self, s: ModelShape, ts: TokenStats, facts: int, layer: int) -> float:
        """One chunk of ``facts`` optimised together at ``layer``: a full forward of all its
        sequences (prefix cache), then ``value_iters`` forward+backward passes of the blocks
        above ``layer`` on the packed tokens, the LM head at the label positions."""
        # measured at layer 1; one fact alone (a B = 1 sequential edit) has its own unit: its steps
        # are launch-bound, a chunk's are not, so neither extrapolates to the other (a units file
        # with a chunk's unit alone, as the slice's, leaves one fact alone to the model)
        key = "values_s_per_fact_single" if facts == 1 else "values_s_per_fact"
        if key in self.unit_s:  # timed at layer 1, scaled by the blocks above ``layer``
            k_ref = s.n_layers - 2
            ratio = self.unit_ratio(key, s, lambda m, sh, *_: m.values(sh, ts, facts, 1))
            return self.unit_s[key] * facts * max(s.n_layers - layer - 1, 1) / max(k_ref, 1) * ratio
        k = s.n_layers - layer - 1
        setup = self._pass(2 * s.n_layers * s.block_params * facts * ts.value_tokens,
                           s.n_layers * s.block_params * self.bpp, s.n_layers * self.kernels_fwd)
        toks, labs = facts * ts.value_packed, facts * ts.value_labels
        flops = 4 * k * s.block_params * toks + 4 * s.d * s.vocab * labs
        nbytes = 2 * (k * s.block_params + s.head_params) * self.bpp
        eff = self.mm_eff if toks >= 256 else self.small_mm_eff
        calls = 2 * k * self.graph_call_s if self.value_graphs else 0.0  # a call per block, forward and backward
        it = self._pass(flops, nbytes, eff=eff, py_s=self.step_py_s + calls,
                        **self._launch(k * (self.kernels_fused_value if self.value_graphs
                                            else self.kernels_fwd + self.kernels_bwd), self.value_graphs))
        # the first forward and the warm-ups run eagerly, and the last forward too when the graph is
        # not recorded by then (values._optimise_chunk), so a run this short gains nothing
        eager = 1 + GRAPH_WARMUPS
        if not self.step_graphs or facts > 1 or self.value_iters <= eager + 1:
            return setup + self.value_iters * it
        step_kernels = k * (self.kernels_fwd + self.kernels_bwd) + 10  # the blocks and the loss
        record = self._recording(step_kernels)
        replay = self._pass(flops, nbytes, kernels=0, eff=eff, captured=step_kernels) + 11 * self.kernel_s + self.step_py_s
        own = setup + eager * it + record + (self.value_iters - eager) * replay  # the recording's call replays too
        kept = setup + it + (self.value_iters - 1) * replay  # an earlier fact's graph: only the first forward eager
        return (1 - self.kept_reuse) * own + self.kept_reuse * kept

    def keys(self, s: ModelShape, ts: TokenStats, facts: int, layer: int) -> float:
        """compute_keys + current_values: forwards stopped after block ``layer``."""
        depth = layer + 1
        n_fwd = math.ceil(facts * (ts.value_seqs - 1) / self.key_batch) + math.ceil(facts / self.key_batch)
        flops = 2 * depth * s.block_params * facts * ts.key_tokens
        return n_fwd * self._pass(flops / n_fwd, depth * s.block_params * self.bpp, depth * self.kernels_fwd)

    def _solve_flops(self, s: ModelShape, n: int, kind: str = "solve") -> float:
        """C0⁻¹K (two triangular solves with N right-hand sides); for a joint solve also
        D = KᵀC0⁻¹K, its eigenvalues and Cholesky and X = (D + μI)⁻¹(C0⁻¹K)ᵀ; for a written edit
        the block-wise R X added to the master."""
        f = 2 * s.d_in ** 2 * n
        if kind != "solve_r1":
            f += 2 * s.d_in * n * n + 10 * n ** 3 + 2 * n * n * s.d_in
        if kind == "solve":
            f += 2 * s.d * n * s.d_in
        return f

    def solve(self, s: ModelShape, n: int, kind: str = "solve") -> float:
        """One solve call of N = ``n`` edits (kinds: editlib.workcount.SOLVES). A written edit
        also pays the EditSession: clones of the weight, the block-wise apply, the restore."""
        over = self.unit_s.get("solve_s_by_n", {}) if kind == "solve" else {}
        if str(n) in over or n in over:
            ratio = self.unit_ratio("solve_s_by_n", s, lambda m, sh, *_: m.solve(sh, n, kind))
            return float(over.get(str(n), over.get(n))) * ratio
        weight = s.d * s.d_in
        if self.solve_on == "host":
            extra = max(self._solve_flops(s, n, kind) - self._solve_flops(s, 1, kind), 0.0)
            t = (self.host_solve_s + extra / self.host_f64) / self.host_speedup
            return t + (s.d + s.d_in) * n * 8 / self.pcie_bw  # the factors R, X to the device
        trsv = 2 * 8 * s.d_in ** 2 / (self.gpu.bw * self.trsv_eff) if n < 64 else 0.0
        t = trsv + self._solve_flops(s, n, kind) / (self.gpu.fp64 * self.f64_eff) + self.call_s
        if kind == "solve" and not self.flops_only:
            t += weight * (2 * 2 * self.bpp + 2 * 4 + 2 * self.bpp + 2 * self.bpp) / (self.gpu.bw * self.bw_eff)
        return t

    def eval(self, s: ModelShape, ts: TokenStats, cases: int, eval_batch: int, below: float = 0.0) -> float:
        """Probability scoring of ``cases`` cases in one evaluate call (batches of sequences sorted
        by length, each forward padded to its longest: :meth:`TokenStats.eval_padding`); ``below``
        blocks replayed rather than run (editlib.below; a measured unit cost is scaled by the share
        of blocks that run)."""
        run = s.n_layers - below
        key = "eval_s_per_case" if cases > 1 else "eval_s_per_case_single"
        if key in self.unit_s:
            ratio = self.unit_ratio(key, s, lambda m, sh, *_: m.eval(sh, ts, cases, eval_batch))
            return self.unit_s[key] * cases * run / s.n_layers * ratio
        seqs = cases * ts.eval_seqs
        n_fwd = max(1, math.ceil(seqs / eval_batch))
        tokens = cases * ts.eval_tokens * ts.eval_padding(cases, eval_batch)  # padded, as the forwards run them
        flops = 2 * run * s.block_params * tokens + 2 * s.d * s.vocab * cases * ts.eval_reads
        nbytes = (run * s.block_params + s.head_params) * self.bpp
        return (n_fwd * self._pass(flops / n_fwd, nbytes, math.ceil(run) * self.kernels_fwd + 10)
                + self.case_py_s * cases / self.host_speedup)

    def replayed(self, s: ModelShape, ts: TokenStats, layer: int, held: int) -> float:
        """Blocks an evaluation replays (:class:`editlib.below.SharedBelow`): the ``layer`` blocks
        below the edited one, for the share of the ``held`` cases' block outputs that fit in
        ``share_below_gb`` (the rest run)."""
        if not held or self.share_below_gb <= 0 or layer <= 0:
            return 0.0
        need = held * ts.eval_tokens * s.d * self.bpp
        return layer * min(1.0, self.share_below_gb * 1e9 / need)

    def degradation(self, s: ModelShape, ts: TokenStats, cases: int, eval_batch: int) -> float:
        """One degradation measurement of ``cases`` held-out facts (editlib.degradation.measure):
        the rewrite prompt of each scored, one of the ``eval_prompts`` an evaluation scores per
        case (so an evaluation of ``cases / eval_prompts`` cases, measured unit costs included),
        and the perplexity of its sentence, counted as one more such evaluation; never generation,
        whatever the experiment's GE setting."""
        return 2 * self.eval(s, ts, cases / ts.eval_prompts, eval_batch)

    def gen_rows(self, s: ModelShape, max_len: int) -> int:
        """Prompts per generation batch: ``gen_batch``, or as many as ``gen_kv_gb`` of KV cache hold
        at ``max_len`` tokens a row (editlib.generation.rows_per_batch)."""
        return rows_within(self.gen_batch, s.kv_bytes_per_token(self.bpp), max_len,
                           None if self.gen_kv_gb is None else self.gen_kv_gb * 1e9, f"{s.name} ")

    def ge(self, s: ModelShape, ts: TokenStats, cases: int, max_len: int) -> tuple[float, int]:
        """GE of ``cases`` cases in one evaluate call: (seconds, decoded token rows). Prompts are
        sorted by length and sampled :meth:`gen_rows` at a time; every step decodes one token for
        all rows of a batch, from its shortest prompt's length up to ``max_len`` (generate_fast)."""
        rows, per = int(round(cases * ts.gen_prompts)), self.gen_rows(s, max_len)
        if cases == 1:
            batches = [(min(per, rows - i), int(round(ts.gen_case_min_len))) for i in range(0, rows, per)]
        else:
            lens = ts.gen_lengths(rows)
            batches = [(len(lens[i:i + per]), lens[i]) for i in range(0, rows, per)]
        key = "ge_s_per_case" if cases > 1 else "ge_s_per_case_single"
        decoded = sum(r * max(max_len - m, 0) for r, m in batches)
        if key in self.unit_s:  # a unit per case of the call it was timed on, scaled to this call
            ratio = self.unit_ratio(key, s, lambda m, sh, n, c: m.ge(sh, ts, c, n)[0], max_len, cases)
            return self.unit_s[key] * self.timed_cases(key, cases) * ratio, decoded
        t = 0.0
        wbytes = (s.n_layers * s.block_params + s.head_params) * self.bpp
        for r, m in batches:
            steps = max(max_len - m, 0)
            t += self._pass(2 * (s.n_layers * s.block_params + s.head_params) * r * m, wbytes,
                            s.n_layers * self.kernels_fwd)  # prefill
            kv = s.kv_bytes_per_token(self.bpp) * r * (m + max_len) / 2
            t += steps * self.decode_step(s, r, kv)
            if self.decode_graphs and steps:  # the batch's capture: its eager warm-ups and the recording
                t += (DECODE_WARMUPS * replace(self, decode_graphs=False).decode_step(s, r, kv)
                      + self._recording(self._decode_kernels(s) + 10))
        return t + self.gen_row_py_s * rows / self.host_speedup, decoded  # + each text's n-gram entropy (Python)

    def c0_per_pass(self, s: ModelShape) -> int:
        """C0 accumulators (float64 d_in², on the device) per pass over the corpus: at most half
        the memory left beside the model (editlib.stats.layers_per_pass)."""
        free = self.gpu.mem_gb * 1e9 - s.params * self.bpp
        return max(1, int(0.5 * free // (8 * s.d_in ** 2)))

    @property
    def gram32(self) -> bool:
        """C0's per-batch Gram in float32 on tensor cores (editlib.stats.fast_gram_applies)."""
        return self.fast_gram and self.bpp == 2

    def c0_collect(self, s: ModelShape, layers: int, deepest: int) -> float:
        """Forward of the corpus up to the deepest layer of each pass (layers deepest-layers+1 …
        deepest in groups of :meth:`c0_per_pass`, the remainder first: editlib.stats.pass_groups) + a rank-T update of each layer's Σkkᵀ (its block
        upper triangle: editlib.stats.add_gram): float64 GEMMs, or with :attr:`gram32` 16-bit
        (:attr:`gram16`) or TF32 GEMMs with float32 results
        whose float32 blocks are added into the float64 sum once per batch (memory-bound), each
        batch in products of ``TC_CHUNK_TOKENS`` tokens summed in float32 (a read and a write of
        the float32 block per further chunk)."""
        if "c0_s_per_token_layer" in self.unit_s:  # + each layer's tail: its sum to the host and the disk
            ratio = self.unit_ratio("c0_s_per_token_layer", s, lambda m, sh, *_: m.c0_collect(sh, layers, deepest))
            return (self.unit_s["c0_s_per_token_layer"] * self.c0_tokens
                    + self.unit_s.get("c0_layer_fixed_s", 0.0)) * layers * ratio
        per = self.c0_per_pass(s)
        first = deepest - layers + 1
        depths = [g[-1] + 1 for g in pass_groups(range(first, deepest + 1), per)]
        fwd = sum(2 * d * s.block_params * self.c0_tokens / (self.peak * self.mm_eff) for d in depths)
        macs = gram_macs(s.d_in) * self.c0_tokens * layers
        if not self.gram32:
            return fwd + 2 * macs / (self.gpu.fp64 * self.f64_eff)
        gemm = 2 * macs / ((self.gpu.bf16 if self.gram16 else self.gpu.tf32) * self.mm_eff)
        # per batch: read the float32 block, read + write the float64 sum; per further token
        # chunk, read + write the float32 block in a TF32 GEMM's epilogue, or (16-bit products,
        # added after) write and read the chunk's product and read + write the block
        per_chunk = 16 if self.gram16 else 8
        per_batch = 20 + per_chunk * (math.ceil(self.c0_batch_tokens / TC_CHUNK_TOKENS) - 1)
        adds = 0.0 if self.flops_only else (
            per_batch * gram_macs(s.d_in) * layers * math.ceil(self.c0_tokens / self.c0_batch_tokens)
            / (self.gpu.bw * self.bw_eff))
        return fwd + gemm + adds

    def c0_factor(self, s: ModelShape) -> float:
        """Per layer and study open: read the cached sum, factor C0 (+ the condition number)."""
        if "c0_factor_s" in self.unit_s:
            return self.unit_s["c0_factor_s"] * self.unit_ratio("c0_factor_s", s, lambda m, sh, *_: m.c0_factor(sh))
        read = 8 * s.d_in ** 2 / self.disk_bw
        if self.solve_on == "host":
            return read + self.host_factor_s * (s.d_in / 14336) ** 3 / self.host_speedup
        chol = s.d_in ** 3 / 3 / (self.gpu.fp64 * self.f64_eff)
        cond = 50 * 3 * 8 * s.d_in ** 2 / (self.gpu.bw * self.trsv_eff)  # power + inverse iterations (memory-bound)
        return read + 8 * s.d_in ** 2 / self.pcie_bw + chol + cond

    def c0_eigh(self, s: ModelShape) -> float:
        """AlphaEdit's eigendecomposition of C0 (with vectors) per factored layer: ≈ 4 d_in³ flops
        (tridiagonal reduction, divide and conquer, back-transformation; an assumption) plus
        rebuilding C0 from its factor (d_in³)."""
        flops = 5 * s.d_in ** 3
        if self.solve_on == "host":
            return flops / self.host_f64 / self.host_speedup
        return flops / (self.gpu.fp64 * self.f64_eff)

    def pres_factor(self, s: ModelShape) -> float:
        """A Cholesky of a d_in × d_in preservation matrix (ENCORE's λ_p C0 + λ_n I + K_pK_pᵀ; an
        upper bound for AlphaEdit's r × r one)."""
        flops = s.d_in ** 3 / 3
        if self.solve_on == "host":
            return flops / self.host_f64 / self.host_speedup
        return flops / (self.gpu.fp64 * self.f64_eff)

    def ckpt(self, s: ModelShape, n: int) -> float:
        """A sequential batch's checkpoint: its low-rank factors R [d, N] and X [N, d_in] in
        float64, one small safetensors file per batch (protocols._save_ckpt)."""
        if "ckpt_s" in self.unit_s:
            return self.unit_s["ckpt_s"] * self.unit_ratio("ckpt_s", s, lambda m, sh, *_: m.ckpt(sh, n))
        return (s.d + s.d_in) * n * 8 / self.disk_bw + self.ckpt_fixed_s

    def load(self, s: ModelShape) -> float:
        if "load_s" in self.unit_s:
            return self.unit_s["load_s"] * self.unit_ratio("load_s", s, lambda m, sh, *_: m.load(sh))
        return s.params * self.bpp / self.disk_bw + self.load_fixed_s

    # ----------------------------------------------------------------- experiments
    def seconds(self, exp: ExperimentCount, ts: TokenStats) -> dict[str, float]:
        """Seconds per work kind (KINDS) of one experiment, plus decoded GE token rows."""
        s = exp.shape
        out = dict.fromkeys(KINDS, 0.0)
        out["ge_tokens"] = 0
        for w in exp.items:
            if w.kind == "values":
                out["values"] += w.count * self.values(s, ts, w.size, w.layer)
            elif w.kind == "keys":
                out["keys"] += w.count * self.keys(s, ts, w.size, w.layer)
            elif w.kind in SOLVES:
                out["solve"] += w.count * self.solve(s, w.size, w.kind)
            elif w.kind == "eval":
                # a second alignment's sequences are held beside the first's, in the same budget
                out["eval"] += w.count * exp.scorings * self.eval(
                    s, ts, w.size, exp.eval_batch, self.replayed(s, ts, w.layer, w.held * exp.scorings))
                if exp.generation:
                    t, tok = self.ge(s, ts, w.size, exp.gen_max_len)
                    out["ge"] += w.count * t
                    out["ge_tokens"] += w.count * tok
            elif w.kind == "degradation":
                out["degradation"] += w.count * self.degradation(s, ts, w.size, exp.eval_batch)
            elif w.kind == "c0_collect":
                out["c0_collect"] += w.count * self.c0_collect(s, w.size, w.layer)
            elif w.kind == "c0_factor":
                out["c0_factor"] += w.count * self.c0_factor(s)
            elif w.kind == "c0_eigh":
                out["c0_eigh"] += w.count * self.c0_eigh(s)
            elif w.kind == "pres_factor":
                out["pres_factor"] += w.count * self.pres_factor(s)
            elif w.kind == "ckpt":
                out["ckpt"] += w.count * self.ckpt(s, w.size)
            elif w.kind == "load":
                out["load"] += w.count * self.load(s)
        return out

    def derived(self, s: ModelShape, ts: TokenStats, max_len: int) -> list[str]:
        """Per-unit times the assumptions imply, to compare with a measurement."""
        dec = self.decode_step(s, 10)
        return [f"{s.name}: decode step of 10 rows {1e3 * dec:.1f} ms; GE of one case "
                f"{self.ge(s, ts, 1, max_len)[0]:.2f} s; scoring one case alone {self.eval(s, ts, 1, 64):.3f} s; "
                f"values of one fact at layer 1: {self.values(s, ts, 1, 1):.2f} s alone, "
                f"{self.values(s, ts, 32, 1) / 32:.3f} s in a chunk of 32; one N = 1 solve + apply "
                f"{self.solve(s, 1):.3f} s, N = 4096 {self.solve(s, 4096):.1f} s ({self.solve_on})"]

    def assumptions(self) -> list[str]:
        skip = {"gpu", "unit_s", "unit_timed", "flops_only"}
        return [f"{f.name} = {getattr(self, f.name)!r}" for f in fields(self) if f.name not in skip]


#: keys of a ``--unit-costs`` JSON (seconds, measured on the GPU; each replaces the model's unit)
UNIT_KEYS = ("values_s_per_fact", "values_s_per_fact_single", "solve_s_by_n", "eval_s_per_case", "eval_s_per_case_single",
             "ge_s_per_case", "ge_s_per_case_single", "c0_s_per_token_layer", "c0_layer_fixed_s", "c0_factor_s",
             "ckpt_s", "load_s")


#: the units a captured CUDA graph changes, by the CostModel flag that captures them
GRAPH_UNITS = {"decode_graphs": ("ge_s_per_case", "ge_s_per_case_single"),
               "decode_fused": ("ge_s_per_case", "ge_s_per_case_single"),
               "value_graphs": ("values_s_per_fact", "values_s_per_fact_single"),
               "step_graphs": ("values_s_per_fact", "values_s_per_fact_single")}


def measured_with_graphs(doc: dict) -> dict[str, bool]:
    """Which of :data:`GRAPH_UNITS`' parts a units file measured with CUDA graphs: its ``graphs``
    record (bench/calibrate_units.py writes the resolved settings), else, for files written before
    it, the params overrides it records (``sets``, ``grid_sets``); nothing recorded: eager."""
    if isinstance(doc.get("graphs"), dict):
        return {k: bool(doc["graphs"].get(k, False)) for k in GRAPH_UNITS}
    sets = [*doc.get("sets", []), *doc.get("grid_sets", [])]
    return {"decode_graphs": any(f"evaluation.gen_decode={m}" in sets for m in ("graph", "compiled")),
            "decode_fused": "evaluation.gen_decode=compiled" in sets,
            "value_graphs": any(x.endswith("compile_blocks=reduce-overhead") for x in sets),
            "step_graphs": any(x.endswith("capture_steps=true") for x in sets)}


def timed_as(flags: dict[str, bool], unit: str) -> str:
    """How a units file with :func:`measured_with_graphs` ``flags`` timed ``unit``, in words."""
    if unit in GRAPH_UNITS["value_graphs"]:
        return ("compiled, with CUDA graphs" if flags["value_graphs"] else
                "with the eager steps recorded as CUDA graphs" if flags["step_graphs"] else "eagerly")
    if unit in GRAPH_UNITS["decode_graphs"] and flags["decode_graphs"]:
        return "compiled, with CUDA graphs" if flags["decode_fused"] else "with CUDA graphs"
    return "eagerly"


#: the unit whose time depends on ``evaluation.batch_size`` (sequences per scoring forward: an
#: eager forward's kernels cost host time whatever its size, so fewer, fuller forwards cost less).
#: One case alone (``eval_s_per_case_single``) is one forward at any batch that holds its
#: sequences (at most two per prompt), so it depends on the batch only below that.
EVAL_BATCH_UNITS = ("eval_s_per_case",)


def scored_batch(doc: dict) -> int | None:
    """The ``evaluation.batch_size`` a units file's scoring units were timed at: its ``evaluation``
    record (bench/calibrate_units.py, bench/slice_phases.py), else an ``evaluation.batch_size=``
    override among the params overrides it records (``sets``, ``grid_sets``); None: not recorded."""
    rec = (doc.get("evaluation") or {}).get("batch_size")
    if rec is not None:
        return int(rec)
    for x in [*doc.get("grid_sets", []), *doc.get("sets", [])]:
        if str(x).startswith("evaluation.batch_size="):
            return int(str(x).split("=", 1)[1])
    return None


def _scoring_left_out(doc: dict, eval_batch: int) -> list[tuple[str, str]]:
    """(unit, how it was timed) of the scoring units that do not price scoring at ``eval_batch``."""
    scored = scored_batch(doc)
    if scored is None:
        return [(k, "with its scoring batch not recorded") for k in (*EVAL_BATCH_UNITS, "eval_s_per_case_single")]
    if scored == int(eval_batch):
        return []
    how = f"with evaluation.batch_size {scored}"
    one_case = math.ceil(2 * TokenStats().eval_prompts)  # a case's sequences, at most
    out = [(k, how) for k in EVAL_BATCH_UNITS]
    if min(scored, one_case) != min(int(eval_batch), one_case):
        out.append(("eval_s_per_case_single", how))
    return out


#: GE's units: timed at a number of rows per decode batch and a generation length
GE_UNITS = ("ge_s_per_case", "ge_s_per_case_single")


def timed_shape(doc: dict, default: ModelShape | None = None) -> ModelShape | None:
    """The shape a units file was measured on: its ``shape`` record (the model's sizes:
    bench/calibrate_units.py, bench/slice_phases.py), else the one of :data:`KNOWN_SHAPES` whose
    layers, width and MLP width its ``model`` record gives, else ``default``."""
    rec = doc.get("shape")
    if isinstance(rec, dict):
        return ModelShape(**{f.name: (str if f.name == "name" else int)(rec[f.name]) for f in fields(ModelShape)})
    m = doc.get("model")
    if isinstance(m, dict) and {"n_layers", "d", "d_in"} <= set(m):
        known = [k for k in KNOWN_SHAPES.values() if (k.n_layers, k.d, k.d_in) == (m["n_layers"], m["d"], m["d_in"])]
        if len(known) == 1:
            return known[0]
    return default


def timed(doc: dict, key: str, default: ModelShape | None = None) -> Timed:
    """What a units file timed ``key`` on (:class:`Timed`); GE's units with the rows per decode
    batch, the length and the cases (one, for the single-case unit) of its ``raw.eval`` record
    (bench/calibrate_units.py, bench/slice_phases.py) where it has one."""
    ev = ((doc.get("raw") or {}).get("eval") or {}) if key in GE_UNITS else {}
    rows, length, cases = ev.get("rows_per_batch"), ev.get("gen_max_len"), ev.get("cases")
    if key == "ge_s_per_case_single" and ev:
        cases = 1
    return Timed(timed_shape(doc, default), *(None if v is None else int(v) for v in (rows, length, cases)))


def with_unit_costs(model: CostModel, *paths: str | Path,
                    skipped: list[tuple[str, str, str]] | None = None,
                    eval_batch: int | None = None, shape: ModelShape | None = None) -> CostModel:
    """A copy of ``model`` whose units are replaced by measured JSONs ({"units": {...}} or flat),
    a later file's unit over an earlier one's (the slice's phases, then a calibration). A unit
    timed otherwise than the model runs that part does not price it: eagerly, with CUDA graphs
    or compiled (:data:`GRAPH_UNITS`), or, with ``eval_batch`` (the params' scoring batch), a
    scoring unit timed at another batch or at one the file does not record
    (:func:`scored_batch`). It is left out, and ``skipped`` gets (file, unit, how the file timed
    it: :func:`timed_as`). Each unit keeps what it was timed on (:func:`timed`: a file that records
    no shape, on ``shape``, the priced model's), so that it prices another model or other GE
    batches scaled (:meth:`CostModel.unit_ratio`)."""
    unit_s, unit_timed = dict(model.unit_s), dict(model.unit_timed)
    for path in paths:
        d = json.loads(Path(path).read_text())
        units = dict(d.get("units", d))
        unknown = sorted(set(units) - set(UNIT_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown unit(s) {unknown}; known: {', '.join(UNIT_KEYS)}")
        flags = measured_with_graphs(d)
        left_out = [(key, timed_as(flags, key)) for flag, captured in flags.items()
                    if captured != getattr(model, flag) for key in GRAPH_UNITS[flag]]
        left_out += [] if eval_batch is None else _scoring_left_out(d, eval_batch)
        for key, how in left_out:
            if units.pop(key, None) is not None and skipped is not None:
                skipped.append((str(path), key, how))
        unit_s.update(units)
        unit_timed.update({key: timed(d, key, shape) for key in units})
    return replace(model, unit_s=unit_s, unit_timed=unit_timed)
