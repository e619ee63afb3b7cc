"""editlib.below: the blocks below an edited layer run once for several evaluations of the same
prompts (issue #13). The replayed scores equal a full forward bit for bit, the blocks below are
not run when a batch is replayed, and nothing is shared where it could be wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _fixtures import one_thread, word_tokenizer  # noqa: F401
from editlib.arch import arch_for, get_module
from editlib.below import SharedBelow, _copied, _nbytes
from editlib.lowrank import RowDeltas
from editlib.scoring import score_targets
from test_lowrank import model_for, pairs, random_edits

N, BATCH = 30, 7
N_BATCHES = -(-N // BATCH)


def score(model, tok, edits, below=None, groups=None):
    prefixes, targets = pairs(N, seed=3)
    groups = groups or [i % 5 for i in range(N)]
    with RowDeltas(model, edits) as hook:
        s = score_targets(model, tok, prefixes, targets, groups=groups, deltas=hook, batch_size=BATCH, below=below)
    return np.concatenate([s.nll, s.correct.astype(float)])


def block(model, l: int):
    return get_module(model, arch_for(model).layer_name(l))


class Counting:
    """Counts the forward calls of each block (patched on the class, so a block's instance
    ``forward`` set by a replay takes precedence and is not counted)."""

    def __init__(self, model, monkeypatch):
        self.calls: dict[int, int] = {}
        cls = type(block(model, 0))
        real = cls.forward
        index = {id(block(model, l)): l for l in range(3)}
        calls = self.calls

        def forward(mod, *a, **k):
            calls[index[id(mod)]] = calls.get(index[id(mod)], 0) + 1
            return real(mod, *a, **k)

        monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", [1, 2])
def test_replay_equals_full_forward_bit_for_bit(kind, dtype, layer, monkeypatch) -> None:
    tok = word_tokenizer()
    model = model_for(kind, tok, dtype)
    a = random_edits(model, 5, 1, scale=0.5, seed=1)
    b = random_edits(model, 5, 4, scale=0.5, seed=2)
    a.layer = b.layer = layer
    want_a, want_b = score(model, tok, a), score(model, tok, b)
    below = SharedBelow(model, layer, 1e9)
    count = Counting(model, monkeypatch)
    got_a = score(model, tok, a, below)
    assert (below.hits, below.misses) == (0, N_BATCHES) and below.bytes > 0
    first = dict(count.calls)
    got_b = score(model, tok, b, below)  # other edits, the same prompts: every batch replayed
    assert (below.hits, below.misses) == (N_BATCHES, N_BATCHES)
    ran = {l: count.calls.get(l, 0) - first.get(l, 0) for l in range(3)}
    assert all(ran[l] == 0 for l in range(layer)) and all(ran[l] == N_BATCHES for l in range(layer, 3))
    assert np.array_equal(got_a, want_a) and np.array_equal(got_b, want_b)
    assert not any("forward" in block(model, l).__dict__ for l in range(3))  # the blocks are restored


def edited_above(tok):
    """The float32 Llama miniature and 5 seeded rank-one edits of its layer 2, above the blocks
    SharedBelow(model, 2, ...) keeps."""
    model = model_for("llama", tok, torch.float32)
    edits = random_edits(model, 5, 1, scale=0.5)
    edits.layer = 2
    return model, edits


def test_other_prompts_are_computed() -> None:
    tok = word_tokenizer()
    model = model_for("llama", tok, torch.float32)
    edits = random_edits(model, 5, 1, scale=0.5)
    below = SharedBelow(model, 1, 1e9)
    score(model, tok, edits, below)
    prefixes, targets = pairs(N, seed=4)  # other prompts: nothing to replay
    with RowDeltas(model, edits) as hook:
        score_targets(model, tok, prefixes, targets, groups=[0] * N, deltas=hook, batch_size=BATCH, below=below)
    assert below.hits == 0


def test_nothing_is_shared_under_a_hook_below_or_past_the_cap() -> None:
    tok = word_tokenizer()
    model = model_for("llama", tok, torch.float32)
    edits = random_edits(model, 5, 1, scale=0.5)
    want = score(model, tok, edits)
    # a hook on a module below the edited layer would be skipped by a replay: every batch computed
    up = random_edits(model, 5, 1, scale=0.5)
    up.layer = 2
    want_up = score(model, tok, up)
    below = SharedBelow(model, 2, 1e9)
    score(model, tok, up, below)
    assert below.bytes > 0
    seen = []
    with torch.no_grad():
        h = get_module(model, arch_for(model).mlp_name(0)).register_forward_hook(lambda *a: seen.append(1))
        try:
            with pytest.warns(RuntimeWarning, match=r"share_below_gb.*forward hook on model\.layers\.0\.mlp \(") as caught:
                got = score(model, tok, up, below)
        finally:
            h.remove()
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "share_below_gb" in str(w.message)]
    assert len(ours) == 1  # said once, however many batches ran every block
    assert below.hits == 0 and below.hooked == N_BATCHES and len(seen) == N_BATCHES and np.array_equal(got, want_up)
    assert np.array_equal(score(model, tok, up, below), want_up) and below.hits == N_BATCHES
    # a cap of 0 keeps nothing; layer 0 has nothing below it
    for layer, cap in ((1, 0.0), (0, 1e9)):
        below = SharedBelow(model, layer, cap)
        score(model, tok, edits, below)
        assert np.array_equal(score(model, tok, edits, below), want)
        assert below.hits == 0 and below.bytes == 0
    # a small cap keeps the batches that fit, and replays those
    below = SharedBelow(model, 1, 1e9)
    score(model, tok, edits, below)
    one = below.bytes / N_BATCHES
    below = SharedBelow(model, 1, 2.5 * one * 1.5)
    score(model, tok, edits, below)
    assert 0 < below.bytes <= 2.5 * one * 1.5
    assert np.array_equal(score(model, tok, edits, below), want) and 0 < below.hits < N_BATCHES


@pytest.mark.parametrize("where", ["embeddings", "block", "submodule", "global"])
def test_an_observer_stops_sharing_only_where_a_replay_would_fake_its_calls(where: str) -> None:
    """A hook made by ``nethook.observer`` only reads. On the embeddings, which run in a replay too,
    it leaves the sharing on (no warning, the same scores) and sees every batch. On a block below
    the edited layer a replay would call its hooks with the kept tensor as input and output, and
    on a submodule of one skip it; a global one sees both: each stops sharing, as a plain hook does."""
    import warnings

    from torch.nn.modules.module import register_module_forward_hook

    from editlib.nethook import observer
    tok = word_tokenizer()
    model = model_for("llama", tok, torch.float32)
    up = random_edits(model, 5, 1, scale=0.5)
    up.layer = 2
    want_up = score(model, tok, up)
    below = SharedBelow(model, 2, 1e9)
    seen = []
    hook = observer(lambda *a: seen.append(1))
    arch = arch_for(model)
    h = (register_module_forward_hook(hook) if where == "global" else
         get_module(model, {"embeddings": "model.embed_tokens", "block": arch.layer_name(0),
                            "submodule": arch.mlp_name(0)}[where]).register_forward_hook(hook))
    try:
        if where == "embeddings":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for _ in range(2):
                    assert np.array_equal(score(model, tok, up, below), want_up)
            assert below.hits == N_BATCHES and below.hooked == 0 and len(seen) == 2 * N_BATCHES
        else:
            with pytest.warns(RuntimeWarning, match="share_below_gb"):
                for _ in range(2):
                    assert np.array_equal(score(model, tok, up, below), want_up)
            assert below.hits == 0 and below.hooked == 2 * N_BATCHES
    finally:
        h.remove()


@pytest.mark.parametrize("pre", [False, True])
def test_a_global_forward_hook_turns_sharing_off(pre: bool, monkeypatch) -> None:
    """A global forward (pre-)hook (a profiler, a debugger) sees every module's call: a replay
    would hand it the kept tensor instead of running the blocks below, so while one is registered
    every batch runs every block, with one warning naming it, and the scores are the unshared ones."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    tok = word_tokenizer()
    model, up = edited_above(tok)
    want_up = score(model, tok, up)
    below = SharedBelow(model, 2, 1e9)
    score(model, tok, up, below)
    assert below.bytes > 0 and below.hits == 0
    count = Counting(model, monkeypatch)
    seen = []
    register = register_module_forward_pre_hook if pre else register_module_forward_hook
    h = register(lambda *_a: seen.append(1))
    try:
        with pytest.warns(RuntimeWarning, match=r"share_below_gb.*because of a global forward hook") as caught:
            first = score(model, tok, up, below)
            n_first = len(seen)
            second = score(model, tok, up, below)
    finally:
        h.remove()
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "share_below_gb" in str(w.message)]
    assert len(ours) == 1  # said once
    assert 0 < n_first < len(seen)  # the hook saw the second pass too
    assert below.hits == 0 and below.hooked == 2 * N_BATCHES
    assert count.calls == {0: 2 * N_BATCHES, 1: 2 * N_BATCHES, 2: 2 * N_BATCHES}  # blocks below computed
    assert np.array_equal(first, want_up) and np.array_equal(second, want_up)
    assert np.array_equal(score(model, tok, up, below), want_up) and below.hits == N_BATCHES  # hook gone


