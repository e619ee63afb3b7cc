"""Loading causal LMs + tokenizers, and a stable model fingerprint.

* :func:`load_model` checks the architecture on the config *before* loading weights
  (:func:`editlib.arch.arch_for`) and fails fast when working offline and the model is
  neither a local directory nor in the local Hugging Face cache.
* :func:`fingerprint` identifies a model by its config and weights (device-independent;
  changes whenever any edited down-projection weight changes).

transformers 5 takes ``dtype=`` (``torch_dtype=`` is only a deprecated alias) and, by
default, loads in the checkpoint's dtype ("auto"; bf16 for Llama-3) — SPEC §8.8. We always
pass an explicit dtype, ``float32`` by default as in the reference.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from editlib.arch import arch_for, edit_weight, n_layers
from editlib.tokens import prepare_tokenizer

__all__ = ["DTYPES", "ModelLoadError", "ModelNotFound", "check_model_dir", "fingerprint", "hub_commit",
           "load_model", "locate_model"]

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

_TRUE_VALUES = {"1", "ON", "YES", "TRUE", "Y"}

# Config keys that describe how/where a model was loaded rather than what it is.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "architectures",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

_SAMPLES_PER_PARAM = 64


class ModelNotFound(FileNotFoundError):
    """The model is neither a local directory nor available (offline) from the HF cache."""


class ModelLoadError(RuntimeError):
    """A model was found but its config, weights or tokenizer cannot be read (the message names
    the file or directory)."""


#: the files a saved tokenizer leaves (one is enough): without them transformers may build an
#: empty tokenizer for some configs (Qwen2, GPT-2) without an error
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_tokenizer(tok, model, source: str) -> None:
    """A tokenizer the model can run: it turns text into ids, and the ids editlib feeds the model
    (text's, BOS, EOS, pad) index rows of its embedding. Either failure otherwise surfaces much
    later as a reshape of 0 elements or an index out of range."""
    probe = tok("The capital of France is Paris", add_special_tokens=False)["input_ids"]
    if not probe:
        raise ModelLoadError(f"{source}: its tokenizer turns text into no ids (an empty tokenizer: were the "
                             "tokenizer files saved with the model?)")
    rows = model.get_input_embeddings().num_embeddings
    used = {"text": max(probe), "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    past = {k: v for k, v in used.items() if v is not None and v >= rows}
    if past:
        raise ModelLoadError(f"{source}: tokenizer id(s) {past} are past the model's {rows} embedding rows "
                             "(a tokenizer of another model, or tokens added without resizing the embedding)")


def check_model_dir(path: str | os.PathLike) -> None:
    """Cheap checks of a local model directory before anything is loaded: ``config.json`` present
    and valid JSON, every ``*.safetensors`` file's header readable and covering the whole file (a
    truncated download fails here, naming the file)."""
    d = os.path.expanduser(str(path))
    cfg = os.path.join(d, "config.json")
    if not os.path.isfile(cfg):
        raise ModelNotFound(f"model directory {d!r} has no config.json")
    try:
        with open(cfg, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model config {cfg} cannot be read: {e}") from None
    from safetensors import SafetensorError, safe_open

    if not any(os.path.isfile(os.path.join(d, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(f"model directory {d!r} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                             "save the tokenizer with the model (tokenizer.save_pretrained(dir))")
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(d, name), framework="pt"):
                    pass
            except (OSError, SafetensorError) as e:
                raise ModelLoadError(f"weights file {os.path.join(d, name)} is truncated or corrupt ({e}); "
                                     "copy or download it again") from None


def _offline(local_files_only: bool) -> bool:
    if local_files_only:
        return True
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE_VALUES


def _looks_like_path(name: str) -> bool:
    """True for strings that can only be filesystem paths, not hub repo ids."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return True
    if any(sep in name for sep in (os.sep, os.altsep) if sep and sep != "/"):
        return True
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _resolve_source(name_or_path: str, offline: bool, cache_dir: str | None, revision: str | None = None) -> str:
    """Return what to hand to ``from_pretrained``, or raise :class:`ModelNotFound` at once."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        check_model_dir(expanded)
        return expanded
    if os.path.exists(expanded) or _looks_like_path(name_or_path):
        what = "is not a directory" if os.path.exists(expanded) else "does not exist"
        from .shapes import build_hint

        hint = None if os.path.exists(expanded) else build_hint(expanded)
        raise ModelNotFound(f"model path {name_or_path!r} {what}; "
                            + (hint or "pass a directory written by save_pretrained()"))
    if offline:
        if _cached_config(name_or_path, cache_dir, revision) is None:
            raise ModelNotFound(
                f"model {name_or_path!r}" + (f" at revision {revision!r}" if revision else "")
                + " is not in the local Hugging Face cache and hub access is "
                "off (HF_HUB_OFFLINE / local_files_only). Make it available by downloading it once "
                f"with internet access (e.g. `hf download {name_or_path}`), or pass a local "
                "directory containing config.json, the weights and the tokenizer."
            )
    return name_or_path


def locate_model(name_or_path: str, *, local_files_only: bool = False, cache_dir: str | None = None,
                 revision: str | None = None) -> str:
    """Where :func:`load_model` would load from, checked without reading any weights: a local
    directory (config and weight files intact) or, offline, a hub id in the local cache (at
    ``revision`` when given). Raises :class:`ModelNotFound` / :class:`ModelLoadError` naming the culprit."""
    return _resolve_source(name_or_path, _offline(local_files_only), cache_dir, revision)


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    *,
    local_files_only: bool = False,
    cache_dir: str | None = None,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: model in eval mode with all parameters frozen.

    ``dtype`` is one of :data:`DTYPES`. The architecture is validated on the config before
    any weights are read. Offline (``HF_HUB_OFFLINE`` or ``local_files_only``), a hub id
    missing from the local cache raises :class:`ModelNotFound` immediately. ``revision``: a hub
    id's commit, branch or tag (config, weights and tokenizer alike; the commit loaded is
    :func:`hub_commit`).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    offline = _offline(local_files_only)
    source = _resolve_source(name_or_path, offline, cache_dir, revision)
    common: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "local_files_only": offline,
        "cache_dir": cache_dir,
        **({"revision": revision} if revision else {}),
    }
    with _load_errors("config", source):
        config = AutoConfig.from_pretrained(source, **common)
    arch_for(config)  # unsupported architectures fail before the weights are read
    with _load_errors("weights", source):
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=DTYPES[dtype],
                                                     **placement(device), **common)
    model.to(device)  # without accelerate: from the host (with it, already there)
    model.eval()
    model.requires_grad_(False)
    with _load_errors("tokenizer", source):
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(source, **common))
    check_tokenizer(tok, model, source)
    return model, tok


def hub_commit(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """The hub commit :func:`load_model` reads ``name_or_path`` from (at ``revision``, else
    ``main``): the snapshot of its cached config, for the provenance (a hub repository's tokenizer
    files can change under a floating ``main``). None for a local directory or nothing cached."""
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return None
    cached = _cached_config(name_or_path, cache_dir, revision)
    return None if cached is None else Path(cached).parent.name


def _cached_config(hub_id: str, cache_dir: str | None, revision: str | None) -> str | None:
    """The path of ``hub_id``'s config.json in the local Hugging Face cache (at ``revision``, else
    ``main``), or None when it is not there."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, "config.json", cache_dir=cache_dir, revision=revision)
    return cached if isinstance(cached, str) else None


