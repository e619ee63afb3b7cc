"""editlib.stats: C0 = E[kkᵀ] of the down-projection input, one pass, safetensors cache (SPEC §4)."""
from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from editlib import arch, stats
from editlib.tf32 import matmul_tf32, tf32_matmuls
from editlib.stats import (CorpusSpec, CorpusUnavailable, CovCacheError, collect_second_moments,
                           iter_corpus, layer_covariance, records_corpus_texts)
from editlib.tokens import encode, prepare_tokenizer
from editlib.world import make_world

from test_models import WORDS, tiny_llama, tiny_tokenizer

F64 = torch.float64


def texts_of(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


@pytest.fixture(scope="module")
def tok():
    return prepare_tokenizer(tiny_tokenizer())


@pytest.fixture(scope="module")
def llama():
    """Float64 so batched/unbatched forwards agree to rounding (padding must not matter)."""
    return tiny_llama(seed=0).double().eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).double().eval()


def hand_moment(model, tok, texts: list[str], layer: int, max_length: int = 10**6
                ) -> tuple[torch.Tensor, int]:
    """Hook the down-projection by hand, one unpadded text at a time, and average k kᵀ."""
    keys: list[torch.Tensor] = []
    handle = arch.down_proj(model, layer).register_forward_hook(
        lambda mod, inp, out: keys.append(inp[0][0].detach().clone()))
    try:
        with torch.no_grad():
            for t in texts:
                model(torch.tensor([encode(tok, t)[:max_length]]))
    finally:
        handle.remove()
    K = torch.cat(keys).to(F64).T  # [d_in, n]
    return K @ K.T / K.shape[1], K.shape[1]


@pytest.fixture()
def forwards(llama):
    """calls[0] = number of top-level forward passes of the shared tiny Llama during the test."""
    calls = [0]
    handle = llama.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    yield calls
    handle.remove()


def forbid_collection(monkeypatch) -> None:
    """Fail the test if C0 is collected (rather than read from the cache)."""
    def boom(*a, **k):
        raise AssertionError("collected although cached")

    monkeypatch.setattr(stats, "collect_second_moments", boom)


# --------------------------------------------------------------------------- collection


def test_matches_hand_computation(llama, tok) -> None:
    texts = texts_of(20)
    got = collect_second_moments(llama, tok, texts, [1], batch_size=6, progress=False)
    total, count = got[1]
    expected, n = hand_moment(llama, tok, texts, 1)
    assert count == n == sum(len(encode(tok, t)) for t in texts)
    assert total.dtype == F64 and total.shape == (64, 64)
    assert rel(total / count, expected) < 1e-10


