"""Covariance statistics C0 = E[k kᵀ] of the edited down-projection's input (SPEC §4).

* k is the **input** of ``arch.down_proj(model, layer)`` at every non-padding token; the statistic
  is the uncentred second moment Σkkᵀ / count (the reference's ``SecondMoment``).
* One forward pass per batch collects every requested layer at once and stops right after the
  deepest one (SPEC §9 "all needed layers in one pass"); accumulation is float64 by default
  (SPEC §8.4: the reference used float32).
* Corpora (:class:`CorpusSpec`): a Hugging Face dataset (the reference's Wikipedia/wikitext), a
  UTF-8 text file, or — offline — the record set's own fact sentences
  (:func:`records_corpus_texts`). A fixed pseudo-random subset of ``n_samples`` texts is drawn as
  the reference does (``random.Random(1)`` shuffle of all indices, first n).
* Corpora are articles (SPEC §4, §8.7): empty texts are dropped (a BOS-only sequence would
  over-weight BOS), wikitext's line rows can be regrouped into articles by their `` = Title = ``
  heading lines (``group: wikitext_articles``), and each text is truncated to the model's maximum
  positions (8192 for Llama-3), as the reference does, unless ``max_length`` says otherwise.
* Arithmetic: Σkkᵀ is symmetric, so above ``GRAM_BLOCK`` columns only its block upper triangle is
  accumulated (block row i: K_iᵀ K_{i:}, one GEMM each) and mirrored once at the end:
  (about (b + 1) / 2b of the full product's FLOPs for b column blocks: 57 % at d_in = 14336, b = 7).
  Every entry is the same sum over tokens; smaller layers (the miniature's) use one full GEMM.
* Memory: the requested layers are collected in passes of at most ``layers_per_pass`` layers, sized
  from free memory (one float64 d_in×d_in accumulator per layer lives on the model's device), and
  each layer's inputs are accumulated inside the forward hook, so no layer's activations are kept.
* Cache: one safetensors file per (model fingerprint, layer, corpus, sample budget, dtype) holding
  the raw sum and the token count (the reference's npz layout, SPEC §4), with the full key in the
  metadata and the sha256 of the stored bytes (a damaged entry is recomputed with a warning naming
  the file). Never pickled. The fingerprint is the *unedited* model's (the caller passes it), so a
  resumed sequential run that reloaded edited weights still finds its statistics.
* Concurrency: an entry is computed under an exclusive ``flock`` on ``<entry>.lock`` next to it, and
  the cache is checked again once the lock is held, so processes that need the same C0 at the same
  time (executor workers, issue #14) compute it once: the others wait and read it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from .progress import progress as progress_bar

from . import arch
from .nethook import TraceDict
from .numerics import cache_tag
from .solver import eig_or_cpu
from .tf32 import tf32_applies, tf32_matmuls
from .tokens import encode, pad_right

__all__ = [
    "CorpusSpec",
    "CorpusUnavailable",
    "CovCacheError",
    "CovStats",
    "GRAM_BLOCK",
    "TC_CHUNK_TOKENS",
    "add_gram",
    "fast_gram_applies",
    "products_16bit",
    "c0_numerics",
    "collect_second_moments",
    "corpus_c0_cached",
    "encode_corpus",
    "gram_blocks",
    "gram_chunk",
    "gram_macs",
    "pack_upper",
    "symmetrize_upper",
    "unpack_upper",
    "default_max_length",
    "iter_corpus",
    "layer_covariance",
    "group_wikitext_articles",
    "layers_per_pass",
    "records_corpus_texts",
]

CACHE_FORMAT = "editlib-cov-v1"
SUBSET_SEED = 1  # the reference's FixedRandomSubsetSampler seed (SPEC §4)
SENTENCES_PER_DOC = 8
MAX_LENGTH_CAP = 1024
LOW_TOKENS_FACTOR = 100  # warn below 100·d_in tokens (SPEC §4 note)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class CorpusUnavailable(RuntimeError):
    """The covariance corpus could not be loaded (e.g. a HF dataset while offline)."""


class CovCacheError(RuntimeError):
    """A covariance cache file exists but cannot be read; the message names the file."""


# --------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class CorpusSpec:
    """Which texts C0 is computed on (SPEC §4 "Data", "Sampling", "Tokenisation").

    ``n_samples``: number of texts (articles) used, a fixed ``random.Random(1)`` subset; None = all.
    ``max_length``: per-text token truncation; None = the model's max positions (8192 for
    Llama-3; 1024 when its config names none: :func:`default_max_length`).
    """

    kind: str
    name: str | None = None  # hf_dataset, e.g. "wikitext"
    config: str | None = None  # hf_dataset, e.g. "wikitext-103-raw-v1"
    split: str = "train"
    text_field: str = "text"
    path: str | None = None  # text_file
    n_samples: int | None = None
    max_length: int | None = None
    data_files: str | None = None  # hf_dataset: local files of a generic builder (name "parquet", "text", ...)
    group: str | None = None  # "wikitext_articles": join wikitext line rows into articles

    def __post_init__(self) -> None:
        if self.kind not in ("records", "text_file", "hf_dataset"):
            raise ValueError(f"corpus kind must be 'records', 'text_file' or 'hf_dataset', got {self.kind!r}")
        if self.group not in (None, "wikitext_articles"):
            raise ValueError(f"corpus group must be null or 'wikitext_articles', got {self.group!r}")
        if self.kind == "hf_dataset" and not self.name:
            raise ValueError("an hf_dataset corpus needs a dataset name (e.g. 'wikitext')")
        if self.kind == "text_file" and not self.path:
            raise ValueError("a text_file corpus needs a path")
        for field_name in ("n_samples", "max_length"):
            v = getattr(self, field_name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{field_name} must be a positive int or None, got {v!r}")

    def key(self) -> str:
        """Short stable file-name-safe id of the corpus (without the sample budget)."""
        if self.kind == "hf_dataset":
            parts = ["hf", self.name, self.config or "default", self.split]
            if self.text_field != "text":
                parts.append(self.text_field)
            if self.data_files:
                parts.append(hashlib.sha256(str(self.data_files).encode()).hexdigest()[:8])
            if self.group:
                parts.append(self.group)
        elif self.kind == "text_file":
            parts = ["file", Path(str(self.path)).stem]
        else:
            parts = ["records"]
        if self.max_length is not None:
            parts.append(f"len{self.max_length}")
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(str(p) for p in parts))
        if len(key) > 80:
            key = key[:63] + "-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return key


def records_corpus_texts(records: Sequence) -> list[str]:
    """The record set's true-fact sentences (:func:`editlib.tiny.fact_units`) as documents of up to
    8 sentences joined by ". ", so contexts look like the miniature's training text. Deterministic."""
    from .tiny import fact_units

    units = fact_units(records)
    random.Random(0).shuffle(units)
    return [". ".join(units[i:i + SENTENCES_PER_DOC]) + "."
            for i in range(0, len(units), SENTENCES_PER_DOC)]


