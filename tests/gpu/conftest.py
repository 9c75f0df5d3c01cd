"""Fixtures of the GPU group (`pytest -m gpu tests/gpu`)."""

from __future__ import annotations

import sys
import types

import pytest
import torch


@pytest.fixture(scope="session")
def cuda_kernels():
    """The compiled Triton kernels the public ops dispatch CUDA tensors to (never the reference):
    .append / .decode / .prefill (the launch functions) and .decode_module (kernels/decode.py)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import trtllm_sawint4.ops  # noqa: F401
    from trtllm_sawint4 import kernels
    from trtllm_sawint4.ops import dispatch, reference

    if not kernels.HAVE_TRITON:
        pytest.skip("needs triton")
    device = torch.device("cuda")
    impls = {op: dispatch.kernel(op, device) for op in ("append", "decode", "prefill")}
    for op, fn in impls.items():
        assert fn is not None and fn is not getattr(reference, op), f"no CUDA kernel for {op}"
    if type(sys.modules["trtllm_sawint4.kernels.append"]._append_kernel).__name__ == "InterpretedFunction":
        pytest.fail("the kernels were imported with TRITON_INTERPRET=1: run the GPU group on a machine with CUDA")
    return types.SimpleNamespace(**impls, decode_module=sys.modules["trtllm_sawint4.kernels.decode"])
