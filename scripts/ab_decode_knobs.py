"""A/B of module-level decode knobs (GPU): each variant overrides attributes of kernels/decode.py,
and every variant is timed at every shape in the same process (CUDA-graph replay medians), next
to SDPA on bf16 K/V.

    python scripts/ab_decode_knobs.py [--rep-ms 10]

Prints, per shape, SDPA and int4 / saw_int4 µs under each variant.
"""

from __future__ import annotations

import argparse
import importlib

import torch
import torch.nn.functional as F
import triton.testing

from trtllm_sawint4.bench import decode_case

# the "tiny" regime's shapes of the bench grid, and (--shapes large) the Gluon kernel's (head_dim 128)
SHAPES = {"tiny": [(32, 8, 128, 1, 1024), (32, 8, 128, 1, 2048), (32, 8, 128, 1, 8192), (32, 8, 128, 8, 1024),
                   (9, 3, 64, 1, 1024), (9, 3, 64, 1, 2048), (9, 3, 64, 1, 8192), (9, 3, 64, 8, 1024)],
          "large": [(32, 8, 128, 1, 16384), (32, 8, 128, 1, 32768), (32, 8, 128, 8, 2048), (32, 8, 128, 8, 32768),
                    (32, 8, 128, 32, 8192), (32, 8, 128, 64, 2048), (32, 8, 128, 64, 8192),
                    (32, 8, 128, 64, 32768), (64, 8, 128, 64, 8192), (32, 8, 128, 128, 32768)]}


#: name -> {attribute of kernels.decode: value}. Session 6 also measured (docs/kernels.md): the
#: merge's old tile (REDUCE_TILE_ELEMS 4096), the "tiny" bound raised to 16k, "tiny" with 1 and 2
#: waves of 2-tile splits, and "few" with 8 waves or 4 warps (CONFIG overrides).
VARIANTS = {
    "current": {},
    "mma off": {"MMA_DECODE": False},
    "mma in tiny": {"MMA_IN_TINY": True},
    "mma wv8": {"MMA_CONFIG": {"stages": 2, "waves": 8, "min_tiles_per_split": 8}},
    "mma wv32 mt4": {"MMA_CONFIG": {"stages": 2, "waves": 32, "min_tiles_per_split": 4}},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep-ms", type=float, default=10.0)
    ap.add_argument("--shapes", default="tiny", help="tiny, large or all")
    args = ap.parse_args()
    dmod = importlib.import_module("trtllm_sawint4.kernels.decode")

    def timed(fn):
        return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3

    print("shape | sdpa | " + " | ".join(f"{v} int4 / saw_int4" for v in VARIANTS))
    shapes = SHAPES["tiny"] + SHAPES["large"] if args.shapes == "all" else SHAPES[args.shapes]
    for hq, hkv, d, b, ctx in shapes:
        c = decode_case(hq, hkv, d, b, ctx)
        sdpa = timed(lambda: F.scaled_dot_product_attention(c.q.unsqueeze(2), c.k, c.v, scale=d ** -0.5,
                                                            enable_gqa=True))
        cells = []
        for overrides in VARIANTS.values():
            saved = {k: getattr(dmod, k) for k in overrides}
            for k, v in overrides.items():
                setattr(dmod, k, v)
            try:
                t4 = timed(lambda: dmod.decode(c.q, c.pool, c.table, c.seq_lens, None, None, d ** -0.5, "int4",
                                               "fp16"))
                ts = timed(lambda: dmod.decode(c.q, c.pool, c.table, c.seq_lens, c.tf.q_matrix, None, d ** -0.5,
                                               "int4", "fp16", c.tf.hadamard_block))
            finally:
                for k, v in saved.items():
                    setattr(dmod, k, v)
            cells.append(f"{t4:6.1f} / {ts:6.1f}")
        print(f"{hq}/{hkv} D{d} {b}x{ctx} | {sdpa:6.1f} | " + " | ".join(cells), flush=True)
        del c
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
