"""Tokenisation conventions (editlib.tokens) on three tokenizer families:

* ``mini``: the committed miniature's byte-level BPE that adds BOS ``<s>`` (Llama-3-like);
* ``gpt2``: a GPT-2-style byte-level BPE without BOS, trained here in memory;
* ``sp``: a Llama-2-like sentencepiece-style BPE (``"▁"`` for spaces, a ``"▁"`` prepended to the
  text, BOS added) trained here in memory, so that ``" Paris"`` becomes a lone ``"▁"`` then
  ``"▁Paris"``.
"""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from editlib.tiny import COMMITTED_MINIATURE
from editlib.tokens import (
    bos_offset,
    encode,
    filled_ids,
    in_context,
    pad_right,
    prepare_tokenizer,
    subject_last_index,
    target_ids,
    with_space,
)

SPACE = "\u2581"

SENTENCES = [
    "Paris is the capital of France.",
    "The capital of France is Paris.",
    "Danielle Darrieux's mother tongue is French.",
    "The mother tongue of Danielle Darrieux is French.",
    "Toko Yasuda plays the guitar, and Paris loves it.",
    "Berlin is in Germany. Rome is in Italy. Madrid is in Spain.",
    "Where is Paris? Paris is in France. I like Paris and Berlin.",
    "The city of Paris is large; the language of France is French.",
]

SUBJECTS = ["Paris", "Danielle Darrieux", "Toko Yasuda", "Velorin Quastad"]
TARGETS = ["Paris", "French", "Germany", "guitar", "Toko", "Yasuda", "Quastad"]

#: subject at the start, in the middle (prefix ends with a space) and at the end
TEMPLATES_ALL = [
    "{} is the capital of",
    "The mother tongue of {} is",
    "I think {} plays the",
    "The capital of France is {}",
    "{}",
]
#: byte-level pre-tokenizers split punctuation off, so these work there too
TEMPLATES_BYTE_LEVEL = [
    "{}'s mother tongue is",
    "Where is {}?",
    "News from ({}) today",
    "Toko Yasuda and {}, in Paris,",
]


