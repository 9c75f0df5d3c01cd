"""Paged INT4 decode, the Gluon backend: one warp per (sequence, KV head, split), S^T = K q^T.

Why a second decode kernel. The Triton kernel (decode_triton.py) computes S = q K^T with the G query heads
as the 16-row left operand of `tl.dot`, so at G = 4 three quarters of its softmax work is padding;
V's k dimension (tokens) is strided in memory, so its operand fragments are read byte by byte; and
its main loop costs ~2 x 1170 warp-instructions per 64-token tile (docs/kernels.md). This kernel
writes the layouts by hand (Gluon, Triton's explicit-layout dialect; sm_80+ `mma.sync`):

* S^T [64 tokens, 8] = K [64, D] @ q^T [D, 8]: the tokens are the MMA's M (16-row) side and the
  query heads its N (8) side, so G <= 8 heads are padded to 8, not 16. O^T [D, 8] = V^T @ P^T.
* The contraction dimensions can be relabelled freely (the same permutation on both operands),
  and the output channels too (undone by the final store). So each thread loads its operand
  bytes as long contiguous runs -- K: 16 bytes of one token row; V: 8 bytes of one token row, for
  a pair of tokens -- and the relabelling (`_k_logical`, `_v_logical`, `_p_logical`: reshapes and
  permutes of bit dimensions) makes those registers exactly the MMA operand layouts. No byte-wise
  shared-memory reads, no layout conversions through shared memory.
* Dequantization is folded as in decode_triton.py (codes are exact in bf16/fp16, `offset` cancels):
      s_t = sc_t * (q . (c_t + off)) + (mn_t - off * sc_t) * sum(q)
      o   = w @ (c + off) - (off + 7.5) * sum(w) + p . (mn + 7.5 * sc),  w = p*sc rounded
* Loads: K/V code tiles and per-token metadata go global -> shared by `cp.async` in STAGES
  buffers, issued STAGES - 1 tiles ahead; each tile's block id is read when the tile is issued.

Compiled for sm_90 it is ~1175 warp-instructions per 64-token tile at 146 registers (the Triton
kernel: 2 warps x ~1170). Scope: INT4 codes, head_dim 128, G <= 8, fp16 metadata, bf16/fp16
queries, tokens_per_block a multiple of 64. It always writes split partials (lse + normalised
output per split), merged by kernels/_reduce.py. A q_matrix in block-Hadamard form (the cache's) is
applied inside it by butterflies over its D diagonal factors (`_rotated_q`); a dense one by
`_common._q_prep_kernel` before it. kernels/schedule.py decides when it runs (`gluon_applies`).
"""

from __future__ import annotations

import logging

import torch
import triton

from ._common import _UNPACK_BF16 as _TL_UNPACK_BF16, _UNPACK_FP16 as _TL_UNPACK_FP16, LOG2E, _q_prep_kernel
from ._reduce import merge_splits
from .schedule import GLUON_BLOCK_N as BLOCK_N, GLUON_HEAD_DIM as HEAD_DIM, GLUON_MAX_GROUP as MAX_GROUP  # noqa: F401

log = logging.getLogger(__name__)


