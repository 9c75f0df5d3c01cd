"""Where the time of a small decode step goes (GPU): per-kernel device durations from the torch
profiler next to the CUDA-graph replay time of the whole step, and SDPA for comparison.

    python scripts/decode_breakdown.py            # a fixed list of latency-bound shapes

The gap between the graph time and the sum of kernel durations is launch/dependency latency.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
import triton.testing

from trtllm_sawint4.bench_cases import decode_case
from trtllm_sawint4.kernels.decode import decode

SHAPES = [(32, 8, 128, 1, 2048), (32, 8, 128, 1, 32768), (32, 8, 128, 8, 1024), (32, 8, 128, 8, 2048),
          (9, 3, 64, 1, 32768), (9, 3, 64, 8, 32768), (9, 3, 64, 64, 2048),
          (32, 8, 128, 64, 2048)]


def kernel_durations(fn, reps=20):
    """Median device duration (µs) of each kernel name launched by fn."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per.setdefault(ev.name[:40], []).append(ev.device_time)
    return {k: statistics.median(v) for k, v in per.items()}


def main():
    for hq, hkv, d, b, ctx in SHAPES:
        c = decode_case(hq, hkv, d, b, ctx)
        tf, pool, table, sl, q, k, v = c.tf, c.pool, c.table, c.seq_lens, c.q, c.k, c.v
        runs = {
            "sdpa": lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=d ** -0.5, enable_gqa=True),
            "int4": lambda: decode(q, pool, table, sl, None, None, d ** -0.5, "int4", "fp16"),
            "saw_int4": lambda: decode(q, pool, table, sl, tf.q_matrix, None, d ** -0.5, "int4", "fp16",
                                       tf.hadamard_block),
            "saw+vrot": lambda: decode(q, pool, table, sl, tf.q_matrix, tf.q_matrix[0], d ** -0.5, "int4",
                                       "fp16", tf.hadamard_block),
        }
        print(f"== {hq}/{hkv} D{d} batch {b} ctx {ctx}")
        for name, fn in runs.items():
            graph_us = triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
            kd = kernel_durations(fn)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in kd.items())
            print(f"  {name:9s} graph {graph_us:7.1f} us | kernels: {parts}")



if __name__ == "__main__":
    main()
