"""Generation test behind GE (SPEC §6 "Generation test"): seeded top-k sampling + n-gram entropy.

:func:`sample_texts` follows the reference ``generate_fast`` semantics: top-k = 5 sampling from
the softmax of the last logits, **total** length ``max_len`` tokens including the prompt (a shorter
prompt gets more new tokens), no stop at EOS, KV cache, right padding. As in the reference, columns
are fed one at a time from the shortest prompt's length on, and a row whose prompt is longer simply
keeps reading its own prompt tokens (teacher forcing) until its prompt ends, so no pad token is
ever fed and no attention mask is needed. Texts include the prompt (paper-time behaviour) and are
decoded with ``skip_special_tokens=True`` (SPEC §8.3), NFKD-normalised with ``"\\n\\n"`` -> ``" "``,
or as the reference decodes them (``evaluation.gen_text: reference``, :func:`decode_text`).

Randomness is per row: every prompt has a key (default: its index) and its uniforms come from a
NumPy generator seeded with ``(seed, key)``, so the same seed and keys give identical texts, and a
text does not depend on the other prompts in its batch except through floating-point differences
between batch shapes (a different prefill length can move a logit by ~1e-7; a sampled token flips
only if a uniform falls that close to a top-k cumulative-probability boundary).

:func:`ngram_entropy` is ROME's ``compute_n_gram_entropy`` on :func:`word_tokenize` words; the word
tokenizer re-states the Treebank rules of ``nltk.word_tokenize`` (tested against nltk's) and splits
sentences with nltk's punkt when its data is installed, else with a simple ``[.?!]`` + whitespace
rule (:func:`sentence_splitter` says which; part of a results folder's parameter digest when GE is on).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import re
import unicodedata
from collections import Counter
from typing import Hashable, Sequence

import numpy as np
import torch

from .arch import kv_bytes_per_token
from .tokens import encode

# --------------------------------------------------------------------------- sampling


def _row_rng(seed: int, key: Hashable) -> np.random.Generator:
    """A generator that depends only on ``(seed, key)`` (stable across processes: no ``hash()``)."""
    digest = hashlib.sha256(repr(key).encode("utf-8")).digest()
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


def _top_k_draw(logits: torch.Tensor, top_k: int, u: torch.Tensor) -> torch.Tensor:
    """Sample one token per row from the renormalised top-k softmax, by inverse CDF at ``u``."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    cdf = top_p.cumsum(-1)
    pick = (cdf < (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=top_p.shape[-1] - 1)
    return top_i.gather(1, pick[:, None])[:, 0]


def _cache_name(model) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _last_logits_kw(model) -> dict:
    """``logits_to_keep=1`` (``num_logits_to_keep`` before transformers 4.50) when the forward
    accepts it: a prompt's prefill then projects only its last position to the vocabulary (the
    only one sampled from), not every prompt token (1,024 prompts of a 128k vocabulary would
    otherwise take GBs the KV budget does not count)."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def returned_kv(model, out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) ``[batch, kv_heads, tokens, head_dim]`` of the cache a
    ``use_cache=True`` forward returned (under either of :func:`_cache_name`'s names)."""
    cache = getattr(out, _cache_name(model), None) or out.past_key_values
    return [(lay.keys, lay.values) for lay in cache.layers]


@torch.no_grad()
def _sample_batch(model, seqs: list[list[int]], uniforms: np.ndarray, *, max_len: int, top_k: int,
                  pad_id: int, deltas=None, rows: Sequence[int] | None = None,
                  decode: str = "transformers") -> tuple[list[list[int]], list[bool]]:
    """Extend every row to ``max_len`` tokens (rows already longer are returned unchanged); also
    whether each row's logits stayed finite at every step. ``decode``: the model's own forward
    (``transformers``) or :class:`editlib.decode.Decoder` (``static``, ``graph``) after the prefill."""
    device = next(model.parameters()).device
    lens = [len(s) for s in seqs]
    width = max(max_len, max(lens))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    ids = ids.to(device)
    u = torch.as_tensor(uniforms, dtype=torch.float32, device=device)
    lens_t = torch.as_tensor(lens, device=device)
    cache_arg = _cache_name(model)
    last_only = _last_logits_kw(model)
    if deltas is not None:  # each row generates under its own independent edit (editlib.lowrank)
        deltas.rows = torch.as_tensor(list(rows), dtype=torch.long, device=device)
    finite = torch.ones(len(seqs), dtype=torch.bool, device=device)
    past, fed, pos = None, 0, min(lens)
    dec = None
    if decode != "transformers" and pos < max_len:
        from .decode import Decoder
        dec = Decoder(model, len(seqs), max_len, decode)
    while pos < max_len:  # pos: the column sampled at this step
        if dec is not None:
            logits = dec.prefill(ids[:, :pos]) if fed == 0 else dec.step(ids[:, fed], fed)
        else:
            out = model(input_ids=ids[:, fed:pos], use_cache=True, **{cache_arg: past}, **last_only)
            past = getattr(out, cache_arg)
            logits = out.logits[:, -1]
        finite &= torch.isfinite(logits).all(-1)  # a NaN/inf row would otherwise draw token 0 silently
        new = _top_k_draw(logits, top_k, u[:, pos])
        ids[:, pos] = torch.where(lens_t <= pos, new, ids[:, pos])  # keep longer prompts' tokens
        fed, pos = pos, pos + 1
    if deltas is not None:
        deltas.rows = None
    ids = ids.cpu()
    return [ids[b, : max(lens[b], max_len)].tolist() for b in range(len(seqs))], finite.cpu().tolist()


GEN_TEXTS = ("clean", "reference")


def decode_as_reference(tok, ids: Sequence[int], *, skip_special_tokens: bool) -> str:
    """``tok.decode`` as the reference's transformers 4.x ran it: the tokenizer's own
    ``clean_up_tokenization_spaces`` is honoured (" ," -> ",", " 's" -> "'s", ...). Meta-Llama-3-8B's
    hub config sets it, and transformers 5 ignores it for BPE tokenizers, which would change the
    text of a generated context template or GE sample wherever the model emits such a space."""
    text = tok.decode(ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
    if getattr(tok, "clean_up_tokenization_spaces", False):
        text = tok.clean_up_tokenization(text)
    return text


def decode_text(tok, ids: Sequence[int], mode: str = "clean") -> str:
    """A generated text as GE reads it (and context templates are made of): decoded as the
    reference's transformers did (:func:`decode_as_reference`), then: ``clean`` (default): special
    tokens skipped (SPEC §10.1), NFKD-normalised, ``"\\n\\n"`` -> ``" "``, and, as the reference, the
    strings ``<|endoftext|>`` and ``<s>`` removed (on Llama-3 they are ordinary text a model may
    spell out; GE would count three more words). ``reference``: as the
    reference's ``generate_fast`` returns it: decoded *with* special tokens, then NFKD,
    ``"\\n\\n"`` -> ``" "``, the strings ``<|endoftext|>`` and ``<s>`` removed, stripped; so a
    Llama-3 text keeps its leading ``<|begin_of_text|>`` (three more words for nltk, a higher n-gram
    entropy), as the paper's GE numbers were computed."""
    if mode == "clean":
        text = unicodedata.normalize("NFKD", decode_as_reference(tok, ids, skip_special_tokens=True))
        return text.replace("\n\n", " ").replace("<|endoftext|>", "").replace("<s>", "")
    if mode == "reference":
        text = unicodedata.normalize("NFKD", decode_as_reference(tok, ids, skip_special_tokens=False))
        return text.replace("\n\n", " ").replace("<|endoftext|>", "").replace("<s>", "").strip()
    raise ValueError(f"GE text mode must be one of {', '.join(GEN_TEXTS)}, got {mode!r}")


def rows_within(batch_size: int, token_bytes: int, width: int, max_kv_bytes: float | None,
                what: str = "") -> int:
    """``batch_size``, or fewer rows where their KV cache of ``width`` tokens of ``token_bytes``
    each would exceed ``max_kv_bytes`` (evaluation.gen_kv_gb); a budget that holds no row fails,
    naming the key (and ``what``, the model). Shared by the run and the cost model."""
    if max_kv_bytes is None:
        return batch_size
    per_row = token_bytes * width
    if per_row > max_kv_bytes:
        raise ValueError(f"evaluation.gen_kv_gb = {max_kv_bytes / 1e9:g} GB holds no {what}generation row: "
                         f"one row of {width} tokens caches {per_row / 1e9:.3g} GB")
    return min(batch_size, int(max_kv_bytes // per_row))


def rows_per_batch(model, batch_size: int, width: int, max_kv_bytes: float | None) -> int:
    """:func:`rows_within` for ``model``'s cache (:func:`editlib.arch.kv_bytes_per_token`)."""
    return rows_within(batch_size, kv_bytes_per_token(model), width, max_kv_bytes)


def sample_texts(model, tok, prompts: Sequence[str], *, max_len: int = 100, top_k: int = 5,
                 seed: int = 0, batch_size: int = 64,
                 keys: Sequence[Hashable] | None = None, groups: Sequence[int] | None = None,
                 deltas=None, max_kv_bytes: float | None = None, text: str = "clean",
                 return_finite: bool = False, decode: str = "transformers") -> list[str] | tuple[list[str], list[bool]]:
    """Seeded top-k sampled continuations (prompt included), ``max_len`` tokens in total.

    ``keys[i]`` names prompt ``i``'s random stream (default ``i``); give keys that identify a prompt
    independently of the call (e.g. ``(case_id, j)``) to make texts independent of batching.
    ``groups[i]`` / ``deltas``: prompt i is continued under independent edit ``groups[i]`` of an
    active :class:`editlib.lowrank.RowDeltas` hook (GE of many edits in one batched generation).
    ``max_kv_bytes``: fewer than ``batch_size`` rows per batch where their KV cache would not fit
    (:func:`rows_per_batch`; texts change only as with any other batch size). ``text``: how token
    ids become text (:func:`decode_text`). ``decode``: how the steps after the prefill run
    (``evaluation.gen_decode``, :mod:`editlib.decode`: ``transformers``, ``static``, ``graph`` or
    ``compiled``).

    A prompt whose logits are ever NaN or infinite (an overflowing float16 model, an edit that
    blew the model up) has no meaningful text: with ``return_finite`` the call also returns, per
    prompt, whether its logits stayed finite; without it such a prompt raises FloatingPointError.
    """
    if (groups is None) != (deltas is None):
        raise ValueError("groups and deltas go together")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")
    if top_k < 1 or max_len < 1 or batch_size < 1:
        raise ValueError("top_k, max_len and batch_size must be positive")
    if text not in GEN_TEXTS:
        raise ValueError(f"GE text mode must be one of {', '.join(GEN_TEXTS)}, got {text!r}")
    if decode != "transformers":
        from .decode import check_decodable
        check_decodable(model, decode, max_len)
    ids = [encode(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))  # tight batches
    if ids:  # the cache never holds more than max_len - 1 tokens (longer prompts are not extended)
        batch_size = rows_per_batch(model, batch_size, max_len, max_kv_bytes)
    out: list[str] = [""] * len(prompts)
    finite: list[bool] = [True] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(max_len, max(len(ids[i]) for i in idx))
        uniforms = np.stack([_row_rng(seed, keys[i]).random(width) for i in idx])
        seqs, ok = _sample_batch(model, [ids[i] for i in idx], uniforms, max_len=max_len, top_k=top_k,
                                 pad_id=pad, deltas=deltas, decode=decode,
                                 rows=None if groups is None else [int(groups[i]) for i in idx])
        for i, s, f in zip(idx, seqs, ok):
            out[i] = decode_text(tok, s, text)
            finite[i] = f
    if return_finite:
        return out, finite
    if not all(finite):
        bad = [prompts[i] for i, f in enumerate(finite) if not f]
        raise FloatingPointError(f"non-finite logits while sampling {len(bad)} of {len(prompts)} prompts "
                                 f"(first: {bad[0]!r}): the model's outputs overflowed or are NaN")
    return out


# --------------------------------------------------------------------------- word tokenizer

def _subs(*rules: tuple[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(p), r) for p, r in rules]


# Treebank conventions as in nltk.word_tokenize (NLTKWordTokenizer), applied per sentence.
_OPENING = _subs(
    (r"([«“‘„]|`+)", r" \1 "),                     # opening quote characters
    (r'^"', "``"),                                 # a double quote that starts the sentence
    (r"(``)", r" \1 "),
    (r"""([ (\[{<])("|'')""", r"\1 `` "),          # a double quote after space / bracket
    (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2"),  # a quote before a one-letter word ('a), as nltk
)
_PUNCT = _subs(
    (r"""([^.])(\.)([\])}>"'»”’ ]*)\s*$""", r"\1 \2 \3 "),  # sentence-final period
    (r"([:,])([^\d])", r" \1 \2"),                 # , and : except inside numbers (3,36 / 10:30)
    (r"([:,])$", r" \1 "),
    (r"\.{2,}", r" \g<0> "),                       # ellipsis
    (r"[;@#$%&]", r" \g<0> "),
    (r"""([^.])(\.)([\])}>"']*)\s*$""", r"\1 \2\3 "),
    (r"[?!]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "),
    (r"[*]", r" \g<0> "),
    (r"[\][(){}<>]", r" \g<0> "),                  # brackets
    (r"--", r" -- "),
)
_CLOSING = _subs(
    (r"([»”’])", r" \1 "),
    (r"''", " '' "),
    (r'"', " '' "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "),                      # clitics 's 'm 'd
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),          # 'll 're 've n't
)
_SPLIT_WORDS = [re.compile(p) for p in (
    r"(?i)\b(can)(not)\b", r"(?i)\b(d)('ye)\b", r"(?i)\b(gim)(me)\b", r"(?i)\b(gon)(na)\b",
    r"(?i)\b(got)(ta)\b", r"(?i)\b(lem)(me)\b", r"(?i)\b(more)('n)\b", r"(?i)\b(wan)(na)(?=\s)",
    r"(?i) ('t)(is)\b", r"(?i) ('t)(was)\b",
)]
_SENTENCE_END = re.compile(r"""[.?!]+["'”’)\]]*(?=\s)""")


@functools.lru_cache(maxsize=1)
def _punkt():
    """nltk's English punkt sentence splitter (``nltk.sent_tokenize``) when nltk and its punkt data
    are installed (``pip install -e ".[ge]"``, then ``python -m nltk.downloader punkt``), else None."""
    try:
        from nltk.tokenize import sent_tokenize
        sent_tokenize("Data check. Done.")
    except (ImportError, LookupError, OSError):
        return None
    return sent_tokenize


def sentence_splitter() -> str:
    """Which sentence splitter :func:`word_tokenize` uses here (recorded with GE results)."""
    return "nltk punkt" if _punkt() is not None else "editlib rule ([.?!] + whitespace)"


def _sentences(text: str) -> list[str]:
    """nltk's punkt when installed (what ``nltk.word_tokenize`` does), else a split after
    ``.``/``?``/``!`` (and closing quotes/brackets) followed by whitespace: unlike punkt it also
    splits after abbreviations and initials ("Dr. Smith" -> ``Dr``, ``.``, ...)."""
    punkt = _punkt()
    if punkt is not None:
        return punkt(text)
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _tokenize_sentence(s: str) -> list[str]:
    for rules in (_OPENING, _PUNCT):
        for pat, rep in rules:
            s = pat.sub(rep, s)
    s = f" {s} "
    for pat, rep in _CLOSING:
        s = pat.sub(rep, s)
    for pat in _SPLIT_WORDS:
        s = pat.sub(r" \1 \2 ", s)
    return s.split()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``'s words: its Treebank rules re-stated (``tests/test_generation.py``
    checks them against nltk's own tokenizer), per sentence of :func:`_sentences`."""
    return [w for s in _sentences(text) for w in _tokenize_sentence(s)]


# --------------------------------------------------------------------------- n-gram entropy

def _entropy_bits(counts: Counter) -> float:
    """Shannon entropy (bits) of an empirical distribution; 0 for an empty one."""
    if not counts:
        return 0.0
    c = np.fromiter(counts.values(), dtype=np.float64)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Weighted arithmetic mean of the word n-gram entropies, in bits (SPEC §6):
    mean_n(w_n * H_n), i.e. H2/3 + 2*H3/3 with the defaults. Texts shorter than n give H_n = 0."""
    if len(ns) != len(weights):
        raise ValueError("ns and weights must have the same length")
    words = word_tokenize(text)
    hs = [_entropy_bits(Counter(zip(*(words[i:] for i in range(n))))) for n in ns]
    return float(np.mean(np.asarray(hs) * np.asarray(weights, dtype=np.float64)))
