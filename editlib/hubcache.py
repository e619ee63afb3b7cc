"""Stand-ins for paper-scale hub models in a local Hugging Face cache, to run the paper's params
files offline (``tests/test_hub_study.py``, ``bench/paper_notebooks.py``).

:func:`cache_stand_in` writes a small random Llama with the Llama-3 vocabulary and the real Llama-3
tokenizer as the ``refs/main`` snapshot of a hub id (``meta-llama/Meta-Llama-3-8B``) in a
Hugging Face cache directory; with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing there,
``model.id: meta-llama/Meta-Llama-3-8B`` loads it through editlib's real loading code. Scores of a
random model mean nothing: what runs is every line a paper-scale run takes between the params
file and the stored results. :func:`corpus_documents` makes C0 documents out of CounterFact
records (some longer than the stand-in's max positions, so truncation happens).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

__all__ = ["PAPER_STAND_INS", "STAND_IN_REVISION", "cache_paper_stand_ins", "cache_stand_in", "corpus_documents",
           "repo_dir"]

#: the snapshot name ``refs/main`` points to
STAND_IN_REVISION = "0123456789abcdef0123456789abcdef01234567"
#: params/llama3-8b.yaml's two models and what their stand-ins keep of them: Llama-3's RoPE θ and
#: grouped-query attention; Llama-2's θ and one KV head per head (the Llama-3 tokenizer stands in
#: for Llama-2's sentencepiece file, which no package ships)
PAPER_STAND_INS = {"meta-llama/Meta-Llama-3-8B": {"kv_heads": 2, "rope_theta": 500_000.0},
                   "meta-llama/Llama-2-7b-hf": {"kv_heads": 4, "rope_theta": 10_000.0}}


def repo_dir(hub: str | Path, repo_id: str) -> Path:
    """``repo_id``'s folder in the Hugging Face cache ``hub``."""
    return Path(hub) / ("models--" + repo_id.replace("/", "--"))


def cache_stand_in(hub: str | Path, repo_id: str, *, n_layers: int = 2, hidden: int = 32, intermediate: int = 64,
                   heads: int = 4, kv_heads: int = 2, rope_theta: float = 500_000.0, max_positions: int = 512,
                   head_scale: float = 40.0, seed: int = 0) -> Path:
    """Write ``repo_id`` into the Hugging Face cache ``hub`` (a random Llama over the 128,256-token
    Llama-3 vocabulary, BOS 128,000, the real Llama-3 tokenizer); returns the snapshot directory.
    ``head_scale`` multiplies the LM head so that logits spread and an edit moves probabilities
    measurably. The global random state is left as it was."""
    import transformers

    from .llama3_tokenizer import build_llama3_tokenizer

    repo = repo_dir(hub, repo_id)
    snap = repo / "snapshots" / STAND_IN_REVISION
    cfg = transformers.LlamaConfig(vocab_size=128_256, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=n_layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, rope_theta=rope_theta,
                                   max_position_embeddings=max_positions, bos_token_id=128_000,
                                   eos_token_id=128_001, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(snap)
    build_llama3_tokenizer(out_dir=snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(STAND_IN_REVISION)
    return snap


def cache_paper_stand_ins(hub: str | Path, **kw) -> dict[str, Path]:
    """:func:`cache_stand_in` for each of :data:`PAPER_STAND_INS` (``kw``: the shared sizes);
    returns their snapshot directories."""
    return {repo_id: cache_stand_in(hub, repo_id, **shape, **kw) for repo_id, shape in PAPER_STAND_INS.items()}


def corpus_documents(records: Sequence, n_docs: int = 200, per_doc: int = 8) -> list[str]:
    """``n_docs`` texts of ``per_doc`` records' sentences each (the true fact, then its generation
    prompts)."""
    sents = [f"{r.rewrite_prompt.format(r.subject)} {r.target_true.str}. " + " ".join(r.generation_prompts)
             for r in records[:n_docs * per_doc]]
    return [" ".join(sents[i:i + per_doc]) for i in range(0, len(sents), per_doc)]