def _gluon_api():
    """The Gluon names this kernel uses, under the spelling of the installed Triton (3.5 to 3.9 differ):
    (gluon, gl, the async-copy module, async copy, barrier, mma_v2). Raises ImportError naming what is missing."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import ampere
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

    # cp.async global -> shared: `async_load` from 3.9 (where the old name raises), before that
    # `async_copy_global_to_shared`
    copy = getattr(cp, "async_load", None) or getattr(cp, "async_copy_global_to_shared", None)
    # the CTA barrier: `gl.barrier` from 3.7, `gl.thread_barrier` before
    barrier = getattr(gl, "barrier", None) or getattr(gl, "thread_barrier", None)
    mma = getattr(ampere, "mma_v2", None)
    if mma is None and hasattr(gl, "tensor"):  # 3.5: no mma_v2 yet; it is tt.dot on an MMA v2 accumulator
        from triton.experimental.gluon.language._core import builtin

        @builtin
        def mma(a, b, acc, _semantic=None):
            out = _semantic.dot(a, b, acc, input_precision=None, max_num_imprecise_acc=None, out_dtype=acc.dtype)
            return gl.tensor(out.handle, acc.type)
    missing = [name for name, value in (("async copy", copy), ("barrier", barrier), ("mma_v2", mma)) if value is None]
    if missing:
        raise ImportError(f"Gluon of triton {triton.__version__} lacks {', '.join(missing)}")
    return gluon, gl, cp, copy, barrier, mma


try:
    gluon, gl, cp, _async_copy, _barrier, mma_v2 = _gluon_api()
    HAVE_GLUON = True
    _UNAVAILABLE = None
except Exception as e:  # Gluon missing or renamed: every decode runs the Triton kernel
    HAVE_GLUON = False
    _UNAVAILABLE = f"{type(e).__name__}: {e}"
_SWITCHED_OFF = False


def available() -> bool:
    """Whether this kernel may run. When Gluon is unusable (not importable here, or the kernel failed
    to compile: switch_off) it says so once, in one log line, and the Triton decode kernel serves."""
    if _UNAVAILABLE is not None and not _SWITCHED_OFF:
        switch_off(_UNAVAILABLE)
    return _UNAVAILABLE is None


def switch_off(reason: str) -> None:
    """Stop using this kernel for the rest of the process, with one warning naming the reason."""
    global _UNAVAILABLE, _SWITCHED_OFF
    _UNAVAILABLE = reason
    if not _SWITCHED_OFF:
        _SWITCHED_OFF = True
        log.warning("Gluon decode kernel switched off for triton %s (%s); the Triton decode kernel serves instead",
                    triton.__version__, reason.splitlines()[0] if reason.strip() else "unknown reason")


# The relabellings, as permutations of bit dimensions (most significant first; tests check them
# against the index formulas below and the byte orders they stand for, in plain PyTorch).
#: K [token, byte j5..j0] -> [token, k5..k0] with k5..k0 = j3, j2, j1, j5, j4, j0
K_BITS_PERM = (0, 3, 4, 5, 1, 2, 6)
#: V^T [byte j5..j0, token t5..t0] -> [m5..m0, k5..k0] with m5..m0 = j2, j1, j0, j5, j4, j3 and
#: k5..k0 = t5, t4, t2, t1, t0, t3
V_BITS_PERM = (3, 4, 5, 0, 1, 2, 6, 7, 9, 10, 11, 8)
#: P [token t5..t0, head] -> [k5..k0, head] in V_BITS_PERM's token order
P_BITS_PERM = (0, 1, 3, 4, 5, 2, 6)
#: q [head, half, byte j5..j0] -> [k5..k0, head, half] in K_BITS_PERM's channel order
Q_BITS_PERM = (4, 5, 6, 2, 3, 7, 0, 1)


def k_channel_byte(k):
    """The byte (channel of a half) that product channel k of K's relabelling reads."""
    return (k & 1) | (((k >> 3) & 7) << 1) | (((k >> 1) & 3) << 4)


def v_channel_byte(m):
    """The byte (output channel of a half) of row m of V's relabelled product."""
    return (m >> 3) | ((m & 7) << 3)


