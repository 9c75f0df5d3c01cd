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

When the repository root is on sys.path (``python -m pytest`` or ``python -c`` run from it), this folder
is also importable as a top-level ``kernels`` and would shadow Hugging Face's ``kernels`` package, which
transformers >= 5.25 depends on and imports at start-up. Imported under that name, this module therefore
hands the name over to the installed ``kernels`` distribution (``_yield_top_level_name``); where none is
installed it stays an inert package with no version, which transformers treats as absent.
"""

from __future__ import annotations

import importlib.util

HAVE_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAVE_TRITON"]


def _yield_top_level_name() -> None:
    """Load the installed ``kernels`` package from the sys.path entries other than this repository's root
    and put it in sys.modules under ``kernels``; the import statement that found this folder then returns
    it (importlib re-reads sys.modules after executing a module, so a module may stand in for another)."""
    import os
    import sys
    from importlib.machinery import PathFinder

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != repo_root]
    spec = PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise


if __name__ == "kernels":
    _yield_top_level_name()
