"""Paged decode attention over the quantized cache: split-KV kernel + reduce kernel.

Grid (B, H, S): one program holds all G query heads of KV head h (padded to GP >= 16 rows for
tl.dot) and walks tiles of BLOCK_N tokens of its split of the context. Each KV byte is read once.
Dequantization is folded into the dot products (codes are exact in bf16/fp16):

    q . k_t   = s_t * (q . c_t) + m_t * sum(q)
    sum_t p_t v_t = (p * s) @ C + (p . m)

so the codes feed the tensor cores directly. The split count S comes from host-side shapes only
(batch, heads, max_blocks of the block table), never from seq_lens: no host sync, graph-capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from . import decode_mma
from ._common import STORAGE_CODE, _matmul_halves, _nan_rows_with_nonfinite, _transform_rows
from ._tiles import (_code_offset, _code_values, _kv_meta_values, _load_codes, _load_kv_meta, _load_kv_tile, _opaque,
                     _tile_block_ids, _tile_rows)

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn, tmask, m_i, l_i, acc_lo, acc_hi,
                 STORAGE: tl.constexpr, DT: tl.constexpr):
    """One tile of the online softmax: the updated (m_i, l_i, acc_lo, acc_hi)."""
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
                   R: tl.constexpr, STORAGE: tl.constexpr, META32: tl.constexpr, HAS_QM: tl.constexpr,
                   HAS_VM: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr,
                   PREC: tl.constexpr, Q_CHUNK: tl.constexpr = 16, ONE_TILE: tl.constexpr = False):
    """max_tokens: block-table width x T; the block-id loads do not wait for seq_len's. The q matrix
    is read dense even when declared in block-Hadamard form: on the H200 the dense variant was faster
    at most bench points in sessions 5 and 6 (docs/kernels.md); only the V merge
    (_reduce_rotate_kernel) uses the block-Hadamard form. ONE_TILE (tiles_per_split == 1): the
    split's only tile is loaded before the q transform, so that its memory latency overlaps the
    transform's instead of following it (a pipelined loop issues its first loads after it)."""
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
    if ONE_TILE:
        tmask0 = sp * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
        blk0 = _tile_block_ids(bt_row, sp * BLOCK_N, max_tokens, BLOCK_N, T).to(tl.int64)
        kbase0 = (blk0 * 2 * H + h) * R
        row0 = _tile_rows(sp * BLOCK_N, BLOCK_N, T)
        k0, k1 = _load_codes(pool_ptr, poolb_ptr, kbase0, row0, tmask0, D, STORAGE)
        v0, v1 = _load_codes(pool_ptr, poolb_ptr, kbase0 + H * R, row0, tmask0, D, STORAGE)
        kmeta0 = _load_kv_meta(poolf_ptr, kbase0, row0, tmask0, D, T, STORAGE, META32)
        vmeta0 = _load_kv_meta(poolf_ptr, kbase0 + H * R, row0, tmask0, D, T, STORAGE, META32)

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
        if sp * BLOCK_N < seq_len:  # (a tile of masked tokens alone would turn the softmax state into nan)
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn,
                                                    tmask0, m_i, l_i, acc_lo, acc_hi, STORAGE, DT)
    else:
        n_tiles = tl.cdiv(seq_len, BLOCK_N)
        t0 = sp * tiles_per_split
        t1 = tl.minimum(t0 + tiles_per_split, n_tiles)
        # Block ids are read one tile ahead into a loop-carried value: a code load whose address comes
        # from a load in the same iteration gets a single pipeline buffer from Triton's pipeliner. Ids
        # past seq_len (inside the table row) may be read but only address masked-off tokens.
        id_limit = tl.minimum(max_tokens, (t0 + tiles_per_split) * BLOCK_N)
        blk_next = _tile_block_ids(bt_row, t0 * BLOCK_N, id_limit, BLOCK_N, T)
        for t in range(t0, t1):
            tmask = t * BLOCK_N + tl.arange(0, BLOCK_N) < seq_len
            blk = blk_next.to(tl.int64)
            blk_next = _tile_block_ids(bt_row, (t + 1) * BLOCK_N, id_limit, BLOCK_N, T)
            row = _tile_rows(t * BLOCK_N, BLOCK_N, T)
            kbase = (blk * 2 * H + h) * R
            k_lo, k_hi, ks, km = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase, row, tmask, D, T, STORAGE,
                                               META32, DT, PREC != 0)
            v_lo, v_hi, vs, vmn = _load_kv_tile(pool_ptr, poolb_ptr, poolf_ptr, kbase + H * R, row, tmask, D, T,
                                                STORAGE, META32, DT, PREC != 0)
            m_i, l_i, acc_lo, acc_hi = _attend_tile(q_lo, q_hi, qsum, k_lo, k_hi, ks, km, v_lo, v_hi, vs, vmn, tmask,
                                                    m_i, l_i, acc_lo, acc_hi, STORAGE, DT)

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


