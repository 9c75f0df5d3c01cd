"""Shared @triton.jit helpers of the SAW-INT4 kernels (imported only when triton is present).

Conventions shared by every kernel:
  * A vector of head_dim D is handled as two halves (channels 0..D/2-1 and D/2..D-1), the INT4
    split-halves packing (byte j = c[j] | c[j + D/2] << 4), so unpacking needs no shuffles. The
    other storages use the same halves so that one code path serves all three.
  * Pool addressing is in bytes on the uint8 pool: region(block, kv, head) starts at
    ((block * 2 + kv) * H + head) * R; codes, then T scales, then T mins (layout.py).
  * Transforms are fp32 [D, D] matrices applied as four [D/2, D/2] blocks, or, when declared in
    block-Hadamard form (HB > 0, the ops' rotation_block), as their diagonal factor times +-1
    Sylvester blocks made from indices.
"""

from __future__ import annotations

import triton
import triton.language as tl

STORAGE_CODE = {"bf16": 0, "int8": 1, "int4": 2}


def _patch_interpreter() -> None:
    """Triton 3.5/3.6's interpreter turns a scalar into a Python int with int(1-element array), which
    numpy >= 2.3 refuses; loop bounds loaded from memory then fail. Read the element instead."""
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    if getattr(_interp, "_sawint4_patched", False):
        return
    orig = _interp._patch_lang_tensor

    def patched(tensor, *scope):  # (tensor, scope) from Triton 3.6, (tensor) in 3.5
        orig(tensor, *scope)
        index = lambda self: int(self.handle.data.reshape(-1)[0])  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    _interp._patch_lang_tensor = patched
    _interp._sawint4_patched = True


_patch_interpreter()


