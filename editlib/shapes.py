"""A Llama-3-8B-shaped model with few layers, random weights and the real tokenizer (issue 11).

Scores on random weights mean nothing; the slice exists so the paper-scale code path (d = 4096,
d_in = 14336, 32/8 heads, vocab 128,256, the Llama-3 tokenizer) runs end to end on a CPU and its
time and memory can be measured (``bench/slice_phases.py``, ``params/llama3-shape-slice.yaml``).

:func:`build_llama3_shape_model` writes a standard Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files) without ever holding the weights in memory: each tensor is
drawn and written in row chunks straight into the safetensors file (peak: one chunk). Values are
seeded per tensor name, so a build is reproducible, and a build is skipped when the directory
already holds one with the same settings (``editlib_shape.json``). ``draw_device="cuda"`` draws the
chunks on a GPU (another random stream than the CPU's, so another model; recorded in the marker):
a 32-layer bfloat16 build is 8 B normal samples, about 75 s on one CPU core.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["BUILD_DTYPES", "SHAPE_MARKER", "ShapeBuild", "build_hint", "build_llama3_shape_model", "llama3_8b_config",
           "slice_dir", "write_random_weights"]

SHAPE_MARKER = "editlib_shape.json"
FORMAT = "editlib-shape-v1"
CHUNK_BYTES = 64 << 20  # rows drawn and written per chunk (float32 bytes)
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: the dtypes a shape build can be written in
BUILD_DTYPES = tuple(_DTYPES)


def slice_dir(n_layers: int) -> str:
    """Where ``bench/build_llama3_slice.py`` builds an ``n_layers`` slice (repository-relative)."""
    return f".cache/llama3-8b-shape-{n_layers}L"


def build_hint(path: str) -> str | None:
    """How to build a missing slice directory named as :func:`slice_dir` names it, else None."""
    m = re.fullmatch(r"llama3-8b-shape-(\d+)L", Path(path).name)
    return f"build it with `python bench/build_llama3_slice.py --layers {m.group(1)}`" if m else None


def llama3_8b_config(n_layers: int = 2):
    """``LlamaConfig`` with Meta-Llama-3-8B's exact shapes and constants, ``n_layers`` deep."""
    from transformers import LlamaConfig

    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, initializer_range=0.02,
        bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"])


@dataclass(frozen=True)
class ShapeBuild:
    """What a built directory holds (its marker file): identical settings are not rebuilt."""

    format: str
    n_layers: int
    seed: int
    dtype: str
    tokenizer: str  # where the tokenizer came from
    n_params: int
    seconds: float = 0.0
    draw_device: str = "cpu"  # where the random chunks were drawn (another device, another stream)

    def same_as(self, other: "ShapeBuild") -> bool:
        keys = ("format", "n_layers", "seed", "dtype", "tokenizer", "draw_device")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of the model ``config`` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def _chunks(name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype,
            device: torch.device = torch.device("cpu")):
    """Row chunks of one tensor, on the host: norms are ones, everything else N(0, std²) (the HF
    init), drawn on ``device``."""
    rows = shape[0]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_BYTES // (4 * per_row))
    gen = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        if name.endswith("norm.weight"):
            t = torch.ones((n, *shape[1:]), dtype=torch.float32)
        else:
            t = torch.randn((n, *shape[1:]), generator=gen, dtype=torch.float32, device=device).mul_(std)
        yield t.to(dtype).cpu().contiguous()


def write_random_weights(path: str | os.PathLike, config, *, seed: int = 0,
                         dtype: torch.dtype = torch.float32, draw_device: str = "cpu") -> int:
    """Write the random weights of ``config``'s causal LM as one safetensors file, streamed
    chunk by chunk (the whole model is never in memory); returns the number of parameters.
    ``draw_device``: where the chunks are drawn (a GPU is much faster; another random stream)."""
    device = torch.device(draw_device)
    try:  # an unusable device fails here, before the file is opened
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"draw_device {draw_device!r} is not usable here: {e}") from e
    shapes = _param_shapes(config)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        nbytes = int(torch.Size(shape).numel()) * itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    std = float(getattr(config, "initializer_range", 0.02))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes:
            for t in _chunks(name, shape, seed, std, dtype, device):
                f.write(t.view(torch.uint8).numpy())  # raw bytes, no copy
    os.replace(tmp, path)
    return sum(int(torch.Size(s).numel()) for _, s in shapes)


def _real_tokenizer(tok_dir: Path):
    """The Llama-3 tokenizer from ``editlib.llama3_tokenizer`` (built offline), saved into ``tok_dir``."""
    from .llama3_tokenizer import build_llama3_tokenizer

    tok = build_llama3_tokenizer()
    tok.save_pretrained(str(tok_dir))
    return "llama3 (editlib.llama3_tokenizer)"


def build_llama3_shape_model(out_dir: str | os.PathLike, n_layers: int = 2, seed: int = 0,
                             dtype: str = "float32", *, tokenizer: Any = None, draw_device: str = "cpu",
                             log: Callable[[str], None] = print) -> Path:
    """Write (or reuse) a Llama-3-8B-shaped ``n_layers``-layer model with random weights.

    ``tokenizer``: None = the real Llama-3 tokenizer (:mod:`editlib.llama3_tokenizer`), else a
    tokenizer object or directory (tests use small ones; ids must stay below 128,256). Skipped
    when ``out_dir`` already holds a build with the same settings. Peak memory: one chunk of
    weights (~64 MB), plus the tokenizer. ``draw_device``: see :func:`write_random_weights`.
    """
    out = Path(out_dir).expanduser()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    tok_label = "llama3" if tokenizer is None else (
        f"dir:{Path(tokenizer).resolve()}" if isinstance(tokenizer, (str, os.PathLike)) else
        f"object:{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}")
    marker = out / SHAPE_MARKER
    if marker.is_file() and (out / "model.safetensors").is_file():
        have = ShapeBuild(**json.loads(marker.read_text()))
        want = ShapeBuild(FORMAT, n_layers, seed, dtype, tok_label, have.n_params, draw_device=draw_device)
        if have.same_as(want):
            log(f"{out}: Llama-3-8B-shaped {n_layers}-layer model already built (seed {seed}, {dtype})")
            return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a half-written directory never passes for a build
    t0 = time.time()
    config = llama3_8b_config(n_layers)
    config.dtype = dtype
    if tokenizer is None:
        _real_tokenizer(out)
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(tokenizer)) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if len(tok) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tok)} ids, more than the model's {config.vocab_size}")
        tok.save_pretrained(str(out))
    n = write_random_weights(out / "model.safetensors", config, seed=seed, dtype=_DTYPES[dtype],
                             draw_device=draw_device)
    config.save_pretrained(str(out))
    build = ShapeBuild(FORMAT, n_layers, seed, dtype, tok_label, n, round(time.time() - t0, 1), draw_device)
    marker.write_text(json.dumps(asdict(build), indent=1) + "\n")
    log(f"{out}: wrote a Llama-3-8B-shaped {n_layers}-layer model ({n / 1e9:.2f} B parameters, {dtype}, "
        f"seed {seed}) in {build.seconds:.0f} s")
    return out
