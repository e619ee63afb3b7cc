"""Independent edits evaluated together (editlib.lowrank, issue #13): each row's own low-rank
update added by a hook gives the same scores and generations as writing that edit into the weights,
on llama, qwen2 and gpt2 miniatures, in float32 (1e-6 relative) and float64 (1e-10)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from _fixtures import WORDS, one_thread, tiny_gpt2, tiny_llama, word_tokenizer  # noqa: F401
from editlib.arch import weight_out_in
from editlib.generation import sample_texts
from editlib.lowrank import LayeredRowDeltas, LowRankEdits, RowDeltas, TrailingDeltas, rank_one
from editlib.scoring import score_targets
from editlib.weights import EditSession

LAYER = 1


def tiny_qwen2(vocab_size: int, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                   bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().to(dtype)


def model_for(kind: str, tok, dtype):
    if kind == "llama":
        return tiny_llama(len(tok), dtype=dtype)
    if kind == "qwen2":
        return tiny_qwen2(len(tok), dtype=dtype)
    return tiny_gpt2(len(tok), dtype=dtype)


def pairs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prefixes = [" ".join(rng.choice(WORDS, size=rng.integers(2, 7))) for _ in range(n)]
    targets = [" ".join(rng.choice(WORDS, size=rng.integers(1, 3))) for _ in range(n)]
    return prefixes, targets


def random_edits(model, n_edits: int, rank: int, scale: float, seed: int = 0) -> LowRankEdits:
    g = torch.Generator().manual_seed(seed)
    W = weight_out_in(model, LAYER)
    d_out, d_in = W.shape
    R = [torch.randn(d_out, rank, generator=g, dtype=torch.float64) * scale for _ in range(n_edits)]
    X = [torch.randn(rank, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for _ in range(n_edits)]
    return LowRankEdits(LAYER, R, X)


def logclose(a, b) -> float:
    """max |a − b| / max(1, |b|)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


def rel(a, b) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_scores_equal_editing_the_weights(kind, dtype, tol, rank) -> None:
    tok = word_tokenizer()
    model = model_for(kind, tok, dtype)
    edits = random_edits(model, 5, rank, scale=0.5)
    prefixes, targets = pairs(40)
    groups = [i % 5 for i in range(40)]
    groups[3] = -1  # an unedited row in the same pass
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with RowDeltas(model, edits) as hook:
        got = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=7)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
    want = np.zeros(40)
    for e in [-1, *range(5)]:
        idx = [i for i in range(40) if groups[i] == e]
        with EditSession(model) as s:
            if e >= 0:
                s.apply(LAYER, edits.delta(e))
            want[idx] = score_targets(model, tok, [prefixes[i] for i in idx], [targets[i] for i in idx]).nll
    # log-probabilities (mean-token NLL) to `tol` relative, with an absolute floor of `tol` for
    # NLLs below 1 (float32 rounds a logit of ~10 to ~1e-6 whichever way the sum is formed)
    assert logclose(got.nll, want) < tol
    # the edits do change the scores (the comparison is not vacuous)
    plain = score_targets(model, tok, prefixes, targets).nll
    assert logclose(plain, want) > 100 * tol


def test_rank_one_stack_equals_general_path() -> None:
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    e = random_edits(model, 6, 1, scale=0.5, seed=3)
    R = torch.cat(e.R, 1)
    X = torch.cat(e.X, 0)
    stacked = rank_one(LAYER, R, X)
    prefixes, targets = pairs(24, seed=2)
    groups = [i % 6 for i in range(24)]
    with RowDeltas(model, stacked) as hook:
        assert hook._stack is not None
        a = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook).nll
    general = LowRankEdits(LAYER, [torch.cat([r, torch.zeros_like(r)], 1) for r in e.R],
                           [torch.cat([x, torch.zeros_like(x)], 0) for x in e.X])  # rank 2 with a zero pair
    with RowDeltas(model, general) as hook:
        assert hook._stack is None
        b = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook).nll
    assert rel(a, b) < 1e-12


