"""Serving: a continuous-batching engine over the paged cache, behind a small engine interface.

`api` (SamplingParams, TokenEvent, RequestError, Engine) and `loop` (EngineLoop) import no torch; the
engine itself (`engine.PagedEngine`) and `build_engine` load torch and transformers when first used.
"""

from __future__ import annotations

from .api import Engine, RequestError, SamplingParams, TokenEvent
from .loop import EngineLoop

__all__ = ["Engine", "EngineLoop", "RequestError", "SamplingParams", "TokenEvent", "build_engine"]


def build_engine(*args, **kwargs):
    """Load a model and its tokenizer and build a PagedEngine; see serving.factory.build_engine."""
    from .factory import build_engine as _build

    return _build(*args, **kwargs)