def _pool_views(pool):
    """The pool as uint8, bf16 and fp32 (typed views for element-offset addressing: the kernels
    never cast pointers; every region is a multiple of 4 bytes; fp16 metadata is read as 32-bit words)."""
    return pool, pool.view(torch.bfloat16), pool.view(torch.float32)


#: Dot operand dtype under the interpreter (tests may set tl.float16 to check the INT4 code-offset
#: algebra of the GPU path; the interpreter's bf16 dot is wrong).
INTERP_DOT_DTYPE = None


def _dot_dtype(query, storage, interp):
    if interp:
        return INTERP_DOT_DTYPE if INTERP_DOT_DTYPE is not None and storage != "bf16" else tl.float32
    if storage == "bf16" or query.dtype != torch.float16:
        return tl.bfloat16
    return tl.float16


#: Splits x channels the reduce reads per load (SB = this // head_dim splits): sized for registers
#: (64 fp32 per thread and half with 8 warps). Above REDUCE_WARP4_ELEMS the reduce runs 8 warps.
#: The V-rotating merge unrolls its G rows and keeps the smaller tile.
REDUCE_TILE_ELEMS = 16384
REDUCE_WARP4_ELEMS = 4096

_NUM_SMS: dict = {}


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


#: Tunables (`sawint4 bench --only tune` re-measures them). Tile configs by regime: "many" when the
#: batch alone gives at least 2 CTAs per SM (batch x KV heads >= 2 x SMs, head_dim >= 128), "tiny"
#: when the whole step is at most TINY_TOKEN_HEADS tokens x KV heads (latency-bound: 4 warps shorten
#: each program's chain), "few" otherwise (the context is split), and bf16 storage. Splits
#: (plan_splits): aim at waves x SMs programs, each with at least min_tiles_per_split tiles.
#: "maxnreg" (a per-thread register cap; absent: the compiler's choice) trades spills for resident
#: programs; `--only tunereg` measures it: 168 keeps 6 two-warp programs per SM where ptxas would
#: take 211-220 registers (4 per SM): plain INT4 3-13% faster from 8k tokens (session 5).
#: Measured on the H200: docs/kernels.md (sessions 4, 5).
CONFIG = {
    # "many": 512 programs of 4-6 resident per SM fill 0.65 of the GPU (ncu): split long contexts in 3
    "many": {"block_n": 64, "num_warps": 2, "num_stages": 3, "waves": 8, "min_tiles_per_split": 32, "q_chunk": 16,
             "maxnreg": 168},
    "few": {"block_n": 64, "num_warps": 2, "num_stages": 3, "waves": 4, "min_tiles_per_split": 2, "q_chunk": 16,
            "maxnreg": 168},
    "tiny": {"block_n": 64, "num_warps": 4, "num_stages": 3, "waves": 2, "min_tiles_per_split": 1, "q_chunk": 64,
             "maxnreg": 168},
    # bf16: 32 KB tiles, one buffer keeps twice the programs resident
    "bf16": {"block_n": 64, "num_warps": 4, "num_stages": 2, "waves": 2, "min_tiles_per_split": 2, "q_chunk": 16},
}

