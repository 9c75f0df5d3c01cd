"""Compile the kernels of a source tree for sm_90 (no GPU needed) and write the SASS of each launch
configuration (addresses stripped) and its instruction count, to compare two trees: a change that only
moves code must leave every file identical.

    python scripts/kernel_sass.py TREE OUTDIR    (TREE: a checkout of the repository)
    diff -r OUT_BEFORE OUT_AFTER

249 configurations: the split decode kernel (storages x head_dims x one-tile x q/V transforms x dot
dtype), the AOT append/decode/prefill variants (formats x head_dims x calibration x query dtype), both
merge kernels, the Gluon kernel (fp16/bf16 queries x q-rotation blocks), the q-prep kernel, and the JIT
prefill and append kernels. It finds the kernels by name in either module layout (decode.py holding
every decode kernel, or decode_triton/decode_gluon/_reduce) and maps the region constexpr R -> REGION.
"""
import importlib
import os
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)
root, outdir = sys.argv[1], sys.argv[2]
if os.path.exists(os.path.join(root, "pyproject.toml")):  # a checkout: lay it out as the installed package
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_ab import _layout

    root = _layout(os.path.abspath(root), tempfile.mkdtemp(prefix="kernel_sass_"))
sys.path.insert(0, root)
os.makedirs(outdir, exist_ok=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

CANDIDATES = ["decode_triton", "decode_gluon", "_reduce", "_common", "decode", "decode_mma", "prefill", "append", "aot"]


def find(name):
    for m in CANDIDATES:
        try:
            mod = importlib.import_module(f"trtllm_sawint4.kernels.{m}")
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


PTR = {"q_ptr": "*bf16", "pool_ptr": "*u8", "poolb_ptr": "*bf16", "poolh_ptr": "*fp16", "poolf_ptr": "*fp32",
       "bt_ptr": "*i32", "sl_ptr": "*i32", "qsl_ptr": "*i32", "qm_ptr": "*fp32", "vm_ptr": "*fp32",
       "out_ptr": "*bf16", "po_ptr": "*fp32", "pl_ptr": "*fp32", "scratch_ptr": "*fp32", "key_ptr": "*bf16",
       "val_ptr": "*bf16", "slot_ptr": "*i64", "km_ptr": "*fp32", "kb_ptr": "*fp32"}
FLOATS = {"qk_scale"}
RENAME = {"R": "REGION"}


def compile_fn(fn, constexprs, warps, stages=None, maxnreg=None, gluon=False, ptr_over=None):
    names = list(fn.arg_names)
    cx = {}
    for k, v in constexprs.items():
        for cand in (k, RENAME.get(k, k)):
            if cand in names:
                cx[cand] = v
    sig = {}
    for n in names:
        if n in cx:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = (ptr_over or {}).get(n, PTR[n])
        elif n in FLOATS:
            sig[n] = "fp32"
        elif n in ("HAS_WINDOW", "WINDOW"):
            sig[n] = "constexpr"
            cx[n] = False
        else:
            sig[n] = "i32"
    # constexprs with defaults not given: leave them to their default by not listing? triton needs them
    for i, n in enumerate(names):
        if sig[n] == "constexpr" and n not in cx:
            raise KeyError(n)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource
        src = GluonASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    else:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    opts = {"num_warps": warps}
    if stages:
        opts["num_stages"] = stages
    if maxnreg:
        opts["maxnreg"] = maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_of(compiled, label):
    path = os.path.join(outdir, label + ".cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    os.remove(path)
    lines = []
    for ln in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4}\*/\s+(.*?);", ln)
        if m:
            lines.append(m.group(1).strip())
    with open(os.path.join(outdir, label + ".sass"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return len(lines)


def spec_region(fmt, d, t, meta="fp16"):
    bits = {"bf16": 16, "int8": 8, "int4": 4}[fmt]
    m = 0 if fmt == "bf16" else (4 if meta == "fp16" else 8)
    return t * (d * bits // 8 + m)


CODE = {"bf16": 0, "int8": 1, "int4": 2}
results = {}
# split decode kernel
for fmt in ("int4", "int8", "bf16"):
    for d in (64, 128, 256):
        for one_tile in (False, True):
            for has_qm, has_vm in ((False, False), (True, False), (True, True)):
                if fmt == "bf16" and has_qm:
                    continue
                for dt_name, dt in (("bf16", tl.bfloat16), ("fp16", tl.float16)):
                    if fmt == "bf16" and dt_name == "fp16":
                        continue
                    if fmt == "bf16":
                        bn, w, s, mx, qc = 64, 4, 2, None, 16
                    elif one_tile:
                        bn, w, s, mx, qc = 64, 4, 3, 168, 64
                    else:
                        bn, w, s, mx, qc = 64, 2, 3, 168, 16
                    if d > 128:
                        mx = None
                    cx = dict(H=8, G=4, GP=16, D=d, T=64, R=spec_region(fmt, d, 64), STORAGE=CODE[fmt], META32=False,
                              HAS_QM=has_qm, HAS_VM=has_vm, SPLIT=True, BLOCK_N=bn, DT=dt, PREC=1,
                              Q_CHUNK=min(d, qc), ONE_TILE=one_tile)
                    label = f"decode_split_{fmt}_d{d}_ot{int(one_tile)}_qm{int(has_qm)}_vm{int(has_vm)}_{dt_name}"
                    c = compile_fn(find("_decode_kernel"), cx, w, s, mx)
                    results[label] = sass_of(c, label)
# unsplit (AOT variant) and prefill/append through model_kernels
aot = importlib.import_module("trtllm_sawint4.kernels.aot")
compile_kernel = None
for m in ("trtllm_sawint4.build_scripts.aot",):
    compile_kernel = importlib.import_module(m).compile_kernel
for fmt in ("saw_int4", "int4", "int8", "bf16"):
    for d in (64, 128, 256):
        for calib in (False, True):
            if fmt == "bf16" and calib:
                continue
            for qd in ("bf16", "fp16"):
                ks = aot.model_kernels(d, 32, 8, 64, fmt, False, calib, qd, d ** -0.5)
                for k in ks:
                    label = f"aot_{k.op}_{fmt}_d{d}_cal{int(calib)}_{qd}"
                    results[label] = sass_of(compile_kernel(k, 90), label)
# reduce kernels
for d in (64, 128, 256):
    for sb, one in ((16, True), (64, False)):
        cx = dict(H=8, G=4, GP=16, D=d, SB=sb, ONE_LOAD=one)
        label = f"reduce_d{d}_sb{sb}"
        results[label] = sass_of(compile_fn(find("_reduce_kernel"), cx, 4 if sb * d <= 4096 else 8), label)
        for hb in (0, 128 if d >= 128 else d):
            cx2 = dict(cx, PREC=1, HB=hb, SB=min(sb, 4096 // d))
            label = f"reduce_rotate_d{d}_sb{sb}_hb{hb}"
            results[label] = sass_of(compile_fn(find("_reduce_rotate_kernel"), cx2, 4), label)
# Gluon kernel + q prep
for fp16 in (False, True):
    for hb in (0, 128, 16):
        cx = dict(H=8, G=4, T=64, R=64 * 68, FP16=fp16, STAGES=2, HB=hb)
        label = f"mma_fp16{int(fp16)}_hb{hb}"
        results[label] = sass_of(compile_fn(find("_decode_mma_kernel"), cx, 1, gluon=True,
                                            ptr_over={"q_ptr": "*fp16" if fp16 else "*bf16"}), label)
cx = dict(G=4, GP=16, D=128, Q_CHUNK=16, PREC=1)
results["q_prep"] = sass_of(compile_fn(find("_q_prep_kernel"), cx, 2, ptr_over={"out_ptr": "*fp32"}), "q_prep")
# JIT prefill and append kernels as launched (not AOT)
for fmt in ("int4", "int8", "bf16"):
    for d in (64, 128):
        for hb in (0, 16):
            if fmt == "bf16" and hb:
                continue
            cx = dict(H=8, G=4, D=d, T=64, R=spec_region(fmt, d, 64), STORAGE=CODE[fmt], META32=False,
                      HAS_QM=fmt != "bf16", HAS_VM=fmt != "bf16", BLOCK_M=64, BLOCK_N=64, B_PAD=16, DT=tl.bfloat16,
                      PREC=1, HB=hb)
            label = f"prefill_{fmt}_d{d}_hb{hb}"
            results[label] = sass_of(compile_fn(find("_prefill_kernel"), cx, 4, 3), label)
            cx = dict(H=8, D=d, T=64, R=spec_region(fmt, d, 64), STORAGE=CODE[fmt], META32=False,
                      HAS_KM=fmt != "bf16", HAS_KB=fmt != "bf16", HAS_VM=fmt != "bf16", PREC=4, BLOCK_N=64, HB=hb)
            label = f"append_{fmt}_d{d}_hb{hb}"
            results[label] = sass_of(compile_fn(find("_append_kernel"), cx, 4, ptr_over={"poolh_ptr": "*fp16"}),
                                     label)
with open(os.path.join(outdir, "counts.txt"), "w") as f:
    for k in sorted(results):
        f.write(f"{k} {results[k]}\n")
print(len(results), "kernels")
