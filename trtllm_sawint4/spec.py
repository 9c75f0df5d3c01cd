"""The SAW-INT4 cache format as one specification object.

A `KVCacheSpec` fixes everything a kernel, a plugin or an adapter needs to agree on:
the per-vector quantization (format, metadata precision), the rotation, and the
byte layout of one paged block. `docs/layout.md` draws the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Storage formats. `saw_int4` stores exactly like `int4`; it adds the rotation.
FORMATS = ("bf16", "int8", "int4", "saw_int4")
#: Precision of the per-vector (scale, min) pair. fp16 is the product; fp32 is the ablation.
METADATA_DTYPES = ("fp16", "fp32")
HEAD_DIMS = (32, 64, 128, 256)
TOKENS_PER_BLOCK = (8, 16, 32, 64, 128)

#: The quantizer saturates at the largest finite fp16 value (see quant.py).
SATURATION = 65504.0


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KVCacheSpec:
    """Format of the paged KV cache of one model (all layers share it).

    head_dim:         channels per head.
    num_kv_heads:     KV heads per layer.
    tokens_per_block: tokens held by one paged block (power of 2, 8..128).
    kv_format:        one of FORMATS.
    rotation_block:   block size of the block-diagonal Hadamard rotation
                      (power of 2 dividing head_dim). Only for `saw_int4`;
                      default min(head_dim, 128).
    rotate_v:         rotate V as well as K (the attention output is rotated back).
    sign_seed:        if set, random +-1 sign flips (seeded) before the Hadamard.
    metadata_dtype:   `fp16` (4 bytes per vector) or `fp32` (8 bytes, ablation).
    """

    head_dim: int
    num_kv_heads: int
    tokens_per_block: int = 64
    kv_format: str = "saw_int4"
    rotation_block: int | None = None
    rotate_v: bool = False
    sign_seed: int | None = None
    metadata_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.kv_format not in FORMATS:
            raise ValueError(f"kv_format must be one of {FORMATS}, got {self.kv_format!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be a positive int, got {self.num_kv_heads!r}")
        if self.tokens_per_block not in TOKENS_PER_BLOCK:
            raise ValueError(
                f"tokens_per_block must be a power of 2 in {TOKENS_PER_BLOCK}, got {self.tokens_per_block}"
            )
        if self.metadata_dtype not in METADATA_DTYPES:
            raise ValueError(f"metadata_dtype must be one of {METADATA_DTYPES}, got {self.metadata_dtype!r}")
        rotated = self.kv_format == "saw_int4"
        if rotated:
            block = self.rotation_block if self.rotation_block is not None else min(self.head_dim, 128)
            if not (_is_pow2(block) and 2 <= block <= self.head_dim and self.head_dim % block == 0):
                raise ValueError(
                    f"rotation_block must be a power of 2 in [2, head_dim={self.head_dim}] dividing head_dim, "
                    f"got {block}"
                )
            object.__setattr__(self, "rotation_block", block)
        else:
            if self.rotation_block is not None or self.rotate_v or self.sign_seed is not None:
                raise ValueError(
                    f"rotation_block/rotate_v/sign_seed apply to kv_format='saw_int4' only, "
                    f"got kv_format={self.kv_format!r}"
                )
        if self.kv_format == "bf16" and self.metadata_dtype != "fp16":
            raise ValueError("metadata_dtype applies to quantized formats only; leave it 'fp16' for bf16")

    # ---- quantization --------------------------------------------------------------
    @property
    def storage(self) -> str:
        """What one element is stored as: `bf16`, `int8` or `int4` (saw_int4 stores as int4)."""
        return "int4" if self.kv_format == "saw_int4" else self.kv_format

    @property
    def bits(self) -> int:
        return {"bf16": 16, "int8": 8, "int4": 4}[self.storage]

    @property
    def quantized(self) -> bool:
        return self.storage != "bf16"

    @property
    def levels(self) -> int:
        """Largest code: 15 for INT4, 255 for INT8."""
        return (1 << self.bits) - 1

    @property
    def rotated(self) -> bool:
        return self.kv_format == "saw_int4"

    # ---- byte layout (docs/layout.md) ------------------------------------------------
    @property
    def code_bytes_per_vector(self) -> int:
        return self.head_dim * self.bits // 8

    @property
    def meta_bytes_per_scalar(self) -> int:
        """Bytes of one scale (or one min); 0 for bf16, which has no metadata."""
        if not self.quantized:
            return 0
        return 2 if self.metadata_dtype == "fp16" else 4

    @property
    def meta_bytes_per_vector(self) -> int:
        """Scale plus min; 0 for bf16."""
        return 2 * self.meta_bytes_per_scalar

    @property
    def bytes_per_vector(self) -> int:
        return self.code_bytes_per_vector + self.meta_bytes_per_vector

    @property
    def bytes_per_token(self) -> int:
        """K plus V, all KV heads, one layer."""
        return 2 * self.num_kv_heads * self.bytes_per_vector

    @property
    def bytes_per_token_head(self) -> int:
        """K plus V for one KV head: 512 for bf16 at head_dim 128, 136 for int4."""
        return 2 * self.bytes_per_vector

    @property
    def region_bytes(self) -> int:
        """One (block, K or V, head) region: codes of all its tokens, then scales, then mins."""
        return self.tokens_per_block * self.bytes_per_vector

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.region_bytes

    @property
    def scale_offset(self) -> int:
        """Byte offset of the scales inside a region."""
        return self.tokens_per_block * self.code_bytes_per_vector

    @property
    def min_offset(self) -> int:
        """Byte offset of the mins inside a region."""
        return self.scale_offset + self.tokens_per_block * self.meta_bytes_per_scalar

    @property
    def compression_vs_bf16(self) -> float:
        return (2 * self.head_dim) / self.bytes_per_vector

    def pool_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """Shape of one layer's pool (uint8): [num_blocks, 2 (K, V), num_kv_heads, region_bytes]."""
        return (num_blocks, 2, self.num_kv_heads, self.region_bytes)

    def describe(self) -> str:
        rot = f", rotation_block={self.rotation_block}" if self.rotated else ""
        rot += ", rotate_v" if self.rotate_v else ""
        rot += f", sign_seed={self.sign_seed}" if self.sign_seed is not None else ""
        meta = f", metadata={self.metadata_dtype}" if self.quantized else ""
        return f"{self.kv_format}{rot}{meta}"
