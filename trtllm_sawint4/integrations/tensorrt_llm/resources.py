"""Sizing of the SAW-INT4 pool inside AutoDeploy's memory budget.

AutoDeploy allocates a backend's caches through resource handlers. A *paged* handler reports its bytes
per token, and when ``kv_cache_config.free_gpu_memory_fraction`` is set AutoDeploy sizes the cache as

    max_tokens = (free_memory - non_paged_bytes - mem_exclude) * free_gpu_memory_fraction
                 // sum(bytes_per_token of every paged handler)

(``CachedSequenceInterface.resize_kv_cache_manager``). The figure must be exact: reporting too few
bytes makes the pool too large for the memory it was given. One layer's pool is uint8
[num_blocks, 2, num_kv_heads, region_bytes] (`KVCacheSpec.pool_shape`, docs/layout.md), which holds
exactly ``KVCacheSpec.bytes_per_token`` bytes per token: 4-bit codes plus one (scale, min) pair per
token and KV head, no padding.

Our pools are not managed by TensorRT-LLM's KVCacheManager (its pools accept only FP8/HALF/BF16/FLOAT/
NVFP4); AutoDeploy then keeps a placeholder manager of one layer, one head, head_dim 1 for the block
accounting. That placeholder holds 2 x 1 x 1 x 2 = 4 bytes per token outside the budget above (read
from the sources, not measured): `placeholder_bytes` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...spec import KVCacheSpec

#: Bytes per token of AutoDeploy's placeholder KVCacheManager (1 layer, K+V, 1 head, head_dim 1, fp16).
PLACEHOLDER_BYTES_PER_TOKEN = 2 * 1 * 1 * 2


@dataclass(frozen=True)
class PoolSizing:
    """The byte arithmetic of one layer's pool."""

    spec: KVCacheSpec

    @property
    def bytes_per_token(self) -> int:
        """K and V of all KV heads of one layer: what the paged handler reports to AutoDeploy."""
        return self.spec.bytes_per_token

    def pool_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        return self.spec.pool_shape(num_blocks)

    def pool_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.spec.block_bytes


def bf16_bytes_per_token(num_kv_heads: int, head_dim: int) -> int:
    """What AutoDeploy's own KVPagedResourceHandler reports for a bf16 layer (heads x K/V x head_dim x 2)."""
    return num_kv_heads * 2 * head_dim * 2


def max_cache_tokens(free_bytes: int, free_gpu_memory_fraction: float, paged_bytes_per_token: int,
                     non_paged_bytes: int = 0, mem_exclude: int = 0) -> int:
    """AutoDeploy's resize rule: tokens the paged caches get (paged_bytes_per_token summed over layers)."""
    if not 0.0 < free_gpu_memory_fraction <= 1.0:
        raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {free_gpu_memory_fraction}")
    if paged_bytes_per_token < 1:
        raise ValueError(f"paged_bytes_per_token must be >= 1, got {paged_bytes_per_token}")
    budget = (free_bytes - non_paged_bytes - mem_exclude) * free_gpu_memory_fraction
    return max(int(budget // paged_bytes_per_token), 0)


def placeholder_bytes(num_tokens: int) -> int:
    """Memory of AutoDeploy's placeholder KV manager for `num_tokens` tokens (outside the paged budget)."""
    return num_tokens * PLACEHOLDER_BYTES_PER_TOKEN


@dataclass(frozen=True)
class CapacityRow:
    backend: str
    kv_format: str
    bytes_per_token: int  # all layers
    tokens: int
    vs_bf16: float  # tokens relative to AutoDeploy's own bf16 cache in the same memory


def capacity_table(num_layers: int, num_kv_heads: int, head_dim: int, memory_bytes: int,
                   tokens_per_block: int = 64, backends: dict[str, str] | None = None) -> list[CapacityRow]:
    """Tokens each backend's pools hold in `memory_bytes`, against AutoDeploy's bf16 KVPaged cache."""
    from . import BACKENDS

    backends = BACKENDS if backends is None else backends
    base = num_layers * bf16_bytes_per_token(num_kv_heads, head_dim)
    base_tokens = memory_bytes // base
    rows = [CapacityRow("(AutoDeploy bf16)", "bf16", base, base_tokens, 1.0)]
    for name, fmt in backends.items():
        spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=num_kv_heads, tokens_per_block=tokens_per_block,
                           kv_format=fmt)
        per_token = num_layers * PoolSizing(spec).bytes_per_token
        tokens = memory_bytes // per_token
        rows.append(CapacityRow(name, fmt, per_token, tokens, tokens / base_tokens if base_tokens else 0.0))
    return rows
