"""An engine factory for `sawint4 serve --engine scripts/serve_random_engine.py:build`: the serving
benchmark's model -- a real architecture with random weights built on the device (no checkpoint travels to
the GPU machine) -- behind the Triton server, so one benchmark point can be measured through the server.

Engine settings are those of `sawint4 bench-serving` (reserve_output admission, no prefix sharing, one
KV-cache budget: by default what an 80 GB GPU leaves after the weights). Extra keywords come from
`--engine-option KEY=VALUE`: arch, kv_budget_gib, max_seq_len, max_step_tokens, tokens_per_block.
The model has no tokenizer: requests give `input_ids`.
"""

from __future__ import annotations


def build(model_path=None, gguf_file=None, kv_format="saw_int4", num_blocks=None, max_batch=64, device=None,
          dtype=None, arch="qwen3-8b", kv_budget_gib=None, max_seq_len=2048, max_step_tokens=8192,
          tokens_per_block=64, seed=0, **opts):
    import torch

    from trtllm_sawint4.serving.api import SamplingParams
    from trtllm_sawint4.serving.benchmark import GiB, architecture, default_kv_budget, random_model
    from trtllm_sawint4.serving.engine import PagedEngine

    if model_path or gguf_file:
        raise ValueError("serve_random_engine builds a random-weight model; it takes no --model-path/--gguf-file")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = random_model(architecture(arch), dev, dt)
    if num_blocks is None:
        budget = int(kv_budget_gib * GiB) if kv_budget_gib is not None else default_kv_budget(model)[0]
        size = dict(kv_cache_bytes=budget)
    else:
        size = dict(num_blocks=num_blocks)
    engine = PagedEngine(model, kv_format=kv_format, max_batch=max_batch, max_step_tokens=max_step_tokens,
                         tokens_per_block=tokens_per_block, max_seq_len=max_seq_len, prefix_sharing=False,
                         reserve_output=True, seed=seed, **size, **opts)
    # Compile the kernels before the first request (as bench-serving does before it measures).
    n = max(1, min(64, engine.max_seq_len - 5))
    engine.generate([[1] * n, [2] * n], SamplingParams(max_tokens=4, ignore_eos=True))
    return engine
