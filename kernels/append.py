"""Fused append: transform + quantize + pack + store of new K/V tokens, one launch for any N.

Grid (cdiv(N, BLOCK_N), H): one program writes BLOCK_N tokens of one KV head, K and V.
The quantizer follows trtllm_sawint4/quant.py bit for bit (fp16 min rounded down, scale rounded
up, exact IEEE division); only the transform's summation order differs from the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm_sawint4.spec import StorageFormat

from ._common import _round_f16, _to_bf16_rne, _transform_rows
from .config import DEFAULT, AppendConfig


@triton.jit
def _div_rn_by(a, b, rcp, INTERP: tl.constexpr):
    """a / b correctly rounded, given rcp = 1 / b correctly rounded (Markstein: q within 1 ulp,
    exact residual by fma, one correction), for a >= 0, b > 0 normal, no overflow. The interpreter
    has no fused multiply-add (it rounds twice), so it divides; tests/test_quant_division.py checks
    the identity itself."""
    if INTERP:
        return tl.math.div_rn(a, tl.broadcast_to(b, a.shape))
    q = a * rcp
    r = tl.fma(-q, b, a)
    return tl.fma(r, rcp, q)


@triton.jit
def _append_one(pool_ptr, poolb_ptr, poolh_ptr, poolf_ptr, x_ptr, stride_n, stride_h, m_ptr, m_stride_h, b_ptr, rows, rmask, blk, row, h,
                KV: tl.constexpr, HAS_M: tl.constexpr, HAS_B: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                T: tl.constexpr, REGION: tl.constexpr, STORAGE: tl.constexpr, META32: tl.constexpr,
                PREC: tl.constexpr, HB: tl.constexpr = 0):
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    xrow = x_ptr + rows.to(tl.int64) * stride_n + h * stride_h
    if HAS_M:
        y_lo, y_hi = _transform_rows(xrow, rmask, m_ptr + h * m_stride_h, True, D, 16, PREC, HB)
    else:
        xb = xrow[:, None] + cols[None, :]
        y_lo = tl.load(xb, mask=rmask[:, None], other=0.0).to(tl.float32)
        y_hi = tl.load(xb + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    if HAS_B:
        bb = b_ptr + h * D + cols
        y_lo = y_lo + tl.load(bb)[None, :]
        y_hi = y_hi + tl.load(bb + HALF)[None, :]
    base = ((blk * 2 + KV) * H + h) * REGION  # int64 [BLOCK_N]
    if STORAGE == 0:  # bf16: plain copy
        p = poolb_ptr + (base // 2 + row * D)[:, None] + cols[None, :]
        if PREC == 0:  # interpreter
            tl.store(p, _to_bf16_rne(y_lo), mask=rmask[:, None])
            tl.store(p + HALF, _to_bf16_rne(y_hi), mask=rmask[:, None])
        else:
            tl.store(p, y_lo.to(tl.bfloat16), mask=rmask[:, None])
            tl.store(p + HALF, y_hi.to(tl.bfloat16), mask=rmask[:, None])
    else:
        if STORAGE == 2:
            LEVELS: tl.constexpr = 15
            CB: tl.constexpr = D // 2
        else:
            LEVELS: tl.constexpr = 255
            CB: tl.constexpr = D
        fin = tl.minimum(tl.min((tl.abs(y_lo) < float("inf")).to(tl.int32), 1),
                         tl.min((tl.abs(y_hi) < float("inf")).to(tl.int32), 1)) > 0
        # saturate; -0.0 -> +0.0 so that min/max (which may return either zero) give one answer
        y_lo = tl.where(fin[:, None] & (y_lo != 0.0), tl.minimum(tl.maximum(y_lo, -65504.0), 65504.0), 0.0)
        y_hi = tl.where(fin[:, None] & (y_hi != 0.0), tl.minimum(tl.maximum(y_hi, -65504.0), 65504.0), 0.0)
        mn = tl.minimum(tl.min(y_lo, 1), tl.min(y_hi, 1))
        mx = tl.maximum(tl.max(y_lo, 1), tl.max(y_hi, 1))
        if not META32:
            mn = _round_f16(mn, False)
        sc = tl.math.div_rn(mx - mn, tl.full(mn.shape, LEVELS, tl.float32))
        if not META32:
            sc = _round_f16(sc, True)
        pos = sc > 0
        safe = tl.where(pos, sc, 1.0)
        # code = floor((y - mn) / sc + 0.5) with the IEEE quotient, by one reciprocal per token
        # (_div_rn_by). 0 <= y - mn <= LEVELS * sc, so the code needs no clamping.
        k = tl.where(safe < 2.0 ** -60, 2.0 ** 64, 1.0)  # scale tiny (subnormal) scales: exact, keeps 1/sc finite
        safe = safe * k
        rcp = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
        c_lo = tl.floor(_div_rn_by((y_lo - mn[:, None]) * k[:, None], safe[:, None], rcp[:, None], PREC == 0) + 0.5)
        c_hi = tl.floor(_div_rn_by((y_hi - mn[:, None]) * k[:, None], safe[:, None], rcp[:, None], PREC == 0) + 0.5)
        c_lo = tl.where(pos[:, None], c_lo, 0.0).to(tl.int32)
        c_hi = tl.where(pos[:, None], c_hi, 0.0).to(tl.int32)
        cp = pool_ptr + (base + row * CB)[:, None] + cols[None, :]
        if STORAGE == 2:
            tl.store(cp, (c_lo | (c_hi << 4)).to(tl.uint8), mask=rmask[:, None])
        else:
            tl.store(cp, c_lo.to(tl.uint8), mask=rmask[:, None])
            tl.store(cp + HALF, c_hi.to(tl.uint8), mask=rmask[:, None])
        nan = float("nan")
        sc = tl.where(fin, sc, nan)
        mn = tl.where(fin, mn, nan)
        if META32:
            sp = poolf_ptr + ((base + T * CB) // 4 + row)
            tl.store(sp, sc, mask=rmask)
            tl.store(sp + T, mn, mask=rmask)
        else:
            sp = poolh_ptr + ((base + T * CB) // 2 + row)
            tl.store(sp, sc.to(tl.float16), mask=rmask)
            tl.store(sp + T, mn.to(tl.float16), mask=rmask)


# N (the step's token count) changes every step: specialising on it (N == 1, N % 16 == 0) would compile
# new variants mid-serving (kernels/variants.py)
@triton.jit(do_not_specialize=["N"])
def _append_kernel(pool_ptr, poolb_ptr, poolh_ptr, poolf_ptr, key_ptr, val_ptr, slot_ptr, km_ptr, kb_ptr, vm_ptr, N,
                   stride_kn, stride_kh, stride_vn, stride_vh,
                   H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, REGION: tl.constexpr,
                   STORAGE: tl.constexpr, META32: tl.constexpr, HAS_KM: tl.constexpr, HAS_KB: tl.constexpr,
                   HAS_VM: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr = 0):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    slot = tl.load(slot_ptr + rows, mask=rmask, other=0).to(tl.int64)
    blk = slot // T
    row = slot % T
    _append_one(pool_ptr, poolb_ptr, poolh_ptr, poolf_ptr, key_ptr, stride_kn, stride_kh, km_ptr, D * D, kb_ptr, rows, rmask, blk, row, h,
                0, HAS_KM, HAS_KB, H, D, T, REGION, STORAGE, META32, PREC, HB)
    _append_one(pool_ptr, poolb_ptr, poolh_ptr, poolf_ptr, val_ptr, stride_vn, stride_vh, vm_ptr, 0, kb_ptr, rows, rmask, blk, row, h,
                1, HAS_VM, False, H, D, T, REGION, STORAGE, META32, PREC, HB)


def _contig_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage: str, meta_dtype: str,
           hadamard_block: int = 0, *, config: AppendConfig | None = None) -> None:
    """Same signature and effect as trtllm_sawint4.ops.reference.append; `config`: the launch tiles
    (DEFAULT.append when None)."""
    config = config or DEFAULT.append
    n, h, d = key.shape
    if n == 0:
        return
    fmt = StorageFormat(storage, meta_dtype)
    t = fmt.tokens_per_block(d, pool.shape[-1])
    key, value = _contig_last(key), _contig_last(value)
    interp = pool.device.type == "cpu"
    has_m = k_matrix is not None or v_matrix is not None
    if interp:
        prec = 0
    elif key.dtype == torch.bfloat16:
        prec = config.bf16_prec
    else:
        prec = 2
    dummy = slot_mapping
    block_n, warps = config.transform if has_m else config.plain
    if d >= 256:
        block_n, warps = block_n // 2, 8
    if interp:
        block_n = 16
    grid = (triton.cdiv(n, block_n), h)
    _append_kernel[grid](
        pool, pool.view(torch.bfloat16), pool.view(torch.float16), pool.view(torch.float32), key, value, slot_mapping,
        k_matrix.contiguous() if k_matrix is not None else dummy,
        k_bias.contiguous() if k_bias is not None else dummy,
        v_matrix.contiguous() if v_matrix is not None else dummy,
        n, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        H=h, D=d, T=t, REGION=pool.shape[-1], STORAGE=fmt.kernel_code, META32=fmt.meta32,
        HAS_KM=k_matrix is not None, HAS_KB=k_bias is not None, HAS_VM=v_matrix is not None,
        PREC=prec, BLOCK_N=block_n, HB=hadamard_block, num_warps=warps,
    )
