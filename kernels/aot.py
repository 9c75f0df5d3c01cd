"""Ahead-of-time variants of the kernels, in the form a TensorRT AOT plugin launches.

Each wrapper below is a @triton.jit kernel whose parameters follow TensorRT's AOT order —
the plugin's inputs (plugins/contract.py order), then integer scalars, then outputs — and which
calls the same kernel body as the JIT path, with every float and model constant baked in as a
constexpr. Strides are derived from the (contiguous) shapes. One plugin, one kernel: decode runs
unsplit (NUM_SPLITS = 1), since a split needs a second, reduce launch. The transforms are read as
dense matrices (HB = 0): the plugin's inputs are not promised to be in block-Hadamard form.
"""

from __future__ import annotations

import triton
import triton.language as tl

from trtllm_sawint4.aot_manifest import AotKernel, AotParam
from trtllm_sawint4.spec import KVCacheSpec

from ._common import LOG2E
from ._reduce import _reduce_kernel
from .append import _append_kernel
from .config import DEFAULT, KernelConfig
from .decode_triton import _decode_kernel
from .prefill import _prefill_kernel


@triton.jit
def append_aot(key, value, slot_mapping, pool, k_matrix, k_bias, v_matrix, num_tokens, pool_out,
               H: tl.constexpr, D: tl.constexpr, T: tl.constexpr, REGION: tl.constexpr, STORAGE: tl.constexpr,
               META32: tl.constexpr, HAS_KM: tl.constexpr, HAS_KB: tl.constexpr, HAS_VM: tl.constexpr,
               PREC: tl.constexpr, BLOCK_N: tl.constexpr, HB: tl.constexpr = 0):
    _append_kernel(pool_out, pool_out.to(tl.pointer_type(tl.bfloat16)), pool_out.to(tl.pointer_type(tl.float16)),
                   pool_out.to(tl.pointer_type(tl.float32)), key, value, slot_mapping, k_matrix, k_bias, v_matrix,
                   num_tokens, H * D, D, H * D, D, H, D, T, REGION, STORAGE, META32, HAS_KM, HAS_KB, HAS_VM, PREC, BLOCK_N, HB)


@triton.jit
def decode_aot(query, pool, block_table, seq_lens, q_matrix, v_matrix, max_blocks, out,
               HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               T: tl.constexpr, REGION: tl.constexpr, STORAGE: tl.constexpr, META32: tl.constexpr, HAS_QM: tl.constexpr,
               HAS_VM: tl.constexpr, BLOCK_N: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               QK_SCALE: tl.constexpr, Q_CHUNK: tl.constexpr = 16):
    tiles = tl.cdiv(max_blocks * T, BLOCK_N)
    _decode_kernel(query, pool, pool.to(tl.pointer_type(tl.bfloat16)),
                   pool.to(tl.pointer_type(tl.float32)), block_table, seq_lens, q_matrix, v_matrix, out, out, out,
                   HQ * D, D, HQ * D, D, max_blocks, QK_SCALE, tiles, max_blocks * T,
                   H, G, GP, D, T, REGION, STORAGE, META32, HAS_QM, HAS_VM, False, BLOCK_N, DT, PREC, Q_CHUNK)


@triton.jit
def prefill_aot(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, num_seqs, max_blocks, out,
                HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, T: tl.constexpr,
                REGION: tl.constexpr, STORAGE: tl.constexpr, META32: tl.constexpr, HAS_QM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr, QK_SCALE: tl.constexpr, HB: tl.constexpr = 0):
    _prefill_kernel(query, pool, pool.to(tl.pointer_type(tl.bfloat16)),
                    pool.to(tl.pointer_type(tl.float32)), block_table, seq_lens, query_start_loc, q_matrix, v_matrix,
                    out, out,
                    HQ * D, D, HQ * D, D, max_blocks, QK_SCALE, num_seqs,
                    H, G, D, T, REGION, STORAGE, META32, HAS_QM, False, BLOCK_M, BLOCK_N, B_PAD, DT, PREC, HB)