if HAVE_GLUON:
    def _linear(reg, lane, shape):
        return gl.DistributedLinearLayout(reg_bases=reg, lane_bases=lane, warp_bases=[], block_bases=[], shape=shape)

    _K_PERM = gl.constexpr(list(K_BITS_PERM))
    _V_PERM = gl.constexpr(list(V_BITS_PERM))
    _P_PERM = gl.constexpr(list(P_BITS_PERM))
    _Q_PERM = gl.constexpr(list(Q_BITS_PERM))
    # the unpacking PTX of the Triton kernels (_common._unpack_asm): bytes in order, bf16 128 + n / fp16 1024 + n
    _UNPACK_BF16 = gl.constexpr(_TL_UNPACK_BF16.value)
    _UNPACK_FP16 = gl.constexpr(_TL_UNPACK_FP16.value)
    # one warp: the m16n8k16 accumulator and its operands
    MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
    OP_A = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
    OP_B = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
    # K code bytes [token, byte j]: 16 contiguous bytes of a row per thread (bytes 16 x lane%4),
    # tokens lane/4 + 8 i: after _k_logical, OP_A's layout up to the order of registers
    K_BYTES = gl.constexpr(_linear([[0, 1], [0, 2], [0, 4], [0, 8], [8, 0], [16, 0], [32, 0]],
                                   [[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]], [64, 64]))
    # V code bytes [token, byte j]: 8 contiguous bytes per thread (bytes 8 x (lane/4)), tokens
    # t = lane%4 + {0, 8} + 4 i (a token pair t, t + 8 in one thread)
    V_BYTES = gl.constexpr(_linear([[0, 1], [0, 2], [0, 4], [8, 0], [4, 0], [16, 0], [32, 0]],
                                   [[1, 0], [2, 0], [0, 8], [0, 16], [0, 32]], [64, 64]))
    # V^T [channel, token] after _v_logical, registers ordered for the unpack (token pair first, so
    # that one 16-bit pair of the unpacked output is (token t, token t + 8) of one channel)
    VT_UNPACK = gl.constexpr(_linear([[0, 1], [8, 0], [16, 0], [32, 0], [0, 8], [0, 16], [0, 32]],
                                     [[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]], [64, 64]))
    # q rows [8 heads, 128 channels] for the Walsh-Hadamard butterflies: channel bits 0-4 in registers,
    # then (Q_HI_BITS) bits 5-6 in registers
    Q_LO_BITS = gl.constexpr(_linear([[0, 1], [0, 2], [0, 4], [0, 8], [0, 16]],
                                     [[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]], [8, 128]))
    Q_HI_BITS = gl.constexpr(_linear([[0, 32], [0, 64], [0, 1], [0, 2], [0, 4]],
                                     [[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]], [8, 128]))
    ROWS = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    FLAT = gl.constexpr(gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    COPY_CODES = gl.constexpr(gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[8, 4], warps_per_cta=[1, 1],
                                               order=[1, 0]))
    COPY_META = gl.constexpr(gl.BlockedLayout(size_per_thread=[2], threads_per_warp=[32], warps_per_cta=[1],
                                              order=[0]))

    @gluon.jit
    def _unpack(c, FP16: gl.constexpr):
        """uint8 codes -> (lo, hi) nibbles as 16-bit 128 + n (bf16) or 1024 + n (fp16)."""
        if FP16:
            return gl.inline_asm_elementwise(asm=_UNPACK_FP16, constraints="=r,=r,=r,=r,r", args=[c],
                                             dtype=(gl.float16, gl.float16), is_pure=True, pack=4)
        else:
            return gl.inline_asm_elementwise(asm=_UNPACK_BF16, constraints="=r,=r,=r,=r,r", args=[c],
                                             dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=4)

    @gluon.jit
    def _k_logical(x):
        """[token, byte j] -> [token, k]: channel k of the product is byte
        j = k0 | k3 << 1 | k4 << 2 | k5 << 3 | k1 << 4 | k2 << 5 (k_i: bit i of k)."""
        x = gl.reshape(x, [64, 2, 2, 2, 2, 2, 2])
        x = gl.permute(x, _K_PERM.value)
        return gl.reshape(x, [64, 64])

    @gluon.jit
    def _v_logical(x):
        """[token t, byte j] -> [m, k]: output channel m is byte j = m3 | m4 << 1 | m5 << 2 | m0 << 3 |
        m1 << 4 | m2 << 5, product token k is t = k1 | k2 << 1 | k3 << 2 | k0 << 3 | k4 << 4 | k5 << 5."""
        x = gl.permute(x, [1, 0])
        x = gl.reshape(x, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
        x = gl.permute(x, _V_PERM.value)
        return gl.reshape(x, [64, 64])

    @gluon.jit
    def _p_logical(p):
        """[token t, head] -> [k, head] in _v_logical's token order."""
        p = gl.reshape(p, [2, 2, 2, 2, 2, 2, 8])
        p = gl.permute(p, _P_PERM.value)
        return gl.reshape(p, [64, 8])

    @gluon.jit
    def _k_channel_byte(k):
        return (k & 1) | (((k >> 3) & 7) << 1) | (((k >> 1) & 3) << 4)  # = k_channel_byte

    @gluon.jit
    def _v_channel_byte(m):
        return (m >> 3) | ((m & 7) << 3)  # = v_channel_byte

    @gluon.jit
    def _butterfly(x, B: gl.constexpr):
        """One Walsh-Hadamard stage on channel bit B of x [8, 128] (bit B held in registers):
        (a, c) -> (a + c, a - c) for the channel pairs that differ in bit B."""
        x = gl.permute(gl.reshape(x, [8, 128 >> (B + 1), 2, 1 << B]), [0, 1, 3, 2])
        a, c = gl.split(x)
        x = gl.permute(gl.join(a + c, a - c), [0, 1, 3, 2])
        return gl.reshape(x, [8, 128])

    @gluon.jit
    def _rotated_q(q_ptr, qm_ptr, b, h, stride_qb, stride_qh, G: gl.constexpr, HB: gl.constexpr):
        """q @ q_matrix[h]^T for M = S diag(d) in block-Hadamard form (hadamard.block_hadamard_form):
        (q * d) through log2(HB) butterfly stages of the Sylvester blocks S_HB, in fp32. Only d (128
        values) is read; [8, 128] fp32, rows >= G zero."""
        n = gl.arange(0, 8, layout=gl.SliceLayout(1, Q_LO_BITS))
        c = gl.arange(0, 128, layout=gl.SliceLayout(0, Q_LO_BITS))
        x = gl.load(q_ptr + b.to(gl.int64) * stride_qb + (h * G + n)[:, None] * stride_qh + c[None, :],
                    mask=(n < G)[:, None], other=0.0).to(gl.float32)
        x = x * gl.load(qm_ptr + h * 128 * 128 + ((c // HB) * HB) * 128 + c)[None, :]
        for bit in gl.static_range(5):
            if (1 << bit) < HB:
                x = _butterfly(x, bit)
        if HB > 32:
            x = gl.convert_layout(x, Q_HI_BITS)
            for bit in gl.static_range(5, 7):
                if (1 << bit) < HB:
                    x = _butterfly(x, bit)
        return x

    @gluon.jit
    def _q_operands(x, DT: gl.constexpr):
        """q rows [8, 128] fp32 -> (q_lo, q_hi) [64, 8] in DT as the B operand of K's product, in
        _k_logical's channel order (k5..k0 = j3, j2, j1, j5, j4, j0 of the byte j)."""
        x = gl.convert_layout(x, Q_HI_BITS)  # the half (channel bit 6) in registers, for the split
        x = gl.reshape(x, [8, 2, 2, 2, 2, 2, 2, 2])  # head, half, j5..j0
        x = gl.permute(x, _Q_PERM.value)
        q_lo, q_hi = gl.split(gl.reshape(x, [64, 8, 2]))
        return gl.convert_layout(q_lo.to(DT), OP_B), gl.convert_layout(q_hi.to(DT), OP_B)

    @gluon.jit
    def _issue_tile(pool_ptr, poolh_ptr, bt_row, tile, seq_len, live, kbuf, vbuf, ks_buf, km_buf, vs_buf, vm_buf, h,
                    H: gl.constexpr, T: gl.constexpr, REGION: gl.constexpr):
        """cp.async of tile `tile` (64 tokens) of KV head h into one stage of the buffers; nothing
        is read when not `live` (the buffers get zeros). Tokens past seq_len: zero codes; their
        metadata words are copied (inside the block) and zeroed in registers by the caller."""
        blk = gl.load(bt_row + (tile * 64) // T, mask=live, other=0).to(gl.int64)
        row0 = (tile * 64) % T
        kbase = (blk * 2 * H + h) * REGION
        tok = gl.arange(0, 64, layout=gl.SliceLayout(1, COPY_CODES))
        byt = gl.arange(0, 64, layout=gl.SliceLayout(0, COPY_CODES))
        tmask = ((tile * 64 + tok < seq_len) & live)[:, None]
        off = kbase + (row0 + tok)[:, None] * 64 + byt[None, :]
        _async_copy(kbuf, pool_ptr + off, mask=tmask)
        _async_copy(vbuf, pool_ptr + off + H * REGION, mask=tmask)
        c = gl.arange(0, 64, layout=COPY_META)
        mmask = (c >= 0) & live  # per tile: a per-token mask would split the 4-byte copies
        mp = poolh_ptr + gl.multiple_of(kbase // 2 + T * 32 + row0, 8) + c  # fp16 scales, then mins
        _async_copy(ks_buf, mp, mask=mmask)
        _async_copy(km_buf, mp + T, mask=mmask)
        _async_copy(vs_buf, mp + H * REGION // 2, mask=mmask)
        _async_copy(vm_buf, mp + H * REGION // 2 + T, mask=mmask)

    @gluon.jit
    def _decode_mma_kernel(q_ptr, qm_ptr, pool_ptr, poolh_ptr, bt_ptr, sl_ptr, po_ptr, pl_ptr,
                           stride_qb, stride_qh, stride_bt, qk_scale, tiles_per_split,
                           H: gl.constexpr, G: gl.constexpr, T: gl.constexpr, REGION: gl.constexpr,
                           FP16: gl.constexpr, STAGES: gl.constexpr, HB: gl.constexpr = 0):
        """Grid (B, Hkv, S), one warp. q: [B, Hq, 128] (the queries, or fp32 from _q_prep_kernel);
        HB > 0: q_matrix (qm_ptr) in block-Hadamard form with blocks of HB, applied here after the
        first tiles' copies are issued (so that their latency overlaps it). Writes the split's lse
        (log2) and normalised output into pl [B, Hkv, S, 8] / po [.., 8, 128]."""
        DT: gl.constexpr = gl.float16 if FP16 else gl.bfloat16
        OFF: gl.constexpr = 1024.0 if FP16 else 128.0
        b = gl.program_id(0)
        h = gl.program_id(1)
        sp = gl.program_id(2)
        seq_len = gl.load(sl_ptr + b)
        bt_row = bt_ptr + b.to(gl.int64) * stride_bt

        kbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, 64, 64], ROWS)
        vbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, 64, 64], ROWS)
        ks_buf = gl.allocate_shared_memory(gl.float16, [STAGES, 64], FLAT)
        km_buf = gl.allocate_shared_memory(gl.float16, [STAGES, 64], FLAT)
        vs_buf = gl.allocate_shared_memory(gl.float16, [STAGES, 64], FLAT)
        vm_buf = gl.allocate_shared_memory(gl.float16, [STAGES, 64], FLAT)

        t0 = sp * tiles_per_split
        nt = gl.maximum(gl.minimum(t0 + tiles_per_split, gl.cdiv(seq_len, 64)) - t0, 0)
        for i in gl.static_range(STAGES - 1):
            _issue_tile(pool_ptr, poolh_ptr, bt_row, t0 + i, seq_len, i < nt, kbuf.index(i), vbuf.index(i),
                        ks_buf.index(i), km_buf.index(i), vs_buf.index(i), vm_buf.index(i), h, H, T, REGION)
            cp.commit_group()

        # q^T [k, head] in the B layout and K's channel order (_k_logical), rounded once: the same
        # values enter the product and sum(q), so the code offset cancels exactly
        if HB > 0:
            q_lo, q_hi = _q_operands(_rotated_q(q_ptr, qm_ptr, b, h, stride_qb, stride_qh, G, HB) * qk_scale, DT)
        else:
            k = gl.arange(0, 64, layout=gl.SliceLayout(1, OP_B))
            n = gl.arange(0, 8, layout=gl.SliceLayout(0, OP_B))
            j = _k_channel_byte(k)
            qp = q_ptr + b.to(gl.int64) * stride_qb + (h * G + n)[None, :] * stride_qh + j[:, None]
            q_lo = (gl.load(qp, mask=(n < G)[None, :], other=0.0).to(gl.float32) * qk_scale).to(DT)
            q_hi = (gl.load(qp + 64, mask=(n < G)[None, :], other=0.0).to(gl.float32) * qk_scale).to(DT)
        qsum = gl.convert_layout(gl.sum(q_lo.to(gl.float32), 0) + gl.sum(q_hi.to(gl.float32), 0),
                                 gl.SliceLayout(0, MMA))

        m_i = gl.full([8], float("-inf"), gl.float32, layout=gl.SliceLayout(0, MMA))
        l_i = gl.zeros([8], gl.float32, layout=gl.SliceLayout(0, MMA))
        acc_lo = gl.zeros([64, 8], gl.float32, layout=MMA)  # O^T, channels 0..63 (in _v_logical's order)
        acc_hi = gl.zeros([64, 8], gl.float32, layout=MMA)  # channels 64..127
        trow = gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        for i in range(nt):
            cp.wait_group(STAGES - 2)
            _barrier()  # every lane's copies of tile i landed; stage (i-1) % STAGES is free
            nxt = i + STAGES - 1
            ns = nxt % STAGES
            _issue_tile(pool_ptr, poolh_ptr, bt_row, t0 + nxt, seq_len, nxt < nt, kbuf.index(ns), vbuf.index(ns),
                        ks_buf.index(ns), km_buf.index(ns), vs_buf.index(ns), vm_buf.index(ns), h, H, T, REGION)
            cp.commit_group()
            st = i % STAGES

            k_lo, k_hi = _unpack(_k_logical(kbuf.index(st).load(K_BYTES)), FP16)
            s = mma_v2(gl.convert_layout(k_lo, OP_A), q_lo, gl.zeros([64, 8], gl.float32, layout=MMA))
            s = mma_v2(gl.convert_layout(k_hi, OP_A), q_hi, s)
            live = (t0 + i) * 64 + trow < seq_len
            ks = ks_buf.index(st).load(gl.SliceLayout(1, MMA)).to(gl.float32)
            km = km_buf.index(st).load(gl.SliceLayout(1, MMA)).to(gl.float32)
            vs = gl.where(live, vs_buf.index(st).load(gl.SliceLayout(1, MMA)).to(gl.float32), 0.0)
            vm = gl.where(live, vm_buf.index(st).load(gl.SliceLayout(1, MMA)).to(gl.float32), 0.0)
            s = s * ks[:, None] + (km - OFF * ks)[:, None] * qsum[None, :]
            s = gl.where(live[:, None], s, float("-inf"))

            m_new = gl.maximum(m_i, gl.max(s, 0))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[None, :])
            l_i = l_i * alpha + gl.sum(p, 0)
            # the min weighted by the codes' rounded weight (see _tiles._v_weights)
            # codes centred on 7.5 (the min term carries 7.5 * p * sc exactly): the rounding error of
            # pd, (pd - p * sc) * (c - 7.5), is then no longer of one sign over a token's channels (see
            # _tiles._v_weights, which removes it fully with a division per token; here that cost +8%
            # of this loop's instructions, centring +1%)
            pd = (p * vs[:, None]).to(DT)
            pm = gl.sum(p * (vm + 7.5 * vs)[:, None] - (OFF + 7.5) * pd.to(gl.float32), 0)
            acc_lo = acc_lo * alpha[None, :] + pm[None, :]
            acc_hi = acc_hi * alpha[None, :] + pm[None, :]
            pt = gl.convert_layout(_p_logical(pd), OP_B)
            v_lo, v_hi = _unpack(gl.convert_layout(_v_logical(vbuf.index(st).load(V_BYTES)), VT_UNPACK), FP16)
            acc_lo = mma_v2(gl.convert_layout(v_lo, OP_A), pt, acc_lo)
            acc_hi = mma_v2(gl.convert_layout(v_hi, OP_A), pt, acc_hi)
            m_i = m_new
        cp.wait_group(0)

        nz = l_i > 0
        inv = gl.where(nz, 1.0 / gl.where(nz, l_i, 1.0), 0.0)
        lse = gl.where(nz, m_i + gl.log2(gl.where(nz, l_i, 1.0)), float("-inf"))
        g = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
        idx = ((b * H + h) * gl.num_programs(2) + sp).to(gl.int64)
        gl.store(pl_ptr + idx * 8 + g, lse, mask=g < G)
        m = gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
        ch = _v_channel_byte(m)
        pp = po_ptr + (idx * 8 + g)[None, :] * 128 + ch[:, None]
        gl.store(pp, acc_lo * inv[None, :], mask=(g < G)[None, :])
        gl.store(pp + 64, acc_hi * inv[None, :], mask=(g < G)[None, :])

    @gluon.jit
    def decode_mma_aot(query, q_matrix, pool, block_table, seq_lens, max_blocks, partial_out, partial_lse,
                       HQ: gl.constexpr, H: gl.constexpr, G: gl.constexpr, T: gl.constexpr, REGION: gl.constexpr,
                       FP16: gl.constexpr, STAGES: gl.constexpr, HB: gl.constexpr, SPLITS: gl.constexpr,
                       QK_SCALE: gl.constexpr):
        """_decode_mma_kernel in the ahead-of-time form (kernels/aot.py): inputs, the integer scalar, outputs;
        contiguous [B, HQ, 128] queries, SPLITS splits (grid (B, H, SPLITS)), the scale baked in."""
        tiles_per_split = gl.cdiv(gl.cdiv(max_blocks * T, 64), SPLITS)
        _decode_mma_kernel(query, q_matrix, pool, pool.to(gl.pointer_type(gl.float16)), block_table, seq_lens,
                           partial_out, partial_lse, HQ * 128, 128, max_blocks, QK_SCALE, tiles_per_split,
                           H, G, T, REGION, FP16, STAGES, HB)

def run(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, tokens_per_block, hadamard_block, schedule,
        out, partial_out, partial_lse, q_prep) -> None:
    """One decode launch through the Gluon kernel as `schedule` says, then the merge; writes `out`.
    q_prep: fp32 [B, Hq, D] for the transformed queries when the q matrix is dense (else unused)."""
    bsz, hq, d = query.shape
    h = pool.shape[2]
    g = hq // h
    q, qm, hb = query, seq_lens, 0  # (seq_lens: a placeholder pointer when there is no matrix)
    if q_matrix is not None and hadamard_block > 0:  # applied inside the kernel: butterflies over D values
        qm, hb = q_matrix.contiguous(), hadamard_block
    elif q_matrix is not None:  # a dense matrix: one small kernel before, once per (sequence, KV head)
        q = q_prep
        _q_prep_kernel[(bsz, h)](query, q_matrix.contiguous(), q, query.stride(0), query.stride(1),
                                 G=g, GP=max(16, triton.next_power_of_2(g)), D=d, Q_CHUNK=16, PREC=1, num_warps=2)
    _decode_mma_kernel[(bsz, h, schedule.splits)](
        q, qm, pool, pool.view(torch.float16), block_table, seq_lens, partial_out, partial_lse, q.stride(0),
        q.stride(1), block_table.stride(0), float(scale) * LOG2E, schedule.tiles_per_split,
        H=h, G=g, T=tokens_per_block, REGION=pool.shape[-1], FP16=query.dtype == torch.float16,
        STAGES=schedule.num_stages, HB=hb, num_warps=1)
    merge_splits(partial_out, partial_lse, out, v_matrix, schedule, hadamard_block, prec=1)