@triton.jit
def _mm(x, b, PREC: tl.constexpr):
    """x [M, K] fp32 @ b [K, N] fp32 -> fp32.

    PREC 0: ieee (interpreter); 1: tf32; 2: tf32x3; 3 (and 4): x is exactly bf16 and b is split
    into bf16 terms on the bf16 tensor cores, three terms for PREC 3 (fp32-accurate products), two
    for PREC 4 (b to about 2^-17 relative, which exact x * term products keep: the append
    quantizer's codes then differ from an fp32 transform only on rounding ties of ~1e-5 odds; the
    rotation matrices' +-2^-k entries need one term)."""
    if PREC == 0:
        return tl.dot(x, b, input_precision="ieee")
    elif PREC == 1:
        return tl.dot(x, b, input_precision="tf32")
    elif PREC == 2:
        return tl.dot(x, b, input_precision="tf32x3")
    else:
        xb = x.to(tl.bfloat16)
        b1 = b.to(tl.bfloat16)
        r1 = b - b1.to(tl.float32)
        b2 = r1.to(tl.bfloat16)
        if PREC == 3:
            b3 = (r1 - b2.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(xb, b3)
            acc = tl.dot(xb, b2, acc)
        else:
            acc = tl.dot(xb, b2)
        return tl.dot(xb, b1, acc)


@triton.jit
def _matmul_halves(x_lo, x_hi, m_ptr, TRANS: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr,
                   HB: tl.constexpr = 0):
    """(x @ B) in halves for x = [x_lo | x_hi] ([M, D/2] fp32 each), B = M^T if TRANS else M,
    M an fp32 row-major [D, D] matrix at m_ptr (HB > 0: M in block-Hadamard form, see
    hadamard.block_hadamard_form; only its diagonal factor is read)."""
    HALF: tl.constexpr = D // 2
    if HB > 0:
        cols = tl.arange(0, HALF)
        d_lo = _hadamard_diag(m_ptr, cols, D, HB)
        d_hi = _hadamard_diag(m_ptr, HALF + cols, D, HB)
        if TRANS:
            x_lo = x_lo * d_lo[None, :]
            x_hi = x_hi * d_hi[None, :]
        if HB > 1:
            zero = tl.zeros(x_lo.shape, tl.float32)
            x_lo, x_hi = _sylvester_halves(x_lo, x_hi, zero, zero, 0, HALF, HALF, HB, PREC)
        if not TRANS:
            x_lo = x_lo * d_lo[None, :]
            x_hi = x_hi * d_hi[None, :]
        return x_lo, x_hi
    j = tl.arange(0, HALF)[:, None]
    i = tl.arange(0, HALF)[None, :]
    if TRANS:
        off = i * D + j
        jh: tl.constexpr = HALF
        ih: tl.constexpr = HALF * D
    else:
        off = j * D + i
        jh: tl.constexpr = HALF * D
        ih: tl.constexpr = HALF
    y_lo = _mm(x_lo, tl.load(m_ptr + off), PREC) + _mm(x_hi, tl.load(m_ptr + off + jh), PREC)
    y_hi = _mm(x_lo, tl.load(m_ptr + off + ih), PREC) + _mm(x_hi, tl.load(m_ptr + off + jh + ih), PREC)
    return y_lo, y_hi


@triton.jit
def _round_f16(x, UP: tl.constexpr):
    """fp32 x -> the nearest fp16 value >= x (UP) or <= x (down), returned as fp32 (x finite, |x| <= 65504)."""
    h = x.to(tl.float16)
    hf = h.to(tl.float32)
    u = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    neg = u >= 0x8000
    if UP:
        need = hf < x
        nxt = tl.where(neg, tl.where(u == 0x8000, 1, u - 1), u + 1)
    else:
        need = hf > x
        nxt = tl.where(neg, u + 1, tl.where(u == 0, 0x8001, u - 1))
    u = tl.where(need, nxt, u)
    # back to int16 bits: values >= 0x8000 wrap to negative int16
    u = tl.where(u >= 0x8000, u - 0x10000, u)
    return u.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _to_bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even by integer arithmetic (the interpreter's cast truncates)."""
    u = x.to(tl.int32, bitcast=True)
    r = u + 0x7FFF + ((u >> 16) & 1)
    r = tl.where(x != x, u | 0x400000, r)  # nan stays a (quiet) nan
    hi = r >> 16
    return hi.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _hadamard_diag(m_ptr, j, D: tl.constexpr, HB: tl.constexpr):
    """d_j = M[(j // HB) * HB, j]: the diagonal factor of M = S diag(d) (first row of each block)."""
    return tl.load(m_ptr + ((j // HB) * HB) * D + j)


@triton.jit
def _sylvester_tile(j0, KC: tl.constexpr, N: tl.constexpr, HB: tl.constexpr, DT: tl.constexpr):
    """Rows j0..j0+KC of blockdiag(S_r, ..., S_r) of size N, r = min(HB, N), as exact +-1/0 in DT:
    S_r[i, j] = (-1)^popcount(i & j) (Sylvester). Made from indices: no memory traffic."""
    RB: tl.constexpr = HB if HB < N else N
    i = j0 + tl.arange(0, KC)[:, None]
    j = tl.arange(0, N)[None, :]
    a = i & j & (RB - 1)
    a = a ^ (a >> 4)  # parity of a (< 256) by xor folding
    a = a ^ (a >> 2)
    a = a ^ (a >> 1)
    if DT == tl.bfloat16:  # the bits of +-1.0 directly (an int->float conversion runs at 1/4 rate)
        return tl.where((i ^ j) < RB, 0x3F80 | ((a & 1) << 15), 0).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return tl.where((i ^ j) < RB, 1 - 2 * (a & 1), 0).to(DT)


@triton.jit
def _mm_pm1(x, s, acc, PREC: tl.constexpr):
    """acc + x [M, K] fp32 @ s [K, N] (+-1/0, exact in bf16), fp32. x is split into bf16 terms (two;
    three for PREC 2/3): the products are exact, so this is fp32-accurate to 2^-17 (2^-24)."""
    if PREC == 0:
        return tl.dot(x, s, acc, input_precision="ieee")
    x1 = x.to(tl.bfloat16)
    r1 = x - x1.to(tl.float32)
    x2 = r1.to(tl.bfloat16)
    if PREC == 2 or PREC == 3:
        acc = tl.dot((r1 - x2.to(tl.float32)).to(tl.bfloat16), s, acc)
    acc = tl.dot(x2, s, acc)
    return tl.dot(x1, s, acc)


@triton.jit
def _sylvester_halves(x_lo, x_hi, y_lo, y_hi, j0, KC: tl.constexpr, HALF: tl.constexpr, HB: tl.constexpr,
                      PREC: tl.constexpr):
    """(y_lo, y_hi) + what channels j0..j0+KC of each half (x_lo, x_hi: [M, KC] fp32) add to x @ S_blk,
    S_blk = blockdiag(S_HB) of size D = 2 * HALF, in halves [M, HALF]. One [KC, HALF] tile serves both
    halves: HB <= HALF keeps them apart; HB = D couples them as S_D = [[S_h, S_h], [S_h, -S_h]]."""
    s = _sylvester_tile(j0, KC, HALF, HB, tl.float32 if PREC == 0 else tl.bfloat16)
    if HB > HALF:
        a = x_lo + x_hi
        x_hi = x_lo - x_hi
        x_lo = a
    return _mm_pm1(x_lo, s, y_lo, PREC), _mm_pm1(x_hi, s, y_hi, PREC)


@triton.jit
def _hadamard_rows(row_ptr, rmask, m_ptr, TRANS: tl.constexpr, D: tl.constexpr, KC: tl.constexpr,
                   PREC: tl.constexpr, HB: tl.constexpr):
    """_transform_rows for M = S_blk diag(d) in block-Hadamard form: x @ M^T = (x * d) @ S_blk
    (TRANS; S_blk is symmetric) or x @ M = (x @ S_blk) * d."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    if HB == 1:  # diagonal M
        y_lo = tl.load(row_ptr[:, None] + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        y_hi = tl.load(row_ptr[:, None] + HALF + cols[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        d_lo = _hadamard_diag(m_ptr, cols, D, HB)
        d_hi = _hadamard_diag(m_ptr, HALF + cols, D, HB)
        return y_lo * d_lo[None, :], y_hi * d_hi[None, :]
    y_lo = tl.zeros([row_ptr.shape[0], HALF], tl.float32)
    y_hi = tl.zeros([row_ptr.shape[0], HALF], tl.float32)
    for j0 in range(0, HALF, KC):
        j = j0 + tl.arange(0, KC)
        x_lo = tl.load(row_ptr[:, None] + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(row_ptr[:, None] + HALF + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if TRANS:
            x_lo = x_lo * _hadamard_diag(m_ptr, j, D, HB)[None, :]
            x_hi = x_hi * _hadamard_diag(m_ptr, HALF + j, D, HB)[None, :]
        y_lo, y_hi = _sylvester_halves(x_lo, x_hi, y_lo, y_hi, j0, KC, HALF, HB, PREC)
    if not TRANS:
        y_lo = y_lo * _hadamard_diag(m_ptr, cols, D, HB)[None, :]
        y_hi = y_hi * _hadamard_diag(m_ptr, HALF + cols, D, HB)[None, :]
    return y_lo, y_hi


@triton.jit
def _transform_rows(row_ptr, rmask, m_ptr, TRANS: tl.constexpr, D: tl.constexpr, KC: tl.constexpr,
                    PREC: tl.constexpr, HB: tl.constexpr = 0):
    """Rows x ([M] pointers to D contiguous values in global memory) times B (B = M^T if TRANS else M,
    M fp32 row-major [D, D]), returned in halves [M, D/2] fp32. Chunked over the reduction (KC at a
    time, a loop, not unrolled) so that few registers are live. HB > 0: M is in block-Hadamard form
    (hadamard.block_hadamard_form) and only its D diagonal factors are read: no [D, D] matrix traffic."""
    HALF: tl.constexpr = D // 2
    if HB > 0:
        return _hadamard_rows(row_ptr, rmask, m_ptr, TRANS, D, KC, PREC, HB)
    i = tl.arange(0, HALF)[None, :]
    y_lo = tl.zeros([row_ptr.shape[0], HALF], tl.float32)
    y_hi = tl.zeros([row_ptr.shape[0], HALF], tl.float32)
    for j0 in range(0, D, KC):
        j = j0 + tl.arange(0, KC)
        x = tl.load(row_ptr[:, None] + j[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        if TRANS:
            off = i * D + j[:, None]
            ih: tl.constexpr = HALF * D
        else:
            off = j[:, None] * D + i
            ih: tl.constexpr = HALF
        y_lo += _mm(x, tl.load(m_ptr + off), PREC)
        y_hi += _mm(x, tl.load(m_ptr + off + ih), PREC)
    return y_lo, y_hi


def _unpack_asm(magic: int) -> tl.constexpr:
    """PTX for four code bytes ($4) -> eight 16-bit values magic | nibble, lo nibbles in $0/$1 and hi
    nibbles in $2/$3 (2 byte permutes, 2 shifts, 4 LOP3s; no int->float conversion instructions)."""
    m = f"0x{magic:04X}{magic:04X}"
    return tl.constexpr(f"""{{
            .reg .b32 t0, t1;
            prmt.b32 t0, $4, 0, 0x4140;
            prmt.b32 t1, $4, 0, 0x4342;
            lop3.b32 $0, t0, 0x000F000F, {m}, 0xEA;
            lop3.b32 $1, t1, 0x000F000F, {m}, 0xEA;
            shr.u32 t0, t0, 4;
            shr.u32 t1, t1, 4;
            lop3.b32 $2, t0, 0x000F000F, {m}, 0xEA;
            lop3.b32 $3, t1, 0x000F000F, {m}, 0xEA;
            }}""")


_UNPACK_FP16 = _unpack_asm(0x6400)  # fp16 1024 + n
_UNPACK_BF16 = _unpack_asm(0x4300)  # bf16 128 + n


@triton.jit
def _unpack_int4_magic(c, FP16: tl.constexpr):
    """uint8 codes -> (lo, hi) nibbles as bf16 128 + n (fp16: 1024 + n), four bytes per PTX block."""
    if FP16:
        return tl.inline_asm_elementwise(asm=_UNPACK_FP16, constraints="=r,=r,=r,=r,r", args=[c],
                                         dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(asm=_UNPACK_BF16, constraints="=r,=r,=r,=r,r", args=[c],
                                         dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _nan_rows_with_nonfinite(o_lo, o_hi):
    """Rows [M, D/2] x 2 with any non-finite channel become all nan: the spec gives nan to every
    channel of a query that sees a non-finite vector. Needed for bf16 V, whose inf stays in one
    channel (a quantized V is stored with nan metadata, which already reaches every channel); an inf
    can only turn into nan on the way, never back into a finite value, so the check at the end is exact."""
    fin = tl.minimum(tl.min((tl.abs(o_lo) < float("inf")).to(tl.int32), 1),
                     tl.min((tl.abs(o_hi) < float("inf")).to(tl.int32), 1)) > 0
    return tl.where(fin[:, None], o_lo, float("nan")), tl.where(fin[:, None], o_hi, float("nan"))
