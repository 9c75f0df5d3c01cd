"""Accuracy regression on real K/Q/V: a few layers of SmolLM2-135M and Qwen2.5-Coder-0.5B (tests/data, written
by scripts/make_accuracy_fixture.py), run through the paged cache (append, then chunked prefill through the
block table) in each format. The error is that of the attention output against the bf16 cache,
||o - o_bf16||^2 / ||o_bf16||^2 summed over the fixture's layers of one model.

The bounds are the errors measured when the fixture was written (docs/accuracy.md) with about 25% margin:
a change of the calibration math, the transforms or the quantizer that loses accuracy fails here, in
seconds, without loading a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trtllm_sawint4 import KVCacheSpec, PagedKVCache
from trtllm_sawint4.calibration import ChannelCalibration, KeyQueryStats

FIXTURE = Path(__file__).parent / "data" / "accuracy_fixture.pt"

#: measured errors (sum over the fixture layers) when the fixture was written, per model and row
MEASURED = {
    "smollm2-135m": {"int4": 0.1604, "saw_int4": 0.0915, "calib_channel": 0.0575, "calib_qk-channel": 0.0470,
                     "calib_qk-dense": 0.0632},
    # layer 0 and 8 of Qwen: the plain rotation (saw_int4_paper, 2.27) is worse than int4 there; the default
    # saw_int4 centres K by the K projection bias
    "qwen2.5-coder-0.5b": {"int4": 1.4546, "saw_int4": 1.1292, "calib_channel": 0.0849, "calib_qk-channel": 0.0521,
                           "calib_qk-dense": 0.0709},
}
MARGIN = 1.25


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def _layer_stats(fx, li: int) -> KeyQueryStats:
    h, d = fx["k"].shape[1], fx["k"].shape[3]
    stats = KeyQueryStats(1, h, d)
    stats.k_sum = fx["k_sum"][li:li + 1].double()
    stats.k_outer = fx["k_outer"][li:li + 1].double()
    stats.q_outer = fx["q_outer"][li:li + 1].double()
    stats.k_count, stats.q_count = fx["k_count"], fx["q_count"]
    return stats


def _calibration(fx, li: int, row: str) -> ChannelCalibration | None:
    if row.startswith("calib_"):
        return ChannelCalibration.from_stats(_layer_stats(fx, li), row[len("calib_"):], shrinkage=0.1)
    if row == "saw_int4" and "k_bias" in fx:  # the default: K-bias centre where the model has a K bias
        return ChannelCalibration.from_key_bias([fx["k_bias"][li]], fx["k"].shape[1], inv_freq=fx["inv_freq"],
                                                max_positions=fx["max_positions"])
    return None


def paged_attention(fx, li: int, spec: KVCacheSpec, calibration=None) -> torch.Tensor:
    """Append the fixture's first 64 tokens, then the next 64 with their queries (chunked prefill)."""
    q, k, v = fx["q"][li].float(), fx["k"][li].float(), fx["v"][li].float()  # [Hq, 64, D], [H, 128, D]
    tokens, half = k.shape[1], q.shape[1]
    cache = PagedKVCache(spec, 1, tokens // spec.tokens_per_block, calibration=calibration)
    seq = cache.add_sequence()
    plan = cache.plan([seq], [tokens - half])
    cache.append(0, plan, k[:, :tokens - half].transpose(0, 1).contiguous(), v[:, :tokens - half].transpose(0, 1)
                 .contiguous())
    plan = cache.plan([seq], [half])
    cache.append(0, plan, k[:, tokens - half:].transpose(0, 1).contiguous(), v[:, tokens - half:].transpose(0, 1)
                 .contiguous())
    return cache.attend(0, plan, q.transpose(0, 1).contiguous(), fx["scaling"])


SPECS = {"bf16": {"kv_format": "bf16"}, "int4": {"kv_format": "int4"}, "saw_int4_paper": {}, "saw_int4": {},
         "calib_channel": {}, "calib_qk-channel": {}, "calib_qk-dense": {}}


def model_errors(fx) -> dict[str, float]:
    h, d = fx["k"].shape[1], fx["k"].shape[3]
    out = {}
    for li in range(len(fx["layers"])):
        ref = paged_attention(fx, li, KVCacheSpec(head_dim=d, num_kv_heads=h, tokens_per_block=16, kv_format="bf16"))
        for row, opts in SPECS.items():
            if row == "bf16":
                continue
            spec = KVCacheSpec(head_dim=d, num_kv_heads=h, tokens_per_block=16, **opts)
            o = paged_attention(fx, li, spec, _calibration(fx, li, row))
            out[row] = out.get(row, 0.0) + float((o - ref).pow(2).sum() / ref.pow(2).sum())
    return out


@pytest.mark.parametrize("model", list(MEASURED))
def test_accuracy_bounds(fixture, model, one_torch_thread):
    errors = model_errors(fixture[model])
    print(model, {k: round(v, 5) for k, v in errors.items()})
    for row, measured in MEASURED[model].items():
        if row == "int4":
            continue  # the baseline, not an option of ours
        assert errors[row] <= measured * MARGIN, f"{model} {row}: error {errors[row]:.5f} > {measured} * {MARGIN}"
    # orderings that hold with margin on this small sample (the finer ranking of the calibration methods
    # needs the full eval windows: docs/accuracy.md)
    best = max(errors[r] for r in ("calib_channel", "calib_qk-channel", "calib_qk-dense"))
    assert best * 1.3 < errors["saw_int4"] < errors["int4"]
