"""Adversarial values through the public ops (reference path), and the Triton kernels under the
interpreter against the reference on the same values.

The behaviour under test is quant.py's docstring: saturation at +-65504, exact reconstruction of
constant vectors representable in fp16, error within half a step, non-finite vector -> nan
metadata -> nan on dequant -> nan attention for the queries that attend it (and only for those).
"""

from __future__ import annotations

import math

import pytest
import torch

import trtllm_sawint4.ops  # noqa: F401  (registers torch.ops.sawint4)
from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.layout import pool_views
from trtllm_sawint4.ops import reference as ref
from trtllm_sawint4.quant import unpack_int4

from helpers import SPECS

ops = torch.ops.sawint4
D, H, G, T = 32, 2, 2, 8  # head_dim, KV heads, query heads per KV head, tokens per block
HQ = H * G
F16_MAX = 65504.0
SCALE = 1.0 / math.sqrt(D)



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(name: str) -> KVCacheSpec:
    return KVCacheSpec(D, H, T, **SPECS[name])


def adversarial_rows(d: int = D) -> dict[str, torch.Tensor]:
    """Named [d] float32 vectors, each an edge case of the quantizer."""
    g = torch.Generator().manual_seed(7)
    spike = torch.randn(d, generator=g) * 1e-3
    spike[5] = 100.0
    beyond = torch.randn(d, generator=g)
    beyond[0], beyond[1] = 1e6, -1e6
    sub = torch.tensor([1e-40, -3e-39, 0.0, 5e-45] * (d // 4))  # float32 subnormals
    f16sub = torch.tensor([3e-6, -2e-7, 1e-5, 6e-8] * (d // 4))  # below fp16's smallest normal
    rows = {
        "equal": torch.full((d,), 3.25),
        "equal_neg": torch.full((d,), -1536.0),
        "zeros": torch.zeros(d),
        "spike": spike,
        "beyond_fp16": beyond,
        "const_beyond_fp16": torch.full((d,), 1e6),
        "fp32_max": torch.full((d,), -3.0e38),
        "fp32_subnormal": sub,
        "fp16_subnormal": f16sub,
    }
    for name, bad in (("pinf", float("inf")), ("ninf", -float("inf")), ("nan", float("nan"))):
        x = torch.randn(d, generator=g)
        x[d // 2 + 1] = bad
        rows[name] = x
    return rows


NONFINITE = ("pinf", "ninf", "nan")
ROWS = adversarial_rows()


def _unspecified(spec: KVCacheSpec, where: str, name: str) -> bool:
    """Finite inputs whose outcome the format does not pin down: a rotation of +-3e38 overflows fp32
    (to inf, so the vector is stored as nan) before the quantizer can saturate it, and bf16 storage
    keeps +-3e38, whose dot products overflow fp32 in an order-dependent way."""
    if name != "fp32_max":
        return False
    rotated = spec.rotated and (where == "k" or spec.rotate_v)
    return rotated or (not spec.quantized and where == "k")


def _single_token_pool(spec, tf, values: torch.Tensor, keys: torch.Tensor):
    """Token b (K keys[b], V values[b], both [H, D]) alone in block b, row 0. Returns the pool."""
    n = values.shape[0]
    pool = torch.zeros(spec.pool_shape(n + 1), dtype=torch.uint8)
    ops.append(pool, keys, values, torch.arange(n) * T, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage,
               spec.metadata_dtype)
    return pool


def _decode_single(spec, tf, pool, n, query):
    table = torch.arange(n, dtype=torch.int32)[:, None]
    lens = torch.ones(n, dtype=torch.int32)
    return ops.decode(query, pool, table, lens, tf.q_matrix, tf.v_matrix, SCALE, spec.storage, spec.metadata_dtype)


def _adversarial_batch(where: str):
    """K/V [n, H, D]: row b carries adversarial vector b in KV head 0 (in K or V, per `where`);
    everything else is ordinary data."""
    names = list(ROWS)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(len(names), H, D, generator=g)
    v = torch.randn(len(names), H, D, generator=g)
    target = k if where == "k" else v
    for b, name in enumerate(names):
        target[b, 0] = ROWS[name]
    return names, k, v


# ---- the stored form ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int4", "int8", "saw_int4_fp32meta"])
def test_stored_metadata_of_edge_vectors(fmt):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    names, k, v = _adversarial_batch("v")
    pool = _single_token_pool(spec, tf, v, k)
    views = pool_views(pool, D, spec.storage, spec.metadata_dtype)
    scale = views.scale[:len(names), 1, 0, 0].float()  # V, head 0, row 0 of block b
    vmin = views.vmin[:len(names), 1, 0, 0].float()
    codes = views.codes[:len(names), 1, 0, 0]
    if spec.storage == "int4":
        codes = unpack_int4(codes)
    for b, name in enumerate(names):
        s, m = float(scale[b]), float(vmin[b])
        if name in NONFINITE:
            assert math.isnan(s) and math.isnan(m), name
            assert int(codes[b].max()) == 0, name
            continue
        assert math.isfinite(s) and math.isfinite(m) and s >= 0, name
        assert -F16_MAX <= m <= F16_MAX and m + spec.levels * s <= F16_MAX * (1 + 2 ** -10) + s, name
        if name in ("equal", "equal_neg", "zeros", "const_beyond_fp16", "fp32_max"):
            assert s == 0.0 and int(codes[b].max()) == 0, name
        if name == "const_beyond_fp16":
            assert m == F16_MAX
        if name in ("fp32_max", "beyond_fp16"):
            assert m == -F16_MAX
    # the other head of every token is ordinary data: finite metadata
    assert bool(torch.isfinite(views.scale[:len(names), :, 1, 0].float()).all())


@pytest.mark.parametrize("fmt", list(SPECS))
def test_single_token_attention_reconstructs_edge_values(fmt):
    """Attention over one token returns its V (softmax weight exactly 1), so the output is the
    stored V: exact for constants, saturated beyond fp16, within half a step otherwise."""
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    names, k, v = _adversarial_batch("v")
    pool = _single_token_pool(spec, tf, v, k)
    q = torch.randn(len(names), HQ, D)
    out = _decode_single(spec, tf, pool, len(names), q)
    views = pool_views(pool, D, spec.storage, spec.metadata_dtype)
    exact = tf.v_matrix is None  # a V rotation is undone in fp32: not bit-exact
    for b, name in enumerate(names):
        o, x = out[b, :G], v[b, 0]  # query heads of KV head 0
        other = out[b, G:]
        assert bool(torch.isfinite(other).all()), f"{name}: head 1 poisoned by head 0"
        if name in NONFINITE:  # any non-finite element: the whole output of the queries that see it is nan
            assert bool(torch.isnan(o).all()), name
            continue
        if not spec.quantized:  # bf16 stores element-wise and never saturates
            assert torch.equal(o, x.bfloat16().float().expand_as(o)), name
            continue
        if _unspecified(spec, "v", name):
            continue
        assert bool(torch.isfinite(o).all()), name
        xs = x.clamp(-F16_MAX, F16_MAX)
        if exact and name in ("equal", "equal_neg", "zeros", "const_beyond_fp16", "fp32_max"):
            assert torch.equal(o, xs.expand_as(o)), name
            continue
        step = float(views.scale[b, 1, 0, 0])
        if exact:  # per element: half a step
            tol = step / 2 * (1 + 1e-5) + 1e-6 * float(xs.abs().max())
            err = float((o - xs).abs().max())
        else:  # rotated V: half a step per rotated channel, so sqrt(D) * step / 2 in L2 after un-rotating
            # saturation happens in the rotated domain: compare with R^T clamp(R x)
            xs = x.clamp(-3e38, 3e38) @ tf.v_matrix.T
            xs = xs.clamp(-F16_MAX, F16_MAX) @ tf.v_matrix
            tol = math.sqrt(D) * step / 2 * (1 + 1e-4) + 1e-5 * float(xs.norm())
            err = float((o - xs).norm(dim=-1).max())
        assert err <= tol, f"{name}: error {err} > {tol}"


@pytest.mark.parametrize("fmt", list(SPECS))
@pytest.mark.parametrize("where", ["k", "v"])
def test_nonfinite_token_poisons_exactly_the_queries_that_attend_it_decode(fmt, where):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    names, k, v = _adversarial_batch(where)
    pool = _single_token_pool(spec, tf, v, k)
    out = _decode_single(spec, tf, pool, len(names), torch.randn(len(names), HQ, D))
    for b, name in enumerate(names):
        head0_nan = torch.isnan(out[b, :G])
        if name in NONFINITE:
            assert bool(head0_nan.all()), name
        elif (spec.quantized or where == "v") and not _unspecified(spec, where, name):
            # quantized K saturates, so even 3e38 gives finite scores
            assert bool(torch.isfinite(out[b, :G]).all()), name
        assert bool(torch.isfinite(out[b, G:]).all()), f"{name}: other KV head poisoned"


def _nan_prefill(fmt, where, bad):
    """One 12-token sequence with a non-finite K or V at position 5 (head 0), plus a clean second
    sequence in the same batch; every position queries (prefill)."""
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    g = torch.Generator().manual_seed(11)
    n = 12
    k, v = torch.randn(2 * n, H, D, generator=g), torch.randn(2 * n, H, D, generator=g)
    (k if where == "k" else v)[5, 0, 3] = bad
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    slots = torch.cat([torch.arange(n), 2 * T + torch.arange(n)])
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8)
    ops.append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    q = torch.randn(2 * n, HQ, D, generator=g)
    lens = torch.tensor([n, n], dtype=torch.int32)
    starts = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    out = ops.prefill(q, pool, table, lens, starts, tf.q_matrix, tf.v_matrix, SCALE, spec.storage,
                      spec.metadata_dtype)
    return out, n


@pytest.mark.parametrize("fmt", ["int4", "saw_int4_v_signs", "bf16"])
@pytest.mark.parametrize("where", ["k", "v"])
def test_nonfinite_token_poisons_later_queries_only_other_heads_and_sequences_clean(fmt, where):
    out, n = _nan_prefill(fmt, where, float("nan"))
    assert bool(torch.isnan(out[5:n, :G]).all())  # queries at positions >= 5 attend it
    assert bool(torch.isfinite(out[:, G:]).all())  # KV head 1: its own vectors are clean
    assert bool(torch.isfinite(out[n:]).all())  # the other sequence


@pytest.mark.parametrize("fmt", ["int4", "saw_int4_v_signs", "bf16"])
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_token_leaves_causally_earlier_queries_finite(fmt, where, bad):
    """A query never sees a later token, so a non-finite later K or V cannot reach it (this is what
    makes chunked prefill and token-by-token decode agree)."""
    out, n = _nan_prefill(fmt, where, bad)
    assert bool(torch.isfinite(out[:5]).all())
    if not (fmt == "bf16" and where == "k" and not math.isnan(bad)):
        # (bf16 K has no metadata: an inf channel gives a score of +-inf, and -inf just drops the token)
        assert bool(torch.isnan(out[5:n, :G]).all())


# ---- determinism (reference path) -----------------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("fmt", ["saw_int4_v_signs", "int8", "bf16"])
def test_determinism_reference_same_inputs_same_bits(fmt):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    names, k, v = _adversarial_batch("k")
    q = torch.randn(len(names), HQ, D)
    runs = []
    for _ in range(2):
        pool = _single_token_pool(spec, tf, v, k)
        dec = _decode_single(spec, tf, pool, len(names), q)
        table = torch.arange(len(names), dtype=torch.int32)[None, :]  # one sequence: blocks 0..n-1, row 0 only
        lens = torch.tensor([1], dtype=torch.int32)
        pre = ops.prefill(q[:1], pool, table, lens, torch.tensor([0, 1], dtype=torch.int32), tf.q_matrix,
                          tf.v_matrix, SCALE, spec.storage, spec.metadata_dtype)
        runs.append((pool, dec, pre))
    for a, b in zip(*runs):
        assert torch.equal(_bits(a), _bits(b))


# ---- the Triton kernels under the interpreter ------------------------------------------------------
# the fixture `interp_kernels` (the kernel modules under the interpreter) lives in conftest.py


def _meta_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, except that any nan equals any nan (nan payloads are not part of the format)."""
    an, bn = torch.isnan(a), torch.isnan(b)
    return torch.equal(an, bn) and torch.equal(_bits(a[~an]), _bits(b[~bn]))


def _append_both(interp_kernels, spec, tf, k, v, slots):
    """The kernel and the reference append into two copies of one garbage-filled pool."""
    g = torch.Generator().manual_seed(5)
    nb = int(slots.max()) // T + 2
    p_ref = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, generator=g)
    p_ker = p_ref.clone()
    args = (tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    ref.append(p_ref, k, v, slots, *args)
    interp_kernels["append"].append(p_ker, k, v, slots, *args)
    return p_ref, p_ker


def _all_rows_kv():
    """K/V [n, H, D] holding every adversarial vector in both heads of K and V, in random slots."""
    rows = torch.stack(list(ROWS.values()))
    n = rows.shape[0]
    k = torch.stack([rows, rows.flip(0)], 1)
    v = torch.stack([rows.roll(3, 0), rows], 1)
    slots = torch.randperm(3 * T, generator=torch.Generator().manual_seed(2))[:n]
    return k, v, slots


@pytest.mark.parametrize("fmt, meta", [("int4", "fp16"), ("int4", "fp32"), ("int8", "fp16"), ("int8", "fp32")])
def test_kernel_append_edge_values_bit_identical(interp_kernels, fmt, meta):
    spec = KVCacheSpec(D, H, T, kv_format=fmt, metadata_dtype=meta)
    tf = build_layer_transform(spec)
    k, v, slots = _all_rows_kv()
    p_ref, p_ker = _append_both(interp_kernels, spec, tf, k, v, slots)
    vr, vk = (pool_views(p, D, spec.storage, meta) for p in (p_ref, p_ker))
    assert torch.equal(vr.codes, vk.codes)
    assert _meta_equal(vr.scale, vk.scale) and _meta_equal(vr.vmin, vk.vmin)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_append_edge_values_bf16_storage(interp_kernels, in_dtype):
    """bf16 storage is a plain conversion: bit-identical for bf16/fp16 input. For fp32 input the
    interpreter (not the GPU) converts to bf16 by truncation; there the kernel may sit one bf16 ulp
    toward zero from torch's round-to-nearest-even (tests/gpu checks exact bits on the device)."""
    spec = KVCacheSpec(D, H, T, kv_format="bf16")
    tf = build_layer_transform(spec)
    k, v, slots = _all_rows_kv()
    k, v = k.to(in_dtype), v.to(in_dtype)
    p_ref, p_ker = _append_both(interp_kernels, spec, tf, k, v, slots)
    a, b = p_ref.view(torch.bfloat16), p_ker.view(torch.bfloat16)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.isinf(a), torch.isinf(b)) or in_dtype == torch.float32
    # the interpreter's bf16 -> fp32 conversion mangles bf16 subnormals: compare normal values here
    keep = ~torch.isnan(a) & ~((a.float().abs() < 2.0 ** -126) & (a != 0))
    if in_dtype != torch.float32:
        assert torch.equal(_bits(a[keep]), _bits(b[keep]))
    else:
        ia, ib = a[keep].view(torch.int16).int(), b[keep].view(torch.int16).int()
        assert bool(((ia - ib).abs() <= 1).all())  # same sign, at most one ulp apart


@pytest.mark.parametrize("fmt", ["saw_int4", "saw_int4_v_signs", "saw_int4_fp32meta"])
def test_kernel_append_nonfinite_placement_with_transforms(interp_kernels, fmt):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    k, v, slots = _all_rows_kv()
    p_ref, p_ker = _append_both(interp_kernels, spec, tf, k, v, slots)
    vr, vk = (pool_views(p, D, spec.storage, spec.metadata_dtype) for p in (p_ref, p_ker))
    for a, b in ((vr.scale, vk.scale), (vr.vmin, vk.vmin)):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert not bool(torch.isinf(b.float()).any())
    blk, row = slots // T, slots % T
    nan_rows = torch.isnan(vk.scale[blk, :, :, row].float())  # [n, 2, H]
    assert int(nan_rows.sum()) > 0
    codes = vk.codes[blk, :, :, row]
    assert int(codes[nan_rows].max()) == 0  # non-finite vector: codes 0
    # everything outside the written slots is untouched (bytes of the garbage-filled pool)
    mask = torch.ones(p_ref.shape[0], T, dtype=torch.bool)
    mask[blk, row] = False
    untouched = lambda t: t.movedim(3, 1)[mask]  # noqa: E731  [NB, T, ...] rows not written
    assert torch.equal(untouched(vr.codes), untouched(vk.codes))
    assert torch.equal(_bits(untouched(vr.scale)), _bits(untouched(vk.scale)))


@pytest.mark.parametrize("fmt, where", [(f, w) for f in ["int8", "saw_int4_v_signs", "saw_int4_fp32meta", "bf16"]
                                        for w in ["k", "v"]])
def test_kernel_decode_nonfinite_placement(interp_kernels, fmt, where):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    names, k, v = _adversarial_batch(where)
    keep = [b for b, name in enumerate(names) if not _unspecified(spec, where, name)]
    names, k, v = [names[b] for b in keep], k[keep], v[keep]
    pool = _single_token_pool(spec, tf, v, k)
    n = len(names)
    q = torch.randn(n, HQ, D)
    args = (pool, torch.arange(n, dtype=torch.int32)[:, None], torch.ones(n, dtype=torch.int32), tf.q_matrix,
            tf.v_matrix, SCALE, spec.storage, spec.metadata_dtype)
    want = ref.decode(q, *args)
    got = interp_kernels["decode"].decode(q, *args)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-3 * max(1.0, float(want[fin].abs().max())))


def _kernel_nan_prefill(interp_kernels, fmt, where):
    spec = _spec(fmt)
    tf = build_layer_transform(spec)
    g = torch.Generator().manual_seed(11)
    n = 12
    k, v = torch.randn(2 * n, H, D, generator=g), torch.randn(2 * n, H, D, generator=g)
    (k if where == "k" else v)[5, 0, 3] = float("nan")
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    slots = torch.cat([torch.arange(n), 2 * T + torch.arange(n)])
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8)
    ref.append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    q = torch.randn(2 * n, HQ, D, generator=g)
    args = (pool, table, torch.tensor([n, n], dtype=torch.int32), torch.tensor([0, n, 2 * n], dtype=torch.int32),
            tf.q_matrix, tf.v_matrix, SCALE, spec.storage, spec.metadata_dtype)
    return interp_kernels["prefill"].prefill(q, *args), ref.prefill(q, *args), n


@pytest.mark.parametrize("fmt, where", [(f, w) for f in ["int4", "saw_int4_v_signs", "bf16"] for w in ["k", "v"]])
def test_kernel_prefill_nonfinite_placement(interp_kernels, fmt, where):
    """nan where the spec says (queries at or after the bad token, its KV head), nowhere else."""
    got, want, n = _kernel_nan_prefill(interp_kernels, fmt, where)
    assert bool(torch.isnan(got[5:n, :G]).all())
    assert bool(torch.isfinite(got[:, G:]).all()) and bool(torch.isfinite(got[n:]).all())
    assert bool(torch.isfinite(got[:5]).all())  # causally earlier queries (same tile) stay clean
    fin = torch.isfinite(want) & torch.isfinite(got)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fmt", ["int4", "saw_int4_v_signs"])
def test_kernel_prefill_nonfinite_value_leaves_earlier_queries_finite(interp_kernels, fmt):
    got, _, n = _kernel_nan_prefill(interp_kernels, fmt, "v")
    assert bool(torch.isfinite(got[:5]).all())


def test_kernel_determinism_interpreter(interp_kernels):
    spec = _spec("saw_int4_v_signs")
    tf = build_layer_transform(spec)
    k, v, slots = _all_rows_kv()
    pools = [_append_both(interp_kernels, spec, tf, k, v, slots)[1] for _ in range(2)]
    assert torch.equal(pools[0], pools[1])
    q = torch.randn(2, HQ, D)
    table = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    lens = torch.tensor([13, 5], dtype=torch.int32)
    outs = [interp_kernels["decode"].decode(q, pools[0], table, lens, tf.q_matrix, tf.v_matrix, SCALE, "int4", "fp16")
            for _ in range(2)]
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))
