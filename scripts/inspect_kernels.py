"""Compile a kernel for sm_90 on a CPU machine and report what decides its speed.

    python scripts/inspect_kernels.py decode --block-n 64 --warps 2 --stages 3
    python scripts/inspect_kernels.py prefill --format bf16

Prints registers / spills / shared memory (cuobjdump), the shared-memory buffers of the pipelined
loads (a `2x...` buffer means double-buffered), loads left synchronous inside loops, and an
instruction histogram of the longest loop of the SASS. This is how the single-buffer pipeline and the
synchronous metadata loads of the decode kernel were found (docs/kernels.md). Uses the ahead-of-time
variants of kernels/aot.py (decode unsplit), so no GPU is needed.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys


def _loop_histogram(sass: str):
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]
    addr = lambda ln: int(re.match(r"\s*/\*([0-9a-f]+)\*/", ln).group(1), 16)  # noqa: E731
    span = None
    for ln in lines:  # the longest backward branch is the main loop
        m = re.search(r"BRA\s+0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr(ln) and (span is None or addr(ln) - int(m.group(1), 16) > span[1] - span[0]):
            span = (int(m.group(1), 16), addr(ln))
    if span is None:
        return 0, collections.Counter()
    body = [ln for ln in lines if span[0] <= addr(ln) <= span[1]]
    ops = collections.Counter(re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", ln).group(1) for ln in body)
    return len(body), ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["append", "decode", "prefill"])
    p.add_argument("--format", default="saw_int4")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-m", type=int)
    p.add_argument("--block-n", type=int)
    p.add_argument("--warps", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--q-chunk", type=int, help="decode: Q_CHUNK")
    p.add_argument("--rotation-block", type=int, help="HB: read the matrices in block-Hadamard form")
    p.add_argument("--maxnreg", type=int, help="register cap per thread (ptxas .maxnreg)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from trtllm_sawint4.build_scripts.aot import compile_kernel
    from trtllm_sawint4.kernels.aot import model_kernels

    kernel = dict(zip(["append", "decode", "prefill"],
                      model_kernels(args.head_dim, 32, 8, 64, args.format, False, False, "bf16", args.head_dim ** -0.5)))[args.op]
    for name, value in (("BLOCK_M", args.block_m), ("BLOCK_N", args.block_n), ("Q_CHUNK", args.q_chunk),
                        ("HB", args.rotation_block)):
        if value is not None and name in kernel.constexprs:
            kernel.constexprs[name] = value
    kernel.num_warps = args.warps or kernel.num_warps
    kernel.num_stages = args.stages or kernel.num_stages
    compiled = compile_kernel(kernel, 90, {"maxnreg": args.maxnreg} if args.maxnreg else None)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sawint4_{args.op}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    ttgir = compiled.asm["ttgir"]
    print(f"{args.op} {args.format} D={args.head_dim} warps={kernel.num_warps} stages={kernel.num_stages} "
          f"{ {k: v for k, v in kernel.constexprs.items() if k.startswith('BLOCK')} }")
    print(usage.strip().splitlines()[-1].strip())
    print("shared buffers:", dict(collections.Counter(re.findall(r"local_alloc : \(\) -> !ttg.memdesc<([^,]+),", ttgir))))
    print("synchronous loads inside loops:", len(re.findall(r"^\s{6,}%\S+ = tt.load ", ttgir, re.M)))
    n, ops = _loop_histogram(sass)
    print(f"main loop: {n} instructions per warp per iteration")
    print("  " + ", ".join(f"{k} {v}" for k, v in ops.most_common(16)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
