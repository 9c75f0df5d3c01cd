"""The SAW-INT4 cache format as one specification object.

A `KVCacheSpec` fixes everything a kernel, a plugin or an adapter needs to agree on:
the per-vector quantization (format, metadata precision), the rotation, and the
byte layout of one paged block. `docs/layout.md` draws the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- the format facts: every other module reads them from here ------------------------------------
#: How one element is stored: storage -> (bits per element, code of the storage in the kernels'
#: STORAGE constexpr). Quantized storages hold codes 0..2^bits - 1 plus a (scale, min) per vector.
_STORAGE_FACTS = {"bf16": (16, 0), "int8": (8, 1), "int4": (4, 2)}
#: Precision of the per-vector (scale, min) pair -> (bytes per scalar, torch dtype name).
#: fp16 is the product; fp32 is the ablation.
_METADATA_FACTS = {"fp16": (2, "float16"), "fp32": (4, "float32")}
#: Cache formats (KVCacheSpec.kv_format) -> (storage, rotated). `saw_int4` stores exactly like `int4`
#: and adds the rotation.
_KV_FORMATS = {"bf16": ("bf16", False), "int8": ("int8", False), "int4": ("int4", False),
               "saw_int4": ("int4", True)}

FORMATS = tuple(_KV_FORMATS)
STORAGES = tuple(_STORAGE_FACTS)
METADATA_DTYPES = tuple(_METADATA_FACTS)
HEAD_DIMS = (32, 64, 128, 256)
TOKENS_PER_BLOCK = (8, 16, 32, 64, 128)

#: The quantizer saturates at the largest finite fp16 value (see quant.py).
SATURATION = 65504.0


@dataclass(frozen=True)
class StorageFormat:
    """How one stored vector looks: the ops' `storage` and `meta_dtype` arguments as one value.

    A region (one block, K or V, one KV head) of T tokens is [codes: T x code_bytes][scales: T x
    meta_bytes][mins: T x meta_bytes] (docs/layout.md); bf16 storage has no metadata."""

    storage: str
    meta_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.storage not in _STORAGE_FACTS:
            raise ValueError(f"storage must be one of {STORAGES}, got {self.storage!r}")
        if self.meta_dtype not in _METADATA_FACTS:
            raise ValueError(f"meta_dtype must be one of {METADATA_DTYPES}, got {self.meta_dtype!r}")

    @classmethod
    def of_kv_format(cls, kv_format: str, meta_dtype: str = "fp16") -> "StorageFormat":
        if kv_format not in _KV_FORMATS:
            raise ValueError(f"kv_format must be one of {FORMATS}, got {kv_format!r}")
        return cls(_KV_FORMATS[kv_format][0], meta_dtype)

    @property
    def bits(self) -> int:
        return _STORAGE_FACTS[self.storage][0]

    @property
    def kernel_code(self) -> int:
        """The kernels' STORAGE constexpr for this storage."""
        return _STORAGE_FACTS[self.storage][1]

    @property
    def quantized(self) -> bool:
        return self.storage != "bf16"

    @property
    def levels(self) -> int:
        """Largest code: 15 for INT4, 255 for INT8."""
        return (1 << self.bits) - 1

    @property
    def meta32(self) -> bool:
        """fp32 metadata (the kernels' META32 constexpr)."""
        return self.meta_dtype == "fp32"

    @property
    def meta_torch_dtype_name(self) -> str:
        return _METADATA_FACTS[self.meta_dtype][1]

    @property
    def meta_bytes_per_scalar(self) -> int:
        """Bytes of one scale (or one min); 0 for bf16, which has no metadata."""
        return _METADATA_FACTS[self.meta_dtype][0] if self.quantized else 0

    def code_bytes(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def bytes_per_vector(self, head_dim: int) -> int:
        return self.code_bytes(head_dim) + 2 * self.meta_bytes_per_scalar

    def region_bytes(self, head_dim: int, tokens_per_block: int) -> int:
        return tokens_per_block * self.bytes_per_vector(head_dim)

    def scale_offset(self, head_dim: int, tokens_per_block: int) -> int:
        """Byte offset of the scales inside a region."""
        return tokens_per_block * self.code_bytes(head_dim)

    def min_offset(self, head_dim: int, tokens_per_block: int) -> int:
        """Byte offset of the mins inside a region."""
        return self.scale_offset(head_dim, tokens_per_block) + tokens_per_block * self.meta_bytes_per_scalar

    def tokens_per_block(self, head_dim: int, region_bytes: int) -> int:
        """T implied by a region size; raises ValueError unless it is a whole TOKENS_PER_BLOCK count of vectors."""
        bpv = self.bytes_per_vector(head_dim)
        t = region_bytes // bpv
        if region_bytes % bpv or t not in TOKENS_PER_BLOCK:
            raise ValueError(
                f"cache region of {region_bytes} bytes does not hold a power-of-2 number (8..128) of "
                f"{self.storage} vectors of head_dim={head_dim} ({bpv} bytes each, metadata {self.meta_dtype})"
            )
        return t


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KVCacheSpec:
    """Format of the paged KV cache of one model (all layers share it).

    head_dim:         channels per head.
    num_kv_heads:     KV heads per layer.
    tokens_per_block: tokens held by one paged block (power of 2, 8..128).
    kv_format:        one of FORMATS.
    rotation_block:   block size b of the rotation R = blockdiag(H_b) diag(signs)
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
        if _KV_FORMATS[self.kv_format][1]:
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
    def format(self) -> StorageFormat:
        """The stored vector's format (what the ops call `storage` and `meta_dtype`)."""
        return StorageFormat.of_kv_format(self.kv_format, self.metadata_dtype)

    @property
    def storage(self) -> str:
        """What one element is stored as: `bf16`, `int8` or `int4` (saw_int4 stores as int4)."""
        return self.format.storage

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    @property
    def levels(self) -> int:
        """Largest code: 15 for INT4, 255 for INT8."""
        return self.format.levels

    @property
    def rotated(self) -> bool:
        return _KV_FORMATS[self.kv_format][1]

    # ---- byte layout (docs/layout.md) ------------------------------------------------
    @property
    def code_bytes_per_vector(self) -> int:
        return self.format.code_bytes(self.head_dim)

    @property
    def meta_bytes_per_scalar(self) -> int:
        """Bytes of one scale (or one min); 0 for bf16, which has no metadata."""
        return self.format.meta_bytes_per_scalar

    @property
    def meta_bytes_per_vector(self) -> int:
        """Scale plus min; 0 for bf16."""
        return 2 * self.meta_bytes_per_scalar

    @property
    def bytes_per_vector(self) -> int:
        return self.format.bytes_per_vector(self.head_dim)

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
        return self.format.region_bytes(self.head_dim, self.tokens_per_block)

    @property
    def block_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.region_bytes

    @property
    def scale_offset(self) -> int:
        """Byte offset of the scales inside a region."""
        return self.format.scale_offset(self.head_dim, self.tokens_per_block)

    @property
    def min_offset(self) -> int:
        """Byte offset of the mins inside a region."""
        return self.format.min_offset(self.head_dim, self.tokens_per_block)

    @property
    def compression_vs_bf16(self) -> float:
        return (2 * self.head_dim) / self.bytes_per_vector

    def pool_shape(self, num_blocks: int) -> tuple[int, int, int, int]:
        """Shape of one layer's pool (uint8): [num_blocks, 2 (K, V), num_kv_heads, region_bytes]."""
        return (num_blocks, 2, self.num_kv_heads, self.region_bytes)
