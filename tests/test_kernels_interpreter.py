"""The Triton kernels under TRITON_INTERPRET=1 (CPU; tests/conftest.py switches it on) against the
reference ops, at small shapes. The `interp_kernels` fixture (conftest.py) gives the kernel modules."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from dataclasses import replace  # noqa: E402

from trtllm_sawint4.kernels.config import DEFAULT, SplitMerge  # noqa: E402
from trtllm_sawint4.kernels.schedule import split_count  # noqa: E402
from trtllm_sawint4.layout import pool_views  # noqa: E402
from trtllm_sawint4.ops import reference as ref  # noqa: E402
from trtllm_sawint4.quant import unpack_int4  # noqa: E402
from trtllm_sawint4.spec import KVCacheSpec  # noqa: E402

from helpers import block_table, filled_pool, kernel_spec, layer_transform  # noqa: E402

pytestmark = pytest.mark.usefixtures("interp_kernels")


# ---------------------------------------------------------------------------------------------- append
@pytest.mark.parametrize("fmt,meta,d,t,dtype", [
    ("int4", "fp16", 64, 16, torch.bfloat16),
    ("int4", "fp32", 128, 8, torch.float16),
    ("int8", "fp16", 64, 32, torch.float32),
    ("int8", "fp32", 32, 16, torch.bfloat16),
    ("bf16", "fp16", 64, 16, torch.float16),
    ("bf16", "fp16", 256, 8, torch.bfloat16),
])
def test_append_no_transform_bit_identical(interp_kernels, fmt, meta, d, t, dtype):
    torch.manual_seed(1)
    spec = kernel_spec(fmt, d, 2, t, meta)
    nb, n = 6, 37
    key = (torch.randn(n, 2, d) * 3).to(dtype)
    val = torch.randn(n, 2, d).to(dtype)
    key[0, 0] = 7.0  # constant vector: scale 0
    key[1, 1, 3] = 1e6  # saturates
    slots = torch.randperm(nb * t)[:n]
    p_ref = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8)
    p_ker = p_ref.clone()
    ref.append(p_ref, key, val, slots, None, None, None, spec.storage, meta)
    interp_kernels["append"].append(p_ker, key, val, slots, None, None, None, spec.storage, meta)
    assert torch.equal(p_ref, p_ker)


def test_append_nonfinite(interp_kernels):
    spec = kernel_spec("int4", 64, 2, 16)
    key = torch.randn(5, 2, 64)
    val = torch.randn(5, 2, 64)
    key[1, 0, 3] = float("nan")
    key[2, 1, 0] = float("inf")
    val[4, 1, 9] = float("-inf")
    slots = torch.tensor([3, 0, 17, 30, 9])
    for storage in ("int4", "int8"):
        sp = kernel_spec(storage, 64, 2, 16)
        p_ref = torch.zeros(sp.pool_shape(2), dtype=torch.uint8)
        p_ker = p_ref.clone()
        ref.append(p_ref, key, val, slots, None, None, None, storage, "fp16")
        interp_kernels["append"].append(p_ker, key, val, slots, None, None, None, storage, "fp16")
        assert torch.equal(p_ref, p_ker)
    # bf16 storage: equal as values (NaN payloads may differ)
    p_ref = torch.zeros(kernel_spec("bf16", 64, 2, 16).pool_shape(2), dtype=torch.uint8)
    p_ker = p_ref.clone()
    ref.append(p_ref, key, val, slots, None, None, None, "bf16", "fp16")
    interp_kernels["append"].append(p_ker, key, val, slots, None, None, None, "bf16", "fp16")
    torch.testing.assert_close(p_ref.view(torch.bfloat16), p_ker.view(torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    del spec


@pytest.mark.parametrize("d,t,calibrated,rotate_v,meta", [
    (64, 16, False, True, "fp16"),
    (128, 32, True, False, "fp16"),
    (64, 8, True, True, "fp32"),
])
def test_append_transform(interp_kernels, d, t, calibrated, rotate_v, meta):
    torch.manual_seed(2)
    h, nb, n = 2, 5, 33
    spec = kernel_spec("saw_int4", d, h, t, meta, rotate_v)
    tf = layer_transform(spec, calibrated)
    key = (torch.randn(n, h, d) * 2).bfloat16()
    val = torch.randn(n, h, d).bfloat16()
    slots = torch.randperm(nb * t)[:n]
    p_ref = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)
    p_ker = p_ref.clone()
    ref.append(p_ref, key, val, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", meta)
    interp_kernels["append"].append(p_ker, key, val, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", meta)
    vr, vk = pool_views(p_ref, d, "int4", meta), pool_views(p_ker, d, "int4", meta)
    cr, ck = unpack_int4(vr.codes).int(), unpack_int4(vk.codes).int()
    assert (cr - ck).abs().max() <= 1
    assert (cr != ck).float().mean() < 0.01
    torch.testing.assert_close(vr.scale.float(), vk.scale.float(), rtol=2e-3, atol=0)
    torch.testing.assert_close(vr.vmin.float(), vk.vmin.float(), rtol=2e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------- decode
DECODE_CASES = [
    # fmt, meta, d, h, group, t, lens, dtype, splits
    ("saw_int4", "fp16", 64, 2, 3, 16, [0, 37, 70], torch.bfloat16, None),
    ("saw_int4", "fp16", 32, 1, 8, 8, [5, 50], torch.float16, 3),   # MQA, many tiny blocks
    ("int4", "fp32", 128, 2, 1, 32, [64, 1, 90], torch.bfloat16, 2),  # MHA
    ("int8", "fp16", 64, 2, 2, 16, [33, 17], torch.float16, 1),
    ("bf16", "fp16", 64, 2, 4, 16, [48, 0, 3], torch.bfloat16, None),
]


@pytest.mark.parametrize("fmt,meta,d,h,group,t,lens,dtype,splits", DECODE_CASES)
def test_decode(interp_kernels, fmt, meta, d, h, group, t, lens, dtype, splits):
    torch.manual_seed(3)
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec, calibrated=fmt != "bf16" and d == 64)
    nb = sum(-(-l // t) for l in lens) + 2
    pool = filled_pool(spec, tf, nb)
    table = block_table(lens, t, nb)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), h * group, d).to(dtype)
    scale = d ** -0.5
    want = ref.decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta)
    got = interp_kernels["decode"].decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta,
                             num_splits=splits)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for b, l in enumerate(lens):
        if l == 0:
            assert torch.count_nonzero(got[b]) == 0


def _ragged_decode_case(fmt, d, h, group, t, meta, lens):
    """A filled pool (V rotated) of sequences of `lens` tokens, bf16 queries, and decode's arguments."""
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec)
    nb = sum(-(-n // t) for n in lens) + 2
    pool = filled_pool(spec, tf, nb)
    table = block_table(lens, t, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), h * group, d).to(torch.bfloat16)
    args = (q, pool, table, sl, tf.q_matrix, tf.v_matrix, d ** -0.5, spec.storage, meta, tf.hadamard_block)
    return spec, tf, pool, table, sl, q, args


@pytest.mark.parametrize("fmt,meta,t", [("saw_int4", "fp16", 16), ("int4", "fp32", 8), ("int8", "fp16", 32),
                                         ("bf16", "fp16", 16)])
def test_decode_one_tile_splits(interp_kernels, fmt, meta, t):
    """Splits of one tile (ONE_TILE: the tile is loaded before the q transform) give the reference's
    result and the same bits as the loop over that one tile."""
    torch.manual_seed(6)
    d, h, group = 64, 2, 4
    spec, tf, pool, table, sl, q, args = _ragged_decode_case(fmt, d, h, group, t, meta, [0, 45, 16, 70])
    splits = -(-table.shape[1] * t // 16)  # one 16-token interpreter tile per split
    got = interp_kernels["decode"].decode(*args, num_splits=splits)
    want = ref.decode(*args)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert interp_kernels["decode"].schedule_for(q, pool, table, tf.q_matrix, tf.v_matrix, spec.storage, meta, tf.hadamard_block,
                                    num_splits=splits).one_tile
    looped = replace(DEFAULT.decode, one_tile_early_loads=False)
    assert torch.equal(interp_kernels["decode"].decode(*args, num_splits=splits, config=looped), got)


@pytest.mark.parametrize("rotate_v", [False, True])
@pytest.mark.parametrize("tile_elems", [None, 64])
def test_decode_reduce_paths(interp_kernels, rotate_v, tile_elems):
    """The split merge: one load of all splits, and (tile_elems 64 -> 2 splits per load) the
    two-pass loop that long contexts at batch 1 take; with and without the V rotation."""
    cfg = DEFAULT.decode if tile_elems is None else replace(DEFAULT.decode, merge=SplitMerge(tile_elems=tile_elems))
    torch.manual_seed(5)
    d, h, group, t, lens = 32, 2, 3, 8, [0, 61, 9, 40]
    spec = kernel_spec("saw_int4", d, h, t, "fp16", rotate_v=rotate_v)
    tf = layer_transform(spec, calibrated=False)
    nb = sum(-(-l // t) for l in lens) + 1
    pool = filled_pool(spec, tf, nb)
    table = block_table(lens, t, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), h * group, d).to(torch.bfloat16)
    want = ref.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, d ** -0.5, "int4", "fp16")
    got = interp_kernels["decode"].decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, d ** -0.5, "int4", "fp16", num_splits=5,
                             config=cfg)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert torch.count_nonzero(got[0]) == 0


def test_plan_splits_host_only():
    plan = split_count
    s, tps = plan(64, 8, 8192, 64, 132, 2, 2)
    assert s * tps >= 8192 // 64 and (s - 1) * tps < 8192 // 64
    assert plan(1, 8, 64, 64, 132, 2, 2) == (1, 1)
    s, tps = plan(1, 8, 32768, 64, 132, 2, 2)
    assert s > 1


# ---------------------------------------------------------------------------------------------- prefill
PREFILL_CASES = [
    # fmt, meta, d, h, group, t, lens, q_lens, dtype
    ("saw_int4", "fp16", 64, 2, 2, 16, [40, 21, 9], [40, 5, 0], torch.bfloat16),  # prefill + extend + idle
    ("int4", "fp32", 32, 1, 4, 8, [30, 50], [30, 20], torch.float16),
    ("saw_int4", "fp16", 32, 2, 3, 8, [26, 19], [26, 11], torch.float16),  # G 3: a group that is not a power of 2
    ("int8", "fp16", 64, 1, 1, 32, [45], [17], torch.bfloat16),
    ("bf16", "fp16", 64, 2, 2, 16, [20, 33], [20, 1], torch.float16),
]


@pytest.mark.parametrize("fmt,meta,d,h,group,t,lens,q_lens,dtype", PREFILL_CASES)
def test_prefill(interp_kernels, fmt, meta, d, h, group, t, lens, q_lens, dtype):
    torch.manual_seed(4)
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4")
    nb = sum(-(-l // t) for l in lens) + 1
    pool = filled_pool(spec, tf, nb)
    table = block_table(lens, t, nb)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), h * group, d).to(dtype)
    scale = d ** -0.5
    want = ref.prefill(q, pool, table, seq_lens, qsl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta)
    got = interp_kernels["prefill"].prefill(q, pool, table, seq_lens, qsl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_append_then_attend_roundtrip(interp_kernels):
    """Kernel append feeding kernel decode equals the reference end to end."""
    torch.manual_seed(5)
    spec = kernel_spec("saw_int4", 64, 2, 16, rotate_v=True)
    tf = layer_transform(spec)
    lens = [23, 40]
    nb = 6
    table = block_table(lens, 16, nb, seed=7)
    slots = torch.cat([table[b, torch.arange(l) // 16].long() * 16 + torch.arange(l) % 16 for b, l in enumerate(lens)])
    n = slots.numel()
    key, val = torch.randn(n, 2, 64).bfloat16(), torch.randn(n, 2, 64).bfloat16()
    p_ref = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)
    p_ker = p_ref.clone()
    ref.append(p_ref, key, val, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", "fp16")
    interp_kernels["append"].append(p_ker, key, val, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", "fp16")
    q = torch.randn(2, 4, 64).bfloat16()
    sl = torch.tensor(lens, dtype=torch.int32)
    want = ref.decode(q, p_ref, table, sl, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16")
    got = interp_kernels["decode"].decode(q, p_ker, table, sl, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16")
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("d,block,calibrated", [
    (64, 16, True),    # blocks inside each half
    (64, 16, False),   # |d| uniform: the one-term path (x * sign(d)) @ S times |d|
    (128, 128, False),  # one block couples the halves
    (128, 128, True),
    (32, 32, True),
    (64, 1, True),     # calibrated, unrotated: diagonal matrices (int4 storage, no V transform)
])
def test_block_hadamard_path(interp_kernels, d, block, calibrated):
    """hadamard_block > 0: the kernels make the +-1 Sylvester blocks from indices and read only the
    diagonal factor of each matrix (append; prefill; decode's V merge), against the reference."""
    torch.manual_seed(8)
    h, t, nb, n = 2, 16, 7, 45
    if block == 1:
        spec = KVCacheSpec(d, h, t, kv_format="int4")
    else:
        spec = KVCacheSpec(d, h, t, kv_format="saw_int4", rotation_block=block, rotate_v=True, sign_seed=2)
    tf = layer_transform(spec, calibrated)
    assert tf.hadamard_block == block
    km, qm, vm = tf.k_matrix, tf.q_matrix, tf.v_matrix
    r = tf.hadamard_block
    key, val = (torch.randn(n, h, d) * 2).bfloat16(), torch.randn(n, h, d).bfloat16()
    slots = torch.randperm(nb * t)[:n]
    p_ref = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)
    p_ker = p_ref.clone()
    ref.append(p_ref, key, val, slots, km, tf.k_bias, vm, "int4", "fp16", r)
    interp_kernels["append"].append(p_ker, key, val, slots, km, tf.k_bias, vm, "int4", "fp16", r)
    vr, vk = pool_views(p_ref, d, "int4", "fp16"), pool_views(p_ker, d, "int4", "fp16")
    cr, ck = unpack_int4(vr.codes).int(), unpack_int4(vk.codes).int()
    assert (cr - ck).abs().max() <= 1 and (cr != ck).float().mean() < 0.01
    torch.testing.assert_close(vr.scale.float(), vk.scale.float(), rtol=2e-3, atol=0)
    lens = [37, 60]
    table = block_table(lens, t, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(2, h * 3, d).bfloat16()
    want = ref.decode(q, p_ref, table, sl, qm, vm, d ** -0.5, "int4", "fp16", r)
    got = interp_kernels["decode"].decode(q, p_ref, table, sl, qm, vm, d ** -0.5, "int4", "fp16", r, num_splits=3)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    qsl = torch.tensor([0, 10, 30], dtype=torch.int32)
    qp = torch.randn(30, h * 3, d).bfloat16()
    want = ref.prefill(qp, p_ref, table, sl, qsl, qm, vm, d ** -0.5, "int4", "fp16", r)
    got = interp_kernels["prefill"].prefill(qp, p_ref, table, sl, qsl, qm, vm, d ** -0.5, "int4", "fp16", r)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt,meta,d,t,lens", [
    ("saw_int4", "fp16", 64, 16, [1, 70, 33]),
    ("int4", "fp32", 32, 8, [50, 9]),
])
def test_int4_code_offset_path_fp16(interp_kernels, fmt, meta, d, t, lens):
    """The GPU path feeds INT4 codes to the dot as fp16 1024 + c (bf16: 128 + c) and cancels the
    offset exactly; run that algebra with fp16 operands under the interpreter."""
    torch.manual_seed(6)
    h, group = 2, 3
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4")
    nb = sum(-(-l // t) for l in lens) + 1
    pool = filled_pool(spec, tf, nb)
    table = block_table(lens, t, nb)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), h * group, d).half()
    scale = d ** -0.5
    dcfg = replace(DEFAULT.decode, interp_dot_dtype="fp16")
    pcfg = replace(DEFAULT.prefill, interp_dot_dtype="fp16")
    want = ref.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, scale, "int4", meta)
    got = interp_kernels["decode"].decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, scale, "int4", meta, num_splits=2,
                             config=dcfg)
    assert interp_kernels["decode"].schedule_for(q, pool, table, tf.q_matrix, tf.v_matrix, "int4", meta, config=dcfg,
                                    num_splits=2).dot_dtype == "fp16"
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"decode relative error {err:.2e}"
    q_lens = [min(l, 20) for l in lens]
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    qp = torch.randn(int(qsl[-1]), h * group, d).half()
    want = ref.prefill(qp, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, scale, "int4", meta)
    got = interp_kernels["prefill"].prefill(qp, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, scale, "int4", meta, config=pcfg)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 1e-2, f"prefill relative error {err:.2e}"


@pytest.mark.parametrize("window", [2, 0])
def test_v_min_weighted_like_its_codes(interp_kernels, window):
    """P V folds dequantization as (p*s rounded) @ codes + a min term. With a V rotation the min must
    carry the same rounded weight as the codes (the kernels' EXACT_V path): with the exact p instead, every channel of a token errs by
    (rounded - exact) * code, all of one sign, and the V rotation undone afterwards sums that into
    output channel 0 (the H200 saw 0.22 at head_dim 128, window 1). Codes skewed to the top make the
    effect large: here it was 0.47 (prefill) / 0.08 (decode) of outputs up to ~38 before the fix,
    ~one fp16 ulp (0.03) after. Weights rounded once (fp16: 2^-11) bound the error by ~5e-4 of the
    largest output plus the output's own rounding."""
    torch.manual_seed(0)
    d, h, group, t, n = 64, 1, 2, 16, 32
    spec = kernel_spec("saw_int4", d, h, t, rotate_v=True)
    tf = layer_transform(spec)
    nb = n // t + 1
    pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)
    v = 1.0 + 0.01 * torch.randn(n, h, d)  # stored (rotated) V: one low channel, the rest at the top code
    v[:, :, 5] = -300.0
    table, sl = block_table([n], t, nb), torch.tensor([n], dtype=torch.int32)
    pos = torch.arange(n)
    ref.append(pool, torch.randn(n, h, d), v, table[0, pos // t].long() * t + pos % t, tf.k_matrix, tf.k_bias, None,
               "int4", "fp16")
    qsl = torch.tensor([0, n], dtype=torch.int32)
    q = torch.randn(n, h * group, d).half()
    pcfg = replace(DEFAULT.prefill, interp_dot_dtype="fp16")
    dcfg = replace(DEFAULT.decode, interp_dot_dtype="fp16")
    cases = [(interp_kernels["prefill"].prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, d ** -0.5,
                                                "int4", "fp16", tf.hadamard_block, window, config=pcfg),
              ref.prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, d ** -0.5, "int4", "fp16", 0, window))]
    for b in range(0, n, 4):  # decode: the query of a sequence of the first b + 1 tokens
        lb = torch.tensor([b + 1], dtype=torch.int32)
        cases.append((interp_kernels["decode"].decode(q[b:b + 1], pool, table, lb, tf.q_matrix, tf.v_matrix,
                                                      d ** -0.5, "int4", "fp16", tf.hadamard_block, window,
                                                      num_splits=2, config=dcfg),
                      ref.decode(q[b:b + 1], pool, table, lb, tf.q_matrix, tf.v_matrix, d ** -0.5, "int4", "fp16",
                                 0, window)))
    for got, want in cases:
        top = want.float().abs().max().item()
        assert top > 1.0
        err = (got.float() - want.float()).abs().max().item()
        assert err <= 5e-4 * top + 2.0 ** (math.floor(math.log2(top)) - 10), (err, top)


def test_split_plan_of_the_tuned_regimes():
    """The split counts the H200 measurements were taken with (docs/kernels.md):
    the "many" regime splits long contexts in 2-3 and leaves <= 2k tokens whole; "few" aims at 4
    waves (3 splits at 32 x 8k, 2 at 9/3 x 128); "tiny" splits down to single 64-token tiles."""
    def splits(regime, batch, heads, ctx):
        c = DEFAULT.decode.tile(regime)
        return split_count(batch, heads, ctx, c.block_n, 132, c.waves, c.min_tiles_per_split)[0]

    assert [splits("many", 64, 8, n) for n in (1024, 2048, 8192, 32768)] == [1, 1, 3, 3]
    assert splits("many", 128, 8, 8192) == 2
    assert splits("few", 8, 8, 32768) == 9 and splits("few", 1, 8, 32768) == 64
    assert splits("few", 32, 8, 8192) == 3 and splits("few", 128, 3, 32768) == 2
    assert splits("tiny", 1, 8, 1024) == 16 and splits("tiny", 8, 8, 1024) == 4


@pytest.mark.parametrize("fmt,t", [("saw_int4", 16), ("int8", 8), ("bf16", 16)])
@pytest.mark.parametrize("window", [1, 7, 16, 33])
def test_sliding_window_decode_and_prefill(interp_kernels, fmt, t, window):
    """window > 0 in the Triton kernels: decode's splits cover the window's tiles only (one-tile splits
    and the loop), prefill runs the window's key tiles through the masked path; both against the
    reference, and the window changes the result."""
    torch.manual_seed(9)
    d, h, group = 64, 2, 2
    spec, tf, pool, table, sl, q, args = _ragged_decode_case(fmt, d, h, group, t, "fp16", [0, 45, 16, 70, 3])
    want = ref.decode(*args, window)
    for splits in (None, 1, 10**4):
        got = interp_kernels["decode"].decode(*args, window, num_splits=splits)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert not torch.allclose(want.float(), ref.decode(*args).float(), atol=1e-3)
    assert interp_kernels["decode"].schedule_for(q, pool, table, tf.q_matrix, tf.v_matrix, spec.storage, "fp16",
                                    tf.hadamard_block, window).shape.window == window
    q_lens = [0, 20, 16, 5, 3]
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    qp = torch.randn(int(qsl[-1]), h * group, d).to(torch.bfloat16)
    pargs = (qp, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, d ** -0.5, spec.storage, "fp16", tf.hadamard_block)
    got = interp_kernels["prefill"].prefill(*pargs, window)
    torch.testing.assert_close(got.float(), ref.prefill(*pargs, window).float(), rtol=2e-2, atol=2e-2)
