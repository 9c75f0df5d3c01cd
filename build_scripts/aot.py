"""`sawint4 aot`: compile the kernels ahead of time (no GPU needed) into cubin + PTX + manifest.json.

A TensorRT AOT plugin launches exactly one kernel whose parameters are: input pointers, then
integer scalars, then output pointers, nothing else. Floats and model constants are compile-time
constants; Triton's two trailing scratch pointers, unused by these kernels, are stripped from the
PTX (`strip_scratch_params`) before it is assembled to the cubin. `trtllm_sawint4.kernels.aot` describes the kernel
variants in that form (`AotKernel`); this module compiles them for each GPU target and writes the
manifest that the TensorRT plugins (`plugins/`) and the test launcher (`aot_launcher.py`) read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import symexpr

MANIFEST_FORMAT = "sawint4-aot/1"
TARGETS = {"sm_80": 80, "sm_89": 89, "sm_90": 90}
#: Triton signature type -> torch dtype name, for the launcher and the plugins' type rules.
POINTER_TYPES = {"*bf16": "bfloat16", "*fp16": "float16", "*fp32": "float32", "*u8": "uint8", "*i32": "int32",
                 "*i64": "int64"}


@dataclass
class AotParam:
    """One kernel parameter in TensorRT order. kind: 'input' | 'scalar' | 'output'.

    type: a Triton signature type ('*bf16', '*u8', 'i32', ...). scalar: `value` is a shape
    expression (symexpr). output: `alias` names the input it updates in place, if any; else
    `shape` gives its dims as shape expressions and it is a fresh tensor."""

    name: str
    kind: str
    type: str
    value: str | None = None
    alias: str | None = None
    shape: list[str] | None = None


@dataclass
class AotKernel:
    """One plugin's kernel: a @triton.jit function with its parameters in TensorRT order."""

    op: str
    fn: object  # triton JITFunction
    params: list[AotParam]
    constexprs: dict
    grid: tuple[str, str, str]
    num_warps: int = 4
    num_stages: int = 2
    #: shape expression -> largest value the compiled constants allow (e.g. the batch a prefill
    #: kernel's padded sequence scan covers); the launcher and the plugins refuse larger inputs.
    limits: dict = field(default_factory=dict)

    def check(self) -> None:
        kinds = [p.kind for p in self.params]
        order = {"input": 0, "scalar": 1, "output": 2}
        if any(k not in order for k in kinds):
            raise ValueError(f"{self.op}: parameter kinds must be input/scalar/output, got {kinds}")
        if [order[k] for k in kinds] != sorted(order[k] for k in kinds):
            raise ValueError(f"{self.op}: TensorRT AOT order is inputs, then integer scalars, then outputs; got {kinds}")
        inputs = {p.name for p in self.params if p.kind == "input"}
        for p in self.params:
            if p.kind == "scalar":
                if p.type not in ("i32", "i64"):
                    raise ValueError(f"{self.op}.{p.name}: AOT scalars must be integers, got {p.type}")
                _check_expr(self.op, p.value, inputs)
            elif p.type not in POINTER_TYPES:
                raise ValueError(f"{self.op}.{p.name}: pointer type {p.type} not supported")
            if p.kind == "output" and p.alias is None and not p.shape:
                raise ValueError(f"{self.op}.{p.name}: an output needs alias= or shape=")
            if p.alias is not None and p.alias not in inputs:
                raise ValueError(f"{self.op}.{p.name}: alias {p.alias!r} is not an input")
            for e in p.shape or []:
                _check_expr(self.op, e, inputs)
        for e in [*self.grid, *self.limits]:
            _check_expr(self.op, e, inputs)
        arg_names = list(self.fn.arg_names)
        want = [p.name for p in self.params] + sorted(self.constexprs, key=arg_names.index)
        if arg_names != want:
            raise ValueError(f"{self.op}: kernel parameters {arg_names} do not match the description {want}")


def _check_expr(op: str, expr: str | None, inputs: set[str]) -> None:
    if expr is None:
        raise ValueError(f"{op}: missing shape expression")
    unknown = symexpr.inputs_used(expr) - inputs
    if unknown:
        raise ValueError(f"{op}: shape expression {expr!r} names {sorted(unknown)}, not inputs of the kernel")


def compile_kernel(kernel: AotKernel, arch: int, extra_options: dict | None = None):
    """triton.compile for one target; needs no GPU. Pointer parameters are promised 16-byte aligned."""
    import os

    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compilation needs Triton's compiler: unset TRITON_INTERPRET")
    kernel.check()
    signature = {p.name: p.type for p in kernel.params}
    signature.update({k: "constexpr" for k in kernel.constexprs})
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kernel.params) if p.type.startswith("*")}
    src = triton.compiler.ASTSource(fn=kernel.fn, signature=signature, constexprs=kernel.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages, **(extra_options or {})}
    return triton.compile(src, target=target, options=options)


