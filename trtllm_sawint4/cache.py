"""The paged KV cache: one pool per layer, an allocator, and the per-step plan.

Like FlashInfer's plan()/run(): `plan()` turns the step's batch (which sequences, how many new
tokens each) into device tensors once per step (slot mapping, block table, lengths, query
offsets), validated on the host; `append()` and `attend()` then run per layer with no host
synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocator import BlockAllocator, OutOfBlocks
from .calibration import ChannelCalibration
from .ops import checks
from .ops.dispatch import implementation
from .spec import KVCacheSpec
from .transforms import LayerTransform, build_layer_transform


@dataclass
class StepPlan:
    """Batch metadata of one step, shared by all layers."""

    seq_ids: list[int]
    slot_mapping: torch.Tensor  # [num_new_tokens] int64: where each new token is written
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32 (unused entries 0)
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in the cache after this step's append
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: new tokens of sequence b are rows [b]..[b+1]
    is_decode: bool  # every sequence adds exactly one token


class PagedKVCache:
    """Paged KV cache of a whole model.

    pools[layer] is uint8 [num_blocks, 2, num_kv_heads, region_bytes] (spec.pool_shape); the
    block ids of a sequence are the same in every layer.
    """

    def __init__(self, spec: KVCacheSpec, num_layers: int, num_blocks: int, device: str | torch.device = "cpu",
                 calibration: ChannelCalibration | None = None):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.spec = spec
        self.device = torch.device(device)
        self.pools = torch.zeros((num_layers, *spec.pool_shape(num_blocks)), dtype=torch.uint8, device=self.device)
        if calibration is not None:
            calibration.check_matches(spec, num_layers)
        self.transforms: list[LayerTransform] = [
            build_layer_transform(
                spec,
                None if calibration is None else calibration.mean[layer],
                None if calibration is None else calibration.scale[layer],
            ).to(self.device)
            for layer in range(num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks, spec.tokens_per_block)

    @property
    def num_layers(self) -> int:
        return self.pools.shape[0]

    # ---- sequences ---------------------------------------------------------------------
    def add_sequence(self) -> int:
        return self.allocator.add_sequence()

    def fork(self, seq_id: int) -> int:
        child, copy = self.allocator.fork(seq_id)
        if copy is not None:
            src, dst = copy
            self.pools[:, dst] = self.pools[:, src]
        return child

    def free(self, seq_id: int) -> None:
        self.allocator.free(seq_id)

    def seq_len(self, seq_id: int) -> int:
        return self.allocator._seq(seq_id).length

    # ---- one step ----------------------------------------------------------------------
    def plan(self, seq_ids: list[int], num_new_tokens: list[int]) -> StepPlan:
        """Reserve slots for this step's new tokens and build the batch metadata."""
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError(f"seq_ids ({len(seq_ids)}) and num_new_tokens ({len(num_new_tokens)}) differ in length")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        # check the whole step before changing anything, so a failed plan leaves the cache as it was
        for n in num_new_tokens:
            if n < 0:
                raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        need = sum(self.allocator.blocks_needed(s, n) for s, n in zip(seq_ids, num_new_tokens))
        if need > self.allocator.num_free:
            raise OutOfBlocks(f"this step needs {need} more blocks, {self.allocator.num_free} are free")
        slots: list[int] = []
        for seq_id, n in zip(seq_ids, num_new_tokens):
            slots += self.allocator.extend(seq_id, n)
        seqs = [self.allocator._seq(s) for s in seq_ids]
        max_blocks = max([len(s.blocks) for s in seqs] + [1])
        table = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        starts = torch.tensor([0] + num_new_tokens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return StepPlan(
            seq_ids=list(seq_ids),
            slot_mapping=to(torch.tensor(slots, dtype=torch.int64)),
            block_table=to(table),
            seq_lens=to(torch.tensor([s.length for s in seqs], dtype=torch.int32)),
            query_start_loc=to(starts),
            is_decode=all(n == 1 for n in num_new_tokens),
        )

    def append(self, layer: int, plan: StepPlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write this step's new tokens (key/value [num_new_tokens, num_kv_heads, head_dim])."""
        pool, tf = self.pools[layer], self.transforms[layer]
        storage, meta = self.spec.storage, self.spec.metadata_dtype
        checks.check_append(pool, key, value, plan.slot_mapping, tf.k_matrix, tf.k_bias, tf.v_matrix, storage, meta,
                            tf.hadamard_block)
        implementation("append", pool)(pool, key, value, plan.slot_mapping, tf.k_matrix, tf.k_bias, tf.v_matrix,
                                       storage, meta, tf.hadamard_block)

    def attend(self, layer: int, plan: StepPlan, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this step's queries ([num_new_tokens, num_heads, head_dim]) over the cache."""
        pool, tf = self.pools[layer], self.transforms[layer]
        storage, meta = self.spec.storage, self.spec.metadata_dtype
        if plan.is_decode:
            checks.check_attention(query, pool, plan.block_table, plan.seq_lens, None, tf.q_matrix, tf.v_matrix,
                                   scale, storage, meta, tf.hadamard_block)
            return implementation("decode", pool)(query, pool, plan.block_table, plan.seq_lens, tf.q_matrix,
                                                  tf.v_matrix, scale, storage, meta, tf.hadamard_block)
        checks.check_attention(query, pool, plan.block_table, plan.seq_lens, plan.query_start_loc, tf.q_matrix,
                               tf.v_matrix, scale, storage, meta, tf.hadamard_block)
        return implementation("prefill", pool)(query, pool, plan.block_table, plan.seq_lens, plan.query_start_loc,
                                               tf.q_matrix, tf.v_matrix, scale, storage, meta, tf.hadamard_block)