def placement(device: str | torch.device) -> dict[str, Any]:
    """``from_pretrained`` arguments that put the weights straight on ``device`` as they are read
    (``device_map``, which needs ``accelerate``: ``pip install -e ".[gpu]"``). Without it the
    whole model is first built in host memory (32 GB for Llama-3-8B in float32, per Ray worker
    on a node), then moved, which a warning says for a GPU. The same weights either way (tested
    on the CPU)."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        if torch.device(device).type == "cuda":
            warnings.warn("accelerate is not installed: the model is built in host memory, then moved to the GPU "
                          "(32 GB for Llama-3-8B in float32, per Ray worker); pip install -e '.[gpu]' loads it "
                          "straight onto the GPU", RuntimeWarning, stacklevel=2)
        return {}
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # accelerate wants an index: the current device
        dev = torch.device("cuda", torch.cuda.current_device())
    return {"device_map": {"": dev}}


@contextlib.contextmanager
def _load_errors(what: str, source: str):
    """Read errors of ``from_pretrained`` (missing or corrupt files) as one :class:`ModelLoadError`
    naming the model; programming errors (TypeError, ...) pass through."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        if isinstance(e, ModelNotFound):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load the {what} of model {source}: {type(e).__name__}: {first}") from e


def _config_digest_source(model: nn.Module) -> bytes:
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    stable = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()


def _raw_bytes(weight: torch.Tensor) -> memoryview:
    """The tensor's raw bytes (native dtype, row-major), copied to CPU; device-independent."""
    flat = weight.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.cpu().numpy())


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """Short stable hex id (16 chars of sha256) of a model's config and weights.

    Hashes the config (minus load-time keys), a strided float32 sample of every parameter,
    and the full bytes of every edited down-projection weight (so any change to one of them
    changes the digest). Device-independent; about 0.15 s per Llama-3-8B down_proj on CPU.
    """
    h = hashlib.sha256()
    h.update(_config_digest_source(model))
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // _SAMPLES_PER_PARAM)
        sample = flat[::stride][:_SAMPLES_PER_PARAM].to(torch.float32).cpu().contiguous()
        h.update(f"{name}:{tuple(param.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    for layer in range(n_layers(model)):
        weight = edit_weight(model, layer)
        h.update(f"down{layer}:{weight.dtype}:".encode())
        h.update(hashlib.sha256(_raw_bytes(weight)).digest())
    return h.hexdigest()[:16]
