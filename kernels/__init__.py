"""Triton kernels of the three cache ops, one module each, imported by name:

    trtllm_sawint4.kernels.append    fused transform + quantize + store
    trtllm_sawint4.kernels.decode    plan a decode launch (schedule.py), run its backend:
                                     decode_triton.py (every format) or decode_gluon.py (INT4, head_dim 128);
                                     _reduce.py merges their split partials
    trtllm_sawint4.kernels.prefill   paged (chunked) prefill
    trtllm_sawint4.kernels.config    the launch configuration (DEFAULT), an immutable value callers pass
    trtllm_sawint4.kernels.aot       the ahead-of-time variants TensorRT plugins launch

The torch-op layer (trtllm_sawint4.ops.dispatch) imports them; nothing here imports upward. The
same launchers run on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported).

This package imports nothing itself: the repository's top-level folder is also importable as a plain
`kernels` package whenever the repository root is on sys.path, and transformers probes that name for
Hugging Face's `kernels` package, so it must import cleanly and do nothing (it has no version, so
transformers treats it as absent).
"""

from __future__ import annotations

import importlib.util

HAVE_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAVE_TRITON"]
