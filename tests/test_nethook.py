"""editlib.nethook: hooks that record, edit or stop a forward pass, and always leave the model as
it was (also when a block raises or a hook cannot be registered)."""
from __future__ import annotations

import pytest
import torch

from _fixtures import one_thread, tiny_llama, word_tokenizer  # noqa: F401
from editlib.arch import arch_for, get_module
from editlib.nethook import StopForward, Trace, TraceDict, _prep, run_until


@pytest.fixture(scope="module")
def model():
    return tiny_llama(len(word_tokenizer()))


IDS = torch.tensor([[1, 3, 4, 5]])


def _hooks(model) -> int:
    """Forward hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) for m in model.modules())


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_trace_records_and_copies_on_request(model) -> None:
    """The retained input and output are the module's (detached); ``clone`` keeps them apart from
    the tensors the forward goes on to use, so an in-place change of those does not reach them."""
    down = arch_for(model).down_name(1)
    want = _logits(model)
    with Trace(model, down, retain_input=True) as t:
        got = model(input_ids=IDS).logits
    assert torch.equal(got, want) and not t.output.requires_grad
    mod = get_module(model, down)
    assert torch.equal(t.output, mod(t.input).detach())
    with Trace(model, down, retain_input=True, clone=True) as c:
        model(input_ids=IDS)
    assert torch.equal(c.output, t.output)
    kept = c.output.clone()
    with Trace(model, down, clone=False) as alias, Trace(model, down, retain_output=False,
                                                         edit_output=lambda o: o.mul_(0)):
        model(input_ids=IDS)
    assert (alias.output == 0).all()  # without clone: the tensor the later hook wrote in place
    assert torch.equal(c.output, kept)
    assert _hooks(model) == 0


def test_prep_keeps_the_structure_of_tuple_outputs() -> None:
    a, b = torch.ones(2, requires_grad=True), torch.zeros(3)
    out = _prep((a, [b, None], "x"), detach=True, clone=True)
    assert isinstance(out, tuple) and isinstance(out[1], list) and out[1][1] is None and out[2] == "x"
    assert not out[0].requires_grad and torch.equal(out[0], a.detach())
    assert out[0].data_ptr() != a.data_ptr() and out[1][0].data_ptr() != b.data_ptr()


def test_edit_output_changes_the_forward_only_inside_the_block(model) -> None:
    want = _logits(model)
    names = [arch_for(model).down_name(i) for i in (0, 2)]
    seen = []

    def edit(out, name):
        seen.append(name)
        return out * 2

    with TraceDict(model, names, edit_output=edit) as td:
        edited = model(input_ids=IDS).logits
    assert seen == names and set(td) == set(names)
    assert not torch.allclose(edited, want)
    assert torch.equal(_logits(model), want) and _hooks(model) == 0


def test_hooks_go_when_the_block_raises(model) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with TraceDict(model, [arch_for(model).down_name(i) for i in range(3)]):
            assert _hooks(model) == 3
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_a_bad_layer_name_leaves_no_hook_behind(model) -> None:
    """The modules hooked before the bad name are unhooked before the error reaches the caller."""
    names = [arch_for(model).down_name(0), arch_for(model).down_name(1), "model.layers.9.mlp"]
    with pytest.raises(KeyError, match="model.layers.9.mlp"):
        TraceDict(model, names)
    assert _hooks(model) == 0


def test_stop_ends_the_pass_after_the_last_module(model) -> None:
    """``stop=True``: the pass ends after the last named module ran (the later blocks do not), the
    block swallows the stop, and the model runs whole again afterwards."""
    spec = arch_for(model)
    ran = []
    late = get_module(model, spec.layer_name(2)).register_forward_hook(lambda *a: ran.append(2))
    try:
        with TraceDict(model, [spec.down_name(0), spec.layer_name(1)], stop=True) as td:
            out = run_until(lambda: model(input_ids=IDS))
        assert out is None and td[spec.layer_name(1)].output is not None and ran == []
        with Trace(model, spec.layer_name(0), stop=True):
            model(input_ids=IDS)  # StopForward swallowed by the block
        with pytest.raises(StopForward):
            t = Trace(model, spec.layer_name(0), stop=True)
            try:
                model(input_ids=IDS)
            finally:
                t.close()
    finally:
        late.remove()
    assert _hooks(model) == 0
    assert run_until(lambda: 7) == 7
