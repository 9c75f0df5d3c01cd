"""The decode schedule: which kernel runs a decode step and how, planned once on the host.

Like FlashInfer's plan()/run(): `plan_decode` is a pure function of host-side shapes, an explicit
`DecodeConfig` and two facts about the machine (SM count, whether the Gluon kernel is available); it
never reads seq_lens, so it needs no device sync and the schedule of a batch-size bucket is fixed,
which is what a CUDA graph needs. The `DecodeSchedule` it returns says everything the launch needs
(backend, splits, tiles per split, tile, warps, stages, register cap, one-tile loads, the split
merge's block) and how large the workspace of partial outputs is; `PagedKVCache.plan` computes it
once per step and keeps it, with a preallocated workspace, on the `StepPlan`, so per layer only the
launches remain. Plain Python: no triton import.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, fields

import torch

from trtllm_sawint4.spec import STORAGES, StorageFormat

from .config import DecodeConfig

#: The Gluon kernel's fixed shape (kernels/decode_gluon.py spells out these layouts).
GLUON_BLOCK_N = 64
GLUON_HEAD_DIM = 128
GLUON_MAX_GROUP = 8
#: tile and q chunk the interpreter runs (small shapes; its tl.dot is slow)
INTERP_BLOCK_N = 16
INTERP_Q_CHUNK = 16

BACKENDS = ("triton", "gluon")
DOT_DTYPES = ("bf16", "fp16", "fp32")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def split_count(batch: int, kv_heads: int, max_tokens: int, block_n: int, num_sms: int, waves: int,
                min_tiles: int) -> tuple[int, int]:
    """(num_splits, tiles_per_split): aim at waves x SMs programs, each with at least min_tiles tiles."""
    max_tiles = max(1, cdiv(max_tokens, block_n))
    want = max(1, cdiv(waves * num_sms, max(1, batch * kv_heads)))
    splits = max(1, min(want, cdiv(max_tiles, min_tiles)))
    tiles_per_split = cdiv(max_tiles, splits)
    return cdiv(max_tiles, tiles_per_split), tiles_per_split


@dataclass(frozen=True)
class DecodeShape:
    """What a decode schedule depends on (host-side shapes and dtypes only)."""

    batch: int  #: rows of the block table (sequences, padding rows of a graph bucket included)
    kv_heads: int
    group: int  #: query heads per KV head
    head_dim: int
    tokens_per_block: int
    max_blocks: int  #: block-table width
    storage: str
    meta_dtype: str
    query_dtype: torch.dtype
    has_v_matrix: bool  #: the V rotation is undone by the split merge, so the step always splits
    dense_q_matrix: bool  #: a q matrix not in block-Hadamard form (the Gluon kernel transforms it first)
    window: int = 0  #: sliding window (0: full attention): the query sees its last `window` positions

    @property
    def max_tokens(self) -> int:
        return self.max_blocks * self.tokens_per_block

    def tokens_seen(self, block_n: int) -> int:
        """Most tokens (whole tiles of block_n) a query's splits must cover: the table width, or with a
        window the tiles it can touch (its first tile may start before it)."""
        if self.window <= 0:
            return self.max_tokens
        return min(self.max_tokens, ((self.window - 1) // block_n + 2) * block_n)


@dataclass(frozen=True)
class DecodeSchedule:
    """One decode launch, decided on the host. With `merges` (splits > 1; always for the Gluon kernel)
    the kernel writes partial outputs into a workspace of `workspace_elems` fp32 values, which
    kernels/_reduce.py merges."""

    shape: DecodeShape
    backend: str  #: "triton" | "gluon"
    splits: int
    tiles_per_split: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None
    one_tile: bool  #: Triton: each split's single tile is loaded before the q transform
    q_chunk: int
    group_pad: int  #: rows per (sequence, KV head, split) in the partial buffers
    merge_block: int  #: splits the merge reads per load (0: no merge)
    merge_warps: int
    dot_dtype: str  #: operand dtype of the Triton kernel's dots: "bf16" | "fp16" | "fp32" (interpreter)

    @property
    def merges(self) -> bool:
        """Whether the launch writes split partials and merges them (the Gluon kernel always does)."""
        return self.merge_block > 0

    @property
    def partial_out_elems(self) -> int:
        s = self.shape
        return s.batch * s.kv_heads * self.splits * self.group_pad * s.head_dim if self.merges else 0

    @property
    def partial_lse_elems(self) -> int:
        s = self.shape
        return s.batch * s.kv_heads * self.splits * self.group_pad if self.merges else 0

    @property
    def q_prep_elems(self) -> int:
        """fp32 transformed queries the Gluon kernel reads when the q matrix is dense."""
        s = self.shape
        return s.batch * s.kv_heads * s.group * s.head_dim if self.backend == "gluon" and s.dense_q_matrix else 0

    @property
    def workspace_elems(self) -> int:
        return self.partial_out_elems + self.partial_lse_elems + self.q_prep_elems

    def workspace(self, device) -> torch.Tensor | None:
        """A fresh workspace for this schedule (None when it needs none)."""
        n = self.workspace_elems
        return torch.empty(n, dtype=torch.float32, device=device) if n else None

    # ---- the op's encoding (torch.ops.sawint4.decode takes the schedule as int[]) -------------
    def to_list(self) -> list[int]:
        s = self.shape
        shape = [s.batch, s.kv_heads, s.group, s.head_dim, s.tokens_per_block, s.max_blocks, STORAGES.index(s.storage),
                 int(StorageFormat(s.storage, s.meta_dtype).meta32), _QUERY_DTYPES.index(s.query_dtype),
                 int(s.has_v_matrix), int(s.dense_q_matrix), s.window]
        launch = [BACKENDS.index(self.backend), self.splits, self.tiles_per_split, self.block_n, self.num_warps,
                  self.num_stages, self.maxnreg or 0, int(self.one_tile), self.q_chunk, self.group_pad,
                  self.merge_block, self.merge_warps, DOT_DTYPES.index(self.dot_dtype)]
        return [_ENCODING_VERSION, *shape, *launch]

    @classmethod
    def from_list(cls, values) -> "DecodeSchedule":
        values = [int(v) for v in values]
        if len(values) != 1 + _SHAPE_INTS + _LAUNCH_INTS or values[0] != _ENCODING_VERSION:
            raise ValueError(f"schedule: not an encoded DecodeSchedule (DecodeSchedule.to_list()), got {values}")
        sh, la = values[1:1 + _SHAPE_INTS], values[1 + _SHAPE_INTS:]
        try:
            shape = DecodeShape(sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], STORAGES[sh[6]], ("fp32" if sh[7] else "fp16"),
                                _QUERY_DTYPES[sh[8]], bool(sh[9]), bool(sh[10]), sh[11])
            return cls(shape, BACKENDS[la[0]], la[1], la[2], la[3], la[4], la[5], la[6] or None, bool(la[7]), la[8],
                       la[9], la[10], la[11], DOT_DTYPES[la[12]])
        except IndexError:
            raise ValueError(f"schedule: not an encoded DecodeSchedule (DecodeSchedule.to_list()), got {values}") \
                from None

    def describe(self) -> dict:
        """The launch as a plain dict (for logs and bench output)."""
        d = asdict(self)
        d["shape"] = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in asdict(self.shape).items()}
        return d


_QUERY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ENCODING_VERSION = 1
_SHAPE_INTS = len(fields(DecodeShape))
_LAUNCH_INTS = len(fields(DecodeSchedule)) - 1


def dot_dtype(query_dtype: torch.dtype, storage: str, interpreter: bool, interp_dot_dtype: str | None = None) -> str:
    """Operand dtype of the attention kernels' dots. INT4/INT8 codes and their fp16/bf16 magic-offset
    forms are exact in either; fp16 queries keep fp16 (more mantissa), everything else bf16. Under the
    interpreter fp32 (its bf16 dot is wrong) unless interp_dot_dtype says otherwise (quantized storage)."""
    if interpreter:
        return interp_dot_dtype if interp_dot_dtype is not None and storage != "bf16" else "fp32"
    if storage == "bf16" or query_dtype != torch.float16:
        return "bf16"
    return "fp16"


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: a fact of the machine); 8 elsewhere."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def decode_shape(pool, block_table_shape, query_heads: int, head_dim: int, query_dtype: torch.dtype,
                 storage: str, meta_dtype: str, has_v_matrix: bool, dense_q_matrix: bool,
                 window: int = 0) -> DecodeShape:
    """The DecodeShape of a step from host-side facts (no tensor contents are read)."""
    h, region = pool.shape[2], pool.shape[-1]
    t = StorageFormat(storage, meta_dtype).tokens_per_block(head_dim, region)
    return DecodeShape(int(block_table_shape[0]), h, query_heads // h, head_dim, t, int(block_table_shape[1]), storage,
                       meta_dtype, query_dtype, has_v_matrix, dense_q_matrix, window)


def gluon_applies(shape: DecodeShape, config: DecodeConfig, num_sms: int, gluon_available: bool, on_gpu: bool) -> bool:
    """Whether the Gluon kernel runs this step: its scope (INT4 codes, head_dim 128, G <= 8, fp16
    metadata, 16-bit queries, blocks of whole 64-token tiles, full attention: a sliding window goes
    to the Triton kernel), outside the latency-bound "tiny" regime unless config.gluon.in_tiny (there
    the Triton kernel's single launch and early loads win)."""
    s = shape
    return (config.gluon.enabled and gluon_available and on_gpu and s.storage == "int4" and s.window == 0
            and s.head_dim == GLUON_HEAD_DIM and s.group <= GLUON_MAX_GROUP and s.meta_dtype == "fp16"
            and s.query_dtype in (torch.bfloat16, torch.float16) and s.tokens_per_block % GLUON_BLOCK_N == 0
            and (config.gluon.in_tiny
                 or config.regime(s.batch, s.kv_heads, s.head_dim, "int4", num_sms, s.max_tokens) != "tiny"))


def _merge(config: DecodeConfig, shape: DecodeShape, splits: int) -> tuple[int, int]:
    """(splits per load, warps) of the split merge; the V-rotating merge keeps the smaller tile."""
    m, d = config.merge, shape.head_dim
    if not shape.has_v_matrix:
        sb = max(2, min(next_power_of_2(splits), m.tile_elems // d))
        return sb, 4 if sb * d <= m.warp4_elems else 8
    return max(2, min(next_power_of_2(splits), min(m.tile_elems, m.warp4_elems) // d)), 4


def plan_decode(shape: DecodeShape, config: DecodeConfig, num_sms: int, gluon_available: bool,
                interpreter: bool = False, num_splits: int | None = None) -> DecodeSchedule:
    """The schedule of one decode launch. num_splits overrides the split count (tests, sweeps)."""
    s = shape
    if gluon_applies(s, config, num_sms, gluon_available, not interpreter):
        max_tiles = max(1, cdiv(s.max_tokens, GLUON_BLOCK_N))
        if num_splits is None:
            splits, tps = split_count(s.batch, s.kv_heads, max_tiles * GLUON_BLOCK_N, GLUON_BLOCK_N, num_sms,
                                      config.gluon.waves, config.gluon.min_tiles_per_split)
        else:
            tps = cdiv(max_tiles, max(1, num_splits))
            splits = cdiv(max_tiles, tps)
        if s.has_v_matrix:
            splits = max(splits, 2)  # (the V-rotating merge; an empty split is harmless)
        sb, warps = _merge(config, s, splits)  # (the Gluon kernel always writes partials, one split too)
        return DecodeSchedule(s, "gluon", splits, tps, GLUON_BLOCK_N, 1, config.gluon.stages, None, False, 0,
                              GLUON_MAX_GROUP, sb, warps, "fp16" if s.query_dtype == torch.float16 else "bf16")
    # (with a window, the regime by the tokens a query can see at the regime's tile size)
    tile = config.tile(config.regime(s.batch, s.kv_heads, s.head_dim, s.storage, num_sms,
                                     s.tokens_seen(config.tile("few").block_n)))
    block_n = INTERP_BLOCK_N if interpreter else tile.block_n
    seen = s.tokens_seen(block_n)
    max_tiles = max(1, cdiv(seen, block_n))
    if num_splits is None:
        splits, tps = split_count(s.batch, s.kv_heads, seen, block_n, num_sms, tile.waves, tile.min_tiles_per_split)
    else:
        tps = cdiv(max_tiles, max(1, num_splits))
        splits = cdiv(max_tiles, tps)
    if s.has_v_matrix:
        splits = max(splits, 2)  # the V rotation is undone by the merge; an empty split is harmless
    sb, warps = _merge(config, s, splits) if splits > 1 else (0, 0)
    return DecodeSchedule(s, "triton", splits, tps, block_n, tile.num_warps, tile.num_stages,
                          config.launch_maxnreg(tile, s.head_dim), config.one_tile_early_loads and tps == 1,
                          INTERP_Q_CHUNK if interpreter else min(s.head_dim, tile.q_chunk),
                          max(16, next_power_of_2(s.group)), sb, warps,
                          dot_dtype(s.query_dtype, s.storage, interpreter, config.interp_dot_dtype))

