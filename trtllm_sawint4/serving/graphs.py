"""Pure decode steps replayed from CUDA graphs.

A decode step (every sequence adds one token) is planned with `PagedKVCache.plan(..., graph_batch=B,
graph_max_tokens=W * tokens_per_block)`: the cache pads it to a bucket of B sequences whose block tables are
W blocks wide and writes the step's metadata, in place, into device buffers (and a decode schedule and
workspace) that stay the same for every step of that bucket. The engine keeps, per bucket, static buffers
for the token ids and positions, captures the whole forward once, and replays it for every later step of
the bucket after copying that step's ids and positions in: no host work per layer. Batches are padded up
to the next of `batch_sizes` (up to the engine's max_batch), widths up to the next power of two (up to
what max_seq_len needs). Padded rows attend nothing and write into blocks the cache keeps for padding;
their logits are dropped.

`capture=False` runs the same graph plans and static buffers eagerly (how the CPU tests check it).
"""

from __future__ import annotations

import bisect
import contextlib
import logging

import torch

from trtllm_sawint4.cache import StepPlan

from .runner import Step, forward_step

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class _Bucket:
    """Static inputs (and, once captured, the graph and its logits) of one (batch, width) bucket."""

    def __init__(self, batch: int, width: int, device):
        self.batch, self.width = batch, width
        self.ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.pos = torch.zeros(batch, dtype=torch.int64, device=device)
        self.rows = torch.arange(batch, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    def __init__(self, engine, batch_sizes: tuple[int, ...] | None = None, capture: bool = True):
        self.engine = engine
        self.cache = engine.cache
        self.tokens_per_block = self.cache.spec.tokens_per_block
        self.max_width = -(-engine.max_seq_len // self.tokens_per_block)
        sizes = sorted(set(batch_sizes or DEFAULT_BATCH_SIZES))
        limit = engine.scheduler.max_batch
        self.batch_sizes = [b for b in sizes if b < limit] + [limit]
        self.capture = capture
        self.replay = True  # False: run captured buckets eagerly on their own plans (eager_replays())
        self.device = engine.device
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_captures = 0
        self.last_plan: StepPlan | None = None  # the plan of the last step run (for inspection and tests)
        # the cache takes its padding slots now, before the scheduler hands out every block
        self.cache.plan([], [], graph_batch=self.batch_sizes[-1], graph_max_tokens=self.tokens_per_block)

    def width_bucket(self, width: int) -> int:
        """The block-table width of the bucket for a step whose longest sequence has `width` blocks."""
        return min(self.max_width, 1 << max(0, (width - 1).bit_length()))

    def _plan(self, seq_ids: list[int], batch: int, width: int) -> tuple[_Bucket, StepPlan]:
        b = self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch)]
        w = self.width_bucket(width)
        plan = self.cache.plan(seq_ids, [1] * len(seq_ids), graph_batch=b, graph_max_tokens=w * self.tokens_per_block)
        key = (b, w)
        if key not in self.buckets:
            self.buckets[key] = _Bucket(b, w, self.device)
        return self.buckets[key], plan

    def prepare(self, max_batch: int, widths: list[int]) -> None:
        """Capture now (not in the middle of a measurement) every batch bucket up to max_batch at these widths
        (on padding rows only: no sequence is touched); without capture, run each bucket's step once, which
        launches the kernel variants a capture would have compiled."""
        with torch.inference_mode():
            for b in self.batch_sizes:
                if b > max_batch and b != self.batch_sizes[0]:
                    break
                for w in widths:
                    bucket, plan = self._plan([], b, w)
                    if not self.capture:
                        self._forward(bucket, plan)
                    elif bucket.graph is None:
                        self._capture(bucket, plan)

    @contextlib.contextmanager
    def eager_replays(self):
        """Inside, a step of a captured bucket runs eagerly on the bucket's plan instead of replaying its graph:
        the same schedule and kernel variants, each launch visible (profilers cannot see into a replay)."""
        self.replay = False
        try:
            yield
        finally:
            self.replay = True

    def _forward(self, bucket: _Bucket, plan: StepPlan) -> torch.Tensor:
        step = Step(self.cache, plan, self.engine.geometry)
        return forward_step(self.engine.model, bucket.ids, bucket.pos, step, bucket.rows)

    def _capture(self, bucket: _Bucket, plan: StepPlan) -> None:
        # eager runs first (Triton compiles, the allocator warms up), on a side stream as the CUDA docs advise;
        # they recompute the step's own K/V into its own slots, so they change nothing
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket, plan)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            bucket.logits = self._forward(bucket, plan)
        bucket.graph = graph
        self.num_captures += 1
        log.info("captured a decode graph for batch %d, block-table width %d", bucket.batch, bucket.width)

    def run(self, seq_ids: list[int], ids: list[int], pos: list[int]) -> torch.Tensor:
        """Plan this decode step (one token per sequence; pos[i] is sequence i's new position) and run it;
        logits [len(ids), vocab] in seq_ids order."""
        n = len(ids)
        width = -(-(max(pos) + 1) // self.tokens_per_block)
        bucket, plan = self._plan(seq_ids, n, width)
        self.last_plan = plan
        host = torch.tensor([ids + [0] * (bucket.batch - n), pos + [0] * (bucket.batch - n)], dtype=torch.int64)
        dev = host.to(self.device, non_blocking=True)
        bucket.ids.copy_(dev[0])
        bucket.pos.copy_(dev[1])
        if self.capture and bucket.graph is None:
            self._capture(bucket, plan)
        if bucket.graph is not None and self.replay:
            bucket.graph.replay()
            return bucket.logits[:n]
        return self._forward(bucket, plan)[:n]
