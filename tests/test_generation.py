"""editlib.generation: seeded top-k sampling (generate_fast semantics), word tokenizer, n-gram entropy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from editlib import generation
from editlib.generation import _row_rng, _top_k_draw, ngram_entropy, sample_texts, word_tokenize
from editlib.tokens import encode


@torch.no_grad()
def slow_sample(model, tok, prompt: str, key, *, seed: int, max_len: int, top_k: int = 5) -> str:
    """Reference path for one prompt: a full forward (no cache, no batch) per new token, same
    per-row uniforms; total length ``max_len`` tokens including the prompt."""
    ids = encode(tok, prompt)
    u = torch.as_tensor(_row_rng(seed, key).random(max(max_len, len(ids))), dtype=torch.float32)
    while len(ids) < max_len:
        logits = model(torch.tensor([ids])).logits[0, -1]
        nxt = _top_k_draw(logits[None], top_k, u[len(ids)][None])[0].item()
        assert nxt in logits.topk(top_k).indices.tolist()
        ids.append(nxt)
    return tok.decode(ids, skip_special_tokens=True)


def test_sampling_matches_unbatched_reference_and_is_seeded(world_lm, world_records) -> None:
    model, tok = world_lm
    prompts = [world_records[0].generation_prompts[0], "The", "The instrument played by",
               world_records[1].rewrite_prompt]
    assert len({len(encode(tok, p)) for p in prompts}) > 2  # ragged batch
    texts = sample_texts(model, tok, prompts, max_len=30, seed=5, batch_size=3)
    for i, (p, t) in enumerate(zip(prompts, texts)):
        assert t == slow_sample(model, tok, p, i, seed=5, max_len=30)
        assert t.startswith(p)  # text includes the prompt
    assert sample_texts(model, tok, prompts, max_len=30, seed=5, batch_size=3) == texts
    assert sample_texts(model, tok, prompts, max_len=30, seed=6, batch_size=3) != texts


def test_texts_independent_of_batching_with_keys(world_lm, world_records) -> None:
    model, tok = world_lm
    prompts = [p for r in world_records[:3] for p in r.generation_prompts[:3]]
    keys = [(r.case_id, j) for r in world_records[:3] for j in range(3)]
    together = sample_texts(model, tok, prompts, max_len=25, seed=1, batch_size=64, keys=keys)
    alone = [sample_texts(model, tok, [p], max_len=25, seed=1, keys=[k])[0] for p, k in zip(prompts, keys)]
    assert together == alone
    assert len(set(together)) > 1


def test_total_length_counts_the_prompt(world_lm) -> None:
    model, tok = world_lm
    long_prompt = " ".join(["Vegas Muholm learned to play the"] * 4)
    n = len(encode(tok, long_prompt))
    short, same = sample_texts(model, tok, ["The", long_prompt], max_len=n - 2, seed=0)
    assert same == long_prompt  # already longer than max_len: nothing is generated
    assert len(tok(short, add_special_tokens=False)["input_ids"]) > 3


def test_top_k_draw_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]]))
    # top-2 = ids 1 (0.4) and 3 (0.3): cumulative 0.4/0.7 = 0.571...
    assert _top_k_draw(logits, 2, torch.tensor([0.5]))[0].item() == 1
    assert _top_k_draw(logits, 2, torch.tensor([0.6]))[0].item() == 3
    assert _top_k_draw(logits, 1, torch.tensor([0.999]))[0].item() == 1


# --------------------------------------------------------------------------- word tokenizer

@pytest.mark.parametrize("text, words", [
    ("Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks.",
     ["Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy", "me",
      "two", "of", "them", ".", "Thanks", "."]),
    ("Don't you love it? They'll say \"hi\", I'm sure -- cannot (really)",
     ["Do", "n't", "you", "love", "it", "?", "They", "'ll", "say", "``", "hi", "''", ",", "I", "'m",
      "sure", "--", "can", "not", "(", "really", ")"]),
    ("Paris's mayor: 3,000 people; 10:30", ["Paris", "'s", "mayor", ":", "3,000", "people", ";", "10:30"]),
    ("", []),
])
def test_word_tokenize(text: str, words: list[str]) -> None:
    assert word_tokenize(text) == words


# --------------------------------------------------------------------------- n-gram entropy

def test_ngram_entropy_hand_values() -> None:
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx(h2 / 3 + 2 * 1.0 / 3)
    # 6 words, 5 distinct bigrams, 4 distinct trigrams
    assert ngram_entropy("the cat sat on the mat") == pytest.approx(math.log2(5) / 3 + 2 * 2.0 / 3)
    # punctuation are words: Hello , world . -> 3 bigrams, 2 trigrams
    assert ngram_entropy("Hello, world.") == pytest.approx(math.log2(3) / 3 + 2 / 3)
    # weighted arithmetic mean of (2/3 H2, 4/3 H3)
    assert ngram_entropy("a b c d") == pytest.approx(np.mean([2 / 3 * math.log2(3), 4 / 3 * 1.0]))


def test_ngram_entropy_short_and_repetitive() -> None:
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("word") == 0.0  # fewer words than n: H_n = 0
    assert ngram_entropy("a b") == pytest.approx(0.0)  # one bigram, no trigram
    assert ngram_entropy("go " * 50) == pytest.approx(0.0)  # one distinct n-gram each
    assert ngram_entropy("x y", ns=(1,), weights=(1.0,)) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_token_is_what_the_cache_holds(family, dtype) -> None:
    """arch.kv_bytes_per_token (the GE batch cap's unit) equals the bytes a forward's KV cache
    holds per token: grouped-query heads (llama, qwen2), GPT-2's names, 16-bit models."""
    import transformers

    from editlib.arch import kv_bytes_per_token
    from editlib.generation import returned_kv

    cfg = {"llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=8, num_key_value_heads=2, vocab_size=50),
           "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=1, vocab_size=50),
           "gpt2": transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64)}[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 50, (3, 7)), use_cache=True)
    held = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in returned_kv(model, out))
    assert kv_bytes_per_token(model) == held // (3 * 7) and held % (3 * 7) == 0


