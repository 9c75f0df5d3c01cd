"""`sawint4 bench`: GPU benchmark of the Triton kernels against torch SDPA (bf16, contiguous K/V).

Writes a table to stdout and `bench.json` + `bench.png` into --out. Every time is the median of
CUDA-event timings (triton.testing.do_bench, which also flushes L2 between repetitions); inputs
smaller than ~4x L2 are additionally rotated among several copies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, replace

from .bench_cases import bf16_pool, calibrated_transform, quant_pool
from .spec import TOKENS_PER_BLOCK

L2_BYTES = 60 * 2**20

DECODE_CONFIGS = [(32, 8, 128), (64, 8, 128), (9, 3, 64)]  # (Hq, Hkv, head_dim)
BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (1024, 2048, 8192, 16384, 32768)
QUICK_BATCHES = (1, 8, 64)
QUICK_CONTEXTS = (2048, 8192, 32768)
APPEND_TOKENS = (1024, 4096, 16384, 65536)
PREFILL_CHUNKS = (512, 2048, 8192)
PREFILL_PREFIXES = (0, 8192, 32768)
TUNE_DECODE_TILES = ((32, 2), (64, 2), (64, 4), (128, 4), (128, 8))  # (block_n, warps)
TUNE_DECODE_STAGES = (3, 4)
TUNE_PREFILL_FORMATS = ("saw_int4",)  # bf16 storage already beats SDPA with its config
TUNE_PREFILL_STAGES = (3,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="./bench_out", help="folder for bench.json and bench.png")
    parser.add_argument("--quick", action="store_true", help="a subset of the decode grid")
    parser.add_argument("--only", default="bandwidth,decode,append,prefill",
                        help="comma-separated parts: decode, append, prefill, and tune, tunesplit, tunereg, tuneappend, "
                             "tuneprefill "
                             "(re-tune the kernel configs for this run first); bandwidth is always measured")
    parser.add_argument("--tokens-per-block", type=int, default=64, choices=TOKENS_PER_BLOCK)
    parser.add_argument("--mem-limit-gb", type=float, default=100.0, help="skip points needing more GPU memory")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="do_bench repetition time per measurement")


# ------------------------------------------------------------------------------------------ timing
def _bench(fn, rep_ms: float, graph: bool = False) -> float:
    """Median milliseconds of one call of fn, from CUDA events.

    graph=True: the calls are captured into one CUDA graph and replayed (triton's
    do_bench_cudagraph), so the time is the GPU's alone, without Python launch overhead, as a decode
    step runs in a serving engine; inputs rotate (see _rotating) since nothing flushes L2 between calls.
    graph=False: triton's do_bench (L2 flushed before every call)."""
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms, return_mode="median"))


def _rotating(make, nbytes: int):
    """Several input sets when one fits in L2: returns a list of inputs made by make().

    Synchronizes at the end: the timing helpers run on a side stream, which must not start
    before the kernels that fill the inputs (on the current stream) have finished."""
    import torch

    copies = 1 if nbytes >= 4 * L2_BYTES else min(16, math.ceil(4 * L2_BYTES / max(nbytes, 1)))
    sets = [make() for _ in range(copies)]
    torch.cuda.synchronize()
    return sets


class _Cycle:
    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


