"""A/B of decode config variants (GPU): each variant is a kernels.config.DecodeConfig passed to the
decode launcher, and every variant is timed at every shape in the same process (CUDA-graph replay
medians), next to SDPA on bf16 K/V.

    python scripts/ab_decode_knobs.py [--rep-ms 10]

Prints, per shape, SDPA and int4 / saw_int4 µs under each variant.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton.testing

from trtllm_sawint4.bench_cases import decode_case
from trtllm_sawint4.kernels import decode as decode_kernel
from trtllm_sawint4.kernels.config import DEFAULT

# the "tiny" regime's shapes of the bench grid, and (--shapes large) the Gluon kernel's (head_dim 128)
SHAPES = {"tiny": [(32, 8, 128, 1, 1024), (32, 8, 128, 1, 2048), (32, 8, 128, 1, 8192), (32, 8, 128, 8, 1024),
                   (9, 3, 64, 1, 1024), (9, 3, 64, 1, 2048), (9, 3, 64, 1, 8192), (9, 3, 64, 8, 1024)],
          "large": [(32, 8, 128, 1, 16384), (32, 8, 128, 1, 32768), (32, 8, 128, 8, 2048), (32, 8, 128, 8, 32768),
                    (32, 8, 128, 32, 8192), (32, 8, 128, 64, 2048), (32, 8, 128, 64, 8192),
                    (32, 8, 128, 64, 32768), (64, 8, 128, 64, 8192), (32, 8, 128, 128, 32768)]}


_D = DEFAULT.decode
#: name -> the decode config timed. Other variants worth a run: a smaller merge tile
#: (merge=SplitMerge(4096)), a larger "tiny" bound (tiny_token_heads), "few" with 8 waves or 4 warps
#: (_D.with_tile("few", ...)).
VARIANTS = {
    "current": _D,
    "gluon off": replace(_D, gluon=replace(_D.gluon, enabled=False)),
    "gluon in tiny": replace(_D, gluon=replace(_D.gluon, in_tiny=True)),
    "gluon wv8 mt8": replace(_D, gluon=replace(_D.gluon, waves=8, min_tiles_per_split=8)),
    "gluon wv32 mt4": replace(_D, gluon=replace(_D.gluon, waves=32, min_tiles_per_split=4)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep-ms", type=float, default=10.0)
    ap.add_argument("--shapes", default="tiny", help="tiny, large or all")
    args = ap.parse_args()
    def timed(fn):
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3

    print("shape | sdpa | " + " | ".join(f"{v} int4 / saw_int4" for v in VARIANTS))
    shapes = SHAPES["tiny"] + SHAPES["large"] if args.shapes == "all" else SHAPES[args.shapes]
    for hq, hkv, d, b, ctx in shapes:
        c = decode_case(hq, hkv, d, b, ctx)
        sdpa = timed(lambda: F.scaled_dot_product_attention(c.q.unsqueeze(2), c.k, c.v, scale=d ** -0.5,
                                                            enable_gqa=True))
        cells = []
        for cfg in VARIANTS.values():
            t4 = timed(lambda: decode_kernel.decode(c.q, c.pool, c.table, c.seq_lens, None, None, d ** -0.5, "int4",
                                                    "fp16", config=cfg))
            ts = timed(lambda: decode_kernel.decode(c.q, c.pool, c.table, c.seq_lens, c.tf.q_matrix, None, d ** -0.5,
                                                    "int4", "fp16", c.tf.hadamard_block, config=cfg))
            cells.append(f"{t4:6.1f} / {ts:6.1f}")
        print(f"{hq}/{hkv} D{d} {b}x{ctx} | {sdpa:6.1f} | " + " | ".join(cells), flush=True)
        del c
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