@triton.jit
def reduce_aot(partial_out, partial_lse, out, HQ: tl.constexpr, H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
               D: tl.constexpr, SPLITS: tl.constexpr, SB: tl.constexpr, ONE_LOAD: tl.constexpr):
    _reduce_kernel(partial_out, partial_lse, out, HQ * D, D, SPLITS, H, G, GP, D, SB, ONE_LOAD)


def _inp(name, type_):
    return AotParam(name, "input", type_)


def model_kernels(head_dim: int, num_heads: int, num_kv_heads: int, tokens_per_block: int, kv_format: str,
                  rotate_v: bool, calibrated: bool, query_dtype: str, scale: float, max_batch: int = 256,
                  config: KernelConfig = DEFAULT, **_unused) -> list[AotKernel]:
    """The append, decode and prefill kernels of one model configuration (prefill tiles and append's
    bf16 precision from `config`)."""
    spec = KVCacheSpec(head_dim, num_kv_heads, tokens_per_block, kv_format, rotate_v=rotate_v)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if rotate_v:
        raise ValueError("rotate_v is not available ahead of time yet: the prefill kernel rotates the output "
                         "back through a scratch buffer that the single-output plugin does not have")
    act = {"bf16": "*bf16", "fp16": "*fp16"}[query_dtype]
    dot = tl.float16 if (query_dtype == "fp16" and spec.storage != "bf16") else tl.bfloat16
    h, g, d, t, r = num_kv_heads, num_heads // num_kv_heads, head_dim, tokens_per_block, spec.region_bytes
    fmt = dict(STORAGE=spec.format.kernel_code, META32=spec.format.meta32)
    transformed = spec.rotated or calibrated
    qk_scale = float(scale) * LOG2E

    append = AotKernel(
        op="append", fn=append_aot,
        params=[_inp("key", act), _inp("value", act), _inp("slot_mapping", "*i32"), _inp("pool", "*u8"),
                _inp("k_matrix", "*fp32"), _inp("k_bias", "*fp32"), _inp("v_matrix", "*fp32"),
                AotParam("num_tokens", "scalar", "i32", value="key.shape[0]"),
                AotParam("pool_out", "output", "*u8", alias="pool")],
        constexprs=dict(H=h, D=d, T=t, REGION=r, **fmt, HAS_KM=transformed, HAS_KB=calibrated, HAS_VM=rotate_v,
                        PREC=config.append.bf16_prec if query_dtype == "bf16" else 2, BLOCK_N=64, HB=0),
        grid=("cdiv(key.shape[0], 64)", str(h), "1"), num_warps=4 if d <= 128 else 8)
    decode = AotKernel(
        op="decode", fn=decode_aot,
        params=[_inp("query", act), _inp("pool", "*u8"), _inp("block_table", "*i32"), _inp("seq_lens", "*i32"),
                _inp("q_matrix", "*fp32"), _inp("v_matrix", "*fp32"),
                AotParam("max_blocks", "scalar", "i32", value="block_table.shape[1]"),
                AotParam("out", "output", act, shape=["query.shape[0]", "query.shape[1]", "query.shape[2]"])],
        constexprs=dict(HQ=num_heads, H=h, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, T=t, REGION=r, **fmt,
                        HAS_QM=transformed, HAS_VM=rotate_v, BLOCK_N=64, DT=dot, PREC=1, QK_SCALE=qk_scale,
                        Q_CHUNK=16),
        grid=("query.shape[0]", str(h), "1"), num_warps=4, num_stages=3)
    tile = config.prefill.tile(d, spec.storage)
    block_m, block_n, warps, stages = tile.block_m, tile.block_n, tile.num_warps, tile.num_stages
    prefill = AotKernel(
        op="prefill", fn=prefill_aot,
        params=[_inp("query", act), _inp("pool", "*u8"), _inp("block_table", "*i32"), _inp("seq_lens", "*i32"),
                _inp("query_start_loc", "*i32"), _inp("q_matrix", "*fp32"), _inp("v_matrix", "*fp32"),
                AotParam("num_seqs", "scalar", "i32", value="block_table.shape[0]"),
                AotParam("max_blocks", "scalar", "i32", value="block_table.shape[1]"),
                AotParam("out", "output", act, shape=["query.shape[0]", "query.shape[1]", "query.shape[2]"])],
        constexprs=dict(HQ=num_heads, H=h, G=g, D=d, T=t, REGION=r, **fmt, HAS_QM=transformed, BLOCK_M=block_m,
                        BLOCK_N=block_n, B_PAD=triton.next_power_of_2(max(2, max_batch)), DT=dot, PREC=1,
                        QK_SCALE=qk_scale, HB=0),
        grid=(f"cdiv(query.shape[0], {block_m}) + block_table.shape[0]", str(num_heads), "1"),
        num_warps=warps, num_stages=stages, limits={"block_table.shape[0]": triton.next_power_of_2(max(2, max_batch))})
    return [append, decode, prefill]


