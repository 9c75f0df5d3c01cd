"""Compile a kernel for sm_90 (or sm_80) on a CPU machine and report what decides its speed.

    python scripts/inspect_kernels.py decode --block-n 64 --warps 2 --stages 3
    python scripts/inspect_kernels.py prefill --format bf16 --json
    python scripts/inspect_kernels.py all --target sm_80 --json

Reports registers / spills / shared memory (cuobjdump), the shared-memory buffers of the pipelined
loads (a `2x...` buffer means double-buffered), loads left synchronous inside loops, and an
instruction histogram of the longest loop of the SASS. This is how the single-buffer pipeline and the
synchronous metadata loads of the decode kernel were found (docs/kernels.md). Uses the ahead-of-time
variants of kernels/aot.py (decode unsplit), so no GPU is needed; `decode --one-tile` compiles the
split decode kernel with one-tile splits instead and reports where its tile loads go; `decode --mma`
compiles the Gluon decode kernel (kernels/decode_gluon.py); `all` compiles every JIT kernel (and the
Gluon one) and reports each one's resources. `--json` prints one JSON object (what the tests read)
instead of the text report; it names the Triton and ptxas versions that produced it.
"""

from __future__ import annotations

import argparse
import collections
import json
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


def _compile_split_decode(args, one_tile: bool, arch: int = 90):
    """The JIT decode kernel as launched with splits (kernels/decode_triton.py; the AOT variant is unsplit),
    compiled for sm_90: needed to see the one-tile path (ONE_TILE)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from trtllm_sawint4.kernels.decode_triton import _decode_kernel
    from trtllm_sawint4.spec import KVCacheSpec

    d = args.head_dim
    spec = KVCacheSpec(d, 8, 64, args.format)
    ptrs = dict(q_ptr="*bf16", pool_ptr="*u8", poolb_ptr="*bf16", poolf_ptr="*fp32", bt_ptr="*i32", sl_ptr="*i32",
                qm_ptr="*fp32", vm_ptr="*fp32", out_ptr="*bf16", po_ptr="*fp32", pl_ptr="*fp32")
    scalars = dict(stride_qb="i32", stride_qh="i32", stride_ob="i32", stride_oh="i32", stride_bt="i32",
                   qk_scale="fp32", tiles_per_split="i32", max_tokens="i32")
    constexprs = dict(H=8, G=4, GP=16, D=d, T=64, REGION=spec.region_bytes, STORAGE={"bf16": 0, "int8": 1}.get(spec.storage, 2),
                      META32=spec.metadata_dtype == "fp32", HAS_QM=spec.rotated, HAS_VM=False, SPLIT=True,
                      BLOCK_N=args.block_n or 64, DT=tl.bfloat16, PREC=1, Q_CHUNK=args.q_chunk or 64,
                      ONE_TILE=one_tile, WINDOW=0)
    signature = {**ptrs, **scalars, **{k: "constexpr" for k in constexprs}}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
    src = triton.compiler.ASTSource(fn=_decode_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": args.warps or 4, "num_stages": args.stages or 3}
    if args.maxnreg:
        options["maxnreg"] = args.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _compile_mma_decode(args, fp16: bool, arch: int = 90):
    """The Gluon decode kernel (kernels/decode_gluon.py; one warp, 2 buffers by default, the q rotation
    in block-Hadamard form of blocks of 128 unless --rotation-block says otherwise; 0: none) for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from trtllm_sawint4.kernels import decode_gluon

    ptrs = dict(q_ptr="*bf16", qm_ptr="*fp32", pool_ptr="*u8", poolh_ptr="*fp16", bt_ptr="*i32", sl_ptr="*i32", po_ptr="*fp32",
                pl_ptr="*fp32")
    scalars = dict(stride_qb="i32", stride_qh="i32", stride_bt="i32", qk_scale="fp32", tiles_per_split="i32")
    constexprs = dict(H=8, G=4, T=64, REGION=64 * (64 + 4), FP16=fp16, STAGES=args.stages or 2,
                      HB=128 if args.rotation_block is None else args.rotation_block)
    src = GluonASTSource(fn=decode_gluon._decode_mma_kernel, signature={**ptrs, **scalars,
                                                                      **{k: "constexpr" for k in constexprs}},
                         constexprs=constexprs, attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})


