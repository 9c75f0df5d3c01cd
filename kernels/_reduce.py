"""The merge of decode split partials (both decode backends write them), with the V rotation undone
when the layer rotates V.

A split writes, per query row, the log2-sum-exp of its scores and its normalised output; the merge
is sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse). It is latency-bound (a few hundred bytes
per split, up to ~100 splits), so it reads many splits per load (`merge_block` of the schedule).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _matmul_halves, _nan_rows_with_nonfinite


@triton.jit
def _merge_row(po_ptr, pl_ptr, base, num_splits, g, GP: tl.constexpr, D: tl.constexpr, SB: tl.constexpr,
               ONE_LOAD: tl.constexpr):
    """One query row merged over its splits, in halves ([D/2] fp32 x 2):
    sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max_s lse_s).

    Latency-bound work (a few hundred bytes per split, up to ~100 splits): SB splits are read per
    load, so a row costs a handful of memory round trips whatever the split count (a loop over
    single splits waited one round trip per split: 34 us for 88 splits on the H200)."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    sv = tl.arange(0, SB)
    if ONE_LOAD:  # num_splits <= SB: straight-line code, so unrolled rows overlap their loads
        live = sv < num_splits
        lse = tl.load(pl_ptr + (base + sv) * GP + g, mask=live, other=float("-inf"))
        m = tl.max(tl.where(lse == lse, lse, float("-inf")), 0)  # a nan lse stays nan in l and in w
        w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0))  # 0 for splits that saw no key
        l = tl.sum(w, 0)
        pp = po_ptr + ((base + sv) * GP + g)[:, None] * D + cols[None, :]
        acc_lo = tl.sum(w[:, None] * tl.load(pp, mask=live[:, None], other=0.0), 0)
        acc_hi = tl.sum(w[:, None] * tl.load(pp + HALF, mask=live[:, None], other=0.0), 0)
    else:
        # pass 1: running max and normaliser of the lse values
        m = tl.full([1], float("-inf"), tl.float32)
        l = tl.zeros([1], tl.float32)
        for s0 in range(0, num_splits, SB):
            lse = tl.load(pl_ptr + (base + s0 + sv) * GP + g, mask=s0 + sv < num_splits, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(tl.where(lse == lse, lse, float("-inf")), 0))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(lse - m_safe), 0)
            m = m_new
        m_safe = tl.where(m > float("-inf"), m, 0.0)
        # pass 2: weighted sum of the partial outputs, SB splits per load
        acc_lo = tl.zeros([HALF], tl.float32)
        acc_hi = tl.zeros([HALF], tl.float32)
        for s0 in range(0, num_splits, SB):
            live = s0 + sv < num_splits
            lse = tl.load(pl_ptr + (base + s0 + sv) * GP + g, mask=live, other=float("-inf"))
            w = tl.exp2(lse - m_safe)[:, None]
            pp = po_ptr + ((base + s0 + sv) * GP + g)[:, None] * D + cols[None, :]
            acc_lo += tl.sum(w * tl.load(pp, mask=live[:, None], other=0.0), 0)
            acc_hi += tl.sum(w * tl.load(pp + HALF, mask=live[:, None], other=0.0), 0)
    nz = l > 0
    inv = tl.where(nz, 1.0 / tl.where(nz, l, 1.0), 0.0)
    o_lo, o_hi = _nan_rows_with_nonfinite((acc_lo * inv)[None, :], (acc_hi * inv)[None, :])
    return tl.reshape(o_lo, [HALF]), tl.reshape(o_hi, [HALF])


@triton.jit
def _reduce_kernel(po_ptr, pl_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                   H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SB: tl.constexpr,
                   ONE_LOAD: tl.constexpr):
    """Merge the splits of one query head; grid (B, Hkv, G)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    g = tl.program_id(2)
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    o_lo, o_hi = _merge_row(po_ptr, pl_ptr, (b * H + h).to(tl.int64) * num_splits, num_splits, g, GP, D, SB,
                              ONE_LOAD)
    op = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g) * stride_oh + cols
    tl.store(op, o_lo.to(out_ptr.dtype.element_ty))
    tl.store(op + HALF, o_hi.to(out_ptr.dtype.element_ty))


@triton.jit
def _reduce_rotate_kernel(po_ptr, pl_ptr, vm_ptr, out_ptr, stride_ob, stride_oh, num_splits,
                          H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                          SB: tl.constexpr, ONE_LOAD: tl.constexpr, PREC: tl.constexpr, HB: tl.constexpr = 0):
    """Merge the splits of the G query heads of one KV head, then o @ v_matrix; grid (B, Hkv).
    One program per KV head reads the [D, D] matrix once for its G rows (a program per row made
    the L2 traffic of the matrix the cost at batch 64). The row merges are unrolled: with ONE_LOAD
    their loads are independent and in flight together."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    g = tl.arange(0, GP)
    base = (b * H + h).to(tl.int64) * num_splits
    o_lo = tl.zeros([GP, HALF], tl.float32)
    o_hi = tl.zeros([GP, HALF], tl.float32)
    for gi in tl.static_range(G):
        r_lo, r_hi = _merge_row(po_ptr, pl_ptr, base, num_splits, gi, GP, D, SB, ONE_LOAD)
        o_lo = tl.where(g[:, None] == gi, r_lo[None, :], o_lo)
        o_hi = tl.where(g[:, None] == gi, r_hi[None, :], o_hi)
    o_lo, o_hi = _matmul_halves(o_lo, o_hi, vm_ptr, False, D, PREC, HB)
    op = out_ptr + b.to(tl.int64) * stride_ob + (h * G + g)[:, None] * stride_oh + cols[None, :]
    tl.store(op, o_lo.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])
    tl.store(op + HALF, o_hi.to(out_ptr.dtype.element_ty), mask=(g < G)[:, None])


def merge_splits(partial_out, partial_lse, out, v_matrix, schedule, hadamard_block: int, prec: int) -> None:
    """The merge launch: one query row per program, or one KV head per program when it also rotates V
    back. partial_out [B, H, S, GP, D] / partial_lse [B, H, S, GP] fp32."""
    bsz, h = partial_out.shape[:2]
    g, gp, d = schedule.shape.group, schedule.group_pad, schedule.shape.head_dim
    splits, sb = schedule.splits, schedule.merge_block
    if v_matrix is None:
        _reduce_kernel[(bsz, h, g)](partial_out, partial_lse, out, out.stride(0), out.stride(1), splits,
                                    H=h, G=g, GP=gp, D=d, SB=sb, ONE_LOAD=splits <= sb,
                                    num_warps=schedule.merge_warps)
    else:
        _reduce_rotate_kernel[(bsz, h)](partial_out, partial_lse, v_matrix.contiguous(), out, out.stride(0),
                                        out.stride(1), splits, H=h, G=g, GP=gp, D=d, SB=sb, ONE_LOAD=splits <= sb,
                                        PREC=prec, HB=hadamard_block, num_warps=schedule.merge_warps)
