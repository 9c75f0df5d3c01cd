"""Plain PyTorch reference of the three cache operations: the specification of the kernels.

Shapes (N new tokens, B sequences, H KV heads, Hq query heads, D head_dim, T tokens per block):

    append (pool, key[N,H,D], value[N,H,D], slot_mapping[N]) -> writes the pool in place.
        Token n goes to block slot_mapping[n] // T, row slot_mapping[n] % T.
    decode (query[B,Hq,D], pool, block_table[B,MB], seq_lens[B]) -> out[B,Hq,D]
        One query per sequence, attending all seq_lens[b] cached tokens.
    prefill(query[Nq,Hq,D], pool, block_table, seq_lens, query_start_loc[B+1]) -> out[Nq,Hq,D]
        Sequence b owns queries query_start_loc[b]:query_start_loc[b+1]; they are its last
        q_len tokens (already appended), so query j sits at position seq_lens[b] - q_len + j and
        attends positions 0..that position (causal, bottom-right aligned).

window > 0 (decode and prefill): sliding-window attention, a query at position p attends only
p - window < j <= p (its last `window` positions, itself included; transformers' semantics).

Token p of sequence b lives in block block_table[b, p // T], row p % T. Query head i reads KV
head i // (Hq // H). A sequence with no tokens gives a zero output. A non-finite stored vector
(see quant.py) makes the output nan for exactly the queries that can see its position. Everything is computed in
float32; the output has the query's dtype. Transforms are those of `transforms.LayerTransform`.
hadamard_block > 0 declares every matrix in block-Hadamard form (hadamard.block_hadamard_form;
the public ops check it): the kernels may then read only each matrix's diagonal factor, and make
the +-1 blocks from indices. The reference always uses the matrices as given.
"""

from __future__ import annotations

import torch

from ..layout import pool_views
from ..quant import dequantize, pack_int4, quantize, unpack_int4
from ..spec import StorageFormat


def _transform(x: torch.Tensor, matrix: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., H, D] -> matrix[h] @ x[..., h, :] (+ bias[h]); matrix is [H, D, D] or [D, D]."""
    if matrix is not None:
        x = torch.einsum("...hj,hij->...hi", x, matrix) if matrix.dim() == 3 else x @ matrix.T
    if bias is not None:
        x = x + bias
    return x


def append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage: str, meta_dtype: str,
           hadamard_block: int = 0) -> None:
    views = pool_views(pool, key.shape[-1], storage, meta_dtype)
    t = views.tokens_per_block
    block, row = slot_mapping.long() // t, slot_mapping.long() % t
    for kv, x in enumerate((_transform(key.float(), k_matrix, k_bias), _transform(value.float(), v_matrix))):
        if storage == "bf16":
            views.codes[block, kv, :, row] = x.to(torch.bfloat16)
            continue
        codes, scale, vmin = quantize(x, StorageFormat(storage, meta_dtype).levels, meta_dtype)
        views.codes[block, kv, :, row] = pack_int4(codes) if storage == "int4" else codes
        views.scale[block, kv, :, row] = scale.to(views.scale.dtype)
        views.vmin[block, kv, :, row] = vmin.to(views.vmin.dtype)


def gather_kv(pool, block_ids, length: int, head_dim: int, storage: str, meta_dtype: str):
    """Dequantized (K', V') of the first `length` tokens of a sequence, float32 [length, H, D] each.

    These are in the transformed domain (rotated, centred) in which they were stored."""
    views = pool_views(pool, head_dim, storage, meta_dtype)
    t = views.tokens_per_block
    pos = torch.arange(length, device=pool.device)
    block, row = block_ids.long()[pos // t], pos % t
    out = []
    for kv in range(2):
        codes = views.codes[block, kv, :, row]  # [L, H, bytes]
        if storage == "bf16":
            out.append(codes.float())
            continue
        if storage == "int4":
            codes = unpack_int4(codes)
        out.append(dequantize(codes, views.scale[block, kv, :, row], views.vmin[block, kv, :, row]))
    return out[0], out[1]


def _attend(q, k, v, positions, scale, q_matrix, v_matrix, window: int = 0):
    """q[Q,Hq,D] at absolute `positions`[Q] over k, v [L,H,D]; causal (window > 0: a query at p sees
    p - window < j <= p). float32 [Q,Hq,D]."""
    hq, h = q.shape[1], k.shape[1]
    group = hq // h
    kv_head = torch.arange(hq, device=q.device) // group
    qh = q.float().view(q.shape[0], h, group, -1)  # query heads grouped by their KV head
    qh = _transform(qh.transpose(1, 2), q_matrix).transpose(1, 2).reshape(q.shape)  # q' = q_matrix @ q
    scores = torch.einsum("qhd,khd->hqk", qh, k[:, kv_head]) * scale
    keys = torch.arange(k.shape[0], device=q.device)[None, :]
    causal = keys <= positions[:, None]
    if window > 0:
        causal = causal & (keys > positions[:, None] - window)
    scores = scores.masked_fill(~causal, float("-inf"))
    # A stored non-finite V (quant.py stores such a vector as nan) reaches exactly the queries that
    # can see it: multiplying it by the zero weight of a causally later token would leak it further.
    v = v[:, kv_head]
    v_bad = ~torch.isfinite(v).all(-1)  # [L, Hq]
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v.masked_fill(v_bad[..., None], 0))
    sees_bad = (causal[None] & v_bad.T[:, None, :]).any(-1)  # [Hq, Q]
    out = out.masked_fill(sees_bad.T[..., None], float("nan"))
    return _transform(out, None if v_matrix is None else v_matrix.T)


def prefill(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale: float,
            storage: str, meta_dtype: str, hadamard_block: int = 0, window: int = 0):
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for b, length in enumerate(seq_lens.tolist()):
        q = query[starts[b]:starts[b + 1]]
        if q.shape[0] == 0 or length == 0:
            continue
        k, v = gather_kv(pool, block_table[b], length, query.shape[-1], storage, meta_dtype)
        positions = torch.arange(length - q.shape[0], length, device=query.device)
        out[starts[b]:starts[b + 1]] = _attend(q, k, v, positions, scale, q_matrix, v_matrix, window)
    return out.to(query.dtype)


def decode(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale: float, storage: str, meta_dtype: str,
           hadamard_block: int = 0, window: int = 0):
    """`prefill` with one query per sequence."""
    starts = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
    return prefill(query, pool, block_table, seq_lens, starts, q_matrix, v_matrix, scale, storage, meta_dtype,
                   hadamard_block, window)
