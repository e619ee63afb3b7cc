"""editlib.values: batched value optimisation (SPEC §2 compute_z, §9 "Batch the z-optimisation")."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from _fixtures import one_thread  # noqa: F401  (autouse: single-threaded module)
from _fixtures import CTX, FACTS, fact, tiny_llama, word_tokenizer
from editlib.arch import arch_for, block_output
from editlib.context import ContextTemplates
from editlib.nethook import Trace
from editlib.reprs import current_values
from editlib.tokens import filled_ids, in_context, pad_right, target_ids
from editlib.values import KL_PROMPT, ValueHParams, compute_values

LAYER = 1


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def lm32(tok):
    return tiny_llama(len(tok), lm_scale=10.0).requires_grad_(False)


@pytest.fixture(scope="module")
def lm64(tok):
    return tiny_llama(len(tok), lm_scale=10.0, dtype=torch.float64).requires_grad_(False)


def values(model, tok, **kw):
    return compute_values(model, tok, FACTS, LAYER, CTX, ValueHParams(**kw))


def reference_z(model, tok, record, layer, contexts, hp: ValueHParams):
    """The reference's per-request loop (MEMIT compute_z, SPEC §2) written plainly: full logits,
    torch.optim.Adam on one δ, early stop, last-iteration break, clamp after each step.
    Returns (z, h, steps, final_loss)."""
    tgt = target_ids(tok, record.target_new.str)
    seqs, lookups = [], []
    for c in contexts.flat:
        ids, idx = filled_ids(tok, in_context(c, record.prompt), record.subject)
        seqs.append(ids + tgt[:-1])
        lookups.append(idx)
    n_rw = len(seqs)
    ids, idx = filled_ids(tok, KL_PROMPT, record.subject)
    seqs.append(ids), lookups.append(idx)
    input_ids, mask = pad_right(seqs, tok.pad_token_id)
    labels = torch.full(input_ids.shape, -100)
    for i in range(n_rw):
        ex_len = int(mask[i].sum())
        labels[i, ex_len - len(tgt):ex_len] = torch.tensor(tgt)

    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    state = {"init": None}

    def edit(out):
        hs = block_output(out).clone()
        if state["init"] is None:
            state["init"] = hs[0, lookups[0]].detach().clone()
        for i, j in enumerate(lookups):
            hs[i, j] = hs[i, j] + delta
        return hs

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init, steps = None, 0
    for it in range(hp.v_num_grad_steps):
        opt.zero_grad()
        with Trace(model, arch_for(model).layer_name(layer), retain_output=False, edit_output=edit):
            logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        kl_logp = torch.log_softmax(logits[n_rw, lookups[n_rw]], -1)[None]
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        logp = torch.log_softmax(logits[:n_rw], -1)
        lab = labels[:n_rw]
        tok_lp = logp.gather(2, torch.where(lab != -100, lab, 0)[..., None])[..., 0]
        nll = (-(tok_lp * (lab != -100)).sum(1) / len(tgt)).mean()
        kl = torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        h = state["init"]
        loss = nll + hp.kl_factor * kl + hp.v_weight_decay * (delta.norm() / h.norm() ** 2)
        if loss < hp.early_stop_loss or it == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        steps += 1
        max_norm = hp.clamp_norm_factor * h.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    h = state["init"].float()
    return (h + delta.detach()).float(), h, steps, float(loss.detach())


# --------------------------------------------------------------------------- batching


def test_batched_equals_per_fact_float32(lm32, tok) -> None:
    """z_batch_size=1 (the reference's per-fact loop) vs 4: same z (atol 1e-4), same steps; the
    early stop freezes one fact early while the others keep going."""
    one = values(lm32, tok, z_batch_size=1, early_stop_loss=0.3)
    four = values(lm32, tok, z_batch_size=4, early_stop_loss=0.3)
    assert one.z.shape == four.z.shape == (32, 4) and one.z.dtype == torch.float32
    assert torch.equal(one.steps, four.steps)
    assert len(set(four.steps.tolist())) > 1, f"steps should differ across facts: {four.steps.tolist()}"
    assert four.steps.max() == 24  # v_num_grad_steps − 1
    torch.testing.assert_close(four.z, one.z, rtol=0, atol=1e-4)
    torch.testing.assert_close(four.h, one.h, rtol=0, atol=1e-6)
    torch.testing.assert_close(four.final_loss, one.final_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [2, 3, 4])
def test_batched_equals_per_fact_float64(tok, chunk: int) -> None:
    """In a float64 model (no f32 chaos amplification) the batched trajectories are the per-fact ones
    to ~1e-9, with several different stop iterations and chunks that do not divide N."""
    lm = tiny_llama(len(tok), lm_scale=30.0, dtype=torch.float64).requires_grad_(False)
    one = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(z_batch_size=1, early_stop_loss=1.0))
    many = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(z_batch_size=chunk, early_stop_loss=1.0))
    assert torch.equal(one.steps, many.steps)
    assert len(set(one.steps.tolist())) >= 3, one.steps.tolist()
    torch.testing.assert_close(many.z, one.z, rtol=0, atol=1e-9)
    torch.testing.assert_close(many.final_loss, one.final_loss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("chunk", [1, 4])
def test_prefix_cache_equals_full_forward(tok, chunk: int) -> None:
    """Reusing the KV of the tokens before the subject (they do not depend on δ) gives the same
    trajectories as recomputing every position (float64: ~1e-9)."""
    lm = tiny_llama(len(tok), lm_scale=30.0, dtype=torch.float64).requires_grad_(False)
    full = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(z_batch_size=chunk, early_stop_loss=1.0,
                                                                  prefix_cache=False, packed=False))
    cached = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(z_batch_size=chunk, early_stop_loss=1.0,
                                                                    prefix_cache=True, packed=False))
    assert torch.equal(full.steps, cached.steps)
    torch.testing.assert_close(cached.h, full.h, rtol=0, atol=1e-9)
    torch.testing.assert_close(cached.z, full.z, rtol=0, atol=1e-8)
    torch.testing.assert_close(cached.final_loss, full.final_loss, rtol=1e-8, atol=0)


def test_prefix_cache_without_a_prefix_equals_full_forward(monkeypatch) -> None:
    """A tokenizer that adds no BOS (GPT-2's), plain templates and a one-token subject at the start:
    no row of the chunk has a token before its subject, so the prefix cache holds no KV and the
    suffix is the whole sequence (its own mask and positions). The trajectories are the full
    forward's."""
    import editlib.values as V
    from editlib.context import PLAIN
    from _fixtures import tiny_gpt2
    from test_context import bosless_tokenizer

    tok = bosless_tokenizer()
    model = tiny_gpt2(len(tok), lm_scale=30.0).requires_grad_(False)  # float64
    recs = [FACTS[2]]  # "{} is capital of", subject "Paris" (one token), KL prompt "{} is a"
    assert tok("Paris is a")["input_ids"] == tok("Paris")["input_ids"] + tok("is a")["input_ids"]
    calls: list[tuple[bool, bool]] = []
    real = V._Forward.__call__

    def spy(self, *a, **k):
        calls.append((self.cached, self.cached and self.p_max == 0 and self.kv is None))
        return real(self, *a, **k)

    monkeypatch.setattr(V._Forward, "__call__", spy)
    kw = dict(early_stop_loss=1.0, packed=False, v_num_grad_steps=8)
    full = compute_values(model, tok, recs, 1, PLAIN, ValueHParams(prefix_cache=False, **kw))
    n_full = len(calls)
    cached = compute_values(model, tok, recs, 1, PLAIN, ValueHParams(prefix_cache=True, **kw))
    assert n_full > 1 and set(calls[:n_full]) == {(False, False)}
    assert len(calls) == 2 * n_full and set(calls[n_full:]) == {(True, True)}  # every step: no prefix
    assert torch.equal(full.steps, cached.steps) and int(full.steps[0]) > 1
    torch.testing.assert_close(cached.h, full.h, rtol=0, atol=1e-9)
    torch.testing.assert_close(cached.z, full.z, rtol=0, atol=1e-9)
    torch.testing.assert_close(cached.final_loss, full.final_loss, rtol=1e-9, atol=0)
    assert (full.z - full.h).norm() > 1e-3  # the optimisation moved


def _family(model_type: str, vocab: int, layers: int = 3, **kw) -> torch.nn.Module:
    """Random float64 model of a Llama-style family with grouped-query attention (4 heads, 2 KV)."""
    import transformers
    torch.manual_seed(1)
    cfg = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[model_type])(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, bos_token_id=1,
        eos_token_id=2, **kw)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)
    return m.double()


