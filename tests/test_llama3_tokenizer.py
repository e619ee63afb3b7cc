"""The real Llama-3 tokenizer built offline from ``llama-models`` (editlib.llama3_tokenizer), and
editlib's tokenisation conventions (editlib.tokens, editlib.scoring) on it.

Yardstick: Meta's own ``llama_models.llama3.tokenizer.Tokenizer`` (tiktoken), never our pattern
or special-token list. The package is a dev dependency, so a missing package fails here (it does
not skip). CounterFact comes from ``EDITLIB_COUNTERFACT`` or ``../shared``; without it the tests
that need it skip, except under CI, where they fail.
"""
from __future__ import annotations

import copy
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from _fixtures import counterfact_subset, one_thread  # noqa: F401  (one_thread: autouse, module scope)

import editlib.llama3_tokenizer as l3
from editlib.counterfact import load_counterfact
from editlib.models import load_model
from editlib.records import Record
from editlib.scoring import score_targets
from editlib.tokens import bos_offset, encode, filled_ids, prepare_tokenizer, target_ids, with_space

BOS_ID, EOS_ID = 128_000, 128_001
#: sha256 of the 10,459-record CounterFact subset's JSON (../shared/data/counterfact), uncompressed
SUBSET_SHA256 = "2b0adfb888cb45cce6ec278289fd78c099c6a85c323ba9da4a3cdb0c3e0ec4c8"
N_RECORDS = 2_000  # records whose strings are compared (≥ 1,000 asked for)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """An empty editlib cache for this module (so the first build really converts)."""
    path = tmp_path_factory.mktemp("editlib-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDITLIB_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tok(cache: Path):
    return prepare_tokenizer(l3.build_llama3_tokenizer())


@pytest.fixture(scope="module")
def ref():
    """Meta's tiktoken Tokenizer from the package itself."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(l3.llama3_tokenizer_file())


@pytest.fixture(scope="module")
def records() -> list[Record]:
    recs = load_counterfact(counterfact_subset())[:N_RECORDS]
    assert len(recs) >= 1_000
    return recs


def tricky_strings(n: int = 3_000, seed: int = 0) -> list[str]:
    """Seeded random strings: unicode letters/marks/emoji, digit runs, whitespace runs, contractions,
    leading spaces; plus hand-picked edge cases."""
    pieces = ["a", "Z", "Paris", "é", "ß", "Ω", "дом", "中", "日本語", "한국", "ع", "😀", "👍🏽", "e\u0301",
              "0", "7", "12", "123", "4567", "1,000", "3.14", " ", "  ", "     ", "\t", "\n", "\n\n",
              "\r\n", "\u00a0", "\u3000", ".", ",", "'s", "'T", "'ll", "'re", "-", "—", "(", ")", "\"",
              "$", "%", "...", "<", "|", ">", "_", "#", "@", "/", "\\"]
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", " \n ", "   leading", "trailing   ", "a  b   c    d", "x\t\ty",
           "1234567890", " 1990", "1990s", "don't", "DON'T", "I'm", "they'll", "naïve café", "Ünïcødé",
           "\u200b", "\ufeff", "🏳️‍🌈", "a" * 300, " " * 100 + "x", "\n" * 20, "😀" * 20]
    for _ in range(n):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        out.append(" " * rng.choice([0, 0, 1, 2]) + s)
    return out


def record_strings(recs: list[Record]) -> list[str]:
    """Every prompt, subject and target (bare and with its leading space) of the records."""
    out: set[str] = set()
    for r in recs:
        out.update([r.rewrite_prompt, r.subject, *r.paraphrase_prompts, *r.neighborhood_prompts,
                    *r.generation_prompts])
        for t in (r.target_new.str, r.target_true.str):
            out.update([t, with_space(t), r.rewrite_prompt + with_space(t)])
    return sorted(out)


def boundary_merge(tok, prompt_ids: list[int], tgt_ids: list[int], full_ids: list[int]) -> bool:
    """True when ``prompt_ids + tgt_ids`` differs from the full sentence's ids only because BPE
    merged across the prompt/target boundary: one BOS at the start, the same text, and the run of
    differing ids covers the last prompt token and the first target token."""
    joint = prompt_ids + tgt_ids
    if joint == full_ids or joint[0] != BOS_ID or full_ids[0] != BOS_ID:
        return False
    if BOS_ID in joint[1:] or BOS_ID in full_ids[1:]:
        return False  # a BOS mid-sequence (the reference's Llama-3 bug)
    if tok.decode(joint[1:]) != tok.decode(full_ids[1:]):
        return False  # not the same text (e.g. a missing or doubled space)
    m = min(len(joint), len(full_ids))
    i = next((k for k in range(m) if joint[k] != full_ids[k]), m)
    j = next((k for k in range(m - i) if joint[-1 - k] != full_ids[-1 - k]), m - i)
    n = len(prompt_ids)
    return i < n < len(joint) - j


# --------------------------------------------------------------------------- the tokenizer itself

def test_file_pattern_and_specials_are_metas(ref) -> None:
    path = l3.llama3_tokenizer_file()
    assert path.name == "tokenizer.model" and "llama_models" in path.parts
    assert l3._sha256(path) == l3.LLAMA3_TOKENIZER_SHA256
    assert l3.LLAMA3_PATTERN == ref.pat_str
    assert ref.n_words == 128_256 and ref.bos_id == BOS_ID and ref.eos_id == EOS_ID
    # the package's (Llama 3.1+) list, exactly
    assert {t: BOS_ID + i for i, t in enumerate(l3.special_tokens("3.1"))} == ref.special_tokens
    # Meta-Llama-3-8B's names: same ids for every token both lists name, 256 distinct names
    ours = {t: BOS_ID + i for i, t in enumerate(l3.special_tokens("3"))}
    assert len(ours) == 256
    for name in ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert ours[name] == ref.special_tokens[name], name
    assert ours["<|eot_id|>"] == 128_009 and ours["<|reserved_special_token_250|>"] == 128_255
    with pytest.raises(ValueError, match="variant"):
        l3.special_tokens("2")


def test_vocab_bos_eos(tok) -> None:
    assert len(tok) == 128_256
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == BOS_ID
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == EOS_ID
    assert tok.pad_token_id == EOS_ID and tok.padding_side == "right"  # prepare_tokenizer
    assert tok.model_max_length == 8192
    assert tok.convert_ids_to_tokens([128_006, 128_007, 128_009, 128_255]) == [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_250|>"]
    ids = tok("Paris is the capital of")["input_ids"]
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1
    assert ids[1:] == tok("Paris is the capital of", add_special_tokens=False)["input_ids"]
    assert all(row[0] == BOS_ID for row in tok(["a", " b c", "1990"])["input_ids"])
    assert encode(tok, "Paris")[0] == BOS_ID and bos_offset(tok) == 1
    # the hub's behaviour: special-token text in the input is the special token
    assert tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [128_009]


def test_ids_equal_tiktoken_and_decode_round_trips(tok, ref, records) -> None:
    texts = record_strings(records) + tricky_strings()
    assert len(texts) >= 10_000
    bad = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids != ref.encode(text, bos=False, eos=False) or tok.decode(ids, clean_up_tokenization_spaces=False) != text:
            bad.append(text)
        elif text and tok(text)["input_ids"] != [BOS_ID, *ids]:
            bad.append(text)
    assert bad == [], f"{len(bad)} of {len(texts)} strings differ from Meta's tiktoken, e.g. {bad[:5]!r}"
    assert l3.tiktoken_mismatches(tok, texts[:200]) == []


def test_generated_text_is_decoded_as_the_reference_did(tok) -> None:
    """The hub's Meta-Llama-3-8B tokenizer (and transformers' Llama-3 converter) set
    ``clean_up_tokenization_spaces``; the reference's transformers 4.x applied it when decoding
    context templates and GE samples, transformers 5 ignores it for BPE. editlib decodes generated
    text as the reference did; ``tok.decode`` itself stays exact."""
    from editlib.generation import decode_text

    assert tok.clean_up_tokenization_spaces is True
    ids = tok("Paris , France 's capital !", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, clean_up_tokenization_spaces=False) == "Paris , France 's capital !"
    assert decode_text(tok, [BOS_ID, *ids]) == "Paris, France's capital!"
    assert decode_text(tok, [BOS_ID, *ids], "reference") == "<|begin_of_text|>Paris, France's capital!"
    plain = copy.copy(tok)
    plain.clean_up_tokenization_spaces = False  # a tokenizer that does not ask for it keeps its spaces
    assert decode_text(plain, ids) == "Paris , France 's capital !"
    # on Llama-3 these are ordinary text; the reference's generate_fast removes the strings
    spelt = tok("a<|endoftext|> b<s> c", add_special_tokens=False)["input_ids"]
    assert len(spelt) > 5 and tok.decode(spelt) == "a<|endoftext|> b<s> c"
    assert decode_text(tok, [BOS_ID, *spelt]) == "a b c"
    assert decode_text(tok, [BOS_ID, *spelt], "reference") == "<|begin_of_text|>a b c"


def test_exactness_check_can_fail(tok) -> None:
    """A tokenizer with GPT-2's digit rule (``\\p{N}+`` instead of ``\\p{N}{1,3}``) is caught."""
    import copy

    from tokenizers import Regex, pre_tokenizers

    wrong = copy.deepcopy(tok)
    wrong.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(l3.LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}+")),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    texts = ["Paris", "born in 1990", "12345678"]
    assert l3.tiktoken_mismatches(wrong, texts) == ["born in 1990"]  # "19"+"90" vs Meta's "199"+"0"
    assert l3.tiktoken_mismatches(tok, texts) == []


