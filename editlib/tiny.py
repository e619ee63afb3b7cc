"""The miniature Llama: a BPE tokenizer and a small ``LlamaForCausalLM`` trained from a seed on
the true facts of a record set, saved as a standard Hugging Face directory.

It is the offline stand-in for Llama-3-8B: same architecture family (RMSNorm, SwiGLU, RoPE,
untied embeddings, BOS-adding byte-level BPE like Llama-3), small enough to train on 2 cores,
and it *knows* its facts (quality bar checked by :func:`fact_quality`).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .records import Record
from .scoring import score_pairs
from .tinyconfig import TinyConfig
from .tokens import with_space

BOS, EOS = "<s>", "</s>"


# --------------------------------------------------------------------------- texts

def fact_units(records: Sequence[Record]) -> list[str]:
    """Distinct training sentences: rewrite prompts, paraphrases and neighbourhood prompts, each
    followed by its true target (SPEC §6 prompt families)."""
    seen: dict[str, None] = {}
    for r in records:
        tgt = with_space(r.target_true.str)
        for p in (r.rewrite_prompt, *r.paraphrase_prompts, *r.neighborhood_prompts):
            seen.setdefault(p + tgt, None)
    return list(seen)


def _documents(units: list[str], rng: random.Random) -> list[str]:
    """Shuffle units into documents of 1-3 sentences. The first sentence of a document starts the
    text (subject's first word without a leading space); later ones follow ". " (with a space), so
    the model learns both spellings of every subject's first word."""
    order = list(units)
    rng.shuffle(order)
    docs, i = [], 0
    while i < len(order):
        k = rng.choice((1, 2, 2, 3))
        docs.append(". ".join(order[i:i + k]) + ".")
        i += k
    return docs


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: Sequence[str], vocab_size: int, must_be_single: Sequence[str] = ()):
    """Byte-level BPE with a Llama-3-like BOS post-processor, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(list(texts), trainer)
    bos_id = tk.token_to_id(BOS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS,
                                  padding_side="right")
    multi = [w for w in must_be_single
             if len(tok(with_space(w), add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        raise ValueError(f"vocab_size={vocab_size} leaves {len(multi)} target words multi-token "
                         f"(e.g. {multi[:5]}); raise vocab_size")
    return tok


# --------------------------------------------------------------------------- model

def build_model(cfg: TinyConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, hidden_act="silu")
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(conf)


def _packed_batches(tok, units, cfg: TinyConfig, rng: random.Random):
    """Endless stream of [batch_rows, seq_len] packed token rows, reshuffled every epoch."""
    buf: list[int] = []
    while True:
        for doc in _documents(units, rng):
            buf.extend(tok(doc, add_special_tokens=True)["input_ids"] + [tok.eos_token_id])
        n_rows = len(buf) // cfg.seq_len
        rows = torch.tensor(buf[: n_rows * cfg.seq_len]).view(n_rows, cfg.seq_len)
        buf = buf[n_rows * cfg.seq_len:]
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        for s in range(0, n_rows - cfg.batch_rows + 1, cfg.batch_rows):
            yield rows[perm[s:s + cfg.batch_rows]]


# --------------------------------------------------------------------------- quality

def fact_quality(model, tok, records: Sequence[Record], batch_size: int = 256) -> dict[str, float]:
    """Share of prompts where the true target beats target_new (P(true) > P(new)) and where the
    true target is top-1, for rewrite prompts, paraphrases and neighbourhood prompts."""
    out: dict[str, float] = {}
    fams = {
        "rewrite": [(r.rewrite_prompt, r) for r in records],
        "paraphrase": [(p, r) for r in records for p in r.paraphrase_prompts],
        "neighborhood": [(p, r) for r in records for p in r.neighborhood_prompts],
    }
    for fam, pairs in fams.items():
        pre = [p for p, _ in pairs]
        true, new = score_pairs(model, tok, pre, [r.target_true.str for _, r in pairs],
                                [r.target_new.str for _, r in pairs], batch_size=batch_size)
        out[f"{fam}_true_beats_new"] = float(np.mean(true.nll < new.nll))
        out[f"{fam}_true_top1"] = float(np.mean(true.correct))
    return out


def passes_bar(q: dict[str, float], rewrite: float = 0.95, other: float = 0.90) -> bool:
    """The quality bar of the issue: >= 95 % rewrite, >= 90 % paraphrase and neighbourhood."""
    return (q["rewrite_true_beats_new"] >= rewrite and q["rewrite_true_top1"] >= rewrite
            and all(q[f"{f}_{m}"] >= other for f in ("paraphrase", "neighborhood")
                    for m in ("true_beats_new", "true_top1")))


# --------------------------------------------------------------------------- training

def train_tiny(records: Sequence[Record], cfg: TinyConfig, *, log=print):
    """Train tokenizer + model on the records' true facts. Returns (model, tok, info)."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.time()
    units = fact_units(records)
    objects = sorted({r.target_true.str for r in records} | {r.target_new.str for r in records})
    tok = train_tokenizer(_documents(units, random.Random(cfg.seed)) * 2, cfg.vocab_size)
    model = build_model(cfg, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    probe = list(records) if len(records) <= 400 else random.Random(cfg.seed + 1).sample(list(records), 400)
    history = []
    stream = _packed_batches(tok, units, cfg, rng)
    step, q = 0, {}
    for step in range(cfg.max_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = next(stream)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.check_every == 0 or step + 1 == cfg.max_steps:
            model.eval()
            q = fact_quality(model, tok, probe)
            model.train()
            history.append({"step": step + 1, "loss": loss.item(), "seconds": time.time() - t0, **q})
            log(f"step {step + 1:5d}  loss {loss.item():.3f}  rewrite {q['rewrite_true_beats_new']:.3f}/"
                f"{q['rewrite_true_top1']:.3f}  para {q['paraphrase_true_top1']:.3f}  "
                f"neigh {q['neighborhood_true_top1']:.3f}  ({time.time() - t0:.0f}s)")
            if passes_bar(q, cfg.target_rewrite, cfg.target_other):
                break
    model.eval()
    model.requires_grad_(False)
    info = {"steps": step + 1, "train_seconds": round(time.time() - t0, 1), "n_units": len(units),
            "n_params": sum(p.numel() for p in model.parameters()), "history": history,
            "n_target_words": len(objects)}
    return model, tok, info


def save_tiny(model, tok, out_dir: str | os.PathLike, *, records: Sequence[Record], info: dict,
              cfg: TinyConfig, command: str, records_mode: str) -> Path:
    """Write the HF directory + model card + the records it knows, atomically (temp dir + rename).

    ``records_mode``: "full" writes ``records.json`` (synthetic world); "ids" writes only
    ``case_ids.json`` (CounterFact builds: the data itself is never copied).
    """
    from .counterfact import save_records
    from .records import records_sha256

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if records_mode == "full":
            save_records(records, tmp / "records.json")
        else:
            (tmp / "case_ids.json").write_text(json.dumps([r.case_id for r in records]))
        full_q = fact_quality(model, tok, records)
        info = {**info, "quality": full_q, "passes_bar": passes_bar(full_q)}
        meta = {"config": asdict(cfg), "command": command, "n_records": len(records),
                "records": "records.json" if records_mode == "full" else "case_ids.json",
                **({} if records_mode == "full" else {"records_sha256": records_sha256(records)}),
                "python": sys.version.split()[0], "torch": torch.__version__, **info}
        (tmp / "editlib_tiny.json").write_text(json.dumps(meta, indent=1))
        (tmp / "README.md").write_text(_model_card(meta))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _model_card(m: dict) -> str:
    c, q = m["config"], m["quality"]
    rows = "\n".join(f"| {k} | {v * 100:.1f} % |" for k, v in q.items())
    return f"""# editlib miniature Llama

A {c['n_layers']}-layer `LlamaForCausalLM` (hidden {c['hidden']}, MLP {c['intermediate']}, {c['heads']} heads,
untied embeddings, {m['n_params']:,} parameters) with a byte-level BPE tokenizer that adds BOS
(`<s>`), trained by editlib from seed {c['seed']} on the true facts of {m['n_records']} records
(rewrite, paraphrase and neighbourhood prompts followed by the true target).

Rebuild exactly with:

    {m['command']}

Training: {m['steps']} AdamW steps (lr {c['lr']}, warm-up {c['warmup']}, cosine), {c['batch_rows']} x {c['seq_len']}-token
packed rows, {m['train_seconds']} s wall time on {os.cpu_count()} CPU cores (torch {m['torch']}).

The records it knows: `{m['records']}`.

## What it knows (all records, measured at save time)

| measure | value |
|---|---|
{rows}

Quality bar (>= 95 % rewrite, >= 90 % paraphrase / neighbourhood, both "true beats new" and
"true is top-1"): {'passed' if m['passes_bar'] else 'NOT passed'}.

This is a miniature for offline development and tests, not Llama-3-8B.
"""


# --------------------------------------------------------------------------- builds

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
COMMITTED_MINIATURE = REPO_MODELS / "tiny-world"


def source_records(source: str, n_records: int, seed: int = 0,
                   counterfact_path: str | None = None) -> list[Record]:
    """The records a miniature is trained on: ``make_world(n, seed)`` or the first ``n`` of
    CounterFact's seeded unique-subject ordering 0 (:func:`editlib.counterfact.sample`)."""
    if source == "world":
        from .world import make_world
        return make_world(n_records, seed)
    if source == "counterfact":
        from .counterfact import load_counterfact, sample
        return sample(load_counterfact(counterfact_path), n_records)
    raise ValueError(f"miniature source must be 'world' or 'counterfact', got {source!r}")


def build_tiny(source: str, n_records: int, out: str | os.PathLike, *, seed: int = 0,
               n_layers: int = 6, counterfact_path: str | None = None, log=print,
               **overrides) -> Path:
    """Train and save a miniature; the model card records the exact command that rebuilds it."""
    records = source_records(source, n_records, seed, counterfact_path)
    cfg = TinyConfig(n_layers=n_layers, seed=seed, **overrides)
    extra = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    src = f"--world {n_records}" if source == "world" else f"--counterfact --n {n_records}"
    command = f"python -m editlib tiny-train {src} --seed {seed} --layers {n_layers}{extra} --out {out}"
    if not os.environ.get("OMP_NUM_THREADS"):  # respect a user's thread limit (busy machines)
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok, info = train_tiny(records, cfg, log=log)
    return save_tiny(model, tok, out, records=records, info=info, cfg=cfg, command=command,
                     records_mode="full" if source == "world" else "ids")


def find_committed(source: str, n_records: int, n_layers: int, seed: int) -> Path | None:
    """A miniature under the repo's ``models/`` built with exactly these settings, if any."""
    want_cmd = "--world" if source == "world" else "--counterfact"
    for meta_file in sorted(REPO_MODELS.glob("*/editlib_tiny.json")):
        meta = json.loads(meta_file.read_text())
        c = meta.get("config", {})
        if (meta.get("n_records") == n_records and c.get("n_layers") == n_layers and c.get("seed") == seed
                and want_cmd in meta.get("command", "")):
            return meta_file.parent
    return None


def ensure_tiny(source: str, n_records: int, *, seed: int = 0, n_layers: int = 6,
                max_steps: int | None = None, counterfact_path: str | None = None, log=print) -> Path:
    """Path of a cached miniature, training it first when missing (SPEC-free convenience for the
    offline params: e.g. an 8-layer second model for Figure 6, or the CounterFact miniature).
    ``max_steps`` raises the training cap (5,000 CounterFact records needed 5,800 steps)."""
    from .counterfact import cache_dir

    committed = find_committed(source, n_records, n_layers, seed)
    if committed is not None:
        return committed
    out = cache_dir() / "models" / f"tiny-{source}-n{n_records}-L{n_layers}-s{seed}"
    if not (out / "config.json").is_file():
        log(f"building miniature {out.name} (one-off; cached at {out})")
        build_tiny(source, n_records, out, seed=seed, n_layers=n_layers,
                   counterfact_path=counterfact_path, log=log,
                   **({"max_steps": int(max_steps)} if max_steps else {}))
    return out


def _check_trained_on(d: Path, records: Sequence[Record]) -> None:
    """A CounterFact miniature's case_ids, read from the CounterFact file in use, must be the records
    it was trained on (``records_sha256`` of its model card; miniatures saved before it was recorded
    are not checked): a file whose records of those ids differ would edit facts the model never
    learnt, silently."""
    from .records import RecordError, records_sha256

    meta_file = d / "editlib_tiny.json"
    want = json.loads(meta_file.read_text()).get("records_sha256") if meta_file.is_file() else None
    if want is not None and records_sha256(records) != want:
        raise RecordError(f"the miniature {d} was trained on other records for its case_ids than the CounterFact "
                          "file in use holds (data.counterfact_path, else EDITLIB_COUNTERFACT, else the user cache): "
                          "point it at the file the miniature was built from, or remove the miniature to rebuild it")


def load_tiny_records(model_dir: str | os.PathLike, counterfact_path: str | None = None) -> list[Record]:
    """The records a saved miniature was trained on (records.json, or case_ids.json + CounterFact)."""
    d = Path(model_dir)
    from .counterfact import DatasetNotFound, load_counterfact, load_records
    from .records import RecordError
    if (d / "records.json").is_file():
        return load_records(d / "records.json")
    if (d / "case_ids.json").is_file():
        ids = json.loads((d / "case_ids.json").read_text())
        by_id = {r.case_id: r for r in load_counterfact(counterfact_path)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise RecordError(f"{len(missing)} case_ids of {d / 'case_ids.json'} are not in the CounterFact file "
                              f"(e.g. {missing[:3]})")
        records = [by_id[i] for i in ids]
        _check_trained_on(d, records)
        return records
    raise DatasetNotFound(f"{d} has neither records.json nor case_ids.json: not an editlib miniature")
