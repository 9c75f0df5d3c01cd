"""The engine interface: what a server (the Triton Python model, the CLI) calls.

Plain Python (no torch or transformers import), so a server can import it before choosing an engine.
An engine is synchronous and driven by one thread (`EngineLoop` in loop.py wraps it for many threads):
`add_request` queues a request (or raises `RequestError` before anything is allocated), each `step()`
runs one scheduler step and returns the `TokenEvent`s it produced, `abort` frees a request's blocks at
once. The paged engine (engine.py) implements it; another engine (TensorRT-LLM, a TensorRT engine) can
stand behind the same server by implementing the same five methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length", "abort", "error")


class RequestError(ValueError):
    """A bad request (the message names the field). The engine is unchanged and keeps running."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    max_tokens:      tokens to generate (>= 1); a request also ends when its sequence reaches the engine's
                     max_seq_len (finish_reason "length").
    temperature:     0 (or top_k == 1) is greedy decoding.
    top_p:           nucleus sampling, in (0, 1].
    top_k:           keep the k most likely tokens; 0 = off.
    seed:            a per-request generator: the same seed and prompt give the same tokens.
    stop_token_ids:  tokens that end the request (besides the tokenizer's EOS unless ignore_eos); the stop
                     token is part of the output tokens, its text is not.
    stop:            stop strings: the text ends before the first occurrence of any of them.
    ignore_eos:      do not stop at the tokenizer's EOS tokens.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not _real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a tuple of ints >= 0, got {self.stop_token_ids!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class TokenEvent:
    """One streamed increment of one request."""

    request_id: str
    token_ids: list[int]  # tokens new in this event (may be [] on a final event)
    text: str  # text new in this event (detokenized incrementally; "" without a tokenizer)
    finished: bool = False
    finish_reason: str | None = None  # one of FINISH_REASONS when finished
    error: str | None = None


@runtime_checkable
class Engine(Protocol):
    """A synchronous serving engine; one thread drives it."""

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a request. Validates everything (empty prompt, a prompt longer than the pool can ever hold,
        bad params, a duplicate id) and raises RequestError before anything is allocated."""

    def abort(self, request_id: str) -> None:
        """Free the request's blocks at once; its final event (finish_reason "abort") comes with the next
        step(). Unknown or finished ids are ignored."""

    def step(self) -> list[TokenEvent]:
        """One scheduler step (prefill chunks and decodes); the events it produced."""

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running, or has an event still to deliver."""

    def stats(self) -> dict:
        """At least num_running, num_waiting, free_blocks, total_blocks."""
