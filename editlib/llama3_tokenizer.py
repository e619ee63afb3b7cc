"""The real Llama-3 tokenizer, built offline from Meta's PyPI package ``llama-models``.

Why: the paper's model is Meta-Llama-3-8B, whose hub files need a licence click and a network.
Its tokenizer, though, ships inside ``llama-models`` (``llama_models/llama3/tokenizer.model``, a
tiktoken BPE file, the same bytes as the hub's ``original/tokenizer.model``). We convert it into a
Hugging Face fast tokenizer that behaves like the hub's ``tokenizer.json``:

* 128,000 byte-level BPE tokens + 256 special tokens (ids 128000–128255);
* Meta's pre-tokenizer regex; every ``tok(text)`` starts with BOS ``<|begin_of_text|>`` (128000),
  ``add_special_tokens=False`` gives the bare ids; EOS ``<|end_of_text|>`` (128001);
* ``model_max_length`` 8192; ``clean_up_tokenization_spaces`` set, as the hub's
  ``tokenizer_config.json`` had it when the paper ran and transformers' Llama-3 converter wrote it
  (newer converters write False). transformers 5 ignores it in
  ``decode`` for BPE tokenizers (so decode(encode(t)) == t); editlib applies it to generated text as
  the reference's transformers 4.x did (:func:`editlib.generation.decode_as_reference`).

Special tokens inside raw text (``"<|eot_id|>"``) are matched as specials, as on the hub, while
tiktoken's ``disallowed_special=()`` encodes them as plain text; compare ids on texts without them.

The built tokenizer is cached under ``cache_dir()/tokenizers/`` (keyed by the file's sha256), so a
second call loads a ``tokenizer.json`` instead of converting again.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Literal

from .counterfact import cache_dir

INSTALL_HINT = "pip install llama-models tiktoken"
#: sha256 of Meta's Llama-3 / 3.1 / 3.2 ``tokenizer.model`` (the hub's ``original/tokenizer.model``)
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
#: Meta's pre-tokenizer regex (``llama_models.llama3.tokenizer.Tokenizer.pat_str``; a test checks it)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_BPE = 128_000
N_SPECIAL = 256
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
MODEL_MAX_LENGTH = 8192
_BUILD_VERSION = 2  # bump when the built tokenizer changes, so old caches are not reused

Variant = Literal["3", "3.1"]
#: where the file lives in the package (0.3: llama3/; older releases: llama3/api/)
_RESOURCE_PATHS = (("llama3", "tokenizer.model"), ("llama3", "api", "tokenizer.model"))


class TokenizerUnavailable(RuntimeError):
    """The package that ships the tokenizer file (or tiktoken) is not installed."""


def special_tokens(variant: Variant = "3") -> list[str]:
    """The 256 special tokens in id order (id = 128000 + position).

    ``"3"`` is Meta-Llama-3-8B's naming (the paper's model); ``"3.1"`` is the one in
    ``llama_models.llama3.tokenizer`` (Llama 3.1+). Both agree on BOS, EOS, the header tokens and
    ``<|eot_id|>`` (128009); only the names of reserved slots differ."""
    if variant == "3":
        head = [BOS, EOS, *(f"<|reserved_special_token_{i}|>" for i in range(4)),
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_free = 5
    elif variant == "3.1":
        head = [BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
        first_free = 2
    else:
        raise ValueError(f"variant must be '3' or '3.1', got {variant!r}")
    rest = [f"<|reserved_special_token_{first_free + i}|>" for i in range(N_SPECIAL - len(head))]
    return head + rest


def llama3_tokenizer_file() -> Path:
    """Path of ``tokenizer.model`` inside the installed ``llama_models`` package."""
    try:
        root = importlib.resources.files("llama_models")
    except ModuleNotFoundError as e:
        raise TokenizerUnavailable(
            f"the Llama-3 tokenizer comes from Meta's PyPI package llama-models, which is not "
            f"installed: run `{INSTALL_HINT}` (or `pip install -e .[dev]`)") from e
    for parts in _RESOURCE_PATHS:
        res = root.joinpath(*parts)
        if res.is_file():
            return Path(str(res))
    raise TokenizerUnavailable(
        f"llama_models is installed but has no llama3 tokenizer.model (looked for "
        f"{['/'.join(p) for p in _RESOURCE_PATHS]}); run `{INSTALL_HINT}` to get a release with it")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _require_tiktoken() -> None:
    try:
        import tiktoken  # noqa: F401
    except ModuleNotFoundError as e:
        raise TokenizerUnavailable(f"tiktoken is needed to read the Llama-3 tokenizer file: run `{INSTALL_HINT}`") from e


def _convert(model_file: Path, variant: Variant):
    """tiktoken BPE file → ``PreTrainedTokenizerFast`` (BPE + regex + ByteLevel, BOS template)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _require_tiktoken()
    # the converter derives merges from the ranks and sets ignore_merges (whole-word lookups first,
    # as tiktoken does); the specials are added here so that their ids are ours, in order
    tk = TikTokenConverter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN).converted()
    if tk.get_vocab_size() != N_BPE:
        raise RuntimeError(f"{model_file} has {tk.get_vocab_size()} BPE tokens, expected {N_BPE}")
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens(variant)])
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, N_BPE)]),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS,
                                  model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=True)
    _check(tok, variant)
    return tok


