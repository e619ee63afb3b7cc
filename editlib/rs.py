"""RS, the generation "reference score" (consistency) of SPEC §6, from ROME's user-supplied files.

RS = cosine similarity of the TF-IDF vectors of (all of a case's generations joined by spaces) and
(all Wikipedia snippets for ``[relation_id][target_new.id]`` in ``attribute_snippets.json`` joined
by spaces). The vectoriser is ROME's (``dsets/tfidf_stats.py``): a scikit-learn ``TfidfVectorizer``
with the precomputed ``idf.npy`` and ``tfidf_vocab.json``, default analyser — lower-case, words
``(?u)\\b\\w\\w+\\b``, raw counts times idf. scikit-learn is not needed: the cosine of the two
vectors is computed here directly (its l2 normalisation does not change a cosine).

Without these files RS is simply absent from the results (never approximated).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .records import Record

FILES = ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


@dataclass(frozen=True)
class RSResources:
    """Snippets by relation and target id, plus the TF-IDF vocabulary and idf weights."""

    snippets: dict[str, dict[str, list[str]]]
    vocab: dict[str, int]
    idf: np.ndarray

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "RSResources":
        """Load ROME's ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json``."""
        d = Path(directory)
        missing = [f for f in FILES if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"RS needs {', '.join(FILES)} in {d}; missing: {', '.join(missing)}")
        snips: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for el in json.loads((d / "attribute_snippets.json").read_text(encoding="utf-8")):
            for s in el["samples"]:
                snips[el["relation_id"]][el["target_id"]].append(s["text"])
        vocab = json.loads((d / "tfidf_vocab.json").read_text(encoding="utf-8"))
        idf = np.load(d / "idf.npy")
        if len(idf) != len(vocab):
            raise ValueError(f"idf.npy has {len(idf)} entries but tfidf_vocab.json has {len(vocab)}")
        return cls({k: dict(v) for k, v in snips.items()}, vocab, idf)

    def vector(self, text: str) -> dict[int, float]:
        """Sparse TF-IDF vector (column -> raw count x idf) of one text."""
        counts = Counter(self.vocab[w] for w in _WORD.findall(text.lower()) if w in self.vocab)
        return {j: c * float(self.idf[j]) for j, c in counts.items()}

    def similarity(self, a: str, b: str) -> float:
        """Cosine of the TF-IDF vectors; NaN when either is all-zero (the reference's 0/0)."""
        va, vb = self.vector(a), self.vector(b)
        na = np.sqrt(sum(v * v for v in va.values()))
        nb = np.sqrt(sum(v * v for v in vb.values()))
        if na == 0 or nb == 0:
            return float("nan")
        return float(sum(v * vb.get(j, 0.0) for j, v in va.items()) / na / nb)

    def reference_texts(self, record: Record) -> list[str]:
        """The snippets about target_new for the record's relation (may be empty)."""
        return list(self.snippets.get(record.relation_id, {}).get(record.target_new.id, []))

    def score(self, record: Record, generations: Sequence[str]) -> float:
        """RS of one case: similarity of its joined generations to its joined reference snippets."""
        return self.similarity(" ".join(generations), " ".join(self.reference_texts(record)))