# ------------------------------------------------------------------------------------------ bandwidth
def measure_bandwidth(rep_ms: float) -> dict:
    import torch

    n = 4 * 2**30  # 4 GiB
    src = torch.empty(n // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_copy = _bench(lambda: dst.copy_(src), rep_ms)
    x = src.view(torch.float32)
    t_read = _bench(lambda: x.sum(), rep_ms)
    del src, dst, x
    torch.cuda.empty_cache()
    copy_bw = 2 * n / t_copy / 1e9  # TB/s (bytes / ms / 1e9)
    read_bw = n / t_read / 1e9
    return {"copy_tbps": copy_bw, "read_tbps": read_bw, "peak_tbps": max(copy_bw, read_bw)}


# ------------------------------------------------------------------------------------------ decode
def bench_decode_point(hq, hkv, d, batch, ctx, t, rep_ms, peak_tbps, mem_limit_gb, config=None):
    import torch
    import torch.nn.functional as F

    from .kernels import decode as decode_kernel
    from .kernels.config import DEFAULT
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    dev = "cuda"
    nblk_seq = ctx // t
    nb = batch * nblk_seq
    spec4 = KVCacheSpec(d, hkv, t, kv_format="saw_int4")
    spec16 = KVCacheSpec(d, hkv, t, kv_format="bf16")
    need = nb * (spec4.block_bytes + spec16.block_bytes) + 2 * batch * hkv * ctx * d * 2
    if need > mem_limit_gb * 1e9:
        return None
    scale = d ** -0.5
    tf = build_layer_transform(spec4).to(dev)
    row = {"hq": hq, "hkv": hkv, "d": d, "batch": batch, "ctx": ctx}
    bytes4 = batch * ctx * spec4.bytes_per_token + batch * hq * d * 4
    bytes16 = batch * ctx * spec16.bytes_per_token + batch * hq * d * 4
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)

    def q_make():
        return torch.randn(batch, hq, d, device=dev, dtype=torch.bfloat16)

    # torch SDPA, bf16 contiguous K/V
    def sdpa_make():
        k = torch.randn(batch, hkv, ctx, d, device=dev, dtype=torch.bfloat16)
        return (q_make().unsqueeze(2), k, torch.randn_like(k))

    sets = _Cycle(_rotating(sdpa_make, bytes16))

    def run_sdpa():
        q, k, v = sets.next()
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    row["sdpa_ms"] = _bench(run_sdpa, rep_ms, graph=True)
    del sets
    torch.cuda.empty_cache()

    def paged(spec, make_pool, q_matrix, storage, nbytes, hadamard_block=0):
        def make():
            pool = make_pool(spec, nb, dev)
            table = torch.randperm(nb, device=dev, dtype=torch.int64).to(torch.int32).view(batch, nblk_seq)
            return (q_make(), pool, table)

        s = _Cycle(_rotating(make, nbytes))

        def run():
            q, pool, table = s.next()
            return decode_kernel.decode(q, pool, table, seq_lens, q_matrix, None, scale, storage, "fp16",
                                        hadamard_block, config=(config or DEFAULT).decode)

        ms = _bench(run, rep_ms, graph=True)
        del s
        torch.cuda.empty_cache()
        return ms

    row["bf16_paged_ms"] = paged(spec16, bf16_pool, None, "bf16", bytes16)
    row["int4_ms"] = paged(spec4, quant_pool, None, "int4", bytes4)
    row["saw_int4_ms"] = paged(spec4, quant_pool, tf.q_matrix, "int4", bytes4, tf.hadamard_block)
    row["saw_int4_tbps"] = bytes4 / row["saw_int4_ms"] / 1e9
    row["saw_int4_frac_bw"] = row["saw_int4_tbps"] / peak_tbps
    row["bf16_paged_tbps"] = bytes16 / row["bf16_paged_ms"] / 1e9
    row["sdpa_tbps"] = bytes16 / row["sdpa_ms"] / 1e9
    row["x_vs_sdpa"] = row["sdpa_ms"] / row["saw_int4_ms"]
    row["x_vs_bf16_paged"] = row["bf16_paged_ms"] / row["saw_int4_ms"]
    row["rotation_overhead"] = row["saw_int4_ms"] / row["int4_ms"] - 1
    return row