def _check(tok, variant: Variant) -> None:
    """Cheap invariants of a built or cached tokenizer; raises RuntimeError when one fails."""
    names = special_tokens(variant)
    ok = (len(tok) == N_BPE + N_SPECIAL and tok.bos_token_id == N_BPE and tok.eos_token_id == N_BPE + 1
          and tok.convert_tokens_to_ids(names[-1]) == N_BPE + N_SPECIAL - 1
          and tok("Paris")["input_ids"][0] == N_BPE
          and tok("Paris", add_special_tokens=False)["input_ids"][0] != N_BPE)
    if not ok:
        raise RuntimeError("the built Llama-3 tokenizer failed its vocabulary / BOS checks")


def build_llama3_tokenizer(out_dir: str | os.PathLike | None = None, *, variant: Variant = "3",
                           use_cache: bool = True):
    """The Llama-3 tokenizer as a ``transformers.PreTrainedTokenizerFast`` (see module docstring).

    Built from ``llama-models``' file on first use and cached under ``cache_dir()/tokenizers``;
    with ``out_dir`` it is also saved there (``save_pretrained``), e.g. into a model directory."""
    from transformers import PreTrainedTokenizerFast

    model_file = llama3_tokenizer_file()
    digest = _sha256(model_file)
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise RuntimeError(f"{model_file} is not Meta's Llama-3 tokenizer file (sha256 {digest}, "
                           f"expected {LLAMA3_TOKENIZER_SHA256})")
    tok = None
    cached = cache_dir() / "tokenizers" / f"llama3-{variant}-{digest[:16]}-v{_BUILD_VERSION}"
    if use_cache and (cached / "tokenizer.json").is_file():
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(cached))
            _check(tok, variant)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            tok = None
    if tok is None:
        tok = _convert(model_file, variant)
        if use_cache:
            _store(tok, cached)
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def _store(tok, target: Path) -> None:
    """Save into ``target`` atomically (a temp dir renamed), so concurrent builds cannot mix files."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        pass  # another process stored it first, or the cache is read-only: the tokenizer still works
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reference_encoding():
    """Meta's own tiktoken encoding (``llama_models.llama3.tokenizer.Tokenizer``): the yardstick."""
    _require_tiktoken()
    try:
        from llama_models.llama3.tokenizer import Tokenizer
    except ModuleNotFoundError as e:
        raise TokenizerUnavailable(f"run `{INSTALL_HINT}`") from e
    return Tokenizer(llama3_tokenizer_file()).model


def tiktoken_mismatches(tok, texts: Iterable[str]) -> list[str]:
    """Texts whose bare ids (no BOS) differ from Meta's tiktoken ids, or that do not decode back.
    Texts containing special-token strings are compared too, so leave them out (module docstring)."""
    ref = reference_encoding()
    bad = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids != ref.encode(text, disallowed_special=()) or \
                tok.decode(ids, clean_up_tokenization_spaces=False) != text:
            bad.append(text)
    return bad
