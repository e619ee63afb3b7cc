"""Benchmark (a script, not a test): GE's batched generation under each ``evaluation.gen_decode``
mode, alternating, on the same prompts; prints seconds per decode step and whether the texts
equal the transformers path's.

    python bench/bench_decode.py [--model models/tiny-world] [--prompts 64] [--max-len 100]
        [--modes transformers static graph compiled] [--rounds 2] [--deep 32] [--count-kernels]
    python bench/bench_decode.py --params params/llama3-shape-slice.yaml --set model.device=cuda \
        --set model.dtype=bfloat16 --set model.id=.cache/llama3-8b-shape-32L --tokenizer DIR --prompts 1020 10

``--deep L`` also builds a random Llama of L layers and hidden size 64 (the miniature's
vocabulary): its arithmetic is negligible, so its step time is the per-step host overhead of a
deep model (the 32-layer Llama-3-8B shape's decode step is bound by it on a GPU,
docs/paper-scale.md). ``graph`` and ``compiled`` run their fixed-shape step uncaptured off CUDA.
``--device cuda`` runs on a GPU (both are then captured, and the CUDA kernels of one step of each
mode are counted). ``--count-kernels`` counts them on a CPU: each mode's dispatched operations
that run a kernel, and for ``compiled`` the kernels in inductor's generated code (what
editlib.cost's ``kernels_fused_fwd`` is scaled by). ``--params`` times the model those params name instead
(a Llama-3-8B shape directory is built first, as bench/slice_phases.py does), on the miniature's
generation prompts; ``--prompts`` takes several batch sizes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from editlib.generation import sample_texts  # noqa: E402
from editlib.models import load_model  # noqa: E402
from editlib.tiny import load_tiny_records  # noqa: E402
from editlib.tokens import encode  # noqa: E402


def deep_model(like, layers: int, device: str) -> torch.nn.Module:
    """A random Llama of ``layers`` blocks, hidden 64, ``like``'s vocabulary and special tokens."""
    torch.manual_seed(0)
    c = like.config
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=c.vocab_size,
                                   bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                   max_position_embeddings=512)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval().to(device)


def time_modes(label: str, model, tok, prompts: list[str], a) -> None:
    steps = a.max_len - min(len(encode(tok, p)) for p in prompts)
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    for mode in a.modes:  # warm-up (a graph is captured per decode batch, so the timed calls include their capture)
        sample_texts(model, tok, prompts, max_len=12, batch_size=len(prompts), decode=mode)
    ref = None
    times: dict[str, list[float]] = {m: [] for m in a.modes}
    texts: dict[str, list[str]] = {}
    for _ in range(a.rounds):
        for mode in a.modes:
            sync()
            t0 = time.perf_counter()
            out = sample_texts(model, tok, prompts, max_len=a.max_len, batch_size=len(prompts), decode=mode)
            sync()
            times[mode].append(time.perf_counter() - t0)
            texts[mode] = out
    ref = texts.get("transformers")
    print(f"{label}: {len(prompts)} prompts, {steps} decode steps of {len(prompts)} rows", flush=True)
    for mode in a.modes:
        per = [t / steps * 1e3 for t in times[mode]]
        same = "" if ref is None else (
            f"  texts equal to transformers: {sum(x == y for x, y in zip(texts[mode], ref))}/{len(ref)}")
        ops = ""
        if a.count_ops and mode == "compiled":  # a dispatch mode would run the compiled functions eagerly
            ops = "  (operations not counted: --count-kernels counts the compiled step's kernels)"
        elif a.count_ops:  # tensor operations dispatched per step (prefill, sampling, and a captured graph's replay included)
            from arithmetic_floor import _OpCounter
            with _OpCounter() as c:
                sample_texts(model, tok, prompts, max_len=a.max_len, batch_size=len(prompts), decode=mode)
            ops = f"  {c.n / steps:.0f} operations per step"
        print(f"  {mode:>12}: {', '.join(f'{t:.2f}' for t in times[mode])} s  "
              f"({', '.join(f'{p:.2f}' for p in per)} ms per step){same}{ops}", flush=True)


