"""The torch custom ops an AutoDeploy graph calls: cached attention over the SAW-INT4 pool, and its
once-per-step metadata preparation.

    sawint4::trtllm_prepare_metadata(position_ids, batch_info_host, cu_seqlen, seq_len_with_cache)
        -> [token_seq, token_pos]
    sawint4::trtllm_mha_with_cache(q, k, v,
                                   batch_info_host, cu_seqlen, cu_num_pages, cache_loc, seq_len_with_cache,
                                   token_seq, token_pos, kv_pool,
                                   scale, kv_format, rotation_block, rotate_v, sign_seed, metadata_dtype,
                                   sliding_window=None, out=None) -> y

The argument order is AutoDeploy's call layout (qkv, standard metadata, extra metadata, caches,
constants); `adapter` declares the same lists. q/k/v are [batch, seq, heads, head_dim] ("bsnd"): a
generate-only step is [B, 1, ...], any other step [1, N, ...]. The attention op writes the step's new
K/V with ``torch.ops.sawint4.append``, then runs ``torch.ops.sawint4.prefill`` on the prefill (and
extend) tokens and ``torch.ops.sawint4.decode`` on the decode tokens: the same ops, checks, kernels
(CUDA) and PyTorch reference (CPU) as every other path of this project.

CUDA graphs: per-step variation comes only from device tensors (`metadata`), the host integers of
batch_info_host decide the split, and nothing waits on the device (the index checks of the public ops
skip themselves while a graph is being captured). The per-layer transform tensors (the rotation) are
built once per (format, device) before any capture, by the pool handler's allocate().

The prepare op's outputs take their shapes from position_ids, so the fake (meta) implementations need
no data: AutoDeploy's shape propagation and torch.compile see fixed shapes.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ... import ops as _sawint4_ops  # noqa: F401  (defines torch.ops.sawint4.{append,decode,prefill})
from ...layout import tokens_per_block_of
from ...spec import KVCacheSpec
from ...transforms import LayerTransform, build_layer_transform
from . import metadata

PREPARE_OP = "sawint4::trtllm_prepare_metadata"
ATTENTION_OP = "sawint4::trtllm_mha_with_cache"


@functools.lru_cache(maxsize=None)
def cache_spec(head_dim: int, num_kv_heads: int, tokens_per_block: int, kv_format: str, rotation_block: int,
               rotate_v: bool, sign_seed: Optional[int], metadata_dtype: str) -> KVCacheSpec:
    """The KVCacheSpec of one layer's pool (rotation_block 0: the format's default)."""
    rotated = kv_format == "saw_int4"
    return KVCacheSpec(head_dim=head_dim, num_kv_heads=num_kv_heads, tokens_per_block=tokens_per_block,
                       kv_format=kv_format, rotation_block=(rotation_block or None) if rotated else None,
                       rotate_v=bool(rotate_v) if rotated else False, sign_seed=sign_seed if rotated else None,
                       metadata_dtype=metadata_dtype)


#: (format, rotation options, shapes, device) -> the layer transform on that device. Without channel
#: calibration every layer of a model has the same transform, so the layers share one copy.
_TRANSFORMS: dict[tuple, LayerTransform] = {}


def layer_transform(spec: KVCacheSpec, device: torch.device | str) -> LayerTransform:
    """The (uncalibrated) transform tensors of `spec` on `device`, built on first use."""
    device = torch.device(device)
    key = (spec.kv_format, spec.head_dim, spec.num_kv_heads, spec.rotation_block, spec.rotate_v, spec.sign_seed,
           spec.metadata_dtype, str(device))
    tf = _TRANSFORMS.get(key)
    if tf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the {spec.describe()} transform tensors would be created inside CUDA-graph capture; they are "
                "built when the pool is allocated (resource handler allocate()) or on the first eager step")
        tf = build_layer_transform(spec).to(device)
        _TRANSFORMS[key] = tf
    return tf


@functools.cache
def _ops_take_window() -> bool:
    """Whether torch.ops.sawint4.decode/prefill have the trailing `window` (sliding-window) argument."""
    names = {a.name for a in torch.ops.sawint4.decode.default._schema.arguments}
    return "window" in names


def supports_sliding_window() -> bool:
    return _ops_take_window()


@torch.library.custom_op(PREPARE_OP, mutates_args=())
def prepare_metadata(position_ids: Tensor, batch_info_host: Tensor, cu_seqlen: Tensor,
                     seq_len_with_cache: Tensor) -> list[Tensor]:
    """Per-token sequence index and absolute position, shared by every layer of the step."""
    split = metadata.batch_split(batch_info_host)
    seq, pos = metadata.token_seq_and_pos(cu_seqlen, seq_len_with_cache, split.num_seqs, position_ids.numel())
    return [seq, pos]


@prepare_metadata.register_fake
def _(position_ids, batch_info_host, cu_seqlen, seq_len_with_cache):
    n = position_ids.numel()
    return [position_ids.new_empty(n, dtype=torch.int32), position_ids.new_empty(n, dtype=torch.int32)]


def _pool_tokens_per_block(kv_pool: Tensor, head_dim: int, kv_format: str, metadata_dtype: str) -> int:
    if kv_format not in ("saw_int4", "int4", "bf16", "int8"):
        raise ValueError(f"kv_format: must be one of saw_int4, int4, int8, bf16, got {kv_format!r}")
    if kv_pool.dim() != 4 or kv_pool.dtype != torch.uint8:
        raise ValueError(f"kv_pool: must be uint8 [num_blocks, 2, num_kv_heads, region_bytes], got "
                         f"{kv_pool.dtype} {list(kv_pool.shape)}")
    try:
        return tokens_per_block_of(kv_pool, head_dim, "int4" if kv_format == "saw_int4" else kv_format, metadata_dtype)
    except ValueError as e:
        raise ValueError(f"kv_pool: {e}") from None


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v: must be [batch, seq, heads, head_dim] ('bsnd') with k and v alike, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k: batch, seq and head_dim must agree, got {list(q.shape)} and {list(k.shape)}")


@torch.library.custom_op(ATTENTION_OP, mutates_args=("kv_pool",))
def mha_with_cache(q: Tensor, k: Tensor, v: Tensor,
                   batch_info_host: Tensor, cu_seqlen: Tensor, cu_num_pages: Tensor, cache_loc: Tensor,
                   seq_len_with_cache: Tensor,
                   token_seq: Tensor, token_pos: Tensor,
                   kv_pool: Tensor,
                   scale: Optional[float], kv_format: str, rotation_block: int, rotate_v: bool,
                   sign_seed: Optional[int], metadata_dtype: str, sliding_window: Optional[int] = None,
                   out: Optional[Tensor] = None) -> Tensor:
    """Append this step's K/V to the pool, then causal attention of its queries over the pool."""
    _check_qkv(q, k, v)
    b, s, hq, d = q.shape
    spec = cache_spec(d, k.shape[2], _pool_tokens_per_block(kv_pool, d, kv_format, metadata_dtype), kv_format,
                      rotation_block, rotate_v, sign_seed, metadata_dtype)
    tf = layer_transform(spec, kv_pool.device)
    split = metadata.batch_split(batch_info_host)
    np_, npt, ns, nt = split.num_prefill, split.num_prefill_tokens, split.num_seqs, split.num_tokens
    if nt > b * s or token_seq.numel() < nt:
        raise ValueError(f"batch_info_host: the step has {nt} tokens but q holds {b * s} (token metadata "
                         f"{token_seq.numel()})")
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else 0
    if window and not _ops_take_window():
        raise NotImplementedError("sliding_window: the installed torch.ops.sawint4 ops have no window argument")
    extra = (window,) if _ops_take_window() else ()
    scale = float(scale) if scale is not None else d ** -0.5

    q2, k2, v2 = (x.reshape(b * s, x.shape[2], d) for x in (q, k, v))
    table = metadata.block_table(cache_loc, cu_num_pages, ns, metadata.max_blocks_per_seq(batch_info_host))
    seq_lens, starts = seq_len_with_cache[:ns], cu_seqlen[:ns + 1]
    slots = metadata.slot_mapping(table, token_seq[:nt], token_pos[:nt], spec.tokens_per_block)
    storage, meta = spec.storage, spec.metadata_dtype
    torch.ops.sawint4.append(kv_pool, k2[:nt].contiguous(), v2[:nt].contiguous(), slots, tf.k_matrix, tf.k_bias,
                             tf.v_matrix, storage, meta, tf.rotation_block)

    y = out.view(b * s, hq, d) if out is not None else torch.empty((b * s, hq, d), dtype=q.dtype, device=q.device)
    if np_:
        y[:npt] = torch.ops.sawint4.prefill(q2[:npt].contiguous(), kv_pool, table[:np_], seq_lens[:np_],
                                            starts[:np_ + 1], tf.q_matrix, tf.v_matrix, scale, storage, meta,
                                            tf.rotation_block, *extra)
    if split.num_decode:
        y[npt:nt] = torch.ops.sawint4.decode(q2[npt:nt].contiguous(), kv_pool, table[np_:ns], seq_lens[np_:ns],
                                             tf.q_matrix, tf.v_matrix, scale, storage, meta, tf.rotation_block,
                                             *extra)
    if nt < b * s:
        y[nt:].zero_()  # rows past the step's tokens (a padded buffer): defined values, not stale ones
    if out is not None:
        # AutoDeploy's piecewise runner passes `out` and reads it; a custom op may not return an alias
        return out.new_empty(0)
    return y.view(b, s, hq, d)


@mha_with_cache.register_fake
def _(q, k, v, batch_info_host, cu_seqlen, cu_num_pages, cache_loc, seq_len_with_cache, token_seq, token_pos,
      kv_pool, scale, kv_format, rotation_block, rotate_v, sign_seed, metadata_dtype, sliding_window=None, out=None):
    _check_qkv(q, k, v)
    if out is not None:
        return out.new_empty(0)
    return q.new_empty(q.shape)
