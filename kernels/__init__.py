"""Triton kernels of the three cache ops (append, decode, prefill).

Importing this package registers them for CUDA in trtllm_sawint4.ops.dispatch. Without triton
the import succeeds and registers nothing (the reference then serves CUDA too). The same
wrappers run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except Exception:  # pragma: no cover - machines without triton
    HAVE_TRITON = False

if HAVE_TRITON:
    from .append import append
    from .decode import decode
    from .prefill import prefill
    from ..ops.dispatch import register

    register("append", "cuda", append)
    register("decode", "cuda", decode)
    register("prefill", "cuda", prefill)
    __all__ = ["append", "decode", "prefill", "HAVE_TRITON"]
else:
    __all__ = ["HAVE_TRITON"]
