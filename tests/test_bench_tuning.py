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
    assert sorted(shapes["many"] + shapes["few"] + shapes["tiny"]) == sorted(bench.TUNE_SHAPES)
    for name, group in shapes.items():
        assert group, f"no tune shape in regime {name}"
        for hq, hkv, d, b, ctx in group:
            assert dmod.tile_config(b, hkv, d, "int4", 132, ctx) is dmod.CONFIG[name]
    assert (32, 8, 128, 1, 2048) in shapes["tiny"] and (32, 8, 128, 1, 32768) in shapes["few"]
    assert (32, 8, 128, 64, 8192) in shapes["many"]


def test_tune_decode_key_keeps_the_least_relative_value(monkeypatch):
    """The tuning loop with fake timings: it times every value on every shape of its regime and
    leaves the winner in kernels.decode.CONFIG."""
    import types

    import torch

    dmod = importlib.import_module("trtllm_sawint4.kernels.decode")
    saved = {k: dict(v) for k, v in dmod.CONFIG.items()}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(multi_processor_count=132))
    calls = []

    def fake(hq, hkv, d, b, ctx, t, rep_ms, rotated=True):
        cap = dmod.tile_config(b, hkv, d, "int4", 132, ctx).get("maxnreg")  # the config this launch would use
        calls.append((b, ctx, rotated, cap))
        ms = {None: 1.0, 168: 1.1, 144: 0.9}[cap]  # the winner is not the current setting
        return ms, 1.0

    monkeypatch.setattr(bench, "_decode_int4_only", fake)
    try:
        rows = bench.tune_decode_regs(1.0, 64, 4.0)
        assert all(dmod.CONFIG[name]["maxnreg"] == 144 for name in ("many", "few", "tiny"))
        assert len(rows) == len(calls) == 3 * 2 * len(bench.TUNE_SHAPES)
        assert {r["format"] for r in rows} == {"saw_int4", "int4"}
    finally:
        dmod.CONFIG.clear()
        dmod.CONFIG.update(saved)


def test_decode_case_builds_a_consistent_shape():
    """The inputs the GPU scripts time (built here on the CPU): every block used once, full lengths,
    and a pool the reference decode reads."""
    import torch

    from trtllm_sawint4.ops import reference as ref

    c = bench.decode_case(9, 3, 64, 2, 128, t=64, device="cpu")
    assert sorted(c.table.flatten().tolist()) == list(range(4)) and c.seq_lens.tolist() == [128, 128]
    assert c.q.shape == (2, 9, 64) and c.k.shape == c.v.shape == (2, 3, 128, 64)
    out = ref.decode(c.q, c.pool, c.table, c.seq_lens, c.tf.q_matrix, None, 0.125, "int4", "fp16")
    assert out.shape == c.q.shape and torch.isfinite(out).all()