def strip_scratch_params(ptx: str, kernel_name: str, num_params: int) -> str:
    """Drop Triton's two trailing scratch-pointer parameters from the kernel's PTX signature.

    A TensorRT AOT plugin passes exactly its inputs, integer scalars and outputs. Triton 3.6 appends
    a global- and a profile-scratch pointer to every kernel; a kernel that needs no scratch never
    loads them, which is checked here (each name may appear only in the signature)."""
    lines = ptx.splitlines()
    names = [f"{kernel_name}_param_{num_params}", f"{kernel_name}_param_{num_params + 1}"]
    for name in names:
        if ptx.count(name) != 1 or f"{kernel_name}_param_{num_params + 2}" in ptx:
            raise ValueError(f"{kernel_name}: parameter {name} is not an unused trailing scratch pointer")
    keep = [ln for ln in lines if not any(ln.strip().startswith(".param") and ln.rstrip(",").endswith(n)
                                          for n in names)]
    last = next(i for i, ln in enumerate(keep)
                if ln.strip().startswith(".param") and ln.rstrip(",").endswith(f"{kernel_name}_param_{num_params - 1}"))
    keep[last] = keep[last].rstrip().rstrip(",")
    return "\n".join(keep) + "\n"


def assemble(ptx: str, out_path: Path) -> bytes:
    """PTX -> cubin with the ptxas that Triton ships (the target is read from the PTX)."""
    import inspect
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    arch = int(re.match(r"sm_(\d+)", target).group(1))
    # the ptxas Triton itself uses for this target (triton 3.6+ picks one per arch; 3.5 has one)
    ptxas = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        subprocess.run([ptxas.path, f"--gpu-name={target}", str(src), "-o", str(out_path)], check=True,
                       capture_output=True)
    return out_path.read_bytes()


def write_artifacts(kernels: list[AotKernel], targets: list[str], out_dir: str | Path, model: dict) -> dict:
    """Compile every kernel for every target into out_dir; returns (and writes) the manifest."""
    import triton

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
        for k in kernels:
            compiled = compile_kernel(k, TARGETS[target])
            md = compiled.metadata
            if md.global_scratch_size or md.profile_scratch_size:
                raise ValueError(f"{k.op}: the kernel needs scratch memory, which a TensorRT AOT plugin cannot give")
            stem = f"{k.op}.{target}"
            ptx = strip_scratch_params(compiled.asm["ptx"], md.name, len(k.params))
            (out / f"{stem}.ptx").write_text(ptx)
            cubin = assemble(ptx, out / f"{stem}.cubin")
            entries.append({
                "op": k.op,
                "target": target,
                "kernel_name": md.name,
                "cubin": f"{stem}.cubin",
                "ptx": f"{stem}.ptx",
                "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
                "params": [asdict(p) for p in k.params],
                # Triton's two scratch pointers were stripped (unused): params are exactly TensorRT's
                "trailing_scratch_params": 0,
                "constexprs": {n: v for n, v in k.constexprs.items()},
                "grid": list(k.grid),
                "limits": dict(k.limits),
                "block": [md.num_warps * 32, 1, 1],
                "num_warps": md.num_warps,
                "shared_bytes": md.shared,
            })
    manifest = {"format": MANIFEST_FORMAT, "triton_version": triton.__version__, "model": model,
                "kernels": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `sawint4 aot --out {folder}` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    return manifest


# ---- CLI ------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    p.add_argument("--out", default="aot_out", help="folder for cubin/PTX files and manifest.json")
    p.add_argument("--targets", default="sm_80,sm_89,sm_90", help="comma-separated GPU targets")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=32, help="query heads")
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--tokens-per-block", type=int, default=64)
    p.add_argument("--kv-format", default="saw_int4", help="bf16 | int8 | int4 | saw_int4")
    p.add_argument("--rotate-v", action="store_true")
    p.add_argument("--calibrated", action="store_true", help="include the K channel mean (k_bias) input")
    p.add_argument("--query-dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--scale", type=float, default=None, help="softmax scale (default head_dim ** -0.5)")


def run(args) -> int:
    from ..kernels.aot import model_kernels  # imports triton

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    model = dict(head_dim=args.head_dim, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                 tokens_per_block=args.tokens_per_block, kv_format=args.kv_format, rotate_v=args.rotate_v,
                 calibrated=args.calibrated, query_dtype=args.query_dtype,
                 scale=args.scale if args.scale is not None else args.head_dim ** -0.5)
    kernels = model_kernels(**model)
    manifest = write_artifacts(kernels, targets, args.out, model)
    for e in manifest["kernels"]:
        print(f"{e['target']:6s} {e['op']:15s} {e['kernel_name']:28s} warps={e['num_warps']} "
              f"shared={e['shared_bytes']} grid={e['grid']}")
    print(f"wrote {len(manifest['kernels'])} kernels and manifest.json to {args.out}")
    return 0