def _subset(n_total: int, n_samples: int | None) -> list[int]:
    """Indices used: all in order, or the reference's fixed random subset (SPEC §4 "Sampling")."""
    if n_samples is None or n_samples >= n_total:
        return list(range(n_total))
    order = list(range(n_total))
    random.Random(SUBSET_SEED).shuffle(order)
    return order[:n_samples]


def _read_paragraphs(path: str) -> list[str]:
    """A text file's texts: blocks separated by blank lines (a document may span many lines). A
    file of many lines without a blank one is one text, cut at the truncation length: warned."""
    text = Path(path).read_text(encoding="utf-8")
    out = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    lines = sum(1 for l in text.splitlines() if l.strip())
    if len(out) == 1 and lines > 1:
        warnings.warn(f"covariance text_file {path} is one text of {lines} lines: its texts are separated by "
                      "blank lines (put an empty line between texts)",
                      RuntimeWarning, stacklevel=3)
    return out


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def group_wikitext_articles(lines: Sequence[str]) -> list[str]:
    """wikitext rows (one line each, headings like `` = Title = `` and `` = = Section = = ``) joined
    into one text per article; an article starts at each top-level `` = Title = `` line."""
    articles: list[list[str]] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line.rstrip("\n")):
            articles.append([])
        if not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a) for a in articles]


def _load_hf_rows(spec: CorpusSpec) -> list[str]:
    what = f"Hugging Face dataset {spec.name!r} (config {spec.config!r}, split {spec.split!r})"
    hint = ("Offline, use CorpusSpec(kind='records') (the record set's fact sentences), "
            "CorpusSpec(kind='text_file', path=...) or a local parquet file "
            "(kind='hf_dataset', name='parquet', data_files=...) instead.")
    try:
        import datasets

        kw = {"data_files": spec.data_files} if spec.data_files else {}
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, **kw)
    except Exception as exc:  # offline, missing script support, unknown name, ...
        raise CorpusUnavailable(f"could not load the {what}: {type(exc).__name__}: {exc}. {hint}") from None
    if spec.text_field not in ds.column_names:
        raise CorpusUnavailable(f"the {what} has no column {spec.text_field!r} (columns: {ds.column_names})")
    if spec.group:  # rows are lines: every row is needed to rebuild the articles
        return [str(t) for t in ds[spec.text_field]]
    return [str(t) for t in ds.select(_subset(len(ds), spec.n_samples))[spec.text_field]]


def iter_corpus(spec: CorpusSpec, records: Sequence | None = None) -> list[str]:
    """The texts of a corpus: articles (regrouped when ``group`` says so), the fixed ``n_samples``
    subset (SPEC §4), empty texts dropped."""
    if spec.kind == "hf_dataset":
        texts = _load_hf_rows(spec)
        if not spec.group:  # already subset by row (= article) index, as the reference samples
            return [t for t in texts if t.strip()]
    elif spec.kind == "text_file":
        texts = _read_paragraphs(str(spec.path))
    else:
        if records is None:
            raise ValueError("a 'records' corpus needs the records (pass records=...)")
        texts = records_corpus_texts(records)
    if spec.group == "wikitext_articles":
        texts = group_wikitext_articles(texts)
    texts = [t for t in texts if t.strip()]
    if spec.n_samples and spec.n_samples > len(texts):
        warnings.warn(f"covariance.n_samples {spec.n_samples} but the {spec.kind} corpus holds {len(texts)} "
                      "texts: C0 uses them all", RuntimeWarning, stacklevel=2)
    return [texts[i] for i in _subset(len(texts), spec.n_samples)]


# --------------------------------------------------------------------------- collection


