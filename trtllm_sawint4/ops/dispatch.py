"""Which implementation runs an op: the Triton kernel on CUDA (when triton is installed), else the
PyTorch reference. The kernels are imported here, from above: they never register themselves."""

from __future__ import annotations

from typing import Callable

import torch

from . import reference

_kernels: dict[str, Callable] | None = None


def _load_kernels() -> dict[str, Callable]:
    """The CUDA kernels by op name (each with the reference's signature, plus keyword-only launch
    arguments), imported on first use: importing triton is slow, and on a CPU machine TRITON_INTERPRET
    must be decided before it. Empty without triton."""
    global _kernels
    if _kernels is None:
        try:
            from trtllm_sawint4.kernels import append, decode, prefill
        except ImportError:  # no triton: the reference serves CUDA too
            _kernels = {}
        else:
            _kernels = {"append": append.append, "decode": decode.decode, "prefill": prefill.prefill}
    return _kernels


def kernel(name: str, device: torch.device) -> Callable | None:
    """The Triton kernel of op `name` for tensors on `device`, or None (the reference runs)."""
    if device.type != "cuda":
        return None
    return _load_kernels().get(name)


def implementation(name: str, tensor: torch.Tensor) -> Callable:
    """The kernel for `tensor`'s device, else the reference (`ops.reference.<name>`)."""
    return kernel(name, tensor.device) or getattr(reference, name)
