"""`torch.ops.sawint4.{append,decode,prefill}`: the public custom ops.

Every device runs the argument checks first. They then run the implementation that
`dispatch` picks: the Triton kernels on CUDA (when triton is installed),
else the PyTorch reference. The fake implementations (shape checks, then empty outputs) make the ops
traceable by torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks
from .dispatch import implementation


@torch.library.custom_op("sawint4::append", mutates_args=("pool",))
def append(pool: Tensor, key: Tensor, value: Tensor, slot_mapping: Tensor, k_matrix: Tensor | None,
           k_bias: Tensor | None, v_matrix: Tensor | None, storage: str, meta_dtype: str,
           hadamard_block: int = 0) -> None:
    """Transform, quantize and write new K/V tokens into their slots (see reference.py)."""
    t = checks.check_append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                            hadamard_block)
    checks.check_append_indices(pool, slot_mapping, t)
    checks.check_hadamard_form(hadamard_block, k_matrix=k_matrix, v_matrix=v_matrix)
    implementation("append", pool)(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                                   hadamard_block)


@append.register_fake
def _(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype, hadamard_block=0):
    checks.check_append(pool, key, value, slot_mapping, k_matrix, k_bias, v_matrix, storage, meta_dtype,
                        hadamard_block)


@torch.library.custom_op("sawint4::decode", mutates_args=())
def decode(query: Tensor, pool: Tensor, block_table: Tensor, seq_lens: Tensor, q_matrix: Tensor | None,
           v_matrix: Tensor | None, scale: float, storage: str, meta_dtype: str, hadamard_block: int = 0) -> Tensor:
    """One query per sequence over its paged cache (see reference.py)."""
    t = checks.check_attention(query, pool, block_table, seq_lens, None, q_matrix, v_matrix, scale, storage,
                               meta_dtype, hadamard_block)
    checks.check_attention_indices(pool, block_table, seq_lens, None, query.shape[0], t)
    checks.check_hadamard_form(hadamard_block, q_matrix=q_matrix, v_matrix=v_matrix)
    return implementation("decode", pool)(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage,
                                          meta_dtype, hadamard_block)


@decode.register_fake
def _(query, pool, block_table, seq_lens, q_matrix, v_matrix, scale, storage, meta_dtype, hadamard_block=0):
    checks.check_attention(query, pool, block_table, seq_lens, None, q_matrix, v_matrix, scale, storage, meta_dtype,
                           hadamard_block)
    return torch.empty_like(query)


@torch.library.custom_op("sawint4::prefill", mutates_args=())
def prefill(query: Tensor, pool: Tensor, block_table: Tensor, seq_lens: Tensor, query_start_loc: Tensor,
            q_matrix: Tensor | None, v_matrix: Tensor | None, scale: float, storage: str,
            meta_dtype: str, hadamard_block: int = 0) -> Tensor:
    """Causal attention of each sequence's last queries over its paged cache (see reference.py)."""
    t = checks.check_attention(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale,
                               storage, meta_dtype, hadamard_block)
    checks.check_attention_indices(pool, block_table, seq_lens, query_start_loc, query.shape[0], t)
    checks.check_hadamard_form(hadamard_block, q_matrix=q_matrix, v_matrix=v_matrix)
    return implementation("prefill", pool)(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix,
                                           scale, storage, meta_dtype, hadamard_block)


@prefill.register_fake
def _(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale, storage, meta_dtype,
      hadamard_block=0):
    checks.check_attention(query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix, scale, storage,
                           meta_dtype, hadamard_block)
    return torch.empty_like(query)