def _compile_jit(fn, ptrs: dict, scalars: dict, constexprs: dict, arch: int, num_warps: int):
    """triton.compile of a @triton.jit kernel for `arch`, pointers promised 16-byte aligned."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature = {**ptrs, **scalars, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs={(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _every_kernel(arch: int) -> dict:
    """Every kernel the torch ops launch, compiled for `arch`: name -> compiled (the AOT variants carry
    the append/decode/prefill bodies; the split decode, both reduce kernels, the q-prep kernel and the
    Gluon decode kernel as launched)."""
    from trtllm_sawint4.build_scripts.aot import compile_kernel
    from trtllm_sawint4.kernels import decode_gluon
    from trtllm_sawint4.kernels._common import _q_prep_kernel
    from trtllm_sawint4.kernels._reduce import _reduce_kernel, _reduce_rotate_kernel
    from trtllm_sawint4.kernels.aot import model_kernels

    out = {}
    for fmt in ("saw_int4", "int8", "bf16"):
        for k in model_kernels(128, 32, 8, 64, fmt, False, False, "bf16", 128 ** -0.5):
            out[f"{k.op}_aot[{fmt}]"] = compile_kernel(k, arch)
    out["decode_split[saw_int4]"] = _compile_split_decode(argparse.Namespace(
        head_dim=128, format="saw_int4", block_n=64, warps=2, stages=3, q_chunk=16, maxnreg=None), False, arch)
    reduce_ptrs = dict(po_ptr="*fp32", pl_ptr="*fp32")
    strides = dict(stride_ob="i32", stride_oh="i32", num_splits="i32")
    out["reduce"] = _compile_jit(_reduce_kernel, {**reduce_ptrs, "out_ptr": "*bf16"}, strides,
                                 dict(H=8, G=4, GP=16, D=128, SB=16, ONE_LOAD=True), arch, 4)
    out["reduce_rotate"] = _compile_jit(_reduce_rotate_kernel, {**reduce_ptrs, "vm_ptr": "*fp32", "out_ptr": "*bf16"},
                                        strides, dict(H=8, G=4, GP=16, D=128, SB=16, ONE_LOAD=True, PREC=1, HB=128),
                                        arch, 4)
    out["q_prep"] = _compile_jit(_q_prep_kernel, dict(q_ptr="*bf16", qm_ptr="*fp32", out_ptr="*fp32"),
                                 dict(stride_qb="i32", stride_qh="i32"), dict(G=4, GP=16, D=128, Q_CHUNK=16, PREC=1),
                                 arch, 2)
    if not decode_gluon.HAVE_GLUON:
        raise RuntimeError(f"Gluon unavailable: {decode_gluon._UNAVAILABLE}")
    for fp16 in (False, True):
        out[f"decode_gluon[{'fp16' if fp16 else 'bf16'}]"] = _compile_mma_decode(
            argparse.Namespace(stages=None, rotation_block=None), fp16, arch)
    return out


def one_tile_order(sass: str) -> tuple[int, int]:
    """(128-bit global loads issued before the first wait on async copies, instructions before that
    wait that read a register those loads write). In the one-tile decode that wait is the q
    transform's: the tile's loads should all be in flight by then, and nothing should use them (which
    stalls the warp until they arrive, e.g. a store to shared memory for a layout change) before it."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4}\*/", ln)]
    wait = next((i for i, ln in enumerate(lines) if "DEPBAR.LE" in ln), len(lines))
    pending, loads, early = set(), 0, 0
    for ln in lines[:wait]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);", ln)
        if not m:
            continue
        op, operands = m.group(1), [o.strip() for o in m.group(2).split(",")]
        regs = [set(int(r) for r in re.findall(r"\bR(\d+)\b", o)) for o in operands]
        if op == "LDG.E.128" and regs and regs[0]:
            base = min(regs[0])
            pending |= set(range(base, base + 4))
            loads += 1
            continue
        if any(r & pending for r in regs[1:]):
            early += 1
        if regs and not op.startswith(("ST", "LDGSTS")):  # a write of a pending register ends its tracking
            pending -= regs[0]
    return loads, early


