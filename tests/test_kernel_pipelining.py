"""The decode and prefill loops keep their K/V tile loads double-buffered and their metadata loads
asynchronous (compiled for sm_90 on the CPU, no GPU needed). Both were lost before without any test
failing, each costing a full DRAM latency per tile (docs/kernels.md, "Keeping the loads in flight")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "inspect_kernels.py"


def _inspect(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("op, extra", [("decode", ["--block-n", "64", "--warps", "2", "--stages", "3"]),
                                       ("prefill", [])])
def test_int4_tiles_are_double_buffered_and_metadata_async(op, extra):
    report = _inspect(op, "--format", "saw_int4", *extra)
    buffers = report.split("shared buffers:")[1].splitlines()[0]
    assert "'2x64x64xi8'" in buffers, report  # code tiles: two buffers
    assert "'2x64x2xf32'" in buffers, report  # scale/min words: pipelined (cp.async), two buffers
    # inside the loops only the block id of the next tile is loaded synchronously (one per loop)
    sync = int(report.split("synchronous loads inside loops:")[1].split()[0])
    assert sync <= (1 if op == "decode" else 2), report


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("regime", ["many", "few", "tiny"])
def test_decode_launch_configs_do_not_spill(regime, head_dim):
    """Each INT4 decode tile config, with the register cap it is launched with at this head_dim,
    compiles without spilling more than a few words: a cap of 168 at head_dim 256 spilled 512 bytes
    per thread (hence kernels.config.DecodeConfig.maxnreg_max_head_dim)."""
    from trtllm_sawint4.kernels.config import DEFAULT

    cfg = DEFAULT.decode.tile(regime)
    args = ["decode", "--format", "saw_int4", "--head-dim", str(head_dim), "--block-n", str(cfg.block_n),
            "--warps", str(cfg.num_warps), "--stages", str(cfg.num_stages),
            "--q-chunk", str(min(head_dim, cfg.q_chunk))]
    cap = DEFAULT.decode.launch_maxnreg(cfg, head_dim)
    if cap is not None:
        args += ["--maxnreg", str(cap)]
    usage = _inspect(*args).splitlines()[1]
    stack = int(usage.split("STACK:")[1].split()[0])
    assert stack <= 64, usage


def test_one_tile_decode_issues_its_tile_loads_before_the_q_transform():
    """Decode's one-tile splits (ONE_TILE, the "tiny" config at head_dim 128) issue the K/V tile's loads
    before the q transform waits for its matrix, and use none of them before that: a layout conversion
    of the tile placed right after its loads made the warp wait there (docs/kernels.md)."""
    from trtllm_sawint4.kernels.config import DEFAULT

    cfg = DEFAULT.decode.tile("tiny")
    args = ["decode", "--one-tile", "--format", "saw_int4", "--head-dim", "128", "--warps", str(cfg.num_warps),
            "--stages", str(cfg.num_stages), "--q-chunk", str(cfg.q_chunk)]
    if cfg.maxnreg:
        args += ["--maxnreg", str(cfg.maxnreg)]
    line = next(ln for ln in _inspect(*args).splitlines() if ln.startswith("one-tile:"))
    loads, early = int(line.split()[1]), int(line.split("wait,")[1].split()[0])
    assert loads >= 2 and early == 0, line


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mma_decode_loop_reads_operands_in_wide_words(dtype):
    """The Gluon decode kernel (kernels/decode_gluon.py) compiled for sm_90: its relabelled layouts must
    make every operand read a wide shared-memory load (K 16 bytes, V 8 bytes per thread) with no byte
    loads and no layout conversion through shared memory in the loop, no spills, 64 MMAs per 64-token
    tile, and the loop well under the Triton kernel's 2 x ~1170 warp-instructions per tile (it
    compiled to 1165-1180; a layout that stopped matching the MMA operands would add shuffles or
    shared-memory round trips and break these bounds)."""
    pytest.importorskip("triton.experimental.gluon")
    report = _inspect("decode", "--mma", *(["--fp16"] if dtype == "fp16" else []))
    usage = report.splitlines()[1]
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    loop = report.split("main loop:")[1]
    n = int(loop.split()[0])
    ops = dict((k, int(v)) for k, v in (kv.rsplit(" ", 1) for kv in loop.splitlines()[1].strip().split(", ")))
    assert n < 1300, report
    assert sum(v for k, v in ops.items() if k.startswith("HMMA")) == 64, report
    assert not any(k.startswith(("LDS.U8", "LDS.S8", "STS")) for k in ops), report
