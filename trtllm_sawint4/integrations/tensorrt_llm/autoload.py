"""Post-import hook: register the saw_int4 backends in every process that imports AutoDeploy.

TensorRT-LLM builds the model in worker processes (MPI or IPC workers started by ``LLM``, trtllm-serve
and the Triton model), and nothing runs a user's import there. The ``.pth`` file that ``sawint4 trtllm
install-hook`` writes into site-packages runs at every interpreter start of that environment; it loads
this file by path (so that starting Python never imports torch or trtllm_sawint4) and calls `arm()`.
`arm()` puts a finder at the front of ``sys.meta_path`` that waits for TensorRT-LLM's attention interface
module; once that module has executed, the backends are registered (`registration.register`), before
any transform can ask for them.

Stdlib only, and it must stay so. Set SAWINT4_TRTLLM_AUTOREGISTER=0 to disable it. A failing
registration warns (RuntimeWarning, on stderr) and leaves TensorRT-LLM's import intact; AutoDeploy then
reports the backend as not registered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import os
import sys
import warnings

TARGET_MODULE = "tensorrt_llm._torch.auto_deploy.custom_ops.attention_interface"
REGISTRATION_MODULE = "trtllm_sawint4.integrations.tensorrt_llm.registration"
DISABLE_ENV = "SAWINT4_TRTLLM_AUTOREGISTER"


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _register(module) -> None:
    try:
        importlib.import_module(REGISTRATION_MODULE).register(module)
    except Exception as e:  # never break TensorRT-LLM's own import
        warnings.warn(f"trtllm-sawint4: registering the saw_int4 AutoDeploy backends failed: {e!r}", RuntimeWarning,
                      stacklevel=2)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, then registers; everything else is forwarded to the real loader."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    sawint4_trtllm_hook = True

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if getattr(finder, "sawint4_trtllm_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def armed() -> bool:
    return any(getattr(f, "sawint4_trtllm_hook", False) for f in sys.meta_path)


def arm() -> bool:
    """Arm the hook in this process (idempotent); returns whether it is armed. If the attention interface
    is already imported, registers at once."""
    if not enabled():
        return False
    if armed():
        return True
    sys.meta_path.insert(0, _Finder())
    module = sys.modules.get(TARGET_MODULE)
    if module is not None and hasattr(module, "AttentionRegistry"):
        _register(module)
    return True


def disarm() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "sawint4_trtllm_hook", False)]
