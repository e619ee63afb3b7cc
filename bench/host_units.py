"""Benchmark (a script, not a test): the cost model's per-row host constants, measured on this CPU.

``editlib.cost.CostModel`` prices two pieces of Python that no GPU speeds up:

* ``gen_row_py_s``: per generated GE text, after its tokens are sampled: its random stream
  (``generation._row_rng``), its text (``generation.decode_text``, the real Llama-3 tokenizer) and
  its n-gram entropy (``generation.ngram_entropy``). Measured on CounterFact's own sentences cut to
  the paper's 100 tokens; with ``nltk`` importable, also with an untrained punkt splitter standing
  in for the trained one (the same algorithm; the trained data cannot be fetched offline), whose
  cost is what a machine with ``python -m nltk.downloader punkt`` pays.
* ``case_py_s``: per evaluated case, everything ``metrics.evaluate_records`` does besides the
  model's forward passes (prompts, the tokenizer's memo, read plans, batches, results: the steady
  state of a grid that scores each fact many times), at the grid's ``evaluation.batch_size``
  (``--params``), on a Llama model of the real Llama-3 vocabulary and tokenizer but 16 wide. What a GPU runs is taken off: the time
  inside the backbone and the head (forward hooks) and in the log-softmax and argmax over the
  vocabulary at the rows read (which on 2 CPU cores cost more than all the rest).

    EDITLIB_COUNTERFACT=/path/to/counterfact.json.gz python bench/host_units.py [--texts 2000] [--cases 200]
        [--params params/llama3-8b.yaml] [--miniature models/tiny-world]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from editlib.arch import backbone_and_head
from editlib.counterfact import load_counterfact
from editlib.generation import _row_rng, decode_text, ngram_entropy, sentence_splitter, word_tokenize
from editlib.llama3_tokenizer import build_llama3_tokenizer
from editlib.params import resolve


def _best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def texts_of(records, tok, n: int, tokens: int = 100) -> list[list[int]]:
    """Token ids of ``n`` natural English texts of at most ``tokens`` tokens: each record's
    generation and attribute prompts joined, cut to ``tokens`` ids (BOS included, as a GE row)."""
    out = []
    for r in records:
        ids = tok(" ".join([*r.generation_prompts, *r.attribute_prompts]))["input_ids"][:tokens]
        out.append(ids)
        if len(out) == n:
            break
    return out


def gen_row(tok, ids: list[list[int]], rounds: int) -> dict[str, float]:
    """Seconds per text of each piece of the per-row GE host work."""
    n = len(ids)
    texts = [decode_text(tok, s, "clean") for s in ids]
    got = {
        "row_rng": _best(lambda: [_row_rng(0, (i, 3)).random(100) for i in range(n)], rounds) / n,
        "decode_text": _best(lambda: [decode_text(tok, s, "clean") for s in ids], rounds) / n,
        "ngram_entropy": _best(lambda: [ngram_entropy(x) for x in texts], rounds) / n,
    }
    try:  # an untrained punkt: the trained splitter's algorithm, without its abbreviation lists
        from nltk.tokenize.punkt import PunktSentenceTokenizer
    except ImportError:
        return got
    import editlib.generation as gen
    punkt = PunktSentenceTokenizer()
    plain = gen._punkt
    gen._punkt = lambda: punkt.tokenize
    try:
        assert word_tokenize("One. Two.") == ["One", ".", "Two", "."]
        got["ngram_entropy_punkt"] = _best(lambda: [ngram_entropy(x) for x in texts], rounds) / n
    finally:
        gen._punkt = plain
    return got


def case_host(records, tok, n: int, rounds: int, batch_size: int = 256, model=None) -> tuple[float, float]:
    """(host seconds per case, seconds per case of device work: the backbone, the head and the
    vocabulary-wide log-softmax and argmax) of ``evaluate_records`` without GE, ``batch_size``
    sequences per scoring forward, on ``model`` (default: a 16-wide Llama of ``tok``'s vocabulary).
    The head's outputs and their log-softmax are kept until a round's timing ends: on a CPU,
    releasing a vocabulary-wide tensor returns its memory to the system (about 16 ms per 300 MB
    here), which a GPU's caching allocator does not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from editlib.metrics import evaluate_records
    if model is None:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    recs = list(records[:n])
    backbone, head = backbone_and_head(model)  # the modules score_targets calls
    spent = [0.0]
    started: dict[int, float] = {}
    kept: list = []  # the head's outputs and their log-softmax, released after the timing (below)

    def pre(module, args):
        started[id(module)] = time.perf_counter()

    def post(module, args, out):
        spent[0] += time.perf_counter() - started.pop(id(module))
        if module is head:
            kept.append(out)

    def timed(fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                out = fn(*args, **kw)
                kept.append(out)
                return out
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    handles = [m.register_forward_pre_hook(pre) for m in (backbone, head)]
    handles += [m.register_forward_hook(post) for m in (backbone, head)]
    # the vocabulary-wide work on the head's rows is the device's too (a GPU does it in microseconds)
    log_softmax, argmax = torch.log_softmax, torch.Tensor.argmax
    torch.log_softmax, torch.Tensor.argmax = timed(log_softmax), timed(argmax)
    try:
        evaluate_records(model, tok, recs, batch_size=batch_size)  # warm: the tokenizer's memo, first kernels
        runs = []
        for _ in range(rounds):
            spent[0] = 0.0
            t = time.perf_counter()
            evaluate_records(model, tok, recs, batch_size=batch_size)
            runs.append((time.perf_counter() - t, spent[0]))
            kept.clear()
    finally:
        torch.log_softmax, torch.Tensor.argmax = log_softmax, argmax
        for h in handles:
            h.remove()
    total, inside = min(runs)
    return (total - inside) / n, inside / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--cases", type=int, default=200, help="cases per round (their vocabulary-wide tensors are "
                    "kept until the round ends: about 11 GB at 200)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--params", default="params/llama3-8b.yaml", help="the scoring batch comes from here")
    ap.add_argument("--miniature", default=None, help="also time the cases on this miniature (e.g. models/tiny-world)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    records = load_counterfact()
    tok = build_llama3_tokenizer()
    ids = texts_of(records, tok, a.texts)
    row = gen_row(tok, ids, a.rounds)
    print(f"GE host work per text ({len(ids)} CounterFact texts of {statistics.mean(map(len, ids)):.1f} "
          f"Llama-3 tokens, best of {a.rounds}):")
    for k, v in row.items():
        print(f"  {k}: {v * 1e3:.3f} ms")
    base = row["row_rng"] + row["decode_text"]
    print(f"gen_row_py_s = {(base + row['ngram_entropy']) * 1e3:.3f} ms ({sentence_splitter()})"
          + (f", {(base + row['ngram_entropy_punkt']) * 1e3:.3f} ms (an untrained punkt)" if "ngram_entropy_punkt" in row else ""))
    batch = resolve(a.params).evaluation.batch_size
    host, model = case_host(records, tok, a.cases, a.rounds, batch)
    print(f"case_py_s = {host * 1e3:.3f} ms per case outside the model ({a.cases} cases, {batch} sequences per "
          f"forward, best of {a.rounds}; "
          f"{model * 1e3:.3f} ms per case in the 16-wide model's forwards and vocabulary-wide ops)")
    if a.miniature:  # the same on the miniature: its own small vocabulary and tokenizer, its records
        from editlib.models import load_model
        from editlib.tiny import load_tiny_records
        mini, mtok = load_model(a.miniature)
        host, model = case_host(load_tiny_records(a.miniature), mtok, a.cases, a.rounds, batch, model=mini.eval())
        print(f"case_py_s on {a.miniature} = {host * 1e3:.3f} ms per case outside the model ({model * 1e3:.3f} ms "
              f"per case in its forwards and vocabulary-wide ops)")


if __name__ == "__main__":
    main()