def _gpt2_style() -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(SENTENCES * 3, trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


def _sentencepiece_style(legacy: bool = True) -> PreTrainedTokenizerFast:
    """Llama-2 ("legacy" sentencepiece) behaviour: the normalizer prepends "▁" and turns every
    space into "▁", pieces split before each "▁". (The ``Metaspace`` pre-tokenizer with
    ``prepend_scheme="always"`` alone does not give the lone "▁" in tokenizers 0.23: it does not
    prepend to a text that already starts with a space.) ``legacy=False``: Llama-2's tokenizer as
    transformers 5 builds it (``LlamaTokenizer``: no legacy normalizer, a ``Metaspace``
    pre-tokenizer that prepends "▁" to the first word only), so ``" Paris"`` is BOS then
    "▁Paris", without the lone "▁"."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if legacy:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tk.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always" if legacy else "first")
    tk.train_from_iterator(SENTENCES * 3 + SUBJECTS, trainers.BpeTrainer(
        vocab_size=260, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def toks() -> dict:
    return {
        "mini": prepare_tokenizer(AutoTokenizer.from_pretrained(str(COMMITTED_MINIATURE))),
        "gpt2": prepare_tokenizer(_gpt2_style()),
        "sp": prepare_tokenizer(_sentencepiece_style()),
    }


ALL = ["mini", "gpt2", "sp"]
BYTE_LEVEL = ["mini", "gpt2"]


# --------------------------------------------------------------------------- the tokenizers themselves

def test_fixture_tokenizers_behave_as_intended(toks: dict) -> None:
    sp = toks["sp"]
    assert sp.convert_ids_to_tokens(sp(" Paris", add_special_tokens=False)["input_ids"]) == [SPACE, SPACE + "Paris"]
    assert sp.convert_ids_to_tokens(sp("Paris", add_special_tokens=False)["input_ids"]) == [SPACE + "Paris"]
    g = toks["gpt2"]
    assert g.bos_token is None
    assert g.convert_ids_to_tokens(g(" Paris")["input_ids"]) == ["\u0120Paris"]  # "ĠParis"
    # a word never seen with a space before it: byte-level gives a lone "Ġ" (the space itself)
    assert g.convert_ids_to_tokens(g(" Quastad")["input_ids"])[0] == "\u0120"
    m = toks["mini"]
    assert m.bos_token == "<s>" and m.bos_token_id == 0


# --------------------------------------------------------------------------- targets

def test_with_space() -> None:
    assert with_space("Paris") == " Paris"
    assert with_space(" Paris") == " Paris"
    assert with_space("   Paris") == " Paris"
    assert with_space("New York") == " New York"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("target", TARGETS)
def test_target_ids_no_special_and_leading_space(toks: dict, name: str, target: str) -> None:
    tok = toks[name]
    ids = target_ids(tok, target)
    assert ids
    special = set(tok.all_special_ids)
    assert not special & set(ids)
    if tok.bos_token_id is not None:
        assert tok.bos_token_id not in ids
    assert ids == target_ids(tok, " " + target) == target_ids(tok, "  " + target)
    assert tok.decode(ids).strip() == target
    if name == "sp":
        # sentencepiece: no lone "▁"; the first piece carries the space itself
        first = tok.convert_ids_to_tokens(ids[0])
        assert first.startswith(SPACE) and first != SPACE
        assert tok.decode(ids) == target  # the decoder strips the leading space of a text
    else:
        assert tok.decode(ids[:1]).startswith(" ")
        # byte-level: exactly the tokens of " target" (a lone "Ġ" is the space, and is kept)
        assert ids == tok(" " + target, add_special_tokens=False)["input_ids"]


def test_target_ids_drops_lone_sentencepiece_space(toks: dict) -> None:
    tok = toks["sp"]
    raw = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(raw) == 2 and tok.convert_ids_to_tokens(raw[0]) == SPACE
    assert target_ids(tok, "Paris") == raw[1:] == tok("Paris", add_special_tokens=False)["input_ids"]


def test_target_ids_multi_token(toks: dict) -> None:
    tok = toks["gpt2"]
    ids = target_ids(tok, "Velorin Quastad")
    assert len(ids) > 2 and tok.decode(ids) == " Velorin Quastad"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("prompt, target", [
    ("The capital of France is", "Paris"),
    ("Danielle Darrieux's mother tongue is", "French"),
    ("Toko Yasuda plays the", "guitar"),
    ("The birthplace of Velorin Quastad is", "Quastad"),
])
def test_prefix_plus_target_is_the_full_text(toks: dict, name: str, prompt: str, target: str) -> None:
    """prefix_ids + target_ids tokenises exactly like the whole sentence: no BOS mid-sequence and
    no re-tokenised boundary."""
    tok = toks[name]
    assert encode(tok, prompt) + target_ids(tok, target) == encode(tok, prompt + " " + target)


# --------------------------------------------------------------------------- prefixes / BOS

@pytest.mark.parametrize("name, offset", [("mini", 1), ("gpt2", 0), ("sp", 1)])
def test_encode_and_bos_offset(toks: dict, name: str, offset: int) -> None:
    tok = toks[name]
    assert bos_offset(tok) == offset
    for text in ("Paris", "The capital of France is", "a"):
        ids = encode(tok, text)
        plain = tok(text, add_special_tokens=False)["input_ids"]
        if offset:
            assert ids[0] == tok.bos_token_id and ids[1:] == plain
            assert tok.bos_token_id not in ids[1:]
        else:
            assert ids == plain
            assert not set(tok.all_special_ids) & set(ids)


# --------------------------------------------------------------------------- subject index

def _cases(name: str):
    templates = TEMPLATES_ALL + (TEMPLATES_BYTE_LEVEL if name in BYTE_LEVEL else [])
    return [(t, s) for t in templates for s in SUBJECTS]


@pytest.mark.parametrize("name", ALL)
def test_subject_last_index(toks: dict, name: str) -> None:
    tok = toks[name]
    cases = _cases(name)
    assert any(t.index("{}") > 0 and t[t.index("{}") - 1] == " " for t, _ in cases)  # prefix ends with a space
    for template, subject in cases:
        text = template.replace("{}", subject)
        ids = encode(tok, text)
        idx = subject_last_index(tok, template, subject)
        assert 0 <= idx < len(ids), (template, subject)
        head = tok.decode(ids[: idx + 1], skip_special_tokens=True)
        assert head.rstrip().endswith(subject), (name, template, subject, head)
        assert text.startswith(head.strip()) or text.startswith(head), (template, subject, head)
        # one token less no longer holds the whole subject
        assert not tok.decode(ids[:idx], skip_special_tokens=True).endswith(subject)
        if template.endswith("{}"):
            assert idx == len(ids) - 1
        got_ids, got_idx = filled_ids(tok, template, subject)
        assert (got_ids, got_idx) == (ids, idx)


@pytest.mark.parametrize("name", ALL)
def test_subject_index_with_bos_offset(toks: dict, name: str) -> None:
    """At the start of a template the subject's last token sits at len(subject tokens) - 1 + BOS."""
    tok = toks[name]
    for subject in SUBJECTS:
        n = len(tok(subject, add_special_tokens=False)["input_ids"])
        assert subject_last_index(tok, "{} is the capital of", subject) == n - 1 + bos_offset(tok)


@pytest.mark.parametrize("template", ["The capital of France is", "{} and {}", ""])
def test_bad_templates_raise(toks: dict, template: str) -> None:
    tok = toks["mini"]
    with pytest.raises(ValueError, match="exactly one"):
        subject_last_index(tok, template, "Paris")
    with pytest.raises(ValueError):
        filled_ids(tok, template, "Paris")


def test_in_context() -> None:
    assert in_context("Some text. {}", "{} is the capital of") == "Some text. {} is the capital of"
    assert in_context("{}", "The mother tongue of {} is") == "The mother tongue of {} is"


# --------------------------------------------------------------------------- padding

def test_prepare_tokenizer_sets_pad_to_eos_and_right_padding() -> None:
    tok = _gpt2_style()
    tok.padding_side = "left"
    assert tok.pad_token_id is None
    assert prepare_tokenizer(tok) is tok
    assert tok.pad_token_id == tok.eos_token_id and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    batch = tok(["Paris", "The capital of France is"], padding=True)
    assert batch["input_ids"][0][-1] == tok.eos_token_id and batch["attention_mask"][0][0] == 1


def test_prepare_tokenizer_keeps_an_existing_pad() -> None:
    tok = _sentencepiece_style()
    tok.pad_token = "<unk>"
    tok.padding_side = "left"
    prepare_tokenizer(tok)
    assert tok.pad_token == "<unk>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_prepare_tokenizer_on_the_miniature(toks: dict) -> None:
    tok = toks["mini"]
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"


def test_prepare_tokenizer_without_pad_or_eos_raises() -> None:
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    assert tok.pad_token_id is None and tok.eos_token is None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        prepare_tokenizer(tok)


def test_pad_right() -> None:
    ids, mask = pad_right([[5, 6, 7], [8], [9, 10]], pad_id=2)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (3, 3)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2], [9, 10, 2]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    # the last real position of each row is mask.sum - 1 (positions counted from the left)
    assert (mask.sum(1) - 1).tolist() == [2, 0, 1]
    ids, mask = pad_right([(4,), []], pad_id=0)
    assert ids.tolist() == [[4], [0]] and mask.tolist() == [[1], [0]]
    with pytest.raises(ValueError):
        pad_right([], pad_id=0)