@torch.no_grad()
def kernels_per_step(model, rows: int) -> dict[str, int]:
    """CUDA kernels one decode step launches in each form (torch.profiler over one step after a
    6-token prefill, random ids): what a captured graph replays, to set the cost model's
    ``graph_node_s`` as (step time − its arithmetic) / kernels."""
    from torch.profiler import ProfilerActivity, profile

    dev = next(model.parameters()).device
    ids = _step_ids(model, rows).to(dev)
    out = {}
    for label in ("transformers", "static", "graph", "compiled"):
        step = _one_step(model, rows, label, ids)
        step()  # the compiled step compiles at its first call
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        out[label] = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return out


@torch.no_grad()
def cpu_kernels_per_step(model, rows: int) -> dict[str, tuple[int, float]]:
    """Kernels per decode step in each mode on the CPU, and per block. Eager modes: the aten
    operations dispatched that run a kernel (not views, not allocations). ``compiled``: the kernel
    and library calls in the code inductor generated for one block's front (run once per block)
    and for the tail, plus the operations the step dispatches outside them (embedding, the eager
    down-projections). Inductor's CPU fusion is a proxy for its GPU (Triton) one;
    :func:`kernels_per_step` counts a GPU's."""
    import torch._dynamo
    from torch._inductor.codecache import PyCodeCache

    from editlib import decode
    ids = _step_ids(model, rows)
    torch._dynamo.reset()
    decode._COMPILED_FNS.clear()
    dec = decode.Decoder(model, rows, 8, "compiled", capture=False)
    dec.prefill(ids[:, :6])
    L = len(dec.blocks)
    seen = len(PyCodeCache.modules)
    x = dec.embed(ids[:, 6:7])
    decode._compiled("tail")(x, dec.zero, dec.norm.weight, dec.norm.variance_epsilon, dec.head.weight, dec.head.bias)
    tail = sum(_kernel_calls(m) for m in PyCodeCache.modules[seen:])
    seen = len(PyCodeCache.modules)
    dec.step(ids[:, 6], 6)
    front = sum(_kernel_calls(m) for m in PyCodeCache.modules[seen:])
    compiled = dict(decode._COMPILED_FNS)
    with _Dispatched() as c:  # outside the compiled functions (uncounted inside)
        decode._COMPILED_FNS.update({k: _paused(c, f) for k, f in compiled.items()})
        try:
            dec.step(ids[:, 7], 7)
        finally:
            decode._COMPILED_FNS.update(compiled)
    out = {"compiled": L * front + tail + c.n}
    print(f"  compiled: {front} kernels per block front, {tail} in the tail, {c.n} dispatched outside", flush=True)
    for mode in ("transformers", "static", "graph"):  # eager: every dispatched operation that runs a kernel
        step = _one_step(model, rows, mode, ids)
        with _Dispatched() as c:
            step()
        out[mode] = c.n
    return {m: (n, n / L) for m, n in out.items()}


def _step_ids(model, rows: int) -> torch.Tensor:
    """Random token ids [rows, 8]: a 6-token prefill and two decode columns."""
    return torch.randint(3, model.config.vocab_size, (rows, 8), generator=torch.Generator().manual_seed(0))


def _one_step(model, rows: int, mode: str, ids: torch.Tensor):
    """After a prefill of ``ids``' first 6 columns, a call that runs one decode step of ``mode``
    (the next column each call: a later call is the step after)."""
    from editlib.decode import Decoder
    from editlib.generation import _cache_name
    if mode == "transformers":
        name = _cache_name(model)
        past = getattr(model(input_ids=ids[:, :6], use_cache=True), name)
        return lambda: model(input_ids=ids[:, 6:7], use_cache=True, **{name: past})
    dec = Decoder(model, rows, ids.shape[1], mode, capture=False)
    dec.prefill(ids[:, :6])
    return lambda: dec.step(ids[:, dec.filled], dec.filled)


