"""The tuning choices of `sawint4 bench` (pure helpers; the timings themselves need a GPU)."""

import dataclasses

import pytest

from trtllm_sawint4 import bench, bench_cases
from trtllm_sawint4.kernels.config import DEFAULT

pytest.importorskip("triton")


def test_least_relative_weighs_every_shape_equally():
    # a plain sum of times picks 8 (10.5 ms < 11 ms); relative to each shape's best, 2 loses 11% on
    # the big shape while 8 loses 50% on the small one
    timed = {2: [10.0, 1.0], 8: [9.0, 1.5]}
    assert bench._least_relative(timed) == 2
    assert bench._least_relative({None: [1.0, 2.0], 168: [1.0, 2.0]}) in (None, 168)


def test_shapes_by_regime_follows_the_config():
    dcfg = DEFAULT.decode
    shapes = bench._shapes_by_regime(dcfg, 132)
    assert sorted(shapes["many"] + shapes["few"] + shapes["tiny"]) == sorted(bench.TUNE_SHAPES)
    for name, group in shapes.items():
        assert group, f"no tune shape in regime {name}"
        for hq, hkv, d, b, ctx in group:
            assert dcfg.regime(b, hkv, d, "int4", 132, ctx) == name
    assert (32, 8, 128, 1, 2048) in shapes["tiny"] and (32, 8, 128, 1, 32768) in shapes["few"]
    assert (32, 8, 128, 64, 8192) in shapes["many"]


def test_tune_decode_key_returns_the_least_relative_value_and_changes_nothing_shipped(monkeypatch):
    """The tuning loop with fake timings: it times every value on every shape of its regime, returns a
    config holding the winner, and leaves kernels.config.DEFAULT (what a later run uses) as it was."""
    import types

    import torch

    before = repr(DEFAULT)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(multi_processor_count=132))
    calls = []

    def fake(hq, hkv, d, b, ctx, t, rep_ms, decode_config, rotated=True):
        tile = decode_config.tile(decode_config.regime(b, hkv, d, "int4", 132, ctx))  # what this launch uses
        calls.append((b, ctx, rotated, tile.maxnreg))
        ms = {None: 1.0, 168: 1.1, 144: 0.9}[tile.maxnreg]  # the winner is not the current setting
        return ms, 1.0

    monkeypatch.setattr(bench, "_decode_int4_only", fake)
    rows, tuned = bench.tune_decode_regs(1.0, 64, 4.0, DEFAULT)
    assert all(tuned.decode.tile(name).maxnreg == 144 for name in ("many", "few", "tiny"))
    assert repr(DEFAULT) == before and DEFAULT.decode.many.maxnreg == 168
    assert len(rows) == len(calls) == 3 * 2 * len(bench.TUNE_SHAPES)
    assert {r["format"] for r in rows} == {"saw_int4", "int4"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT.decode.many.maxnreg = 1


def test_decode_case_builds_a_consistent_shape():
    """The inputs the GPU scripts time (built here on the CPU): every block used once, full lengths,
    and a pool the reference decode reads."""
    import torch

    from trtllm_sawint4.ops import reference as ref

    c = bench_cases.decode_case(9, 3, 64, 2, 128, t=64, device="cpu")
    assert sorted(c.table.flatten().tolist()) == list(range(4)) and c.seq_lens.tolist() == [128, 128]
    assert c.q.shape == (2, 9, 64) and c.k.shape == c.v.shape == (2, 3, 128, 64)
    out = ref.decode(c.q, c.pool, c.table, c.seq_lens, c.tf.q_matrix, None, 0.125, "int4", "fp16")
    assert out.shape == c.q.shape and torch.isfinite(out).all()
