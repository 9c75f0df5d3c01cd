"""transformers integration: SawInt4Cache + the 'sawint4_paged' attention on a tiny random Llama."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from trtllm_sawint4 import ChannelCalibration, KVCacheSpec, PagedKVCache  # noqa: E402
from trtllm_sawint4.integrations.transformers import (  # noqa: E402
    KeyRecorderCache,
    SawInt4Cache,
    cache_kwarg,
    collect_keys,
    spec_for_config,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    yield m


def _use(model, impl):
    model.set_attn_implementation(impl)


def _generate(model, ids, cache, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **cache_kwarg(model, cache), max_new_tokens=n,
                              do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                              eos_token_id=None)


def _paged(model, fmt, batch, **opts):
    return SawInt4Cache(model, spec_for_config(model.config, fmt, tokens_per_block=8, **opts), max_tokens=64,
                        batch_size=batch)


@pytest.mark.parametrize("batch", [1, 2])
def test_bf16_generate_matches_dynamic_cache(model, batch):
    ids = torch.randint(3, 256, (batch, 11))
    _use(model, "sdpa")
    ref = _generate(model, ids, DynamicCache(config=model.config))
    _use(model, "sawint4_paged")
    cache = _paged(model, "bf16", batch)
    out = _generate(model, ids, cache)
    _use(model, "sdpa")
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=5e-3, rtol=0)
    assert cache.get_seq_length() == 11 + 12 - 1  # the last generated token is never fed back
    assert all(cache.paged.seq_len(s) == 22 for s in cache.seq_ids)


def _logits(model, fmt, ids, split=(17,)):
    """Logits through the paged cache with chunked prefill (and a decode step at the end)."""
    _use(model, "sawint4_paged")
    cache = _paged(model, fmt, ids.shape[0])
    bounds = [0, *split, ids.shape[1] - 1, ids.shape[1]]
    with torch.no_grad():
        out = torch.cat([model(ids[:, a:b], **cache_kwarg(model, cache)).logits for a, b in zip(bounds, bounds[1:])],
                        1)
    _use(model, "sdpa")
    return out


def test_formats_logits_close_to_reference(model):
    ids = torch.randint(3, 256, (2, 40))
    with torch.no_grad():
        ref = model(ids).logits
    rel = {fmt: float((_logits(model, fmt, ids) - ref).norm() / ref.norm()) for fmt in
           ("bf16", "int8", "saw_int4")}
    assert rel["bf16"] < 5e-3
    assert rel["int8"] < 2e-2
    assert rel["saw_int4"] < 0.15
    assert rel["bf16"] < rel["int8"] < rel["saw_int4"]


def test_chunked_prefill_equals_one_prefill(model):
    ids = torch.randint(3, 256, (1, 30))
    _use(model, "sawint4_paged")
    with torch.no_grad():
        one = model(ids, **cache_kwarg(model, _paged(model, "saw_int4", 1))).logits
    _use(model, "sdpa")
    chunked = _logits(model, "saw_int4", ids, split=(5, 13, 21))
    torch.testing.assert_close(chunked, one, atol=1e-4, rtol=1e-4)


def test_saw_int4_generate_runs_with_calibration(model):
    ids = torch.randint(3, 256, (2, 9))
    _use(model, "sdpa")
    keys = collect_keys(model, [torch.randint(3, 256, (48,))])
    calib = ChannelCalibration.from_keys(keys)
    spec = spec_for_config(model.config, "saw_int4", tokens_per_block=8, sign_seed=3)
    _use(model, "sawint4_paged")
    out = _generate(model, ids, SawInt4Cache(model, spec, max_tokens=32, batch_size=2, calibration=calib), n=6)
    _use(model, "sdpa")
    assert out.sequences.shape == (2, 15)


def test_cache_kwarg_is_the_name_the_installed_transformers_takes_without_a_warning(model):
    cache = _paged(model, "saw_int4", 1)
    _use(model, "sawint4_paged")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error", FutureWarning)  # 5.25-5.39 warn on the old name
            model(torch.randint(3, 256, (1, 6)), **cache_kwarg(model, cache))
    finally:
        _use(model, "sdpa")
    assert cache.get_seq_length() == 6  # the cache was used, not dropped as an unknown keyword


def test_existing_paged_cache_and_mask_sizes(model):
    spec = KVCacheSpec(head_dim=32, num_kv_heads=2, tokens_per_block=8, kv_format="int4")
    cache = SawInt4Cache(paged=PagedKVCache(spec, num_layers=2, num_blocks=8), config=model.config)
    _use(model, "sawint4_paged")
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 10)), **cache_kwarg(model, cache))
    _use(model, "sdpa")
    assert cache.get_seq_length() == 10 and cache.get_seq_length(1) == 10
    assert cache.get_mask_sizes(3, 0) == (13, 0)
    assert cache.batch_size == 1
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.paged.allocator.num_free == 8


def test_attention_without_cache_raises(model):
    ids = torch.randint(3, 256, (1, 6))
    _use(model, "sawint4_paged")
    try:
        with pytest.raises(RuntimeError, match="SawInt4Cache"):
            model(ids, use_cache=False)
        with pytest.raises(RuntimeError, match="SawInt4Cache"):
            model(ids, **cache_kwarg(model, DynamicCache(config=model.config)))
    finally:
        _use(model, "sdpa")


def test_cache_with_other_attention_raises(model):
    _use(model, "sdpa")
    with pytest.raises(RuntimeError, match="sawint4_paged"):
        model(torch.randint(3, 256, (1, 6)), **cache_kwarg(model, _paged(model, "saw_int4", 1)))


def test_padded_batch_raises(model):
    ids = torch.randint(3, 256, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 0] = 0
    _use(model, "sawint4_paged")
    try:
        with pytest.raises(NotImplementedError, match="padded"):
            model(ids, attention_mask=mask, **cache_kwarg(model, _paged(model, "saw_int4", 2)))
    finally:
        _use(model, "sdpa")


def test_batch_size_change_raises(model):
    cache = _paged(model, "bf16", 2)
    _use(model, "sawint4_paged")
    try:
        with torch.no_grad():
            model(torch.randint(3, 256, (2, 4)), **cache_kwarg(model, cache))
            with pytest.raises(ValueError, match="2 sequences"):
                model(torch.randint(3, 256, (1, 1)), **cache_kwarg(model, cache))
    finally:
        _use(model, "sdpa")


def test_spec_mismatch_raises(model):
    with pytest.raises(ValueError, match="head_dim"):
        SawInt4Cache(model, KVCacheSpec(head_dim=64, num_kv_heads=2))


def test_key_recorder_shapes_and_post_rope(model):
    _use(model, "sdpa")
    ids = torch.randint(3, 256, (2, 12))
    rec = KeyRecorderCache(config=model.config)
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwarg(model, rec))
        model(ids, **cache_kwarg(model, dyn))
    keys = rec.stacked()
    assert len(keys) == 2 and all(k.shape == (24, 2, 32) for k in keys)
    # identical to what a DynamicCache holds (post-RoPE), batch rows concatenated
    for k, layer in zip(keys, dyn.layers):
        torch.testing.assert_close(k, layer.keys.transpose(1, 2).reshape(24, 2, 32))
    per_layer = collect_keys(model, [ids[0], ids[1]])
    assert [tuple(k.shape) for k in per_layer] == [(24, 2, 32)] * 2
    calib = ChannelCalibration.from_keys(per_layer)
    assert calib.mean.shape == calib.scale.shape == (2, 2, 32)