def default_max_length(model) -> int:
    """The model's maximum positions (8192 for Llama-3, 4096 Llama-2, 1024 GPT-2): the reference
    truncates every article there (SPEC §4 "Tokenisation"); 1024 when the config names none."""
    return arch.max_positions(model.config) or MAX_LENGTH_CAP


def encode_corpus(tok, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    """Each text's ids (BOS first, truncated to ``max_length``) as an int32 tensor; a text that gives
    no ids is dropped. Compact: a 100,000-document corpus held as Python int lists takes gigabytes."""
    out = []
    for t in texts:
        ids = encode(tok, t, remember=False)[:max_length]
        if ids:
            out.append(torch.tensor(ids, dtype=torch.int32))
    return out


def _batches(seqs: Sequence[Sequence[int]], batch_size: int, max_batch_tokens: int | None) -> list[list[list[int]]]:
    """Length-sorted (longest first, so OOM shows at once) batches of ≤ batch_size sequences whose
    padded size stays ≤ max_batch_tokens (the reference's length_collation idea)."""
    seqs = sorted(seqs, key=len, reverse=True)
    out: list[list[list[int]]] = []
    for s in seqs:
        cur = out[-1] if out else None
        width = len(cur[0]) if cur else 0  # longest first ⇒ the first sequence sets the width
        if cur is not None and len(cur) < batch_size and (
                max_batch_tokens is None or width * (len(cur) + 1) <= max_batch_tokens):
            cur.append(s)
        else:
            out.append([s])
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def free_bytes(device: torch.device) -> int:
    """Free memory where the accumulators live: the CUDA device's free memory, counting the blocks
    torch's allocator holds but no tensor uses (after an earlier model or experiment in the same
    process they can be tens of GB, which ``mem_get_info`` reports as used), else the host's
    available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + max(0, int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device)))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def layers_per_pass(d_in: int, device: torch.device, dtype: torch.dtype = torch.float64, *,
                    override: int | None = None, fraction: float = 0.5) -> int:
    """How many d_in×d_in accumulators fit in ``fraction`` of the free memory (≥ 1), or
    ``override``. At d_in = 14336 one float64 accumulator is 1.64 GB: 32 of them do not fit beside
    Llama-3-8B on an 80 GB GPU (SPEC §8.6)."""
    if override is not None:
        if override < 1:
            raise ValueError(f"layers_per_pass must be >= 1, got {override}")
        return int(override)
    per = d_in * d_in * torch.tensor([], dtype=dtype).element_size()
    return max(1, int(free_bytes(device) * fraction) // per)


#: column-block width of the block-triangular Σkkᵀ; layers with at most this many inputs use one GEMM
GRAM_BLOCK = 2048


def pass_groups(layers: Sequence[int], per: int) -> list[list[int]]:
    """``layers`` (sorted) in passes of at most ``per``, the short remainder *first*: a pass runs
    the model up to its deepest layer (:func:`collect_second_moments` stops there), and the last
    pass reaches the deepest layer anyway, so every earlier pass should stop as shallow as it can
    (32 layers at 15 per pass: 2.41 forwards of the corpus bottom-up, 1.59 this way). Each layer's
    sum is the same in any grouping."""
    if per < 1:
        raise ValueError(f"layers per pass must be positive, got {per}")
    if len(layers) == 0:
        return []
    first = len(layers) % per or per
    return [list(layers[:first])] + [list(layers[i:i + per]) for i in range(first, len(layers), per)]


def gram_blocks(d: int) -> int:
    """Column blocks of the block-triangular accumulation of a d × d Gram matrix (1: one full GEMM)."""
    return 1 if d <= GRAM_BLOCK else math.ceil(d / GRAM_BLOCK)


def _gram_edges(d: int) -> list[int]:
    b = gram_blocks(d)
    return [round(i * d / b) for i in range(b + 1)]


def gram_macs(d: int) -> int:
    """Multiply-adds per token of :func:`add_gram` on d inputs (d² for one full GEMM)."""
    e = _gram_edges(d)
    return sum((hi - lo) * (d - lo) for lo, hi in zip(e[:-1], e[1:]))


#: tokens per tensor-core product of fast_gram on CUDA. Tensor cores add products into their
#: float32 sums by truncation, not rounding (published measurements of V100 to H100 tensor cores),
#: a bias that grows with the number of tokens summed: simulated on bfloat16 keys, a relative
#: 2.5e-6 at 1,024 tokens, 1.0e-5 at 4,096 and 6.8e-5 over a 24,576-token batch, against 2e-7
#: to 8e-7 when rounding. The batch is therefore taken in products of this many tokens, added
#: together in rounded float32 (the TF32 GEMMs' epilogues, or adds after the 16-bit products; about
#: 5e-6 at most). On the CPU (rounded float32 FMAs) a batch is one product.
TC_CHUNK_TOKENS = 2048
#: activation dtypes whose products are exact in float32 (and on TF32 tensor cores: 10-bit mantissas)
EXACT_IN_TF32 = (torch.bfloat16, torch.float16)


def gram_chunk(feats: torch.Tensor) -> int:
    """Tokens per product of :func:`add_gram`: :data:`TC_CHUNK_TOKENS` for float32 or 16-bit
    ``feats`` on CUDA (fast_gram's tensor-core products, also when the accumulator is float32 as
    well), the whole batch elsewhere (float64 products, the CPU)."""
    tensor_cores = feats.device.type == "cuda" and feats.dtype in (torch.float32, *EXACT_IN_TF32)
    return TC_CHUNK_TOKENS if tensor_cores else max(feats.shape[0], 1)


def _mm16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of 16-bit matrices with a float32 result (16-bit tensor cores, float32 sums)."""
    return torch.mm(a, b, out_dtype=torch.float32)


_MM16: dict[tuple[torch.device, torch.dtype], bool] = {}


def _takes_16bit_products(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`_mm16` multiplies ``dtype`` keys on ``device`` as :func:`add_gram` lays them
    out (a transposed column block times a column slice, neither contiguous), giving float32."""
    try:
        k = torch.ones(6, 4, device=device, dtype=dtype)
        return _mm16(k[:, 1:3].T, k[:, 1:]).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError, AssertionError):
        return False


def products_16bit(device, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether fast_gram takes its products of ``dtype`` keys on 16-bit tensor cores on ``device``:
    CUDA with a torch whose ``torch.mm`` gives a float32 result of 16-bit matrices (``out_dtype``,
    CUDA only), checked once per device and dtype on :func:`add_gram`'s layouts. The products are
    exact either way and summed in float32 (the GEMM's own sums are float32 for a float32 result);
    a 16-bit tensor core multiplies at twice the TF32 rate (an H200: 989 against 495 TFLOP/s) and
    reads half the bytes. Elsewhere the keys are made float32 and multiplied on TF32 tensor cores
    (CUDA) or the CPU."""
    d = torch.device(device)
    if d.type != "cuda" or dtype not in EXACT_IN_TF32:
        return False
    if (d, dtype) not in _MM16:
        _MM16[d, dtype] = _takes_16bit_products(d, dtype)
    return _MM16[d, dtype]


def add_gram(acc: torch.Tensor, feats: torch.Tensor, *, chunk_tokens: int | None = None) -> None:
    """``acc += featsᵀ feats`` on the block upper triangle only (the whole matrix when
    :func:`gram_blocks` is 1); :func:`symmetrize_upper` completes it once all batches are in.
    Each block's product is taken in ``feats``' dtype (16-bit ``feats``: float32 products of them,
    :func:`products_16bit`), ``chunk_tokens`` tokens at a time (:func:`gram_chunk`), and added into
    ``acc`` (straight into it when the batch is one product of ``acc``'s dtype)."""
    d, n = feats.shape[1], feats.shape[0]
    chunk = gram_chunk(feats) if chunk_tokens is None else chunk_tokens
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk}")
    edges = _gram_edges(d)
    half = feats.dtype in EXACT_IN_TF32
    for lo, hi in zip(edges[:-1], edges[1:]):
        blk, rows = acc[lo:hi, lo:], feats[:, lo:hi].T
        if half:  # float32 products of 16-bit keys, a float32 sum per chunk (fast_gram on 16-bit tensor cores)
            part = _mm16(rows[:, :chunk], feats[:chunk, lo:])
            for t in range(chunk, n, chunk):
                part.add_(_mm16(rows[:, t:t + chunk], feats[t:t + chunk, lo:]))
            blk.add_(part)
            continue
        if feats.dtype == acc.dtype and chunk >= n:
            blk.addmm_(rows, feats[:, lo:])
            continue
        part = rows[:, :chunk] @ feats[:chunk, lo:]
        for t in range(chunk, n, chunk):
            part.addmm_(rows[:, t:t + chunk], feats[t:t + chunk, lo:])
        blk.add_(part)


def fast_gram_applies(requested: bool, act_dtype: torch.dtype) -> bool:
    """Whether ``covariance.fast_gram`` applies: requested, and the model's activations are 16-bit.

    Then each batch's Σkkᵀ is taken in float32 (on CUDA on 16-bit tensor cores,
    :func:`products_16bit`, else TF32 ones) and added into the float64 (``covariance.dtype``)
    accumulator. The products of bfloat16/float16 numbers are exact in float32 and in TF32's
    multipliers, so the only difference from the float64 product is that the
    sum over one batch's tokens (≤ ``max_batch_tokens``) is accumulated in float32 (the reference
    accumulates the whole corpus in float32): on the CPU 1.1e-7 relative at 1,024 tokens, 1.5e-7 at
    4,096 (``bench/bench_gram.py --fast-gram``). Tensor cores truncate their float32 sums, so on
    CUDA a batch is summed in products of :data:`TC_CHUNK_TOKENS` tokens; not yet measured on a GPU
    (``--device cuda --tokens 24576`` measures it). On an H200 this is 989 (16-bit tensor cores)
    or 495 (TF32) against 67 TFLOP/s (docs/paper-scale.md). float32 activations keep the float64
    product: TF32 would round them (and outside fast_gram C0's products run with TF32 off whatever
    ``model.tf32`` says, also those of a float32 ``covariance.dtype``)."""
    return bool(requested) and act_dtype in EXACT_IN_TF32


def pack_upper(m: torch.Tensor) -> torch.Tensor:
    """The upper triangle of square ``m``, row by row (d(d+1)/2 entries)."""
    return torch.cat([m[i, i:] for i in range(m.shape[0])])


def unpack_upper(v: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric d × d matrix whose upper triangle :func:`pack_upper` gave as ``v``."""
    out = torch.empty(d, d, dtype=v.dtype)
    at = 0
    for i in range(d):
        row = v[at:at + d - i]
        out[i, i:] = row
        out[i + 1:, i] = row[1:]
        at += d - i
    return out


def symmetrize_upper(acc: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is ``acc``'s (after :func:`add_gram`), in place; a
    matrix accumulated in one block is returned as it is. The lower triangle is copied from the
    upper one ``rows`` rows at a time, so no d × d temporary is made (at Llama-3-8B's d_in a
    float64 one is 1.64 GB beside C0 on the host); bit for bit what ``triu(acc) + triu(acc, 1)ᵀ``
    gives, -0.0 included (that sum turns it into +0.0, as the closing ``add_(0.0)`` does)."""
    d = acc.shape[0]
    if gram_blocks(d) == 1:
        return acc
    for r0 in range(0, d, rows):
        r1 = min(r0 + rows, d)
        block = acc[r0:r1, r0:r1]
        block.copy_(block.triu() + block.triu(1).T)  # the diagonal block: rows² temporaries
        acc[r0:r1, :r0] = acc[:r0, r0:r1].T  # strictly lower from strictly upper: disjoint entries
    return acc.add_(0.0)


@torch.no_grad()
def collect_second_moments(model, tok, texts: Sequence[str], layers: Sequence[int], *,
                           batch_size: int = 16, max_length: int | None = None,
                           max_batch_tokens: int | None = None, dtype: torch.dtype = torch.float64,
                           progress: bool = True, gram32: bool = False,
                           on_device: bool = False,
                           encoded: Sequence[torch.Tensor] | None = None) -> dict[int, tuple[torch.Tensor, int]]:
    """Σ kkᵀ and the token count of every layer's down-projection input over ``texts``.

    One forward pass per batch serves all ``layers`` (stopped after the deepest); each layer's
    input is accumulated inside its hook (non-padding tokens only) and then dropped. Texts are
    encoded with BOS and truncated to ``max_length``, right-padded. Sums are returned on CPU in
    ``dtype``, or with ``on_device`` left on the model's device, so that a caller can bring them to
    the host one at a time (a pass of 32 Llama-3-8B layers is 53 GB of float64). ``gram32``
    (16-bit activations only, :func:`fast_gram_applies`): each batch's product in float32, on
    16-bit tensor cores on CUDA where torch has them (:func:`products_16bit`), else TF32 ones.
    ``encoded``: the texts' ids from :func:`encode_corpus` (with the same
    ``max_length``), so that a corpus read in several passes is tokenised once.
    """
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise ValueError("no layers requested")
    spec = arch.arch_for(model)
    d_in = {l: arch.key_dim(model, l) for l in layers}  # also validates the layer range
    names = {spec.down_name(l): l for l in layers}
    max_length = max_length or default_max_length(model)
    seqs = encoded if encoded is not None else encode_corpus(tok, texts, max_length)
    if not seqs:
        raise ValueError("the corpus yields no tokens")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    sums = {l: torch.zeros(d_in[l], d_in[l], dtype=dtype, device=device) for l in layers}
    count = 0
    keep: torch.Tensor | None = None

    half = gram32 and products_16bit(device, arch.edit_weight(model, layers[0]).dtype)  # on 16-bit tensor cores

    def accumulate(x: torch.Tensor, name: str) -> None:
        if gram32 and x.dtype not in EXACT_IN_TF32:
            raise ValueError(f"gram32 needs 16-bit activations, {name} gives {x.dtype}")
        feats = x[keep]  # [tokens, d_in], non-padding only
        feats = feats if half else feats.to(torch.float32 if gram32 else dtype)
        # TF32 only for fast_gram's exact 16-bit products: model.tf32 must not round C0's float32
        # products (covariance.dtype: float32); the key records only a forward under TF32
        with tf32_matmuls(device, on=gram32):
            add_gram(sums[names[name]], feats)

    for batch in progress_bar(_batches(seqs, batch_size, max_batch_tokens), desc="C0 stats",
                      unit="batch", disable=not progress):
        ids, mask = pad_right(batch, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        keep = mask.bool()
        with TraceDict(model, list(names), retain_output=False, stop=True, on_input=accumulate):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        count += int(keep.sum())
    return {l: (sums[l] if on_device else symmetrize_upper(sums[l].cpu()), count) for l in layers}


# --------------------------------------------------------------------------- cache


@dataclass
class CovStats:
    """C0 of one layer: ``mom2`` = E[kkᵀ] (float64), from ``count`` tokens; ``key`` = cache key."""

    layer: int
    mom2: torch.Tensor
    count: int
    cond: float
    key: dict


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


#: (batch_size, max_batch_tokens) of :func:`layer_covariance`'s defaults (and of ``covariance``'s
#: params), which entries collected that way are keyed without.
DEFAULT_BATCHING: tuple[int, int | None] = (16, None)


def _batching_tag(batch_size: int, max_batch_tokens: int | None) -> str | None:
    """How a corpus is cut into forward batches, when not :data:`DEFAULT_BATCHING`: each batch's
    Σkkᵀ is one product added to the sum, so another cut sums in another order and moves C0's
    last bits (and a 16-bit model's float32 per-batch products by more)."""
    if (int(batch_size), max_batch_tokens) == DEFAULT_BATCHING:
        return None
    return f"b{int(batch_size)}" + (f"t{int(max_batch_tokens)}" if max_batch_tokens is not None else "")


def _cache_key(fp: str, layer: int, module: str, corpus: CorpusSpec, max_length: int,
               dtype: str, texts_sha: str, gram: str | None = None, numerics: str | None = None,
               batching: str | None = None, tf32: bool = False) -> dict:
    """Everything C0 depends on; stored in (and compared against) the file metadata (``gram``
    only for :func:`fast_gram_applies` sums: "float32" for float32 products of the 16-bit keys
    (the CPU, TF32 tensor cores), "16bit" for products on 16-bit tensor cores (:func:`products_16bit`;
    the same exact products, summed in float32 by other hardware), ``numerics`` only under portable numerics
    (:func:`editlib.numerics.cache_tag`), ``batching`` only for another cut than the default
    (:func:`_batching_tag`) and ``forward`` only for keys from a forward on TF32 tensor cores
    (:func:`editlib.tf32.tf32_applies`), so the entries of earlier versions keep their keys)."""
    return ({"gram": gram} if gram else {}) | ({"numerics": numerics} if numerics else {}) | (
        {"batching": batching} if batching else {}) | ({"forward": "tf32"} if tf32 else {}) | {
        "format": CACHE_FORMAT,
        "fingerprint": fp,
        "layer": str(layer),
        "module": module,
        "corpus": corpus.key(),
        "n_samples": str(corpus.n_samples) if corpus.n_samples else "all",
        "max_length": str(max_length),
        "dtype": dtype,
        "texts_sha256": texts_sha,
    }


def c0_numerics(device: torch.device | str) -> str | None:
    """The numerics a C0 entry computed on ``device`` is keyed by: :func:`editlib.numerics.cache_tag`
    on the CPU, None on a GPU (portable numerics pin the CPU's kernels only)."""
    return cache_tag() if torch.device(device).type == "cpu" else None


def _numerics_suffix(numerics: str | None) -> str:
    return f"_{numerics}" if numerics else ""


def _cache_path(root: Path, key: dict) -> Path:
    gram = {None: "", "float32": "_gram32", "16bit": "_gram16"}[key.get("gram")]
    fwd = "_tf32" if key.get("forward") else ""
    num = _numerics_suffix(key.get("numerics"))
    cut = f"_{key['batching']}" if key.get("batching") else ""
    name = f"{key['module']}_{key['dtype']}{gram}{fwd}_{key['corpus']}_n{key['n_samples']}{cut}{num}.safetensors"
    return root / name


def corpus_c0_cached(root: Path, corpus_key: str, device: torch.device | str) -> bool:
    """Whether the stats cache ``root`` holds a C0 entry of corpus ``corpus_key`` (any model, layer,
    sample count or batching) that a run on ``device`` would read: one of this process's numerics
    (:func:`c0_numerics`), named as :func:`_cache_path` names it."""
    pattern = re.compile(rf".*_{re.escape(corpus_key)}_n[^_]+(_b[0-9]+(t[0-9]+)?)?"
                         rf"{re.escape(_numerics_suffix(c0_numerics(device)))}\.safetensors")
    return root.is_dir() and any(pattern.fullmatch(f.name) for f in root.glob("*/*.safetensors"))


def _checksum(total: torch.Tensor, count: int) -> str:
    """sha256 of the stored sum's bytes and the token count (kept in the entry's metadata)."""
    h = hashlib.sha256(total.detach().contiguous().cpu().numpy().data)
    h.update(str(int(count)).encode())
    return h.hexdigest()


def _read_key(path: Path) -> dict:
    """The metadata key of a cache file (header only); :class:`CovCacheError` when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return json.loads((f.metadata() or {})["key"])
    except Exception as exc:  # any damage to the header: the caller recomputes the entry
        raise CovCacheError(f"covariance cache file {path} is unreadable or corrupt "
                            f"({type(exc).__name__}: {exc})") from None


def _read_cache(path: Path) -> tuple[dict, torch.Tensor, int, float]:
    """(key, mom2_sum, count, cond) of a cache file; a file that cannot be read, is malformed or
    fails its stored sha256 raises :class:`CovCacheError` naming it. Entries written before
    checksums existed are accepted only when finite."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            key = json.loads(meta["key"])
            packed = "mom2_upper" in f.keys()
            total = f.get_tensor("mom2_upper" if packed else "mom2_sum")
            count = int(f.get_tensor("count").reshape(-1)[0])
            d = int(meta["d"]) if packed else None
        cond = float(meta.get("cond", "nan"))
    except Exception as exc:  # any damage to the file: the caller recomputes the entry
        raise CovCacheError(f"covariance cache file {path} is unreadable or corrupt "
                            f"({type(exc).__name__}: {exc})") from None
    stored = meta.get("sha256")
    if packed:  # checked as stored (a triangle always has a checksum), then unfolded
        well_formed = total.dim() == 1 and total.numel() == d * (d + 1) // 2
        what = f"mom2_upper {tuple(total.shape)} for d {d}"
    else:
        well_formed = total.dim() == 2 and total.shape[0] == total.shape[1]
        what = f"mom2_sum {tuple(total.shape)}"
    if not well_formed or count <= 0:
        raise CovCacheError(f"covariance cache file {path} holds a malformed statistic ({what}, count {count})")
    if (packed or stored is not None) and stored != _checksum(total, count):
        raise CovCacheError(f"covariance cache file {path} fails its sha256 check (the file changed "
                            "after it was written)")
    if stored is None and not bool(torch.isfinite(total).all()):
        raise CovCacheError(f"covariance cache file {path} holds NaN/Inf")
    return key, unpack_upper(total, d) if packed else total, count, cond


def _write_cache(path: Path, key: dict, total: torch.Tensor, count: int, cond: float) -> None:
    """Atomic write (temp file + os.replace) of the raw sum, the count and the key. A sum
    accumulated in blocks (:func:`symmetrize_upper`: above ``GRAM_BLOCK`` inputs) is exactly
    symmetric, so only its upper triangle is stored: half the disk (0.82 instead of 1.64 GB per
    Llama-3-8B layer), read back bit for bit."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        total = total.contiguous().cpu()
        meta = {"key": json.dumps(key, sort_keys=True), "cond": repr(cond)}
        if gram_blocks(total.shape[0]) > 1 and torch.equal(total, total.T):
            name, total, meta["d"] = "mom2_upper", pack_upper(total), str(total.shape[0])
        else:
            name = "mom2_sum"
        save_file({name: total, "count": torch.tensor([count], dtype=torch.int64)}, tmp,
                  metadata={**meta, "sha256": _checksum(total, count)})
        from .store import apply_umask  # shared caches: the user's umask, not mkstemp's 0600

        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cond(mom2: torch.Tensor, device: torch.device) -> float:
    """Exact condition number from all eigenvalues: O(d_in³), opt-in (``cond=True``)."""
    eig = eig_or_cpu(torch.linalg.eigvalsh, mom2.to(device=device, dtype=torch.float64))
    lo, hi = eig.min().item(), eig.max().item()
    return hi / lo if lo > 0 else math.inf


def _report(stats: CovStats, d_in: int, source: str, log: Callable[[str], None]) -> None:
    cond = "" if math.isnan(stats.cond) else f", cond={stats.cond:.3g}"
    log(f"C0 layer {stats.layer} ({source}): {stats.count} tokens, d_in={d_in}{cond}")
    if stats.count < LOW_TOKENS_FACTOR * d_in:
        warnings.warn(f"C0 of layer {stats.layer} comes from only {stats.count} tokens "
                      f"(< {LOW_TOKENS_FACTOR}·d_in = {LOW_TOKENS_FACTOR * d_in}); it may be poorly "
                      f"estimated / ill-conditioned (docs/methods.md, C0)", RuntimeWarning, stacklevel=3)


def layer_covariance(model, tok, layers: Sequence[int], corpus: CorpusSpec, *,
                     records: Sequence | None = None, cache_dir: str | os.PathLike | None = None,
                     dtype: str = "float64", batch_size: int = 16, max_batch_tokens: int | None = None,
                     progress: bool = True, log: Callable[[str], None] = print,
                     fingerprint: str | None = None, max_layers_per_pass: int | None = None,
                     load: bool = True, cond: bool = False, fast_gram: bool = False) -> dict[int, CovStats]:
    """C0 for each layer, loaded from the cache or collected (missing layers in as few passes as
    memory allows, see :func:`layers_per_pass`; ``max_layers_per_pass`` overrides the estimate).

    Cache: ``<cache_dir or editlib.counterfact.cache_dir()/stats>/<fingerprint>/<module>_<dtype>_
    <corpus key>_n<samples>.safetensors``. ``fingerprint`` should be the *unedited* model's (default:
    the model's current weights). A file whose metadata key differs is recomputed and atomically
    overwritten; an unreadable or corrupt file (it fails its stored sha256) is recomputed with a
    warning naming it. ``load=False`` only makes sure
    every layer is cached and returns {} (nothing kept in memory: a 32-layer search at d_in = 14336
    would otherwise hold 52 GB). ``cond=True`` adds the exact condition number (O(d_in³) per layer).
    ``fast_gram``: see :func:`fast_gram_applies` (applies to 16-bit models only; its entries are cached apart).
    """
    from .counterfact import cache_dir as default_cache
    from .models import fingerprint as model_fingerprint

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    layers = sorted(set(int(l) for l in layers))
    spec = arch.arch_for(model)
    fp = fingerprint or model_fingerprint(model)
    root = (Path(cache_dir) if cache_dir is not None else default_cache() / "stats") / fp
    max_length = corpus.max_length or default_max_length(model)
    if max_batch_tokens is not None and max_batch_tokens < max_length:  # a batch holds at least one text
        raise ValueError(f"covariance.max_batch_tokens ({max_batch_tokens}) is below the texts' max length "
                         f"({max_length}, the model's positions unless covariance.max_length sets it): a text "
                         "of that length alone would pass it; raise it or set covariance.max_length")
    texts = None if corpus.kind == "hf_dataset" else iter_corpus(corpus, records)
    texts_sha = _texts_digest(texts) if texts is not None else ""
    device = _device(model)
    gram32 = bool(fast_gram and layers) and fast_gram_applies(fast_gram, arch.edit_weight(model, layers[0]).dtype)
    numerics_tag = c0_numerics(device)
    # the products are IEEE whatever model.tf32 says (tf32_matmuls below), but the forward that
    # produces the keys runs under it: a float32 model's keys then differ by ~1e-3
    forward_tf32 = tf32_applies(model)
    gram = ("16bit" if products_16bit(device, arch.edit_weight(model, layers[0]).dtype) else "float32") if gram32 else None
    if gram32:
        log("C0: float32 products per batch (16-bit activations; covariance.fast_gram"
            + (", on 16-bit tensor cores)" if gram == "16bit" else ")"))

    def stats_of(l: int, key: dict, total: torch.Tensor, count: int, stored_cond: float, source: str) -> CovStats:
        mom2 = total.to(torch.float64) / count
        c = stored_cond if not math.isnan(stored_cond) else (_cond(mom2, device) if cond else math.nan)
        st = CovStats(l, mom2, count, c, key)
        _report(st, mom2.shape[0], source, log)
        return st

    out: dict[int, CovStats] = {}

    def usable(l: int, key: dict, path: Path) -> bool:
        """Whether layer ``l``'s cache entry can be used (loaded into ``out`` when ``load``)."""
        if not path.is_file():
            return False
        try:  # load=False checks the key only; the checksum is checked when the entry is loaded
            if not load and _read_key(path) == key:
                return True
            if load:
                stored, total, count, c = _read_cache(path)
                if stored == key:
                    out[l] = stats_of(l, key, total, count, c, f"cached {path.name}")
                    return True
            log(f"C0 cache {path} was computed for another key; recomputing")
        except CovCacheError as exc:
            warnings.warn(f"{exc}: recomputing it", RuntimeWarning, stacklevel=3)
            log(f"C0 cache {path} is unreadable or corrupt; recomputing")
        return False

    missing: dict[int, tuple[dict, Path]] = {}
    seen: dict[int, int | None] = {}  # the entry's mtime when it was checked (None: absent)
    for l in layers:
        key = _cache_key(fp, l, spec.down_name(l), corpus, max_length, dtype, texts_sha, gram, numerics_tag,
                         _batching_tag(batch_size, max_batch_tokens), forward_tf32)
        path = _cache_path(root, key)
        seen[l] = _mtime(path)
        if not usable(l, key, path):
            missing[l] = (key, path)
    if not missing:
        return {l: out[l] for l in layers} if load else {}

    # One process computes an entry, the others wait for it (a flock per entry, taken in path order),
    # then use what it wrote: C0 is computed once per (model, layer, corpus) across processes.
    with _entry_locks([path for _, path in missing.values()], log):
        missing = {l: (key, path) for l, (key, path) in missing.items()
                   if _mtime(path) == seen[l] or not usable(l, key, path)}
        if missing:
            if texts is None:
                texts = iter_corpus(corpus, records)
            _collect_into_cache(model, tok, texts, missing, out, stats_of, log=log, load=load, cond=cond,
                                device=device, dtype=dtype, batch_size=batch_size, max_length=max_length,
                                max_batch_tokens=max_batch_tokens, progress=progress,
                                max_layers_per_pass=max_layers_per_pass, gram32=gram32)
    return {l: out[l] for l in layers} if load else {}


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@contextlib.contextmanager
def _entry_locks(paths: Sequence[Path], log: Callable[[str], None]):
    """Exclusive ``flock`` on ``<entry>.lock`` next to each cache entry, taken in sorted order (no
    deadlock between processes asking for overlapping layers); says so when another process holds
    one and waits for it."""
    fds = []
    try:
        for path in sorted(set(paths)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent / (path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log(f"C0 {path.name}: another process is computing it; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)  # closing the descriptor releases the flock


def _collect_into_cache(model, tok, texts: list[str], missing: dict[int, tuple[dict, Path]],
                        out: dict[int, CovStats], stats_of: Callable, *, log: Callable[[str], None],
                        load: bool, cond: bool, device: torch.device, dtype: str, batch_size: int,
                        max_length: int, max_batch_tokens: int | None, progress: bool,
                        max_layers_per_pass: int | None, gram32: bool = False) -> None:
    """Collect the ``missing`` layers in as few passes as memory allows and write each to its cache
    entry as soon as its pass ends (into ``out`` as well when ``load``)."""
    todo = sorted(missing)
    per = layers_per_pass(max(arch.key_dim(model, l) for l in todo), device, DTYPES[dtype],
                          override=max_layers_per_pass)
    groups = pass_groups(todo, per)
    passes = ("one pass" if len(groups) == 1 else
              f"{len(groups)} pass(es) of ≤ {per} layer(s) (as many accumulators as memory holds)")
    log(f"C0: collecting {len(todo)} layer(s) from {len(texts)} texts in {passes} "
        f"(one {DTYPES[dtype]} d_in×d_in accumulator per layer on {device})")
    # several passes read the same ids: tokenise the corpus once (the ids, and so every sum, are the
    # same either way)
    encoded = encode_corpus(tok, texts, max_length) if len(groups) > 1 else None
    for group in groups:
        sums = collect_second_moments(model, tok, texts, group, batch_size=batch_size,
                                      max_length=max_length, max_batch_tokens=max_batch_tokens,
                                      dtype=DTYPES[dtype], progress=progress, gram32=gram32, on_device=True,
                                      encoded=encoded)
        for l in group:  # one layer on the host at a time: moved, written, released before the next
            key, path = missing[l]
            on_dev, count = sums.pop(l)
            total = symmetrize_upper(on_dev.cpu())
            del on_dev
            c = _cond(total.to(torch.float64) / count, device) if cond else math.nan
            _write_cache(path, key, total, count, c)
            if load:
                out[l] = stats_of(l, key, total, count, c, f"collected from {len(texts)} texts")
            else:
                log(f"C0 layer {l}: {count} tokens, cached in {path.name}")
            del total
