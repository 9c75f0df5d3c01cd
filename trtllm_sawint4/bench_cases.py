"""Inputs for the benchmarks and GPU scripts (sawint4 bench, scripts/, tests): pools of random codes
with sane metadata, one decode shape's inputs, a calibrated layer transform. Public helpers: the bench,
the scripts and the tests build their cases from the same functions."""

from __future__ import annotations

import types

import torch

from .layout import pool_views
from .spec import KVCacheSpec
from .transforms import build_layer_transform


def quant_pool(spec, num_blocks, device):
    """A pool of random codes with sane fp16 metadata (scale ~U(0.02, 0.2), min ~ -8 s)."""
    pool = torch.randint(0, 256, spec.pool_shape(num_blocks), dtype=torch.uint8, device=device)
    views = pool_views(pool, spec.head_dim, spec.storage, spec.metadata_dtype)
    views.scale.copy_((torch.rand(views.scale.shape, device=device) * 0.18 + 0.02).to(views.scale.dtype))
    views.vmin.copy_((-8 * views.scale.float()).to(views.vmin.dtype))
    return pool


def bf16_pool(spec, num_blocks, device):
    pool = torch.empty(spec.pool_shape(num_blocks), dtype=torch.uint8, device=device)
    pool.view(torch.bfloat16).normal_()
    return pool


def decode_case(hq, hkv, d, batch, ctx, t=64, device="cuda"):
    """One decode shape's inputs for the GPU scripts (scripts/decode_breakdown.py,
    scripts/sweep_decode_small.py): the saw_int4 layer transform, a random INT4 pool behind a shuffled
    block table, full lengths, a bf16 query, and contiguous bf16 K/V for SDPA."""
    spec = KVCacheSpec(d, hkv, t, kv_format="saw_int4")
    nb = batch * ctx // t
    k = torch.randn(batch, hkv, ctx, d, device=device, dtype=torch.bfloat16)
    return types.SimpleNamespace(
        tf=build_layer_transform(spec).to(device), pool=quant_pool(spec, nb, device),
        table=torch.randperm(nb, device=device).int().view(batch, -1),
        seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device),
        q=torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16), k=k, v=torch.randn_like(k))


def calibrated_transform(spec, device, seed=0):
    """The layer transform with random channel statistics (mean, scale in [0.5, 1.5)): the calibrated
    variant of the format (append then also adds the channel bias)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(spec.num_kv_heads, spec.head_dim, generator=g)
    scale = torch.rand(spec.num_kv_heads, spec.head_dim, generator=g) + 0.5
    return build_layer_transform(spec, mean, scale).to(device)