@pytest.mark.parametrize("model_type, kw", [
    ("llama", {}),
    ("llama", {"attention_bias": True, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    ("mistral", {}),
    ("qwen2", {}),
])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_packed_equals_transformers_forward(tok, model_type: str, kw: dict, layer: int) -> None:
    """Running only the blocks above the edited one on packed tokens (editlib.packed) gives the
    trajectories of the transformers forward: same steps, z to float64 round-off. Covers grouped-
    query attention, q/k/v biases (qwen2, attention_bias), scaled RoPE and the last layer (no block
    above it)."""
    from editlib.packed import unsupported
    lm = _family(model_type, len(tok), **kw)
    assert unsupported(lm, 64) is None
    hp = dict(z_batch_size=3, early_stop_loss=1.0)
    ref = compute_values(lm, tok, FACTS, layer, CTX, ValueHParams(packed=False, **hp))
    got = compute_values(lm, tok, FACTS, layer, CTX, ValueHParams(packed=True, **hp))
    assert torch.equal(ref.steps, got.steps)
    assert len(set(ref.steps.tolist())) >= 2 or layer == 2, ref.steps.tolist()
    torch.testing.assert_close(got.h, ref.h, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.z, ref.z, rtol=0, atol=1e-8)
    torch.testing.assert_close(got.final_loss, ref.final_loss, rtol=1e-8, atol=0)


def test_packed_refuses_what_it_cannot_run(tok) -> None:
    """GPT-2 blocks are not Llama-style and a sliding window shorter than the sequences changes
    the attention: both fall back to the transformers forward (same result as packed=False)."""
    from _fixtures import tiny_gpt2
    from editlib.packed import PackedSuffix, unsupported
    gpt = tiny_gpt2(len(tok)).requires_grad_(False)
    assert "not Llama-style" in unsupported(gpt, 16)
    mis = _family("mistral", len(tok), sliding_window=4)
    assert "sliding window" in unsupported(mis, 16)
    with pytest.raises(ValueError, match="sliding window"):
        PackedSuffix(mis, torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long),
                     torch.tensor([2]), torch.tensor([0]), torch.tensor([5]), 0)
    for m in (gpt, mis):
        a = compute_values(m, tok, FACTS, 1, CTX, ValueHParams(v_num_grad_steps=3))
        b = compute_values(m, tok, FACTS, 1, CTX, ValueHParams(v_num_grad_steps=3, packed=False))
        torch.testing.assert_close(a.z, b.z, rtol=0, atol=0)


def test_a_sliding_window_the_sequences_reach_is_not_read_through_the_prefix_cache(tok) -> None:
    """The prefix cache pads each row's prefix to the longest, so its key slots are not its
    positions, and a sliding window (which counts slots) covered the wrong tokens: z moved by
    O(1) for rows with short prefixes. Within reach of the window the full forward runs."""
    mis = _family("mistral", len(tok), sliding_window=6)
    hp = dict(v_num_grad_steps=3, z_batch_size=4, packed=False)
    full = compute_values(mis, tok, FACTS, 1, CTX, ValueHParams(prefix_cache=False, **hp))
    cached = compute_values(mis, tok, FACTS, 1, CTX, ValueHParams(prefix_cache=True, **hp))
    torch.testing.assert_close(cached.z, full.z, rtol=0, atol=0)
    torch.testing.assert_close(cached.h, full.h, rtol=0, atol=0)


def _bigger_buckets(n: int) -> int:
    """Three more of everything: every kind of padding at every call (token, row, slot, prefix
    position, sequence, read position), which the real buckets leave out wherever a size is one."""
    return n + 3


def _compiled_against_eager(lm, tok, mode: str) -> None:
    """compile_blocks ``mode`` against eager on one fact at a time (a B = 1 sequential edit's
    values): equal Adam steps, z to float32 rounding (δ and Adam are float32 whatever the model's
    dtype, and Adam amplifies another summation order's rounding); then a weight of a block above the layer is changed
    in place and both paths see it (a compiled graph or a captured CUDA graph never runs stale
    weights), and the weight goes back; then edits at layer 0 and back at ``LAYER`` (other blocks
    at each position of a step: CUDA graphs whose weights differ from those recorded)."""
    hp = dict(z_batch_size=1, v_num_grad_steps=8, early_stop_loss=1e-9)
    eager = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(**hp))
    comp = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(compile_blocks=mode, **hp))
    assert torch.equal(eager.steps, comp.steps)
    torch.testing.assert_close(comp.z, eager.z, rtol=1e-4, atol=1e-6)
    w = lm.model.layers[LAYER + 1].mlp.down_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(3.0)
        eager2 = compute_values(lm, tok, FACTS[:1], LAYER, CTX, ValueHParams(**hp))
        comp2 = compute_values(lm, tok, FACTS[:1], LAYER, CTX, ValueHParams(compile_blocks=mode, **hp))
        assert not torch.allclose(eager2.z, eager.z[:, :1])
        torch.testing.assert_close(comp2.z, eager2.z, rtol=1e-4, atol=1e-6)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    for layer in (0, LAYER):
        e = compute_values(lm, tok, FACTS[:2], layer, CTX, ValueHParams(**hp))
        c = compute_values(lm, tok, FACTS[:2], layer, CTX, ValueHParams(compile_blocks=mode, **hp))
        assert torch.equal(e.steps, c.steps)
        torch.testing.assert_close(c.z, e.z, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_blocks_follow_eager(tok, padded, monkeypatch) -> None:
    """hparams.common.compile_blocks: default (inductor on the CPU) gives eager's steps and z up to
    the rounding of another summation order, and follows in-place weight changes; so does the
    compiled block on the padded layout of reduce-overhead (every kind of padding, its padding
    tokens all written to one slot), against the unpadded eager blocks."""
    from editlib import packed
    if padded:
        monkeypatch.setattr(packed, "BUCKET_MODES", ("default",))
        monkeypatch.setattr(packed, "bucket", _bigger_buckets)
    _compiled_against_eager(_family("llama", len(tok)), tok, "default")


def test_one_compiled_block_serves_every_edited_layer(tok) -> None:
    """compile_blocks compiles one block, an argument, not the stack above the edited layer: the
    edits at the first six layers of a 7-layer model share two graphs (the inner blocks and the
    last, which runs only where a loss reads; at most two more for a chunk whose facts stopped at
    different steps). A graph per edited layer would pass torch's limit of 8 in a 32-layer layer
    search, past which torch runs the later layers' steps eagerly with nothing but a logged
    warning; past editlib's own limit a call fails instead."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from editlib import compiling, packed
    lm = _family("llama", len(tok), layers=7)
    hp = ValueHParams(z_batch_size=2, v_num_grad_steps=3, compile_blocks="default")
    torch._dynamo.reset()
    packed._COMPILED.clear()
    counters.clear()
    for layer in range(6):
        compute_values(lm, tok, FACTS[:2], layer, CTX, hp)
    assert 2 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()
    packed._COMPILED.clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(compiling, "RECOMPILE_LIMIT", 1)
            with pytest.raises(RuntimeError, match="compile_blocks: default has compiled a value step's block 1 times"):
                compute_values(lm, tok, FACTS[:2], 0, CTX, hp)
    finally:
        torch._dynamo.reset()
        packed._COMPILED.clear()


def test_bucket_sizes() -> None:
    """Bucket sizes: every size up to 8 is its own, larger ones round up by at most 25 % to one of
    four sizes per octave, and a bucket size is its own bucket."""
    from editlib.packed import bucket
    assert [bucket(n) for n in range(1, 9)] == list(range(1, 9))
    assert [bucket(n) for n in (9, 10, 11, 13, 15, 17, 33, 100, 225)] == [10, 10, 12, 14, 16, 20, 40, 112, 256]
    for n in range(1, 5000):
        b = bucket(n)
        assert n <= b <= max(n, 1.25 * n) and bucket(b) == b
    assert len({bucket(n) for n in range(65, 129)}) == 4


@pytest.mark.parametrize("model_type, sizes", [("llama", "bucket"), ("qwen2", "bucket"), ("llama", "bigger")])
def test_bucketed_sizes_give_the_same_values(tok, model_type, sizes, monkeypatch) -> None:
    """Under CUDA graphs (compile_blocks: reduce-overhead) the blocks see bucket sizes only: the
    padding tokens, rows, slots and prefix positions change no real token's arithmetic beyond the
    sizes of the products, so in float64 the Adam steps and z equal the unpadded layout's (to
    1e-12: here they are bitwise equal), through chunks whose facts stop at different steps; and
    every size the blocks see is a bucket size."""
    from editlib import packed
    lm = _family(model_type, len(tok), layers=4)
    hp = ValueHParams(z_batch_size=3, v_num_grad_steps=25, early_stop_loss=3.0)
    plain = compute_values(lm, tok, FACTS, 0, CTX, hp)
    seen = []
    real = packed.run_blocks

    def spy(blocks, x, cos, sin, kvs, kv_rows, mask, flat, need, R, W, **kw):
        seen.append((x.shape[0], kvs[0][0].shape[0], kvs[0][0].shape[2], len(kv_rows), R, W, len(need)))
        return real(blocks, x, cos, sin, kvs, kv_rows, mask, flat, need, R, W, **kw)

    monkeypatch.setattr(packed, "BUCKET_MODES", ("off",))
    monkeypatch.setattr(packed, "run_blocks", spy)
    if sizes == "bigger":
        monkeypatch.setattr(packed, "bucket", _bigger_buckets)
    padded = compute_values(lm, tok, FACTS, 0, CTX, hp)
    assert len(set(plain.steps.tolist())) > 1  # facts stopped at different steps: the rows shrank
    assert torch.equal(padded.steps, plain.steps)
    torch.testing.assert_close(padded.z, plain.z, rtol=1e-12, atol=1e-12)
    assert seen
    if sizes == "bucket":
        assert all(packed.bucket(n) == n for call in seen for n in call)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_blocks_follow_eager(tok) -> None:
    """compile_blocks: reduce-overhead (CUDA graphs) on a GPU copy of a small float32 Llama."""
    lm = tiny_llama(len(tok), lm_scale=10.0).requires_grad_(False).cuda()
    _compiled_against_eager(lm, tok, "reduce-overhead")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_blocks_under_model_deterministic(tok) -> None:
    """The same with ``model.deterministic`` on (torch's warn-only deterministic algorithms, as
    protocols.set_deterministic sets them): deterministic index kernels must not synchronise with
    the host while the blocks' CUDA graphs are recorded (editlib.decode switches determinism off
    around its own capture for that reason; the value steps' blocks are recorded by torch.compile)."""
    lm = tiny_llama(len(tok), lm_scale=10.0).requires_grad_(False).cuda()
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _compiled_against_eager(lm, tok, "reduce-overhead")
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_compile_blocks_fails_fast() -> None:
    """An unknown mode, compile without the packed forward, CUDA graphs on a CPU model and a model
    the packed forward cannot run all stop with a message naming the key; off is not in a method's
    digest (stored results keep theirs)."""
    from _fixtures import tiny_gpt2
    from editlib.editing import EditHParams
    from editlib.packed import blocks_fn, run_blocks
    with pytest.raises(ValueError, match="compile_blocks must be one of"):
        ValueHParams(compile_blocks="fast")
    with pytest.raises(ValueError, match="needs packed: true"):
        ValueHParams(compile_blocks="default", packed=False)
    with pytest.raises(ValueError, match="reduce-overhead captures CUDA graphs"):
        blocks_fn("reduce-overhead", torch.device("cpu"))
    assert blocks_fn("off", torch.device("cpu")) is run_blocks
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="compile_blocks 'default' compiles the packed forward"):
        compute_values(tiny_gpt2(len(tok)).requires_grad_(False), tok, FACTS, 1, CTX,
                       ValueHParams(compile_blocks="default", v_num_grad_steps=2))
    assert "compile_blocks" not in EditHParams(method="memit").to_dict()["values"]
    on = EditHParams.from_dict({"method": "memit", "compile_blocks": "default"})
    assert on.to_dict()["values"]["compile_blocks"] == "default"


