"""editlib.tf32: TF32 is read and switched without tripping torch's legacy/new API check."""
from __future__ import annotations

import pytest
import torch

from editlib.tf32 import matmul_tf32, set_tf32, tf32_applies, tf32_matmuls

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture(autouse=True)
def restore_switches():
    """Each test leaves torch's TF32 switches as it found them (they are process-wide)."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (m.fp32_precision, c.fp32_precision) if NEW_API else (m.allow_tf32, c.allow_tf32)
    yield
    if NEW_API:
        m.fp32_precision, c.fp32_precision = saved
    else:
        m.allow_tf32, c.allow_tf32 = saved


def test_set_and_read() -> None:
    set_tf32(True)
    assert matmul_tf32() and torch.backends.cudnn.allow_tf32
    set_tf32(False)
    assert not matmul_tf32() and not torch.backends.cudnn.allow_tf32


@pytest.mark.skipif(not NEW_API, reason="torch before 2.9 has only the legacy switch")
def test_works_after_the_new_api_set_tf32() -> None:
    """A notebook or library that set ``fp32_precision = "tf32"`` makes reading the legacy boolean
    raise; editlib's reads and switches still work, and leave the legacy boolean readable."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="legacy and new"):
        torch.backends.cuda.matmul.allow_tf32  # noqa: B018  (torch's own behaviour, the reason for the module)
    assert matmul_tf32()
    with tf32_matmuls(torch.device("cuda")):
        assert matmul_tf32()
    assert matmul_tf32()
    set_tf32(False)
    assert not matmul_tf32() and torch.backends.cuda.matmul.allow_tf32 is False


@pytest.mark.skipif(not NEW_API, reason="torch before 2.9 has only the legacy switch")
def test_inherited_precision_is_resolved() -> None:
    """``fp32_precision = "none"`` inherits torch's global setting."""
    before = torch.backends.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"
        assert matmul_tf32()
        torch.backends.fp32_precision = "ieee"
        assert not matmul_tf32()
    finally:
        torch.backends.fp32_precision = before


def test_scoped_switch_restores_the_previous_state() -> None:
    """On for CUDA inside the block (torch's flags only: no GPU needed), as before after it, also
    when the block raises; a CPU device changes nothing."""
    for start in (False, True):
        set_tf32(start)
        with pytest.raises(KeyError):
            with tf32_matmuls(torch.device("cuda")):
                assert matmul_tf32()
                raise KeyError("inside")
        assert matmul_tf32() is start
        with tf32_matmuls(torch.device("cpu")):
            assert matmul_tf32() is start
        with tf32_matmuls(torch.device("cuda"), on=False):  # C0's products under model.tf32
            assert not matmul_tf32()
        assert matmul_tf32() is start


def test_tf32_applies_to_float32_weights_on_cuda_only() -> None:
    """What C0 entries and results folders are keyed by: float32 weights on a CUDA device while
    TF32 is on; a 16-bit model, a CPU model or TF32 off leave every number as it was."""
    from types import SimpleNamespace

    def model(device: str, dtype: torch.dtype):
        p = SimpleNamespace(device=torch.device(device), dtype=dtype)
        return SimpleNamespace(parameters=lambda: iter([p]))

    set_tf32(True)
    assert tf32_applies(model("cuda", torch.float32))
    assert not tf32_applies(model("cuda", torch.bfloat16)) and not tf32_applies(model("cpu", torch.float32))
    set_tf32(False)
    assert not tf32_applies(model("cuda", torch.float32))