def test_generation_equals_editing_the_weights() -> None:
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float64)
    edits = random_edits(model, 3, 2, scale=2.0, seed=5)
    prompts, _ = pairs(9, seed=4)
    groups = [i % 3 for i in range(9)]
    with RowDeltas(model, edits) as hook:
        got = sample_texts(model, tok, prompts, max_len=14, seed=1, groups=groups, deltas=hook, batch_size=4)
    for e in range(3):
        idx = [i for i in range(9) if groups[i] == e]
        with EditSession(model) as s:
            s.apply(LAYER, edits.delta(e))
            want = sample_texts(model, tok, [prompts[i] for i in idx], max_len=14, seed=1, keys=idx)
        assert [got[i] for i in idx] == want
    assert sample_texts(model, tok, prompts, max_len=14, seed=1) != got  # the edits matter


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_layered_deltas_equal_editing_several_layers(dtype, tol) -> None:
    """Edits over layers 0 and 1 (edit e of each layer on the same rows; a rank-0 edit adds
    nothing) give the scores of writing both layers' updates into the weights."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=dtype)
    e1 = random_edits(model, 3, 2, scale=0.5, seed=7)
    e0 = LowRankEdits(0, [*random_edits(model, 2, 3, scale=0.5, seed=8).R, torch.zeros(e1.R[0].shape[0], 0,
                                                                                        dtype=torch.float64)],
                      [*random_edits(model, 2, 3, scale=0.5, seed=8).X, torch.zeros(0, e1.X[0].shape[1],
                                                                                     dtype=torch.float64)])
    prefixes, targets = pairs(18, seed=9)
    groups = [i % 3 for i in range(18)]
    with LayeredRowDeltas(model, [e0, e1]) as hook:
        got = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=5).nll
    assert all(h._handle is None for h in hook.hooks)  # removed on exit
    want = np.zeros(18)
    for e in range(3):
        idx = [i for i in range(18) if groups[i] == e]
        with EditSession(model) as s:
            s.apply(0, e0.delta(e))
            s.apply(1, e1.delta(e))
            want[idx] = score_targets(model, tok, [prefixes[i] for i in idx], [targets[i] for i in idx]).nll
    assert logclose(got, want) < tol
    with EditSession(model) as s:  # without layer 0's edits the scores differ: both hooks act
        for e in range(3):
            idx = [i for i in range(18) if groups[i] == e]
            s.apply(1, e1.delta(e))
            assert logclose(score_targets(model, tok, [prefixes[i] for i in idx], [targets[i] for i in idx]).nll,
                            want[idx]) > 100 * tol or e == 2
            s.apply(1, -e1.delta(e))
    with pytest.raises(ValueError, match="same number of edits"):
        LayeredRowDeltas(model, [e0, LowRankEdits(1, e1.R[:2], e1.X[:2])])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_trailing_deltas_take_back_the_later_updates(kind, dtype, tol) -> None:
    """Updates 0..3 written into the weights; TrailingDeltas with sign -1 scores the rows of update
    j at the weights holding updates 0..j only (an update of rank 0 included), and the last
    update's rows and unlabelled rows exactly as the fully edited model."""
    tok = word_tokenizer()
    model = model_for(kind, tok, dtype)
    e = random_edits(model, 4, 2, scale=0.5, seed=12)
    e = LowRankEdits(LAYER, [e.R[0], e.R[1][:, :0], e.R[2], e.R[3]], [e.X[0], e.X[1][:0], e.X[2], e.X[3]])
    prefixes, targets = pairs(20, seed=13)
    groups = [i % 5 - 1 for i in range(20)]  # -1, 0, 1, 2, 3
    want = np.zeros(20)
    with EditSession(model) as s:
        for j in range(4):
            s.apply(LAYER, e.delta(j))
            idx = [i for i in range(20) if groups[i] == j]
            want[idx] = score_targets(model, tok, [prefixes[i] for i in idx], [targets[i] for i in idx]).nll
        # the same batches as the hooked call: a product's rounding may depend on how many rows it has
        full = score_targets(model, tok, prefixes, targets, batch_size=6).nll
        with TrailingDeltas(model, e, sign=-1.0) as hook:
            got = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=6).nll
        assert hook._handle is None
    minus = [i for i in range(20) if groups[i] == -1]
    want[minus] = full[minus]
    assert logclose(got, want) < tol
    last = [i for i in range(20) if groups[i] in (-1, 3)]
    assert np.array_equal(got[last], full[last])  # nothing added, same batches: bit for bit
    first = [i for i in range(20) if groups[i] == 0]
    assert logclose(full[first], want[first]) > 100 * tol  # the later updates matter


