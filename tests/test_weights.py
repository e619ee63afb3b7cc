"""editlib.weights: which tensors are the unedited model's."""
from __future__ import annotations

import pytest
import torch

from _fixtures import one_thread, tiny_llama, word_tokenizer  # noqa: F401
from editlib.arch import weight_out_in
from editlib.weights import EditSession, remark_unedited, unedited, written


def test_remark_unedited_refuses_while_an_edit_is_written() -> None:
    """Taking the model's tensors as its unedited ones while a session holds a write would let
    shared blocks and stored values be reused across edited weights: refused, and the mark kept."""
    model = tiny_llama(len(word_tokenizer()))
    assert unedited(model)  # the first call takes the model as it is
    W = weight_out_in(model, 1)
    R, X = torch.ones(W.shape[0], 1, dtype=torch.float64), torch.full((1, W.shape[1]), 1e-3, dtype=torch.float64)
    with EditSession(model) as s:
        s.apply_factors(1, R, X)
        assert written(model) and not unedited(model)
        with pytest.raises(RuntimeError, match="holds a write"):
            remark_unedited(model)
    assert unedited(model)  # restored on exit: the unedited weights again
    remark_unedited(model)
    assert unedited(model)