@pytest.mark.parametrize("d, block", [(50, 16), (64, 64), (33, 8)])
def test_block_triangular_gram_equals_the_full_product(d, block, monkeypatch) -> None:
    """Σkkᵀ accumulated on the block upper triangle over several batches and mirrored once equals
    the full product, is exactly symmetric (the full GEMM need not be), and takes (b + 1) / 2b of its multiply-adds; at most
    GRAM_BLOCK columns it is the one full GEMM (bitwise)."""
    monkeypatch.setattr(stats, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(d)
    batches = [torch.randn(n, d, generator=g, dtype=F64) for n in (7, 30, 1)]
    full, acc = torch.zeros(d, d, dtype=F64), torch.zeros(d, d, dtype=F64)
    for x in batches:
        full.addmm_(x.T, x)
        stats.add_gram(acc, x)
    got = stats.symmetrize_upper(acc)
    assert rel(got, full) < 1e-14
    b = stats.gram_blocks(d)
    if d <= block:
        assert b == 1 and torch.equal(got, full)
    else:
        assert b == -(-d // block) > 1 and torch.equal(got, got.T)
        macs = stats.gram_macs(d)
        assert macs == pytest.approx((b + 1) / (2 * b) * d * d, rel=0.1) and macs < 0.8 * d * d


@pytest.mark.parametrize("d, rows", [(50, 16), (50, 7), (48, 48), (33, 100)])
def test_symmetrize_upper_is_the_sum_of_triangles_bit_for_bit(d, rows, monkeypatch) -> None:
    """Row blocks of the in-place mirror give exactly triu(a) + triu(a, 1)ᵀ (the sign of a zero
    included) whatever the block height, and return the same tensor."""
    monkeypatch.setattr(stats, "GRAM_BLOCK", 8)
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(d), dtype=F64)
    a[0, 5], a[3, 40 % d], a[7, 7] = -0.0, -0.0, -0.0
    want = a.triu() + a.triu(1).T
    got = stats.symmetrize_upper(a, rows=rows)
    assert got.data_ptr() == a.data_ptr()
    assert torch.equal(got.view(torch.int64), want.view(torch.int64))


def test_collection_with_column_blocks_matches_one_gemm(llama, tok, monkeypatch) -> None:
    texts = texts_of(20, seed=3)
    one = collect_second_moments(llama, tok, texts, [0, 1], batch_size=6, progress=False)
    monkeypatch.setattr(stats, "GRAM_BLOCK", 24)  # the tiny Llama's 64 inputs: 3 column blocks
    blocked = collect_second_moments(llama, tok, texts, [0, 1], batch_size=6, progress=False)
    for l in (0, 1):
        assert blocked[l][1] == one[l][1]
        assert torch.equal(blocked[l][0], blocked[l][0].T)
        assert rel(blocked[l][0], one[l][0]) < 1e-13


def test_gpt2_conv1d_c_proj_input(tok) -> None:
    model = tiny_gpt2()
    assert arch.arch_for(model).conv1d and arch.key_dim(model, 0) == 128  # 4·n_embd
    texts = texts_of(10, seed=1)
    total, count = collect_second_moments(model, tok, texts, [0], batch_size=4, progress=False)[0]
    expected, n = hand_moment(model, tok, texts, 0)
    assert total.shape == (128, 128) and count == n
    assert rel(total / count, expected) < 1e-10


def test_padding_excluded(llama, tok) -> None:
    texts = texts_of(12, seed=2)
    batched = collect_second_moments(llama, tok, texts, [0], batch_size=12, progress=False)[0]
    single = collect_second_moments(llama, tok, texts, [0], batch_size=1, progress=False)[0]
    assert batched[1] == single[1]
    assert rel(batched[0], single[0]) < 1e-10


def test_one_pass_for_two_layers(llama, tok, forwards) -> None:
    texts = texts_of(10, seed=3)
    calls = forwards
    both = collect_second_moments(llama, tok, texts, [1, 0], batch_size=10, progress=False)
    assert calls[0] == 1  # one batch ⇒ one forward for both layers
    for layer in (0, 1):
        alone = collect_second_moments(llama, tok, texts, [layer], batch_size=10, progress=False)[layer]
        assert both[layer][1] == alone[1]
        assert rel(both[layer][0], alone[0]) < 1e-12


def test_encoded_corpus_gives_the_same_sums(llama, tok) -> None:
    texts = texts_of(14, seed=5)
    ids = stats.encode_corpus(tok, texts, 6)
    assert len(ids) == 14 and all(t.dtype == torch.int32 and 0 < len(t) <= 6 for t in ids)
    plain = collect_second_moments(llama, tok, texts, [0, 1], max_length=6, batch_size=4, progress=False)
    given = collect_second_moments(llama, tok, ["unused"], [0, 1], max_length=6, batch_size=4, progress=False,
                                   encoded=ids)
    for l in (0, 1):
        assert given[l][1] == plain[l][1] and torch.equal(given[l][0], plain[l][0])


def test_truncation_and_float32(llama, tok) -> None:
    texts = texts_of(8, seed=4)
    total, count = collect_second_moments(llama, tok, texts, [0], max_length=3, dtype=torch.float32,
                                          progress=False)[0]
    assert total.dtype == torch.float32
    assert count == sum(min(3, len(encode(tok, t))) for t in texts)


# --------------------------------------------------------------------------- corpus


def test_corpus_spec_and_subset(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("para one\nline two\n\n\n para two \n\n\n\npara three\n", encoding="utf-8")
    assert iter_corpus(CorpusSpec("text_file", path=str(f))) == ["para one\nline two", "para two", "para three"]
    sub = iter_corpus(CorpusSpec("text_file", path=str(f), n_samples=2))
    order = list(range(3))
    random.Random(1).shuffle(order)
    all_paras = iter_corpus(CorpusSpec("text_file", path=str(f)))
    assert sub == [all_paras[i] for i in order[:2]]
    assert CorpusSpec("hf_dataset", name="wikitext", config="wikitext-103-raw-v1").key() == \
        "hf-wikitext-wikitext-103-raw-v1-train"
    assert CorpusSpec("records", max_length=32).key() == "records-len32"
    # for a Hugging Face corpus the key is its only identity in the C0 cache: every field that
    # changes the texts changes it, and a long key stays unique when cut
    wiki = dict(kind="hf_dataset", name="wikitext", config="wikitext-103-raw-v1")
    variants = [CorpusSpec(**wiki), CorpusSpec(**wiki, group="wikitext_articles"),
                CorpusSpec(**wiki, text_field="content"), CorpusSpec(**wiki, split="validation"),
                CorpusSpec(**wiki, data_files="a.parquet"), CorpusSpec(**wiki, data_files="b.parquet"),
                CorpusSpec(**wiki, max_length=512)]
    assert len({v.key() for v in variants}) == len(variants)
    long = [CorpusSpec("hf_dataset", name="x" * 90 + c).key() for c in "ab"]
    assert long[0] != long[1] and all(len(k) <= 80 for k in long)
    assert CorpusSpec(**wiki, n_samples=10).key() == CorpusSpec(**wiki).key()  # the budget is keyed apart
    with pytest.raises(ValueError, match="kind"):
        CorpusSpec("wiki")
    with pytest.raises(ValueError, match="name"):
        CorpusSpec("hf_dataset")
    with pytest.raises(ValueError, match="records"):
        iter_corpus(CorpusSpec("records"))


def test_a_text_file_without_blank_lines_and_too_few_texts_are_warned(tmp_path: Path) -> None:
    """text_file texts are separated by blank lines: a file of one sentence per line is ONE text
    (cut at the truncation length, C0 from a few hundred tokens), which is warned, as is an
    n_samples past the texts the corpus holds."""
    f = tmp_path / "lines.txt"
    f.write_text("".join(f"sentence {i}\n" for i in range(30)), encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=r"one text of 30 lines: its texts are separated by blank lines"):
        assert len(iter_corpus(CorpusSpec("text_file", path=str(f)))) == 1
    g = tmp_path / "paras.txt"
    g.write_text("one\n\ntwo\n", encoding="utf-8")
    with pytest.warns(RuntimeWarning, match=r"n_samples 5 but the text_file corpus holds 2 texts"):
        assert iter_corpus(CorpusSpec("text_file", path=str(g), n_samples=5)) == ["one", "two"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert iter_corpus(CorpusSpec("text_file", path=str(g), n_samples=2)) == ["one", "two"]


def test_records_corpus_texts() -> None:
    records = make_world(6, seed=0)
    docs = records_corpus_texts(records)
    assert docs == records_corpus_texts(records)  # deterministic
    from editlib.tiny import fact_units
    units = fact_units(records)
    assert len(docs) == -(-len(units) // 8)
    assert all(d.endswith(".") for d in docs)
    assert sum(len(d) for d in docs) == sum(len(u) for u in units) + 2 * len(units) - len(docs)
    assert all(any(u in d for d in docs) for u in units)


def test_hf_dataset_offline_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = CorpusSpec("hf_dataset", name="editlib-tests/no-such-dataset", config="x")
    with pytest.raises(CorpusUnavailable, match="no-such-dataset") as exc:
        iter_corpus(spec)
    assert "records" in str(exc.value) and "text_file" in str(exc.value)


# --------------------------------------------------------------------------- cache


@pytest.fixture()
def world():
    return make_world(8, seed=0)


def test_layer_covariance_cache_round_trip(llama, tok, world, tmp_path, monkeypatch) -> None:
    spec = CorpusSpec("records", max_length=48)
    logs: list[str] = []
    with pytest.warns(RuntimeWarning, match="only"):
        first = layer_covariance(llama, tok, [0, 1], spec, records=world, cache_dir=tmp_path,
                                 progress=False, log=logs.append, cond=True)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == ["model.layers.0.mlp.down_proj_float64_records-len48_nall.safetensors",
                     "model.layers.1.mlp.down_proj_float64_records-len48_nall.safetensors"]
    texts = records_corpus_texts(world)
    expected, n = hand_moment(llama, tok, texts, 1, max_length=48)
    assert first[1].count == n and rel(first[1].mom2, expected) < 1e-10
    assert first[1].cond > 1 and any("cond=" in m for m in logs)

    forbid_collection(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = layer_covariance(llama, tok, [1, 0], spec, records=world, cache_dir=tmp_path,
                                  progress=False, log=logs.append)
    assert list(second) == [0, 1]
    for layer in (0, 1):
        assert torch.equal(second[layer].mom2, first[layer].mom2)
        assert second[layer].count == first[layer].count and second[layer].key == first[layer].key
        assert second[layer].cond == pytest.approx(first[layer].cond)


def test_a_token_cap_below_one_text_fails(llama, tok, world, tmp_path) -> None:
    """covariance.max_batch_tokens caps a forward's padded tokens, but a batch holds at least one
    text: a cap below the texts' max length (here the corpus's 48) would be passed by every text
    that long, so it fails before any forward, naming the key."""
    with pytest.raises(ValueError, match=r"covariance\.max_batch_tokens \(40\) is below the texts' max length \(48"):
        layer_covariance(llama, tok, [0], CorpusSpec("records", max_length=48), records=world, cache_dir=tmp_path,
                         max_batch_tokens=40, progress=False, log=lambda m: None)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_c0_from_a_tf32_forward_is_cached_apart(llama, tok, world, tmp_path, monkeypatch) -> None:
    """C0's products are IEEE whatever model.tf32 says, but a float32 model's forward on TF32
    tensor cores gives other keys (~1e-3): such an entry is keyed and named apart, an IEEE run
    never reads it nor the reverse, and IEEE keys are what they always were."""
    from editlib import stats
    spec = CorpusSpec("records", max_length=48)
    run = lambda logs: layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path,  # noqa: E731
                                        progress=False, log=logs.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ieee = run([])
        assert "forward" not in ieee[0].key
        monkeypatch.setattr(stats, "tf32_applies", lambda model: True)  # a float32 model on CUDA under TF32
        logs: list[str] = []
        tf32 = run(logs)
        assert tf32[0].key == {**ieee[0].key, "forward": "tf32"}
        assert not any("cached" in m for m in logs)  # collected, not read from the IEEE entry
        assert len(list(tmp_path.rglob("*_tf32_*.safetensors"))) == 1
        assert len(list(tmp_path.rglob("*.safetensors"))) == 2
        monkeypatch.setattr(stats, "tf32_applies", lambda model: False)
        logs = []
        assert run(logs)[0].key == ieee[0].key and any("cached" in m for m in logs)


def test_portable_and_native_c0_are_cached_apart(llama, tok, world, tmp_path, monkeypatch) -> None:
    """A C0 collected under other numerics differs in its last bits (a portable study on a native
    entry moved the sequential diagnostics by ~1e-6 relative): a portable run never reads a native
    entry or the reverse, both stay in the cache, and native keys are what they always were."""
    from editlib import numerics
    spec = CorpusSpec("records", max_length=48)
    for k in (numerics.ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR"):
        monkeypatch.delenv(k, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                  log=lambda m: None)
        assert "numerics" not in native[0].key
        monkeypatch.setenv(numerics.ENV, "portable")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        logs: list[str] = []
        portable = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                    log=logs.append)
        assert portable[0].key == {**native[0].key, "numerics": "portable-2"}
        assert not any("cached" in m for m in logs)  # collected, not read from the native entry
        assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == [
            "model.layers.0.mlp.down_proj_float64_records-len48_nall.safetensors",
            "model.layers.0.mlp.down_proj_float64_records-len48_nall_portable-2.safetensors"]

        forbid_collection(monkeypatch)
        again = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
        assert again[0].key == portable[0].key
        monkeypatch.setenv(numerics.ENV, "native")
        assert layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                log=lambda m: None)[0].key == native[0].key


def test_changed_key_recomputes(llama, tok, world, tmp_path, forwards) -> None:
    spec = CorpusSpec("records", max_length=48)
    calls = forwards
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                             log=lambda m: None)
        n_first = calls[0]
        other = make_world(8, seed=1)  # same file name, different texts ⇒ metadata mismatch
        logs: list[str] = []
        b = layer_covariance(llama, tok, [0], spec, records=other, cache_dir=tmp_path, progress=False,
                             log=logs.append)
        assert calls[0] > n_first and any("recomputing" in m for m in logs)
        assert a[0].key["texts_sha256"] != b[0].key["texts_sha256"]
        assert not torch.equal(a[0].mom2, b[0].mom2)
        assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # overwritten in place
        assert not list(tmp_path.rglob("*.tmp"))
        n_before = calls[0]
        c = layer_covariance(llama, tok, [0], CorpusSpec("records", max_length=48, n_samples=3),
                             records=other, cache_dir=tmp_path, progress=False, log=lambda m: None)
        assert calls[0] > n_before and c[0].key["n_samples"] == "3"
        assert len(list(tmp_path.rglob("*.safetensors"))) == 2


def test_another_batching_is_cached_apart(llama, tok, tmp_path, monkeypatch) -> None:
    """Each forward batch's Σkkᵀ is one product added to the sum, so another cut of the corpus
    (covariance.batch_size, max_batch_tokens) can move C0's last bits: it is collected and cached apart,
    never read from an entry cut another way; the default cut keeps its key and file name."""
    spec = CorpusSpec("records", max_length=48)
    facts = make_world(64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = layer_covariance(llama, tok, [0], spec, records=facts, cache_dir=tmp_path, progress=False,
                                   log=lambda m: None)[0]
        cut = {}
        for bs, mbt in ((4, None), (16, 64)):
            logs: list[str] = []
            cut[bs, mbt] = layer_covariance(llama, tok, [0], spec, records=facts, cache_dir=tmp_path,
                                            progress=False, log=logs.append, batch_size=bs,
                                            max_batch_tokens=mbt)[0]
            assert not any("cached" in m for m in logs)  # collected, not read from another cut's entry
    assert "batching" not in default.key
    assert cut[4, None].key == {**default.key, "batching": "b4"}
    assert cut[16, 64].key == {**default.key, "batching": "b16t64"}
    for other in cut.values():  # the same statistic, summed in another order (whether its last bits
        assert rel(other.mom2, default.mom2) < 1e-14  # move depends on the CPU's BLAS: on some they do not)
    assert sorted(p.name for p in tmp_path.rglob("*.safetensors")) == [
        "model.layers.0.mlp.down_proj_float64_records-len48_nall.safetensors",
        "model.layers.0.mlp.down_proj_float64_records-len48_nall_b16t64.safetensors",
        "model.layers.0.mlp.down_proj_float64_records-len48_nall_b4.safetensors"]

    forbid_collection(monkeypatch)
    again = layer_covariance(llama, tok, [0], spec, records=facts, cache_dir=tmp_path, progress=False,
                             log=lambda m: None, batch_size=4)[0]
    assert torch.equal(again.mom2, cut[4, None].mom2)


def test_corrupt_cache_is_recomputed(llama, tok, world, tmp_path) -> None:
    """An unreadable entry does not stop the run: it is recomputed, with a warning naming it."""
    spec = CorpusSpec("records", max_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
    (path,) = tmp_path.rglob("*.safetensors")
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.warns(RuntimeWarning, match=f"{path}.*unreadable or corrupt.*recomputing"):
        again = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
    assert torch.equal(again[0].mom2, first[0].mom2)
    with pytest.raises(CovCacheError, match=path.name):  # the reader itself still names the file
        path.write_bytes(b"\x00garbage" * 10)
        stats._read_cache(path)


def test_no_pickle_and_metadata(llama, tok, world, tmp_path) -> None:
    from safetensors import safe_open

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer_covariance(llama, tok, [1], CorpusSpec("records", max_length=48), records=world,
                               cache_dir=tmp_path, dtype="float32", progress=False, log=lambda m: None)
    (path,) = tmp_path.rglob("*.safetensors")
    assert path.parent.name == out[1].key["fingerprint"]
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"mom2_sum", "count"}
        assert json.loads(f.metadata()["key"]) == out[1].key
        assert f.get_tensor("mom2_sum").dtype == torch.float32
    assert out[1].mom2.dtype == F64 and out[1].key["dtype"] == "float32"


def test_low_token_warning(llama, tok, world, tmp_path) -> None:
    with pytest.warns(RuntimeWarning, match=r"100·d_in = 6400"):
        layer_covariance(llama, tok, [0], CorpusSpec("records", n_samples=2), records=world,
                         cache_dir=tmp_path, progress=False, log=lambda m: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("block", [None, 24])  # 24: the block-triangular accumulation (strided addmm_ on the device)
def test_cuda_matches_cpu(tok, block, monkeypatch) -> None:
    """C0 on CUDA equals C0 on the CPU for a float64 model. transformers' LlamaRMSNorm (and its
    rotary cos/sin) compute in float32 even in a float64 model, and CPU and CUDA round those float32
    operations differently: 1.3e-7 relative on an H200. Both run in float64 here, so what is
    compared is editlib's accumulation (4e-16 on the H200)."""
    import transformers.models.llama.modeling_llama as ml

    def norm64(self, h):
        h64 = h.to(torch.float64)
        return self.weight * (h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(h.dtype)

    def rotary64(self, x, position_ids):
        inv = self.inv_freq.double()[None, :, None].expand(position_ids.shape[0], -1, 1)
        emb = (inv @ position_ids[:, None, :].double()).transpose(1, 2)
        emb = torch.cat((emb, emb), -1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(ml.LlamaRMSNorm, "forward", norm64)
    monkeypatch.setattr(ml.LlamaRotaryEmbedding, "forward", rotary64)
    model = tiny_llama(seed=0).double().eval()
    texts = texts_of(10, seed=5)
    cpu = collect_second_moments(model, tok, texts, [0, 1], progress=False)
    if block:
        monkeypatch.setattr(stats, "GRAM_BLOCK", block)
    gpu = collect_second_moments(model.to("cuda"), tok, texts, [0, 1], progress=False)
    for layer in (0, 1):
        assert gpu[layer][0].device.type == "cpu" and gpu[layer][1] == cpu[layer][1]
        assert rel(gpu[layer][0], cpu[layer][0]) < 1e-12


# --------------------------------------------------------------------------- paper-scale behaviour


def test_passes_sized_by_memory_give_the_same_statistic(llama, tok, world, tmp_path, forwards,
                                                        monkeypatch) -> None:
    """Layers collected one per pass (a memory budget of one accumulator) equal one joint pass, and
    the corpus is tokenised once, not once per pass."""
    spec = CorpusSpec("records", max_length=48)
    logs: list[str] = []
    encoded: list[str] = []
    real_encode = stats.encode
    monkeypatch.setattr(stats, "encode", lambda t, text, **k: encoded.append(text) or real_encode(t, text, **k))
    n_texts = len(iter_corpus(spec, world))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = layer_covariance(llama, tok, [0, 1], spec, records=world, cache_dir=tmp_path / "a",
                                 progress=False, log=logs.append, max_layers_per_pass=1)
        passes_split = forwards[0]
        assert len(encoded) == n_texts  # two passes, one tokenisation
        joint = layer_covariance(llama, tok, [0, 1], spec, records=world, cache_dir=tmp_path / "b",
                                 progress=False, log=lambda m: None, max_layers_per_pass=2)
    assert any("in 2 pass(es) of ≤ 1 layer(s)" in m for m in logs)
    assert passes_split % 2 == 0 and forwards[0] - passes_split == passes_split // 2  # 2 passes vs 1
    for l in (0, 1):
        assert torch.equal(split[l].mom2, joint[l].mom2) and split[l].count == joint[l].count


def test_layers_per_pass_from_free_memory(monkeypatch) -> None:
    monkeypatch.setattr(stats, "free_bytes", lambda device: 100 * 14336 * 14336 * 8)
    assert stats.layers_per_pass(14336, torch.device("cpu")) == 50  # half the free memory
    monkeypatch.setattr(stats, "free_bytes", lambda device: 10)
    assert stats.layers_per_pass(14336, torch.device("cpu")) == 1  # never 0
    assert stats.layers_per_pass(14336, torch.device("cpu"), override=3) == 3
    with pytest.raises(ValueError, match="layers_per_pass"):
        stats.layers_per_pass(14336, torch.device("cpu"), override=0)


def test_load_false_caches_without_keeping(llama, tok, world, tmp_path, monkeypatch) -> None:
    spec = CorpusSpec("records", max_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert layer_covariance(llama, tok, [0, 1], spec, records=world, cache_dir=tmp_path,
                                progress=False, log=lambda m: None, load=False) == {}
        monkeypatch.setattr(stats, "collect_second_moments",
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("recollected")))
        assert layer_covariance(llama, tok, [0, 1], spec, records=world, cache_dir=tmp_path,
                                progress=False, log=lambda m: None, load=False) == {}
        got = layer_covariance(llama, tok, [1], spec, records=world, cache_dir=tmp_path,
                               progress=False, log=lambda m: None)
    assert list(got) == [1] and got[1].count > 0


def test_given_fingerprint_keys_the_cache(llama, tok, world, tmp_path, monkeypatch) -> None:
    """A caller-given fingerprint (the unedited model's) finds the statistics even after the
    weights changed (a resumed sequential run)."""
    spec = CorpusSpec("records", max_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                         log=lambda m: None, fingerprint="base-fp")
        w = arch.edit_weight(llama, 0)
        saved = w.detach().clone()
        monkeypatch.setattr(stats, "collect_second_moments",
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("recollected")))
        try:
            with torch.no_grad():
                w.add_(1.0)  # an "edited" model
            layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path,
                             progress=False, log=lambda m: None, fingerprint="base-fp")
        finally:
            with torch.no_grad():
                w.copy_(saved)
    assert (tmp_path / "base-fp").is_dir()


WIKITEXT = [" \n", " = Alpha = \n", " \n", " Alpha is a letter . \n", " = = History = = \n",
            " It is old . \n", " = Beta = \n", " Beta follows alpha . \n", " \n"]


def test_wikitext_lines_regrouped_into_articles() -> None:
    arts = stats.group_wikitext_articles(WIKITEXT)
    assert len(arts) == 3 and arts[0] == " \n"  # the leading blank line stands alone (dropped later)
    assert arts[1].startswith(" = Alpha = ") and "History" in arts[1] and "It is old" in arts[1]
    assert arts[2].startswith(" = Beta = ") and "Beta follows" in arts[2]


def test_local_parquet_corpus_articles_and_empty_texts(tmp_path) -> None:
    """The paper-scale corpus path (datasets + a parquet dump) on a small local file: empty texts
    dropped, the fixed Random(1) subset over articles, and wikitext regrouping."""
    pd = pytest.importorskip("pandas")
    rows = [f"article {i} " + "word " * i if i % 3 else "" for i in range(30)]
    f = tmp_path / "wiki.parquet"
    pd.DataFrame({"text": rows}).to_parquet(f)
    spec = CorpusSpec("hf_dataset", name="parquet", data_files=str(f))
    texts = iter_corpus(spec)
    assert texts == [r for r in rows if r]  # all rows in order, empties dropped
    sub = iter_corpus(CorpusSpec("hf_dataset", name="parquet", data_files=str(f), n_samples=12))
    order = list(range(30))
    random.Random(1).shuffle(order)
    assert sub == [rows[i] for i in order[:12] if rows[i]]
    g = tmp_path / "wikitext.parquet"
    pd.DataFrame({"text": WIKITEXT}).to_parquet(g)
    arts = iter_corpus(CorpusSpec("hf_dataset", name="parquet", data_files=str(g), group="wikitext_articles"))
    assert len(arts) == 2 and arts[0].startswith(" = Alpha = ")
    assert spec.key() != CorpusSpec("hf_dataset", name="parquet", data_files=str(g)).key()


def test_default_max_length_is_the_models_positions(llama) -> None:
    class Cfg:
        max_position_embeddings = 8192

    class M:
        config = Cfg()

    assert stats.default_max_length(M()) == 8192  # Llama-3: the reference truncates at 8192


# --------------------------------------------------------------------------- cache checksum (#12)


def _data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _cached_once(llama, tok, world, tmp_path):
    spec = CorpusSpec("records", max_length=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                               log=lambda m: None)
    (path,) = tmp_path.rglob("*.safetensors")
    return spec, out, path


def test_cache_entry_carries_a_checksum(llama, tok, world, tmp_path) -> None:
    import hashlib

    from safetensors import safe_open

    _, out, path = _cached_once(llama, tok, world, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta, total = f.metadata(), f.get_tensor("mom2_sum")
    h = hashlib.sha256(total.numpy().tobytes())
    h.update(str(out[0].count).encode())
    assert meta["sha256"] == h.hexdigest()


def test_flipped_bytes_fail_the_checksum_and_are_recomputed(llama, tok, world, tmp_path, forwards) -> None:
    """Random bytes inside the tensor data (header intact) fail the entry's sha256 and it is
    recomputed (instead of surfacing later as "C0 contains NaN/Inf" without the file's name)."""
    spec, first, path = _cached_once(llama, tok, world, tmp_path)
    data = bytearray(path.read_bytes())
    at = _data_offset(path) + 64
    data[at:at + 16] = bytes(random.Random(0).randrange(256) for _ in range(16))
    path.write_bytes(bytes(data))
    n_before = forwards[0]
    with pytest.warns(RuntimeWarning, match=f"{path}.*fails its sha256 check.*recomputing"):
        again = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
    assert forwards[0] > n_before  # collected again
    assert torch.equal(again[0].mom2, first[0].mom2) and again[0].count == first[0].count
    stats._read_cache(path)  # the rewritten entry passes its check
    n_before = forwards[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                         log=lambda m: None)
    assert forwards[0] == n_before and not [w for w in seen if "cache" in str(w.message)]


def test_unreadable_entry_recomputed_when_only_ensuring(llama, tok, world, tmp_path, forwards) -> None:
    spec, _, path = _cached_once(llama, tok, world, tmp_path)
    path.write_bytes(b"\xff" * 7)
    n_before = forwards[0]
    with pytest.warns(RuntimeWarning, match=f"{path}.*recomputing"):
        assert layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                log=lambda m: None, load=False) == {}
    assert forwards[0] > n_before
    stats._read_cache(path)


def _rewrite_without_checksum(path: Path, mutate=None) -> None:
    """An entry as written before checksums existed (optionally with its sum changed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if mutate:
        mutate(tensors["mom2_sum"])
    save_file(tensors, str(path), metadata=meta)


def test_entry_without_checksum_accepted_when_finite(llama, tok, world, tmp_path, monkeypatch) -> None:
    spec, first, path = _cached_once(llama, tok, world, tmp_path)
    _rewrite_without_checksum(path)
    monkeypatch.setattr(stats, "collect_second_moments",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("recollected")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
    assert torch.equal(again[0].mom2, first[0].mom2)


def test_entry_without_checksum_holding_nan_is_recomputed(llama, tok, world, tmp_path) -> None:
    spec, first, path = _cached_once(llama, tok, world, tmp_path)
    _rewrite_without_checksum(path, lambda t: t.view(-1).__setitem__(5, float("nan")))
    with pytest.warns(RuntimeWarning, match=f"{path}.*NaN/Inf.*recomputing"):
        again = layer_covariance(llama, tok, [0], spec, records=world, cache_dir=tmp_path, progress=False,
                                 log=lambda m: None)
    assert torch.equal(again[0].mom2, first[0].mom2)


def test_cache_file_honours_the_umask(llama, tok, world, tmp_path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        _, _, path = _cached_once(llama, tok, world, tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- fast_gram (16-bit models)


@pytest.mark.parametrize("d, block", [(40, 64), (50, 16)])
def test_float32_products_of_16bit_inputs_into_a_float64_sum(d, block, monkeypatch) -> None:
    """add_gram with float32 features of bfloat16 / float16 numbers into a float64 accumulator: the
    products are exact, so the only error is each batch's float32 sum, far below a float32
    accumulator over all batches (the reference's); with one column block or several."""
    monkeypatch.setattr(stats, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(d)
    for half in (torch.bfloat16, torch.float16):
        batches = [(torch.randn(n, d, generator=g) * 3).to(half) for n in (30, 50, 20)] * 100
        exact, fast, f32 = torch.zeros(d, d, dtype=F64), torch.zeros(d, d, dtype=F64), torch.zeros(d, d)
        for x in batches:
            stats.add_gram(exact, x.double())
            stats.add_gram(fast, x.float())
            stats.add_gram(f32, x.float())
        exact, fast, f32 = (stats.symmetrize_upper(a) for a in (exact, fast, f32))
        assert fast.dtype == F64 and torch.equal(fast, fast.T)
        assert 0 < rel(fast, exact) < 1e-6
        assert rel(fast, exact) < 0.5 * rel(f32.double(), exact)


def test_fast_gram_products_in_token_chunks() -> None:
    """fast_gram's float32 products of 16-bit keys, taken a chunk of tokens at a time (as on CUDA,
    where tensor cores truncate their float32 sums), give the float64 Gram to float32 rounding;
    on the CPU a batch is one product, bit for bit what one GEMM gives."""
    g = torch.Generator().manual_seed(3)
    k16 = torch.randn(1000, 40, generator=g).to(torch.bfloat16)
    exact = torch.zeros(40, 40, dtype=F64)
    stats.add_gram(exact, k16.double())
    one, chunked = torch.zeros(40, 40, dtype=F64), torch.zeros(40, 40, dtype=F64)
    stats.add_gram(one, k16.float())
    stats.add_gram(chunked, k16.float(), chunk_tokens=64)
    assert torch.equal(one, (k16.float().T @ k16.float()).double())  # d ≤ GRAM_BLOCK: one full GEMM
    assert rel(chunked, exact) < 1e-6 and rel(one, exact) < 1e-6 and not torch.equal(chunked, one)
    assert stats.gram_chunk(k16) == 1000 and stats.gram_chunk(k16[:0]) == 1
    with pytest.raises(ValueError, match="chunk_tokens"):
        stats.add_gram(one, k16.float(), chunk_tokens=0)


def test_a_float32_accumulator_is_chunked_too() -> None:
    """fast_gram with ``covariance.dtype: float32``: the features and the sum are both float32, and
    the batch is still taken in chunks of tokens (it used to be one product, the tensor cores'
    truncation bias of a whole 24,576-token batch); float32 features on CUDA are chunked, float64
    ones and the CPU's are one product."""
    import types

    k = torch.randn(1000, 40, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).float()
    got = torch.zeros(40, 40)
    stats.add_gram(got, k, chunk_tokens=64)
    expect = k[:64].T @ k[:64]
    for t in range(64, 1000, 64):
        expect.addmm_(k[t:t + 64].T, k[t:t + 64])
    assert torch.equal(got, torch.zeros(40, 40) + expect)
    whole = torch.zeros(40, 40)
    stats.add_gram(whole, k)  # the CPU: one product, straight into the sum
    assert torch.equal(whole, torch.zeros(40, 40).addmm_(k.T, k)) and not torch.equal(whole, got)

    def on_cuda(dtype):
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(24576, 4096))
    assert stats.gram_chunk(on_cuda(torch.float32)) == stats.TC_CHUNK_TOKENS
    assert stats.gram_chunk(on_cuda(torch.float64)) == 24576


def _mm16_on_the_cpu(monkeypatch) -> None:
    """stats._mm16 (``torch.mm(..., out_dtype=float32)``, CUDA only) stood in for by the float32
    product of the 16-bit matrices: the same exact products, float32 sums."""
    monkeypatch.setattr(stats, "_mm16", lambda a, b: a.float() @ b.float())


@pytest.mark.parametrize("d, block", [(40, 64), (50, 16)])
def test_16bit_products_are_the_float32_products_of_16bit_keys(d, block, monkeypatch) -> None:
    """add_gram of 16-bit features takes their float32 products (16-bit tensor cores on CUDA,
    stood in for here): one product per block and batch, bit for bit the float32 features' update;
    in chunks of tokens, each chunk's product added in float32; with one column block or several."""
    _mm16_on_the_cpu(monkeypatch)
    monkeypatch.setattr(stats, "GRAM_BLOCK", block)
    k16 = (torch.randn(300, d, generator=torch.Generator().manual_seed(d)) * 3).to(torch.bfloat16)
    exact, half, f32 = (torch.zeros(d, d, dtype=F64) for _ in range(3))
    stats.add_gram(exact, k16.double())
    stats.add_gram(half, k16)
    stats.add_gram(f32, k16.float())
    assert torch.equal(half, f32) and 0 < rel(half, exact) < 1e-6
    chunked = torch.zeros(d, d, dtype=F64)
    stats.add_gram(chunked, k16, chunk_tokens=64)
    want = torch.zeros(d, d, dtype=F64)
    for lo, hi in zip(stats._gram_edges(d)[:-1], stats._gram_edges(d)[1:]):
        part = k16[:64, lo:hi].float().T @ k16[:64, lo:].float()
        for t in range(64, 300, 64):
            part += k16[t:t + 64, lo:hi].float().T @ k16[t:t + 64, lo:].float()
        want[lo:hi, lo:] += part
    assert torch.equal(chunked, want) and rel(chunked, exact) < 1e-6


def test_layer_covariance_on_16bit_tensor_cores(tok, world, tmp_path, monkeypatch) -> None:
    """Where torch takes 16-bit products with a float32 result (stats.products_16bit, stood in
    for), fast_gram's C0 keeps the 16-bit keys and is cached as such (key gram "16bit", its own
    file); its C0 is the float32 products' to the bit here (the same products and sums)."""
    spec = CorpusSpec("records", max_length=48)
    model16 = tiny_llama(seed=0).to(torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tf32 = layer_covariance(model16, tok, [1], spec, records=world, cache_dir=tmp_path,
                                progress=False, log=lambda m: None, fast_gram=True)
        _mm16_on_the_cpu(monkeypatch)
        monkeypatch.setattr(stats, "products_16bit", lambda device, dtype: dtype == torch.bfloat16)
        seen, real = [], stats.add_gram
        monkeypatch.setattr(stats, "add_gram", lambda acc, feats: (seen.append(feats.dtype), real(acc, feats)))
        logs: list[str] = []
        half = layer_covariance(model16, tok, [1], spec, records=world, cache_dir=tmp_path,
                                progress=False, log=logs.append, fast_gram=True)
    assert set(seen) == {torch.bfloat16} and any("16-bit tensor cores" in m for m in logs)
    assert half[1].key["gram"] == "16bit" and tf32[1].key["gram"] == "float32"
    assert torch.equal(half[1].mom2, tf32[1].mom2) and half[1].count == tf32[1].count
    names = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(names) == 2 and sum("_gram16_" in n for n in names) == 1


def test_16bit_products_are_probed_on_add_grams_layouts(monkeypatch) -> None:
    """stats._mm16 itself takes add_gram's layouts (a transposed column block times a column slice)
    of bfloat16 and float16 keys to a float32 result (checked on meta tensors: the CPU has no such
    kernel); products_16bit probes each device and dtype once on those layouts, never on the CPU or
    for float32 keys, and says no where the product fails (a torch without it, a dtype it refuses)."""
    for dtype in stats.EXACT_IN_TF32:
        assert stats._takes_16bit_products(torch.device("meta"), dtype)
    assert not stats.products_16bit("cpu") and not stats.products_16bit("cpu", torch.float16)
    assert not stats._takes_16bit_products(torch.device("cpu"), torch.bfloat16)  # no CPU kernel
    monkeypatch.setattr(stats, "_MM16", {})
    probes = []

    def probe(device, dtype):
        probes.append((device, dtype))
        return dtype == torch.bfloat16
    monkeypatch.setattr(stats, "_takes_16bit_products", probe)
    got = [stats.products_16bit("cuda:0", d) for d in (torch.bfloat16, torch.float16, torch.bfloat16, torch.float32)]
    assert got == [True, False, True, False]
    assert probes == [(torch.device("cuda:0"), torch.bfloat16), (torch.device("cuda:0"), torch.float16)]
    import types
    on_cuda = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(24576, 4096))
    assert stats.gram_chunk(on_cuda) == stats.TC_CHUNK_TOKENS


def test_fast_gram_applies_to_16bit_activations_only() -> None:
    assert stats.fast_gram_applies(True, torch.bfloat16) and stats.fast_gram_applies(True, torch.float16)
    assert not stats.fast_gram_applies(True, torch.float32)
    assert not stats.fast_gram_applies(False, torch.bfloat16)


def test_layer_covariance_fast_gram(tok, world, tmp_path) -> None:
    """A bfloat16 model's C0 with fast_gram equals the float64-product C0 to 1e-6 and is cached
    apart from it (its own file and key); a float32 model ignores the option (same file, same
    bits)."""
    spec = CorpusSpec("records", max_length=48)
    model16 = tiny_llama(seed=0).to(torch.bfloat16).eval()
    logs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = layer_covariance(model16, tok, [0, 1], spec, records=world, cache_dir=tmp_path / "a",
                                 progress=False, log=lambda m: None)
        fast = layer_covariance(model16, tok, [0, 1], spec, records=world, cache_dir=tmp_path / "a",
                                progress=False, log=logs.append, fast_gram=True)
    assert any("covariance.fast_gram" in m for m in logs)
    for l in (0, 1):
        assert fast[l].count == plain[l].count and fast[l].key["gram"] == "float32"
        assert "gram" not in plain[l].key
        assert 0 < rel(fast[l].mom2, plain[l].mom2) < 1e-6
    names = sorted(p.name for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(names) == 4 and sum("_gram32_" in n for n in names) == 2
    model32 = tiny_llama(seed=0).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = layer_covariance(model32, tok, [1], spec, records=world, cache_dir=tmp_path / "b",
                             progress=False, log=lambda m: None)
        b = layer_covariance(model32, tok, [1], spec, records=world, cache_dir=tmp_path / "c",
                             progress=False, log=lambda m: None, fast_gram=True)
    assert torch.equal(a[1].mom2, b[1].mom2) and a[1].key == b[1].key
    assert [p.name for p in (tmp_path / "c").rglob("*.safetensors")] == \
        [p.name for p in (tmp_path / "b").rglob("*.safetensors")]
    with pytest.raises(ValueError, match="16-bit activations"):
        collect_second_moments(model32, tok, texts_of(2), [0], progress=False, gram32=True)


def _fast_gram_on_cuda(tok, monkeypatch, half: bool) -> None:
    """fast_gram's C0 of a bfloat16 model on CUDA against float64 products (1e-6), its products
    taken on 16-bit tensor cores (``half``: the bfloat16 keys reach add_gram) or on TF32 ones (float32
    keys, the switch on inside the Gram and restored after); and one paper-size batch of 24,576
    tokens the same way (1e-5: the tensor cores' float32 sums in chunks of TC_CHUNK_TOKENS)."""
    model = tiny_llama(seed=0).to(torch.bfloat16).eval().to("cuda")
    texts = texts_of(40, seed=6)
    before = matmul_tf32()
    seen, real = [], stats.add_gram

    def spy(acc, feats):
        seen.append((feats.dtype, matmul_tf32()))
        real(acc, feats)

    exact = collect_second_moments(model, tok, texts, [0, 1], progress=False)
    monkeypatch.setattr(stats, "add_gram", spy)
    fast = collect_second_moments(model, tok, texts, [0, 1], progress=False, gram32=True)
    assert seen and {d for d, _ in seen} == {torch.bfloat16 if half else torch.float32}
    assert half or {t for _, t in seen} == {True}
    assert matmul_tf32() == before
    for layer in (0, 1):
        assert fast[layer][1] == exact[layer][1] and fast[layer][0].dtype == F64
        assert rel(fast[layer][0], exact[layer][0]) < 1e-6
    g = torch.Generator(device="cuda").manual_seed(0)
    k16 = torch.randn(24576, 3000, generator=g, device="cuda").to(torch.bfloat16)
    ref, got = (torch.zeros(3000, 3000, dtype=F64, device="cuda") for _ in range(2))
    real(ref, k16.double())
    if half:
        real(got, k16)
    else:
        with tf32_matmuls(torch.device("cuda")):
            real(got, k16.float())
    assert rel(stats.symmetrize_upper(got), stats.symmetrize_upper(ref)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_gram_on_tf32_matches_float64_products(tok, monkeypatch) -> None:
    """On CUDA without 16-bit products (a torch whose torch.mm has no out_dtype: stood in for),
    fast_gram's float32 products run on TF32 tensor cores: exact for bfloat16 inputs, so the sum
    agrees with the float64 products to the tensor cores' float32 accumulation."""
    monkeypatch.setattr(stats, "products_16bit", lambda device, dtype: False)
    _fast_gram_on_cuda(tok, monkeypatch, half=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fast_gram_on_16bit_tensor_cores_matches_float64_products(tok, monkeypatch) -> None:
    """On CUDA (torch.mm with a float32 result of 16-bit matrices), fast_gram keeps the bfloat16
    keys and takes their products on 16-bit tensor cores: exact products, summed in float32, so the
    sum agrees with the float64 products as the TF32 path's does."""
    assert stats.products_16bit("cuda")
    _fast_gram_on_cuda(tok, monkeypatch, half=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_c0_products_ignore_model_tf32(tok, monkeypatch) -> None:
    """``model.tf32: true`` rounds the model's float32 products, never C0's: a float32 model's
    Gram (float64 or float32 ``covariance.dtype``) is taken with TF32 off, the switch restored
    after; only fast_gram's exact 16-bit products use tensor cores."""
    from editlib.tf32 import set_tf32

    model = tiny_llama(seed=0).eval().to("cuda")
    texts = texts_of(20, seed=7)
    seen, real = [], stats.add_gram

    def spy(acc, feats):
        seen.append(matmul_tf32())
        real(acc, feats)

    exact = collect_second_moments(model, tok, texts, [0], progress=False)
    monkeypatch.setattr(stats, "add_gram", spy)
    set_tf32(True)
    try:
        for dtype in (F64, torch.float32):
            got = collect_second_moments(model, tok, texts, [0], progress=False, dtype=dtype)
            assert rel(got[0][0].double(), exact[0][0]) < (1e-12 if dtype == F64 else 1e-5)
        assert seen and not any(seen) and matmul_tf32()
    finally:
        set_tf32(False)


def test_a_pass_brings_its_layers_to_the_host_one_at_a_time(llama, monkeypatch, tmp_path) -> None:
    """A pass over many layers keeps its sums on the device and brings them to the host one at a
    time, each written (and released) before the next is copied: 32 Llama-3-8B layers at once
    would be 53 GB of host memory."""
    events = []

    class OnDevice:  # a device-resident sum: its copy to the host is an event
        def __init__(self, layer: int, t: torch.Tensor):
            self.layer, self.t = layer, t

        def cpu(self):
            events.append(("to host", self.layer))
            return self.t.clone()

    def fake_collect(model, tok, texts, layers, **kw):
        assert kw["on_device"] is True
        return {l: (OnDevice(l, torch.eye(4, dtype=torch.float64) * (l + 1)), 10) for l in layers}

    monkeypatch.setattr(stats, "collect_second_moments", fake_collect)
    monkeypatch.setattr(stats, "_write_cache", lambda path, key, total, count, c: events.append(("written", path)))
    missing = {l: ({"layer": l}, tmp_path / f"l{l}") for l in (0, 1)}
    stats._collect_into_cache(llama, None, ["x"], missing, {}, None, log=lambda *_: None, load=False, cond=False,
                              device=torch.device("cpu"), dtype="float64", batch_size=1, max_length=8,
                              max_batch_tokens=None, progress=False, max_layers_per_pass=2)
    assert events == [e for l in (0, 1) for e in (("to host", l), ("written", tmp_path / f"l{l}"))]


def test_free_cuda_memory_counts_what_the_allocator_holds_unused(monkeypatch) -> None:
    """C0 passes are sized from free device memory; blocks torch's allocator keeps cached after an
    earlier model (the second model of Figure 6 opens in the kernel the first one ran in) are free
    for the accumulators, though ``mem_get_info`` reports them as used."""
    gb = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gb, 80 * gb))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gb)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gb)
    assert stats.free_bytes(torch.device("cuda")) == 50 * gb
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 60 * gb)
    assert stats.free_bytes(torch.device("cuda")) == 10 * gb


def test_a_blockwise_sum_is_stored_as_its_upper_triangle(tmp_path, monkeypatch) -> None:
    """Above GRAM_BLOCK inputs C0's sum is exactly symmetric (symmetrize_upper), so the cache stores
    its upper triangle only: about half the bytes (0.82 instead of 1.64 GB per Llama-3-8B layer),
    read back bit for bit, its checksum over the stored triangle; a sum that is not exactly
    symmetric, and every sum at or below GRAM_BLOCK (the miniatures), is stored whole as before."""
    monkeypatch.setattr(stats, "GRAM_BLOCK", 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 150, generator=g, dtype=torch.float64)
    acc = torch.zeros(150, 150, dtype=torch.float64)
    stats.add_gram(acc, x)
    total = stats.symmetrize_upper(acc)
    packed, whole = tmp_path / "p.safetensors", tmp_path / "w.safetensors"
    stats._write_cache(packed, {"k": 1}, total, 300, 2.5)
    key, back, count, cond = stats._read_cache(packed)
    assert torch.equal(back, total) and (key, count, cond) == ({"k": 1}, 300, 2.5)
    lopsided = total.clone()
    lopsided[0, 1] += 1e-9  # not exactly symmetric: stored whole
    stats._write_cache(whole, {"k": 1}, lopsided, 300, 2.5)
    assert torch.equal(stats._read_cache(whole)[1], lopsided)
    assert packed.stat().st_size < 0.51 * whole.stat().st_size
    data = bytearray(packed.read_bytes())
    at = _data_offset(packed) + 64
    data[at:at + 8] = bytes(8)
    packed.write_bytes(bytes(data))
    with pytest.raises(stats.CovCacheError, match="fails its sha256 check"):
        stats._read_cache(packed)
    monkeypatch.setattr(stats, "GRAM_BLOCK", 2048)
    small = tmp_path / "s.safetensors"
    stats._write_cache(small, {"k": 1}, total, 300, 2.5)
    from safetensors import safe_open
    with safe_open(str(small), framework="pt") as f:
        assert set(f.keys()) == {"mom2_sum", "count"}


def test_the_offline_corpus_check_counts_only_c0_of_this_runs_numerics(tmp_path, monkeypatch) -> None:
    """A C0 already cached spares reading its corpus, but only one layer_covariance would read:
    under portable numerics on the CPU a native entry does not count, and the reverse."""
    from editlib import numerics, protocols
    from editlib.params import CovParams
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    for k in (numerics.ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR"):
        monkeypatch.delenv(k, raising=False)
    cp = CovParams(kind="text_file", path=str(tmp_path / "gone.txt"))
    key = protocols.corpus_spec(cp).key()
    folder = tmp_path / "stats" / "fp"
    folder.mkdir(parents=True)
    assert not protocols._c0_cached(cp)
    (folder / f"model.layers.0.mlp.down_proj_float64_{key}_nall_portable-2.safetensors").write_bytes(b"")
    assert not protocols._c0_cached(cp)  # native: a portable entry is not read
    monkeypatch.setenv(numerics.ENV, "portable")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert protocols._c0_cached(cp) and not protocols._c0_cached(cp, "cuda")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert not protocols._c0_cached(cp)
    (folder / f"model.layers.0.mlp.down_proj_float64_{key}_n100_b64t24576.safetensors").write_bytes(b"")
    assert protocols._c0_cached(cp, "cuda") and not protocols._c0_cached(cp)  # any cut of the corpus counts


def test_an_offline_hub_corpus_is_not_needed_once_its_c0_is_cached(tmp_path, monkeypatch) -> None:
    """Offline, the preflight asks the datasets cache for a Hugging Face C0 corpus, unless a C0 of
    that corpus is in editlib's stats cache: then the corpus is never read and nothing is asked."""
    import types

    import datasets

    from editlib import numerics, protocols
    from editlib.params import CovParams, ParamsError
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k in (numerics.ENV, "ATEN_CPU_CAPABILITY", "MKL_CBWR"):
        monkeypatch.delenv(k, raising=False)
    asked: list[str] = []

    def builder(name, *a, **k):
        asked.append(name)
        raise FileNotFoundError(name)

    monkeypatch.setattr(datasets, "load_dataset_builder", builder)
    cp = CovParams(kind="hf_dataset", name="wikimedia/wikipedia", config="20231101.en", n_samples=100)
    study = types.SimpleNamespace(covariance=cp, model=types.SimpleNamespace(device="cpu"))
    with pytest.raises(ParamsError, match="'wikimedia/wikipedia'.*not available offline"):
        protocols._check_corpus_offline(study)
    assert asked == ["wikimedia/wikipedia"]
    folder = tmp_path / "stats" / "fp"
    folder.mkdir(parents=True)
    key = protocols.corpus_spec(cp).key()
    (folder / f"model.layers.4.mlp.down_proj_float32_{key}_n100_b64t24576.safetensors").write_bytes(b"")
    protocols._check_corpus_offline(study)
    assert asked == ["wikimedia/wikipedia"]  # not asked again


def test_passes_put_the_short_remainder_first(llama, tmp_path, monkeypatch) -> None:
    """A pass runs the model up to its deepest layer, so the few layers left over go in the first,
    shallowest pass: 32 layers at 15 per pass run 2+17+32 blocks per token, not 15+30+32."""
    assert stats.pass_groups(list(range(32)), 15) == [[0, 1], list(range(2, 17)), list(range(17, 32))]
    assert stats.pass_groups(list(range(32)), 32) == [list(range(32))]
    assert stats.pass_groups(list(range(32)), 40) == [list(range(32))]
    assert stats.pass_groups([3, 5, 7], 1) == [[3], [5], [7]]
    assert stats.pass_groups([], 4) == []
    with pytest.raises(ValueError, match="per pass"):
        stats.pass_groups([0], 0)
    recorded: list[list[int]] = []

    def fake_collect(model, tok, texts, layers, **kw):
        recorded.append(list(layers))
        return {l: (torch.eye(4, dtype=torch.float64), 10) for l in layers}

    monkeypatch.setattr(stats, "collect_second_moments", fake_collect)
    monkeypatch.setattr(stats, "_write_cache", lambda *a: None)
    monkeypatch.setattr(stats.arch, "key_dim", lambda model, layer: 4)  # five layers of a deeper model
    monkeypatch.setattr(stats, "encode_corpus", lambda *a: None)
    missing = {l: ({"layer": l}, tmp_path / f"l{l}") for l in range(5)}
    stats._collect_into_cache(llama, None, ["x"], missing, {}, None, log=lambda *_: None, load=False, cond=False,
                              device=torch.device("cpu"), dtype="float64", batch_size=1, max_length=8,
                              max_batch_tokens=None, progress=False, max_layers_per_pass=2)
    assert recorded == [[0], [1, 2], [3, 4]]
