"""editlib.arch on tiny random models of every supported architecture."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from editlib import arch
from editlib.arch import (
    ARCHS,
    UnsupportedArchitecture,
    arch_for,
    block_output,
    down_proj,
    edit_weight,
    get_module,
    key_dim,
    n_layers,
    to_param_layout,
    value_dim,
    weight_out_in,
)

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 32, 64, 3, 100


def tiny_config(model_type: str, layers: int = LAYERS) -> transformers.PretrainedConfig:
    """A tiny random config of the given family (hidden 32, MLP 64, 3 layers by default)."""
    llama_kw = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
    )
    gpt_kw = dict(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=layers, n_head=4, vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0)
    if model_type == "llama":
        return transformers.LlamaConfig(**llama_kw)
    if model_type == "mistral":
        return transformers.MistralConfig(**llama_kw)
    if model_type == "qwen2":
        return transformers.Qwen2Config(**llama_kw)
    if model_type == "gpt2":
        return transformers.GPT2Config(**gpt_kw)
    if model_type == "gptj":
        return transformers.GPTJConfig(rotary_dim=4, **gpt_kw)
    raise AssertionError(model_type)


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(tiny_config(request.param))
    return m.eval().requires_grad_(False)


def test_registry_keys_match_model_type() -> None:
    """Every registry key is the model_type transformers itself gives that family's config, and a
    config of that family (built by transformers, not by us) finds its spec."""
    for key, spec in ARCHS.items():
        assert transformers.AutoConfig.for_model(key).model_type == key == spec.model_type
        assert arch_for(tiny_config(key)) is spec


def test_depth_attribute_is_the_configs_depth(model: torch.nn.Module) -> None:
    """``n_layers_attr`` names the config attribute that sets the number of decoder blocks."""
    spec = arch_for(model)
    blocks = get_module(model, spec.layers.rsplit(".", 1)[0])
    assert getattr(model.config, spec.n_layers_attr) == len(blocks) == n_layers(model) == LAYERS
    cfg = tiny_config(spec.model_type, layers=LAYERS + 2)
    assert getattr(cfg, spec.n_layers_attr) == n_layers(cfg) == LAYERS + 2
    deeper = transformers.AutoModelForCausalLM.from_config(cfg)
    assert len(get_module(deeper, spec.layers.rsplit(".", 1)[0])) == LAYERS + 2


def test_arch_for_model_and_config(model: torch.nn.Module) -> None:
    spec = arch_for(model)
    assert spec is arch_for(model.config)
    assert spec.model_type == model.config.model_type
    assert n_layers(model) == LAYERS


@pytest.mark.parametrize("layer_pos", ["first", "last"])
def test_templates_resolve(model: torch.nn.Module, layer_pos: str) -> None:
    spec = arch_for(model)
    layer = 0 if layer_pos == "first" else n_layers(model) - 1
    names = [spec.layers, spec.mlp, spec.down, spec.attn]
    for template in names:
        assert "{}" in template
        assert isinstance(get_module(model, template.format(layer)), torch.nn.Module)
    for name in (spec.final_norm, spec.lm_head, spec.embed):
        assert isinstance(get_module(model, name), torch.nn.Module)
    assert isinstance(get_module(model, spec.embed), torch.nn.Embedding)
    assert get_module(model, spec.layer_name(layer)) is get_module(model, spec.layers.format(layer))
    assert down_proj(model, layer) is get_module(model, spec.down_name(layer))
    assert get_module(model, spec.mlp_name(layer)) is get_module(model, spec.mlp.format(layer))
    assert get_module(model, spec.attn_name(layer)) is get_module(model, spec.attn.format(layer))


def test_layer_count_matches_blocks(model: torch.nn.Module) -> None:
    spec = arch_for(model)
    with pytest.raises(KeyError):
        get_module(model, spec.layers.format(n_layers(model)))


def test_down_module_type_matches_conv1d_flag(model: torch.nn.Module) -> None:
    spec = arch_for(model)
    mod = down_proj(model, 0)
    if spec.model_type == "gpt2":
        assert spec.conv1d and isinstance(mod, Conv1D)
    else:
        assert not spec.conv1d and isinstance(mod, torch.nn.Linear)
    assert edit_weight(model, 0) is mod.weight
    assert isinstance(edit_weight(model, 0), torch.nn.Parameter)


def test_weight_out_in_shape_and_storage(model: torch.nn.Module) -> None:
    layer = n_layers(model) - 1
    w = weight_out_in(model, layer)
    param = edit_weight(model, layer)
    assert tuple(w.shape) == (HIDDEN, INTERMEDIATE)
    assert key_dim(model, layer) == INTERMEDIATE
    assert value_dim(model, layer) == HIDDEN
    assert w.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    assert not w.requires_grad
    # Writes through the view reach the parameter, at the transposed place for Conv1D.
    before = param.detach().clone()
    w[1, 2] += 1.0
    idx = (2, 1) if arch_for(model).conv1d else (1, 2)
    assert param[idx].item() == pytest.approx(before[idx].item() + 1.0)
    with torch.no_grad():
        param.copy_(before)


def test_to_param_layout_round_trip(model: torch.nn.Module) -> None:
    spec = arch_for(model)
    param = edit_weight(model, 0)
    delta = torch.randn(value_dim(model, 0), key_dim(model, 0))
    in_layout = to_param_layout(spec, delta)
    assert in_layout.shape == param.shape
    back = in_layout.T if spec.conv1d else in_layout
    assert torch.equal(back, delta)
    # Adding the delta in parameter layout == adding it to the [d_out, d_in] view.
    expected = weight_out_in(model, 0).clone() + delta
    new_param = param.detach().clone() + in_layout
    got = new_param.T if spec.conv1d else new_param
    assert torch.allclose(got, expected)
    with pytest.raises(ValueError):
        to_param_layout(spec, torch.zeros(3))


def test_hook_dims_and_linear_map(model: torch.nn.Module) -> None:
    layer = 1
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["in"], seen["out"] = inputs[0], output

    handle = down_proj(model, layer).register_forward_hook(hook)
    try:
        model(torch.tensor([[1, 2, 3, 4]]))
    finally:
        handle.remove()
    assert seen["in"].shape[-1] == key_dim(model, layer)
    assert seen["out"].shape[-1] == value_dim(model, layer)
    # "W k" convention: output = W k (+ bias for GPT-2 / GPT-J).
    bias = getattr(down_proj(model, layer), "bias", None)
    expected = seen["in"] @ weight_out_in(model, layer).T
    if bias is not None:
        expected = expected + bias
    assert torch.allclose(seen["out"], expected, atol=1e-5)


def test_block_output_normalises(model: torch.nn.Module) -> None:
    spec = arch_for(model)
    seen: dict[str, object] = {}

    def hook(_mod: torch.nn.Module, _inputs: object, output: object) -> None:
        seen["out"] = output

    handle = get_module(model, spec.layer_name(0)).register_forward_hook(hook)
    try:
        model(torch.tensor([[5, 6, 7]]))
    finally:
        handle.remove()
    hidden = block_output(seen["out"])
    assert hidden.shape == (1, 3, HIDDEN)
    assert block_output((hidden, None)) is hidden
    assert block_output(hidden) is hidden
    with pytest.raises(TypeError):
        block_output(None)


@pytest.mark.parametrize("bad", [-1, LAYERS, LAYERS + 5])
def test_out_of_range_layer(model: torch.nn.Module, bad: int) -> None:
    msg = f"layer {bad} is outside the model's 0..{LAYERS - 1} decoder layers"
    for fn in (down_proj, edit_weight, weight_out_in, key_dim, value_dim):
        with pytest.raises(ValueError) as exc:
            fn(model, bad)
        assert str(exc.value) == msg


def test_non_int_layer_rejected(model: torch.nn.Module) -> None:
    with pytest.raises(TypeError):
        down_proj(model, 1.0)  # type: ignore[arg-type]


def test_get_module_missing_names_module(model: torch.nn.Module) -> None:
    with pytest.raises(KeyError, match="no_such.module"):
        get_module(model, "no_such.module")


def test_unknown_model_type() -> None:
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=100)
    with pytest.raises(UnsupportedArchitecture) as exc:
        arch_for(cfg)
    assert isinstance(exc.value, ValueError)
    assert "'bert'" in str(exc.value)
    for name in ARCHS:
        assert name in str(exc.value)
    with pytest.raises(TypeError):
        arch_for(object())


def test_spec_is_frozen() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        ARCHS["llama"].down = "x"  # type: ignore[misc]
    assert arch.ARCHS["llama"].down == "model.layers.{}.mlp.down_proj"


def test_max_positions_from_a_config_or_its_dict() -> None:
    """Llama names its positions max_position_embeddings, GPT-2 n_positions; the pre-load check
    reads a config's dict, C0's default truncation the loaded config: both give the same count."""
    llama = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=8192)
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=1024)
    for cfg, n in ((llama, 8192), (gpt2, 1024)):
        assert arch.max_positions(cfg) == n and arch.max_positions(cfg.to_dict()) == n
    assert arch.max_positions({"model_type": "x"}) is None and arch.max_positions(object()) is None
