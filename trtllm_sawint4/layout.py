"""Typed views into one layer's pool (uint8 [num_blocks, 2, num_kv_heads, region_bytes]).

Inside a region (one block, K or V, one KV head), for T = tokens_per_block:

    [ codes: T rows of code_bytes ][ scales: T x meta ][ mins: T x meta ]

bf16 regions hold T rows of head_dim bf16 values and no metadata. See docs/layout.md.
The views alias the pool, so writing through them writes the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant import meta_torch_dtype

STORAGE_BITS = {"bf16": 16, "int8": 8, "int4": 4}


def bytes_per_vector(head_dim: int, storage: str, meta_dtype: str) -> int:
    meta = 0 if storage == "bf16" else 2 * meta_torch_dtype(meta_dtype).itemsize
    return head_dim * STORAGE_BITS[storage] // 8 + meta


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
    bpv = bytes_per_vector(head_dim, storage, meta_dtype)
    region = pool.shape[-1]
    t = region // bpv
    if region % bpv or t not in (8, 16, 32, 64, 128):
        raise ValueError(
            f"cache region of {region} bytes does not hold a power-of-2 number (8..128) of "
            f"{storage} vectors of head_dim={head_dim} ({bpv} bytes each, metadata {meta_dtype})"
        )
    return t


def pool_views(pool: torch.Tensor, head_dim: int, storage: str, meta_dtype: str = "fp16") -> PoolViews:
    nb, two, h, region = pool.shape
    t = tokens_per_block_of(pool, head_dim, storage, meta_dtype)
    if storage == "bf16":
        return PoolViews(pool.view(torch.bfloat16).view(nb, two, h, t, head_dim), None, None, t)
    code_bytes = head_dim * STORAGE_BITS[storage] // 8
    mdt = meta_torch_dtype(meta_dtype)
    scale_off = t * code_bytes
    min_off = scale_off + t * mdt.itemsize
    codes = pool[..., :scale_off].view(nb, two, h, t, code_bytes)
    scale = pool[..., scale_off:min_off].view(mdt)
    vmin = pool[..., min_off:].view(mdt)
    return PoolViews(codes, scale, vmin, t)
