"""editlib.decode (evaluation.gen_decode): GE's decode steps re-stated on KV buffers written in
place. ``static`` equals the transformers forward to the bit on CPU (logits of every step, and so
the sampled texts, also under per-row edits); ``graph``'s fixed-shape step (masked attention over
the whole buffer, what a CUDA graph captures) and ``compiled``'s (the same step as torch.compile'd
pure functions) equal it to float rounding; what cannot be decoded fails with a message that
names the reason."""
from __future__ import annotations

import pytest
import torch
import transformers

from _fixtures import WORDS, tiny_gpt2, word_tokenizer
from editlib.decode import Decoder, unsupported
from editlib.generation import _cache_name, _last_logits_kw, sample_texts
from editlib.lowrank import LayeredRowDeltas, LowRankEdits, RowDeltas, TrailingDeltas

FAMILIES = [
    ("llama", {}),
    ("llama", {"attention_bias": True, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    ("mistral", {"sliding_window": 64}),  # a window wider than the generations: full attention
    ("qwen2", {}),
]


def family(model_type: str, vocab: int, dtype: torch.dtype, **kw) -> torch.nn.Module:
    """Random 3-layer model of a Llama-style family, grouped-query attention (4 heads, 2 KV;
    ``kw`` overrides any config key)."""
    torch.manual_seed(1)
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[model_type]
    cfg = getattr(transformers, cls)(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                               max_position_embeddings=128, bos_token_id=1, eos_token_id=2), **kw})
    m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(10.0)  # peaked distributions: sampling is not a coin toss
    return m.to(dtype)


