"""GPU soak: SAWINT4_SOAK_STEPS (default 10,000) random steps of admission, append, decode, prefill,
fork and free across up to 256 sequences, through PagedKVCache on CUDA (so the Triton kernels run),
each step checked against trtllm_sawint4.ops.reference on the same pool:

  * appended bytes: identical to the reference for storage without transforms; within a quantization
    step (dequantized) with transforms; no byte outside the step's slots changes, in any layer;
  * attention outputs: close to the reference's on the same pool; attention never writes the pool;
  * forks copy only the partial last block; frees write nothing; allocator invariants hold;
  * at the end every sequence is freed and allocator.num_free == num_blocks (no leaked block).

Run:  pytest -m gpu tests/gpu/test_soak_gpu.py      (SAWINT4_SOAK_STEPS=200 for a quick run)
The steps are split evenly over the two formats below; shapes are modest (about 4 minutes on an H200).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from trtllm_sawint4 import ChannelCalibration, KVCacheSpec

from helpers import SPECS
from soak import Soak

pytestmark = pytest.mark.gpu

STEPS = int(os.environ.get("SAWINT4_SOAK_STEPS", "10000"))


# (spec, calibrated): SAW-INT4 with every transform (rotation, sign flips, V rotation, calibrated K
# centring/scaling), and plain INT4 whose appended bytes must match the reference exactly.
CASES = {
    "saw_int4_full": (dict(kv_format="saw_int4", rotation_block=64, rotate_v=True, sign_seed=3), True),
    "int4": (dict(SPECS["int4"]), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_soak_random_steps_against_reference(cuda_kernels, case):
    fmt, calibrated = CASES[case]
    spec = KVCacheSpec(128, 2, 16, **fmt)
    num_layers = 2
    calibration = None
    if calibrated:
        g = torch.Generator().manual_seed(0)
        keys = [torch.randn(256, 2, 128, generator=g) * (torch.rand(2, 128, generator=g) * 3 + 0.2)
                + torch.randn(2, 128, generator=g) for _ in range(num_layers)]
        calibration = ChannelCalibration.from_keys(keys)
    steps = max(1, STEPS // len(CASES))
    soak = Soak(spec, num_layers=num_layers, num_blocks=4096, device="cuda", seed=len(case), max_seqs=256,
                max_prefill=96, max_len=384, max_batch=24, q_group=4, mode="reference", q_dtype=torch.bfloat16,
                atol=3e-2, rtol=3e-2, calibration=calibration)
    t0 = time.time()
    for i in range(steps):
        soak.step()
        if i % 1000 == 999:
            live = len(soak.cache.allocator.sequences)
            print(f"[{case}] step {i + 1}/{steps}: {live} live sequences, "
                  f"{soak.cache.allocator.num_free} free blocks, max relative error {soak.max_err:.3g}, "
                  f"{time.time() - t0:.0f}s")
    counts = dict(soak.counts)
    soak.finish()  # frees everything and asserts num_free == num_blocks
    print(f"[{case}] {steps} steps in {time.time() - t0:.0f}s: {counts}; "
          f"max |out - ref| / max(1, |ref|) {soak.max_err:.3g}")
    if steps >= 500:
        for op in ("admit", "fork", "free", "decode", "prefill"):
            assert counts.get(op, 0) > 0, f"the soak never ran {op}: {counts}"
