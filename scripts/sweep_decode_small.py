"""Decode tile/split configs below the "many" regime (GPU): for each shape, SDPA's time and the
time of saw_int4 decode under each candidate tile (the Triton kernel, every quantized regime
launching that tile), so that the regime rules of kernels/config.py and kernels/schedule.py can be
chosen from measurements.

    python scripts/sweep_decode_small.py [--rep-ms 10] [--json out.json]

Prints per shape SDPA, the current choice and the best candidate (and every candidate's µs).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import triton.testing

from trtllm_sawint4.bench_cases import decode_case
from trtllm_sawint4.kernels import decode as decode_kernel
from trtllm_sawint4.kernels.config import DEFAULT, DecodeTile
from trtllm_sawint4.kernels.schedule import split_count

SHAPES = [(32, 8, 128, b, c) for b in (1, 8, 32) for c in (1024, 2048, 8192, 32768)] + [
    (9, 3, 64, 1, 2048), (9, 3, 64, 1, 32768), (9, 3, 64, 8, 2048), (9, 3, 64, 8, 32768), (9, 3, 64, 32, 1024),
    (9, 3, 64, 32, 32768), (9, 3, 64, 64, 2048), (9, 3, 64, 64, 32768), (9, 3, 64, 128, 1024),
    (9, 3, 64, 128, 32768)]


def _cfg(block_n, warps, waves, min_tiles):
    return DecodeTile(block_n, warps, 3, waves=waves, min_tiles_per_split=min_tiles, q_chunk=64 if warps >= 4 else 16)


#: Candidate tiles, each applied to every shape (None: the shipped config's own choice).
CANDIDATES = {
    "current": None,
    "bn128w4 wv2 mt2": _cfg(128, 4, 2, 2), "bn64w4 wv2 mt1": _cfg(64, 4, 2, 1), "bn64w4 wv4 mt2": _cfg(64, 4, 4, 2),
    "bn64w4 wv2 mt4": _cfg(64, 4, 2, 4), "bn64w2 wv4 mt2": _cfg(64, 2, 4, 2), "bn64w2 wv2 mt4": _cfg(64, 2, 2, 4),
    "bn128w4 wv4 mt4": _cfg(128, 4, 4, 4), "bn64w2 wv8 mt32": _cfg(64, 2, 8, 32), "bn64w2 wv4 mt32": _cfg(64, 2, 4, 32),
    "bn128w4 wv1 mt2": _cfg(128, 4, 1, 2), "bn64w4 wv1 mt2": _cfg(64, 4, 1, 2),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rep-ms", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shipped = DEFAULT.decode
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for hq, hkv, d, b, ctx in SHAPES:
        c = decode_case(hq, hkv, d, b, ctx)
        tf, pool, table, sl, q, k, v = c.tf, c.pool, c.table, c.seq_lens, c.q, c.k, c.v

        def timed(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median") * 1e3

        sdpa = timed(lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=d ** -0.5, enable_gqa=True))
        times = {}
        for name, tile in CANDIDATES.items():
            # a candidate: every quantized regime launches its tile on the Triton kernel
            cfg = shipped if tile is None else replace(shipped.with_every_tile(tile),
                                                       gluon=replace(shipped.gluon, enabled=False))
            c = tile or shipped.tile(shipped.regime(b, hkv, d, "int4", sms, ctx))
            try:
                times[name] = timed(lambda: decode_kernel.decode(q, pool, table, sl, tf.q_matrix, None, d ** -0.5,
                                                                 "int4", "fp16", tf.hadamard_block, config=cfg))
            except Exception as e:  # noqa: BLE001 (a config that does not compile)
                print(f"  {name}: failed {str(e)[:60]}")
                continue
            splits, _ = split_count(b, hkv, ctx, c.block_n, sms, c.waves, c.min_tiles_per_split)
            rows.append({"shape": [hq, hkv, d, b, ctx], "name": name, **asdict(c), "splits": splits,
                         "us": times[name], "sdpa_us": sdpa})
        best = min(times, key=times.get)
        print(f"{hq}/{hkv} D{d} b{b} ctx{ctx}: sdpa {sdpa:.1f} us | current {times['current']:.1f} "
              f"({sdpa / times['current']:.2f}x) | best {best} {times[best]:.1f} ({sdpa / times[best]:.2f}x) | "
              + " ".join(f"{v:.1f}" for v in times.values()), flush=True)
        del c, pool, k, v
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