# ------------------------------------------------------------------------------------------ append
def bench_append(rep_ms, t, config=None):
    import torch

    from .kernels import append as append_kernel
    from .kernels.config import DEFAULT
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    dev, h, d = "cuda", 8, 128
    rows = []
    for n in APPEND_TOKENS:
        row = {"tokens": n, "heads": h, "d": d}
        nb = n // t + 1
        for fmt in ("saw_int4", "saw_int4_calib", "int4", "bf16"):
            spec = KVCacheSpec(d, h, t, kv_format=fmt.removesuffix("_calib"))
            tf = calibrated_transform(spec, dev) if fmt.endswith("_calib") else build_layer_transform(spec).to(dev)
            nbytes = 2 * n * h * d * 2 + n * spec.bytes_per_token

            def make():
                k = torch.randn(n, h, d, device=dev, dtype=torch.bfloat16)
                pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device=dev)
                slots = torch.randperm(nb * t, device=dev)[:n]
                return k, torch.randn_like(k), pool, slots

            s = _Cycle(_rotating(make, nbytes))

            def run():
                k, v, pool, slots = s.next()
                append_kernel.append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, "fp16",
                                     tf.hadamard_block, config=(config or DEFAULT).append)

            ms = _bench(run, rep_ms, graph=True)
            row[f"{fmt}_us"] = ms * 1e3
            row[f"{fmt}_tbps"] = nbytes / ms / 1e9
            if fmt == "bf16":  # torch index_put of the same bf16 tokens as a baseline
                def run_torch():
                    k, v, pool, slots = s.next()
                    view = pool.view(torch.bfloat16).view(nb, 2, h, t, d)
                    blk, r = slots // t, slots % t
                    view[blk, 0, :, r] = k
                    view[blk, 1, :, r] = v

                row["torch_index_put_us"] = _bench(run_torch, rep_ms, graph=True) * 1e3
            del s
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ prefill
def _sdpa_prefill(q, k, v, scale, prefix):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    if prefix == 0:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=True)
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)


