"""Block allocator: per-sequence block lists over a shared pool, with reference counts for forks."""

from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """The pool has no free block left."""


@dataclass
class Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0


@dataclass
class StepMetadata:
    """One step's batch metadata as plain lists (what the attention ops take, before it becomes tensors).

    Row b of block_table lists sequence b's blocks, padded with 0 to the table width; seq_lens[b] counts
    its tokens after this step; its new tokens are query rows query_start_loc[b]..query_start_loc[b+1]
    and go to slot_mapping[those rows] (slot = block * tokens_per_block + row in the block)."""

    slot_mapping: list[int]
    block_table: list[list[int]]
    seq_lens: list[int]
    query_start_loc: list[int]


class BlockAllocator:
    """Hands out block ids of a pool of `num_blocks`; a block returns to the free list when its
    last owner frees it. Full blocks may be shared by forked sequences; the last, partially
    filled block of a sequence is always its own, so appends never touch a shared block."""

    def __init__(self, num_blocks: int, tokens_per_block: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self.sequences: dict[int, Sequence] = {}
        self._next_id = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def _take(self) -> int:
        if not self._free:
            raise OutOfBlocks(f"all {self.num_blocks} blocks are in use")
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def sequence(self, seq_id: int) -> Sequence:
        """The live sequence `seq_id` (KeyError naming it otherwise)."""
        if seq_id not in self.sequences:
            raise KeyError(f"seq_id {seq_id} is not a live sequence (live: {sorted(self.sequences)[:8]})")
        return self.sequences[seq_id]

    def length(self, seq_id: int) -> int:
        return self.sequence(seq_id).length

    def add_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self.sequences[seq_id] = Sequence()
        return seq_id

    def blocks_needed(self, seq_id: int, num_new_tokens: int) -> int:
        seq = self.sequence(seq_id)
        return -(-(seq.length + num_new_tokens) // self.tokens_per_block) - len(seq.blocks)

    def extend(self, seq_id: int, num_new_tokens: int) -> list[int]:
        """Reserve room for `num_new_tokens` more tokens; returns their slots (block * T + row)."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        seq = self.sequence(seq_id)
        need = self.blocks_needed(seq_id, num_new_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more blocks, {len(self._free)} are free")
        seq.blocks.extend(self._take() for _ in range(need))
        t = self.tokens_per_block
        slots = [seq.blocks[p // t] * t + p % t for p in range(seq.length, seq.length + num_new_tokens)]
        seq.length += num_new_tokens
        return slots

    def step_metadata(self, seq_ids: list[int], num_new_tokens: list[int],
                      max_blocks: int | None = None) -> StepMetadata:
        """Reserve this step's slots (`num_new_tokens[i]` more tokens for `seq_ids[i]`) and return the
        step's metadata. The whole step is checked first, so a bad step changes nothing. max_blocks:
        the block-table width (default: the longest row, at least 1); a sequence needing more raises."""
        if len(seq_ids) != len(num_new_tokens):
            raise ValueError(f"seq_ids ({len(seq_ids)}) and num_new_tokens ({len(num_new_tokens)}) differ in length")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must be distinct, got {seq_ids}")
        for n in num_new_tokens:
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"num_new_tokens must be ints >= 0, got {num_new_tokens}")
        need = sum(self.blocks_needed(s, n) for s, n in zip(seq_ids, num_new_tokens))
        if need > self.num_free:
            raise OutOfBlocks(f"this step needs {need} more blocks, {self.num_free} are free")
        if max_blocks is not None:
            t = self.tokens_per_block
            for s, n in zip(seq_ids, num_new_tokens):
                if -(-(self.length(s) + n) // t) > max_blocks:
                    raise ValueError(f"sequence {s} would hold {self.length(s) + n} tokens, more than the "
                                     f"{max_blocks * t} a block-table row of {max_blocks} blocks covers")
        slots: list[int] = []
        for seq_id, n in zip(seq_ids, num_new_tokens):
            slots += self.extend(seq_id, n)
        seqs = [self.sequence(s) for s in seq_ids]
        width = max([len(q.blocks) for q in seqs] + [1]) if max_blocks is None else max_blocks
        starts = [0]
        for n in num_new_tokens:
            starts.append(starts[-1] + n)
        return StepMetadata(slots, [q.blocks + [0] * (width - len(q.blocks)) for q in seqs],
                            [q.length for q in seqs], starts)

    def fork(self, seq_id: int) -> tuple[int, tuple[int, int] | None]:
        """New sequence sharing `seq_id`'s tokens. Full blocks are shared; a partial last block is
        given a fresh block, returned as (source, destination) for the caller to copy."""
        parent = self.sequence(seq_id)
        child_id = self.add_sequence()
        child = self.sequences[child_id]
        full = parent.length // self.tokens_per_block
        for block in parent.blocks[:full]:
            self._refs[block] += 1
        child.blocks = parent.blocks[:full]
        child.length = parent.length
        copy = None
        if parent.length % self.tokens_per_block:
            try:
                dst = self._take()
            except OutOfBlocks:
                self.free(child_id)
                raise
            child.blocks.append(dst)
            copy = (parent.blocks[full], dst)
        return child_id, copy

    def free(self, seq_id: int) -> None:
        for block in self.sequence(seq_id).blocks:
            self._release(block)
        del self.sequences[seq_id]

    def owners(self, block: int) -> int:
        return self._refs[block]
