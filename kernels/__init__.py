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

# The repository's top-level folder is also importable as a plain `kernels` package whenever the
# repository root is on sys.path (`python -m ...` run from it). transformers probes for Hugging
# Face's `kernels` package by importing that name, so under any other name this module must import
# cleanly and do nothing (no version: transformers then treats it as absent).
if HAVE_TRITON and __name__ == "trtllm_sawint4.kernels":
    from .append import append
    from .decode import decode
    from .prefill import prefill
    from ..ops.dispatch import register

    register("append", "cuda", append)
    register("decode", "cuda", decode)
    register("prefill", "cuda", prefill)
    __all__ = ["append", "decode", "prefill", "HAVE_TRITON"]
else:  # pragma: no cover
    __all__ = ["HAVE_TRITON"]