def test_float16_terms_are_formed_in_float32() -> None:
    """A float16 model whose updates are moderate (R X) but whose factors are not (R tiny, X past
    float16's 65,504): writing the weight works, and so must the hooks, which form each row's term
    and its sum with W x in float32 (in float16, X and X x would be inf: NaN scores, a failed
    case where the written weight has none). Both hooks, each against the written weights."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float16)
    e = random_edits(model, 2, 1, scale=0.5, seed=21)
    big = 1e7
    e = LowRankEdits(LAYER, [r / big for r in e.R], [x * big for x in e.X])
    assert max(float(x.abs().max()) for x in e.X) > 65504
    prefixes, targets = pairs(12, seed=22)
    groups = [i % 2 for i in range(12)]
    with RowDeltas(model, e) as hook:
        got = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=5).nll
    want, first = np.zeros(12), np.zeros(12)
    for j in range(2):
        idx = [i for i in range(12) if groups[i] == j]
        with EditSession(model) as s:
            s.apply(LAYER, e.delta(j))
            want[idx] = score_targets(model, tok, [prefixes[i] for i in idx], [targets[i] for i in idx]).nll
    assert np.isfinite(got).all() and logclose(got, want) < 2e-2
    with EditSession(model) as s:  # updates 0 and 1 written; rows of update 0 take update 1 back
        s.apply(LAYER, e.delta(0))
        first[:] = score_targets(model, tok, prefixes, targets).nll
        s.apply(LAYER, e.delta(1))
        with TrailingDeltas(model, e, sign=-1.0) as hook:
            back = score_targets(model, tok, prefixes, targets, groups=[0] * 12, deltas=hook, batch_size=5).nll
        both = score_targets(model, tok, prefixes, targets).nll
    assert np.isfinite(back).all() and logclose(back, first) < 2e-2
    assert logclose(both, first) > 0.1  # update 1 matters: the hook did take it back


def test_rank_n_factors_are_cast_once_per_hook(monkeypatch) -> None:
    """Float64 rank-N factors under a float16 model are cast to the float32 terms once per hook, not
    at every forward (a B = 4,096 batch's are 235 MB at paper scale), and the scores are those of
    casting them at every forward."""
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.float16)
    e = random_edits(model, 3, 2, scale=0.5, seed=23)
    prefixes, targets = pairs(12, seed=24)
    groups = [i % 3 for i in range(12)]
    factors = {id(t) for t in [*e.R, *e.X]}
    real, casts = torch.Tensor.to, []

    def counting_to(self, *a, **k):
        if id(self) in factors:
            casts.append(id(self))
        return real(self, *a, **k)

    with RowDeltas(model, e) as hook:
        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        got = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=4).nll
        monkeypatch.setattr(torch.Tensor, "to", real)
    assert len(casts) == len(factors) == 6  # 3 forwards of 4 rows, each factor cast once
    cast = LowRankEdits(LAYER, [r.float() for r in e.R], [x.float() for x in e.X])
    with RowDeltas(model, cast) as hook:
        want = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=4).nll
    assert np.array_equal(got, want)


def test_bad_factors_and_rows_fail_clearly() -> None:
    with pytest.raises(ValueError, match="do not form"):
        LowRankEdits(0, [torch.zeros(4, 2)], [torch.zeros(3, 8)])
    with pytest.raises(ValueError, match="NaN"):
        LowRankEdits(0, [torch.full((4, 1), float("nan"))], [torch.zeros(1, 8)])
    with pytest.raises(ValueError, match="2 left factors but 1 right"):  # zip would drop an edit
        LowRankEdits(0, [torch.zeros(4, 1), torch.zeros(4, 1)], [torch.zeros(1, 8)])
    tok = word_tokenizer()
    model = tiny_llama(len(tok))
    with RowDeltas(model, random_edits(model, 2, 1, 0.1)) as hook:
        hook.rows = torch.tensor([0])
        with pytest.raises(RuntimeError, match="row labels"):
            model(input_ids=torch.tensor([[1, 3, 4], [1, 5, 6]]))
    # removed on exit: a forward after the block is the plain model
    out = model(input_ids=torch.tensor([[1, 3, 4]])).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,ieee", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False)])
def test_sixteen_bit_terms_ignore_model_tf32(monkeypatch, dtype, ieee) -> None:
    """model.tf32 rounds a float32 model's products only (what a results digest records:
    editlib.tf32.tf32_applies). A 16-bit model's per-row terms are float32 matmuls, which TF32
    would round unrecorded, so every hook forms them with TF32 off (on CUDA; the switch is a no-op
    elsewhere, recorded here); a float32 model's terms follow the model's setting."""
    import contextlib

    import editlib.lowrank as lowrank
    asked: list[bool] = []

    @contextlib.contextmanager
    def recorded(device, on=True):
        asked.append(on)
        yield

    monkeypatch.setattr(lowrank, "tf32_matmuls", recorded)
    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=dtype)
    prefixes, targets = pairs(4, seed=3)
    e = random_edits(model, 2, 2, scale=0.1, seed=4)
    groups = [0, 1, -1, 0]
    for hook in (RowDeltas(model, e), TrailingDeltas(model, e), RowDeltas(model, rank_one(LAYER, e.R[0], e.X[0]))):
        with hook:
            asked.clear()
            score_targets(model, tok, prefixes, targets, groups=[min(g, len(hook.edits) - 1) for g in groups],
                          deltas=hook)
            assert asked == ([False] * len(asked) if ieee else []) and (len(asked) > 0) == ieee


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_terms_are_ieee_under_model_tf32() -> None:
    """On a GPU, a bfloat16 model's per-row scores are the same bits with model.tf32 on as off: the
    hooks' float32 terms stay IEEE, and the model's own bfloat16 products ignore the switch (what the
    results digest assumes: editlib.tf32.tf32_applies is false for a 16-bit model)."""
    from editlib.tf32 import matmul_tf32, set_tf32

    tok = word_tokenizer()
    model = tiny_llama(len(tok), dtype=torch.bfloat16).cuda()
    prefixes, targets = pairs(8, seed=5)
    e = random_edits(model, 3, 2, scale=0.5, seed=6)
    groups = [i % 4 - 1 for i in range(8)]
    before, out = matmul_tf32(), []
    try:
        for on in (False, True):
            set_tf32(on)
            with RowDeltas(model, e) as hook:
                out.append(score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook).nll)
    finally:
        set_tf32(before)
    assert np.array_equal(out[0], out[1])
