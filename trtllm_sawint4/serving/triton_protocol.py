"""The request/response tensors of the served `sawint4` Triton model, and how a request becomes
(prompt, SamplingParams).

The names follow TensorRT-LLM's Triton models (`ensemble` / `tensorrt_llm_bls` of
triton_backend/all_models/inflight_batcher_llm), so existing clients -- the generate endpoints
(`{"text_input": ..., "max_tokens": ...}`), tritonclient gRPC streaming, genai-perf's triton service
kind -- work unchanged. Like those models, the config has `max_batch_size > 0`, so every tensor carries a
leading batch dimension of 1 (`text_input` has shape [1, 1]); one request is one prompt.

TensorRT-LLM inputs this engine cannot honour are accepted only at their no-op values (beam_width 1,
repetition_penalty 1, ...), and rejected otherwise, so no request is silently decoded differently from
what it asked. Plain Python + numpy: unit-tested without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .api import RequestError, SamplingParams


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton data type (TYPE_STRING, TYPE_INT32, ...)
    dims: tuple[int, ...]  # without the batch dimension
    optional: bool
    doc: str


#: The model's inputs, in config order.
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (1,), True, "the prompt (UTF-8); this or input_ids is required"),
    TensorSpec("input_ids", "TYPE_INT32", (-1,), True,
               "the prompt as token ids, instead of text_input (a model without a tokenizer)"),
    TensorSpec("max_tokens", "TYPE_INT32", (1,), False, "tokens to generate, >= 1"),
    TensorSpec("stream", "TYPE_BOOL", (1,), True,
               "true: one response per new piece of text (generate_stream, gRPC streaming); false (default): "
               "one response with all the text (required by /generate)"),
    TensorSpec("temperature", "TYPE_FP32", (1,), True, "0 (default) = greedy"),
    TensorSpec("top_p", "TYPE_FP32", (1,), True, "nucleus sampling, (0, 1], default 1"),
    TensorSpec("top_k", "TYPE_INT32", (1,), True, "0 (default) = off; 1 = greedy"),
    TensorSpec("seed", "TYPE_UINT64", (1,), True, "per-request sampling seed"),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), True, "the older TensorRT-LLM name of seed"),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), True,
               "stop strings; the text ends before the first one found (empty strings are ignored)"),
    TensorSpec("end_id", "TYPE_INT32", (1,), True,
               "the token that ends generation, instead of the tokenizer's EOS"),
    TensorSpec("ignore_eos", "TYPE_BOOL", (1,), True, "do not stop at EOS (default false)"),
    TensorSpec("exclude_input_in_output", "TYPE_BOOL", (1,), True,
               "default true; false: a non-streaming response starts with the prompt text"),
    # TensorRT-LLM inputs accepted only at the value that changes nothing here.
    TensorSpec("bad_words", "TYPE_STRING", (-1,), True, "accepted only empty (not supported)"),
    TensorSpec("pad_id", "TYPE_INT32", (1,), True, "accepted, no effect: requests are never padded"),
    TensorSpec("beam_width", "TYPE_INT32", (1,), True, "accepted only 1 (no beam search)"),
    TensorSpec("num_return_sequences", "TYPE_INT32", (1,), True, "accepted only 1"),
    TensorSpec("min_tokens", "TYPE_INT32", (1,), True, "accepted only 0 or 1"),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,), True, "accepted only 1.0"),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,), True, "accepted only 0.0"),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,), True, "accepted only 0.0"),
    TensorSpec("length_penalty", "TYPE_FP32", (1,), True, "accepted, no effect (it acts in beam search only)"),
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,), True, "accepted only false"),
    TensorSpec("return_context_logits", "TYPE_BOOL", (1,), True, "accepted only false"),
    TensorSpec("return_generation_logits", "TYPE_BOOL", (1,), True, "accepted only false"),
)

#: The model's outputs (every response carries all of them).
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,), False,
               "streaming: the text new in this response; otherwise all the generated text"),
    TensorSpec("output_ids", "TYPE_INT32", (-1,), False, "the token ids new in this response (streaming) or all"),
    TensorSpec("finish_reason", "TYPE_STRING", (-1,), False,
               '"" until the last response, then "stop", "length" or "abort"'),
    TensorSpec("num_output_tokens", "TYPE_INT32", (1,), False, "tokens generated so far"),
)

INPUT_NAMES = tuple(t.name for t in INPUTS)

#: no-op-only inputs -> (the accepted values, what to say when another value comes)
_NO_OP_ONLY = {
    "beam_width": ((1,), "beam search is not supported"),
    "num_return_sequences": ((1,), "one sequence per request"),
    "min_tokens": ((0, 1), "min_tokens is not supported"),
    "repetition_penalty": ((1.0,), "penalties are not supported"),
    "presence_penalty": ((0.0,), "penalties are not supported"),
    "frequency_penalty": ((0.0,), "penalties are not supported"),
    "return_log_probs": ((False,), "log probs are not returned"),
    "return_context_logits": ((False,), "logits are not returned"),
    "return_generation_logits": ((False,), "logits are not returned"),
}

_KIND = {"TYPE_STRING": "string", "TYPE_BOOL": "bool", "TYPE_FP32": "float", "TYPE_INT32": "int",
         "TYPE_UINT64": "int"}
_SPEC = {t.name: t for t in INPUTS}


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def parse_request(get: Callable[[str], np.ndarray | None], parameters: str | dict | None = None) -> GenerateRequest:
    """Read one request. `get(name)` returns the input tensor as numpy (None when absent); `parameters`
    is the request's parameter map (the JSON string Triton hands the model): the generate endpoints put
    every JSON key that is not an input there, so a misspelt input arrives as a parameter and is refused.
    Raises RequestError naming the input."""
    extra = json.loads(parameters) if isinstance(parameters, str) else dict(parameters or {})
    if extra:
        names = ", ".join(sorted(map(str, extra)))
        raise RequestError(f"unknown parameter(s) {names}: the inputs of this model are {', '.join(INPUT_NAMES)}")
    values = {name: _read(name, get(name)) for name in INPUT_NAMES}
    if values["text_input"] is None and values["input_ids"] is None:
        raise RequestError("text_input (or input_ids) is required")
    if values["text_input"] is not None and values["input_ids"] is not None:
        raise RequestError("give text_input or input_ids, not both")
    if values["max_tokens"] is None:
        raise RequestError("max_tokens is required")
    prompt = values["text_input"] if values["text_input"] is not None else values["input_ids"]
    if not prompt:
        raise RequestError("text_input must not be empty" if isinstance(prompt, str) else "input_ids must not be empty")
    for name, (accepted, why) in _NO_OP_ONLY.items():
        v = values[name]
        if v is not None and v not in accepted:
            raise RequestError(f"{name}={v!r} is not supported ({why}); accepted: {', '.join(map(repr, accepted))}")
    if any(w for w in values["bad_words"] or ()):
        raise RequestError("bad_words is not supported (send it empty or leave it out)")
    seed, random_seed = values["seed"], values["random_seed"]
    if seed is not None and random_seed is not None and seed != random_seed:
        raise RequestError(f"seed={seed} and random_seed={random_seed} disagree (they are one input; give one)")
    kwargs = dict(max_tokens=values["max_tokens"], stop=tuple(w for w in values["stop_words"] or () if w))
    for name in ("temperature", "top_p", "top_k", "ignore_eos"):
        if values[name] is not None:
            kwargs[name] = values[name]
    if seed is not None or random_seed is not None:
        kwargs["seed"] = seed if seed is not None else random_seed
    if values["end_id"] is not None:
        # TensorRT-LLM's end_id replaces the tokenizer's EOS.
        if values["end_id"] < 0:
            raise RequestError(f"end_id must be >= 0, got {values['end_id']}")
        kwargs.update(stop_token_ids=(values["end_id"],), ignore_eos=True)
    params = SamplingParams(**kwargs)
    try:
        params.validate()  # its messages name the field, which is also the input's name
    except ValueError as e:
        raise RequestError(str(e)) from None
    stream = bool(values["stream"]) if values["stream"] is not None else False
    exclude = True if values["exclude_input_in_output"] is None else values["exclude_input_in_output"]
    if not exclude and not isinstance(prompt, str):
        raise RequestError("exclude_input_in_output=false needs text_input (the prompt's text)")
    return GenerateRequest(prompt, params, stream, exclude)


def _read(name: str, array: np.ndarray | None):
    """One input as a Python value (a list for [-1] inputs), checked against its declared type."""
    if array is None:
        return None
    spec = _SPEC[name]
    kind = _KIND[spec.data_type]
    flat = np.asarray(array).reshape(-1)
    if spec.dims != (-1,) and flat.size != 1:
        raise RequestError(f"{name}: expected one value (shape [1, 1]), got {flat.size} (shape {list(np.shape(array))}); "
                           f"one request is one prompt")
    values = [_convert(name, kind, x) for x in flat]
    return values if spec.dims == (-1,) else values[0]


def _convert(name: str, kind: str, x):
    if kind == "string":
        if isinstance(x, bytes):
            try:
                return x.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(f"{name}: not valid UTF-8") from None
        if isinstance(x, str):
            return x
        raise RequestError(f"{name}: expected a string, got {type(x).__name__}")
    if kind == "bool":
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        raise RequestError(f"{name}: expected a bool, got {type(x).__name__}")
    if kind == "int":
        if isinstance(x, (np.integer, int)) and not isinstance(x, (bool, np.bool_)):
            return int(x)
        raise RequestError(f"{name}: expected an integer, got {type(x).__name__}")
    if isinstance(x, (np.floating, float, np.integer, int)) and not isinstance(x, (bool, np.bool_)):
        value = float(x)
        if not math.isfinite(value):
            raise RequestError(f"{name}: must be finite, got {value}")
        return value
    raise RequestError(f"{name}: expected a number, got {type(x).__name__}")
