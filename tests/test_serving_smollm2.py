"""The engine on the packaged SmolLM2-135M (opt-in: loading it takes ~40 s on 2 cores): build_engine's
default model and tokenizer, text prompts, streamed text, stop strings, against model.generate()."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("SAWINT4_SLOW") != "1",
                                                   reason="set SAWINT4_SLOW=1 to run (loads SmolLM2)")]


def test_smollm2_engine_equals_generate(one_torch_thread):
    from trtllm_sawint4.integrations.transformers import SawInt4Cache, cache_kwarg, spec_for_config
    from trtllm_sawint4.serving import SamplingParams, build_engine

    engine = build_engine(kv_format="saw_int4", max_batch=3, num_blocks=64)
    tok, model = engine.tokenizer, engine.model
    prompts = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=12, ignore_eos=True))
    tokens, texts = {}, {}
    while engine.has_unfinished():
        for e in engine.step():
            tokens.setdefault(e.request_id, []).extend(e.token_ids)
            texts[e.request_id] = texts.get(e.request_id, "") + e.text
    model.set_attn_implementation("sawint4_paged")
    for i, p in enumerate(prompts):
        ids = torch.tensor([tok(p)["input_ids"]])
        cache = SawInt4Cache(model, spec_for_config(model.config, "saw_int4", tokens_per_block=64), max_tokens=64)
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache),
                                 max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert tokens[f"r{i}"] == ref
        assert texts[f"r{i}"] == tok.decode(ref, skip_special_tokens=True)
    # a stop string cuts the streamed text before it
    stop = texts["r0"].strip().split(" ")[1]
    engine.add_request("s", prompts[0], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))
    out = ""
    while engine.has_unfinished():
        for e in engine.step():
            out += e.text
            last = e
    assert last.finish_reason == "stop" and out == texts["r0"][:texts["r0"].index(stop)]
    s = engine.stats()
    assert s["free_blocks"] == s["total_blocks"]