# --------------------------------------------------------------------------- editlib conventions

def test_target_ids_and_prompt_target_boundary(tok, records) -> None:
    special = set(tok.all_special_ids)
    pairs = agree = 0
    for r in records:
        p = encode(tok, r.rewrite_prompt)
        for t in (r.target_new.str, r.target_true.str):
            ids = target_ids(tok, t)
            assert ids and not special & set(ids), (t, ids)
            assert tok.decode(ids) == with_space(t)
            full = encode(tok, r.rewrite_prompt + with_space(t))
            pairs += 1
            if p + ids == full:
                agree += 1
            else:
                assert boundary_merge(tok, p, ids, full), (r.case_id, t)
    assert pairs >= 2_000
    assert agree / pairs >= 0.99, f"prompt + target == full sentence for only {agree}/{pairs}"


def test_boundary_classifier(tok) -> None:
    """Accepts a real cross-boundary merge, rejects a mid-sequence BOS and a lost space."""
    prompt, target = "x ", "\nfoo"  # "x " + " \nfoo": the spaces and newline merge in the full text
    p, t = encode(tok, prompt), target_ids(tok, target)
    full = encode(tok, prompt + with_space(target))
    assert p + t != full and boundary_merge(tok, p, t, full)
    p, full = encode(tok, "The capital of France is"), encode(tok, "The capital of France is Paris")
    assert p + target_ids(tok, "Paris") == full and not boundary_merge(tok, p, target_ids(tok, "Paris"), full)
    assert not boundary_merge(tok, p, [BOS_ID, *target_ids(tok, "Paris")], full)  # BOS kept
    assert not boundary_merge(tok, p, tok("Paris", add_special_tokens=False)["input_ids"], full)  # no space


