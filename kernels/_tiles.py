"""Reading paged K/V tiles inside the attention kernels (decode and prefill).

A tile is BLOCK_N tokens of one KV head: its stored values (bf16 halves, int8 or INT4 codes) and its
per-token metadata, addressed through the block table (layout.py). Loading and converting are separate
steps so that a kernel can issue the loads early and use them later (decode's ONE_TILE); _load_kv_tile
does both at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _unpack_int4_magic


@triton.jit
def _code_offset(STORAGE: tl.constexpr, DT: tl.constexpr):
    """The constant that _code_values' codes carry (128 or 1024 for INT4 in bf16/fp16, else 0)."""
    if STORAGE == 2 and DT == tl.bfloat16:
        return 128.0
    elif STORAGE == 2 and DT == tl.float16:
        return 1024.0
    else:
        return 0.0


@triton.jit
def _v_weights(p, vs, vmn, off, DT: tl.constexpr):
    """The P V product's operands for softmax weights p [M, BLOCK_N] (fp32) over V tokens of per-token
    (scale vs, min vmn) [BLOCK_N]: (pd, pm) with P V = pd @ (c + off) + pm[:, None], where pd = p * vs
    rounded to DT (the dot's operand) and pm [M] fp32.

    pm weights each token's min by the same rounded weight as its codes (pd / vs): the product is then
    attention with every weight rounded once (relative 2^-9 in bf16, like flash attention's P), so the
    rounding error of a token's contribution is proportional to its dequantized value. Weighting the
    min by the exact p instead leaves error (pd - p * vs) * c: the same sign on every channel of the
    token (codes are >= 0), which a V rotation undone afterwards sums into one output channel
    (measured on the H200: 0.22 absolute at head_dim 128, sliding window 1). vs == 0 (codes 0): its
    min gets the exact p; a non-finite vs still turns pm non-finite. The Triton kernels use it when a V
    rotation follows (EXACT_V); without one the error stays per channel and they keep the cheaper fold
    (the per-token division and the extra term cost 10-15% at head_dim 64 decode and INT4 prefill on the
    H200)."""
    nz = vs != 0
    rs = tl.where(nz, vmn / tl.where(nz, vs, 1.0), 0.0) - off
    zm = tl.where(nz, 0.0, vmn)
    pd = (p * vs[None, :]).to(DT)
    pm = tl.sum(pd.to(tl.float32) * rs[None, :] + p * zm[None, :], 1)
    return pd, pm


