"""Shared builders for the editing / value tests (a plain module: ``from _fixtures import ...``).

Tiny random models over an 18-word vocabulary, hand-made facts that tokenise with it, explicit
context templates (no sampling) and C0 collected from the model's own down-projection inputs.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from editlib.arch import arch_for
from editlib.context import ContextTemplates
from editlib.nethook import Trace
from editlib.records import Record, Target
from editlib.tokens import prepare_tokenizer

#: EDITLIB_COUNTERFACT as the session started (tests may change the variable), else ../shared's subset
_OUTER_COUNTERFACT = os.environ.get("EDITLIB_COUNTERFACT")
SHARED_SUBSET = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact_subset.json.gz"


def counterfact_subset() -> Path:
    """The CounterFact records file the tests read: skips without it, except under CI, where it fails."""
    found = [Path(p) for p in (_OUTER_COUNTERFACT, SHARED_SUBSET) if p and Path(p).is_file()]
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CounterFact subset not found (set EDITLIB_COUNTERFACT; CI must have it)")
        pytest.skip("CounterFact subset not available (set EDITLIB_COUNTERFACT)")
    return found[0]


#: the per-case scores every protocol stores
SCORES = ["ES", "PS", "NS", "ES_mag", "PS_mag", "NS_mag", "ES_acc", "PS_acc", "NS_acc"]
#: the columns that name a stored case (which unit, which fact)
UNIT = ["method", "layer", "lam", "batch_size", "ordering", "eval", "batch_index", "case_id"]


def sort_units(df):
    """Cases in one order whatever order the units were stored in."""
    return df.sort_values([c for c in UNIT if c in df.columns]).reset_index(drop=True)


WORDS = "the cat sat on a mat and dog ran to Paris is capital of France".split()

#: plain prompt + one type of two "generated" contexts (keys: ½ k_plain + ½ mean of the two)
CTX = ContextTemplates(groups=(("{}",), ("the cat sat . {}", "a dog ran to . {}")))


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """WordLevel tokenizer over :data:`WORDS`; adds BOS ``<s>`` like Llama-3; pad = EOS."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>",
                                               eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(tok)


def tiny_llama(vocab_size: int, *, layers: int = 3, seed: int = 0, lm_scale: float = 10.0,
               dtype: torch.dtype = torch.float32, kv_heads: int = 4) -> transformers.PreTrainedModel:
    """Random Llama (hidden 32, intermediate 64, 4 query heads; ``kv_heads`` below 4: grouped-query
    attention, as Llama-3's 32 query and 8 key/value heads). ``lm_scale`` multiplies the LM head so
    that the value optimisation can move the loss a lot (the init's logits are ≈ 0.1 otherwise)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=vocab_size,
                                   bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)
    return model.to(dtype)


def tiny_gpt2(vocab_size: int, *, layers: int = 3, seed: int = 0, lm_scale: float = 10.0,
              dtype: torch.dtype = torch.float64) -> transformers.PreTrainedModel:
    """Random GPT-2 (n_embd 32, c_proj a Conv1D stored [d_in=128, d_out=32]); tied LM head."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=vocab_size,
                                  n_positions=64, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_scale)
    return model.to(dtype)


def fact(case_id: int, prompt: str, subject: str, new: str, true: str = "cat") -> Record:
    return Record(case_id=case_id, prompt=prompt, subject=subject, relation_id="P1",
                  target_true=Target(true, "t"), target_new=Target(new, "n"),
                  paraphrase_prompts=("x",), neighborhood_prompts=("y",))


#: subjects mid-prompt and at the end; one- and multi-token targets; distinct subject last tokens
FACTS = (
    fact(0, "{} sat on", "the cat", "mat"),
    fact(1, "the capital of {}", "France", "Paris"),
    fact(2, "{} is capital of", "Paris", "France"),
    fact(3, "a dog ran to {}", "the mat", "cat and dog"),
)


@torch.no_grad()
def collect_cov(model, layer: int, *, n_seqs: int = 64, length: int = 16, seed: int = 0) -> torch.Tensor:
    """C0 = E[k kᵀ] (float64) of the down-projection inputs on random word sequences
    (64·16 = 1024 keys ≥ d_in, so C0 is full rank)."""
    g = torch.Generator().manual_seed(seed + 1000 * layer)
    ids = torch.randint(3, model.config.vocab_size, (n_seqs, length), generator=g)
    ids[:, 0] = 1  # BOS
    with Trace(model, arch_for(model).down_name(layer), retain_input=True, retain_output=False,
               stop=True) as t:
        model(input_ids=ids)
    k = t.input.reshape(-1, t.input.shape[-1]).to(torch.float64)
    return k.T @ k / k.shape[0]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost a lot:
    import this fixture into a test module to run it single-threaded (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- protocol-test helpers


def quiet(*_a, **_k):
    """A log that says nothing."""


def use(study, p):
    """The shared study with this test's params (model, C0 and templates shared)."""
    import dataclasses

    return dataclasses.replace(study, params=p)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Clones of every parameter and buffer, to check a restore against."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_counts(model) -> dict[str, int]:
    """Each parameter's in-place write counter (``Tensor._version``): unchanged across a call means
    nothing wrote into the parameter, not even a write later undone by restoring it."""
    return {name: p._version for name, p in model.named_parameters()}


def assert_unedited(model, weights0: dict[str, torch.Tensor]) -> None:
    """Every parameter bit-identical to ``weights0`` (a :func:`snapshot`)."""
    now = model.state_dict()
    assert now.keys() == weights0.keys()
    changed = [k for k in weights0 if not torch.equal(now[k], weights0[k])]
    assert not changed, f"parameters not restored bit-identically: {changed}"

