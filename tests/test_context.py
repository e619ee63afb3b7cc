"""editlib.context: context templates have the reference's token lengths (SPEC §1A, §2)."""
from __future__ import annotations

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from editlib import context
from editlib.context import memit_templates, rome_templates, start_of_text
from editlib.tokens import encode, prepare_tokenizer

from _fixtures import WORDS, one_thread, tiny_gpt2, tiny_llama, word_tokenizer  # noqa: F401


def bosless_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """GPT-2-like: no BOS added; ``<|endoftext|>`` is the end-of-text (and pad) token."""
    vocab = {"<unk>": 0, "<|endoftext|>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                               unk_token="<unk>")
    return prepare_tokenizer(tok)


@pytest.fixture(params=["bos", "bosless"])
def model_tok(request):
    tok = word_tokenizer() if request.param == "bos" else bosless_tokenizer()
    make = tiny_llama if request.param == "bos" else tiny_gpt2
    return make(len(tok), layers=1), tok, request.param


def spy(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    real = context.sample_texts

    def wrapped(model, tok, prompts, **kw):
        calls.append({"prompts": list(prompts), **kw})
        return real(model, tok, prompts, **kw)

    monkeypatch.setattr(context, "sample_texts", wrapped)
    return calls


def test_memit_templates_count_bos_in_the_length(model_tok, monkeypatch) -> None:
    """generate_fast(max_out_len=10) counts the prompt and its BOS: 10 tokens in total."""
    model, tok, kind = model_tok
    calls = spy(monkeypatch)
    t = memit_templates(model, tok, length=10)
    assert calls[0]["max_len"] == 10 and calls[0]["prompts"] == list(context.MEMIT_SEEDS)
    assert len(t.groups) == 2 and len(t.groups[1]) == 5
    lengths = [len(encode(tok, x[: -len(". {}")])) for x in t.groups[1]]
    assert max(lengths) <= 10  # never the old 10 + BOS
    start = tok.bos_token if kind == "bos" else tok.eos_token  # BOS, or GPT-2's <|endoftext|>
    assert start and all(start not in x for x in t.groups[1])  # the start-of-text token is not text


def begin_of_text_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word tokenizer that adds Llama-3's BOS name, ``<|begin_of_text|>`` (id 1)."""
    from tokenizers import processors
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 1)])
    return prepare_tokenizer(transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="</s>", unk_token="<unk>"))


def test_templates_hold_no_start_of_text_token_of_any_name() -> None:
    """Templates are decoded with special tokens skipped. The check above cannot see it for
    ``<s>`` (GE's clean text also removes that string, as the reference did); with Llama-3's BOS
    name, which no string rule removes, a template decoded with its special tokens would begin
    with ``<|begin_of_text|>``."""
    tok = begin_of_text_tokenizer()
    model = tiny_llama(len(tok), layers=1)
    memit = memit_templates(model, tok, length=6).flat
    rome = rome_templates(model, tok, length_params=((5, 2),)).flat
    assert len(memit) == 6 and len(rome) == 3
    assert all("begin_of_text" not in t for t in memit + rome)


def test_reference_text_keeps_the_begin_of_text_string_read_back_as_a_second_bos() -> None:
    """``text="reference"`` (hparams.*.context_text) decodes as the reference's generate_fast: the
    same samples, but each contextual template starts with a literal ``<|begin_of_text|>``, which
    the tokenizer reads back as a second BOS in front of the template's own (SPEC §1A, §8.3)."""
    tok = begin_of_text_tokenizer()
    model = tiny_llama(len(tok), layers=1)
    clean = memit_templates(model, tok, length=6)
    ref = memit_templates(model, tok, length=6, text="reference")
    assert ref.groups[0] == clean.groups[0] == ("{}",) and len(ref.groups[1]) == 5
    for c, r in zip(clean.groups[1], ref.groups[1]):
        assert r.startswith("<|begin_of_text|>") and "begin_of_text" not in c
        assert encode(tok, r.format("the"))[:2] == [1, 1] and encode(tok, c.format("the"))[:2] != [1, 1]
    words = [[w for w in r[: -len(". {}")].split() if w not in ("<|begin_of_text|>", "</s>", "<unk>")] for r in ref.groups[1]]
    assert words == [c[: -len(". {}")].split() for c in clean.groups[1]]  # the same samples, special tokens kept
    assert context.make_templates(model, tok, "memit", text="reference") == memit_templates(model, tok, text="reference")
    with pytest.raises(ValueError, match="context_text must be one of clean, reference, got 'raw'"):
        context.make_templates(model, tok, "memit", text="raw")