@pytest.mark.parametrize("kw, atol", [
    (dict(v_num_grad_steps=10), 1e-6),
    (dict(), 1e-4),
    (dict(early_stop_loss=0.3, kl_factor=1.0, v_weight_decay=0.5), 1e-4),
])
def test_matches_reference_loop(lm64, tok, kw, atol: float) -> None:
    """Batched values == a plain re-implementation of the reference's per-request compute_z
    (torch.optim.Adam, full logits) for every fact: z, steps and final loss. δ and Adam are
    float32 in both; once δ sits on the clamp boundary (after ~10 steps here) Adam amplifies
    float32 rounding (≈ ×10 per 3 steps), hence the looser tolerance for 25 steps."""
    hp = ValueHParams(z_batch_size=4, **kw)
    res = compute_values(lm64, tok, FACTS, LAYER, CTX, hp)
    for f, r in enumerate(FACTS):
        z, h, steps, final = reference_z(lm64, tok, r, LAYER, CTX, hp)
        assert int(res.steps[f]) == steps, (f, res.steps.tolist(), steps)
        torch.testing.assert_close(res.h[:, f], h, rtol=0, atol=1e-6)
        torch.testing.assert_close(res.z[:, f], z, rtol=0, atol=atol)
        # the final loss is computed from that δ: the same float32 amplification (measured 1.6e-5
        # relative on an AMD EPYC for the 25-step case), so its tolerance follows z's regime
        assert float(res.final_loss[f]) == pytest.approx(final, rel=max(1e-5, atol))


# --------------------------------------------------------------------------- stopping rules


def test_early_stop_at_iteration_zero(lm32, tok) -> None:
    res = values(lm32, tok, early_stop_loss=1e9)
    assert res.steps.tolist() == [0, 0, 0, 0]
    assert torch.equal(res.z, res.h)
    init = values(lm32, tok, v_num_grad_steps=1)
    torch.testing.assert_close(res.final_loss, init.final_loss)


def test_single_step_takes_no_adam_step(lm32, tok) -> None:
    """v_num_grad_steps=1: the last-iteration rule breaks before the first update."""
    res = values(lm32, tok, v_num_grad_steps=1, early_stop_loss=0.0)
    assert res.steps.tolist() == [0, 0, 0, 0]
    assert torch.equal(res.z, res.h)
    # final_loss is then the initial loss: the plain NLL (δ = 0: KL = 0, weight decay = 0)
    for f, r in enumerate(FACTS):
        _, _, steps, loss0 = reference_z(lm32, tok, r, LAYER, CTX, ValueHParams(v_num_grad_steps=1))
        assert steps == 0 and float(res.final_loss[f]) == pytest.approx(loss0, rel=1e-5)


def test_h_is_the_plain_prompt_block_output(lm32, tok) -> None:
    res = values(lm32, tok, v_num_grad_steps=2)
    _, h = current_values(lm32, tok, FACTS, LAYER)
    torch.testing.assert_close(res.h, h, rtol=0, atol=1e-6)


def test_loss_decreases(lm32, tok) -> None:
    init = values(lm32, tok, v_num_grad_steps=1)
    final = values(lm32, tok, v_lr=0.5, v_num_grad_steps=25, early_stop_loss=0.0)
    assert final.steps.tolist() == [24] * 4
    assert (final.final_loss < init.final_loss).all(), (init.final_loss, final.final_loss)
    assert (final.final_loss < 0.95 * init.final_loss).all()
    assert final.info["mean_steps"] == 24 and final.seconds > 0


@pytest.mark.parametrize("clamp", [0.25, 4.0])
def test_clamp(lm32, tok, clamp: float) -> None:
    res = values(lm32, tok, clamp_norm_factor=clamp, v_lr=2.0, early_stop_loss=0.0, v_num_grad_steps=10)
    dz = (res.z - res.h).norm(dim=0)
    bound = clamp * res.h.norm(dim=0)
    assert (dz <= bound + 1e-4).all(), (dz, bound)
    if clamp < 1:  # a big lr with a small ball: every fact ends on the boundary
        torch.testing.assert_close(dz, bound, rtol=1e-4, atol=0)


def test_bf16_model(tok) -> None:
    """A bf16 model (transformers 5 loads Llama-3 in bf16): δ stays fp32, the hook writes the
    block output back in bf16, and the optimisation still lowers the loss."""
    lm = tiny_llama(len(tok), dtype=torch.bfloat16).requires_grad_(False)
    init = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(v_num_grad_steps=1))
    res = compute_values(lm, tok, FACTS, LAYER, CTX, ValueHParams(v_num_grad_steps=10, early_stop_loss=0.0))
    assert res.z.dtype == torch.float32 and torch.isfinite(res.z).all()
    assert res.steps.tolist() == [9] * 4
    assert (res.final_loss < init.final_loss).all()