def test_rows_per_batch_fits_the_kv_budget(world_lm, world_records) -> None:
    from editlib.arch import kv_bytes_per_token
    from editlib.generation import rows_per_batch

    model, tok = world_lm
    per = kv_bytes_per_token(model)
    assert rows_per_batch(model, 64, 30, None) == 64
    assert rows_per_batch(model, 64, 30, 5.5 * 30 * per) == 5
    assert rows_per_batch(model, 4, 30, 5.5 * 30 * per) == 4
    with pytest.raises(ValueError, match="evaluation.gen_kv_gb"):
        rows_per_batch(model, 64, 30, 29 * per)
    prompts = [p for r in world_records[:4] for p in r.generation_prompts[:3]]
    rows, real = [], generation._sample_batch

    def count_rows(model, seqs, *a, **k):
        rows.append(len(seqs))
        return real(model, seqs, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generation, "_sample_batch", count_rows)
        capped = sample_texts(model, tok, prompts, max_len=25, seed=2, batch_size=64, max_kv_bytes=3.5 * 25 * per)
    assert rows == [3, 3, 3, 3]  # 12 prompts, 3 rows of 25 cached tokens fit
    assert capped == sample_texts(model, tok, prompts, max_len=25, seed=2, batch_size=64)


def test_word_tokenize_equals_nltk_treebank_rules() -> None:
    """Per sentence, editlib's words are nltk 3.7's NLTKWordTokenizer's (the version the reference
    code pins; nltk.word_tokenize's second stage, the first, punkt, needs downloaded data): quotes
    before words longer than one letter stay attached ('best), unspaced dashes do not split
    (Spain—and; nltk 3.8+ changed both), clitics, ellipses, brackets."""
    nltk = pytest.importorskip("nltk")
    if nltk.__version__ != "3.7":
        pytest.skip(f"nltk {nltk.__version__}: the reference pins 3.7 (pip install -e .[dev])")
    nltk_tok = nltk.tokenize.NLTKWordTokenizer()
    sentences = [
        "He said 'best' and 'a' thing.", "Spain—and France–Italy ‒ x ― y", "'Le Monde' wrote 'tis so.",
        "It's 'n' roll, rock'n'roll; don't 'em.", "«Bonjour» “quoted” ‘single’ „low“", "A...B.. C. D.E.",
        "cost $3.88 (approx.) [sic] {x} <y> *z*", "I'd've gone; they'd 'll 're", "gimme gonna gotta lemme wanna go",
        "'twas 'tis 'Twas cannot d'ye more'n", "x -- y --- z - w", "He's \"quoted\" ''double'' ``back``",
        "Paris, France: 10,000 @home #tag 50% & co.", "end with quote.'", "end with paren.)", "What?! No!!",
        "O'Neill's o'clock", "The team, led by J. R. Smith—who 'never' lost—won 3:1 at 10:30...",
        "It's\nok", "'best'\tx", "don't\n$(", "'n'\t", "a\r\nb's\u00a0c'll\nd",  # whitespace other than spaces
    ]
    for s in sentences:
        assert generation._tokenize_sentence(s) == nltk_tok.tokenize(s), s