def test_subject_last_index_ends_the_subject(tok, records) -> None:
    for r in records:
        ids, idx = filled_ids(tok, r.prompt, r.subject)
        text = r.rewrite_prompt
        end = r.prompt.index("{}") + len(r.subject)
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        a, b = offsets[idx]
        assert idx >= 1 and ids[0] == BOS_ID
        assert a < end <= b, (r.case_id, text, tok.convert_ids_to_tokens(ids)[idx])
        assert text[:end].endswith(tok.decode(ids[idx]).strip()) or b > end
        assert tok.decode(ids[1:idx + 1]) == text[:end] or b > end


def test_multi_token_targets_scored_token_by_token(tok, records, tmp_path: Path) -> None:
    """A tiny random Llama over the full 128,256-token vocabulary, saved with the tokenizer in one
    model directory and loaded back by editlib; score_targets against logits read by hand."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128_256, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # spread the logits so that positions differ clearly
    model.save_pretrained(tmp_path)
    l3.build_llama3_tokenizer(out_dir=tmp_path)
    model, loaded = load_model(str(tmp_path))
    assert loaded("Paris is")["input_ids"] == tok("Paris is")["input_ids"] and len(loaded) == 128_256

    multi = [r for r in records if len(target_ids(loaded, r.target_new.str)) >= 2][:12]
    assert len(multi) >= 8
    prompts = [r.rewrite_prompt for r in multi]
    targets = [r.target_new.str for r in multi]
    for alignment in ("correct", "reference"):
        got = score_targets(model, loaded, prompts, targets, alignment=alignment, batch_size=5)
        for k, (prompt, target) in enumerate(zip(prompts, targets)):
            p, t = encode(loaded, prompt), target_ids(loaded, target)
            labels = t if alignment == "correct" else loaded(with_space(target))["input_ids"]
            if alignment == "reference":
                assert labels == [BOS_ID, *t]  # SPEC §8.1: the reference scores BOS first
            with torch.no_grad():
                logits = model(torch.tensor([p + t])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            pos = [len(p) + j - 1 for j in range(len(labels))]
            nll = -torch.stack([logp[c, y] for c, y in zip(pos, labels)]).mean().item()
            ok = all(int(logits[c].argmax()) == y for c, y in zip(pos, labels))
            assert got.nll[k] == pytest.approx(nll, abs=1e-4), (alignment, prompt, target)
            assert bool(got.correct[k]) == ok
            if alignment == "correct":  # every token counts, not just the first
                assert nll != pytest.approx(-logp[pos[0], t[0]].item(), abs=1e-3)


# --------------------------------------------------------------------------- cache and errors

def test_second_call_loads_the_cache(tok, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = list((cache / "tokenizers").iterdir())
    assert [e.name for e in entries] == [f"llama3-3-{l3.LLAMA3_TOKENIZER_SHA256[:16]}-v{l3._BUILD_VERSION}"]
    calls = []
    real = l3._convert
    monkeypatch.setattr(l3, "_convert", lambda *a: calls.append(a) or real(*a))
    again = l3.build_llama3_tokenizer()
    assert calls == [] and again("Héllo 1990  x")["input_ids"] == tok("Héllo 1990  x")["input_ids"]
    # a damaged entry is rebuilt, not trusted
    broken = cache.parent / "broken-cache"
    shutil.copytree(cache, broken)
    (broken / "tokenizers" / entries[0].name / "tokenizer.json").write_text("{not json")
    monkeypatch.setenv("EDITLIB_CACHE", str(broken))
    fixed = l3.build_llama3_tokenizer()
    assert len(calls) == 1 and fixed("Paris")["input_ids"] == [BOS_ID, 60704]
    assert l3.build_llama3_tokenizer(variant="3.1").convert_ids_to_tokens(128_008) == "<|eom_id|>"


def test_missing_package_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_models", None)  # import fails as if not installed
    for call in (l3.llama3_tokenizer_file, l3.build_llama3_tokenizer):
        with pytest.raises(l3.TokenizerUnavailable, match="pip install llama-models tiktoken"):
            call()


def test_missing_tiktoken_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDITLIB_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    with pytest.raises(l3.TokenizerUnavailable, match="pip install llama-models tiktoken"):
        l3.build_llama3_tokenizer(use_cache=False)


def test_wrong_file_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "tokenizer.model"
    fake.write_text("IQ== 0\n")
    monkeypatch.setattr(l3, "llama3_tokenizer_file", lambda: fake)
    with pytest.raises(RuntimeError, match="not Meta's Llama-3 tokenizer"):
        l3.build_llama3_tokenizer(use_cache=False)


# --------------------------------------------------------------------------- the cost model's token counts

def test_cost_model_token_counts_are_what_editlib_tokenises(tok, records) -> None:
    """``editlib.workcount.TokenStats``'s defaults (what bench/paper_cost.py prices the paper grid
    with) equal a fresh measurement on the first 1,000 facts of ordering 0 with the real Llama-3
    tokenizer, so a change in how editlib tokenises cannot leave the cost model stale."""
    import dataclasses

    from editlib import counterfact
    from editlib.workcount import TokenStats, measure_token_stats

    path = counterfact_subset()
    if counterfact.sha256_file(path, uncompressed=True) != SUBSET_SHA256:  # e.g. the full CounterFact
        pytest.skip(f"the defaults were measured on the 10,459-record CounterFact subset, not {path}")
    got = measure_token_stats(counterfact.sample(load_counterfact(path), 1000, 0), tok, 1000)
    want = TokenStats()
    for f in dataclasses.fields(TokenStats):
        if f.name in ("gen_len_hist", "eval_len_hist"):
            assert [b for b in getattr(got, f.name) if b[1] > 0] == list(getattr(want, f.name)), f.name
        elif f.name != "source":
            assert getattr(got, f.name) == getattr(want, f.name), f.name