def test_model_untouched(tok) -> None:
    lm = tiny_llama(len(tok))  # parameters require grad, as after from_config
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    values(lm, tok, v_num_grad_steps=3)
    for k, v in lm.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in lm.parameters())


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [dict(v_num_grad_steps=0), dict(z_batch_size=0), dict(v_lr=0.0),
                                 dict(clamp_norm_factor=-1.0), dict(kl_factor=-0.1),
                                 dict(v_weight_decay=-1.0), dict(early_stop_loss=-1.0)])
def test_hparams_validation(bad) -> None:
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ValueHParams(**bad)


def test_defaults_are_paper_config() -> None:
    hp = ValueHParams()
    assert dataclasses.astuple(hp)[:6] == (25, 0.5, 1e-3, 4.0, 0.0625, 5e-2)


def test_first_template_must_be_plain(lm32, tok) -> None:
    ctx = ContextTemplates(groups=(("the cat sat . {}",), ("{}",)))
    with pytest.raises(ValueError, match="plain prompt"):
        compute_values(lm32, tok, FACTS, LAYER, ctx, ValueHParams(v_num_grad_steps=1))


# --------------------------------------------------------------------------- failed values

def test_overflowing_lr_is_a_failed_value_not_a_zero_edit(lm32, tok) -> None:
    """v_lr = 1e30 overflows the clamp's norm and zeroes δ: the fact must be reported failed (a
    zero δ would otherwise be stored as a valid edit that does nothing)."""
    res = values(lm32, tok, v_lr=1e30, early_stop_loss=0.0, v_num_grad_steps=5)
    assert res.failed.all(), res.fail_reason
    assert all("value optimisation" in r for r in res.fail_reason)
    ok = values(lm32, tok, v_lr=0.5, early_stop_loss=0.0, v_num_grad_steps=5)
    assert not ok.failed.any() and ok.fail_reason == [""] * 4


def test_value_failure_rules() -> None:
    from editlib.values import value_failures
    d = torch.ones(6, 3)
    d[1] = math.nan
    d[2] = 0.0
    d[5] = 0.0
    steps = torch.tensor([3, 3, 3, 3, 0, 3])
    first = torch.ones(6)
    nonfinite = torch.zeros(6, dtype=torch.bool)
    overflow = torch.tensor([False, False, False, True, False, False])
    had_grad = torch.tensor([True, True, True, True, False, False])
    r = value_failures(d, steps, first, nonfinite, overflow, had_grad)
    assert r[0] == "" and "non-finite δ" in r[1] and "exactly zero" in r[2] and "overflowed" in r[3]
    assert r[4] == ""  # no step taken (early stop at iteration 0): fine
    assert r[5] == ""  # zero gradient (an edit that cannot act there): not a failure
    nonfinite[0] = True
    assert "non-finite loss" in value_failures(d, steps, first, nonfinite, overflow, had_grad)[0]


def test_last_layer_stalls_but_does_not_fail(lm32, tok) -> None:
    """At the last layer δ at the subject token cannot reach the target positions: the loss never
    decreases, which is flagged ``stalled`` but is a valid (ineffective) edit, not a failure."""
    res = compute_values(lm32, tok, FACTS, 2, CTX, ValueHParams(v_lr=0.5, early_stop_loss=0.0,
                                                                 v_num_grad_steps=5))
    assert not res.failed.any() and res.stalled.any()
    ok = values(lm32, tok, v_lr=0.5, early_stop_loss=0.0, v_num_grad_steps=5)
    assert not ok.stalled.any()


@pytest.mark.parametrize("window", [16, 29, 31, 40, 48, 49, 64])
def test_the_prefix_cache_is_used_only_where_the_window_covers_its_slots(window: int) -> None:
    """Rows of prefix 24 + 6 and 3 + 25 tokens (width 30): the cache lays them out in 24 + 25 = 49
    key slots, so a window of 31-48 still cut row 2's first tokens when the check used the width.
    Wherever the cache is chosen, its hidden states equal the full forward's."""
    import transformers

    from editlib.tokens import pad_right
    from editlib.values import _Forward, _forward_for, _Seqs

    g = torch.Generator().manual_seed(0)
    ids, mask = pad_right([torch.randint(3, 100, (n,), generator=g).tolist() for n in (30, 28)], 0)
    none = torch.zeros(0, dtype=torch.long)
    seq = _Seqs(ids, mask, torch.tensor([0, 1]), torch.tensor([24, 3]), torch.tensor([False, False]),
                none, none, none, torch.zeros(0))
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=100, max_position_embeddings=128,
                                     bos_token_id=1, eos_token_id=2, sliding_window=window)
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False).double()
    chosen = _forward_for(m, seq, 1, ValueHParams(packed=False, prefix_cache=True))
    assert chosen.cached == (window >= 49)
    rows, d = torch.arange(2), torch.zeros(2, 32, dtype=torch.float64)
    with torch.no_grad():
        got, full = chosen(rows, d), _Forward(m, seq, 1, False)(rows, d)
    for i, (p, n) in enumerate(((24, 30), (3, 28))):
        at = slice(0, n - p) if chosen.cached else slice(p, n)
        torch.testing.assert_close(got[i, at], full[i, p:n], rtol=0, atol=1e-10)


def test_deterministic_runs_take_the_math_attention_on_a_gpu(tok, monkeypatch) -> None:
    """model.deterministic on a GPU: the value steps' attention (whose fused backward may add its
    blocks in a varying order, which warn-only deterministic mode only warns about) runs on SDPA's
    math kernels; otherwise the fused kernels stay allowed."""
    import torch.nn.functional as F

    from editlib import values
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        seen.append(torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled())
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    lm = _family("llama", len(tok))
    hp = ValueHParams(z_batch_size=2, v_num_grad_steps=2)
    compute_values(lm, tok, FACTS[:2], 0, CTX, hp)
    assert seen and all(seen)
    seen.clear()
    monkeypatch.setattr(values, "_deterministic_on_gpu", lambda model: True)
    compute_values(lm, tok, FACTS[:2], 0, CTX, hp)
    assert seen and not any(seen)
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after


def test_a_step_torch_runs_without_cuda_graphs_fails(tok, monkeypatch) -> None:
    """compile_blocks: reduce-overhead whose graphs torch does not capture (it skips them with a
    log line only: here host tensors, standing in for whatever a GPU run could bring) fails,
    naming the key, rather than running uncaptured under a label and a price that say captured."""
    from editlib import packed
    lm = _family("llama", len(tok))
    seen = []
    real = packed.run_blocks

    def spy(*a, **k):
        seen.append(a)
        return real(*a, **k)

    monkeypatch.setattr(packed, "run_blocks", spy)
    compute_values(lm, tok, FACTS[:1], LAYER, CTX, ValueHParams(z_batch_size=1, v_num_grad_steps=1))
    monkeypatch.setattr(packed, "run_blocks", real)
    monkeypatch.setattr(packed, "_COMPILED", {})
    monkeypatch.setattr(packed, "_SKIPS_AT_START", {})
    run = packed.blocks_fn("reduce-overhead", torch.device("cuda"))  # passes the device check; the tensors stay on the host
    with torch.enable_grad(), pytest.raises(RuntimeError, match="reduce-overhead: torch ran a value step's blocks without CUDA graphs"):
        run(*seen[0])


# --------------------------------------------------------------------------- the value store

def _store(tmp_path, limit: int = 10**9):
    from editlib.models import fingerprint
    from editlib.valuestore import ValueStore
    return lambda model: ValueStore(tmp_path / "_values", fingerprint(model), limit)


