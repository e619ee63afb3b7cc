"""Tokenisation conventions, in one place (SPEC §8.1–8.2, §1A "Subject token index").

Rules every module follows:

* A target is scored / trained as ``" " + target`` (leading space added when missing), tokenised
  **without** special tokens; BOS, and the lone "▁" a sentencepiece tokenizer emits for a leading
  space (Llama-2), are dropped. The result never contains BOS (the reference's Llama-3 bug, §8.1).
* A prefix (prompt) is tokenised **with** the tokenizer's special tokens, exactly as the model sees
  it at the start of a text (BOS for Llama); a prompt-plus-target sequence is the concatenation
  ``prefix_ids + target_ids``, so no BOS appears mid-sequence and no boundary is re-tokenised.
* Batches are right-padded with pad = EOS when the tokenizer has no pad token; positions are
  counted from the left.
* The subject's last token inside a filled template is found from token counts:
  ``len(encode(prefix + subject)) - 1`` (correct for the *last* subject token even when a space
  merges into the subject's first token).
"""
from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence, TypeVar

import torch


def prepare_tokenizer(tok):
    """Right padding, pad = EOS when missing. Returns the same tokenizer."""
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an EOS token; set one before editing")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def with_space(target: str) -> str:
    """The target as it follows a prompt: exactly one leading space."""
    return " " + target.lstrip(" ")


#: per tokenizer (weakly held) and vocabulary size: the ids of every prompt-sized text
#: :func:`encode` has seen. The same prompts are encoded again and again (each layer of a layer
#: search builds the values and keys of the same facts; MEMIT and EMMET runs edit the same facts).
#: Bounded: texts longer than _ENCODED_MAX_CHARS (corpus documents) are not kept, and past
#: _ENCODED_MAX texts a tokenizer's memo starts over.
_ENCODED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ENCODED_MAX = 200_000
_ENCODED_MAX_CHARS = 1_000
T = TypeVar("T")


def tokenizer_memo(store: "weakref.WeakKeyDictionary", tok, new: Callable[[], T], size: Callable[[T], int],
                   limit: int, tag: Hashable | None = None) -> T | None:
    """The memo ``store`` keeps for ``tok`` (weakly held) under its vocabulary size (added tokens
    change the ids: a new memo), and ``tag`` when given: made by ``new()`` when missing or past
    ``limit`` entries (``size``). None when ``tok`` cannot key one (not weak-referenceable,
    hashable or sized). :func:`encode`'s ids and editlib.scoring's target caches are kept this way."""
    try:
        per_tok, n = store.setdefault(tok, {}), len(tok)
    except TypeError:
        return None
    key = n if tag is None else (tag, n)
    memo = per_tok.get(key)
    if memo is None or size(memo) > limit:
        memo = per_tok[key] = new()
    return memo


def encode(tok, text: str, *, remember: bool = True) -> list[int]:
    """Token ids of a text at the start of a sequence (with BOS when the tokenizer adds one);
    remembered per tokenizer (tokenisation is deterministic; added tokens start a new memo) unless
    ``remember`` is false or the text is longer than a prompt."""
    def ids_of() -> list[int]:
        return list(tok(text, add_special_tokens=True)["input_ids"])

    if not remember or len(text) > _ENCODED_MAX_CHARS:
        return ids_of()
    memo = tokenizer_memo(_ENCODED, tok, dict, len, _ENCODED_MAX)
    if memo is None:
        return ids_of()
    ids = memo.get(text)
    if ids is None:
        ids = memo[text] = tuple(ids_of())
    return list(ids)


def target_ids(tok, target: str) -> list[int]:
    """Token ids of ``" " + target`` without BOS/special tokens or a lone leading-space piece."""
    ids = list(tok(with_space(target), add_special_tokens=False)["input_ids"])
    special = set(tok.all_special_ids)
    while ids and ids[0] in special:
        ids = ids[1:]
    if len(ids) > 1 and tok.decode(ids[:1], clean_up_tokenization_spaces=False).strip() == "" and \
            str(tok.convert_ids_to_tokens(ids[1])).startswith("\u2581"):
        ids = ids[1:]  # sentencepiece: a lone "▁" for the leading space, then "▁Paris" carries it again
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def bos_offset(tok) -> int:
    """1 when the tokenizer prepends a special token (BOS) to every text, else 0."""
    probe = tok("a", add_special_tokens=True)["input_ids"]
    plain = tok("a", add_special_tokens=False)["input_ids"]
    return len(probe) - len(plain)


def subject_last_index(tok, template: str, subject: str) -> int:
    """Index of the subject's last token in ``encode(template.format(subject))`` (SPEC §1A)."""
    if template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}': {template!r}")
    prefix = template[: template.index("{}")]
    return len(encode(tok, prefix + subject)) - 1


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists (or 1-D integer tensors) into ``(input_ids, attention_mask)`` long tensors."""
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s if isinstance(s, torch.Tensor) else list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def in_context(context: str, prompt: str) -> str:
    """A context template (one ``{}`` for the prompt) with the prompt template put in (SPEC §1A)."""
    return context.replace("{}", prompt, 1)


def filled_ids(tok, template: str, subject: str) -> tuple[list[int], int]:
    """Token ids of ``template.format(subject)`` and the subject's last-token index in them."""
    ids = encode(tok, template.replace("{}", subject, 1))
    idx = subject_last_index(tok, template, subject)
    if not 0 <= idx < len(ids):
        raise ValueError(f"subject {subject!r} not found inside {template!r}")
    return ids, idx
