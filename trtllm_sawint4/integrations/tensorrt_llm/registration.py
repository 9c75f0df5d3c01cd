"""Registering the saw_int4 backends with AutoDeploy's AttentionRegistry, idempotently.

AutoDeploy's registry refuses a second registration of a name (an assert), so `register` checks first:
a name already bound to one of our descriptors is left as it is, a name bound to anything else is an
error. Registration must happen in the process that builds the model; TensorRT-LLM builds it in worker
processes, which is what `autoload` (armed by the ``.pth`` file of ``sawint4 trtllm install-hook``) is for.
"""

from __future__ import annotations

import importlib
import sys
import threading
import warnings

from . import BACKENDS, TARGET_TENSORRT_LLM_COMMIT, TARGET_TENSORRT_LLM_VERSION

ATTENTION_INTERFACE = "tensorrt_llm._torch.auto_deploy.custom_ops.attention_interface"

MISSING_MESSAGE = (
    "TensorRT-LLM is not installed: the saw_int4 AutoDeploy backends need it. Install TensorRT-LLM "
    f"{TARGET_TENSORRT_LLM_VERSION} (the line this adapter targets; sources read at commit "
    f"{TARGET_TENSORRT_LLM_COMMIT[:12]}) in this Python environment, e.g. `pip install tensorrt_llm` on a "
    "machine that reaches NVIDIA's package index, or use a TensorRT-LLM NGC container "
    "(see https://nvidia.github.io/TensorRT-LLM/installation/). Everything else in trtllm_sawint4 works without it."
)

_LOCK = threading.RLock()
_warned_version: set[str] = set()


def load_attention_interface():
    """TensorRT-LLM's AutoDeploy attention_interface module, or ImportError with MISSING_MESSAGE."""
    try:
        return importlib.import_module(ATTENTION_INTERFACE)
    except ImportError as e:
        if (e.name or "").split(".")[0] == "tensorrt_llm" and sys.modules.get("tensorrt_llm") is None:
            raise ImportError(MISSING_MESSAGE) from e
        version = getattr(sys.modules.get("tensorrt_llm"), "__version__", "unknown")
        raise ImportError(f"TensorRT-LLM {version} is installed but {ATTENTION_INTERFACE} does not import ({e}); "
                          f"the saw_int4 backends target TensorRT-LLM {TARGET_TENSORRT_LLM_VERSION}") from e


def _registry_has(registry, name: str) -> bool:
    has = getattr(registry, "has", None)
    return has(name) if has is not None else name in registry._attention_registry


def _check_version() -> None:
    version = str(getattr(sys.modules.get("tensorrt_llm"), "__version__", "unknown"))
    if version.startswith(TARGET_TENSORRT_LLM_VERSION) or version in _warned_version:
        return
    _warned_version.add(version)
    warnings.warn(f"trtllm-sawint4: the saw_int4 AutoDeploy backends were written against TensorRT-LLM "
                  f"{TARGET_TENSORRT_LLM_VERSION} (commit {TARGET_TENSORRT_LLM_COMMIT[:12]}); this is {version}. "
                  "AutoDeploy's interfaces change often: run tests/gpu/test_trtllm_gpu.py on this version.",
                  RuntimeWarning, stacklevel=3)


def register(attention_interface=None) -> list[str]:
    """Register every backend of BACKENDS that is not registered yet; returns all their names.

    attention_interface: the module to register with (default: TensorRT-LLM's, imported here)."""
    ai = attention_interface if attention_interface is not None else load_attention_interface()
    registry = ai.AttentionRegistry
    with _LOCK:
        classes = None
        for name in BACKENDS:
            if _registry_has(registry, name):
                existing = registry.get(name)
                if getattr(existing, "SAWINT4_BACKEND", None) != name:
                    raise RuntimeError(f"AutoDeploy attention backend {name!r} is already registered by "
                                       f"{existing!r}, not by trtllm_sawint4")
                continue
            if classes is None:
                from .adapter import make_backends

                classes = make_backends(ai)
            registry.register(name)(classes[name])
    _check_version()
    return list(BACKENDS)


def registered(attention_interface=None) -> dict[str, bool]:
    """Which of our backend names the registry holds (our descriptors only)."""
    ai = attention_interface if attention_interface is not None else load_attention_interface()
    registry = ai.AttentionRegistry
    return {name: _registry_has(registry, name) and getattr(registry.get(name), "SAWINT4_BACKEND", None) == name
            for name in BACKENDS}