def _same(a, b) -> None:
    for name in ("z", "h", "final_loss", "steps", "stalled"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.fail_reason == b.fail_reason


def test_the_value_store_gives_back_what_the_optimisation_computed(lm32, tok, tmp_path, monkeypatch) -> None:
    """Chunks optimised once are kept; the same chunks asked for again are read back bit for bit,
    without a step of the optimisation."""
    import editlib.values as values_mod
    store = _store(tmp_path)(lm32)
    hp = ValueHParams(v_num_grad_steps=4, z_batch_size=3)  # chunks of 3 and 1 facts
    fresh = compute_values(lm32, tok, FACTS, LAYER, CTX, hp)
    first = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
    assert (store.hits, store.misses) == (0, 2) and len(list(store.root.glob("*.pt"))) == 2
    _same(first, fresh)

    def no_steps(*a, **k):
        raise AssertionError("a stored chunk was optimised again")
    monkeypatch.setattr(values_mod, "_optimise_chunk", no_steps)
    again = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
    assert store.hits == 2 and again.info["chunks_read"] == 2
    _same(again, fresh)


def test_the_value_store_key_follows_every_input(lm32, tok, tmp_path) -> None:
    """Another layer, hyperparameter, chunk, target, context template or model is another key."""
    from editlib.values import _build
    store = _store(tmp_path)(lm32)
    hp = ValueHParams()
    base = store.key(lm32, LAYER, hp, _build(tok, FACTS[:2], CTX))
    assert base == store.key(lm32, LAYER, hp, _build(tok, FACTS[:2], CTX))
    other_target = dataclasses.replace(FACTS[1], target_new=dataclasses.replace(FACTS[1].target_new, str="cat"))
    other_model = tiny_llama(len(tok), lm_scale=10.0, seed=1).requires_grad_(False)
    others = [store.key(lm32, LAYER + 1, hp, _build(tok, FACTS[:2], CTX)),
              store.key(lm32, LAYER, dataclasses.replace(hp, v_lr=0.25), _build(tok, FACTS[:2], CTX)),
              store.key(lm32, LAYER, hp, _build(tok, FACTS[:1], CTX)),
              store.key(lm32, LAYER, hp, _build(tok, FACTS[1::-1], CTX)),
              store.key(lm32, LAYER, hp, _build(tok, (FACTS[0], other_target), CTX)),
              store.key(lm32, LAYER, hp, _build(tok, FACTS[:2], ContextTemplates(groups=(("{}",),)))),
              _store(tmp_path)(other_model).key(other_model, LAYER, hp, _build(tok, FACTS[:2], CTX))]
    assert base not in others and len(set(others)) == len(others)


def test_the_value_store_key_follows_how_the_process_computes(lm32, tok, tmp_path, monkeypatch) -> None:
    """Threads, numerics, the CPU type, editlib's source and the process-wide kernel switches
    (attention backends, 16-bit reductions) are part of the key: values computed another way are
    not read back as this process's."""
    from editlib import valuestore
    from editlib.values import _build
    store = _store(tmp_path)(lm32)
    seq = _build(tok, FACTS[:2], CTX)
    base = store.key(lm32, LAYER, ValueHParams(), seq)
    keys = []
    for name, value in [("SOURCE_DIGEST", "another source"),
                        ("_cpu", lambda: {"capability": "AVX512", "model name": "another CPU"})]:
        with monkeypatch.context() as m:
            m.setattr(valuestore, name, value)
            keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 7)
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    with monkeypatch.context() as m:
        m.setenv("EDITLIB_NUMERICS", "native-elsewhere")
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):  # a user's own attention backend choice
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU autocast (torch.is_autocast_enabled() reads CUDA's)
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    attn = lm32.config._attn_implementation
    try:
        lm32.config._attn_implementation = "eager" if attn != "eager" else "sdpa"
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    finally:
        lm32.config._attn_implementation = attn
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    try:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = not flag
        keys.append(store.key(lm32, LAYER, ValueHParams(), seq))
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
    assert base not in keys and len(set(keys)) == len(keys)
    assert store.key(lm32, LAYER, ValueHParams(), seq) == base  # the switches restored: the same key


def test_the_value_store_keys_edited_weights_by_their_updates(tok, tmp_path) -> None:
    """Values of edited weights are kept and read back under the updates that made them
    (weights.edit_history): the same low-rank updates written again on the unedited weights (by
    another session, or replayed from its factor log as a checkpoint is) read back what the first
    session's optimisation computed, to the bit; other updates, a dense update, a master set by
    hand, a second session's write or a write outside a session are not served at all."""
    from editlib.arch import weight_out_in
    from editlib.values import _build
    from editlib.weights import EditSession, edit_history
    lm32 = tiny_llama(len(tok), lm_scale=10.0, seed=3).requires_grad_(False)  # left written at the end
    store = _store(tmp_path)(lm32)
    hp = ValueHParams(v_num_grad_steps=3)
    seq = _build(tok, FACTS, CTX)
    d_out, d_in = weight_out_in(lm32, LAYER).shape
    g = torch.Generator().manual_seed(5)
    R, X = torch.randn(d_out, 1, generator=g) * 0.3, torch.randn(1, d_in, generator=g) * 0.3
    assert store.serves(lm32) and edit_history(lm32) == ""
    base = store.key(lm32, LAYER, hp, seq)
    with EditSession(lm32) as s:
        s.apply_factors(LAYER, R, X)
        assert store.serves(lm32)
        key = store.key(lm32, LAYER, hp, seq)
        alone = compute_values(lm32, tok, FACTS, LAYER, CTX, hp)  # without the store
        kept = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
        assert (store.hits, store.misses) == (0, 1) and key != base
        log = s.take_log()
    unedited_z = compute_values(lm32, tok, FACTS, LAYER, CTX, hp).z
    assert store.serves(lm32) and store.key(lm32, LAYER, hp, seq) == base  # restored: the unedited key
    for replay in ([(LAYER, R, X)], log):  # another session, then the factor log replayed
        with EditSession(lm32) as s:
            for layer, r, x in replay:
                s.apply_factors(layer, r, x)
            assert store.key(lm32, LAYER, hp, seq) == key
            again = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
            assert again.info["chunks_read"] == 1
            assert torch.equal(again.z, alone.z) and torch.equal(again.h, alone.h) and torch.equal(kept.z, alone.z)
    assert not torch.equal(alone.z, unedited_z)  # the edit moved the values: the key had to change
    with EditSession(lm32) as s:  # another update, or the same one twice: other weights, other keys
        s.apply_factors(LAYER, 2 * R, X)
        other = store.key(lm32, LAYER, hp, seq)
        s.apply_factors(LAYER, -R, X)
        assert len({base, key, other, store.key(lm32, LAYER, hp, seq)}) == 4
    with EditSession(lm32) as s:
        s.apply(LAYER, (R.double() @ X.double()))  # dense: no digest describes it
        assert not store.serves(lm32)
    with EditSession(lm32) as s:
        s.apply_factors(LAYER, R, X)
        s.set_master(LAYER, s.master(LAYER).clone())  # a master set by hand (an old checkpoint)
        assert not store.serves(lm32)
    with EditSession(lm32) as a, EditSession(lm32) as b:  # a second session's write
        a.apply_factors(LAYER, R, X)
        b.apply_factors(LAYER, R, X)
        assert not store.serves(lm32)
        b.restore()
        assert not store.serves(lm32)  # a's digest no longer describes the weights' state
        a.apply_factors(LAYER, R, X)  # nor after a's next write, which would hash as [R, R]
        assert not store.serves(lm32)
    assert not store.serves(lm32)  # interleaved sessions: the weights are not known unedited either
    lm32 = tiny_llama(len(tok), lm_scale=10.0, seed=3).requires_grad_(False)  # the same weights, known again
    store = _store(tmp_path / "again")(lm32)
    assert store.key(lm32, LAYER, hp, seq) == base
    try:
        with EditSession(lm32) as s:
            s.apply_factors(LAYER, R, X)
            s.keep()
        assert store.serves(lm32) and store.key(lm32, LAYER, hp, seq) == key  # kept: still its updates
    finally:
        s.restore()
    assert store.serves(lm32)
    # restored out of order, the first session's edit stays in the weights: unknown
    a, b = EditSession(lm32), EditSession(lm32)
    a.apply_factors(LAYER, R, X)
    b.apply_factors(LAYER, R, X)
    a.restore()
    b.restore()
    assert not store.serves(lm32)
    with torch.no_grad():  # put back by hand: the store still does not know these weights
        weight_out_in(lm32, LAYER).sub_(R @ X)
    assert not store.serves(lm32)


@pytest.mark.parametrize("meddle", ["outside", "cast", "kept_and_nested"])
def test_edit_history_never_names_weights_written_beside_the_session(tok, meddle) -> None:
    """A write the session did not make, between two of its own (a tensor written outside any
    session, a dtype round trip, a session opened beside a kept one): the next write of the session
    does not take it into its digest; the weights stay unknown, and once it restores they are not
    unedited either (the meddling write stays)."""
    from editlib.arch import weight_out_in
    from editlib.weights import EditSession, edit_history
    model = tiny_llama(len(tok), lm_scale=10.0, seed=4).requires_grad_(False)
    d_out, d_in = weight_out_in(model, LAYER).shape
    g = torch.Generator().manual_seed(6)
    R, X = torch.randn(d_out, 1, generator=g) * 0.1, torch.randn(1, d_in, generator=g) * 0.1
    assert edit_history(model) == ""
    a = EditSession(model)
    a.apply_factors(LAYER, R, X)
    assert edit_history(model) not in (None, "")
    if meddle == "outside":
        with torch.no_grad():
            model.model.norm.weight.mul_(2.0)
    elif meddle == "cast":
        model.half().float()
    else:  # a kept, a second session writes another layer and restores
        a.keep()
        with EditSession(model) as b:
            b.apply_factors(LAYER - 1, R, X)
    assert edit_history(model) is None
    a.apply_factors(LAYER, R, X)
    a.apply_factors(LAYER - 1, R, X)
    assert edit_history(model) is None
    a.restore()
    assert edit_history(model) is None  # not unedited: the norm doubled, the tensors replaced, or mixed


def test_the_value_store_serves_no_model_written_by_hand_or_hooked(tok, tmp_path) -> None:
    """A weight written outside an edit session, or a forward hook anywhere on the model, stops the
    store (values are optimised as without it), with a warning for the hook."""
    from editlib.arch import get_module
    model = tiny_llama(len(tok), lm_scale=10.0, seed=2).requires_grad_(False)
    store = _store(tmp_path)(model)
    assert store.serves(model)
    handle = get_module(model, "model.layers.0.self_attn").register_forward_hook(lambda *a: None)
    try:
        with pytest.warns(RuntimeWarning, match="forward hook on model.layers.0.self_attn"):
            assert not store.serves(model)
    finally:
        handle.remove()
    assert store.serves(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # same values, but written: the store cannot tell
    assert not store.serves(model)


def test_the_value_store_serves_a_model_that_only_observers_watch(lm32, tok, tmp_path, monkeypatch) -> None:
    """A hook made by ``nethook.observer`` only reads (bench/phase_meter.py counts the LM head's
    rows with one): the store reads back and keeps values under it, with no warning, and the
    observer sees the forwards that ran; a plain hook in its place stops the store."""
    import warnings

    import editlib.values as values_mod
    from editlib.nethook import observer
    store = _store(tmp_path)(lm32)
    hp = ValueHParams(v_num_grad_steps=3, z_batch_size=4)
    fresh = compute_values(lm32, tok, FACTS[:4], LAYER, CTX, hp)
    rows = []
    handle = lm32.lm_head.register_forward_hook(observer(lambda m, i, o: rows.append(o.shape[0])))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert store.serves(lm32)
            first = compute_values(lm32, tok, FACTS[:4], LAYER, CTX, hp, store=store)
            assert (store.hits, store.misses) == (0, 1) and rows  # optimised under the observer, and kept
            _same(first, fresh)
            seen = len(rows)
            monkeypatch.setattr(values_mod, "_optimise_chunk", lambda *a, **k: pytest.fail("optimised again"))
            again = compute_values(lm32, tok, FACTS[:4], LAYER, CTX, hp, store=store)
            assert store.hits == 1 and len(rows) == seen  # read back: no forward ran
            _same(again, fresh)
    finally:
        handle.remove()
    handle = lm32.lm_head.register_forward_hook(lambda m, i, o: None)
    try:
        with pytest.warns(RuntimeWarning, match="forward hook on lm_head"):
            assert not store.serves(lm32)
    finally:
        handle.remove()


def test_the_value_store_recomputes_an_unreadable_file_and_keeps_to_its_limit(lm32, tok, tmp_path) -> None:
    hp = ValueHParams(v_num_grad_steps=3, z_batch_size=4)
    store = _store(tmp_path)(lm32)
    fresh = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
    [path] = store.root.glob("*.pt")
    path.write_bytes(b"not a tensor file")
    with pytest.warns(RuntimeWarning, match="cannot be used"):
        again = compute_values(lm32, tok, FACTS, LAYER, CTX, hp, store=store)
    _same(again, fresh)
    assert path.stat().st_size > 100  # rewritten
    small = _store(tmp_path / "small", limit=10)(lm32)
    with pytest.warns(RuntimeWarning, match="share_values_gb"):
        compute_values(lm32, tok, FACTS, LAYER, CTX, dataclasses.replace(hp, z_batch_size=2), store=small)
    assert not list(small.root.glob("*.pt"))


def _external_reads(fn):
    """``fn()``'s outputs and the storages its operations read that no operation of the call made
    (what a CUDA graph recorded from it would read at every replay: its static inputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made, self.read = set(), set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.made:
                    self.read.add(t.untyped_storage().data_ptr())
            out = func(*args, **(kwargs or {}))
            self.made.update(t.untyped_storage().data_ptr() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with Reads() as mode:
        out = fn()
    return out, mode.read - {0}


class _StandInGraph:
    """editlib.cudagraphs.CapturedStep with the CUDA calls stood in for: warm-ups return the step's
    results, the recording keeps its outputs, and every replay rewrites those same tensors by
    running the step again, which must read the very storages the recording read (a CUDA graph
    reads its recorded addresses: an input rebound to a new tensor would not be seen)."""

    seen: dict = {}

    def __init__(self, fn, device, what, warmups, pool=None):
        self.fn, self.warmups, self.calls, self.out, self.pool = fn, warmups, 0, None, pool
        self.graph = None  # set once recorded, as CapturedStep's
        self.seen["graphs"] = self.seen.get("graphs", 0) + 1

    def close(self):
        self.out = self.graph = None

    def __call__(self):
        self.calls += 1
        if self.calls <= self.warmups:
            return self.fn()
        if self.out is None:
            self.out, self.inputs = _external_reads(self.fn)
            self.graph = "recorded"
            self.seen["records"] = self.seen.get("records", 0) + 1
        else:
            out, inputs = _external_reads(self.fn)
            assert inputs == self.inputs, "a replay would read other tensors than the recording did"
            for o, r in zip(self.out, out):
                if o is not None:
                    o.copy_(r)
            self.seen["replays"] = self.seen.get("replays", 0) + 1
        return self.out


@pytest.fixture()
def stand_in_graphs(monkeypatch):
    """editlib.values' CUDA graphs stood in for (:class:`_StandInGraph`; the shared pools are
    objects, a new one when asked for a fresh pool, listed in ``seen["pools"]``), the device check
    passed as on a GPU; kept one-fact graphs released afterwards."""
    from editlib import values as v
    _StandInGraph.seen = {"pools": []}
    pools = _StandInGraph.seen["pools"]

    def shared_pool(device, fresh=False):
        if fresh or not pools:
            pools.append(object())
        return pools[-1]
    monkeypatch.setattr(v, "CapturedStep", _StandInGraph)
    monkeypatch.setattr(v, "shared_pool", shared_pool)
    monkeypatch.setattr(v, "check_capture_device", lambda hp, device: None)
    monkeypatch.setattr(v, "KEPT_COUNTS", {"made": 0, "reused": 0})
    v.release_value_graphs()
    yield _StandInGraph.seen
    v.release_value_graphs()


@pytest.mark.parametrize("kw", [dict(z_batch_size=1), dict(z_batch_size=4),
                                dict(z_batch_size=4, early_stop="mpes", mpes_hits=2)])
def test_capture_steps_path_is_the_eager_path(stand_in_graphs, tok, lm32, kw) -> None:
    """hparams capture_steps' branch on a CPU, the CUDA graph stood in for: each set of running
    facts warms up on real steps, is recorded once and replayed; it differentiates every running
    fact's loss where the eager step takes the facts that go on, and z, h, steps, losses and
    failures are the eager path's to the bit (a fact's δ reaches only its own loss)."""
    from editlib import values as v
    hp = dict(v_num_grad_steps=12, early_stop_loss=0.3, **kw)
    want = values(lm32, tok, **hp)
    with v.keeping_graphs():
        got = values(lm32, tok, capture_steps=True, **hp)
    for f in ("z", "h", "steps", "final_loss", "stalled"):
        assert torch.equal(getattr(want, f), getattr(got, f)), f
    assert want.fail_reason == got.fail_reason
    seen = _StandInGraph.seen
    assert seen["replays"] > 0
    if kw["z_batch_size"] == 1:  # a fact runs steps + 1 forwards; the first is eager
        calls = [int(s) for s in want.steps]  # graph calls: every forward but the first (the last replays once recorded)
        assert v.KEPT_COUNTS["reused"] == 0  # these facts' steps have sizes of their own
        assert seen["graphs"] == sum(c > 0 for c in calls) == v.KEPT_COUNTS["made"]
        assert seen["records"] == sum(c > v.GRAPH_WARMUPS for c in calls)
        assert seen["replays"] == sum(max(c - v.GRAPH_WARMUPS - 1, 0) for c in calls)
    if kw["z_batch_size"] == 4 and "early_stop" not in kw:
        assert len(set(want.steps.tolist())) > 1 and seen["graphs"] > 1  # facts stopped apart: a graph per set


@pytest.mark.parametrize("zb, kv", [(1, 4), (1, 2), (4, 2)])
def test_capture_steps_in_one_call_and_under_grouped_query_attention(stand_in_graphs, tok, zb, kv) -> None:
    """capture_steps over FACTS and their twins in one call: a twin loads its inputs into the kept
    graph of a fact of the same sizes, whose h the call still holds in that fact's result (it must
    hold a copy, not the graph's input); also on a Llama whose 4 query heads share 2 key/value heads
    (Llama-3's grouped-query attention: the packed step repeats each key/value head for its
    queries). z, h, steps and losses are the eager path's to the bit, one fact at a time (kept
    graphs) and in a chunk."""
    from editlib import values as v
    lm = tiny_llama(len(tok), lm_scale=10.0, kv_heads=kv).requires_grad_(False)
    assert lm.config.num_key_value_heads == kv
    hp = dict(v_num_grad_steps=12, early_stop_loss=0.3, z_batch_size=zb)
    want = compute_values(lm, tok, FACTS + TWINS, LAYER, CTX, ValueHParams(**hp))
    with v.keeping_graphs():
        got = compute_values(lm, tok, FACTS + TWINS, LAYER, CTX, ValueHParams(capture_steps=True, **hp))
    for f in ("z", "h", "steps", "final_loss", "stalled"):
        assert torch.equal(getattr(want, f), getattr(got, f)), f
    assert stand_in_graphs["replays"] > 0 and (v.KEPT_COUNTS["reused"] > 0) == (zb == 1)


#: FACTS' twins: other words, the same token counts (a step of the same sizes), in reverse order
#: (their graphs replay in another order than recorded), and a fact whose subject splits FACTS[0]'s
#: words otherwise: the same sizes, but another subject position (its mask and RoPE tables differ)
TWINS = tuple(fact(10 + r.case_id, r.prompt.replace("sat on", "ran to").replace("capital", "cat"),
                   {"the cat": "a dog", "France": "Paris", "Paris": "France", "the mat": "a cat"}[r.subject],
                   {"mat": "dog", "Paris": "France", "France": "Paris", "cat and dog": "dog and cat"}[r.target_new.str])
              for r in reversed(FACTS)) + (fact(20, "the {} sat on", "cat", "dog"),)


def _poison(kept) -> None:
    """Every input of the kept graphs overwritten (NaN, an index out of every range, flipped), each
    tensor once: what a fact does not copy in shows."""
    for g in kept.values():
        for t in {id(t): t for t in g.inputs}.values():
            t.logical_not_() if t.dtype == torch.bool else t.fill_(math.nan if t.is_floating_point() else 1 << 40)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_a_one_fact_graph_is_reused_by_facts_of_its_sizes(stand_in_graphs, tok, lm32) -> None:
    """capture_steps, one fact per chunk (a B = 1 sequential edit), within keeping_graphs: a fact
    whose step has the sizes of an earlier fact's replays that fact's graph, its own inputs copied
    in (the graph's inputs are poisoned before), from its first step (no warm-up, no recording),
    also in a later call and in another order; z, h, steps, losses and failures are the eager
    path's to the bit. Outside keeping_graphs nothing is kept."""
    from editlib import values as v
    facts = FACTS + TWINS
    assert [len(tok(f.prompt.format(f.subject)).input_ids) for f in TWINS[:4]] == \
        [len(tok(f.prompt.format(f.subject)).input_ids) for f in reversed(FACTS)]
    hp = ValueHParams(v_num_grad_steps=12, early_stop_loss=0.3, z_batch_size=1)
    want = compute_values(lm32, tok, facts, LAYER, CTX, hp)
    assert not torch.equal(want.z[:, :4], want.z[:, 4:8].flip(1))
    on = dataclasses.replace(hp, capture_steps=True)
    with v.keeping_graphs():
        got = [compute_values(lm32, tok, FACTS, LAYER, CTX, on)]
        _poison(v._KEPT)
        got.append(compute_values(lm32, tok, TWINS, LAYER, CTX, on))
        assert len(v._KEPT) == 4
        for g in v._KEPT.values():  # what each recording read: its listed inputs, the weights and δ only
            listed = {_storage(t) for t in g.inputs} | {_storage(p) for p in lm32.parameters()} | {_storage(g.d)}
            assert g.step.inputs <= listed
        assert len({g.step.pool for g in v._KEPT.values()}) == 1
    assert not v._KEPT  # released at the scope's exit
    for f in ("z", "h", "final_loss", "stalled"):
        assert torch.equal(getattr(want, f), torch.cat([getattr(g, f) for g in got], -1)), f
    assert torch.equal(want.steps, torch.cat([g.steps for g in got]))
    assert want.fail_reason == got[0].fail_reason + got[1].fail_reason
    calls = [int(s) for s in want.steps]  # graph calls per fact: every forward but the first
    assert all(c > v.GRAPH_WARMUPS for c in calls[:4]) and all(c > 0 for c in calls[4:])
    assert v.KEPT_COUNTS == {"made": 4, "reused": 5}
    seen = stand_in_graphs
    assert seen["graphs"] == seen["records"] == 4
    assert seen["replays"] == sum(c - v.GRAPH_WARMUPS - 1 for c in calls[:4]) + sum(calls[4:])
    compute_values(lm32, tok, TWINS, LAYER, CTX, on)  # outside keeping_graphs: a graph per chunk
    assert not v._KEPT and v.KEPT_COUNTS["made"] == 4 and seen["graphs"] == 9


def test_kept_graphs_are_of_one_model_and_bounded(stand_in_graphs, monkeypatch, tok, lm32) -> None:
    """A step of another model (other weights) releases the kept graphs of the first; at most
    KEPT_GRAPHS are kept, the least recently used going first; a step that raises drops its
    graph; a graph made with none kept gets a fresh pool; protocols.run_unit keeps graphs for its
    unit and releases them after it, also when it fails."""
    from editlib import protocols
    from editlib import values as v
    hp = ValueHParams(v_num_grad_steps=6, early_stop_loss=0.0, z_batch_size=1, capture_steps=True)
    pools = stand_in_graphs["pools"]
    with v.keeping_graphs():
        compute_values(lm32, tok, FACTS, LAYER, CTX, hp)
        first = dict(v._KEPT)
        assert len(first) == 4 and {g.step.pool for g in first.values()} == {pools[-1]}
        made = len(pools)
        other = tiny_llama(len(tok), lm_scale=10.0, seed=1).requires_grad_(False)
        compute_values(other, tok, FACTS[:1], LAYER, CTX, hp)
        assert len(v._KEPT) == 1 and not set(v._KEPT) & set(first) and all(g.step.out is None for g in first.values())
        assert len(pools) == made + 1 and next(iter(v._KEPT.values())).step.pool is pools[-1]  # none kept: a fresh pool
        monkeypatch.setattr(v, "KEPT_GRAPHS", 2)
        compute_values(other, tok, FACTS, LAYER, CTX, hp)
        assert len(v._KEPT) == 2 and len(pools) == made + 1
        last = list(v._KEPT)
        compute_values(other, tok, FACTS[2:3], LAYER, CTX, hp)  # FACTS[2]'s graph is in use again: now the newest
        assert list(v._KEPT) == last[::-1]
        real = v._GraphStep.__call__

        def fails(self, d_act):
            raise RuntimeError("a failing step")
        monkeypatch.setattr(v._GraphStep, "__call__", fails)
        with pytest.raises(RuntimeError, match="a failing step"):
            compute_values(other, tok, FACTS[3:4], LAYER, CTX, hp)
        assert list(v._KEPT) == last[:1]  # FACTS[3]'s graph went with its failure
        monkeypatch.setattr(v._GraphStep, "__call__", real)

    def unit(*a):  # a unit that keeps a graph, then fails
        compute_values(lm32, tok, FACTS[:1], LAYER, CTX, hp)
        assert len(v._KEPT) == 1
        raise RuntimeError("the unit failed")
    monkeypatch.setattr(protocols, "_UNIT_RUNNERS", {"batch": unit})
    with pytest.raises(RuntimeError, match="the unit failed"):
        protocols.run_unit(protocols.UnitSpec("batch", 0, LAYER, "memit", 2), None, None, protocols.UnitContext())
    assert not v._KEPT


def test_the_kept_graphs_key_and_scope(stand_in_graphs, tok, lm32) -> None:
    """A kept graph serves only steps under the settings and hooks it was recorded under: another
    TF32 or reduced-precision-reduction setting, or a hook on a module the step runs, makes another
    graph (z still eager's); nested keeping_graphs keep them until the outermost exits, and each
    outermost scope records into a fresh pool; a last forward whose graph is not yet recorded runs
    eagerly (it does not record for one use)."""
    from editlib import values as v
    hp = ValueHParams(v_num_grad_steps=6, early_stop_loss=0.0, z_batch_size=1)
    on = dataclasses.replace(hp, capture_steps=True)
    want = compute_values(lm32, tok, FACTS[:1], LAYER, CTX, hp)
    pools = stand_in_graphs["pools"]
    matmul = torch.backends.cuda.matmul
    with v.keeping_graphs():
        with v.keeping_graphs():
            compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on)
        assert len(v._KEPT) == 1  # the inner exit keeps them
        first_pool = next(iter(v._KEPT.values())).step.pool
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(v, "matmul_tf32", lambda: True)
            compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on)
        was = matmul.allow_bf16_reduced_precision_reduction
        matmul.allow_bf16_reduced_precision_reduction = not was
        try:
            compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on)
        finally:
            matmul.allow_bf16_reduced_precision_reduction = was
        handle = lm32.model.norm.register_forward_hook(lambda m, i, o: None)
        try:
            got = compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on)
        finally:
            handle.remove()
        assert torch.equal(got.z, want.z)
        assert v.KEPT_COUNTS == {"made": 4, "reused": 0} and len(v._KEPT) == 4
        assert compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on) and v.KEPT_COUNTS["reused"] == 1
    assert not v._KEPT
    with v.keeping_graphs():
        compute_values(lm32, tok, FACTS[:1], LAYER, CTX, on)
        assert next(iter(v._KEPT.values())).step.pool is pools[-1] is not first_pool
    records = stand_in_graphs["records"]
    with v.keeping_graphs():  # 3 forwards: the first eager, the second warms the graph up, the last eager
        compute_values(lm32, tok, FACTS[:1], LAYER, CTX, dataclasses.replace(on, v_num_grad_steps=3))
    assert stand_in_graphs["records"] == records


