"""Pure decode steps replayed from CUDA graphs.

A decode step (every sequence adds one token) is captured once per shape bucket -- batch padded up to the
next of `batch_sizes`, block-table width up to the next power of two -- with static input buffers: token
ids, positions, and the step plan's slot mapping, block table and lengths. A replay copies the step's
values into those buffers (in place, on the device) and relaunches the whole forward with no host work
per layer. Padded rows are a one-token sequence in a reserved trash block: they write and read only
there, and their logits are dropped. The decode kernels derive their launch schedule from the shapes
(batch, block-table width), never from the lengths, which is what makes a captured step valid for any
lengths that fit its width.

`capture=False` runs the same padded static-buffer path eagerly (how the CPU tests check it).
"""

from __future__ import annotations

import bisect
import logging

import torch

from ..cache import StepPlan
from .runner import Step, forward_step

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class _Bucket:
    """Static buffers (and, once captured, the graph) of one (batch, width) shape."""

    def __init__(self, batch: int, width: int, device, trash_block: int, tokens_per_block: int):
        self.batch, self.width = batch, width
        self.ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.slots = torch.full((batch,), trash_block * tokens_per_block, dtype=torch.int64, device=device)
        self.table = torch.full((batch, width), trash_block, dtype=torch.int32, device=device)
        self.lens = torch.ones(batch, dtype=torch.int32, device=device)
        self.starts = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.rows = torch.arange(batch, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def plan(self) -> StepPlan:
        return StepPlan(seq_ids=[], slot_mapping=self.slots, block_table=self.table, seq_lens=self.lens,
                        query_start_loc=self.starts, is_decode=True)


class DecodeGraphs:
    def __init__(self, engine, batch_sizes: tuple[int, ...] | None = None, capture: bool = True):
        self.engine = engine
        cache = engine.cache
        self.tokens_per_block = cache.spec.tokens_per_block
        self.max_width = -(-engine.max_seq_len // self.tokens_per_block)
        sizes = sorted(set(batch_sizes or DEFAULT_BATCH_SIZES))
        limit = engine.scheduler.max_batch
        self.batch_sizes = [b for b in sizes if b < limit] + [limit]
        self.capture = capture
        self.device = engine.device
        # the trash block: held by a sequence that is never freed
        trash = cache.add_sequence()
        self.trash_block = int(cache.plan([trash], [self.tokens_per_block]).slot_mapping[0]) // self.tokens_per_block
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_captures = 0

    def width_bucket(self, width: int) -> int:
        """The captured block-table width for a step whose longest sequence has `width` blocks."""
        return min(self.max_width, 1 << max(0, (width - 1).bit_length()))

    def prepare(self, max_batch: int, widths: list[int]) -> None:
        """Capture now (not in the middle of a measurement) every batch bucket up to max_batch at these widths."""
        with torch.inference_mode():
            for b in self.batch_sizes:
                if b > max_batch and b != self.batch_sizes[0]:
                    break
                for w in widths:
                    self._bucket_for(b, w)

    def _bucket_for(self, batch: int, width: int) -> _Bucket:
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch)]
        w = self.width_bucket(width)
        key = (b, w)
        if key not in self.buckets:
            bucket = _Bucket(b, w, self.device, self.trash_block, self.tokens_per_block)
            if self.capture:
                self._capture(bucket)
            self.buckets[key] = bucket
        return self.buckets[key]

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        step = Step(self.engine.cache, bucket.plan(), self.engine.geometry)
        return forward_step(self.engine.model, bucket.ids, bucket.pos, step, bucket.rows)

    def _capture(self, bucket: _Bucket) -> None:
        # eager runs first (Triton compiles, allocator warms up), on a side stream as the CUDA docs advise
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            bucket.logits = self._forward(bucket)
        bucket.graph = graph
        self.num_captures += 1
        log.info("captured a decode graph for batch %d, block-table width %d", bucket.batch, bucket.width)

    def run(self, ids: list[int], pos: list[int], plan: StepPlan) -> torch.Tensor:
        """Logits [len(ids), vocab] of a decode step (one token per sequence, in plan order)."""
        n, width = len(ids), plan.block_table.shape[1]
        bucket = self._bucket_for(n, width)
        host = torch.tensor([ids, pos], dtype=torch.int64)
        dev = host.to(self.device, non_blocking=True)
        bucket.ids[:n].copy_(dev[0])
        bucket.ids[n:].zero_()
        bucket.pos[:n].copy_(dev[1])
        bucket.pos[n:].zero_()
        bucket.slots[:n].copy_(plan.slot_mapping)
        bucket.slots[n:].fill_(self.trash_block * self.tokens_per_block)
        bucket.table[:n, :width].copy_(plan.block_table)
        bucket.table[:n, width:].zero_()
        bucket.table[n:].fill_(self.trash_block)
        bucket.lens[:n].copy_(plan.seq_lens)
        bucket.lens[n:].fill_(1)
        if bucket.graph is not None:
            bucket.graph.replay()
            return bucket.logits[:n]
        return self._forward(bucket)[:n]