def test_word_tokenize_with_punkt_equals_nltk_word_tokenize(monkeypatch) -> None:
    """Where nltk's punkt is installed (a paper-scale GE run), word_tokenize splits sentences with
    it and then applies the Treebank rules per sentence, as nltk.word_tokenize does. An untrained
    PunktSentenceTokenizer (no download) stands in for the English model: texts with
    abbreviations, initials, quotes and ellipses tokenize exactly as nltk.word_tokenize, and
    differently from the built-in rule where punkt keeps an initial inside a sentence."""
    nltk = pytest.importorskip("nltk")
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    pk = PunktSentenceTokenizer()
    texts = [
        "Dr. Smith met Mr. Jones at 5 p.m. on Jan. 3. They talked.",
        "The team, led by J. R. Smith, won... Then 'they' left. \"Really?\" she asked.",
        "He said \"go.\" Then U.S. troops came... and stayed! Why? Because.",
        "A...B.. C. D.E. e.g. this one i.e. that. St. Louis is big.",
        "",
    ]
    with monkeypatch.context() as m:  # the built-in rule, whatever is installed
        m.setattr(generation, "_punkt", lambda: None)
        rule = [word_tokenize(t) for t in texts]
    generation._punkt.cache_clear()
    try:
        monkeypatch.setattr(nltk.tokenize, "sent_tokenize", lambda t, language="english": pk.tokenize(t))
        generation._punkt.cache_clear()
        assert generation.sentence_splitter() == "nltk punkt"
        for t in texts:
            assert word_tokenize(t) == nltk.word_tokenize(t), t
        assert word_tokenize(texts[1])[5:7] == ["J.", "R."]  # punkt: initials inside the sentence
        assert sum(word_tokenize(t) != r for t, r in zip(texts, rule)) >= 2  # the splitter mattered
    finally:
        monkeypatch.undo()
        generation._punkt.cache_clear()
    assert generation._punkt() in (None, nltk.tokenize.sent_tokenize)  # nothing of the stand-in is left


def test_gen_text_modes_decode_as_clean_or_as_the_reference() -> None:
    """``clean`` skips special tokens; ``reference`` keeps them as the reference's generate_fast
    does (only the strings <|endoftext|> and <s> removed), so a Llama-3 text keeps its leading
    <|begin_of_text|>, which the word tokenizer reads as three more words (higher GE)."""
    from editlib.generation import decode_text
    from editlib.llama3_tokenizer import build_llama3_tokenizer
    from editlib.tokens import prepare_tokenizer

    tok = prepare_tokenizer(build_llama3_tokenizer())
    ids = tok("The capital of France is Paris. It is a city of light.\n\nIt is big.")["input_ids"]
    assert ids[0] == tok.bos_token_id
    clean, ref = decode_text(tok, ids, "clean"), decode_text(tok, ids, "reference")
    assert clean == "The capital of France is Paris. It is a city of light. It is big."
    assert ref == "<|begin_of_text|>" + clean
    assert word_tokenize(ref)[:4] == ["<", "|begin_of_text|", ">", "The"]
    assert ngram_entropy(ref) > ngram_entropy(clean)
    with pytest.raises(ValueError, match="GE text mode"):
        decode_text(tok, ids, "raw")


def test_prefill_projects_only_the_last_position_under_either_argument_name() -> None:
    """transformers >= 4.50 calls it logits_to_keep, earlier versions num_logits_to_keep; without it
    a 1,024-prompt prefill would project every prompt token onto the vocabulary."""
    class New(torch.nn.Module):
        def forward(self, input_ids=None, logits_to_keep=0): ...

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, num_logits_to_keep=0): ...

    class Bare(torch.nn.Module):
        def forward(self, input_ids=None): ...

    assert generation._last_logits_kw(New()) == {"logits_to_keep": 1}
    assert generation._last_logits_kw(Old()) == {"num_logits_to_keep": 1}
    assert generation._last_logits_kw(Bare()) == {}
