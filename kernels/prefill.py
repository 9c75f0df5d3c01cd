"""Paged prefill / chunked-prefill attention over the quantized cache (flash-attention style).

Grid (tile slots, Hq): tile slot i is mapped on the device to (sequence, query tile) by a prefix sum
of cdiv(q_len_b, BLOCK_M) over query_start_loc, so the host never reads the batch metadata; the
grid has cdiv(Nq, BLOCK_M) + B slots (an upper bound), and surplus programs do nothing.
Query j of sequence b sits at position seq_lens[b] - q_len + j (causal, bottom-right aligned).
The cached prefix is dequantized inside the loop, folded into the two dot products like decode:
scores = s_t * (q . c_t) + m_t * sum(q);  P V = (P * s) @ C + P @ m (with a V rotation
(P * s) @ (m / s), P * s rounded once: _tiles._v_weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm_sawint4.spec import StorageFormat

from ._common import LOG2E, _nan_rows_with_nonfinite, _transform_rows, pool_pointers, triton_dtype
from ._tiles import _code_offset, _load_kv_tile, _tile_block_ids, _tile_rows, _v_weights
from .config import DEFAULT, PrefillConfig
from .schedule import dot_dtype


@triton.jit
def _prefill_tile(q_lo, q_hi, qsum, m_i, l_i, acc_lo, acc_hi, pool_ptr, poolb_ptr, poolf_ptr, blk, h, n0, pos, seq_len,
                  MASK: tl.constexpr, H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, REGION: tl.constexpr,
                  STORAGE: tl.constexpr, META32: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
                  ASM: tl.constexpr, WINDOW: tl.constexpr = 0, EXACT_V: tl.constexpr = False):
    tok = n0 + tl.arange(0, BLOCK_N)
    tmask = tok < seq_len
    row = _tile_rows(n0, BLOCK_N, T)
    kbase = (blk.to(tl.int64) * 2 * H + h) * REGION
    k_lo, k_hi, ks, km = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase, row, tmask, D, T, STORAGE, META32, DT, ASM)
    v_lo, v_hi, vs, vmn = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase + H * REGION, row, tmask, D, T, STORAGE, META32, DT, ASM)
    off = _code_offset(STORAGE, DT)
    s = tl.dot(q_lo, tl.trans(k_lo))
    s = tl.dot(q_hi, tl.trans(k_hi), s)
    if STORAGE != 0:
        s = s * ks[None, :] + qsum[:, None] * (km - off * ks)[None, :]
    if MASK:
        vis = (tok[None, :] <= pos[:, None]) & tmask[None, :]
        if WINDOW > 0:  # query at p sees p - WINDOW < j <= p
            vis = vis & (tok[None, :] > pos[:, None] - WINDOW)
        s = tl.where(vis, s, float("-inf"))
        # A non-finite V (quantized: stored with nan metadata; bf16: an inf/nan element) is kept out
        # of the rows that cannot see it (their zero weight times it would leak nan into them) and
        # the rows that see it become nan, like the reference. Off the diagonal every row sees
        # every key: there the product itself carries the non-finite value (see
        # _nan_rows_with_nonfinite at the end).
        if STORAGE != 0:
            v_bad = vs != vs
            vs = tl.where(v_bad, 0.0, vs)
            vmn = tl.where(v_bad, 0.0, vmn)
        else:
            v_bad = (tl.min((tl.abs(v_lo.to(tl.float32)) < float("inf")).to(tl.int32), 1) == 0) | \
                    (tl.min((tl.abs(v_hi.to(tl.float32)) < float("inf")).to(tl.int32), 1) == 0)
            v_lo = tl.where(v_bad[:, None], 0.0, v_lo).to(v_lo.dtype)
            v_hi = tl.where(v_bad[:, None], 0.0, v_hi).to(v_hi.dtype)
        sees_bad = tl.max((vis & v_bad[None, :]).to(tl.int32), 1) > 0
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if STORAGE != 0:
        if EXACT_V:  # a V rotation follows: the min gets its codes' rounded weight (see decode_triton._attend_tile)
            pd, pm = _v_weights(p, vs, vmn, off, DT)
        else:
            pd = (p * vs[None, :]).to(DT)
            pm = tl.sum(p * vmn[None, :], 1) - off * tl.sum(pd.to(tl.float32), 1)
        acc_lo = acc_lo * alpha[:, None] + pm[:, None]
        acc_hi = acc_hi * alpha[:, None] + pm[:, None]
    else:
        pd = p.to(DT)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
    acc_lo = tl.dot(pd, v_lo, acc_lo)
    acc_hi = tl.dot(pd, v_hi, acc_hi)
    if MASK:
        acc_lo = tl.where(sees_bad[:, None], float("nan"), acc_lo)
        acc_hi = tl.where(sees_bad[:, None], float("nan"), acc_hi)
    return m_new, l_i, acc_lo, acc_hi


# B (the step's sequence count) and stride_bt (its block-table width) change every step: specialising on
# them (== 1, % 16 == 0) would compile new variants mid-serving (kernels/variants.py)
@triton.jit(do_not_specialize=["B", "stride_bt"])
def _prefill_kernel(q_ptr, pool_ptr, poolb_ptr, poolf_ptr, bt_ptr, sl_ptr, qsl_ptr, qm_ptr, vm_ptr, out_ptr, scratch_ptr,
                    stride_qn, stride_qh, stride_on, stride_oh, stride_bt, qk_scale, B,
                    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, T: tl.constexpr, REGION: tl.constexpr,
                    STORAGE: tl.constexpr, META32: tl.constexpr, HAS_QM: tl.constexpr, HAS_VM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr, HB: tl.constexpr = 0, WINDOW: tl.constexpr = 0):
    """WINDOW > 0: query j (position p) sees only positions p - WINDOW < k <= p; the key tiles then run
    from the window of the tile's first query, all through the masked path."""
    pid = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)

    # (sequence, query tile) of this program, from query_start_loc on the device
    bi = tl.arange(0, B_PAD)
    bmask = bi < B
    st = tl.load(qsl_ptr + bi, mask=bmask, other=0)
    en = tl.load(qsl_ptr + bi + 1, mask=bmask, other=0)
    nt = tl.where(bmask, tl.cdiv(en - st, BLOCK_M), 0)
    cum = tl.cumsum(nt, 0)
    seq = tl.sum((cum <= pid).to(tl.int32), 0)
    valid = seq < B
    sel = bi == seq
    tile = pid - tl.sum(tl.where(sel, cum - nt, 0), 0)
    q_start = tl.sum(tl.where(sel, st, 0), 0)
    q_len = tl.sum(tl.where(sel, en - st, 0), 0)
    seq_len = tl.load(sl_ptr + seq, mask=valid, other=0)

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    # (a scalar condition folded into the bound, not `& valid`: Triton 3.9's interpreter gives a scalar
    # comparison broadcast against a block an int32 mask, which tl.load rejects)
    rmask = i < tl.where(valid, q_len, 0)
    pos = seq_len - q_len + i
    qrow = (q_start + i).to(tl.int64)
    qr = q_ptr + qrow * stride_qn + hq * stride_qh
    if HAS_QM:
        q_lo, q_hi = _transform_rows(qr, rmask, qm_ptr + h * D * D, True, D, 16, PREC, HB)
    else:
        q_lo = tl.load(qr[:, None] + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        q_hi = tl.load(qr[:, None] + HALF + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    q_lo = (q_lo * qk_scale).to(DT)
    q_hi = (q_hi * qk_scale).to(DT)
    qsum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, HALF], tl.float32)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    # keys visible to every row of the tile: [0, first position]; then the causal diagonal part
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1
    pos_first = seq_len - q_len + tile * BLOCK_M
    kv_end = tl.where(valid & (last_row >= tile * BLOCK_M), seq_len - q_len + last_row + 1, 0)
    n_full = tl.where(valid, (pos_first + 1) // BLOCK_N, 0)
    n_full = tl.minimum(n_full, tl.cdiv(kv_end, BLOCK_N))
    if WINDOW > 0:
        n_start = tl.where(valid, tl.maximum(pos_first - WINDOW + 1, 0) // BLOCK_N, 0)
        blk_next = _tile_block_ids(bt_row, n_start * BLOCK_N, kv_end, BLOCK_N, T)
        for n in range(n_start, tl.cdiv(kv_end, BLOCK_N)):
            blk = blk_next
            blk_next = _tile_block_ids(bt_row, (n + 1) * BLOCK_N, kv_end, BLOCK_N, T)
            m_i, l_i, acc_lo, acc_hi = _prefill_tile(q_lo, q_hi, qsum, m_i, l_i, acc_lo, acc_hi, pool_ptr, poolb_ptr,
                                                     poolf_ptr, blk, h, n * BLOCK_N, pos, seq_len, True, H, D, T,
                                                     REGION, STORAGE, META32, BLOCK_N, DT, PREC != 0, WINDOW, HAS_VM)
    else:
        # block ids one tile ahead (see kernels/decode_triton.py: keeps the tile loads multi-buffered)
        blk_next = _tile_block_ids(bt_row, 0, kv_end, BLOCK_N, T)
        for n in range(0, n_full):
            blk = blk_next
            blk_next = _tile_block_ids(bt_row, (n + 1) * BLOCK_N, kv_end, BLOCK_N, T)
            m_i, l_i, acc_lo, acc_hi = _prefill_tile(q_lo, q_hi, qsum, m_i, l_i, acc_lo, acc_hi, pool_ptr, poolb_ptr, poolf_ptr, blk,
                                                     h, n * BLOCK_N, pos, seq_len, False, H, D, T, REGION, STORAGE,
                                                     META32, BLOCK_N, DT, PREC != 0, 0, HAS_VM)
        for n in range(n_full, tl.cdiv(kv_end, BLOCK_N)):
            blk = blk_next
            blk_next = _tile_block_ids(bt_row, (n + 1) * BLOCK_N, kv_end, BLOCK_N, T)
            m_i, l_i, acc_lo, acc_hi = _prefill_tile(q_lo, q_hi, qsum, m_i, l_i, acc_lo, acc_hi, pool_ptr, poolb_ptr, poolf_ptr, blk,
                                                     h, n * BLOCK_N, pos, seq_len, True, H, D, T, REGION, STORAGE,
                                                     META32, BLOCK_N, DT, PREC != 0, 0, HAS_VM)

    nz = l_i > 0
    inv = tl.where(nz, 1.0 / tl.where(nz, l_i, 1.0), 0.0)
    o_lo, o_hi = _nan_rows_with_nonfinite(acc_lo * inv[:, None], acc_hi * inv[:, None])
    if HAS_VM:
        # o = o' @ V: stage o' (fp32) in this program's own rows of a scratch buffer, then multiply in
        # chunks read back from it (keeps the [D, D] matrix out of registers)
        sr = scratch_ptr + (qrow * (H * G) + hq) * D
        tl.store(sr[:, None] + cols[None, :], o_lo, mask=rmask[:, None])
        tl.store(sr[:, None] + HALF + cols[None, :], o_hi, mask=rmask[:, None])
        tl.debug_barrier()
        o_lo, o_hi = _transform_rows(sr, rmask, vm_ptr, False, D, 16, PREC, HB)
    op = out_ptr + qrow[:, None] * stride_on + hq * stride_oh + cols[None, :]
    tl.store(op, o_lo.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(op + HALF, o_hi.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


#: the fewest sequences a prefill launch is padded to (see prefill_batch_pad)
MIN_BATCH_PAD = 16


def prefill_batch_pad(num_seqs: int) -> int:
    """B_PAD, the width of each program's search for its sequence: a constexpr, so every distinct value is
    a separate compiled kernel. Powers of two from MIN_BATCH_PAD keep the set small (16, 32, 64, ... up to
    the engine's batch); a wider search than needed costs a few masked loads per program."""
    return max(MIN_BATCH_PAD, triton.next_power_of_2(num_seqs))


#: tile the interpreter runs (small shapes; its tl.dot is slow): (BLOCK_M, BLOCK_N, num_warps, num_stages)
INTERP_TILE = (16, 16, 4, 1)


def prefill(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale: float, storage: str,
            meta_dtype: str, hadamard_block: int = 0, window: int = 0, *, config: PrefillConfig | None = None):
    """Same signature and result as trtllm_sawint4.ops.reference.prefill; `config`: the launch tiles
    (DEFAULT.prefill when None)."""
    config = config or DEFAULT.prefill
    nq, hq, d = query.shape
    h = pool.shape[2]
    g = hq // h
    bsz = block_table.shape[0]
    fmt = StorageFormat(storage, meta_dtype)
    t = fmt.tokens_per_block(d, pool.shape[-1])
    # rows no sequence claims stay zero, like the reference
    out = torch.zeros_like(query)
    if nq == 0 or bsz == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    interp = pool.device.type == "cpu"
    tile = config.tile(d, storage)
    block_m, block_n, warps, stages = (tile.block_m, tile.block_n, tile.num_warps, tile.num_stages)
    if interp:
        block_m, block_n, warps, stages = INTERP_TILE
    dt = triton_dtype(dot_dtype(query.dtype, storage, interp, config.interp_dot_dtype))
    dummy = seq_lens
    grid = (triton.cdiv(nq, block_m) + bsz, hq)
    scratch = torch.empty((nq, hq, d), dtype=torch.float32, device=query.device) if v_matrix is not None else out
    _prefill_kernel[grid](
        query, *pool_pointers(pool), block_table, seq_lens, query_start_loc,
        q_matrix.contiguous() if q_matrix is not None else dummy,
        v_matrix.contiguous() if v_matrix is not None else dummy, out, scratch,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        float(scale) * LOG2E, bsz,
        H=h, G=g, D=d, T=t, REGION=pool.shape[-1], STORAGE=fmt.kernel_code, META32=fmt.meta32,
        HAS_QM=q_matrix is not None, HAS_VM=v_matrix is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        B_PAD=prefill_batch_pad(bsz), DT=dt, PREC=0 if interp else 1, HB=hadamard_block, WINDOW=window,
        num_warps=warps, num_stages=stages,
    )
    return out
