"""Typed views into one layer's pool (uint8 [num_blocks, 2, num_kv_heads, region_bytes]).

Inside a region (one block, K or V, one KV head), for T = tokens_per_block:

    [ codes: T rows of code_bytes ][ scales: T x meta ][ mins: T x meta ]

bf16 regions hold T rows of head_dim bf16 values and no metadata. See docs/layout.md; the offsets
come from spec.StorageFormat. The views alias the pool, so writing through them writes the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .spec import StorageFormat


@dataclass
class PoolViews:
    """codes: uint8 [NB, 2, H, T, code_bytes] (bf16 storage: bfloat16 [NB, 2, H, T, D]);
    scale, vmin: [NB, 2, H, T] in the metadata dtype (None for bf16)."""

    codes: torch.Tensor
    scale: torch.Tensor | None
    vmin: torch.Tensor | None
    tokens_per_block: int


def tokens_per_block_of(pool: torch.Tensor, head_dim: int, storage: str, meta_dtype: str) -> int:
    """T implied by the pool's region size; raises if the region is not a whole number of vectors."""
    return StorageFormat(storage, meta_dtype).tokens_per_block(head_dim, pool.shape[-1])


def pool_views(pool: torch.Tensor, head_dim: int, storage: str, meta_dtype: str = "fp16") -> PoolViews:
    nb, two, h, region = pool.shape
    fmt = StorageFormat(storage, meta_dtype)
    t = fmt.tokens_per_block(head_dim, region)
    if not fmt.quantized:
        return PoolViews(pool.view(torch.bfloat16).view(nb, two, h, t, head_dim), None, None, t)
    mdt = getattr(torch, fmt.meta_torch_dtype_name)
    scale_off, min_off = fmt.scale_offset(head_dim, t), fmt.min_offset(head_dim, t)
    codes = pool[..., :scale_off].view(nb, two, h, t, fmt.code_bytes(head_dim))
    scale = pool[..., scale_off:min_off].view(mdt)
    vmin = pool[..., min_off:].view(mdt)
    return PoolViews(codes, scale, vmin, t)