def bench_prefill(rep_ms, t, mem_limit_gb, config=None):
    import torch

    from .kernels import prefill as prefill_kernel
    from .kernels.config import DEFAULT
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    dev, hq, hkv, d = "cuda", 32, 8, 128
    scale = d ** -0.5
    rows = []
    for prefix in PREFILL_PREFIXES:
        for chunk in PREFILL_CHUNKS:
            total = prefix + chunk
            row = {"prefix": prefix, "chunk": chunk, "hq": hq, "hkv": hkv, "d": d}
            q = torch.randn(1, hq, chunk, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, hkv, total, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            # SDPA: K/V expanded to the query heads when the flash path refuses GQA
            try:
                _sdpa_prefill(q, k, v, scale, prefix)
                row["sdpa_ms"] = _bench(lambda: _sdpa_prefill(q, k, v, scale, prefix), rep_ms)
                row["sdpa_note"] = "flash" if prefix == 0 else "causal_lower_right"
            except RuntimeError as e:  # pragma: no cover - backend dependent
                row["sdpa_ms"] = float("nan")
                row["sdpa_note"] = f"failed: {str(e)[:80]}"
            flops = 4 * hq * d * (chunk * prefix + chunk * (chunk + 1) / 2)
            row["sdpa_tflops"] = flops / row["sdpa_ms"] / 1e9
            for fmt in ("saw_int4", "bf16"):
                spec = KVCacheSpec(d, hkv, t, kv_format=fmt)
                tf = build_layer_transform(spec).to(dev)
                nb = -(-total // t)
                pool = quant_pool(spec, nb, dev) if fmt != "bf16" else bf16_pool(spec, nb, dev)
                table = torch.randperm(nb, device=dev).to(torch.int32).view(1, nb)
                sl = torch.tensor([total], dtype=torch.int32, device=dev)
                qsl = torch.tensor([0, chunk], dtype=torch.int32, device=dev)
                qq = q[0].transpose(0, 1).contiguous()
                ms = _bench(lambda: prefill_kernel.prefill(qq, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, scale,
                                                           spec.storage, "fp16", tf.hadamard_block,
                                                           config=(config or DEFAULT).prefill), rep_ms)
                row[f"{fmt}_ms"] = ms
                row[f"{fmt}_tflops"] = flops / ms / 1e9
                row[f"{fmt}_x_vs_sdpa"] = row["sdpa_ms"] / ms
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ tuning
# Every tuner takes a KernelConfig, times variants of it (dataclasses.replace) and returns
# (rows, tuned config); nothing shipped is changed, so a later measurement uses exactly the config
# it is handed.
def tune_decode(rep_ms, t, peak, config):
    """Decode tile configs on a few shapes: per regime, the (block_n, warps, stages) with the least time
    relative to each shape's best; then the split granularity (tune_decode_splits)."""
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dcfg = config.decode
    shapes = [(32, 8, 128, 64, 8192), (64, 8, 128, 128, 2048), (32, 8, 128, 8, 32768), (32, 8, 128, 1, 32768),
              (9, 3, 64, 64, 8192)]
    regime = {s: dcfg.regime(s[3], s[1], s[2], "int4", sms, s[4]) for s in shapes}
    grid = [dict(block_n=bn, num_warps=warps, num_stages=stages)
            for bn, warps in TUNE_DECODE_TILES for stages in TUNE_DECODE_STAGES]
    rows = []
    for cfg in grid:
        for shape in shapes:
            hq, hkv, d, b, ctx = shape
            variant = dcfg.with_tile(regime[shape], **cfg)
            try:
                r = _decode_int4_only(hq, hkv, d, b, ctx, t, rep_ms, variant)
            except Exception as e:  # a config that does not compile (shared memory, registers)
                print(f"tune {cfg}: failed {str(e)[:80]}", flush=True)
                break
            rows.append({**cfg, "shape": list(shape), "regime": regime[shape], "ms": r[0], "frac_bw": r[1] / peak})
            print(f"tune {regime[shape]} bn={cfg['block_n']} w={cfg['num_warps']} s={cfg['num_stages']} "
                  f"{hq}/{hkv}/{d} b={b} ctx={ctx}: {r[0] * 1e3:.1f} us {r[1]:.2f} TB/s {r[1] / peak:.0%}", flush=True)
    for name in set(regime.values()):
        mine = [r for r in rows if r["regime"] == name]
        best_of = {}
        for r in mine:
            best_of[tuple(r["shape"])] = min(best_of.get(tuple(r["shape"]), math.inf), r["ms"])
        score = {}
        for r in mine:
            key = (r["block_n"], r["num_warps"], r["num_stages"])
            score.setdefault(key, []).append(r["ms"] / best_of[tuple(r["shape"])])
        complete = {k: sum(v) for k, v in score.items() if len(v) == len(best_of)}
        if complete:
            bn, warps, stages = min(complete, key=complete.get)
            dcfg = dcfg.with_tile(name, block_n=bn, num_warps=warps, num_stages=stages)
    split_rows, config = tune_decode_splits(rep_ms, t, peak, replace(config, decode=dcfg))
    return rows + split_rows, config


TUNE_SHAPES = [(32, 8, 128, 64, 2048), (32, 8, 128, 64, 8192), (32, 8, 128, 64, 32768), (32, 8, 128, 128, 8192),
               (32, 8, 128, 8, 32768), (32, 8, 128, 32, 8192), (32, 8, 128, 1, 32768), (9, 3, 64, 64, 8192),
               (32, 8, 128, 1, 2048), (32, 8, 128, 8, 1024), (9, 3, 64, 8, 2048)]
TUNE_DECODE_MAXNREG = (None, 168, 144)  # register caps per thread (None: the compiler's choice)


def _shapes_by_regime(decode_config, sms):
    """TUNE_SHAPES grouped by the regime decode_config.regime gives them on this GPU."""
    shapes = {"many": [], "few": [], "tiny": []}
    for s in TUNE_SHAPES:
        shapes[decode_config.regime(s[3], s[1], s[2], "int4", sms, s[4])].append(s)
    return shapes


def _least_relative(timed):
    """The key of timed ({choice: [ms per shape]}) with the least total time relative to each shape's
    best (a plain sum of times would favour the big shapes)."""
    best = [min(col) for col in zip(*timed.values())]
    score = {k: sum(ms / b for ms, b in zip(v, best)) for k, v in timed.items()}
    return min(score, key=score.get)


def _tune_decode_key(key, grids, rotations, rep_ms, t, peak, config):
    """Times each value of config.decode.<regime>.<key> (grids: {regime: values}) on the regime's
    TUNE_SHAPES, with the q rotation (saw_int4) and/or without (int4) as `rotations` says; returns
    (rows, config with per regime the value of least relative time)."""
    import torch

    dcfg = config.decode
    shapes = _shapes_by_regime(dcfg, torch.cuda.get_device_properties(0).multi_processor_count)
    rows = []
    for name, values in grids.items():
        timed = {}  # value -> [ms per shape and format]
        for value in values if shapes[name] else ():
            variant = dcfg.with_tile(name, **{key: value})
            timed[value] = []
            for hq, hkv, d, b, ctx in shapes[name]:
                for rotated in rotations:
                    ms, tbps = _decode_int4_only(hq, hkv, d, b, ctx, t, rep_ms, variant, rotated)
                    timed[value].append(ms)
                    fmt = "saw_int4" if rotated else "int4"
                    rows.append({"regime": name, key: value, "format": fmt, "shape": [hq, hkv, d, b, ctx],
                                 "ms": ms, "frac_bw": tbps / peak})
                    print(f"tune {name} {key}={value} {fmt} {hq}/{hkv}/{d} b={b} ctx={ctx}: {ms * 1e3:.1f} us "
                          f"{tbps:.2f} TB/s {tbps / peak:.0%}", flush=True)
        if timed:
            dcfg = dcfg.with_tile(name, **{key: _least_relative(timed)})
    return rows, replace(config, decode=dcfg)


def tune_decode_splits(rep_ms, t, peak, config):
    """Split granularity per regime (the tile's `waves`: the split count aims at waves x SMs
    programs), timed on saw_int4."""
    grids = {"many": (2, 4, 8, 12, 16, 24), "few": (2, 4, 6, 8), "tiny": (1, 2, 4)}
    return _tune_decode_key("waves", grids, (True,), rep_ms, t, peak, config)


def tune_decode_regs(rep_ms, t, peak, config):
    """Register cap per regime (the tile's `maxnreg`), timed on saw_int4 and plain int4: their
    kernels differ (168 and 220 registers per thread at the "many" tiles, i.e. 6 and 4 resident
    programs per SM)."""
    grids = {name: TUNE_DECODE_MAXNREG for name in ("many", "few", "tiny")}
    return _tune_decode_key("maxnreg", grids, (True, False), rep_ms, t, peak, config)


def tune_append(rep_ms, t, config):
    """Append tile configs (tokens per program, warps) at 16k tokens, 8 KV heads, head_dim 128."""
    import torch

    from .kernels import append as append_kernel
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    acfg = config.append
    n, h, d, rows = 16384, 8, 128, []
    for fmt, key in (("int4", "plain"), ("saw_int4", "transform")):
        spec = KVCacheSpec(d, h, t, kv_format=fmt)
        tf = build_layer_transform(spec).to("cuda")
        nb = n // t + 1
        k = torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device="cuda")
        slots = torch.randperm(nb * t, device="cuda")[:n]
        torch.cuda.synchronize()
        timed = {}
        for cfg in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8)):
            variant = replace(acfg, **{key: cfg})
            ms = _bench(lambda: append_kernel.append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix,
                                                     spec.storage, "fp16", tf.hadamard_block, config=variant),
                        rep_ms, graph=True)
            tbps = (2 * n * h * d * 2 + n * spec.bytes_per_token) / ms / 1e9
            rows.append({"format": fmt, "block_n": cfg[0], "warps": cfg[1], "us": ms * 1e3, "tbps": tbps})
            print(f"tune append {fmt} bn={cfg[0]} w={cfg[1]}: {ms * 1e3:.1f} us {tbps:.2f} TB/s", flush=True)
            timed[cfg] = ms
        acfg = replace(acfg, **{key: min(timed, key=timed.get)})
    return rows, replace(config, append=acfg)


