"""Which implementation runs an op: a registered kernel for the tensor's device, else the reference."""

from __future__ import annotations

from typing import Callable

import torch

from . import reference

#: (op name, device type) -> implementation with the reference's signature.
_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
_loaded_kernels = False


def register(name: str, device_type: str, fn: Callable) -> None:
    _IMPLEMENTATIONS[(name, device_type)] = fn


def _load_kernels() -> None:
    """Import the Triton kernels once; they register themselves for CUDA."""
    global _loaded_kernels
    if _loaded_kernels:
        return
    _loaded_kernels = True
    try:
        from .. import kernels  # noqa: F401
    except ImportError:  # no triton: the reference serves CUDA too
        pass


def implementation(name: str, tensor: torch.Tensor) -> Callable:
    if tensor.device.type != "cpu":
        _load_kernels()
    return _IMPLEMENTATIONS.get((name, tensor.device.type), getattr(reference, name))