#: Splits of one tile load it before the q transform (_decode_kernel's ONE_TILE); False: the
#: pipelined loop for every split (an A/B switch for scripts/ab_decode_knobs.py).
ONE_TILE_EARLY_LOADS = True

#: INT4 decode through the Gluon kernel of kernels/decode_mma.py wherever it applies (mma_applies);
#: False: the Triton kernel everywhere (an A/B switch). Its splits: aim at `waves` x SMs one-warp
#: programs of at least `min_tiles_per_split` tiles; `stages`: cp.async buffers (2 keeps more programs
#: resident than 3: session 7 measured 2 faster at every shape). Session 7 (scripts/ab_decode_knobs.py):
#: 4-tile splits took 1 x 16k / 8 x 2k from 18.5 / 17.5 to 16.5 / 14.5 us (saw_int4); 8 waves were
#: slower from 8 x 32k up.
MMA_DECODE = True
#: The Gluon kernel in the "tiny" regime too: 2-3x slower there (session 7: 1 x 1k 17 us against 7.8),
#: so off.
MMA_IN_TINY = False
MMA_CONFIG = {"stages": 2, "waves": 16, "min_tiles_per_split": 4}

#: Largest batch x KV heads x max_tokens of the "tiny" regime (1 x 8k or 8 x 1k at 8 KV heads).
TINY_TOKEN_HEADS = 65536

#: Largest head_dim the "maxnreg" caps apply to: they were measured at 64 and 128; at 256 the 2-warp
#: tiles need all 255 registers, and a cap of 168 spills 512 bytes per thread (compiled for sm_90,
#: scripts/inspect_kernels.py; tests/test_kernel_pipelining.py keeps the launched configs spill-free).
MAXNREG_MAX_HEAD_DIM = 128


def launch_maxnreg(cfg: dict, head_dim: int) -> int | None:
    """The register cap a decode launch with tile config `cfg` uses at this head_dim (None: ptxas's choice)."""
    return cfg.get("maxnreg") if head_dim <= MAXNREG_MAX_HEAD_DIM else None


def tile_config(batch: int, kv_heads: int, head_dim: int, storage: str, num_sms: int,
                max_tokens: int | None = None) -> dict:
    """The CONFIG entry used for a decode launch (max_tokens: block-table width x tokens per block;
    None: not tiny)."""
    if storage == "bf16":
        return CONFIG["bf16"]
    if batch * kv_heads >= 2 * num_sms and head_dim >= 128:
        return CONFIG["many"]
    if max_tokens is not None and batch * kv_heads * max_tokens <= TINY_TOKEN_HEADS:
        return CONFIG["tiny"]
    return CONFIG["few"]


def regime_of(batch: int, kv_heads: int, head_dim: int, max_tokens: int, num_sms: int) -> str:
    """The CONFIG key tile_config picks for an INT4 launch of this shape."""
    cfg = tile_config(batch, kv_heads, head_dim, "int4", num_sms, max_tokens)
    return next(k for k, v in CONFIG.items() if v is cfg)


def plan_splits(batch: int, kv_heads: int, max_tokens: int, block_n: int, num_sms: int,
                waves: int, min_tiles: int) -> tuple[int, int]:
    """(num_splits, tiles_per_split) from host-side shapes only."""
    max_tiles = max(1, triton.cdiv(max_tokens, block_n))
    want = max(1, triton.cdiv(waves * num_sms, max(1, batch * kv_heads)))
    splits = max(1, min(want, triton.cdiv(max_tiles, min_tiles)))
    tiles_per_split = triton.cdiv(max_tiles, splits)
    splits = triton.cdiv(max_tiles, tiles_per_split)
    return splits, tiles_per_split


