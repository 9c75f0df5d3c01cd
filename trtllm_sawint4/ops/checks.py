"""Argument checks shared by every implementation of the ops; they run before any kernel launch.

`check_*` look only at shapes, dtypes and devices (no device sync). `check_*_indices` and
`check_hadamard_form` read device tensors (one device sync on GPU); they are skipped while a CUDA
graph is being captured, and when the op's caller passes skip_device_checks=True because it has
validated those tensors itself (PagedKVCache.plan builds every index on the host from the allocator).
"""

from __future__ import annotations

import torch

from ..layout import tokens_per_block_of
from ..spec import HEAD_DIMS, METADATA_DTYPES, STORAGES

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fail(name: str, msg: str):
    """Raise the ValueError every check raises: the argument's name first."""
    raise ValueError(f"{name}: {msg}")


def _dtype(name, t, allowed):
    if t.dtype not in allowed:
        fail(name, f"dtype must be one of {[str(a) for a in allowed]}, got {t.dtype}")


def _shape(name, t, shape):
    if tuple(t.shape) != tuple(shape):
        fail(name, f"shape must be {list(shape)}, got {list(t.shape)}")


def _contiguous(name, t):
    if not t.is_contiguous():
        fail(name, "must be contiguous (the kernels index it densely)")


def _device(name, t, device):
    if t.device != device:
        fail(name, f"must be on {device} like the cache, got {t.device}")


def check_format(storage: str, meta_dtype: str) -> None:
    if storage not in STORAGES:
        fail("storage", f"must be one of {STORAGES}, got {storage!r}")
    if meta_dtype not in METADATA_DTYPES:
        fail("meta_dtype", f"must be one of {METADATA_DTYPES}, got {meta_dtype!r}")


def check_pool(pool: torch.Tensor, head_dim: int, storage: str, meta_dtype: str) -> int:
    """Returns tokens_per_block."""
    check_format(storage, meta_dtype)
    if head_dim not in HEAD_DIMS:
        fail("head_dim", f"must be one of {HEAD_DIMS}, got {head_dim}")
    _dtype("pool", pool, (torch.uint8,))
    if pool.dim() != 4 or pool.shape[1] != 2:
        fail("pool", f"must be [num_blocks, 2, num_kv_heads, region_bytes], got {list(pool.shape)}")
    if not pool.is_contiguous():
        fail("pool", "must be contiguous")
    try:
        return tokens_per_block_of(pool, head_dim, storage, meta_dtype)
    except ValueError as e:
        fail("pool", str(e))


def check_transforms(pool, num_kv_heads, head_dim, storage, *, k_matrix=None, k_bias=None, q_matrix=None,
                     v_matrix=None, hadamard_block=0):
    if not isinstance(hadamard_block, int) or isinstance(hadamard_block, bool) or hadamard_block < 0 or (
            hadamard_block and (hadamard_block & (hadamard_block - 1) or head_dim % hadamard_block)):
        fail("hadamard_block", f"must be 0 (dense matrices) or a power of 2 dividing head_dim={head_dim}, "
                                f"got {hadamard_block!r}")
    given = {"k_matrix": k_matrix, "k_bias": k_bias, "q_matrix": q_matrix, "v_matrix": v_matrix}
    shapes = {"k_matrix": (num_kv_heads, head_dim, head_dim), "k_bias": (num_kv_heads, head_dim),
              "q_matrix": (num_kv_heads, head_dim, head_dim), "v_matrix": (head_dim, head_dim)}
    for name, t in given.items():
        if t is None:
            continue
        if storage == "bf16":
            fail(name, "transforms apply to quantized storage only (storage='bf16' given)")
        _dtype(name, t, (torch.float32,))
        _shape(name, t, shapes[name])
        _device(name, t, pool.device)


def check_append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                 hadamard_block=0) -> int:
    if key.dim() != 3:
        fail("key", f"must be [num_tokens, num_kv_heads, head_dim], got {list(key.shape)}")
    n, h, d = key.shape
    t = check_pool(pool, d, storage, meta_dtype)
    _dtype("key", key, FLOAT_DTYPES)
    _dtype("value", value, (key.dtype,))
    _shape("value", value, key.shape)
    if pool.shape[2] != h:
        fail("key", f"has {h} KV heads but the pool holds {pool.shape[2]}")
    _dtype("slot_mapping", slot_mapping, (torch.int32, torch.int64))
    _shape("slot_mapping", slot_mapping, (n,))
    for name, x in (("key", key), ("value", value), ("slot_mapping", slot_mapping)):
        _device(name, x, pool.device)
    _contiguous("slot_mapping", slot_mapping)
    check_transforms(pool, h, d, storage, k_matrix=k_matrix, k_bias=k_bias, v_matrix=v_matrix,
                     hadamard_block=hadamard_block)
    return t