@torch.no_grad()
def transformers_steps(model, ids: torch.Tensor, prefill: int) -> list[torch.Tensor]:
    """Last logits of the prefill and of each one-column step after it (the transformers forward,
    as GE's transformers path runs it: the prefill projects its last position alone)."""
    name = _cache_name(model)
    out = model(input_ids=ids[:, :prefill], use_cache=True, **_last_logits_kw(model))
    past, got = getattr(out, name), [out.logits[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{name: past})
        past = getattr(out, name)
        got.append(out.logits[:, -1])
    return got


def decoder_steps(model, ids: torch.Tensor, prefill: int, mode: str) -> list[torch.Tensor]:
    dec = Decoder(model, ids.shape[0], ids.shape[1], mode, capture=False)
    return [dec.prefill(ids[:, :prefill])] + [dec.step(ids[:, t], t) for t in range(prefill, ids.shape[1] - 1)]


@pytest.mark.parametrize("model_type, kw", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_decode_steps_equal_the_transformers_forward(model_type, kw, dtype) -> None:
    model = family(model_type, 40, dtype, **kw)
    assert unsupported(model, 24) is None and unsupported(model, 24, "compiled") is None
    ids = torch.randint(3, 40, (5, 24), generator=torch.Generator().manual_seed(0))
    ref = transformers_steps(model, ids, 7)
    static = decoder_steps(model, ids, 7, "static")
    fixed = decoder_steps(model, ids, 7, "graph")
    assert len(ref) == len(static) == len(fixed) == 17
    for a, b, c in zip(ref, static, fixed):
        assert torch.equal(a, b)  # the same operations on the same values
        tol = {torch.bfloat16: 4e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]  # bf16: a few of its ulps
        torch.testing.assert_close(c, a, rtol=tol, atol=tol)
    assert max(float((a - c).abs().max()) for a, c in zip(ref, fixed)) > 0 or dtype == torch.float64
    if dtype == torch.float32 or model_type == "llama" and not kw:  # each dtype and bias layout compiles anew
        fused = decoder_steps(model, ids, 7, "compiled")
        # fused kernels sum RMSNorm's float32 mean in another order (in float64 too: transformers' norm is float32)
        tol = {torch.bfloat16: 4e-2, torch.float32: 1e-5, torch.float64: 1e-6}[dtype]
        for a, d in zip(ref, fused):
            torch.testing.assert_close(d, a, rtol=tol, atol=tol)


def _edits(model, n: int, rank: int, layer: int = 1, seed: int = 0) -> LowRankEdits:
    g = torch.Generator().manual_seed(seed)
    W = model.model.layers[layer].mlp.down_proj.weight
    d_out, d_in = W.shape
    return LowRankEdits(layer, [torch.randn(d_out, rank, generator=g, dtype=torch.float64) * 2.0 for _ in range(n)],
                        [torch.randn(rank, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5 for _ in range(n)])


def _prompts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(3)
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(2, 6, (n,), generator=g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hooks", ["rank1", "rank4", "trailing", "layered"])
def test_texts_under_per_row_edits(dtype, hooks) -> None:
    """GE's batched generation of many independent edits (editlib.lowrank hooks, some rows
    unedited): static gives the transformers path's texts exactly; graph's hook form (no branch
    on the rows) and compiled (the hooks on its eager down-projections) give the same texts here,
    and their logits stay within rounding (previous test)."""
    tok = word_tokenizer()
    model = family("llama", len(tok), dtype)
    prompts = _prompts(12)
    groups = [i % 4 - 1 for i in range(12)]  # -1: unedited rows
    if hooks in ("rank1", "rank4"):
        ctx = RowDeltas(model, _edits(model, 3, 1 if hooks == "rank1" else 4))
    elif hooks == "trailing":
        ctx = TrailingDeltas(model, _edits(model, 3, 2), sign=-1.0)
    else:
        ctx = LayeredRowDeltas(model, [_edits(model, 3, 1, layer=0), _edits(model, 3, 2, layer=2, seed=1)])
    texts = {}
    with ctx as hook:
        for mode in ("transformers", "static", "graph", "compiled"):
            texts[mode] = sample_texts(model, tok, prompts, max_len=20, seed=4, batch_size=5,
                                       groups=groups, deltas=hook, decode=mode)
        assert hook.rows is None
    plain = sample_texts(model, tok, prompts, max_len=20, seed=4, batch_size=5)
    assert texts["static"] == texts["transformers"]
    assert texts["graph"] == texts["transformers"]
    assert texts["compiled"] == texts["transformers"]
    edited = [i for i, g in enumerate(groups) if g >= 0 or hooks == "trailing"]
    assert any(texts["transformers"][i] != plain[i] for i in edited)  # the edits do change texts
    assert all(texts["transformers"][i] == plain[i] for i, g in enumerate(groups) if g < 0 and hooks != "trailing")


def test_one_compilation_serves_every_block_and_batch() -> None:
    """compiled's weights and sizes are arguments: the blocks of a model, batches of other row
    counts and widths, and another model of the same layout reuse one compiled front and one tail
    (a recompilation per block or batch would cost seconds each, and past torch's limit of 8 the
    step would silently fall back to eager)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from editlib import compiling, decode
    torch._dynamo.reset()
    decode._COMPILED_FNS.clear()
    counters.clear()
    ids = torch.randint(3, 40, (6, 14), generator=torch.Generator().manual_seed(2))
    a = family("llama", 40, torch.float32)
    torch.manual_seed(9)
    b = family("llama", 40, torch.float32)
    b.model.layers[0].mlp.up_proj.weight.data.normal_()
    for model, rows, width in ((a, 6, 14), (a, 3, 14), (a, 6, 10), (b, 4, 12)):
        got = decoder_steps(model, ids[:rows, :width], 5, "compiled")
        ref = transformers_steps(model, ids[:rows, :width], 5)
        for x, y in zip(ref, got):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    # under a dispatch mode (an operation or FLOP counter), which a compiled graph cannot run
    # under, the functions run as written: graph's step exactly
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.n += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        counted = decoder_steps(a, ids, 5, "compiled")
    assert Counting.n > 0
    for x, y in zip(decoder_steps(a, ids, 5, "graph"), counted):
        assert torch.equal(x, y)
    # past the limit a call fails, never running eagerly in silence
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiling, "RECOMPILE_LIMIT", 1)
        with pytest.raises(RuntimeError, match="compiled has compiled its decode step 1 times"):
            decoder_steps(family("llama", 40, torch.float64), ids, 5, "compiled")


@pytest.mark.parametrize("kw", [
    {"head_dim": 16},                                            # head_dim != hidden / heads
    {"attention_bias": True, "mlp_bias": True},                  # every projection with a bias
    {"num_key_value_heads": 4},                                  # no grouping
    {"num_key_value_heads": 1},                                  # one key/value head for all
    {"model_type": "qwen2", "tie_word_embeddings": True},        # biased q/k/v, tied head
])
def test_fixed_shape_step_layouts(kw) -> None:
    """The fixed-shape step's pure functions on the layouts these families allow, eager (graph)
    and compiled, one row and five, within float32 rounding of the transformers forward."""
    kw = dict(kw)
    model = family(kw.pop("model_type", "llama"), 40, torch.float32, **kw)
    ids = torch.randint(3, 40, (5, 12), generator=torch.Generator().manual_seed(4))
    for rows in (5, 1):
        ref = transformers_steps(model, ids[:rows], 5)
        for mode in ("graph", "compiled"):
            for a, b in zip(ref, decoder_steps(model, ids[:rows], 5, mode)):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_static_hook_form_equals_the_branching_one() -> None:
    """RowDeltas' form without data-dependent branches (what graph captures) adds the same terms:
    rank-one (gathered, unedited rows times 0) and higher ranks (ownership mask)."""
    tok = word_tokenizer()
    model = family("llama", len(tok), torch.float64)
    ids = torch.randint(3, len(tok), (6, 5), generator=torch.Generator().manual_seed(1))
    for rank in (1, 3):
        with RowDeltas(model, _edits(model, 3, rank)) as hook:
            hook.rows = torch.tensor([0, -1, 2, 1, -1, 0])
            a = model(input_ids=ids).logits
            hook.static_shapes = True
            b = model(input_ids=ids).logits
            hook.rows = None
            plain = model(input_ids=ids).logits
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        assert torch.equal(a[1], plain[1]) and torch.equal(b[1], plain[1])  # unedited rows: untouched
        assert not torch.allclose(a[0], plain[0])


def test_what_cannot_be_decoded_fails_clearly() -> None:
    tok = word_tokenizer()
    gpt = tiny_gpt2(len(tok))
    assert "not Llama-style" in unsupported(gpt, 20)
    with pytest.raises(ValueError, match="gen_decode: static cannot decode this model.*not Llama-style"):
        sample_texts(gpt, tok, ["a b"], max_len=10, decode="static")
    narrow = family("mistral", len(tok), torch.float32, sliding_window=8)
    assert "sliding window" in unsupported(narrow, 20)
    assert unsupported(narrow, 6) is None
    from editlib.__main__ import build_parser
    from editlib.decode import DECODE_MODES
    action = next(a for p in build_parser()._subparsers._group_actions for a in p.choices["evaluate"]._actions
                  if "--gen-decode" in a.option_strings)
    assert tuple(action.choices) == DECODE_MODES
    with pytest.raises(ValueError, match="gen_decode must be one of"):
        sample_texts(family("llama", len(tok), torch.float32), tok, ["a b"], max_len=10, decode="fast")
    eager = family("llama", len(tok), torch.float32, attn_implementation="eager")
    assert "attention implementation 'eager'" in unsupported(eager, 20)
    dyn = family("llama", len(tok), torch.float32, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                    "rope_theta": 10000.0})
    assert "RoPE type 'dynamic'" in unsupported(dyn, 20)
    gelu = family("llama", len(tok), torch.float32, hidden_act="gelu")  # what the compiled step does not re-state
    assert unsupported(gelu, 20) is None and "MLP activation 'gelu'" in unsupported(gelu, 20, "compiled")
    with pytest.raises(ValueError, match="gen_decode: compiled cannot decode this model: MLP activation 'gelu'"):
        sample_texts(gelu, tok, ["a b"], max_len=10, decode="compiled")
    odd = family("llama", len(tok), torch.float32)
    odd.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(32)
    assert "norm LayerNorm" in unsupported(odd, 20, "compiled") and "norm LayerNorm" in unsupported(odd, 20, "graph")

    class Quantised(torch.nn.Linear):  # a forward of its own, which F.linear on .weight would skip
        def forward(self, x):
            return super().forward(x).round()

    sub = family("llama", len(tok), torch.float32)
    q = sub.model.layers[0].self_attn.q_proj
    sub.model.layers[0].self_attn.q_proj = Quantised(q.in_features, q.out_features, bias=False)
    assert "not the Llama layout of plain nn.Linear" in unsupported(sub, 20, "compiled")
    assert unsupported(sub, 20, "static") is None
    head = family("llama", len(tok), torch.float32)
    head.lm_head = Quantised(32, len(tok), bias=False)
    assert "LM head is not a plain nn.Linear" in unsupported(head, 20, "graph")
    model = family("llama", len(tok), torch.float32)
    dec = Decoder(model, 2, 10, "static")
    with pytest.raises(ValueError, match="position 5: 0 of 10"):
        dec.step(torch.tensor([3, 4]), 5)
    with pytest.raises(ValueError, match="graph captures CUDA graphs"):
        Decoder(model, 2, 10, "graph", capture=True)
    with pytest.raises(ValueError, match="compiled captures CUDA graphs"):
        Decoder(model, 2, 10, "compiled", capture=True)


def test_hooks_the_step_would_not_honour_are_refused() -> None:
    """A hook on a module the decode step bypasses (a block, an attention module; under compiled
    every module but the embedding and the down-projections) would fire in the transformers
    forward and not here: refused in every mode. Under graph and compiled, any hook on a called
    module but editlib's per-row edits is refused too. transformers' own output-capturing hooks,
    installed for good by a forward that asked for hidden states, are inactive in a decode step
    and pass."""
    tok = word_tokenizer()
    model = family("llama", len(tok), torch.float32)
    ids = torch.tensor([[1, 3, 4], [1, 5, 6]])
    model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    assert model.model.layers[0]._forward_hooks  # transformers' capture hooks, now there for good
    Decoder(model, 2, 10, "graph", capture=False)
    Decoder(model, 2, 10, "compiled", capture=False)
    every = ("static", "graph", "compiled")
    for mod, modes in ((model.model.layers[1].self_attn, every), (model.model.layers[0], every),
                       (model.model.layers[0].mlp, ("graph", "compiled")),
                       (model.model.layers[2].input_layernorm, ("graph", "compiled")),
                       (model.model.layers[2].mlp.down_proj, ("graph", "compiled")),
                       (model.model.norm, ("graph", "compiled"))):
        handle = mod.register_forward_hook(lambda m, i, o: o)
        try:
            for mode in every:
                if mode in modes:
                    with pytest.raises(ValueError, match=f"{mode} cannot run the forward hook"):
                        Decoder(model, 2, 10, mode, capture=False)
                else:
                    Decoder(model, 2, 10, mode, capture=False)
        finally:
            handle.remove()


@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_capture_path_records_once_and_replays_every_step(monkeypatch, mode) -> None:
    """step()'s capture branch on a CPU, with the CUDA calls stood in for: the step is recorded
    once (hooks in their branch-free form, labels checked, deterministic mode off and restored),
    every later column replays it from the input buffers, and the logits are the uncaptured
    fixed-shape step's."""
    import contextlib

    from editlib import decode
    tok = word_tokenizer()
    model = family("llama", len(tok), torch.float64)
    seen = {"captures": 0, "replays": 0}

    class Graph:
        def __init__(self, fn, out):
            self.fn, self.out = fn, out

        def replay(self):
            seen["replays"] += 1
            self.out.copy_(self.fn())

    def fake_capture(fn, device):
        seen["captures"] += 1
        assert hook.static_shapes and not torch.are_deterministic_algorithms_enabled()
        fn()
        out = fn()
        return Graph(fn, out), out

    ids = torch.randint(3, len(tok), (4, 12), generator=torch.Generator().manual_seed(5))
    with RowDeltas(model, _edits(model, 3, 2)) as hook:
        hook.rows = torch.tensor([0, -1, 2, 1])
        want = decoder_steps(model, ids, 4, mode)
        monkeypatch.setattr(decode, "_capture", fake_capture)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        dec = Decoder(model, 4, 12, mode, capture=False)
        dec.capture = True  # as on a GPU
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            got = [dec.prefill(ids[:, :4]).clone()] + [dec.step(ids[:, t], t).clone() for t in range(4, 11)]
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        finally:
            torch.use_deterministic_algorithms(False)
        assert not hook.static_shapes
        assert seen == {"captures": 1, "replays": 7}
        for a, b in zip(want, got):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="decodes one batch"):  # its graph reads the buffers it holds
            dec.prefill(ids[:, :4])
        hook.rows = torch.tensor([0, 1])
        dec = Decoder(model, 2, 10, mode, capture=False)
        dec.capture = True
        dec.prefill(torch.tensor([[1, 3], [1, 4]]))
        hook.rows = torch.tensor([0, 7])  # checked on the host before a capture, never inside a replay
        with pytest.raises(ValueError, match=r"row labels 0\.\.7 for 3 edits"):
            dec.step(torch.tensor([3, 4]), 2)
        hook.rows = None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_follows_the_transformers_forward() -> None:
    """On a GPU (the last one, so that a model off the current device is covered where there are
    several), the captured step (graph, and compiled: inductor's kernels inside the capture)
    replays with new columns and positions under per-row edits:
    float32 logits within rounding of the transformers forward and changing from step to step (an
    empty capture would repeat them), also with deterministic mode on; bfloat16 texts under a
    sequential group's subtracted updates and hooks at two layers mostly equal to transformers',
    static's exactly the transformers path's."""
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    tok = word_tokenizer()
    model = family("llama", len(tok), torch.float32).to(dev)
    ids = torch.randint(3, len(tok), (6, 24), generator=torch.Generator().manual_seed(0)).to(dev)
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        try:
            with RowDeltas(model, _edits(model, 3, 1)) as hook:
                hook.rows = torch.tensor([0, -1, 2, 1, -1, 0], device=dev)
                ref = transformers_steps(model, ids, 5)
                for mode in ("graph", "compiled"):
                    dec = Decoder(model, 6, 24, mode)
                    assert dec.capture
                    got = [dec.prefill(ids[:, :5]).clone()] + [dec.step(ids[:, t], t).clone() for t in range(5, 23)]
                    for a, b in zip(ref, got):
                        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
                    assert all(not torch.equal(a, b) for a, b in zip(got[1:], got[2:]))
                hook.rows = None
        finally:
            torch.use_deterministic_algorithms(False)
    bf = family("llama", len(tok), torch.bfloat16).to(dev)
    prompts = _prompts(12)
    groups = [i % 4 - 1 for i in range(12)]
    for make in (lambda: TrailingDeltas(bf, _edits(bf, 3, 2), sign=-1.0),
                 lambda: LayeredRowDeltas(bf, [_edits(bf, 3, 1, layer=0), _edits(bf, 3, 4, layer=2, seed=1)])):
        with make() as hook:
            t = {m: sample_texts(bf, tok, prompts, max_len=20, seed=4, batch_size=5, groups=groups, deltas=hook,
                                 decode=m) for m in ("transformers", "static", "graph", "compiled")}
        assert t["static"] == t["transformers"]
        assert sum(x == y for x, y in zip(t["graph"], t["transformers"])) >= 8
        assert sum(x == y for x, y in zip(t["compiled"], t["transformers"])) >= 8