def test_reference_rome_templates_start_from_the_literal_endoftext_string(model_tok, monkeypatch) -> None:
    """The reference starts ROME-style samples from the string "<|endoftext|>": GPT-2's one
    start-of-text token, so the same templates as the clean ones on a BOS-less tokenizer; ordinary
    text elsewhere (on Llama-3, 7 tokens after BOS: the 5-token samples are the prompt itself)."""
    model, tok, kind = model_tok
    calls = spy(monkeypatch)
    ref = rome_templates(model, tok, length_params=((5, 3), (10, 2)), text="reference")
    assert all(p == "<|endoftext|>" for c in calls for p in c["prompts"]) and len(ref.flat) == 6
    assert all(c["text"] == "reference" for c in calls)
    if kind == "bosless":
        assert ref == rome_templates(model, tok, length_params=((5, 3), (10, 2)))


def test_reference_templates_on_the_llama3_tokenizer() -> None:
    """On Meta-Llama-3's tokenizer (offline, from llama-models' tokenizer.model) 5 of the 6 MEMIT
    templates read [BOS, BOS, ...] with ``reference`` text and [BOS, ...] with ``clean``; ROME's
    10 five-token samples are "<|begin_of_text|>. {}", as the reference's were (SPEC §1A)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from editlib.llama3_tokenizer import build_llama3_tokenizer
    tok = prepare_tokenizer(build_llama3_tokenizer())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    bos = tok.bos_token_id
    starts = {text: [encode(tok, t.format("Paris is"))[:2] for t in context.make_templates(model, tok, "memit", text=text).flat]
              for text in ("clean", "reference")}
    assert sum(s == [bos, bos] for s in starts["reference"]) == 5 and starts["reference"][0] != [bos, bos]
    assert all(s[0] == bos and s[1] != bos for s in starts["clean"])
    start = tok(context.REFERENCE_ROME_START)["input_ids"]
    assert start[0] == bos and len(start) == 1 + 7 and bos not in start[1:]  # ordinary text: 7 tokens after BOS
    rome = context.make_templates(model, tok, "rome", text="reference").flat
    assert rome[1:11] == ("<|begin_of_text|>. {}",) * 10
    assert all(t.startswith("<|begin_of_text|>") and len(t) > len("<|begin_of_text|>. {}") for t in rome[11:])


def test_rome_templates_start_from_one_start_of_text_token(model_tok, monkeypatch) -> None:
    model, tok, kind = model_tok
    start = start_of_text(tok)
    assert len(encode(tok, start)) == 1  # BOS, or <|endoftext|> for a BOS-less tokenizer: never empty
    assert start == ("" if kind == "bos" else "<|endoftext|>")
    calls = spy(monkeypatch)
    t = rome_templates(model, tok, length_params=((5, 3), (10, 2)))
    assert [c["max_len"] for c in calls] == [5, 10]
    assert all(p == start for c in calls for p in c["prompts"])
    flat = t.flat
    assert flat[0] == "{}" and len(flat) == 1 + 3 + 2
    for x, length in zip(flat[1:], [5] * 3 + [10] * 2):
        body = x[: -len(". {}")]
        assert "<|endoftext|>" not in body  # decoded with special tokens skipped
        assert len(encode(tok, body)) <= length - (0 if kind == "bos" else 1)


def test_start_of_text_needs_a_single_token() -> None:
    tok = bosless_tokenizer()
    tok.eos_token = None
    with pytest.raises(ValueError, match="no BOS"):
        start_of_text(tok)


def test_templates_are_stripped_then_braces_replaced_as_the_reference(model_tok, monkeypatch) -> None:
    """UME's generate_fast returns ``text.strip()``: a sample ending (or, from BOS, starting) in
    whitespace gives "…of. {}", not "…of\\n. {}"; braces become spaces after the strip (SPEC §1A, §2)."""
    model, tok, _ = model_tok
    samples = ["The cat sat\n", "Therefore a ", "Because {b}", "I c\t\n", "You d"]
    monkeypatch.setattr(context, "sample_texts", lambda *a, **k: samples[: len(a[2])])
    assert memit_templates(model, tok).groups[1] == (
        "The cat sat. {}", "Therefore a. {}", "Because  b . {}", "I c. {}", "You d. {}")
    monkeypatch.setattr(context, "sample_texts", lambda *a, **k: ["\n the end ", " {x"][: len(a[2])])
    assert rome_templates(model, tok, length_params=((5, 2),)).flat == ("{}", "the end. {}", " x. {}")