def check_attention(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale, storage,
                    meta_dtype, hadamard_block=0, window=0) -> int:
    if query.dim() != 3:
        fail("query", f"must be [num_queries, num_heads, head_dim], got {list(query.shape)}")
    _, hq, d = query.shape
    t = check_pool(pool, d, storage, meta_dtype)
    _dtype("query", query, FLOAT_DTYPES)
    h = pool.shape[2]
    if hq % h:
        fail("query", f"num_heads={hq} must be a multiple of the cache's num_kv_heads={h}")
    if block_table.dim() != 2:
        fail("block_table", f"must be [num_seqs, max_blocks_per_seq], got {list(block_table.shape)}")
    b = block_table.shape[0]
    _dtype("block_table", block_table, (torch.int32,))
    _dtype("seq_lens", seq_lens, (torch.int32,))
    _shape("seq_lens", seq_lens, (b,))
    tensors = {"query": query, "block_table": block_table, "seq_lens": seq_lens}
    if query_start_loc is not None:
        _dtype("query_start_loc", query_start_loc, (torch.int32,))
        _shape("query_start_loc", query_start_loc, (b + 1,))
        tensors["query_start_loc"] = query_start_loc
    elif query.shape[0] != b:
        fail("query", f"decode takes one query per sequence: {query.shape[0]} queries for {b} sequences")
    for name, x in tensors.items():
        _device(name, x, pool.device)
        if name != "query":
            _contiguous(name, x)
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        fail("window", f"must be an int >= 0 (0: full attention), got {window!r}")
    if not (isinstance(scale, float) and scale > 0 and scale != float("inf")):
        fail("scale", f"must be a positive finite float, got {scale!r}")
    check_transforms(pool, h, d, storage, q_matrix=q_matrix, v_matrix=v_matrix, hadamard_block=hadamard_block)
    return t


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_hadamard_form(hadamard_block: int, **matrices) -> None:
    """hadamard_block > 0 declares every given matrix in block-Hadamard form (the kernels may then read
    only its diagonal factor); check that the declaration holds. Reads the matrices (a device sync on
    GPU), so it is skipped while a CUDA graph is being captured, like the index checks."""
    from ..hadamard import block_hadamard_form

    if not hadamard_block or _capturing():
        return
    for name, m in matrices.items():
        if m is not None and not torch.equal(block_hadamard_form(m, hadamard_block), m):
            fail(name, f"is not in the block-Hadamard form that hadamard_block={hadamard_block} declares "
                        f"(M[i, j] = S[i, j] * M[(j // r) * r, j], hadamard.block_hadamard_form); "
                        f"pass hadamard_block=0 for a dense matrix")


def check_append_indices(pool, slot_mapping, tokens_per_block: int) -> None:
    if _capturing() or slot_mapping.numel() == 0:
        return
    slots = slot_mapping.long()
    limit = pool.shape[0] * tokens_per_block
    bad = (slots < 0) | (slots >= limit)
    if bool(bad.any()):
        fail("slot_mapping", f"slots must be in [0, num_blocks * tokens_per_block = {limit}); "
                              f"got {slots[bad][:4].tolist()}")
    if torch.unique(slots).numel() != slots.numel():
        fail("slot_mapping", "holds a slot more than once; each new token needs its own slot")


def check_attention_indices(pool, block_table, seq_lens, query_start_loc, num_queries, tokens_per_block) -> None:
    if _capturing():
        return
    if block_table.shape[0] == 0:
        if num_queries:
            fail("query", f"{num_queries} queries but no sequence (block_table has 0 rows) to attend")
        return
    max_tokens = block_table.shape[1] * tokens_per_block
    lens = seq_lens.long()
    if bool(((lens < 0) | (lens > max_tokens)).any()):
        fail("seq_lens", f"must be in [0, max_blocks_per_seq * tokens_per_block = {max_tokens}], "
                          f"got {lens.tolist()[:8]}")
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] * tokens_per_block < lens[:, None]
    ids = block_table.long()[used]
    if bool(((ids < 0) | (ids >= pool.shape[0])).any()):
        fail("block_table", f"block ids of cached tokens must be in [0, num_blocks={pool.shape[0]}), "
                             f"got {ids[(ids < 0) | (ids >= pool.shape[0])][:4].tolist()}")
    if query_start_loc is not None:
        starts = query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        if int(starts[0]) != 0 or int(starts[-1]) != num_queries or bool((q_lens < 0).any()):
            fail("query_start_loc", f"must rise from 0 to num_queries={num_queries}, got {starts.tolist()[:8]}")
        if bool((q_lens > lens).any()):
            fail("query_start_loc", "a sequence has more queries than cached tokens (append before attending)")
