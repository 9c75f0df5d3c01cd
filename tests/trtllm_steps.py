"""AutoDeploy-style per-step metadata for the TensorRT-LLM integration tests (no TensorRT-LLM needed).

`ADSteps` produces the SequenceInfo fields the saw_int4 backends read, the way TensorRT-LLM's
``SequenceInfo.nest_sequences`` documents them (version of the adapter: see
trtllm_sawint4.integrations.tensorrt_llm): fixed-capacity device buffers (cu_seqlen, seq_len_with_cache,
cache_loc, cu_num_pages, position_ids, ...) plus the 12-slot host batch_info tensor. Pages come from a
shuffled free list, so sequences get non-contiguous, out-of-order pages. It is test scaffolding written
for these tests, not TensorRT-LLM code.
"""

from __future__ import annotations

import math

import torch


class ADSteps:
    def __init__(self, max_batch: int, max_seq_len: int, tokens_per_block: int, num_blocks: int, seed: int = 0,
                 device="cpu"):
        self.max_batch, self.max_seq_len, self.t = max_batch, max_seq_len, tokens_per_block
        self.max_blocks = math.ceil(max_seq_len / tokens_per_block)
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.pages: dict[int, list[int]] = {}

    def pages_for(self, seq_id: int, length: int) -> list[int]:
        pages = self.pages.setdefault(seq_id, [])
        while len(pages) * self.t < length:
            pages.append(self.free.pop())
        return pages

    def step(self, entries, capacity_tokens: int | None = None) -> dict[str, torch.Tensor]:
        """entries: [(seq_id, input_pos, num_new, kind)] with kind 'prefill', 'extend' or 'decode', in that
        order (AutoDeploy's batch order). Returns the named metadata of the step."""
        order = {"prefill": 0, "extend": 1, "decode": 2}
        kinds = [e[3] for e in entries]
        assert kinds == sorted(kinds, key=order.__getitem__), "prefill, then extend, then decode"
        b = len(entries)
        n = sum(e[2] for e in entries)
        cu_seqlen = torch.zeros(self.max_batch + 1, dtype=torch.int32)
        swc = torch.zeros(self.max_batch, dtype=torch.int32)
        input_pos = torch.zeros(self.max_batch, dtype=torch.int32)
        cu_pages = torch.zeros(self.max_batch + 1, dtype=torch.int32)
        cache_loc = torch.zeros(self.max_batch * self.max_blocks + 1, dtype=torch.int32)
        position_ids = []
        locs = []
        for i, (seq_id, pos, new, _) in enumerate(entries):
            pages = self.pages_for(seq_id, pos + new)
            cu_seqlen[i + 1] = cu_seqlen[i] + new
            swc[i], input_pos[i] = pos + new, pos
            cu_pages[i + 1] = cu_pages[i] + len(pages)
            locs += pages
            position_ids += range(pos, pos + new)
        cache_loc[:len(locs)] = torch.tensor(locs, dtype=torch.int32)
        counts = {k: [e for e in entries if e[3] == k] for k in order}
        info = torch.zeros(12, dtype=torch.int32)
        info[:6] = torch.tensor([len(counts["prefill"]), sum(e[2] for e in counts["prefill"]),
                                 len(counts["extend"]), sum(e[2] for e in counts["extend"]),
                                 len(counts["decode"]), sum(e[2] for e in counts["decode"])])
        info[6:10] = torch.tensor([self.max_seq_len, self.max_blocks, 2, self.max_batch])
        generate_only = all(k == "decode" for k in kinds)
        pid = torch.tensor(position_ids, dtype=torch.long)
        pid = pid.view(b, 1) if generate_only else pid.view(1, n)
        to = lambda x: x.to(self.device)  # noqa: E731
        return {"batch_info_host": info, "cu_seqlen": to(cu_seqlen), "seq_len_with_cache": to(swc),
                "input_pos": to(input_pos), "cu_num_pages": to(cu_pages), "cache_loc": to(cache_loc),
                "position_ids": to(pid), "generate_only": generate_only}

    def table_of(self, seq_id: int) -> list[int]:
        return list(self.pages[seq_id])