def gluon_decode_kernels(num_heads: int, num_kv_heads: int, tokens_per_block: int, kv_format: str, query_dtype: str,
                         scale: float, splits: int = 4) -> list[AotKernel]:
    """The Gluon decode path ahead of time (head_dim 128, INT4): kernels/decode_gluon.py's kernel writing
    `splits` partials per (sequence, KV head), then the merge. Two launches, so not one TensorRT plugin;
    these exist to run Gluon cubins of one Triton on a machine with another (scripts/cross_version_cubins.py).
    saw_int4 reads q_matrix in block-Hadamard form (blocks of 128); int4 ignores it."""
    from . import decode_gluon

    if not decode_gluon.HAVE_GLUON:
        raise RuntimeError(f"the Gluon decode kernel is unavailable with this Triton: {decode_gluon._UNAVAILABLE}")
    spec = KVCacheSpec(decode_gluon.HEAD_DIM, num_kv_heads, tokens_per_block, kv_format)
    h, g = num_kv_heads, num_heads // num_kv_heads
    if spec.storage != "int4" or spec.metadata_dtype != "fp16" or g > decode_gluon.MAX_GROUP or tokens_per_block % 64:
        raise ValueError("the Gluon decode kernel covers INT4 with fp16 metadata, G <= 8, 64-token multiples")
    act = {"bf16": "*bf16", "fp16": "*fp16"}[query_dtype]
    gp, d = decode_gluon.MAX_GROUP, decode_gluon.HEAD_DIM
    partial_shape = ["query.shape[0]", str(h), str(splits), str(gp)]
    decode = AotKernel(
        op="decode_gluon", fn=decode_gluon.decode_mma_aot,
        params=[_inp("query", act), _inp("q_matrix", "*fp32"), _inp("pool", "*u8"), _inp("block_table", "*i32"),
                _inp("seq_lens", "*i32"), AotParam("max_blocks", "scalar", "i32", value="block_table.shape[1]"),
                AotParam("partial_out", "output", "*fp32", shape=partial_shape + [str(d)]),
                AotParam("partial_lse", "output", "*fp32", shape=partial_shape)],
        constexprs=dict(HQ=num_heads, H=h, G=g, T=tokens_per_block, REGION=spec.region_bytes, FP16=query_dtype == "fp16",
                        STAGES=2, HB=spec.rotation_block if spec.rotated else 0, SPLITS=splits,
                        QK_SCALE=float(scale) * LOG2E),
        grid=("query.shape[0]", str(h), str(splits)), num_warps=1)
    sb = max(2, min(triton.next_power_of_2(splits), 16384 // d))
    merge = AotKernel(
        op="decode_gluon_merge", fn=reduce_aot,
        params=[_inp("partial_out", "*fp32"), _inp("partial_lse", "*fp32"),
                AotParam("out", "output", act, shape=["partial_out.shape[0]", str(num_heads), str(d)])],
        constexprs=dict(HQ=num_heads, H=h, G=g, GP=gp, D=d, SPLITS=splits, SB=sb, ONE_LOAD=splits <= sb),
        grid=("partial_out.shape[0]", str(h), str(g)), num_warps=4)
    return [decode, merge]
