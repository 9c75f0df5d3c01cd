"""The paged ops (torch.ops.sawint4.*) against dense attention over the dequantized K/V."""

import pytest
import torch

import trtllm_sawint4.ops  # noqa: F401  (registers torch.ops.sawint4)
from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.layout import pool_views
from trtllm_sawint4.ops.reference import gather_kv

from helpers import SPECS, dense_attention, shuffled_table, slots_for, stored_kv

ops = torch.ops.sawint4


def _setup(fmt, head_dim, h, group, lengths, tpb=16, calibrated=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spec = KVCacheSpec(head_dim, h, tpb, **SPECS[fmt])
    mean = torch.randn(h, head_dim, generator=gen) if calibrated else None
    scl = torch.rand(h, head_dim, generator=gen) + 0.5 if calibrated else None
    tf = build_layer_transform(spec, mean, scl)
    num_blocks = sum(-(-n // tpb) for n in lengths) + 5
    pool = torch.zeros(spec.pool_shape(num_blocks), dtype=torch.uint8)
    table = shuffled_table(lengths, tpb, num_blocks, gen)
    ks = [torch.randn(n, h, head_dim, generator=gen) for n in lengths]
    vs = [torch.randn(n, h, head_dim, generator=gen) for n in lengths]
    k_all = torch.cat(ks) if ks else torch.zeros(0, h, head_dim)
    v_all = torch.cat(vs) if vs else torch.zeros(0, h, head_dim)
    ops.append(pool, k_all, v_all, slots_for(table, lengths, tpb), tf.k_matrix, tf.k_bias, tf.v_matrix,
               spec.storage, spec.metadata_dtype)
    return spec, tf, pool, table, ks, vs


@pytest.mark.parametrize("fmt", list(SPECS))
@pytest.mark.parametrize("head_dim, h, group", [(64, 2, 1), (64, 1, 3), (128, 2, 4), (256, 1, 8), (128, 3, 2)])
def test_decode_matches_dense(fmt, head_dim, h, group):
    lengths = [37, 1, 0, 16, 50]
    spec, tf, pool, table, ks, vs = _setup(fmt, head_dim, h, group, lengths)
    q = torch.randn(len(lengths), h * group, head_dim)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    out = ops.decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, 0.1, spec.storage, spec.metadata_dtype)
    for b, n in enumerate(lengths):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        want = dense_attention(spec, tf, q[b:b + 1], ks[b], vs[b], 0.1)[0]
        torch.testing.assert_close(out[b], want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fmt", ["bf16", "int4", "saw_int4", "saw_int4_v_signs"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_prefill_ragged_chunks_match_dense(fmt, calibrated):
    if calibrated and fmt == "bf16":
        pytest.skip("calibration applies to quantized formats")
    lengths, q_lens = [40, 7, 33], [12, 7, 1]
    spec, tf, pool, table, ks, vs = _setup(fmt, 64, 2, 3, lengths, tpb=8, calibrated=calibrated)
    q = torch.randn(sum(q_lens), 6, 64, dtype=torch.bfloat16)
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    out = ops.prefill(q, pool, table, torch.tensor(lengths, dtype=torch.int32), starts, tf.q_matrix, tf.v_matrix,
                      0.125, spec.storage, spec.metadata_dtype)
    assert out.dtype == torch.bfloat16
    for b in range(3):
        want = dense_attention(spec, tf, q[starts[b]:starts[b + 1]], ks[b], vs[b], 0.125)
        torch.testing.assert_close(out[starts[b]:starts[b + 1]].float(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("fmt", ["int4", "saw_int4", "bf16"])
def test_append_writes_exactly_the_quantized_vectors_and_nothing_else(fmt):
    lengths = [21, 9]
    spec, tf, pool, table, ks, vs = _setup(fmt, 128, 2, 1, lengths, tpb=16)
    views = pool_views(pool, 128, spec.storage, spec.metadata_dtype)
    used = set()
    for b, n in enumerate(lengths):
        want_k, want_v = stored_kv(spec, tf, ks[b], vs[b])
        for p in range(n):
            blk, row = int(table[b, p // 16]), p % 16
            used.add((blk, row))
        k, v = gather_kv(pool, table[b], n, 128, spec.storage, spec.metadata_dtype)
        torch.testing.assert_close(k, want_k, atol=1e-6, rtol=0)
        torch.testing.assert_close(v, want_v, atol=1e-6, rtol=0)
    # every row that was not written is still zero, codes and metadata alike
    for blk in range(pool.shape[0]):
        for row in range(16):
            if (blk, row) in used:
                continue
            assert int(views.codes[blk, :, :, row].view(torch.uint8).abs().sum()) == 0
            if views.scale is not None:
                assert float(views.scale[blk, :, :, row].float().abs().sum()) == 0


def test_chunked_prefill_equals_one_shot_prefill():
    """Appending and attending in chunks (extend over a cached prefix) gives the same result."""
    spec = KVCacheSpec(64, 2, 16, kv_format="saw_int4")
    tf = build_layer_transform(spec)
    k, v, q = torch.randn(45, 2, 64), torch.randn(45, 2, 64), torch.randn(45, 4, 64)
    table = torch.tensor([[3, 0, 5]], dtype=torch.int32)
    args = (tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16")
    pool = torch.zeros(spec.pool_shape(6), dtype=torch.uint8)
    ops.append(pool, k, v, slots_for(table, [45], 16), tf.k_matrix, None, None, "int4", "fp16")
    one = ops.prefill(q, pool, table, torch.tensor([45], dtype=torch.int32), torch.tensor([0, 45], dtype=torch.int32),
                      *args)
    pool2 = torch.zeros_like(pool)
    outs = []
    for lo, hi in [(0, 20), (20, 21), (21, 45)]:
        ops.append(pool2, k[lo:hi], v[lo:hi], slots_for(table, [hi], 16, [lo]), tf.k_matrix, None, None, "int4",
                   "fp16")
        outs.append(ops.prefill(q[lo:hi], pool2, table, torch.tensor([hi], dtype=torch.int32),
                                torch.tensor([0, hi - lo], dtype=torch.int32), *args))
    assert torch.equal(pool, pool2)
    torch.testing.assert_close(torch.cat(outs), one, atol=1e-6, rtol=0)


def test_decode_equals_prefill_with_one_query():
    spec, tf, pool, table, ks, vs = _setup("saw_int4", 64, 2, 2, [30, 12])
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([30, 12], dtype=torch.int32)
    dec = ops.decode(q, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.2, "int4", "fp16")
    pre = ops.prefill(q, pool, table, lens, torch.tensor([0, 1, 2], dtype=torch.int32), tf.q_matrix, tf.v_matrix,
                      0.2, "int4", "fp16")
    torch.testing.assert_close(dec, pre, atol=0, rtol=0)


def test_opcheck_and_compile():
    spec, tf, pool, table, ks, vs = _setup("saw_int4", 64, 2, 2, [20, 5])
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    args = (q, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16")
    torch.library.opcheck(ops.decode.default, args)
    key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    torch.library.opcheck(ops.append.default, (pool.clone(), key, value, torch.tensor([90, 91, 92]), tf.k_matrix,
                                               None, None, "int4", "fp16"))
    compiled = torch.compile(lambda *a: ops.decode(*a) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), ops.decode(*args) * 2)


def test_hadamard_block_declares_the_block_hadamard_form():
    """hadamard_block > 0 leaves the result of a layer transform unchanged, and a matrix that is not
    in the declared form is rejected (naming it) before anything is written."""
    spec, tf, pool, table, ks, vs = _setup("saw_int4_v_signs", 64, 2, 2, [30, 12], calibrated=True)
    r = tf.hadamard_block
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([30, 12], dtype=torch.int32)
    dense = ops.decode(q, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.2, "int4", "fp16")
    torch.testing.assert_close(ops.decode(q, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.2, "int4", "fp16", r),
                               dense, atol=0, rtol=0)
    garbled = tf.q_matrix.clone()
    garbled[0, 1, 0] += 0.5  # not the first row of its block
    with pytest.raises(ValueError, match="q_matrix"):
        ops.decode(q, pool, table, lens, garbled, tf.v_matrix, 0.2, "int4", "fp16", r)
    with pytest.raises(ValueError, match="v_matrix"):
        ops.prefill(q, pool, table, lens, torch.tensor([0, 1, 2], dtype=torch.int32), tf.q_matrix,
                    tf.v_matrix.T.contiguous() + 1, 0.2, "int4", "fp16", r)
    key, value = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    p1, p2 = pool.clone(), pool.clone()
    ops.append(p1, key, value, torch.tensor([90, 91, 92]), tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", "fp16")
    ops.append(p2, key, value, torch.tensor([90, 91, 92]), tf.k_matrix, tf.k_bias, tf.v_matrix, "int4", "fp16", r)
    assert torch.equal(p1, p2)
    with pytest.raises(ValueError, match="k_matrix"):
        ops.append(p2, key, value, torch.tensor([93, 94, 95]), torch.randn_like(tf.k_matrix), tf.k_bias,
                   tf.v_matrix, "int4", "fp16", r)
    assert torch.equal(p1, p2)
    torch.library.opcheck(ops.decode.default, (q, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.2, "int4", "fp16", r))


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window_matches_dense(window):
    """window > 0: a query at position p sees p - window < j <= p (transformers' kv_idx > q_idx - window),
    in decode and in chunked prefill; a window covering the whole context is full attention."""
    lengths = [37, 1, 20]
    spec, tf, pool, table, ks, vs = _setup("saw_int4_v_signs", 64, 2, 2, lengths)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(3, 4, 64)
    out = ops.decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16", 0, window)
    full = ops.decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16")
    for b in range(3):
        want = dense_attention(spec, tf, q[b:b + 1], ks[b], vs[b], 0.125, window)
        torch.testing.assert_close(out[b:b + 1], want, atol=2e-5, rtol=2e-5)
    assert (window >= 37) == torch.allclose(out[0], full[0])  # the window changes what the long sequence sees
    q_lens = [10, 1, 20]
    starts = torch.tensor([0, 10, 11, 31], dtype=torch.int32)
    qp = torch.randn(31, 4, 64)
    outp = ops.prefill(qp, pool, table, seq_lens, starts, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16", 0, window)
    for b, n in enumerate(q_lens):
        lo = int(starts[b])
        want = dense_attention(spec, tf, qp[lo:lo + n], ks[b], vs[b], 0.125, window)
        torch.testing.assert_close(outp[lo:lo + n], want, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="window"):
        ops.decode(q, pool, table, seq_lens, tf.q_matrix, tf.v_matrix, 0.125, "int4", "fp16", 0, -1)