def test_encode_remembers_per_tokenizer(toks: dict) -> None:
    """encode's memo returns the tokenizer's own ids (a fresh list each time), per tokenizer."""
    from editlib import tokens

    for name in ("mini", "gpt2", "sp"):
        tok = toks[name]
        for text in ("The capital of France is", "Paris", ""):
            first = encode(tok, text)
            assert first == list(tok(text, add_special_tokens=True)["input_ids"])
            first.append(-1)  # callers may extend what they get
            assert encode(tok, text) == list(tok(text, add_special_tokens=True)["input_ids"])
        assert "Paris" in tokens._ENCODED[tok][len(tok)]
    assert tokens._ENCODED[toks["mini"]] is not tokens._ENCODED[toks["gpt2"]]
    tok = toks["mini"]
    long_text = "Paris " * 300  # a corpus document, not a prompt: not kept
    assert encode(tok, long_text) == list(tok(long_text, add_special_tokens=True)["input_ids"])
    assert encode(tok, "Rome is", remember=False) == list(tok("Rome is", add_special_tokens=True)["input_ids"])
    assert long_text not in tokens._ENCODED[tok][len(tok)] and "Rome is" not in tokens._ENCODED[tok][len(tok)]

    class Plain:  # no __len__, not weak-referenceable: encoded without a memo
        __slots__ = ()

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, len(text)]}

    assert encode(Plain(), "abc") == [1, 3]


