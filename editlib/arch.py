"""Architecture registry: the one place where model-family differences live (SPEC §7.1).

Everything is keyed by ``config.model_type`` (never by substrings of a checkpoint name).
Callers think of the edited matrix W in the ``nn.Linear`` convention ``[d_out, d_in]``
("W k", k = the down-projection *input*, SPEC §0); :func:`weight_out_in` and
:func:`to_param_layout` translate to and from GPT-2's ``Conv1D`` layout ``[d_in, d_out]``
(SPEC §1A ``upd_matrix_match_shape``).

transformers 5 decoder blocks return a bare hidden-state tensor, older versions a tuple
(SPEC §8.8); :func:`block_output` accepts both.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCHS",
    "ArchSpec",
    "UnsupportedArchitecture",
    "arch_for",
    "block_output",
    "down_proj",
    "edit_weight",
    "get_module",
    "key_dim",
    "kv_bytes_per_token",
    "n_layers",
    "to_param_layout",
    "value_dim",
    "weight_out_in",
]


class UnsupportedArchitecture(ValueError):
    """The model's ``config.model_type`` has no entry in :data:`ARCHS`."""


@dataclass(frozen=True)
class ArchSpec:
    """Module-name templates of one model family; ``{}`` is replaced by the layer index."""

    model_type: str
    layers: str  # decoder block, e.g. "model.layers.{}"
    mlp: str  # whole MLP, e.g. "model.layers.{}.mlp"
    down: str  # edited matrix's module, e.g. "model.layers.{}.mlp.down_proj"
    attn: str  # self-attention, e.g. "model.layers.{}.self_attn"
    final_norm: str  # final norm before the LM head, e.g. "model.norm"
    lm_head: str  # output projection, e.g. "lm_head"
    embed: str  # token embedding, e.g. "model.embed_tokens"
    conv1d: bool  # True when `down` is a Conv1D storing its weight as [d_in, d_out]
    n_layers_attr: str  # config attribute holding the depth
    # Llama-style blocks (input_layernorm → self_attn.{q,k,v,o}_proj with RoPE from this module →
    # post_attention_layernorm → mlp) that editlib.packed can run on packed tokens; None: it cannot
    rotary: str | None = None

    def layer_name(self, layer: int) -> str:
        """Name of decoder block ``layer``."""
        return self.layers.format(layer)

    def mlp_name(self, layer: int) -> str:
        """Name of the MLP of block ``layer``."""
        return self.mlp.format(layer)

    def down_name(self, layer: int) -> str:
        """Name of the edited down-projection module of block ``layer``."""
        return self.down.format(layer)

    def attn_name(self, layer: int) -> str:
        """Name of the self-attention module of block ``layer``."""
        return self.attn.format(layer)


def _llama_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type=model_type,
        layers="model.layers.{}",
        mlp="model.layers.{}.mlp",
        down="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        lm_head="lm_head",
        embed="model.embed_tokens",
        conv1d=False,
        n_layers_attr="num_hidden_layers",
        rotary="model.rotary_emb",
    )


ARCHS: dict[str, ArchSpec] = {
    # "llama" covers Llama-2 and Llama-3 (same model_type and module tree).
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "gpt2": ArchSpec(
        model_type="gpt2",
        layers="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        down="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",  # tied to transformer.wte
        embed="transformer.wte",
        conv1d=True,
        n_layers_attr="n_layer",
    ),
    "gptj": ArchSpec(
        model_type="gptj",
        layers="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        down="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.wte",
        conv1d=False,
        n_layers_attr="n_layer",
    ),
}


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "model_type"):
        raise TypeError(
            f"expected a transformers model or config, got {type(model_or_config).__name__}"
        )
    return config


def arch_for(model_or_config: Any) -> ArchSpec:
    """The :class:`ArchSpec` for a model or config, looked up by ``config.model_type``."""
    model_type = _config_of(model_or_config).model_type
    try:
        return ARCHS[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def n_layers(model: Any) -> int:
    """Number of decoder blocks, read from the config attribute named by the spec."""
    config = _config_of(model)
    return int(getattr(config, arch_for(config).n_layers_attr))


def max_positions(config: Any) -> int | None:
    """The positions a model has, from its config (an object or its ``to_dict()``):
    ``max_position_embeddings`` (Llama, Mistral, Qwen2), else ``n_positions`` (GPT-2, GPT-J);
    None when it names neither."""
    get = config.get if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    npos = get("max_position_embeddings") or get("n_positions")
    return int(npos) if npos else None


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes one token adds to the KV cache (keys and values of every block, the model's dtype):
    2 · layers · kv_heads · head_dim · element size. Grouped-query models cache ``num_key_value_heads``
    heads; GPT-2 / GPT-J configs map their ``n_head`` / ``n_embd`` onto the names read here."""
    cfg = _config_of(model)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return 2 * n_layers(model) * kv_heads * head_dim * edit_weight(model, 0).element_size()


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a KeyError names it if it does not exist."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"{type(model).__name__} has no module named {name!r}") from None


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone returning final-normed hidden states, output projection): logits computed only
    at the positions a loss or a score reads (SPEC §9)."""
    return model.base_model, get_module(model, arch_for(model).lm_head)


def _check_layer(model: nn.Module, layer: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    n = n_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is outside the model's 0..{n - 1} decoder layers")
    return int(layer)


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The edited down-projection module of decoder block ``layer``."""
    layer = _check_layer(model, layer)
    return get_module(model, arch_for(model).down_name(layer))


def edit_weight(model: nn.Module, layer: int) -> nn.Parameter:
    """The edited weight parameter of block ``layer``, in its own storage layout."""
    return down_proj(model, layer).weight


def weight_out_in(model: nn.Module, layer: int) -> torch.Tensor:
    """The edited weight as a ``[d_out, d_in]`` view sharing storage with the parameter.

    Detached from autograd; in-place writes to the view modify the model.
    """
    w = edit_weight(model, layer).detach()
    return w.T if arch_for(model).conv1d else w


def to_param_layout(spec: ArchSpec, delta_out_in: torch.Tensor) -> torch.Tensor:
    """Turn a ``[d_out, d_in]`` tensor into the parameter's own layout (transposed for Conv1D)."""
    if delta_out_in.dim() != 2:
        raise ValueError(f"expected a 2-D [d_out, d_in] tensor, got shape {tuple(delta_out_in.shape)}")
    return delta_out_in.T if spec.conv1d else delta_out_in


def key_dim(model: nn.Module, layer: int) -> int:
    """d_in: size of a key (the down-projection input)."""
    return int(weight_out_in(model, layer).shape[1])


def value_dim(model: nn.Module, layer: int) -> int:
    """d_out: size of a value (the down-projection output, = hidden size)."""
    return int(weight_out_in(model, layer).shape[0])


def block_output(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a decoder block's forward output (tensor or tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot extract hidden states from a block output of type {type(output).__name__}")
