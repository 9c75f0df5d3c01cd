import math

import pytest
import torch

from trtllm_sawint4.quant import dequantize, pack_int4, quantize, round_to_meta, unpack_int4

LEVELS = {"int4": 15, "int8": 255}


def _roundtrip(x, levels, meta):
    codes, scale, vmin = quantize(x, levels, meta)
    return codes, scale, vmin, dequantize(codes, scale, vmin)


@pytest.mark.parametrize("levels", [15, 255])
@pytest.mark.parametrize("meta", ["fp16", "fp32"])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
def test_error_within_half_a_step(levels, meta, magnitude):
    x = torch.randn(512, 128) * magnitude + torch.randn(512, 1) * magnitude * 5  # offsets stress the min rounding
    codes, scale, vmin, xhat = _roundtrip(x, levels, meta)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= levels
    err = (xhat - x).abs()
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-6 * x.abs()  # fp32 arithmetic slack only
    assert bool((err <= bound).all()), float((err - bound).max())


def test_fp16_metadata_is_exactly_representable_and_brackets_the_data():
    x = torch.randn(256, 64) * 3 + 7
    codes, scale, vmin = quantize(x, 15, "fp16")
    assert torch.equal(scale.half().float(), scale) and torch.equal(vmin.half().float(), vmin)
    assert bool((vmin <= x.amin(-1)).all())
    assert bool((vmin + 15 * scale >= x.amax(-1)).all())


def test_directed_rounding():
    x = torch.tensor([1.0001, -1.0001, 0.0, 65504.0])
    down, up = round_to_meta(x, "fp16", "down"), round_to_meta(x, "fp16", "up")
    assert bool((down <= x).all()) and bool((up >= x).all())
    assert torch.equal(round_to_meta(x, "fp32", "down"), x)


@pytest.mark.parametrize("levels", [15, 255])
def test_constant_and_zero_vectors_are_exact(levels):
    x = torch.stack([torch.zeros(64), torch.full((64,), 3.25), torch.full((64,), -1e4)])
    codes, scale, vmin, xhat = _roundtrip(x, levels, "fp16")
    assert torch.equal(xhat, x)
    assert torch.equal(scale, torch.zeros(3)) and int(codes.max()) == 0


def test_spike_among_small_values_keeps_the_spike_and_bounds_the_rest():
    x = torch.randn(64) * 1e-3
    x[5] = 100.0
    codes, scale, vmin, xhat = _roundtrip(x[None], 15, "fp16")
    assert abs(float(xhat[0, 5]) - 100.0) <= float(scale[0]) / 2
    assert bool(((xhat - x).abs() <= scale[:, None] / 2 + 1e-6).all())


def test_values_beyond_fp16_saturate():
    x = torch.tensor([[1e6, -1e6] + [0.0] * 62])
    _, scale, vmin, xhat = _roundtrip(x, 15, "fp16")
    assert math.isfinite(float(scale)) and float(vmin) == -65504.0
    assert float(xhat[0, 0]) >= 65504.0 - float(scale) / 2 and float(xhat[0, 1]) == -65504.0


def test_subnormals_quantize_within_half_a_step():
    x = torch.tensor([[1e-40, -3e-39, 0.0, 5e-45] * 16])
    codes, scale, vmin, xhat = _roundtrip(x, 15, "fp16")
    assert bool(((xhat - x).abs() <= scale[:, None] / 2 + 1e-30).all())
    assert bool(torch.isfinite(xhat).all())


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_vectors_dequantize_to_nan_and_leave_others_alone(bad):
    x = torch.randn(3, 64)
    x[1, 7] = bad
    codes, scale, vmin, xhat = _roundtrip(x, 15, "fp16")
    assert bool(torch.isnan(xhat[1]).all()) and int(codes[1].max()) == 0
    assert bool(torch.isfinite(xhat[[0, 2]]).all())
    _, _, _, clean = _roundtrip(x[[0, 2]], 15, "fp16")
    assert torch.equal(xhat[[0, 2]], clean)


def test_nibble_order_is_split_halves():
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)[None]  # c[j] = j % 16, D = 32
    codes[0, 16:] = 15 - codes[0, 16:]
    packed = pack_int4(codes)
    assert packed.shape == (1, 16)
    for j in range(16):
        assert int(packed[0, j]) == int(codes[0, j]) | (int(codes[0, j + 16]) << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_roundtrip_random():
    codes = torch.randint(0, 16, (7, 3, 128), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
