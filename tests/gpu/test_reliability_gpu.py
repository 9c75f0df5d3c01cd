"""Reliability of the Triton kernels on CUDA (`pytest -m gpu`): adversarial values, bad input,
isolation, determinism, large pools.

Tests named `test_sanitizer_*` use tiny shapes and run in seconds: they are the subset to run under
compute-sanitizer (docs/guarantees.md):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        python -m pytest -m gpu tests/gpu/test_reliability_gpu.py -k sanitizer -p no:cacheprovider
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from trtllm_sawint4 import ChannelCalibration, KVCacheSpec, PagedKVCache, build_layer_transform
from trtllm_sawint4.kernels.config import DEFAULT
from trtllm_sawint4.layout import pool_views
from trtllm_sawint4.ops import reference as ref

from helpers import SPECS, layer_transform

pytestmark = pytest.mark.gpu

DEV = "cuda"
F16_MAX = 65504.0
#: the shipped decode config without the "tiny" regime (the small shapes here would be "tiny", where the
#: Gluon kernel is not used)
NOT_TINY = replace(DEFAULT.decode, tiny_token_heads=0)
#: the formats of these tests: helpers.SPECS, and plain formats with fp32 metadata
FORMATS = {**SPECS, "int4_fp32meta": dict(kv_format="int4", metadata_dtype="fp32"),
           "int8_fp32meta": dict(kv_format="int8", metadata_dtype="fp32")}


def _spec(fmt: str, d=64, h=2, t=16, **kw) -> KVCacheSpec:
    return KVCacheSpec(d, h, t, **FORMATS.get(fmt, dict(kv_format=fmt)), **kw)


def _tf(spec, calibrated=False):
    return layer_transform(spec, calibrated, 0, DEV)


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _meta_equal(a, b) -> bool:
    """Bitwise equal, any nan equal to any nan (nan payloads are not part of the format)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and torch.equal(_bits(a[~an]), _bits(b[~bn]))