@triton.jit
def _load_codes(pool_ptr, poolb_ptr, base, row, tmask, D: tl.constexpr, STORAGE: tl.constexpr):
    """The stored values of one K or V tile of BLOCK_N tokens (region byte offsets `base`, rows `row`),
    not yet converted: bf16: the halves [BLOCK_N, D/2]; int8: the code halves; INT4: the code bytes
    [BLOCK_N, D/2], twice (one byte holds both halves). _code_values converts them."""
    HALF: tl.constexpr = D // 2
    cols = tl.arange(0, HALF)
    if STORAGE == 0:
        # element (not byte) offsets from one scalar cast of the pool pointer
        p = poolb_ptr + (base // 2 + row * D)[:, None] + cols[None, :]
        return tl.load(p, mask=tmask[:, None], other=0.0), tl.load(p + HALF, mask=tmask[:, None], other=0.0)
    elif STORAGE == 2:
        c = tl.load(pool_ptr + (base + row * (D // 2))[:, None] + cols[None, :], mask=tmask[:, None], other=0)
        return c, c
    else:
        cp = pool_ptr + (base + row * D)[:, None] + cols[None, :]
        return tl.load(cp, mask=tmask[:, None], other=0), tl.load(cp + HALF, mask=tmask[:, None], other=0)


@triton.jit
def _code_values(x0, x1, STORAGE: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr = True):
    """_load_codes' tile as the halves [BLOCK_N, D/2] in DT. INT4 codes come out as bf16 128 + c
    (fp16: 1024 + c; see _code_offset) made by bit operations alone (no int->float conversion
    instructions, which run at a quarter of the ALU rate)."""
    if STORAGE == 2:
        if (DT == tl.bfloat16 or DT == tl.float16) and ASM:
            lo, hi = _unpack_int4_magic(x0, DT == tl.float16)
        elif DT == tl.bfloat16 or DT == tl.float16:  # same values by plain bit operations (interpreter)
            magic: tl.constexpr = 0x6400 if DT == tl.float16 else 0x4300
            lo = ((x0 & 15).to(tl.int16) | magic).to(DT, bitcast=True)
            hi = ((x0 >> 4).to(tl.int16) | magic).to(DT, bitcast=True)
        else:
            lo = (x0 & 15).to(DT)
            hi = (x0 >> 4).to(DT)
    else:
        lo = x0.to(DT)
        hi = x1.to(DT)
    return lo, hi


@triton.jit
def _load_kv_meta(poolf_ptr, base, row, tmask, D: tl.constexpr, T: tl.constexpr, STORAGE: tl.constexpr,
                  META32: tl.constexpr):
    """The [BLOCK_N, 2] metadata words of one K or V tile (_load_meta_words; bf16: zeros)."""
    if STORAGE == 0:
        return tl.zeros([row.shape[0], 2], tl.float32)
    CB: tl.constexpr = D // 2 if STORAGE == 2 else D
    return _load_meta_words(poolf_ptr, base + T * CB, row, tmask, T, META32)


@triton.jit
def _kv_meta_values(words, row, STORAGE: tl.constexpr, META32: tl.constexpr):
    """_load_kv_meta's words as per-token (scale, min) [BLOCK_N] fp32 (bf16: zeros)."""
    if STORAGE == 0:
        s = tl.zeros(row.shape, tl.float32)
        return s, s
    return _meta_values(words, row, META32)


@triton.jit
def _opaque(x, ASM: tl.constexpr):
    """x, through an identity the compiler cannot move or see through: keeps the shared-memory
    conversion of an early-loaded tile (and so the wait for its load) after the code before it."""
    if ASM:
        PACK: tl.constexpr = 32 // x.dtype.primitive_bitwidth  # elements per 32-bit register
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=PACK)
    return x


@triton.jit
def _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, base, row, tmask, D: tl.constexpr, T: tl.constexpr,
                  STORAGE: tl.constexpr, META32: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr = True):
    """One K or V tile: the halves [BLOCK_N, D/2] in DT and per-token (scale, min) [BLOCK_N] fp32.
    (ONE_TILE in _decode_kernel calls the four steps apart, to issue the loads early.)"""
    x0, x1 = _load_codes(pool_ptr, poolb_ptr, base, row, tmask, D, STORAGE)
    lo, hi = _code_values(x0, x1, STORAGE, DT, ASM)
    s, m = _kv_meta_values(_load_kv_meta(poolf_ptr, base, row, tmask, D, T, STORAGE, META32), row, STORAGE, META32)
    return lo, hi, s, m


@triton.jit
def _load_meta_words(poolf_ptr, mbase, row, tmask, T: tl.constexpr, META32: tl.constexpr):
    """The [BLOCK_N, 2] 32-bit words holding each token's (scale, min) (0 for masked tokens);
    metadata starts at byte `mbase`. fp16 metadata is read as the 32-bit word holding the token's
    pair: Triton only pipelines (cp.async) loads of at least 4 bytes per thread, and a synchronous
    2-byte load in the loop exposes a full DRAM latency every tile."""
    two = tl.arange(0, 2)[None, :]  # scale and min in one load: fewer loads for the pipeliner to track
    if META32:
        return tl.load(poolf_ptr + (mbase // 4 + row)[:, None] + two * T, mask=tmask[:, None], other=0.0)
    else:
        return tl.load(poolf_ptr + (mbase // 4 + row // 2)[:, None] + two * (T // 2), mask=tmask[:, None],
                       other=0.0)


@triton.jit
def _meta_values(x, row, META32: tl.constexpr):
    """_load_meta_words' words as per-token (scale, min) fp32 (fp16 metadata: the token's half)."""
    if META32:
        s, m = tl.split(x)
    else:
        sw, mw = tl.split(x.to(tl.int32, bitcast=True))
        sh = (row & 1) * 16
        s = ((sw >> sh) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        m = ((mw >> sh) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return s, m


@triton.jit
def _tile_block_ids(bt_row, n0, limit, BLOCK_N: tl.constexpr, T: tl.constexpr):
    """Block ids of the tile of tokens [n0, n0 + BLOCK_N) (0 at and past `limit`): one id when the
    tile lies in one block (BLOCK_N <= T), else one per token."""
    if BLOCK_N <= T:
        return tl.load(bt_row + n0 // T, mask=n0 < limit, other=0)
    else:
        tok = n0 + tl.arange(0, BLOCK_N)
        return tl.load(bt_row + tok // T, mask=tok < limit, other=0)


@triton.jit
def _tile_rows(n0, BLOCK_N: tl.constexpr, T: tl.constexpr):
    """Row (token slot within its block) of each token of the tile starting at token n0."""
    if BLOCK_N <= T:  # n0 is a multiple of BLOCK_N: one contiguous run of rows
        return n0 % T + tl.arange(0, BLOCK_N)
    else:
        return (n0 + tl.arange(0, BLOCK_N)) % T
