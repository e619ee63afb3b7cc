"""Benchmark (a script, not a test): how many distinct sets of input sizes the value steps' blocks
see over the CounterFact facts a paper-scale run edits, with the real Llama-3 tokenizer, with and
without the bucketed sizes of ``compile_blocks: reduce-overhead`` (:func:`editlib.packed.bucket`).
That mode records a step's CUDA graphs for each new set of sizes (one graph per block call,
forward and backward: 2k for k blocks above the edited layer, again for each edited layer, whose
weights are the graphs' static inputs) and keeps every one.

    EDITLIB_COUNTERFACT=... python bench/value_shapes.py [--n 4096] [--z-batch-size 1 32]
        [--tokenizer .cache/device/tokenizer] [--layers 3]

The sizes depend on the tokens only (the facts' prompts, subjects and targets, the context
templates), not on the model's width, so a random 64-wide Llama with the tokenizer's vocabulary
stands in for Llama-3-8B; its context templates are random text of the reference's 10 tokens.
Each chunk of ``--z-batch-size`` facts is counted at its first iteration (every fact running);
a chunk whose facts stop at different steps sees more sizes, one per set of facts still running,
which ``--stops`` counts too, by stopping the chunk's facts one per iteration in a seeded order.

``--kept`` counts, for one fact at a time, the distinct keys under which ``capture_steps`` keeps
a one-fact step's CUDA graph for later facts of the same sizes (:func:`editlib.values._reuse_key`:
every input's size, not only the blocks'): the graphs a B = 1 sequential run records, and the share
of its facts that replay an earlier fact's graph instead (the cost model's ``kept_reuse``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from editlib import packed  # noqa: E402
from editlib.context import memit_templates  # noqa: E402
from editlib.counterfact import load_counterfact  # noqa: E402
from editlib.paths import repo_path  # noqa: E402
from editlib.tokens import prepare_tokenizer  # noqa: E402
from editlib.values import _build, _Packed  # noqa: E402


def _model(vocab: int, layers: int):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                   max_position_embeddings=512, rope_theta=500000.0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def signatures(model, tok, records, contexts, z_batch: int, buckets: bool, stops: bool) -> set[tuple]:
    """The (tokens, sequences, prefix, rows, width, read positions) of every blocks call."""
    seen: set[tuple] = set()
    real = packed.run_blocks

    def record(blocks, x, cos, sin, kvs, kv_rows, mask, flat, need, R, W, **kw):
        seen.add((x.shape[0], kvs[0][0].shape[0], kvs[0][0].shape[2],
                  None if kv_rows is None else len(kv_rows), W, len(need)))
        return x[need]

    packed.run_blocks = record
    try:
        gen = torch.Generator().manual_seed(0)
        for s in range(0, len(records), z_batch):
            chunk = records[s:s + z_batch]
            seq = _build(tok, chunk, contexts)
            fwd = _Packed(model, seq, 0, "off", buckets=buckets)  # the layout only: nothing compiles
            order = torch.randperm(len(chunk), generator=gen).tolist() if stops else []
            running = list(range(len(chunk)))
            for drop in [None, *order[:-1]]:
                if drop is not None:
                    running.remove(drop)
                rows = torch.isin(seq.owner, torch.tensor(running)).nonzero()[:, 0]
                fwd.packed(rows, torch.zeros(len(rows), model.config.hidden_size))
    finally:
        packed.run_blocks = real
    return seen


def kept_keys(model, tok, records, contexts, layer: int = 1) -> list[tuple]:
    """Each fact's :func:`editlib.values._reuse_key` (sizes and plan integers: the weights are the
    same for every fact of a run), in order."""
    from editlib.values import _plan_step, _reuse_key, _step_inputs
    out = []
    for r in records:
        seq = _build(tok, [r], contexts)
        fwd = _Packed(model, seq, layer, "off")
        pl = _plan_step(fwd, seq, torch.tensor([0]), 1, torch.device("cpu"))
        h, ref = torch.zeros(1, model.config.hidden_size), torch.zeros(1, model.config.vocab_size)
        key = _reuse_key(fwd, pl, model.lm_head, _step_inputs(fwd, pl, h, ref), None)
        out.append(key[3:5])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="facts (the first n CounterFact records)")
    ap.add_argument("--z-batch-size", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokenizer", default=".cache/device/tokenizer")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--stops", action="store_true", help="also count the sizes of every set of facts still running")
    ap.add_argument("--kept", action="store_true", help="count capture_steps' kept one-fact graphs instead")
    ap.add_argument("--context-text", default="clean", choices=("clean", "reference"),
                    help="hparams.<method>.context_text of the templates (reference: a second BOS in most)")
    a = ap.parse_args()
    import transformers
    tok = prepare_tokenizer(transformers.AutoTokenizer.from_pretrained(str(repo_path(a.tokenizer))))
    model = _model(len(tok), a.layers)
    records = load_counterfact(os.environ.get("EDITLIB_COUNTERFACT"))[:a.n]
    contexts = memit_templates(model, tok, text=a.context_text)
    print(f"{len(records)} CounterFact facts, tokenizer {a.tokenizer} ({len(tok)} tokens), "
          f"{len(contexts.flat)} context templates ({a.context_text} text)")
    if a.kept:
        t0 = time.time()
        keys = kept_keys(model, tok, records, contexts)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        reuse = [i for i, k in enumerate(keys) if first[k] < i]
        for n in sorted({256, 1024, len(keys)} & set(range(len(keys) + 1))):
            kept = len({k for k in keys[:n]})
            print(f"first {n} facts one at a time: {kept} kept graphs, {n - kept} facts ({(n - kept) / n:.1%}) "
                  f"replay an earlier fact's graph")
        print(f"({time.time() - t0:.0f} s; {len(reuse)} of {len(keys)} reuse)")
        return
    for zb in a.z_batch_size:
        for stops in ([False, True] if a.stops and zb > 1 else [False]):
            counts, t0 = {}, time.time()
            for buckets in (False, True):
                counts[buckets] = len(signatures(model, tok, records, contexts, zb, buckets, stops))
            chunks = -(-len(records) // zb)
            what = "every set of facts still running" if stops else "first iteration"
            print(f"z_batch_size {zb} ({chunks} chunks, {what}): {counts[False]} distinct sets of sizes, "
                  f"{counts[True]} bucketed ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
