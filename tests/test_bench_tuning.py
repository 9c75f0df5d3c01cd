"""The tuning choices of `sawint4 bench` (pure helpers; the timings themselves need a GPU)."""

import importlib

import pytest

from trtllm_sawint4 import bench

pytest.importorskip("triton")


def test_least_relative_weighs_every_shape_equally():
    # a plain sum of times picks 8 (10.5 ms < 11 ms); relative to each shape's best, 2 loses 11% on
    # the big shape while 8 loses 50% on the small one
    timed = {2: [10.0, 1.0], 8: [9.0, 1.5]}
    assert bench._least_relative(timed) == 2
    assert bench._least_relative({None: [1.0, 2.0], 168: [1.0, 2.0]}) in (None, 168)


def test_shapes_by_regime_follows_tile_config():
    dmod = importlib.import_module("trtllm_sawint4.kernels.decode")
    shapes = bench._shapes_by_regime(dmod, 132)
    assert sorted(shapes["many"] + shapes["few"]) == sorted(bench.TUNE_SHAPES)
    for hq, hkv, d, b, ctx in shapes["many"]:
        assert dmod.tile_config(b, hkv, d, "int4", 132) is dmod.CONFIG["many"]
    assert (32, 8, 128, 1, 2048) in shapes["few"] and (32, 8, 128, 64, 8192) in shapes["many"]
