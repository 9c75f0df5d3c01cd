"""The kernels' launch configuration: one immutable value that callers pass.

`DEFAULT` is what ships (measured on the H200; docs/kernels.md gives the numbers and the commands
that produce them). A tuner (`sawint4 bench --only tune...`) returns a new config built with
`dataclasses.replace`, a test or a script passes a variant; nothing is changed in place, so every
call sees exactly the config it is given. Plain Python: no triton import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class DecodeTile:
    """One regime's launch of the Triton decode kernel (kernels/decode_triton.py)."""

    block_n: int  #: tokens per tile of the loop over the context
    num_warps: int
    num_stages: int  #: buffers of the software-pipelined tile loop (loads issued num_stages - 1 tiles ahead)
    waves: int  #: the split count aims at waves x SMs programs ...
    min_tiles_per_split: int  #: ... each with at least this many tiles
    q_chunk: int = 16  #: channels of the q matrix per step of the q transform (fewer, larger L2 round trips)
    maxnreg: int | None = None  #: per-thread register cap (None: ptxas's choice); trades spills for residency


@dataclass(frozen=True)
class GluonDecode:
    """The INT4 head_dim-128 decode kernel in Gluon (kernels/decode_gluon.py)."""

    enabled: bool = True  #: use it wherever it applies (False: the Triton kernel everywhere)
    #: also in the "tiny" regime, where the Triton kernel's single launch and early loads measured faster
    in_tiny: bool = False
    stages: int = 2  #: cp.async buffers (2 keeps more programs resident than 3; 2 measured faster)
    waves: int = 16  #: its splits aim at waves x SMs one-warp programs ...
    min_tiles_per_split: int = 4  #: ... of at least this many 64-token tiles


@dataclass(frozen=True)
class SplitMerge:
    """The merge of split partials (kernels/_reduce.py): it reads SB = tile_elems // head_dim splits
    per load (sized for registers: 64 fp32 per thread, half of that with 8 warps)."""

    tile_elems: int = 16384
    warp4_elems: int = 4096  #: above this many elements per load the merge runs 8 warps


@dataclass(frozen=True)
class DecodeConfig:
    """Decode: a Triton tile config per regime, the Gluon kernel's settings and the split merge.

    Regimes (`regime`): "many" when the batch alone gives at least 2 programs per SM (batch x KV heads
    >= 2 x SMs, head_dim >= 128: few splits); "tiny" when the whole step is at most
    `tiny_token_heads` tokens x KV heads (latency-bound: 4 warps shorten each program's chain, one-tile
    splits); "few" otherwise (the context is split); "bf16" for bf16 storage (32 KB tiles, one buffer
    keeps twice the programs resident)."""

    many: DecodeTile = DecodeTile(64, 2, 3, waves=8, min_tiles_per_split=32, q_chunk=16, maxnreg=168)
    few: DecodeTile = DecodeTile(64, 2, 3, waves=4, min_tiles_per_split=2, q_chunk=16, maxnreg=168)
    tiny: DecodeTile = DecodeTile(64, 4, 3, waves=2, min_tiles_per_split=1, q_chunk=64, maxnreg=168)
    bf16: DecodeTile = DecodeTile(64, 4, 2, waves=2, min_tiles_per_split=2, q_chunk=16)
    gluon: GluonDecode = GluonDecode()
    merge: SplitMerge = SplitMerge()
    #: largest batch x KV heads x max_tokens of the "tiny" regime (1 x 8k or 8 x 1k at 8 KV heads)
    tiny_token_heads: int = 65536
    #: splits of one tile load it before the q transform (the Triton kernel's ONE_TILE); False: the
    #: pipelined loop for every split
    one_tile_early_loads: bool = True
    #: largest head_dim the maxnreg caps apply to: at 256 the 2-warp tiles need all 255 registers and a
    #: cap of 168 spills (tests/test_kernel_pipelining.py keeps the launched configs spill-free)
    maxnreg_max_head_dim: int = 128
    #: dot operand dtype under the interpreter (None: fp32; "fp16" runs the GPU path's INT4 code-offset
    #: algebra, whose bf16 form the interpreter computes wrongly)
    interp_dot_dtype: str | None = None

    REGIMES = ("many", "few", "tiny", "bf16")

    def tile(self, regime: str) -> DecodeTile:
        if regime not in self.REGIMES:
            raise ValueError(f"regime must be one of {self.REGIMES}, got {regime!r}")
        return getattr(self, regime)

    def regime(self, batch: int, kv_heads: int, head_dim: int, storage: str, num_sms: int,
               max_tokens: int | None = None) -> str:
        """The regime of a decode launch (max_tokens: block-table width x tokens per block; None: not tiny)."""
        if storage == "bf16":
            return "bf16"
        if batch * kv_heads >= 2 * num_sms and head_dim >= 128:
            return "many"
        if max_tokens is not None and batch * kv_heads * max_tokens <= self.tiny_token_heads:
            return "tiny"
        return "few"

    def launch_maxnreg(self, tile: DecodeTile, head_dim: int) -> int | None:
        """The register cap a launch of `tile` uses at this head_dim (None: ptxas's choice)."""
        return tile.maxnreg if head_dim <= self.maxnreg_max_head_dim else None

    def with_tile(self, regime: str, **changes) -> "DecodeConfig":
        """This config with fields of one regime's tile replaced."""
        return replace(self, **{regime: replace(self.tile(regime), **changes)})

    def with_every_tile(self, tile: DecodeTile) -> "DecodeConfig":
        """This config with every quantized regime ("many", "few", "tiny") launching `tile`."""
        return replace(self, many=tile, few=tile, tiny=tile)