def test_reference_alignment_on_a_sentencepiece_tokenizer_strips_bos_and_the_lone_space(toks) -> None:
    """The reference evaluation scores ``tok(" " + target)``; for Llama-2's legacy sentencepiece
    tokenizer that is BOS, a lone "▁", then the target, and the reference strips both ([2:], SPEC
    §8.1), so its reading is the correct one. Scoring it as Llama-3's one-BOS shift instead read a
    logit past the end of the input (an IndexError)."""
    import numpy as np
    import transformers

    from editlib.scoring import reference_scored, score_targets

    tok = toks["sp"]
    ids = target_ids(tok, "Paris")
    assert tok.convert_ids_to_tokens(tok(" Paris")["input_ids"])[:2] == ["<s>", "\u2581"]
    assert reference_scored(tok, "Paris", ids) == ids
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    prefixes = ["The capital of France is", "The capital of France is the city of Paris and the capital of"]
    ref = score_targets(model, tok, prefixes, ["Paris", "France"], alignment="reference")
    cor = score_targets(model, tok, prefixes, ["Paris", "France"], alignment="correct")
    assert np.array_equal(ref.nll, cor.nll) and np.array_equal(ref.correct, cor.correct)
    mini = toks["mini"]  # BOS-adding byte-level BPE (Llama-3 style): BOS kept, every position one early
    assert reference_scored(mini, "Paris", target_ids(mini, "Paris")) == list(mini(" Paris")["input_ids"])


def test_reference_alignment_on_transformers_5s_llama2_tokenizer_is_the_correct_one() -> None:
    """transformers 5 builds Llama-2's tokenizer without the legacy normalizer, so ``" Paris"`` is
    BOS then "▁Paris", with no lone "▁": the same shape as Llama-3's BOS + target. The reference
    (which the paper ran under transformers 4) strips Llama-2's leading ids by the model's name and
    reads its targets correctly, so ``reference`` must score Llama-2 as ``correct`` here too, not
    with Llama-3's one-position shift; editlib tells the two apart by the pieces' word marker."""
    from editlib.scoring import reference_scored

    tok = prepare_tokenizer(_sentencepiece_style(legacy=False))
    assert tok.convert_ids_to_tokens(tok(" Paris")["input_ids"]) == ["<s>", "\u2581Paris"]
    for target in ("Paris", "France", "the city of Paris"):
        ids = target_ids(tok, target)
        full = list(tok(" " + target)["input_ids"])
        assert full[1:] == ids and full[0] == tok.bos_token_id
        assert reference_scored(tok, target, ids) == ids


def test_reference_alignment_without_a_reading_fails_as_the_study_opens() -> None:
    """A tokenizer whose ``tok(" " + target)`` is none of the reference's cases fails with the
    target named, at ``open_study`` (before any edit), as a params error."""
    from editlib.params import ParamsError, resolve
    from editlib.paths import REPO_ROOT
    from editlib.protocols import _check_alignment
    from editlib.records import Record, Target
    from editlib.scoring import reference_scored

    class Odd:  # " x" -> BOS, two extra pieces, then the target (whose own ids are [5])
        all_special_ids = [1]

        def __call__(self, text, add_special_tokens=True, **_):
            return {"input_ids": [1, 7, 8, 5] if add_special_tokens else [5]}

    with pytest.raises(ValueError, match="'reference'.*' x'"):
        reference_scored(Odd(), "x", [5])
    rec = Record(case_id=0, prompt="{} is", subject="s", relation_id="P1", target_true=Target("y", "Q2"),
                 target_new=Target("x", "Q1"), paraphrase_prompts=(), neighborhood_prompts=())
    p = resolve(REPO_ROOT / "params" / "smoke.yaml", overrides={"evaluation.alignment": "reference"})
    with pytest.raises(ParamsError, match="alignment 'reference'"):
        _check_alignment(p, Odd(), [rec])
    also = resolve(REPO_ROOT / "params" / "smoke.yaml", overrides={"evaluation.also_alignment": "reference"})
    with pytest.raises(ParamsError, match="alignment 'reference'"):  # scored as the second reading: checked too
        _check_alignment(also, Odd(), [rec])
    _check_alignment(resolve(REPO_ROOT / "params" / "smoke.yaml"), Odd(), [rec])  # correct: nothing to check