def mma_applies(batch: int, kv_heads: int, head_dim: int, group: int, tokens_per_block: int, storage: str,
                meta_dtype: str, query_dtype, max_tokens: int, num_sms: int, on_gpu: bool) -> bool:
    """Whether decode runs the Gluon kernel (kernels/decode_mma.py): its scope (INT4 codes, head_dim
    128, G <= 8, fp16 metadata, 16-bit queries, blocks of whole 64-token tiles), outside the
    latency-bound "tiny" regime (there the Triton kernel's single launch and early loads win)."""
    return (MMA_DECODE and on_gpu and storage == "int4"
            and head_dim == decode_mma.HEAD_DIM and group <= decode_mma.MAX_GROUP and meta_dtype == "fp16"
            and query_dtype in (torch.bfloat16, torch.float16) and tokens_per_block % decode_mma.BLOCK_N == 0
            and (MMA_IN_TINY or regime_of(batch, kv_heads, head_dim, max_tokens, num_sms) != "tiny")
            and decode_mma.available())


def _decode_mma(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, rotation_block, num_splits, t, out):
    """decode() through the Gluon kernel (which also applies a q_matrix in block-Hadamard form), then
    the merge."""
    bsz, hq, d = query.shape
    h = pool.shape[2]
    g = hq // h
    max_tiles = max(1, triton.cdiv(block_table.shape[1] * t, decode_mma.BLOCK_N))
    if num_splits is None:
        splits, tps = plan_splits(bsz, h, max_tiles * decode_mma.BLOCK_N, decode_mma.BLOCK_N,
                                  _num_sms(pool.device), MMA_CONFIG["waves"], MMA_CONFIG["min_tiles_per_split"])
    else:
        tps = triton.cdiv(max_tiles, max(1, num_splits))
        splits = triton.cdiv(max_tiles, tps)
    if v_matrix is not None:
        splits = max(splits, 2)  # (the V-rotating merge; an empty split is harmless)
    q, qm, hb = query, seq_lens, 0  # (seq_lens: a placeholder pointer when there is no matrix)
    if q_matrix is not None and rotation_block > 0:  # applied inside the kernel: butterflies over D values
        qm, hb = q_matrix.contiguous(), rotation_block
    elif q_matrix is not None:  # a dense matrix: one small kernel before, once per (sequence, KV head)
        q = torch.empty((bsz, hq, d), dtype=torch.float32, device=query.device)
        decode_mma._q_prep_kernel[(bsz, h)](query, q_matrix.contiguous(), q, query.stride(0), query.stride(1),
                                            G=g, GP=max(16, triton.next_power_of_2(g)), D=d, Q_CHUNK=16, PREC=1,
                                            num_warps=2)
    gp = decode_mma.MAX_GROUP
    po = torch.empty((bsz, h, splits, gp, d), dtype=torch.float32, device=query.device)
    pl = torch.empty((bsz, h, splits, gp), dtype=torch.float32, device=query.device)
    decode_mma._decode_mma_kernel[(bsz, h, splits)](
        q, qm, pool, pool.view(torch.float16), block_table, seq_lens, po, pl, q.stride(0), q.stride(1),
        block_table.stride(0), float(scale) * LOG2E, tps,
        H=h, G=g, T=t, R=pool.shape[-1], FP16=query.dtype == torch.float16, STAGES=MMA_CONFIG["stages"], HB=hb,
        num_warps=1)
    _merge_splits(po, pl, out, v_matrix, splits, g, gp, d, rotation_block, prec=1)
    return out