def tune_prefill(rep_ms, t, config):
    import itertools

    import torch

    from .kernels import prefill as prefill_kernel
    from .kernels.config import PrefillTile
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    pcfg = config.prefill
    rows = []
    prefix, chunk, hq, hkv, d = 8192, 2048, 32, 8, 128
    total = prefix + chunk
    flops = 4 * hq * d * (chunk * prefix + chunk * (chunk + 1) / 2)
    q = torch.randn(chunk, hq, d, device="cuda", dtype=torch.bfloat16)
    sl = torch.tensor([total], dtype=torch.int32, device="cuda")
    qsl = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    for fmt in TUNE_PREFILL_FORMATS:
        spec = KVCacheSpec(d, hkv, t, kv_format=fmt)
        tf = build_layer_transform(spec).to("cuda")
        nb = -(-total // t)
        pool = quant_pool(spec, nb, "cuda") if fmt != "bf16" else bf16_pool(spec, nb, "cuda")
        table = torch.randperm(nb, device="cuda").to(torch.int32).view(1, nb)
        best = (float("inf"), pcfg.tile(d, spec.storage))
        for bm, bn, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), TUNE_PREFILL_STAGES):
            if bm == 64 and warps == 8:
                continue
            tile = PrefillTile(bm, bn, warps, stages)
            variant = pcfg.with_tile(d, spec.storage, tile)
            try:
                ms = _bench(lambda: prefill_kernel.prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix,
                                                           d ** -0.5, spec.storage, "fp16", tf.hadamard_block,
                                                           config=variant), rep_ms)
            except Exception as e:  # out of shared memory etc.
                print(f"tune prefill {fmt} {bm}/{bn}/{warps}/{stages}: failed {str(e)[:60]}")
                continue
            rows.append({"fmt": fmt, "cfg": [bm, bn, warps, stages], "ms": ms, "tflops": flops / ms / 1e9})
            if ms < best[0]:
                best = (ms, tile)
            print(f"tune prefill {fmt} bm={bm} bn={bn} w={warps} s={stages}: {ms * 1e3:.0f} us "
                  f"{flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        pcfg = pcfg.with_tile(d, spec.storage, best[1])
    return rows, replace(config, prefill=pcfg)


def _decode_int4_only(hq, hkv, d, batch, ctx, t, rep_ms, decode_config, rotated=True):
    import torch

    from .kernels import decode as decode_kernel
    from .spec import KVCacheSpec
    from .transforms import build_layer_transform

    spec = KVCacheSpec(d, hkv, t, kv_format="saw_int4")
    tf = build_layer_transform(spec).to("cuda")
    nb = batch * (ctx // t)
    nbytes = batch * ctx * spec.bytes_per_token
    sets = _Cycle(_rotating(lambda: (quant_pool(spec, nb, "cuda"),
                                     torch.randperm(nb, device="cuda").int().view(batch, -1)), nbytes))
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

    def run():
        pool, table = sets.next()
        return decode_kernel.decode(q, pool, table, sl, tf.q_matrix if rotated else None, None, d ** -0.5, "int4",
                                    "fp16", tf.hadamard_block, config=decode_config)

    ms = _bench(run, rep_ms, graph=True)
    return ms, nbytes / ms / 1e9


def config_table(config) -> str:
    """A config as the Python literal to paste into kernels/config.py (the tuners print it)."""
    return repr(config)


# ------------------------------------------------------------------------------------------ report
def _table(rows, cols, fmt):
    lines = ["  ".join(f"{c:>12}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{fmt.get(c, '{}').format(r.get(c, float('nan'))):>12}" for c in cols))
    return "\n".join(lines)


def _chart(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = result.get("decode", [])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (hq, hkv, d) in zip(axes, DECODE_CONFIGS):
        for b in sorted({r["batch"] for r in dec}):
            pts = [r for r in dec if (r["hq"], r["hkv"], r["d"], r["batch"]) == (hq, hkv, d, b)]
            if pts:
                ax.plot([p["ctx"] for p in pts], [p["x_vs_sdpa"] for p in pts], marker="o", label=f"batch {b}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"decode saw_int4 vs SDPA bf16 (Hq {hq}/Hkv {hkv}, D {d})")
        ax.set_xlabel("context")
        ax.set_ylabel("speedup (x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print("sawint4 bench needs a CUDA GPU")
        return 1
    from tqdm import tqdm

    from . import kernels

    if not kernels.HAVE_TRITON:
        print("sawint4 bench needs triton")
        return 1
    from .kernels.config import DEFAULT

    os.makedirs(args.out, exist_ok=True)
    parts = set(args.only.split(","))
    t = args.tokens_per_block
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens_per_block": t}
    import triton

    result["triton"] = triton.__version__
    bw = measure_bandwidth(args.rep_ms)
    result["bandwidth"] = bw
    print(f"memory bandwidth: copy {bw['copy_tbps']:.2f} TB/s (read+write), read-only sum {bw['read_tbps']:.2f} TB/s")
    peak = bw["peak_tbps"]

    # The tuners return a new config; the parts measured after them in this run use it (printed
    # below). The shipped kernels.config.DEFAULT is never changed.
    config = DEFAULT
    if "tune" in parts:
        result["tune"], config = tune_decode(args.rep_ms, t, peak, config)
    if "tunesplit" in parts and "tune" not in parts:
        result["tune_split"], config = tune_decode_splits(args.rep_ms, t, peak, config)
    if "tunereg" in parts:
        result["tune_reg"], config = tune_decode_regs(args.rep_ms, t, peak, config)
    if "tuneappend" in parts:
        result["tune_append"], config = tune_append(args.rep_ms, t, config)
    if "tuneprefill" in parts:
        result["tune_prefill"], config = tune_prefill(args.rep_ms, t, config)
    if config != DEFAULT:
        print(f"tuned kernel config (used by the parts below; kernels/config.py ships DEFAULT):\n"
              f"{config_table(config)}")
        result["tuned_config"] = asdict(config)

    if "append" in parts:
        result["append"] = bench_append(args.rep_ms, t, config)
        cols = ["tokens", "saw_int4_us", "saw_int4_tbps", "saw_int4_calib_us", "saw_int4_calib_tbps", "int4_us",
                "int4_tbps", "bf16_us", "bf16_tbps", "torch_index_put_us"]
        fmt = {c: "{:.1f}" for c in cols if c.endswith("_us")}
        fmt.update({c: "{:.2f}" for c in cols if c.endswith("tbps")})
        print("\nAPPEND (8 KV heads, head_dim 128, bf16 in; TB/s = bf16 read + stored bytes)")
        print(_table(result["append"], cols, fmt))

    if "decode" in parts:
        batches = QUICK_BATCHES if args.quick else BATCHES
        contexts = QUICK_CONTEXTS if args.quick else CONTEXTS
        points = [(c, b, x) for c in DECODE_CONFIGS for b in batches for x in contexts]
        rows = []
        for (hq, hkv, d), b, ctx in tqdm(points, desc="decode", mininterval=5):
            r = bench_decode_point(hq, hkv, d, b, ctx, t, args.rep_ms, peak, args.mem_limit_gb, config)
            if r is not None:
                rows.append(r)
                tqdm.write(f"decode {hq}/{hkv}/{d} b={b} ctx={ctx}: sdpa {r['sdpa_ms'] * 1e3:.1f} us, "
                           f"bf16 paged {r['bf16_paged_ms'] * 1e3:.1f}, int4 {r['int4_ms'] * 1e3:.1f}, "
                           f"saw_int4 {r['saw_int4_ms'] * 1e3:.1f} ({r['saw_int4_tbps']:.2f} TB/s, "
                           f"{r['x_vs_sdpa']:.2f}x SDPA)")
        result["decode"] = rows
        cols = ["hq", "hkv", "d", "batch", "ctx", "sdpa_ms", "bf16_paged_ms", "int4_ms", "saw_int4_ms",
                "saw_int4_tbps", "saw_int4_frac_bw", "x_vs_sdpa", "x_vs_bf16_paged", "rotation_overhead"]
        fmt = {c: "{:.4f}" for c in cols[5:9]}
        fmt.update({"saw_int4_tbps": "{:.2f}", "saw_int4_frac_bw": "{:.0%}", "x_vs_sdpa": "{:.2f}x",
                    "x_vs_bf16_paged": "{:.2f}x", "rotation_overhead": "{:+.1%}"})
        print("\nDECODE (times in ms, median; bandwidth on the INT4 bytes read)")
        print(_table(rows, cols, fmt))

    if "prefill" in parts:
        result["prefill"] = bench_prefill(args.rep_ms, t, args.mem_limit_gb, config)
        cols = ["prefix", "chunk", "sdpa_ms", "sdpa_tflops", "saw_int4_ms", "saw_int4_tflops", "saw_int4_x_vs_sdpa",
                "bf16_ms", "bf16_x_vs_sdpa"]
        fmt = {c: "{:.3f}" for c in ("sdpa_ms", "saw_int4_ms", "bf16_ms")}
        fmt.update({c: "{:.0f}" for c in cols if c.endswith("tflops")})
        fmt.update({c: "{:.2f}x" for c in cols if c.endswith("x_vs_sdpa")})
        print("\nPREFILL (Hq 32 / Hkv 8, head_dim 128, one sequence)")
        print(_table(result["prefill"], cols, fmt))

    result["seconds"] = time.time() - started
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    if result.get("decode"):
        try:
            _chart(result, os.path.join(args.out, "bench.png"))
        except ImportError:
            print("matplotlib missing: no chart")
    print(f"\nwrote {args.out}/bench.json ({result['seconds']:.0f} s)")
    return 0
