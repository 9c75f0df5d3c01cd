"""The Triton kernels on a CUDA GPU against the reference ops at realistic shapes (`pytest -m gpu`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trtllm_sawint4.kernels.config import DEFAULT
from trtllm_sawint4.layout import pool_views
from trtllm_sawint4.ops import reference as ref
from trtllm_sawint4.quant import unpack_int4

from helpers import assert_close_relative
from helpers import block_table, filled_pool, kernel_spec, layer_transform

pytestmark = pytest.mark.gpu

DEV = "cuda"
#: the shipped decode config with the Gluon kernel switched off (the Triton kernel everywhere)
TRITON_ONLY = replace(DEFAULT.decode, gluon=replace(DEFAULT.decode.gluon, enabled=False))


# ---------------------------------------------------------------------------------------------- append
@pytest.mark.parametrize("fmt", ["saw_int4", "int4", "int8", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("meta", ["fp16", "fp32"])
def test_append(cuda_kernels, fmt, d, meta):
    """Against the reference run on the CPU (the specification: exact IEEE division; torch on CUDA
    divides by a Python scalar through a reciprocal, so the reference run on the GPU can differ)."""
    if fmt == "bf16" and meta == "fp32":
        pytest.skip("metadata applies to quantized formats")
    torch.manual_seed(0)
    h, t, nb, n = 8, 64, 200, 5000
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4" and d == 128, device=DEV)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        key = (torch.randn(n, h, d, device=DEV) * 3).to(dtype)
        val = torch.randn(n, h, d, device=DEV).to(dtype)
        key[7, 1] = 2.5  # constant vector
        slots = torch.randperm(nb * t, device=DEV)[:n]
        p_ker = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, device=DEV)
        p_ref = p_ker.cpu()
        args = (tf.k_matrix, tf.k_bias, tf.v_matrix) if fmt == "saw_int4" else (None, None, None)
        ref.append(p_ref, key.cpu(), val.cpu(), slots.cpu(), *[a if a is None else a.cpu() for a in args],
                   spec.storage, meta)
        # the structured path (matrices read as their diagonal factor), except for fp32 keys: dense
        rb = tf.hadamard_block if fmt == "saw_int4" and dtype != torch.float32 else 0
        cuda_kernels.append(p_ker, key, val, slots, *args, spec.storage, meta, rb)
        p_ker = p_ker.cpu()
        if fmt != "saw_int4":
            if fmt == "bf16":
                assert torch.equal(p_ref.view(torch.int16), p_ker.view(torch.int16)), f"{fmt} {dtype}"
            else:
                assert torch.equal(p_ref, p_ker), f"{fmt} {dtype} not bit-identical"
            continue
        vr, vk = pool_views(p_ref, d, "int4", meta), pool_views(p_ker, d, "int4", meta)
        s = slots.cpu()
        sel = lambda x: x[s // t, :, :, s % t]  # noqa: E731  written rows [n, 2, H, ...]
        cr, ck = unpack_int4(sel(vr.codes)).int(), unpack_int4(sel(vk.codes)).int()
        assert (cr - ck).abs().max() <= 1
        frac = (cr != ck).float().mean()
        assert frac < 2e-3, f"{dtype}: {frac:.2e} codes differ"
        torch.testing.assert_close(sel(vr.scale).float(), sel(vk.scale).float(), rtol=2e-3, atol=1e-6)
        torch.testing.assert_close(sel(vr.vmin).float(), sel(vk.vmin).float(), rtol=2e-3, atol=1e-5)
        # rows nobody wrote are untouched
        mask = torch.ones(nb * t, dtype=torch.bool)
        mask[s] = False
        untouched = lambda x: x.movedim(3, 1).reshape(nb * t, *x.movedim(3, 1).shape[2:])[mask]  # noqa: E731
        assert torch.equal(untouched(vr.codes), untouched(vk.codes))


# ---------------------------------------------------------------------------------------------- decode
DECODE = [
    # fmt, meta, d, h, group, t
    ("saw_int4", "fp16", 128, 8, 4, 64),
    ("saw_int4", "fp16", 128, 8, 8, 16),
    ("saw_int4", "fp32", 64, 3, 3, 32),
    ("saw_int4", "fp16", 256, 2, 2, 128),
    ("saw_int4", "fp16", 128, 1, 16, 64),   # MQA
    ("int4", "fp16", 128, 8, 1, 64),        # MHA
    ("int4", "fp16", 64, 4, 5, 16),
    ("int8", "fp16", 128, 8, 4, 32),
    ("int8", "fp32", 256, 2, 6, 64),
    ("bf16", "fp16", 128, 8, 4, 64),
    ("bf16", "fp16", 64, 3, 3, 16),
    ("bf16", "fp16", 256, 2, 7, 128),
]


@pytest.mark.parametrize("fmt,meta,d,h,group,t", DECODE)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mma", [True, False])  # the Gluon kernel where it applies / the Triton kernel only
def test_decode(cuda_kernels, fmt, meta, d, h, group, t, dtype, mma):
    cfg = DEFAULT.decode if mma else TRITON_ONLY
    torch.manual_seed(1)
    lens = [0, 1, 700, 3001, 130, 4096, 65]
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=d != 256)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4" and d == 64, device=DEV)
    nb = sum(-(-l // t) for l in lens) + 5
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = block_table(lens, t, nb, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), h * group, d, device=DEV).to(dtype)
    scale = d ** -0.5
    want = ref.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta)
    # the transforms both as dense matrices and in block-Hadamard form (the cache's path)
    for splits, rb in ((None, tf.hadamard_block), (1, tf.hadamard_block), (7, tf.hadamard_block), (None, 0), (7, 0)):
        got = cuda_kernels.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta, rb,
                       num_splits=splits, config=cfg)
        assert got.dtype == dtype
        assert torch.count_nonzero(got[0]) == 0
        assert_close_relative(got[1:], want[1:])


@pytest.mark.parametrize("regime", ["many", "few", "tiny"])
@pytest.mark.parametrize("fmt,t", [("saw_int4", 64), ("saw_int4", 16), ("int4", 128)])
def test_decode_each_tile_config(cuda_kernels, regime, fmt, t):
    """Every regime's tile of kernels.config.DEFAULT (the Triton kernel), split and unsplit, whatever
    shape selects it (the shapes that select "many" are too big for a quick reference comparison)."""
    cfg = TRITON_ONLY.with_every_tile(DEFAULT.decode.tile(regime))
    torch.manual_seed(2)
    lens = [1, 700, 3001, 4096, 65, 2048]
    spec = kernel_spec(fmt, 128, 4, t)
    tf = layer_transform(spec, device=DEV)
    nb = sum(-(-l // t) for l in lens) + 5
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = block_table(lens, t, nb, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), 16, 128, device=DEV).to(torch.bfloat16)
    want = ref.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage, "fp16")
    for splits in (None, 1, 3, 10**4):  # 10**4: one tile per split (the ONE_TILE early-load path)
        got = cuda_kernels.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage, "fp16",
                       tf.hadamard_block, num_splits=splits, config=cfg)
        assert_close_relative(got, want)


@pytest.mark.parametrize("d,splits,calibrated", [
    (128, 100, False),  # 79 splits (315 tiles): one load of 128, 8 warps
    (128, 300, True),   # 158 splits: two passes of 128
    (64, 250, False),   # 158 splits: one load of 256 at head_dim 64
])
def test_decode_many_splits(cuda_kernels, d, splits, calibrated):
    """The split merge at batch-1-like split counts (up to 256 splits per load, 8 warps), with and
    without a calibrated transform."""
    torch.manual_seed(3)
    lens = [20000, 1, 64 * 300 + 5]
    t = 64
    spec = kernel_spec("saw_int4", d, 2, t)
    tf = layer_transform(spec, calibrated=calibrated, device=DEV)
    nb = sum(-(-l // t) for l in lens) + 3
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = block_table(lens, t, nb, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), 8, d, device=DEV).to(torch.bfloat16)
    want = ref.decode(q, pool, table, sl, tf.q_matrix, None, d ** -0.5, "int4", "fp16")
    got = cuda_kernels.decode(q, pool, table, sl, tf.q_matrix, None, d ** -0.5, "int4", "fp16", tf.hadamard_block,
                   num_splits=splits)
    assert_close_relative(got, want)


MMA_CASES = [  # fmt, group, t, rotate_v: inside the Gluon kernel's scope (head_dim 128, G <= 8, T % 64 == 0)
    ("saw_int4", 4, 64, True), ("saw_int4", 8, 128, False), ("int4", 1, 64, False), ("saw_int4", 3, 128, True),
    ("int4", 6, 64, False)]


@pytest.mark.parametrize("fmt,group,t,rotate_v", MMA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_mma_kernel(cuda_kernels, fmt, group, t, rotate_v, dtype):
    """The Gluon kernel (kernels/decode_gluon.py) against the reference: ragged lengths (partial tiles,
    one token, zero), shuffled blocks, ids past each sequence that must not be read, every split
    count from one tile per split to one split; and the dispatch really takes it."""
    cfg = replace(DEFAULT.decode, tiny_token_heads=0)  # (these shapes would be "tiny")
    torch.manual_seed(4)
    lens = [0, 1, 63, 64, 65, 700, 3001, 4096, 129]
    h = 4
    spec = kernel_spec(fmt, 128, h, t, rotate_v=rotate_v)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4" and group == 3, device=DEV)
    nb = sum(-(-l // t) for l in lens) + 5
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = block_table(lens, t, nb, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(len(lens), h * group, 128, device=DEV).to(dtype)
    want = ref.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage, "fp16")
    for splits in (None, 1, 5, 10**4):
        assert cuda_kernels.decode_module.schedule_for(q, pool, table, tf.q_matrix, tf.v_matrix, spec.storage, "fp16",
                                            tf.hadamard_block, config=cfg, num_splits=splits).backend == "gluon"
        got = cuda_kernels.decode(q, pool, table, sl, tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage, "fp16",
                       tf.hadamard_block, num_splits=splits, config=cfg)
        assert got.dtype == dtype
        assert torch.count_nonzero(got[0]) == 0
        assert_close_relative(got[1:], want[1:])


@pytest.mark.parametrize("rotate_v", [True, False])  # the V-rotating merge / the plain one
@pytest.mark.parametrize("b,mb", [(16, 64), (1, 16)])  # "few" splits; "tiny" one-tile splits (ONE_TILE)
def test_decode_cuda_graph(cuda_kernels, rotate_v, b, mb):
    """A decode step captured in a CUDA graph and replayed with new lengths/queries equals eager."""
    torch.manual_seed(2)
    spec = kernel_spec("saw_int4", 128, 8, 64, rotate_v=rotate_v)
    tf = layer_transform(spec, device=DEV)
    nb = b * mb
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = torch.randperm(nb, device=DEV).int().view(b, mb)
    sl = torch.randint(1, mb * 64, (b,), dtype=torch.int32, device=DEV)
    q = torch.randn(b, 32, 128, device=DEV, dtype=torch.bfloat16)
    args = lambda: (q, pool, table, sl, tf.q_matrix, tf.v_matrix, 0.088, "int4", "fp16", tf.hadamard_block)  # noqa: E731
    cuda_kernels.decode(*args())  # compile outside the capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cuda_kernels.decode(*args())
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_kernels.decode(*args())
    for _ in range(3):
        sl.copy_(torch.randint(0, mb * 64, (b,), dtype=torch.int32, device=DEV))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        eager = cuda_kernels.decode(*args())
        assert torch.equal(out, eager)
        assert_close_relative(out[sl > 0], ref.decode(*args())[sl > 0])


# ---------------------------------------------------------------------------------------------- prefill
PREFILL = [
    ("saw_int4", "fp16", 128, 8, 4, 64),
    ("saw_int4", "fp32", 64, 3, 3, 16),
    ("saw_int4", "fp16", 256, 2, 2, 32),
    ("int4", "fp16", 128, 4, 1, 128),
    ("int8", "fp16", 64, 2, 8, 64),
    ("bf16", "fp16", 128, 8, 4, 64),
    ("bf16", "fp16", 256, 1, 4, 16),
]


@pytest.mark.parametrize("fmt,meta,d,h,group,t", PREFILL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill(cuda_kernels, fmt, meta, d, h, group, t, dtype):
    torch.manual_seed(3)
    lens = [1000, 2500, 37, 0, 900]     # cached tokens after the append
    q_lens = [1000, 300, 1, 0, 129]     # full prefill, chunked extend, decode-like, idle, extend
    spec = kernel_spec(fmt, d, h, t, meta, rotate_v=True)
    tf = layer_transform(spec, calibrated=fmt == "saw_int4" and d == 128, device=DEV)
    nb = sum(-(-l // t) for l in lens) + 3
    pool = filled_pool(spec, tf, nb, device=DEV)
    table = block_table(lens, t, nb, device=DEV)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    q = torch.randn(int(qsl[-1]), h * group, d, device=DEV).to(dtype)
    scale = d ** -0.5
    want = ref.prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta)
    for rb in sorted({0, tf.hadamard_block}):  # dense matrices and block-Hadamard form
        got = cuda_kernels.prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, scale, spec.storage, meta, rb)
        assert got.dtype == dtype
        assert_close_relative(got, want)


def test_public_ops_dispatch_to_kernels(cuda_kernels):
    from trtllm_sawint4.ops.dispatch import implementation

    pool = torch.zeros(kernel_spec("saw_int4", 128, 2, 64).pool_shape(2), dtype=torch.uint8, device=DEV)
    assert implementation("decode", pool) is cuda_kernels.decode
    assert implementation("append", pool) is cuda_kernels.append
    assert implementation("prefill", pool) is cuda_kernels.prefill
