import pytest

from trtllm_sawint4 import KVCacheSpec
from trtllm_sawint4.spec import FORMATS, HEAD_DIMS, TOKENS_PER_BLOCK


def test_bytes_per_token_head_match_the_design_card():
    # K+V for one KV head, head_dim 128 (anchors.md): bf16 512, int4 + 4 B metadata 136, fp32 metadata 144.
    assert KVCacheSpec(128, 8, kv_format="bf16").bytes_per_token_head == 512
    assert KVCacheSpec(128, 8, kv_format="saw_int4").bytes_per_token_head == 136
    assert KVCacheSpec(128, 8, kv_format="int4").bytes_per_token_head == 136
    assert KVCacheSpec(128, 8, kv_format="saw_int4", metadata_dtype="fp32").bytes_per_token_head == 144
    assert KVCacheSpec(128, 8, kv_format="int8").bytes_per_token_head == 264
    assert KVCacheSpec(128, 8).compression_vs_bf16 == pytest.approx(512 / 136)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("tpb", TOKENS_PER_BLOCK)
@pytest.mark.parametrize("meta", ["fp16", "fp32"])
def test_layout_is_16_byte_aligned_and_consistent(fmt, head_dim, tpb, meta):
    if fmt == "bf16" and meta == "fp32":
        pytest.skip("metadata dtype does not apply to bf16")
    s = KVCacheSpec(head_dim, 3, tpb, fmt, metadata_dtype=meta)
    assert s.region_bytes % 16 == 0
    assert s.code_bytes_per_vector % 16 == 0  # every code row starts 16-byte aligned
    assert s.scale_offset % 16 == 0 and s.min_offset % 16 == 0
    assert s.region_bytes == s.min_offset + (tpb * s.meta_bytes_per_scalar if s.quantized else 0)
    assert s.block_bytes == 2 * 3 * s.region_bytes == tpb * s.bytes_per_token
    assert s.pool_shape(5) == (5, 2, 3, s.region_bytes)


def test_rotation_block_defaults_and_validation():
    assert KVCacheSpec(64, 1).rotation_block == 64
    assert KVCacheSpec(256, 1).rotation_block == 128
    assert KVCacheSpec(128, 1, rotation_block=16).rotation_block == 16
    assert KVCacheSpec(128, 1, kv_format="int4").rotation_block is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(head_dim=96, num_kv_heads=1), "head_dim"),
        (dict(head_dim=64, num_kv_heads=0), "num_kv_heads"),
        (dict(head_dim=64, num_kv_heads=1, tokens_per_block=24), "tokens_per_block"),
        (dict(head_dim=64, num_kv_heads=1, tokens_per_block=256), "tokens_per_block"),
        (dict(head_dim=64, num_kv_heads=1, kv_format="fp4"), "kv_format"),
        (dict(head_dim=64, num_kv_heads=1, rotation_block=48), "rotation_block"),
        (dict(head_dim=64, num_kv_heads=1, rotation_block=128), "rotation_block"),
        (dict(head_dim=64, num_kv_heads=1, kv_format="int4", rotation_block=16), "rotation_block"),
        (dict(head_dim=64, num_kv_heads=1, kv_format="int4", rotate_v=True), "rotate_v"),
        (dict(head_dim=64, num_kv_heads=1, metadata_dtype="bf16"), "metadata_dtype"),
    ],
)
def test_bad_spec_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KVCacheSpec(**kwargs)


def test_storage_format_is_the_one_source_of_the_format_facts():
    """Every storage the spec knows has distinct kernel codes and levels 2^bits - 1; a spec's layout is
    its StorageFormat's, and pool_views finds the scales and mins at those offsets."""
    import torch

    from trtllm_sawint4.layout import pool_views
    from trtllm_sawint4.spec import METADATA_DTYPES, STORAGES, StorageFormat

    assert len({StorageFormat(s).kernel_code for s in STORAGES}) == len(STORAGES)
    for s in STORAGES:
        fmt = StorageFormat(s)
        assert fmt.levels == (1 << fmt.bits) - 1 and fmt.quantized == (s != "bf16")
    for kv in FORMATS:
        assert StorageFormat.of_kv_format(kv).storage in STORAGES
    spec = KVCacheSpec(64, 2, 16, "int4", metadata_dtype="fp32")
    assert spec.format == StorageFormat("int4", "fp32") and spec.format.meta32
    pool = torch.zeros(spec.pool_shape(3), dtype=torch.uint8)
    views = pool_views(pool, 64, "int4", "fp32")
    views.scale[1, 0, 1, 2] = 1.5
    flat = pool[1, 0, 1]
    assert flat[spec.scale_offset + 2 * 4:spec.scale_offset + 3 * 4].view(torch.float32).item() == 1.5
    with pytest.raises(ValueError, match="storage"):
        StorageFormat("int2")
    with pytest.raises(ValueError, match="meta_dtype"):
        StorageFormat("int4", METADATA_DTYPES[0] + "x")
    with pytest.raises(ValueError, match="region"):
        StorageFormat("int4").tokens_per_block(64, 1000)