def _tools():
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_version(arch: int) -> str:
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
    text = subprocess.run([ptxas.path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", text)
    return m.group(1) if m else text.strip().splitlines()[-1]


def _cuobjdump(compiled, name: str, *flags: str) -> str:
    cubin = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sawint4_{os.getpid()}_{name}.cubin")
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([f"{_tools()}/cuobjdump", *flags, cubin], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.remove(cubin)


def resources(compiled) -> dict:
    """cuobjdump -res-usage of the kernel as numbers: REG, STACK, SHARED, LOCAL, ... (per thread / block)."""
    line = _cuobjdump(compiled, "res", "-res-usage").strip().splitlines()[-1]
    return {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}


def report(compiled, label: str, arch: int, one_tile: bool) -> dict:
    """The machine-readable report of one compiled kernel (what the text report prints)."""
    import triton

    sass = _cuobjdump(compiled, "sass", "-sass")
    ttgir = compiled.asm["ttgir"]
    n, ops = _loop_histogram(sass)
    out = {
        "kernel": label, "target": f"sm_{arch}", "triton": triton.__version__, "ptxas": _ptxas_version(arch),
        "resources": resources(compiled),
        "shared_buffers": dict(collections.Counter(re.findall(r"local_alloc : \(\) -> !ttg.memdesc<([^,]+),", ttgir))),
        "sync_loads_in_loops": len(re.findall(r"^\s{6,}%\S+ = tt.load ", ttgir, re.M)),
        "main_loop": {"instructions": n, "ops": dict(ops.most_common())},
    }
    if one_tile:
        loads, early = one_tile_order(sass)
        out["one_tile"] = {"loads_before_first_wait": loads, "uses_before_first_wait": early}
    return out


def _print_text(rep: dict) -> None:
    print(rep["kernel"])
    print(" ".join(f"{k}:{v}" for k, v in rep["resources"].items()))
    if "one_tile" in rep:
        o = rep["one_tile"]
        print(f"one-tile: {o['loads_before_first_wait']} 128-bit loads issued before the first async-copy wait, "
              f"{o['uses_before_first_wait']} instructions using them before it")
    print("shared buffers:", rep["shared_buffers"])
    print("synchronous loads inside loops:", rep["sync_loads_in_loops"])
    print(f"main loop: {rep['main_loop']['instructions']} instructions per warp per iteration")
    print("  " + ", ".join(f"{k} {v}" for k, v in rep["main_loop"]["ops"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("op", choices=["append", "decode", "prefill", "all"])
    p.add_argument("--target", default="sm_90", choices=["sm_80", "sm_90"])
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--format", default="saw_int4")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-m", type=int)
    p.add_argument("--block-n", type=int)
    p.add_argument("--warps", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--q-chunk", type=int, help="decode: Q_CHUNK")
    p.add_argument("--rotation-block", type=int, help="HB: read the matrices in block-Hadamard form")
    p.add_argument("--maxnreg", type=int, help="register cap per thread (ptxas .maxnreg)")
    p.add_argument("--one-tile", action="store_true",
                   help="decode: the split kernel with one-tile splits (ONE_TILE), and where its tile loads go")
    p.add_argument("--mma", action="store_true",
                   help="decode: the Gluon kernel of kernels/decode_gluon.py (saw_int4/int4, head_dim 128, G 4)")
    p.add_argument("--fp16", action="store_true", help="--mma: fp16 queries (default bf16)")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from trtllm_sawint4.build_scripts.aot import compile_kernel
    from trtllm_sawint4.kernels.aot import model_kernels

    arch = int(args.target[3:])
    if args.op == "all":
        kernels = {name: resources(c) for name, c in _every_kernel(arch).items()}
        result = {"target": args.target, "triton": triton.__version__, "ptxas": _ptxas_version(arch),
                  "kernels": kernels}
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print(f"{len(kernels)} kernels for {args.target}, triton {result['triton']}, ptxas {result['ptxas']}")
            for name, res in kernels.items():
                print(f"  {name:24s} " + " ".join(f"{k}:{v}" for k, v in res.items() if k in ("REG", "STACK", "SHARED", "LOCAL")))
        return 0
    if args.mma:
        if args.op != "decode":
            p.error("--mma applies to decode")
        compiled = _compile_mma_decode(args, args.fp16, arch)
        label = f"decode (Gluon, one warp) {'fp16' if args.fp16 else 'bf16'} D=128 stages={args.stages or 2}"
    elif args.one_tile:
        if args.op != "decode":
            p.error("--one-tile applies to decode")
        compiled = _compile_split_decode(args, True, arch)
        label = f"decode (split, one-tile) {args.format} D={args.head_dim} warps={args.warps or 4}"
    else:
        kernel = dict(zip(["append", "decode", "prefill"],
                          model_kernels(args.head_dim, 32, 8, 64, args.format, False, False, "bf16",
                                        args.head_dim ** -0.5)))[args.op]
        for name, value in (("BLOCK_M", args.block_m), ("BLOCK_N", args.block_n), ("Q_CHUNK", args.q_chunk),
                            ("HB", args.rotation_block)):
            if value is not None and name in kernel.constexprs:
                kernel.constexprs[name] = value
        kernel.num_warps = args.warps or kernel.num_warps
        kernel.num_stages = args.stages or kernel.num_stages
        compiled = compile_kernel(kernel, arch, {"maxnreg": args.maxnreg} if args.maxnreg else None)
        label = (f"{args.op} {args.format} D={args.head_dim} warps={kernel.num_warps} stages={kernel.num_stages} "
                 f"{ {k: v for k, v in kernel.constexprs.items() if k.startswith('BLOCK')} }")
    rep = report(compiled, label, arch, args.one_tile)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        _print_text(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