@dataclass(frozen=True)
class AppendConfig:
    """Append (kernels/append.py): (tokens per program, warps) at head_dim <= 128 (above: half the
    tokens, 8 warps), without and with a transform."""

    plain: tuple[int, int] = (32, 4)
    transform: tuple[int, int] = (64, 4)
    #: transform precision for bf16 K/V (kernels._common._mm): 4 = the matrix in two bf16 terms
    bf16_prec: int = 4


@dataclass(frozen=True)
class PrefillTile:
    block_m: int  #: queries per program
    block_n: int  #: keys per tile
    num_warps: int
    num_stages: int


def _tiles(**by_head_dim: tuple[int, int, int, int]) -> tuple[tuple[int, PrefillTile], ...]:
    return tuple((int(d.removeprefix("d")), PrefillTile(*t)) for d, t in by_head_dim.items())


@dataclass(frozen=True)
class PrefillConfig:
    """Prefill (kernels/prefill.py) tiles per head_dim, for quantized and for bf16 storage
    (H200, Hq 32 / Hkv 8, prefix 8k + chunk 2k)."""

    quantized: tuple[tuple[int, PrefillTile], ...] = _tiles(d32=(128, 64, 4, 3), d64=(128, 64, 4, 3),
                                                            d128=(64, 64, 4, 3), d256=(64, 32, 8, 2))
    bf16: tuple[tuple[int, PrefillTile], ...] = _tiles(d32=(128, 64, 4, 3), d64=(128, 64, 4, 3),
                                                       d128=(128, 128, 8, 2), d256=(64, 32, 8, 2))
    #: as DecodeConfig.interp_dot_dtype
    interp_dot_dtype: str | None = None

    def tile(self, head_dim: int, storage: str) -> PrefillTile:
        table = dict(self.bf16 if storage == "bf16" else self.quantized)
        if head_dim not in table:
            raise ValueError(f"no prefill tile for head_dim={head_dim} (have {sorted(table)})")
        return table[head_dim]

    def with_tile(self, head_dim: int, storage: str, tile: PrefillTile) -> "PrefillConfig":
        name = "bf16" if storage == "bf16" else "quantized"
        table = dict(getattr(self, name))
        table[head_dim] = tile
        return replace(self, **{name: tuple(sorted(table.items()))})


@dataclass(frozen=True)
class KernelConfig:
    """Every kernel's launch configuration."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    append: AppendConfig = field(default_factory=AppendConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)


#: The shipped configuration.
DEFAULT = KernelConfig()
