"""Before/after timing of the kernels of two source trees of this repository (GPU): decode, append and
prefill at fixed shapes, CUDA-graph replay medians (triton.testing.do_bench_cudagraph), each tree in
its own process, same shapes and inputs, then one table of the times and their ratio (after / before).

    python scripts/bench_ab.py --tree OLD_CHECKOUT --tree . [--rep-ms 20] [--json out.json]

A tree is a checkout of the repository (kernels/, plugins/, build_scripts/ at the top, mapped into the
trtllm_sawint4 package as pyproject.toml's package-dir says); each is imported from a temporary folder
that lays it out as the installed package. Only the kernels' plain-call entry points are used, in
the forms both older and newer trees have (kernels.decode as a function or a module).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

DECODE = [(32, 8, 128, b, c) for b in (1, 8, 64) for c in (2048, 8192, 32768)] + [
    (9, 3, 64, 8, 8192), (9, 3, 64, 64, 8192)]  # (Hq, Hkv, head_dim, batch, context)
APPEND = (4096, 16384)  # tokens, 8 KV heads, head_dim 128
PREFILL = ((0, 2048), (8192, 2048))  # (prefix, chunk), Hq 32 / Hkv 8, head_dim 128


def _entry(op):
    """The kernel launch function of `op` in whichever layout the tree has."""
    pkg = importlib.import_module("trtllm_sawint4.kernels")
    fn = getattr(pkg, op, None)
    if callable(fn):
        return fn
    return getattr(importlib.import_module(f"trtllm_sawint4.kernels.{op}"), op)


def _block(tf):
    return getattr(tf, "hadamard_block", getattr(tf, "rotation_block", 0))


def _pool(spec, nb, gen):
    import torch

    from trtllm_sawint4.layout import pool_views

    pool = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, device="cuda", generator=gen)
    if spec.storage == "bf16":
        pool.view(torch.bfloat16).normal_(generator=gen)
        return pool
    views = pool_views(pool, spec.head_dim, spec.storage, spec.metadata_dtype)
    views.scale.copy_((torch.rand(views.scale.shape, device="cuda", generator=gen) * 0.18 + 0.02)
                      .to(views.scale.dtype))
    views.vmin.copy_((-8 * views.scale.float()).to(views.vmin.dtype))
    return pool


def measure(rep_ms: float) -> dict:
    import torch
    import triton
    import triton.testing

    from trtllm_sawint4 import KVCacheSpec, build_layer_transform

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median") * 1e3  # us

    gen = torch.Generator(device="cuda").manual_seed(0)
    decode, append, prefill = _entry("decode"), _entry("append"), _entry("prefill")
    rows = {}
    for hq, hkv, d, b, ctx in DECODE:
        for fmt in ("saw_int4", "int4", "bf16"):
            spec = KVCacheSpec(d, hkv, 64, kv_format="saw_int4" if fmt == "int4" else fmt)
            tf = build_layer_transform(spec).to("cuda")
            nb = b * ctx // 64
            pool = _pool(spec, nb, gen)
            table = torch.randperm(nb, device="cuda", generator=gen).int().view(b, -1)
            sl = torch.full((b,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            qm = tf.q_matrix if fmt == "saw_int4" else None
            rows[f"decode {fmt} {hq}/{hkv}/{d} b{b} ctx{ctx}"] = timed(
                lambda: decode(q, pool, table, sl, qm, None, d ** -0.5, spec.storage, "fp16", _block(tf)))
            del pool, table
    for n in APPEND:
        for fmt in ("saw_int4", "int4", "bf16"):
            spec = KVCacheSpec(128, 8, 64, kv_format=fmt)
            tf = build_layer_transform(spec).to("cuda")
            nb = n // 64 + 1
            pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device="cuda")
            slots = torch.randperm(nb * 64, device="cuda", generator=gen)[:n]
            k = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            rows[f"append {fmt} {n} tokens"] = timed(
                lambda: append(pool, k, v, slots, tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, "fp16",
                               _block(tf)))
    for prefix, chunk in PREFILL:
        for fmt in ("saw_int4", "bf16"):
            spec = KVCacheSpec(128, 8, 64, kv_format=fmt)
            tf = build_layer_transform(spec).to("cuda")
            total = prefix + chunk
            nb = -(-total // 64)
            pool = _pool(spec, nb, gen)
            table = torch.randperm(nb, device="cuda", generator=gen).int().view(1, nb)
            sl = torch.tensor([total], dtype=torch.int32, device="cuda")
            qsl = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
            q = torch.randn(chunk, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            rows[f"prefill {fmt} prefix{prefix} chunk{chunk}"] = timed(
                lambda: prefill(q, pool, table, sl, qsl, tf.q_matrix, tf.v_matrix, 128 ** -0.5, spec.storage,
                                "fp16", _block(tf)))
    return {"triton": triton.__version__, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "us": rows}


def _layout(tree: str, into: str) -> str:
    """tree's folders laid out as the installed package (pyproject.toml's package-dir)."""
    import tomllib

    with open(os.path.join(tree, "pyproject.toml"), "rb") as f:
        dirs = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for pkg, folder in sorted(dirs.items(), key=lambda kv: len(kv[0])):
        shutil.copytree(os.path.join(tree, folder), os.path.join(into, *pkg.split(".")),
                        ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    return into


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", help="a source tree (give two: before, after)")
    ap.add_argument("--rep-ms", type=float, default=20.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one tree, in this process: print its times as JSON
        print("RESULT " + json.dumps(measure(args.rep_ms)), flush=True)
        return 0
    if not args.tree or len(args.tree) != 2:
        ap.error("give --tree BEFORE --tree AFTER")
    results = []
    for tree in args.tree:
        with tempfile.TemporaryDirectory() as tmp:
            root = _layout(os.path.abspath(tree), tmp)
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            env["PYTHONPATH"] = root
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--rep-ms", str(args.rep_ms)],
                                 env=env, cwd=tmp, capture_output=True, text=True)
            if out.returncode:
                print(out.stdout[-3000:], out.stderr[-3000:])
                return out.returncode
            line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
            results.append(json.loads(line.removeprefix("RESULT ")))
    before, after = (r["us"] for r in results)
    print(f"{results[0]['device']}, torch {results[0]['torch']}, triton {results[0]['triton']}; "
          f"us, CUDA-graph replay medians; before = {args.tree[0]}, after = {args.tree[1]}")
    print(f"{'shape':48s} {'before':>9s} {'after':>9s} {'after/before':>12s}")
    ratios = []
    for key in before:
        r = after[key] / before[key]
        ratios.append(r)
        print(f"{key:48s} {before[key]:9.1f} {after[key]:9.1f} {r:12.3f}")
    print(f"median ratio {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trees": args.tree, "before": results[0], "after": results[1]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