def _kernel_calls(module) -> int:
    """Kernels an inductor-generated module's ``call`` launches (each once per call): a library
    call (``extern_kernels``, ``torch.ops``) or a Triton kernel counts one; a generated C++ function
    counts its outermost loop nests. Inductor's C++ backend puts loop nests of several sizes into
    one function where Triton would launch a kernel for each, while a row's reduction and the
    pointwise work on the same rows share an outer loop, as they share a Triton kernel."""
    import inspect
    import re
    src = inspect.getsource(module)
    cpp = {name: _outer_loops(code) for name, code in
           re.findall(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(\[.*?\], r'''(.*?)'''", src, flags=re.M | re.S)}
    body = src[src.find("def call("):]
    calls = re.findall(r"^\s+(?:\w+ = )?(cpp_fused_\w+(?=\()|triton_\w+\.run\(|extern_kernels\.\w+\(|torch\.ops\.\w+\.\w+)",
                       body, flags=re.M)
    return sum(cpp.get(c, 1) for c in calls)


def _outer_loops(code: str) -> int:
    """``for`` loops of C++ ``code`` that no other ``for`` loop encloses (at least one)."""
    import re
    stack: list[bool] = []
    pending, n = False, 0
    for tok in re.finditer(r"\bfor\s*\(|[{}]", code):
        t = tok.group()
        if t == "{":
            stack.append(pending)
            pending = False
        elif t == "}":
            if stack:
                stack.pop()
        else:
            if not any(stack):
                n += 1
            pending = True
    return max(n, 1)


def _paused(counter, fn):
    def run(*args, **kw):
        counter.paused = True
        try:
            return fn(*args, **kw)
        finally:
            counter.paused = False
    return run


class _Dispatched(TorchDispatchMode):
    """Counts the aten operations dispatched that run a kernel: not views, not allocations."""

    #: operations that launch no kernel besides views: allocations and aliasing ones
    NO_KERNEL = ("empty", "empty_strided", "_unsafe_view", "detach")

    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        schema = func._schema
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if not (self.paused or view or func.overloadpacket.__name__ in self.NO_KERNEL):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _print_cpu_kernels(what: str, k: dict[str, tuple[int, float]]) -> None:
    print(f"  CPU kernels per decode step of {what} (per block): "
          + ", ".join(f"{m} {c} ({b:.1f})" for m, (c, b) in k.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="models/tiny-world", help="miniature: the model timed and the prompts' source")
    ap.add_argument("--params", default=None, help="time the model these params name instead (built if a shape)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params overrides")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape build")
    ap.add_argument("--draw-device", default="cpu", help="where a shape build draws its random weights")
    ap.add_argument("--prompts", type=int, nargs="+", default=[64], help="rows per decode batch (one timing each)")
    ap.add_argument("--max-len", type=int, default=100)
    ap.add_argument("--modes", nargs="+", default=["transformers", "static", "graph", "compiled"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--deep", type=int, default=0, help="also a random Llama of this many layers (0: no)")
    ap.add_argument("--count-ops", action="store_true", help="also count the tensor operations dispatched per step")
    ap.add_argument("--count-kernels", action="store_true",
                    help="on a CPU: count each mode's kernels per step (dispatched operations; inductor's for compiled)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.params:
        from editlib.params import resolve
        from slice_phases import _build
        p = resolve(a.params, overrides=a.set or None)
        print(_build(p, argparse.Namespace(draw_device=a.draw_device, tokenizer=a.tokenizer, build=False)), flush=True)
        model, tok = load_model(p.model.id, dtype=p.model.dtype, device=p.model.device)
        label = f"{p.model.id} ({p.model.dtype}, {p.model.device})"
    else:
        model, tok = load_model(a.model, device=a.device)
        label = a.model
    pool = [g for f in load_tiny_records(a.model) for g in f.generation_prompts]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"device {next(model.parameters()).device}", flush=True)
    for n in a.prompts:
        prompts = [pool[i % len(pool)] for i in range(n)]
        time_modes(label, model, tok, prompts, a)
        if next(model.parameters()).is_cuda:
            k = kernels_per_step(model, n)
            print(f"  kernels per decode step of {n} rows: " + ", ".join(f"{m} {c}" for m, c in k.items()), flush=True)
        elif a.count_kernels:
            _print_cpu_kernels(f"{n} rows", cpu_kernels_per_step(model, n))
        if a.deep:
            deep = deep_model(model, a.deep, a.device)
            time_modes(f"random Llama, {a.deep} layers, hidden 64", deep, tok, prompts, a)
            if a.count_kernels and not next(model.parameters()).is_cuda:
                for dt in (torch.float32, torch.bfloat16):  # editlib.cost's kernels_fused_fwd: the bfloat16 ratio
                    _print_cpu_kernels(f"{n} rows, {a.deep} layers, {dt}", cpu_kernels_per_step(deep.to(dt), n))


if __name__ == "__main__":
    main()
