"""The transformers path (SawInt4Cache + 'sawint4_paged') on every supported architecture: the bf16 format
gives stock transformers' logits; KV geometry (heads, head_dim, windows) comes from the config."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import KINDS, VOCAB, tiny_config, tiny_model  # noqa: E402
from trtllm_sawint4.integrations.transformers import (  # noqa: E402
    SawInt4Cache,
    cache_kwarg,
    kv_geometry,
    paged_cache_has_windows,
    spec_for_config,
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _paged_logits(model, ids, fmt, chunks):
    model.set_attn_implementation("sawint4_paged")
    cache = SawInt4Cache(model, spec_for_config(model.config, fmt, tokens_per_block=8), max_tokens=ids.shape[1])
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, pos:pos + n], **cache_kwarg(model, cache), use_cache=True).logits)
            pos += n
    model.set_attn_implementation("sdpa")
    return torch.cat(out, 1)


def _assert_same_choices(got, ref):
    """Same greedy token wherever the stock top-2 logits are not a near tie."""
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.05
    assert clear.float().mean() > 0.8
    assert bool((got.argmax(-1) == ref.argmax(-1))[clear].all())


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_format_gives_stock_logits(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    got = _paged_logits(model, ids, "bf16", (17, 15, 1, 1, 1, 5))  # prefill, chunked prefill, decode steps
    assert float((got - ref).norm() / ref.norm()) < 5e-3  # K/V rounded to bf16 in the cache
    _assert_same_choices(got, ref)
    for fmt in ("int8", "saw_int4"):
        q = _paged_logits(model, ids, fmt, (40,))
        assert float((q - ref).norm() / ref.norm()) < (3e-2 if fmt == "int8" else 0.25)


def test_geometry_from_configs():
    g = kv_geometry(tiny_config("gemma3", sliding_window=16, layers=6))
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim) == (6, 2, 1, 256)
    assert g.windows == (16, 16, 0, 16, 16, 0)
    assert kv_geometry(tiny_config("mistral", sliding_window=32)).windows == (32, 32)
    assert kv_geometry(tiny_config("mistral")).windows == (0, 0)
    assert kv_geometry(tiny_config("qwen3")).windows == (0, 0)
    cfg = tiny_config("llama")
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        kv_geometry(cfg)


def test_sliding_window_longer_than_the_cache_is_full_attention():
    """A window of W >= every sequence's length attends like full attention: served without windows."""
    model = tiny_model("gemma3", sliding_window=64)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    got = _paged_logits(model, ids, "bf16", (30, 10))
    assert float((got - ref).norm() / ref.norm()) < 5e-3
    _assert_same_choices(got, ref)


@pytest.mark.skipif(paged_cache_has_windows(), reason="this PagedKVCache applies per-layer windows")
def test_windows_shorter_than_the_sequence_are_refused_without_window_support():
    model = tiny_model("gemma3", sliding_window=16)
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        SawInt4Cache(model, spec_for_config(model.config, "bf16", tokens_per_block=8), max_tokens=40)


@pytest.mark.skipif(not paged_cache_has_windows(), reason="this PagedKVCache has no per-layer windows")
@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
def test_sliding_windows_shorter_than_the_sequence_give_stock_logits(kind):
    model = tiny_model(kind, sliding_window=12)
    assert set(kv_geometry(model.config).windows) - {0} == {12}
    ids = torch.randint(0, VOCAB, (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        full = tiny_model(kind, sliding_window=4096)(ids).logits  # same weights (seed), no window
    assert float((full - ref).norm() / ref.norm()) > 0.05  # the window matters at 45 tokens
    got = _paged_logits(model, ids, "bf16", (20, 13, 1, 1, 1, 9))
    assert float((got - ref).norm() / ref.norm()) < 5e-3
    _assert_same_choices(got, ref)