def test_tuple_outputs_are_copied_and_counted() -> None:
    """Block outputs that are tuples (transformers 4.x): the kept copy has the same structure and
    values in fresh storage (detached), so a later in-place write on the original does not reach
    it, and its size is the bytes of every tensor in it."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    u = torch.ones(4, dtype=torch.float64)
    y = t * 2
    x = (y, None, (u, 7))
    c = _copied(x)
    assert type(c) is tuple and len(c) == 3 and c[1] is None and type(c[2]) is tuple and c[2][1] == 7
    assert torch.equal(c[0], y) and torch.equal(c[2][0], u)
    assert c[0].data_ptr() != y.data_ptr() and c[2][0].data_ptr() != u.data_ptr()
    assert not c[0].requires_grad and c[0].dtype == y.dtype and c[2][0].dtype == u.dtype
    with torch.no_grad():
        y.add_(1.0)
    u.add_(1.0)
    assert torch.equal(c[0], 2 * torch.arange(6.0).reshape(2, 3))
    assert torch.equal(c[2][0], torch.ones(4, dtype=torch.float64))
    assert type(_copied([u])) is list and _copied([u])[0].data_ptr() != u.data_ptr()
    assert _nbytes(x) == y.nbytes + u.nbytes == 6 * 4 + 4 * 8
    assert _nbytes([u, (u,)]) == 2 * u.nbytes and _nbytes(None) == 0


def test_a_block_above_working_in_place_changes_nothing_kept() -> None:
    """Block L may change its input in place (here a pre-hook adds 1 to it): neither the kept
    output nor a replayed one is the tensor it receives."""
    tok = word_tokenizer()
    model, edits = edited_above(tok)
    def bump(mod, args, kwargs):
        (args[0] if args else kwargs["hidden_states"]).add_(1.0)

    h = block(model, 2).register_forward_pre_hook(bump, with_kwargs=True)
    try:
        want = score(model, tok, edits)
        below = SharedBelow(model, 2, 1e9)
        first, second, third = (score(model, tok, edits, below) for _ in range(3))
    finally:
        h.remove()
    assert below.hits == 2 * N_BATCHES
    assert np.array_equal(first, want) and np.array_equal(second, want) and np.array_equal(third, want)


def test_a_weight_written_below_drops_what_was_recorded() -> None:
    """Writing a weight of a block below (and restoring it) bumps its write counter: the batches
    recorded before are computed again, so a replay never outlives the weights it came from."""
    from editlib.weights import EditSession

    tok = word_tokenizer()
    model, edits = edited_above(tok)
    below = SharedBelow(model, 2, 1e9)
    want = score(model, tok, edits)
    score(model, tok, edits, below)
    with EditSession(model) as s:
        s.apply(0, torch.ones_like(s.master(0)))
        changed = score(model, tok, edits, below)
    assert below.hits == 0 and not np.array_equal(changed, want)
    assert np.array_equal(score(model, tok, edits, below), want) and below.hits == 0  # restored: recorded anew
    assert np.array_equal(score(model, tok, edits, below), want) and below.hits == N_BATCHES


def test_the_embeddings_count_as_below() -> None:
    """What block 0 receives counts too: a hook on the token embedding stops sharing, and a
    replaced embedding weight (a new parameter, equal values) drops what was recorded."""
    tok = word_tokenizer()
    model, edits = edited_above(tok)
    want = score(model, tok, edits)
    below = SharedBelow(model, 2, 1e9)
    score(model, tok, edits, below)
    emb = get_module(model, arch_for(model).embed)
    h = emb.register_forward_hook(lambda *a: None)
    try:
        with pytest.warns(RuntimeWarning, match="forward hook on model.embed_tokens"):
            assert np.array_equal(score(model, tok, edits, below), want) and below.hits == 0
    finally:
        h.remove()
    emb.weight = torch.nn.Parameter(emb.weight.detach().clone())
    assert np.array_equal(score(model, tok, edits, below), want) and below.hits == 0 and below.bytes > 0
    assert np.array_equal(score(model, tok, edits, below), want) and below.hits == N_BATCHES


def test_a_blocks_own_forward_attribute_is_put_back() -> None:
    """A block whose ``forward`` is an instance attribute (accelerate's device hooks) gets it back
    after a replay, also when the forward fails."""
    tok = word_tokenizer()
    model, edits = edited_above(tok)  # the edit's own hook sits above the shared blocks
    b0 = block(model, 0)
    own = b0.forward  # a bound method, stored on the instance as a wrapper would be
    b0.forward = own
    below = SharedBelow(model, 2, 1e9)
    want = score(model, tok, edits)
    score(model, tok, edits, below)
    assert np.array_equal(score(model, tok, edits, below), want) and below.hits == N_BATCHES
    assert b0.__dict__["forward"] is own and "forward" not in block(model, 1).__dict__
    with pytest.raises(RuntimeError, match="row labels"):
        with RowDeltas(model, edits) as hook:  # a forward that fails while replaying
            hook.rows = torch.zeros(1, dtype=torch.long)
            below.forward(model.base_model, *_first_batch(tok), torch.device("cpu"))
    assert b0.__dict__["forward"] is own and "forward" not in block(model, 1).__dict__


def _first_batch(tok):
    """The first scoring batch of :func:`score` (the shortest prompts), as score_targets pads it."""
    from editlib.scoring import _read_plan, _tok_cache
    from editlib.tokens import pad_right

    prefixes, targets = pairs(N, seed=3)
    cache = _tok_cache(tok, "correct")
    groups = [i % 5 for i in range(N)]
    seqs = list(dict.fromkeys((g, _read_plan(cache, p, t)[0]) for g, p, t in zip(groups, prefixes, targets)))
    seqs = sorted(seqs, key=lambda s: len(s[1]))[:BATCH]
    return pad_right([list(ids) for _, ids in seqs], tok.pad_token_id if tok.pad_token_id is not None
                     else tok.eos_token_id)