def test_a_replaced_value_graph_is_freed_at_once(monkeypatch, tok, lm32) -> None:
    """capture_steps: when the running facts change, the previous set's graph (its memory pool on a
    GPU) is released before the next set's, and none outlives the chunk, with the garbage collector
    off: the step closes over its input tensor, not over the object that holds the graph."""
    import gc
    import weakref

    from editlib import values as v
    made: list = []

    class Watched(v._GraphStep):
        def __init__(self, *a, **k):
            assert all(r() is None for r in made), "an earlier set's graph is still alive"
            super().__init__(*a, **k)
            made.append(weakref.ref(self))

    monkeypatch.setattr(v, "CapturedStep", _StandInGraph)
    monkeypatch.setattr(v, "_GraphStep", Watched)
    monkeypatch.setattr(v, "check_capture_device", lambda hp, device: None)
    collecting = gc.isenabled()
    gc.disable()
    try:
        res = values(lm32, tok, capture_steps=True, v_num_grad_steps=12, early_stop_loss=0.3, z_batch_size=4)
        assert len(made) > 1 and len(set(res.steps.tolist())) > 1
        assert all(r() is None for r in made)
    finally:
        if collecting:
            gc.enable()


def test_capture_steps_fails_fast(monkeypatch, tok, lm32) -> None:
    """capture_steps on a CPU model, without the packed forward, with compiled blocks, or for a model
    the packed forward cannot run stops with a message naming the key; off is not in a method's
    digest (stored results keep theirs)."""
    from _fixtures import tiny_gpt2
    from editlib.editing import EditHParams
    with pytest.raises(ValueError, match="capture_steps records CUDA graphs, but the model is on cpu"):
        values(lm32, tok, capture_steps=True, v_num_grad_steps=2)
    with pytest.raises(ValueError, match="needs packed: true"):
        ValueHParams(capture_steps=True, packed=False)
    with pytest.raises(ValueError, match="use one of the two"):
        ValueHParams(capture_steps=True, compile_blocks="default")
    for not_bool in ("false", 1):
        with pytest.raises(ValueError, match="capture_steps must be true or false"):
            ValueHParams(capture_steps=not_bool)
    from editlib import values as v
    monkeypatch.setattr(v, "check_capture_device", lambda hp, device: None)  # as on a GPU
    with pytest.raises(ValueError, match="capture_steps records the packed forward's steps, which this model"):
        compute_values(tiny_gpt2(len(tok)).requires_grad_(False), tok, FACTS, 1, CTX,
                       ValueHParams(capture_steps=True, v_num_grad_steps=2))
    assert "capture_steps" not in EditHParams(method="memit").to_dict()["values"]
    assert EditHParams.from_dict({"method": "memit", "capture_steps": True}).to_dict()["values"]["capture_steps"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_captured_value_steps_are_the_eager_steps(tok) -> None:
    """hparams capture_steps on a GPU copy of a small Llama (float32, and bfloat16 with MPES
    stops), under torch's warn-only deterministic algorithms (model.deterministic; without them
    the eager step's index_add sums vary in order from run to run): the recorded steps replay, and
    z, steps and losses equal the eager steps' to the bit, for one fact at a time and for a chunk
    whose facts stop apart, also under grouped-query attention (2 key/value heads for 4 queries); within keeping_graphs, one-fact steps of the same sizes replay one kept
    graph (in the shared pool, in another order than recorded, and with two graphs kept at most:
    evicted and recorded again), each fact's inputs copied in."""
    from editlib import cudagraphs
    from editlib import values as v
    replays = []
    real = cudagraphs.CapturedStep.__call__

    def counted(self):
        replays.append(self.graph is not None)
        return real(self)

    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    bound = v.KEPT_GRAPHS
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudagraphs.CapturedStep.__call__ = counted
    try:
        for dtype, stop, kv in ((torch.float32, {"early_stop_loss": 0.3}, 4), (torch.bfloat16, {"early_stop": "mpes"}, 4),
                                (torch.bfloat16, {"early_stop_loss": 0.3}, 2)):  # kv 2: grouped-query attention
            lm = tiny_llama(len(tok), lm_scale=10.0, dtype=dtype, kv_heads=kv).requires_grad_(False).cuda()
            for zb, kept in ((1, 128), (1, 2), (4, 128)):  # KEPT_GRAPHS 2: graphs evicted and recorded again
                hp = dict(v_num_grad_steps=12, z_batch_size=zb, **stop)
                want = compute_values(lm, tok, FACTS + TWINS, LAYER, CTX, ValueHParams(**hp))
                reused, v.KEPT_GRAPHS = v.KEPT_COUNTS["reused"], kept
                with v.keeping_graphs():
                    got = compute_values(lm, tok, FACTS + TWINS, LAYER, CTX, ValueHParams(capture_steps=True, **hp))
                for f in ("z", "h", "steps", "final_loss"):
                    assert torch.equal(getattr(want, f), getattr(got, f)), (dtype, zb, kept, f)
                assert (v.KEPT_COUNTS["reused"] > reused) == (zb == 1)  # the twins replay their FACTS' graphs
    finally:
        cudagraphs.CapturedStep.__call__ = real
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        v.KEPT_GRAPHS = bound
    assert any(replays)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kept_graphs_record_again_after_a_release_that_left_an_output_alive(tok) -> None:
    """Kept graphs released while one of their outputs is still referenced (a traceback stored by
    a notebook keeps a step's loss and gradient): the next kept graph records into a fresh pool
    (torch asserts on a pool id it has released) and gives the eager z."""
    from editlib import values as v
    lm = tiny_llama(len(tok), lm_scale=10.0).requires_grad_(False).cuda()
    hp = ValueHParams(v_num_grad_steps=8, early_stop_loss=0.0, z_batch_size=1)
    on = dataclasses.replace(hp, capture_steps=True)
    with v.keeping_graphs():
        compute_values(lm, tok, FACTS[:1], LAYER, CTX, on)
        alive, pool = next(iter(v._KEPT.values())).step.out, next(iter(v._KEPT.values())).step.pool
    assert alive is not None and not v._KEPT
    with v.keeping_graphs():
        got = compute_values(lm, tok, FACTS[1:2], LAYER, CTX, on)
        assert next(iter(v._KEPT.values())).step.pool != pool
    want = compute_values(lm, tok, FACTS[1:2], LAYER, CTX, hp)
    assert torch.allclose(want.z, got.z, rtol=1e-6, atol=1e-6) and torch.equal(want.steps, got.steps)
