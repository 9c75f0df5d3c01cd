"""Paged decode attention over the quantized cache, the Triton backend: split-KV kernel.

Grid (B, H, S): one program holds all G query heads of KV head h (padded to GP >= 16 rows for
tl.dot) and walks tiles of BLOCK_N tokens of its split of the context. Each KV byte is read once.
Dequantization is folded into the dot products (codes are exact in bf16/fp16):

    q . k_t   = s_t * (q . c_t) + m_t * sum(q)
    sum_t p_t v_t = (p * s) @ C + (p . m)                (with a V rotation: (p * s) . (m / s), _tiles._v_weights)

so the codes feed the tensor cores directly. Splits write partial outputs that kernels/_reduce.py
merges. The schedule (split count, tile, warps, ...) comes from kernels/schedule.py: host-side
shapes only, never seq_lens, so no host sync and the launch is graph-capturable.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LOG2E, _nan_rows_with_nonfinite, _transform_rows, pool_pointers, triton_dtype
from ._reduce import merge_splits
from ._tiles import (_code_offset, _code_values, _kv_meta_values, _load_codes, _load_kv_meta, _load_kv_tile, _opaque,
                     _tile_block_ids, _tile_rows, _v_weights)


@triton.jit
def _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn, tmask, m_i, l_i, acc_lo, acc_hi,
                 STORAGE: tl.constexpr, DT: tl.constexpr, EXACT_V: tl.constexpr):
    """One tile of the online softmax: the updated (m_i, l_i, acc_lo, acc_hi). EXACT_V (with a V
    rotation): each V token's min gets its codes' rounded weight (_tiles._v_weights), because undoing
    the rotation would sum the one-signed rounding error of the cheaper fold into one output channel;
    without a rotation that error stays per channel (~2^-9 of p * s * c) and the cheaper fold is kept."""
    off = _code_offset(STORAGE, DT)
    s = tl.dot(q_lo, tl.trans(k_lo))
    s = tl.dot(q_hi, tl.trans(k_hi), s)
    if STORAGE != 0:
        # q.(c + off) * s + (m - off * s) * sum(q): q is rounded once, so off cancels exactly
        s = s * ks[None, :] + qsum[:, None] * (km - off * ks)[None, :]
    s = tl.where(tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if STORAGE != 0:
        if EXACT_V:
            pd, pm = _v_weights(p, vs, vmn, off, DT)
        else:
            pd = (p * vs[None, :]).to(DT)
            # (p*s rounded) @ (c + off) - off * sum(p*s rounded) + p . m
            pm = tl.sum(p * vmn[None, :] - off * pd.to(tl.float32), 1)
        acc_lo = acc_lo * alpha[:, None] + pm[:, None]
        acc_hi = acc_hi * alpha[:, None] + pm[:, None]
    else:
        pd = p.to(DT)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
    acc_lo = tl.dot(pd, v_lo, acc_lo)
    acc_hi = tl.dot(pd, v_hi, acc_hi)
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def _decode_kernel(q_ptr, pool_ptr, poolb_ptr, poolf_ptr, bt_ptr, sl_ptr, qm_ptr, vm_ptr, out_ptr, po_ptr, pl_ptr,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_bt, qk_scale, tiles_per_split,
                   max_tokens,
                   H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                   REGION: tl.constexpr, STORAGE: tl.constexpr, META32: tl.constexpr, HAS_QM: tl.constexpr,
                   HAS_VM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr, Q_CHUNK: tl.constexpr = 16, ONE_TILE: tl.constexpr = False,
                   WINDOW: tl.constexpr = 0):
    """max_tokens: block-table width x T; the block-id loads do not wait for seq_len's. The q matrix
    is read dense even when declared in block-Hadamard form: on the H200 the dense variant measured
    faster at most bench points (docs/kernels.md); only the V merge (_reduce_rotate_kernel) uses the
    block-Hadamard form. ONE_TILE (tiles_per_split == 1): the split's only tile is loaded before the
    q transform, so that its memory latency overlaps the transform's instead of following it (a
    pipelined loop issues its first loads after it). WINDOW > 0: the query (position seq_len - 1) sees
    only its last WINDOW positions; the splits then cover the tiles from the window's first one
    (tile (seq_len - WINDOW) // BLOCK_N), whose earlier tokens are masked."""
    # the V rotation is applied by the reduce kernel: the unsplit path has none
    tl.static_assert(SPLIT or not HAS_VM, "decode with v_matrix needs the split path (SPLIT=True)")
    b = tl.program_id(0)
    num_splits = tl.num_programs(2)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    g = tl.arange(0, GP)
    gmask = g < G
    seq_len = tl.load(sl_ptr + b)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    if WINDOW > 0:
        first = tl.maximum(seq_len - WINDOW, 0)  # the first position the query sees
        t_first = first // BLOCK_N
    if ONE_TILE:
        if WINDOW > 0:
            n0 = (t_first + sp) * BLOCK_N
            tok0 = n0 + tl.arange(0, BLOCK_N)
            tmask0 = (tok0 < seq_len) & (tok0 >= first)
        else:
            n0 = sp * BLOCK_N
            tmask0 = sp * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
        blk0 = _tile_block_ids(bt_row, n0, max_tokens, BLOCK_N, T).to(tl.int64)
        kbase0 = (blk0 * 2 * H + h) * REGION
        row0 = _tile_rows(n0, BLOCK_N, T)
        k0, k1 = _load_codes(pool_ptr, poolb_ptr, kbase0, row0, tmask0, D, STORAGE)
        v0, v1 = _load_codes(pool_ptr, poolb_ptr, kbase0 + H * REGION, row0, tmask0, D, STORAGE)
        kmeta0 = _load_kv_meta(poolf_ptr, kbase0, row0, tmask0, D, T, STORAGE, META32)
        vmeta0 = _load_kv_meta(poolf_ptr, kbase0 + H * REGION, row0, tmask0, D, T, STORAGE, META32)

    qrow = q_ptr + b.to(tl.int64) * stride_qb + (h * G + g) * stride_qh
    if HAS_QM:
        # Q_CHUNK channels of the matrix per step: fewer, larger L2 round trips
        q_lo, q_hi = _transform_rows(qrow, gmask, qm_ptr + h * D * D, True, D, Q_CHUNK, PREC)
    else:
        q_lo = tl.load(qrow[:, None] + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
        q_hi = tl.load(qrow[:, None] + HALF + cols[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    q_lo = (q_lo * qk_scale).to(DT)
    q_hi = (q_hi * qk_scale).to(DT)
    qsum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)

    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc_lo = tl.zeros([GP, HALF], tl.float32)
    acc_hi = tl.zeros([GP, HALF], tl.float32)
    if ONE_TILE:
        # every use of the early loads below (a layout conversion through shared memory included)
        # waits for them: keep those uses after the transform
        k0, v0, kmeta0, vmeta0 = (_opaque(k0, PREC != 0), _opaque(v0, PREC != 0), _opaque(kmeta0, PREC != 0),
                                  _opaque(vmeta0, PREC != 0))
        if STORAGE != 2:  # (INT4: x1 is x0)
            k1, v1 = _opaque(k1, PREC != 0), _opaque(v1, PREC != 0)
        k_lo, k_hi = _code_values(k0, k1, STORAGE, DT, PREC != 0)
        v_lo, v_hi = _code_values(v0, v1, STORAGE, DT, PREC != 0)
        ks, km = _kv_meta_values(kmeta0, row0, STORAGE, META32)
        vs, vmn = _kv_meta_values(vmeta0, row0, STORAGE, META32)
        if n0 < seq_len:  # (a tile of masked tokens alone would turn the softmax state into nan)
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn,
                                                    tmask0, m_i, l_i, acc_lo, acc_hi, STORAGE, DT, HAS_VM)
    else:
        n_tiles = tl.cdiv(seq_len, BLOCK_N)
        if WINDOW > 0:
            t0 = t_first + sp * tiles_per_split
        else:
            t0 = sp * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
        # Block ids are read one tile ahead into a loop-carried value: a code load whose address comes
        # from a load in the same iteration gets a single pipeline buffer from Triton's pipeliner. Ids
        # past seq_len (inside the table row) may be read but only address masked-off tokens.
        id_limit = tl.minimum(max_tokens, (t0 + tiles_per_split) * BLOCK_N)
        blk_next = _tile_block_ids(bt_row, t0 * BLOCK_N, id_limit, BLOCK_N, T)
        for t in range(t0, t1):
            if WINDOW > 0:  # (every tile visited holds a visible token: the window's first, the last, or all)
                tok = t * BLOCK_N + tl.arange(0, BLOCK_N)
                tmask = (tok < seq_len) & (tok >= first)
            else:
                tmask = t * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
            blk = blk_next.to(tl.int64)
            blk_next = _tile_block_ids(bt_row, (t + 1) * BLOCK_N, id_limit, BLOCK_N, T)
            row = _tile_rows(t * BLOCK_N, BLOCK_N, T)
            kbase = (blk * 2 * H + h) * REGION
            k_lo, k_hi, ks, km = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase, row, tmask, D, T, STORAGE,
                                               META32, DT, PREC != 0)
            v_lo, v_hi, vs, vmn = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase + H * REGION, row, tmask, D, T,
                                                STORAGE, META32, DT, PREC != 0)
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn, tmask,
                                                    m_i, l_i, acc_lo, acc_hi, STORAGE, DT, HAS_VM)

    nz = l_i > 0
    inv = tl.where(nz, 1.0 / tl.where(nz, l_i, 1.0), 0.0)
    o_lo, o_hi = _nan_rows_with_nonfinite(acc_lo * inv[:, None], acc_hi * inv[:, None])
    if not SPLIT:  # (with a V rotation the wrapper always splits: the reduce kernel rotates)
        op = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + cols[None, :]
        tl.store(op, o_lo.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        tl.store(op + HALF, o_hi.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
    else:
        lse = tl.where(nz, m_i + tl.log2(tl.where(nz, l_i, 1.0)), float("-inf"))
        idx = (b * H + h) * num_splits + sp
        tl.store(pl_ptr + idx.to(tl.int64) * GP + g, lse, mask=gmask)  # only the G real rows
        pp = po_ptr + (idx.to(tl.int64) * GP + g)[:, None] * D + cols[None, :]
        tl.store(pp, o_lo, mask=gmask[:, None])
        tl.store(pp + HALF, o_hi, mask=gmask[:, None])


def run(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, fmt, tokens_per_block, hadamard_block, schedule,
        out, partial_out, partial_lse) -> None:
    """One decode launch (plus the merge) as `schedule` says; writes `out`. fmt: spec.StorageFormat."""
    bsz, hq, d = query.shape
    h = pool.shape[2]
    interp = pool.device.type == "cpu"
    prec = 0 if interp else 1
    if schedule.merges:
        po, pl = partial_out, partial_lse
    else:
        po = pl = out
    dummy = seq_lens
    qm = q_matrix.contiguous() if q_matrix is not None else dummy
    vm = v_matrix.contiguous() if v_matrix is not None else dummy
    _decode_kernel[(bsz, h, schedule.splits)](
        query, *pool_pointers(pool), block_table, seq_lens, qm, vm, out, po, pl,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        float(scale) * LOG2E, schedule.tiles_per_split, schedule.shape.max_tokens,
        H=h, G=hq // h, GP=schedule.group_pad, D=d, T=tokens_per_block, REGION=pool.shape[-1],
        STORAGE=fmt.kernel_code, META32=fmt.meta32, HAS_QM=q_matrix is not None, HAS_VM=v_matrix is not None,
        SPLIT=schedule.merges, BLOCK_N=schedule.block_n, DT=triton_dtype(schedule.dot_dtype), PREC=prec,
        Q_CHUNK=schedule.q_chunk, ONE_TILE=schedule.one_tile, WINDOW=schedule.shape.window,
        num_warps=schedule.num_warps, num_stages=schedule.num_stages, maxnreg=schedule.maxnreg,
    )
    if schedule.merges:
        merge_splits(po, pl, out, v_matrix, schedule, hadamard_block, prec)
