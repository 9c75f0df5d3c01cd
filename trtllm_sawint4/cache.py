"""The paged KV cache: one pool per layer, an allocator, and the per-step plan.

Like FlashInfer's plan()/run(): `plan()` runs once per step on the host. It reserves the step's
slots, builds the batch metadata (slot mapping, block table, lengths, query offsets) from the
allocator, so every index is valid by construction, and, for a decode step, decides the kernel
schedule (kernels/schedule.py: backend, splits, tiles, ...) and hands it a preallocated workspace.
`append()` and `attend()` then run per layer through `torch.ops.sawint4.*` with no host
synchronisation: the ops' shape checks run, the device-reading index checks are skipped
(skip_device_checks=True, since plan() validated those indices), and the kernels only launch.

A decode step can be captured in a CUDA graph: `plan(..., graph_batch=N, graph_max_tokens=M)` pads
the step to N sequences of at most M tokens and writes its metadata, in place, into device buffers
that stay the same for every step of that bucket (with the same schedule and workspace). Capture
the layers' append/attend once; for each later step call plan() the same way, copy the new
q/k/v into the captured input tensors and replay. Padding rows attend nothing (their output rows
are zero) and append into slots of blocks the cache reserves for padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm_sawint4.kernels.config import DEFAULT, KernelConfig
from trtllm_sawint4.kernels.schedule import DecodeSchedule, decode_shape

from .allocator import BlockAllocator, OutOfBlocks  # noqa: F401  (OutOfBlocks: what plan() raises)
from .calibration import ChannelCalibration
from .ops import checks, dispatch, library  # noqa: F401  (library registers torch.ops.sawint4)
from .spec import KVCacheSpec
from .transforms import LayerTransform, build_layer_transform

_MISSING = object()


@dataclass
class StepPlan:
    """Batch metadata of one step, shared by all layers, and the decode launch it was planned for."""

    seq_ids: list[int]
    slot_mapping: torch.Tensor  # [num_new_tokens (+ padding)] int64: where each new token is written
    block_table: torch.Tensor  # [num_seqs (+ padding), max_blocks] int32 (unused entries 0)
    seq_lens: torch.Tensor  # [num_seqs (+ padding)] int32: tokens in the cache after this step's append
    query_start_loc: torch.Tensor  # [num_seqs (+ padding) + 1] int32: new tokens of row b are rows [b]..[b+1]
    is_decode: bool  # every sequence adds exactly one token
    #: the bucket size of a graph-capturable plan (its tensors are the bucket's fixed buffers), else None
    graph_batch: int | None = None
    query_dtype: torch.dtype | None = None
    num_query_heads: int | None = None
    #: decode schedule per layer window (0: full attention), None where the reference runs
    schedules: dict[int, DecodeSchedule | None] = field(default_factory=dict)
    workspace: torch.Tensor | None = None  # fp32 partial outputs of the split decode, shared by all layers
    _schedule_lists: dict = field(default_factory=dict, repr=False)

    @property
    def num_rows(self) -> int:
        """Rows of the block table (the sequences, plus padding rows of a graph bucket)."""
        return self.block_table.shape[0]


@dataclass
class _GraphBucket:
    """The fixed device buffers of one graph bucket (graph_batch, max_blocks)."""

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    schedules: dict
    workspace: torch.Tensor | None


class PagedKVCache:
    """Paged KV cache of a whole model.

    pools[layer] is uint8 [num_blocks, 2, num_kv_heads, region_bytes] (spec.pool_shape); the
    block ids of a sequence are the same in every layer.

    windows: per-layer sliding window (0: full attention; W > 0: a query sees its last W positions).
    Blocks that fall wholly outside every layer's window are not freed: a sequence keeps all its
    blocks until free().

    num_query_heads / query_dtype: what attend() will be called with; plan() decides the decode
    schedule from them (a plan without them, or called with other queries, plans the schedule at the
    step's first attend instead; a graph plan needs them up front). kernel_config: the kernels'
    launch configuration (kernels.config.DEFAULT).
    """

    def __init__(self, spec: KVCacheSpec, num_layers: int, num_blocks: int, device: str | torch.device = "cpu",
                 calibration: ChannelCalibration | None = None, windows: list[int] | None = None, *,
                 num_query_heads: int | None = None, query_dtype: torch.dtype = torch.bfloat16,
                 kernel_config: KernelConfig | None = None):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        windows = [0] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers or any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in windows):
            raise ValueError(f"windows must be {num_layers} ints >= 0 (one per layer, 0: full attention), "
                             f"got {windows}")
        self.windows = windows
        if num_query_heads is not None and (num_query_heads < 1 or num_query_heads % spec.num_kv_heads):
            raise ValueError(f"num_query_heads must be a positive multiple of num_kv_heads={spec.num_kv_heads}, "
                             f"got {num_query_heads}")
        self.spec = spec
        self.device = torch.device(device)
        self.pools = torch.zeros((num_layers, *spec.pool_shape(num_blocks)), dtype=torch.uint8, device=self.device)
        if calibration is not None:
            calibration.check_matches(spec, num_layers)
        self.transforms: list[LayerTransform] = []
        for layer in range(num_layers):
            tf = build_layer_transform(spec, **({} if calibration is None else calibration.layer_args(layer)))
            # the ops' block-Hadamard form, checked once here (on the CPU) instead of at every call
            checks.check_hadamard_form(tf.hadamard_block, k_matrix=tf.k_matrix, q_matrix=tf.q_matrix,
                                       v_matrix=tf.v_matrix)
            self.transforms.append(tf.to(self.device))
        self.allocator = BlockAllocator(num_blocks, spec.tokens_per_block)
        self.num_query_heads = num_query_heads
        self.query_dtype = query_dtype
        self.kernel_config = kernel_config or DEFAULT
        self._workspace: torch.Tensor | None = None
        self._graph: dict[tuple[int, int, torch.dtype, int], _GraphBucket] = {}
        self._padding_seq: int | None = None
        self._padding_slots: list[int] = []

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
        if seq_id == self._padding_seq:
            raise KeyError(f"seq_id {seq_id} is the cache's padding sequence of graph steps")
        self.allocator.free(seq_id)

    def seq_len(self, seq_id: int) -> int:
        return self.allocator.length(seq_id)

    # ---- one step ----------------------------------------------------------------------
    def plan(self, seq_ids: list[int], num_new_tokens: list[int], *, query_dtype: torch.dtype | None = None,
             num_query_heads: int | None = None, graph_batch: int | None = None,
             graph_max_tokens: int | None = None) -> StepPlan:
        """Reserve slots for this step's new tokens and build the batch metadata and decode schedule.

        query_dtype / num_query_heads: the step's queries (default: the cache's). graph_batch: pad the
        step (a decode step: one new token per sequence, at most graph_batch sequences) to a fixed
        bucket whose device buffers, schedule and workspace are the same at every step, so that a CUDA
        graph captured on one step replays any later one; graph_max_tokens: the most tokens a sequence
        of the bucket may hold (default: the whole pool), which fixes the block-table width."""
        query_dtype = query_dtype or self.query_dtype
        num_query_heads = num_query_heads or self.num_query_heads
        if graph_batch is not None:
            return self._plan_graph(seq_ids, num_new_tokens, query_dtype, num_query_heads, graph_batch,
                                    graph_max_tokens)
        step = self.allocator.step_metadata(list(seq_ids), list(num_new_tokens))
        to = lambda values, dtype: torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)  # noqa: E731
        plan = StepPlan(
            seq_ids=list(seq_ids),
            slot_mapping=to(step.slot_mapping, torch.int64),
            block_table=to(step.block_table, torch.int32),
            seq_lens=to(step.seq_lens, torch.int32),
            query_start_loc=to(step.query_start_loc, torch.int32),
            is_decode=all(n == 1 for n in num_new_tokens),
            query_dtype=query_dtype,
            num_query_heads=num_query_heads,
        )
        if plan.is_decode and num_query_heads is not None:
            for window in self._windows():
                self._schedule(plan, window, num_query_heads, query_dtype)
        return plan

    def _windows(self) -> list[int]:
        """The distinct layer windows: one decode schedule each."""
        return sorted(set(self.windows))

    def _shape(self, plan_rows: int, max_blocks: int, window: int, num_query_heads: int, query_dtype: torch.dtype):
        tf = self.transforms[0]
        return decode_shape(self.pools[0], (plan_rows, max_blocks), num_query_heads, self.spec.head_dim, query_dtype,
                            self.spec.storage, self.spec.metadata_dtype, tf.v_matrix is not None,
                            tf.q_matrix is not None and tf.hadamard_block == 0, window)

    def _plan_schedule(self, rows: int, max_blocks: int, window: int, num_query_heads: int,
                       query_dtype: torch.dtype) -> DecodeSchedule | None:
        """The decode schedule of a step of this shape (host only); None where the reference runs."""
        if dispatch.kernel("decode", self.device) is None:
            return None
        from trtllm_sawint4.kernels import decode as decode_kernels  # (imports triton: only where kernels run)

        return decode_kernels.plan(self._shape(rows, max_blocks, window, num_query_heads, query_dtype), self.device,
                                   self.kernel_config.decode)

    def _schedule(self, plan: StepPlan, window: int, num_query_heads: int, query_dtype: torch.dtype):
        """Plan `plan`'s decode schedule for `window` and give it a large enough workspace (the cache keeps
        one, grown as steps need, shared by the plans of ordinary steps: they run in stream order)."""
        sched = self._plan_schedule(plan.num_rows, plan.block_table.shape[1], window, num_query_heads, query_dtype)
        need = 0 if sched is None else sched.workspace_elems
        if need and (plan.workspace is None or plan.workspace.numel() < need):
            if self._workspace is None or self._workspace.numel() < need:
                self._workspace = torch.empty(need, dtype=torch.float32, device=self.device)
            plan.workspace = self._workspace
        plan.schedules[window] = sched
        plan._schedule_lists[window] = None if sched is None else sched.to_list()
        return sched

    def _plan_graph(self, seq_ids, num_new_tokens, query_dtype, num_query_heads, graph_batch, graph_max_tokens):
        t = self.spec.tokens_per_block
        if not isinstance(graph_batch, int) or graph_batch < 1:
            raise ValueError(f"graph_batch must be a positive int, got {graph_batch!r}")
        if any(n != 1 for n in num_new_tokens):
            raise ValueError(f"graph_batch: a graph step is a decode step (one new token per sequence), got "
                             f"num_new_tokens={list(num_new_tokens)}")
        if len(seq_ids) > graph_batch:
            raise ValueError(f"graph_batch={graph_batch} holds at most that many sequences, got {len(seq_ids)}")
        if num_query_heads is None:
            raise ValueError("num_query_heads: a graph plan fixes the decode schedule, which needs the number of "
                             "query heads (PagedKVCache(..., num_query_heads=...) or plan(num_query_heads=...))")
        max_tokens = graph_max_tokens if graph_max_tokens is not None else self.allocator.num_blocks * t
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"graph_max_tokens must be a positive int, got {graph_max_tokens!r}")
        max_blocks = -(-max_tokens // t)
        self._reserve_padding(graph_batch)
        step = self.allocator.step_metadata(list(seq_ids), list(num_new_tokens), max_blocks=max_blocks)
        bucket = self._bucket(graph_batch, max_blocks, query_dtype, num_query_heads)
        pad = graph_batch - len(seq_ids)
        host = {
            "slot_mapping": torch.tensor(step.slot_mapping + self._padding_slots[:pad], dtype=torch.int64),
            "block_table": torch.tensor(step.block_table + [[0] * max_blocks] * pad, dtype=torch.int32),
            "seq_lens": torch.tensor(step.seq_lens + [0] * pad, dtype=torch.int32),
            "query_start_loc": torch.arange(graph_batch + 1, dtype=torch.int32),
        }
        for name, values in host.items():  # in place: the captured kernels read these very buffers
            getattr(bucket, name).copy_(values, non_blocking=True)
        plan = StepPlan(seq_ids=list(seq_ids), slot_mapping=bucket.slot_mapping, block_table=bucket.block_table,
                        seq_lens=bucket.seq_lens, query_start_loc=bucket.query_start_loc, is_decode=True,
                        graph_batch=graph_batch, query_dtype=query_dtype, num_query_heads=num_query_heads,
                        schedules=dict(bucket.schedules), workspace=bucket.workspace)
        plan._schedule_lists = {w: (None if s is None else s.to_list()) for w, s in plan.schedules.items()}
        return plan

    def _reserve_padding(self, graph_batch: int) -> None:
        """Slots for the padding rows of a graph bucket: blocks of one sequence the cache keeps."""
        if self._padding_seq is None:
            self._padding_seq = self.allocator.add_sequence()
        if len(self._padding_slots) < graph_batch:
            self._padding_slots += self.allocator.extend(self._padding_seq, graph_batch - len(self._padding_slots))

    def _bucket(self, graph_batch: int, max_blocks: int, query_dtype, num_query_heads) -> _GraphBucket:
        key = (graph_batch, max_blocks, query_dtype, num_query_heads)
        if key not in self._graph:
            dev = self.device
            schedules = {w: self._plan_schedule(graph_batch, max_blocks, w, num_query_heads, query_dtype)
                         for w in self._windows()}
            need = max([s.workspace_elems for s in schedules.values() if s is not None] + [0])
            self._graph[key] = _GraphBucket(
                slot_mapping=torch.zeros(graph_batch, dtype=torch.int64, device=dev),
                block_table=torch.zeros(graph_batch, max_blocks, dtype=torch.int32, device=dev),
                seq_lens=torch.zeros(graph_batch, dtype=torch.int32, device=dev),
                query_start_loc=torch.zeros(graph_batch + 1, dtype=torch.int32, device=dev),
                schedules=schedules,
                workspace=torch.empty(need, dtype=torch.float32, device=dev) if need else None)
        return self._graph[key]

    def _decode_launch(self, plan: StepPlan, window: int, query: torch.Tensor):
        """(schedule as the op's int list, workspace) of this layer's decode; planned here, on the host,
        when the plan has none for these queries (no num_query_heads at plan time, other query dtype)."""
        sched = plan.schedules.get(window, _MISSING)
        hq = query.shape[1]
        if sched is not None and (sched is _MISSING or sched.shape.query_dtype != query.dtype
                                  or sched.shape.group * sched.shape.kv_heads != hq):
            if plan.graph_batch is not None:
                raise ValueError(f"query: this graph plan was made for {plan.num_query_heads} query heads of "
                                 f"{plan.query_dtype}, got {hq} of {query.dtype} (plan with query_dtype= and "
                                 f"num_query_heads=)")
            sched = self._schedule(plan, window, hq, query.dtype)
        if sched is None:
            return None, None
        return plan._schedule_lists[window], plan.workspace

    def append(self, layer: int, plan: StepPlan, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write this step's new tokens (key/value [num_new_tokens, num_kv_heads, head_dim]; a graph plan:
        [graph_batch, ...], padding rows included)."""
        pool, tf = self.pools[layer], self.transforms[layer]
        torch.ops.sawint4.append(pool, key, value, plan.slot_mapping, tf.k_matrix, tf.k_bias, tf.v_matrix,
                                 self.spec.storage, self.spec.metadata_dtype, tf.hadamard_block, True)

    def attend(self, layer: int, plan: StepPlan, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this step's queries ([num_new_tokens, num_heads, head_dim]) over the cache."""
        pool, tf, window = self.pools[layer], self.transforms[layer], self.windows[layer]
        storage, meta = self.spec.storage, self.spec.metadata_dtype
        if plan.is_decode:
            schedule, workspace = self._decode_launch(plan, window, query)
            if schedule is None:  # no kernel to plan for (the reference on CPU)
                return torch.ops.sawint4.decode(query, pool, plan.block_table, plan.seq_lens, tf.q_matrix,
                                                tf.v_matrix, scale, storage, meta, tf.hadamard_block, window, True)
            return torch.ops.sawint4.decode_planned(query, pool, plan.block_table, plan.seq_lens, tf.q_matrix,
                                                    tf.v_matrix, scale, storage, meta, tf.hadamard_block, window,
                                                    schedule, workspace, True)
        return torch.ops.sawint4.prefill(query, pool, plan.block_table, plan.seq_lens, plan.query_start_loc,
                                         tf.q_matrix, tf.v_matrix, scale, storage, meta, tf.hadamard_block, window,
                                         True)
