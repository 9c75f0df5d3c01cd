"""AutoDeploy's per-step sequence info -> the paged-cache metadata that ``torch.ops.sawint4.*`` take.

AutoDeploy (TensorRT-LLM's ``SequenceInfo``, see the package docstring for the version) describes a
step of a batch of B sequences with N new tokens, the prefill/extend sequences first, then the decode
sequences:

    cu_seqlen            [B + 1]  new tokens of sequence b are rows cu_seqlen[b]:cu_seqlen[b + 1]
    seq_len_with_cache   [B]      tokens of sequence b after this step (cached + new)
    cache_loc            [P]      page (block) ids of all sequences, concatenated
    cu_num_pages         [B + 1]  the pages of sequence b are cache_loc[cu_num_pages[b]:cu_num_pages[b + 1]]
    batch_info_host      [12]     host tensor: [0] prefill seqs, [1] their tokens, [2] extend seqs,
                                  [3] their tokens, [4] decode seqs, [5] their tokens, ...,
                                  [7] max_blocks_per_seq (constant once the cache exists)

The device tensors are fixed-capacity buffers (longer than the step needs); only the host tensor says
how much of them is live. Our ops take

    block_table      [B, max_blocks] int32   block_table[b, j] = the j-th page of sequence b (0 past its pages)
    seq_lens         [B] int32               = seq_len_with_cache
    query_start_loc  [B + 1] int32           = cu_seqlen
    slot_mapping     [N] int64               where each new token is written: page * T + position % T

Everything here is device tensor arithmetic with shapes fixed by host integers (the batch split and
max_blocks_per_seq): no device-to-host copy and no allocation whose size depends on sequence lengths,
so a decode step can be captured in a CUDA graph. The host integers are frozen in a captured graph,
which is how AutoDeploy captures decode steps (one graph per batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Slots of AutoDeploy's batch_info_host this module reads.
BATCH_INFO_SLOTS = {"num_prefill": 0, "num_prefill_tokens": 1, "num_extend": 2, "num_extend_tokens": 3,
                    "num_decode": 4, "num_decode_tokens": 5, "max_blocks_per_seq": 7}


@dataclass(frozen=True)
class BatchSplit:
    """How a step's sequences and tokens divide into prefill (extend absorbed) and decode."""

    num_prefill: int  # prefill + extend (chunked-prefill continuation) sequences, first in the batch
    num_prefill_tokens: int  # their new tokens, the first rows of the step
    num_decode: int  # one new token each, after the prefill tokens

    @property
    def num_seqs(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode


def _host_ints(batch_info_host: Tensor, upto: int) -> list[int]:
    if not isinstance(batch_info_host, Tensor) or batch_info_host.device.type != "cpu":
        raise ValueError("batch_info_host: must be AutoDeploy's host (CPU) batch-info tensor")
    if batch_info_host.dim() != 1 or batch_info_host.numel() <= upto:
        raise ValueError(f"batch_info_host: expected the 12-slot layout of TensorRT-LLM's BatchInfo, got shape "
                         f"{list(batch_info_host.shape)}")
    return [int(x) for x in batch_info_host[: upto + 1].tolist()]


def batch_split(batch_info_host: Tensor) -> BatchSplit:
    """The step's split, read from the host tensor (no device sync)."""
    v = _host_ints(batch_info_host, BATCH_INFO_SLOTS["num_decode_tokens"])
    num_prefill, prefill_tokens, num_extend, extend_tokens, num_decode, decode_tokens = v
    if min(v) < 0:
        raise ValueError(f"batch_info_host: negative counts {v}")
    if decode_tokens != num_decode:
        raise NotImplementedError(
            f"batch_info_host: {num_decode} decode sequences carry {decode_tokens} tokens; the saw_int4 backends "
            "take one token per decode sequence (speculative decoding is not supported)")
    return BatchSplit(num_prefill + num_extend, prefill_tokens + extend_tokens, num_decode)


def max_blocks_per_seq(batch_info_host: Tensor) -> int:
    """Width of the block table: AutoDeploy's ceil(max_seq_len / tokens_per_block)."""
    mb = _host_ints(batch_info_host, BATCH_INFO_SLOTS["max_blocks_per_seq"])[-1]
    if mb < 1:
        raise ValueError(f"batch_info_host: max_blocks_per_seq is {mb}; it is set once the KV cache is created")
    return mb


def block_table(cache_loc: Tensor, cu_num_pages: Tensor, num_seqs: int, max_blocks: int) -> Tensor:
    """[num_seqs, max_blocks] int32: row b holds sequence b's pages, then zeros."""
    starts = cu_num_pages[:num_seqs].long()
    counts = cu_num_pages[1:num_seqs + 1].long() - starts
    j = torch.arange(max_blocks, device=cache_loc.device)
    index = (starts[:, None] + j[None, :]).clamp_(0, max(cache_loc.numel() - 1, 0))
    pages = cache_loc[index] if cache_loc.numel() else torch.zeros_like(index)
    return torch.where(j[None, :] < counts[:, None], pages, 0).to(torch.int32)


def token_seq_and_pos(cu_seqlen: Tensor, seq_len_with_cache: Tensor, num_seqs: int,
                      num_tokens: int) -> tuple[Tensor, Tensor]:
    """For each of the first `num_tokens` rows: its sequence and its absolute position (int32 each).

    New tokens are a sequence's last tokens: row cu_seqlen[b] + i sits at seq_len_with_cache[b] - q_len + i.
    Rows past the step's tokens (a buffer longer than the step) get the last sequence and meaningless
    positions; callers use only the step's rows."""
    device = cu_seqlen.device
    if num_seqs == 0 or num_tokens == 0:
        z = torch.zeros(num_tokens, dtype=torch.int32, device=device)
        return z, z.clone()
    starts = cu_seqlen[:num_seqs + 1].long()
    rows = torch.arange(num_tokens, device=device)
    seq = torch.searchsorted(starts[1:], rows, right=True).clamp_(max=num_seqs - 1)
    q_len = starts[1:] - starts[:-1]
    pos = seq_len_with_cache[:num_seqs].long()[seq] - q_len[seq] + (rows - starts[seq])
    return seq.to(torch.int32), pos.to(torch.int32)


def slot_mapping(table: Tensor, token_seq: Tensor, token_pos: Tensor, tokens_per_block: int) -> Tensor:
    """[N] int64 slots (page * T + row) of tokens at `token_pos` of sequences `token_seq`."""
    pos = token_pos.long()
    pages = table[token_seq.long(), pos // tokens_per_block].long()
    return pages * tokens_per_block + pos % tokens_per_block


@dataclass
class StepMetadata:
    """What one step's attention call needs, for all layers of a model."""

    split: BatchSplit
    block_table: Tensor  # [num_seqs, max_blocks] int32
    seq_lens: Tensor  # [num_seqs] int32
    query_start_loc: Tensor  # [num_seqs + 1] int32
    slot_mapping: Tensor  # [num_tokens] int64


def map_step(batch_info_host: Tensor, cu_seqlen: Tensor, cu_num_pages: Tensor, cache_loc: Tensor,
             seq_len_with_cache: Tensor, tokens_per_block: int) -> StepMetadata:
    """AutoDeploy's step metadata -> ours (the composition the cached-attention op performs)."""
    split = batch_split(batch_info_host)
    table = block_table(cache_loc, cu_num_pages, split.num_seqs, max_blocks_per_seq(batch_info_host))
    seq, pos = token_seq_and_pos(cu_seqlen, seq_len_with_cache, split.num_seqs, split.num_tokens)
    return StepMetadata(split, table, seq_len_with_cache[:split.num_seqs], cu_seqlen[:split.num_seqs + 1],
                        slot_mapping(table, seq, pos, tokens_per_block))
