"""Puts the fake tensorrt_llm / triton_python_backend_utils of tests/fakes on sys.path for one test.

The fakes follow the documented interfaces of TensorRT-LLM 1.3 (AutoDeploy sources at commit
1099c65c) and of Triton's Python backend; they are not those projects (tests/fakes/README.md)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).parent / "fakes"
_FAKE_ROOTS = ("tensorrt_llm", "triton_python_backend_utils")


def _ours(name: str) -> bool:
    return any(name == r or name.startswith(r + ".") for r in _FAKE_ROOTS)


def _purge() -> dict:
    """Remove (and return) every tensorrt_llm / triton_python_backend_utils module of this process."""
    return {name: sys.modules.pop(name) for name in [n for n in sys.modules if _ours(n)]}


def _restore(saved: dict) -> None:
    _purge()
    sys.modules.update(saved)


@pytest.fixture
def fake_trtllm():
    """The fake AutoDeploy attention_interface module (imported fresh: an empty AttentionRegistry)."""
    saved = _purge()
    sys.path.insert(0, str(FAKES))
    try:
        yield importlib.import_module("tensorrt_llm._torch.auto_deploy.custom_ops.attention_interface")
    finally:
        sys.path.remove(str(FAKES))
        _restore(saved)


@pytest.fixture
def no_trtllm():
    """A process in which `import tensorrt_llm` fails, whatever is installed."""
    saved = _purge()
    sys.modules["tensorrt_llm"] = None
    try:
        yield
    finally:
        _restore(saved)