def _merge_splits(po, pl, out, v_matrix, splits, g, gp, d, rotation_block, prec):
    """The reduce launch: one query row per program, or one KV head per program when it also
    rotates V back."""
    bsz, h = po.shape[:2]
    if v_matrix is None:
        sb = max(2, min(triton.next_power_of_2(splits), REDUCE_TILE_ELEMS // d))
        _reduce_kernel[(bsz, h, g)](po, pl, out, out.stride(0), out.stride(1), splits,
                                    H=h, G=g, GP=gp, D=d, SB=sb, ONE_LOAD=splits <= sb,
                                    num_warps=4 if sb * d <= REDUCE_WARP4_ELEMS else 8)
    else:
        sb = max(2, min(triton.next_power_of_2(splits), min(REDUCE_TILE_ELEMS, REDUCE_WARP4_ELEMS) // d))
        _reduce_rotate_kernel[(bsz, h)](po, pl, v_matrix.contiguous(), out, out.stride(0), out.stride(1), splits,
                                        H=h, G=g, GP=gp, D=d, SB=sb, ONE_LOAD=splits <= sb, PREC=prec,
                                        HB=rotation_block, num_warps=4)


def decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale: float, storage: str, meta_dtype: str,
           rotation_block: int = 0, num_splits: int | None = None):
    """Same signature and result as trtllm_sawint4.ops.reference.decode."""
    from ..layout import tokens_per_block_of

    bsz, hq, d = query.shape
    h = pool.shape[2]
    g = hq // h
    t = tokens_per_block_of(pool, d, storage, meta_dtype)
    out = torch.empty_like(query)
    if bsz == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    interp = pool.device.type == "cpu"
    max_tokens = block_table.shape[1] * t
    if mma_applies(bsz, h, d, g, t, storage, meta_dtype, query.dtype, max_tokens, _num_sms(pool.device), not interp):
        try:
            return _decode_mma(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, rotation_block,
                               num_splits, t, out)
        except CompilationError as e:  # this Triton's Gluon cannot build it: the Triton kernel serves from now on
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            decode_mma.switch_off(f"{type(e).__name__}: {lines[-1] if lines else ''}")
    cfg = tile_config(bsz, h, d, storage, _num_sms(pool.device), max_tokens)
    block_n = 16 if interp else cfg["block_n"]
    gp = max(16, triton.next_power_of_2(g))
    if num_splits is None:
        splits, tps = plan_splits(bsz, h, max_tokens, block_n, _num_sms(pool.device), cfg["waves"],
                                  cfg["min_tiles_per_split"])
    else:
        max_tiles = max(1, triton.cdiv(max_tokens, block_n))
        tps = triton.cdiv(max_tiles, max(1, num_splits))
        splits = triton.cdiv(max_tiles, tps)
    if v_matrix is not None:
        splits = max(splits, 2)  # an empty split is harmless
    if splits > 1:
        po = torch.empty((bsz, h, splits, gp, d), dtype=torch.float32, device=query.device)
        pl = torch.empty((bsz, h, splits, gp), dtype=torch.float32, device=query.device)
    else:
        po = pl = out
    dt = _dot_dtype(query, storage, interp)
    prec = 0 if interp else 1
    dummy = seq_lens
    qm = q_matrix.contiguous() if q_matrix is not None else dummy
    vm = v_matrix.contiguous() if v_matrix is not None else dummy
    _decode_kernel[(bsz, h, splits)](
        query, *_pool_views(pool), block_table, seq_lens, qm, vm, out, po, pl,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        float(scale) * LOG2E, tps, max_tokens,
        H=h, G=g, GP=gp, D=d, T=t, R=pool.shape[-1], STORAGE=STORAGE_CODE[storage], META32=meta_dtype == "fp32",
        HAS_QM=q_matrix is not None, HAS_VM=v_matrix is not None, SPLIT=splits > 1, BLOCK_N=block_n,
        DT=dt, PREC=prec, Q_CHUNK=16 if interp else min(d, cfg.get("q_chunk", 16)),
        ONE_TILE=ONE_TILE_EARLY_LOADS and tps == 1,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=launch_maxnreg(cfg, d),
    )
    if splits > 1:
        _merge_splits(po, pl, out, v_matrix, splits, g, gp, d, rotation_block, prec)
    return out