def edge_rows(d: int) -> torch.Tensor:
    """[R, d] float32 edge-case vectors: constants, zeros, spike, beyond fp16, subnormals, inf, nan."""
    g = torch.Generator().manual_seed(7)
    spike = torch.randn(d, generator=g) * 1e-3
    spike[5] = 100.0
    beyond = torch.randn(d, generator=g)
    beyond[0], beyond[1] = 1e6, -1e6
    rows = [torch.full((d,), 3.25), torch.full((d,), -1536.0), torch.zeros(d), spike, beyond,
            torch.full((d,), 1e6), torch.tensor([1e-40, -3e-39, 0.0, 5e-45] * (d // 4)),
            torch.tensor([3e-6, -2e-7, 1e-5, 6e-8] * (d // 4)), torch.randn(d, generator=g) * 1e-30]
    for bad in (float("inf"), -float("inf"), float("nan")):
        x = torch.randn(d, generator=g)
        x[d // 2 + 1] = bad
        rows.append(x)
    return torch.stack(rows)


def _edge_kv(spec):
    rows = edge_rows(spec.head_dim)
    n = rows.shape[0]
    h = spec.num_kv_heads
    k = torch.stack([rows.roll(i, 0) for i in range(h)], 1)
    v = torch.stack([rows.roll(i + 3, 0) for i in range(h)], 1)
    return k, v


def _append_both(cuda_kernels, spec, tf, k, v, slots, nb):
    g = torch.Generator(device=DEV).manual_seed(5)
    p_ref = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, device=DEV, generator=g)
    p_ker = p_ref.clone()
    args = (tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    ref.append(p_ref, k, v, slots, *args)
    cuda_kernels.append(p_ker, k, v, slots, *args)
    torch.cuda.synchronize()
    return p_ref, p_ker


def _untouched_equal(spec, p_ref, p_ker, slots):
    t = spec.tokens_per_block
    mask = torch.ones(p_ref.shape[0], t, dtype=torch.bool, device=DEV)
    mask[slots // t, slots % t] = False
    for a, b in zip(pool_views(p_ref, spec.head_dim, spec.storage, spec.metadata_dtype).__dict__.values(),
                    pool_views(p_ker, spec.head_dim, spec.storage, spec.metadata_dtype).__dict__.values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(_bits(a.movedim(3, 1)[mask]), _bits(b.movedim(3, 1)[mask])), "wrote outside slots"


# ---- sanitizer subset: tiny shapes ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "int4_fp32meta", "int8_fp32meta"])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sanitizer_append_edge_values_bit_identical(cuda_kernels, fmt, in_dtype):
    """No transform: every stored byte equals the reference's (nan payloads aside), for constants,
    zeros, spikes, values beyond fp16, fp32 and fp16 subnormals, +-inf and nan, in every input dtype;
    bytes outside the slots (garbage-filled pool) are untouched."""
    spec = _spec(fmt)
    tf = _tf(spec)
    k, v = _edge_kv(spec)
    k, v = k.to(DEV, in_dtype), v.to(DEV, in_dtype)
    slots = torch.randperm(4 * spec.tokens_per_block, generator=torch.Generator().manual_seed(1))[:k.shape[0]]
    p_ref, p_ker = _append_both(cuda_kernels, spec, tf, k, v, slots.to(DEV), nb=5)
    vr, vk = (pool_views(p, spec.head_dim, spec.storage, spec.metadata_dtype) for p in (p_ref, p_ker))
    if spec.quantized:
        assert torch.equal(vr.codes, vk.codes)
        assert _meta_equal(vr.scale, vk.scale) and _meta_equal(vr.vmin, vk.vmin)
    else:
        assert _meta_equal(vr.codes, vk.codes)
    _untouched_equal(spec, p_ref, p_ker, slots.to(DEV))


@pytest.mark.parametrize("fmt, calibrated", [("saw_int4", False), ("saw_int4_v_signs", True),
                                            ("saw_int4_fp32meta", False)])
def test_sanitizer_append_edge_values_with_transforms(cuda_kernels, fmt, calibrated):
    """With transforms: nan metadata exactly for the non-finite vectors, codes 0 there, no inf metadata,
    nothing written outside the slots."""
    spec = _spec(fmt)
    tf = _tf(spec, calibrated)
    k, v = _edge_kv(spec)
    slots = torch.arange(k.shape[0], device=DEV) * 2
    p_ref, p_ker = _append_both(cuda_kernels, spec, tf, k.to(DEV), v.to(DEV), slots, nb=4)
    vr, vk = (pool_views(p, spec.head_dim, spec.storage, spec.metadata_dtype) for p in (p_ref, p_ker))
    blk, row = slots // spec.tokens_per_block, slots % spec.tokens_per_block
    for a, b in ((vr.scale, vk.scale), (vr.vmin, vk.vmin)):
        assert torch.equal(torch.isnan(a[blk, :, :, row]), torch.isnan(b[blk, :, :, row]))
        assert not bool(torch.isinf(b[blk, :, :, row].float()).any())
    nan_rows = torch.isnan(vk.scale[blk, :, :, row].float())
    assert bool(nan_rows.any()) and int(vk.codes[blk, :, :, row][nan_rows].max()) == 0
    _untouched_equal(spec, p_ref, p_ker, slots)


def _small_cache_case(spec, tf, lens, seed=0, nb=None):
    """A pool with random K/V for sequences of `lens` in shuffled blocks; returns pool, table, lens."""
    t = spec.tokens_per_block
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // t) for n in lens]
    nb = nb or sum(need) + 2
    perm = torch.randperm(nb, generator=g)
    table = torch.full((len(lens), max(need + [1]) + 1), 2 ** 30, dtype=torch.int32)  # junk past the end
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n].int()
        at += n
    pool = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, generator=g)
    pool = pool.to(DEV)
    slots = torch.tensor([int(table[b, p // t]) * t + p % t for b, n in enumerate(lens) for p in range(n)],
                         dtype=torch.int64, device=DEV)
    total = int(sum(lens))
    k = torch.randn(total, spec.num_kv_heads, spec.head_dim, generator=g).to(DEV)
    v = torch.randn(total, spec.num_kv_heads, spec.head_dim, generator=g).to(DEV)
    ref.append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    return pool, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16", "saw_int4_v_signs"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_sanitizer_decode_small(cuda_kernels, fmt, num_splits):
    """Decode over mixed lengths (0, partial block, several blocks) with junk past each table row, with
    the split-KV + reduce path forced: matches the reference, never writes the pool."""
    spec = _spec(fmt, t=8)
    tf = _tf(spec, calibrated=spec.quantized)
    pool, table, lens = _small_cache_case(spec, tf, [0, 5, 37, 8])
    q = torch.randn(4, 8, spec.head_dim, device=DEV, dtype=torch.bfloat16)
    args = (pool, table, lens, tf.q_matrix, tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype)
    snap = pool.clone()
    got = cuda_kernels.decode_module.decode(q, *args, num_splits=num_splits)
    torch.cuda.synchronize()
    assert torch.equal(pool, snap)
    want = ref.decode(q, *args)
    assert not bool(got[0].any())  # no tokens: zero output
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("num_splits", [100, 200])  # 314 tiles: 79 splits in one load, 157 in two
def test_sanitizer_decode_many_splits(cuda_kernels, num_splits):
    """The wide split merge (8 warps, up to 128 splits of head_dim 128 per load) over mixed lengths
    (0, a few tokens, thousands) with junk past each table row: matches the reference."""
    spec = _spec("saw_int4", d=128, t=64)
    tf = _tf(spec)
    pool, table, lens = _small_cache_case(spec, tf, [0, 20000, 70, 5000])
    q = torch.randn(4, 4, 128, device=DEV, dtype=torch.bfloat16)
    args = (pool, table, lens, tf.q_matrix, None, 0.088, spec.storage, spec.metadata_dtype)
    got = cuda_kernels.decode_module.decode(q, *args, num_splits=num_splits)
    want = ref.decode(q, *args)
    assert not bool(got[0].any())
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fmt", ["int4", "saw_int4_v_signs"])
@pytest.mark.parametrize("num_splits", [None, 2, 10**4])
def test_sanitizer_decode_mma(cuda_kernels, fmt, num_splits):
    """The Gluon decode kernel (kernels/decode_gluon.py) over mixed lengths (0, partial tiles, several
    blocks) with junk past each table row, fp16 queries: matches the reference, never writes the pool."""
    dmod = cuda_kernels.decode_module
    spec = _spec(fmt, d=128, t=64)
    tf = _tf(spec, calibrated=spec.rotated)
    pool, table, lens = _small_cache_case(spec, tf, [0, 5, 300, 64])
    q = torch.randn(4, 8, 128, device=DEV, dtype=torch.float16)
    args = (pool, table, lens, tf.q_matrix, tf.v_matrix, 0.088, spec.storage, spec.metadata_dtype)
    assert dmod.schedule_for(q, pool, table, tf.q_matrix, tf.v_matrix, spec.storage, spec.metadata_dtype,
                             config=NOT_TINY, num_splits=num_splits).backend == "gluon"
    snap = pool.clone()
    got = dmod.decode(q, *args, num_splits=num_splits, config=NOT_TINY)
    torch.cuda.synchronize()
    assert torch.equal(pool, snap)
    want = ref.decode(q, *args)
    assert not bool(got[0].any())
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("fmt", ["int4", "bf16", "saw_int4_v_signs"])
def test_sanitizer_prefill_small(cuda_kernels, fmt):
    """Chunked prefill (queries of 0, 1, part and all of a sequence's tokens): matches the reference,
    never writes the pool."""
    spec = _spec(fmt, t=8)
    tf = _tf(spec, calibrated=spec.quantized)
    lens = [0, 5, 37, 8]
    q_lens = [0, 1, 20, 8]
    pool, table, lens_t = _small_cache_case(spec, tf, lens)
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    q = torch.randn(sum(q_lens), 8, spec.head_dim, device=DEV, dtype=torch.bfloat16)
    args = (q, pool, table, lens_t, starts, tf.q_matrix, tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype)
    snap = pool.clone()
    got = cuda_kernels.prefill(*args)
    torch.cuda.synchronize()
    assert torch.equal(pool, snap)
    torch.testing.assert_close(got.float(), ref.prefill(*args).float(), atol=3e-2, rtol=3e-2)


def test_sanitizer_empty_batches_and_zero_lengths(cuda_kernels):
    spec = _spec("int4")
    tf = _tf(spec)
    ops = torch.ops.sawint4
    pool = torch.randint(0, 256, spec.pool_shape(3), dtype=torch.uint8, device=DEV)
    snap = pool.clone()
    ops.append(pool, torch.zeros(0, 2, 64, device=DEV), torch.zeros(0, 2, 64, device=DEV),
               torch.zeros(0, dtype=torch.int64, device=DEV), None, None, None, "int4", "fp16")
    empty = torch.zeros(0, 2, dtype=torch.int32, device=DEV)
    no_lens = torch.zeros(0, dtype=torch.int32, device=DEV)
    assert ops.decode(torch.zeros(0, 4, 64, device=DEV), pool, empty, no_lens, None, None, 0.1, "int4",
                      "fp16").shape == (0, 4, 64)
    assert ops.prefill(torch.zeros(0, 4, 64, device=DEV), pool, empty, no_lens,
                       torch.zeros(1, dtype=torch.int32, device=DEV), None, None, 0.1, "int4", "fp16").shape == (0, 4, 64)
    table = torch.tensor([[-7, 2 ** 30], [0, 1]], dtype=torch.int32, device=DEV)  # never read: length 0
    out = ops.decode(torch.randn(2, 4, 64, device=DEV), pool, table, torch.zeros(2, dtype=torch.int32, device=DEV),
                     None, None, 0.1, "int4", "fp16")
    starts = torch.tensor([0, 0, 0], dtype=torch.int32, device=DEV)
    out_p = ops.prefill(torch.zeros(0, 4, 64, device=DEV), pool, table, torch.zeros(2, dtype=torch.int32,
                                                                                     device=DEV), starts, None,
                        None, 0.1, "int4", "fp16")
    torch.cuda.synchronize()
    assert not bool(out.any()) and out_p.shape == (0, 4, 64)
    assert torch.equal(pool, snap)


BAD_CALLS = {
    "slot_out_of_range": lambda p: ("append", dict(slot_mapping=torch.tensor([0, 10 ** 6], device=DEV))),
    "slot_negative": lambda p: ("append", dict(slot_mapping=torch.tensor([0, -1], device=DEV))),
    "slot_repeated": lambda p: ("append", dict(slot_mapping=torch.tensor([3, 3], device=DEV))),
    "slot_strided": lambda p: ("append", dict(slot_mapping=torch.tensor([0, 9, 1, 9], device=DEV)[::2])),
    "slot_on_cpu": lambda p: ("append", dict(slot_mapping=torch.tensor([0, 1]))),
    "block_id_out_of_range": lambda p: ("decode", dict(block_table=torch.tensor([[0, 99]], dtype=torch.int32,
                                                                                 device=DEV))),
    "block_id_negative": lambda p: ("decode", dict(block_table=torch.tensor([[-1, 1]], dtype=torch.int32,
                                                                             device=DEV))),
    "length_past_blocks": lambda p: ("decode", dict(seq_lens=torch.tensor([33], dtype=torch.int32, device=DEV))),
    "table_strided": lambda p: ("decode", dict(block_table=torch.tensor([[0, 5, 1, 5]], dtype=torch.int32,
                                                                         device=DEV)[:, ::2])),
    "queries_without_sequences": lambda p: ("prefill", dict(
        query=torch.randn(3, 4, 64, device=DEV), block_table=torch.zeros(0, 2, dtype=torch.int32, device=DEV),
        seq_lens=torch.zeros(0, dtype=torch.int32, device=DEV),
        query_start_loc=torch.zeros(1, dtype=torch.int32, device=DEV))),
    "more_queries_than_tokens": lambda p: ("prefill", dict(
        query=torch.randn(3, 4, 64, device=DEV), seq_lens=torch.tensor([2], dtype=torch.int32, device=DEV),
        query_start_loc=torch.tensor([0, 3], dtype=torch.int32, device=DEV))),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_sanitizer_bad_input_is_rejected_before_any_launch(cuda_kernels, case):
    spec = _spec("int4")
    pool = torch.randint(0, 256, spec.pool_shape(3), dtype=torch.uint8, device=DEV)
    snap = pool.clone()
    op, over = BAD_CALLS[case](pool)
    if op == "append":
        n = over["slot_mapping"].shape[0]
        args = dict(pool=pool, key=torch.randn(n, 2, 64, device=DEV), value=torch.randn(n, 2, 64, device=DEV),
                    slot_mapping=None, k_matrix=None, k_bias=None, v_matrix=None, storage="int4", meta_dtype="fp16")
    else:
        args = dict(query=torch.randn(1, 4, 64, device=DEV), pool=pool,
                    block_table=torch.tensor([[0, 1]], dtype=torch.int32, device=DEV),
                    seq_lens=torch.tensor([20], dtype=torch.int32, device=DEV), q_matrix=None, v_matrix=None,
                    scale=0.125, storage="int4", meta_dtype="fp16")
        if op == "prefill":
            args["query_start_loc"] = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    args.update(over)
    with pytest.raises(ValueError):
        getattr(torch.ops.sawint4, op)(**args)
    torch.cuda.synchronize()
    assert torch.equal(pool, snap)


def test_sanitizer_noncontiguous_data_tensors_match_contiguous(cuda_kernels):
    """key/value/query with any strides give the same bits as their contiguous copies."""
    spec = _spec("int4")
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 5, 64, generator=g).to(DEV).transpose(0, 1)  # [5, 2, 64], heads outermost in memory
    v = torch.randn(5, 2, 128, generator=g).to(DEV)[..., ::2]  # last-dim stride 2
    slots = torch.arange(5, device=DEV) * 3
    pools = [torch.zeros(spec.pool_shape(2), dtype=torch.uint8, device=DEV) for _ in range(2)]
    cuda_kernels.append(pools[0], k, v, slots, None, None, None, "int4", "fp16")
    cuda_kernels.append(pools[1], k.contiguous(), v.contiguous(), slots, None, None, None, "int4", "fp16")
    torch.cuda.synchronize()
    assert torch.equal(pools[0], pools[1])
    q = torch.randn(4, 1, 64, generator=g).to(DEV).transpose(0, 1)  # [1, 4, 64]
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEV)
    lens = torch.tensor([13], dtype=torch.int32, device=DEV)
    a = cuda_kernels.decode(q, pools[0], table, lens, None, None, 0.125, "int4", "fp16")
    b = cuda_kernels.decode(q.contiguous(), pools[0], table, lens, None, None, 0.125, "int4", "fp16")
    torch.cuda.synchronize()
    assert torch.equal(_bits(a), _bits(b))


# ---- values through the kernels' attention --------------------------------------------------------------
FORMATS_WHERE = [(f, w) for f in ["int4", "int8", "saw_int4_v_signs", "saw_int4_fp32meta", "bf16"] for w in ["k", "v"]]


@pytest.mark.parametrize("fmt, where", FORMATS_WHERE)
def test_nonfinite_tokens_poison_exactly_the_decode_queries_that_see_them(cuda_kernels, fmt, where):
    """Each edge row alone in a one-token sequence: nan exactly for the non-finite rows (all channels of
    the KV head's queries), finite for every finite row (saturation), other KV head always clean."""
    spec = _spec(fmt, t=8)
    tf = _tf(spec)
    rows = edge_rows(spec.head_dim)
    n = rows.shape[0]
    k = torch.randn(n, 2, spec.head_dim)
    v = torch.randn(n, 2, spec.head_dim)
    (k if where == "k" else v)[:, 0] = rows
    pool = torch.zeros(spec.pool_shape(n), dtype=torch.uint8, device=DEV)
    ref.append(pool, k.to(DEV), v.to(DEV), torch.arange(n, device=DEV) * 8, tf.k_matrix, tf.k_bias, tf.v_matrix,
               spec.storage, spec.metadata_dtype)
    q = torch.randn(n, 4, spec.head_dim, device=DEV)
    args = (pool, torch.arange(n, dtype=torch.int32, device=DEV)[:, None], torch.ones(n, dtype=torch.int32,
                                                                                       device=DEV),
            tf.q_matrix, tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype)
    got, want = cuda_kernels.decode(q, *args), ref.decode(q, *args)
    nonfinite = ~torch.isfinite(rows).all(-1).to(DEV)
    assert bool(torch.isnan(got[nonfinite, :2]).all())
    assert bool(torch.isfinite(got[~nonfinite]).all()) and bool(torch.isfinite(got[:, 2:]).all())
    assert torch.equal(torch.isnan(got), torch.isnan(want))


@pytest.mark.parametrize("fmt, where", [(f, w) for f in ["int4", "saw_int4_v_signs"] for w in ["k", "v"]])
def test_nonfinite_tokens_poison_exactly_the_decode_queries_that_see_them_mma(cuda_kernels, fmt, where):
    """The same through the Gluon kernel (head_dim 128, 64-token blocks): one token per sequence."""
    dmod = cuda_kernels.decode_module
    spec = _spec(fmt, d=128, t=64)
    tf = _tf(spec)
    rows = edge_rows(128)
    n = rows.shape[0]
    k = torch.randn(n, 2, 128)
    v = torch.randn(n, 2, 128)
    (k if where == "k" else v)[:, 0] = rows
    pool = torch.zeros(spec.pool_shape(n), dtype=torch.uint8, device=DEV)
    ref.append(pool, k.to(DEV), v.to(DEV), torch.arange(n, device=DEV) * 64, tf.k_matrix, tf.k_bias, tf.v_matrix,
               spec.storage, spec.metadata_dtype)
    q = torch.randn(n, 8, 128, device=DEV, dtype=torch.bfloat16)
    args = (pool, torch.arange(n, dtype=torch.int32, device=DEV)[:, None], torch.ones(n, dtype=torch.int32,
                                                                                       device=DEV),
            tf.q_matrix, tf.v_matrix, 0.088, spec.storage, spec.metadata_dtype)
    assert dmod.schedule_for(q, args[0], args[1], tf.q_matrix, tf.v_matrix, spec.storage, spec.metadata_dtype,
                             config=NOT_TINY).backend == "gluon"
    got, want = cuda_kernels.decode(q, *args, config=NOT_TINY), ref.decode(q, *args)
    nonfinite = ~torch.isfinite(rows).all(-1).to(DEV)
    assert bool(torch.isnan(got[nonfinite, :4]).all())
    assert bool(torch.isfinite(got[~nonfinite]).all()) and bool(torch.isfinite(got[:, 4:]).all())
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def _prefill_with_nan_at_5(cuda_kernels, fmt, where):
    spec = _spec(fmt, t=8)
    tf = _tf(spec)
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(24, 2, spec.head_dim, generator=g), torch.randn(24, 2, spec.head_dim, generator=g)
    (k if where == "k" else v)[5, 0, 3] = float("nan")
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8, device=DEV)
    slots = torch.cat([torch.arange(12), 16 + torch.arange(12)]).to(DEV)
    ref.append(pool, k.to(DEV), v.to(DEV), slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage,
               spec.metadata_dtype)
    q = torch.randn(24, 4, spec.head_dim, generator=g).to(DEV)
    return cuda_kernels.prefill(q, pool, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEV),
                        torch.tensor([12, 12], dtype=torch.int32, device=DEV),
                        torch.tensor([0, 12, 24], dtype=torch.int32, device=DEV), tf.q_matrix, tf.v_matrix, 0.125,
                        spec.storage, spec.metadata_dtype)


@pytest.mark.parametrize("fmt, where", FORMATS_WHERE)
def test_nonfinite_token_poisons_later_prefill_queries_of_its_head(cuda_kernels, fmt, where):
    out = _prefill_with_nan_at_5(cuda_kernels, fmt, where)
    assert bool(torch.isnan(out[5:12, :2]).all())
    assert bool(torch.isfinite(out[:, 2:]).all()) and bool(torch.isfinite(out[12:]).all())


@pytest.mark.parametrize("fmt, where", FORMATS_WHERE)
def test_nonfinite_token_leaves_causally_earlier_prefill_queries_finite(cuda_kernels, fmt, where):
    out = _prefill_with_nan_at_5(cuda_kernels, fmt, where)
    assert bool(torch.isfinite(out[:5]).all())


# ---- determinism -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["saw_int4_v_signs", "int4", "int8", "bf16"])
def test_determinism_same_inputs_same_bits(cuda_kernels, fmt):
    """Append into two fresh pools -> identical bytes; decode (split-KV path: long contexts) and
    prefill twice -> identical output bits; and the same through PagedKVCache."""
    spec = _spec(fmt, d=128, h=4, t=64)
    tf = _tf(spec, calibrated=spec.quantized)
    g = torch.Generator().manual_seed(0)
    lens = [3000, 17, 1024, 4100, 1, 640, 2222, 64]
    total = sum(lens)
    t = spec.tokens_per_block
    nb = sum(-(-n // t) for n in lens) + 1
    slots = torch.randperm(nb * t, generator=g)[:total].to(DEV)
    k = torch.randn(total, 4, 128, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(total, 4, 128, generator=g).to(DEV, torch.bfloat16)
    pools = []
    for _ in range(2):
        p = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device=DEV)
        cuda_kernels.append(p, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
        pools.append(p)
    torch.cuda.synchronize()
    assert torch.equal(pools[0], pools[1])
    pool = pools[0]
    table = torch.randint(0, nb, (8, 66), generator=g, dtype=torch.int32).to(DEV)  # repeats are legal reads
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(8, 32, 128, generator=g).to(DEV, torch.bfloat16)
    rest = (tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage, spec.metadata_dtype)
    outs = [cuda_kernels.decode(q, pool, table, lens_t, *rest) for _ in range(3)]
    assert all(torch.equal(_bits(outs[0]), _bits(o)) for o in outs[1:])
    q_lens = [min(n, 300) for n in lens]
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    qp = torch.randn(sum(q_lens), 32, 128, generator=g).to(DEV, torch.bfloat16)
    outs = [cuda_kernels.prefill(qp, pool, table, lens_t, starts, *rest) for _ in range(3)]
    assert all(torch.equal(_bits(outs[0]), _bits(o)) for o in outs[1:])

    runs = []
    for _ in range(2):
        cache = PagedKVCache(spec, num_layers=1, num_blocks=64, device=DEV)
        seqs = [cache.add_sequence() for _ in range(3)]
        plan = cache.plan(seqs, [100, 1, 37])
        cache.append(0, plan, k[:138], v[:138])
        out_p = cache.attend(0, plan, qp[:138], 0.1)
        plan = cache.plan(seqs, [1, 1, 1])
        cache.append(0, plan, k[138:141], v[138:141])
        runs.append((cache.pools.clone(), out_p, cache.attend(0, plan, q[:3], 0.1)))
    for a, b in zip(*runs):
        assert torch.equal(_bits(a), _bits(b))


# ---- addresses beyond 2**31 bytes --------------------------------------------------------------------------
def test_pool_larger_than_4gib_addresses_the_far_end(cuda_kernels):
    """Blocks whose byte offset exceeds 2**32: append writes them and attention reads them exactly like the
    reference (catches 32-bit address arithmetic)."""
    spec = _spec("int4", d=128, h=8, t=64)
    nb = (2 ** 32) // spec.block_bytes + 64
    if torch.cuda.mem_get_info()[0] < nb * spec.block_bytes * 1.3:
        pytest.skip("not enough free GPU memory for a > 4 GiB pool")
    pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device=DEV)
    assert pool.numel() > 2 ** 32
    g = torch.Generator().manual_seed(0)
    far = torch.tensor([nb - 1, nb - 40, 3], dtype=torch.int64)  # two blocks past 4 GiB, one near 0
    n = 3 * 64
    slots = (far[:, None] * 64 + torch.arange(64)).flatten().to(DEV)
    k = torch.randn(n, 8, 128, generator=g).to(DEV)
    v = torch.randn(n, 8, 128, generator=g).to(DEV)
    cuda_kernels.append(pool, k, v, slots, None, None, None, "int4", "fp16")
    small = torch.zeros(spec.pool_shape(3), dtype=torch.uint8, device=DEV)
    ref.append(small, k, v, torch.arange(n, device=DEV), None, None, None, "int4", "fp16")
    torch.cuda.synchronize()
    assert torch.equal(pool[far.to(DEV)], small)
    assert int(pool[4:nb - 40].count_nonzero()) == 0  # nothing between
    table = far.int()[None].to(DEV)
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    q = torch.randn(1, 32, 128, generator=g).to(DEV)
    want = ref.decode(q, small, torch.arange(3, dtype=torch.int32, device=DEV)[None], lens, None, None, 0.1,
                      "int4", "fp16")
    torch.testing.assert_close(cuda_kernels.decode(q, pool, table, lens, None, None, 0.1, "int4", "fp16"), want,
                               atol=3e-2, rtol=3e-2)
    starts = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    qp = torch.randn(n, 32, 128, generator=g).to(DEV)
    want = ref.prefill(qp, small, torch.arange(3, dtype=torch.int32, device=DEV)[None], lens, starts, None, None,
                       0.1, "int4", "fp16")
    torch.testing.assert_close(cuda_kernels.prefill(qp, pool, table, lens, starts, None, None, 0.1, "int4", "fp16"), want,
                               atol=3e-2, rtol=3e-2)
    del pool
    torch.cuda.empty_cache()


def test_calibrated_cache_on_device_matches_reference_pool(cuda_kernels):
    """A calibrated SAW-INT4 cache through PagedKVCache: stored K/V dequantize within a step of the
    reference's and attention matches the reference on the same pool."""
    spec = _spec("saw_int4_v_signs", d=64, h=2, t=16)
    g = torch.Generator().manual_seed(0)
    cal = ChannelCalibration.from_keys([torch.randn(128, 2, 64, generator=g) * 3 + 1])
    cache = PagedKVCache(spec, num_layers=1, num_blocks=16, device=DEV, calibration=cal)
    s = cache.add_sequence()
    plan = cache.plan([s], [50])
    k, v = torch.randn(50, 2, 64, generator=g).to(DEV), torch.randn(50, 2, 64, generator=g).to(DEV)
    before = cache.pools[0].clone()
    cache.append(0, plan, k, v)
    want = before.clone()
    tf = cache.transforms[0]
    ref.append(want, k, v, plan.slot_mapping, tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", "fp16")
    vg, vw = (pool_views(p, 64, "int4", "fp16") for p in (cache.pools[0], want))
    torch.testing.assert_close(vg.scale.float(), vw.scale.float(), rtol=2e-3, atol=1e-6)
    q = torch.randn(50, 8, 64, generator=g).to(DEV)
    out = cache.attend(0, plan, q, 0.125)
    torch.testing.assert_close(out, ref.prefill(q, cache.pools[0], plan.block_table, plan.seq_lens,
                                                plan.query_start_loc, tf.q_matrix, tf.v_matrix, 0.125, "int4",
                                                "fp16"), atol=3e-2, rtol=3e-2)
    assert math.isfinite(float(out.abs().max()))
