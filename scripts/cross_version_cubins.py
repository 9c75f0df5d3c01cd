"""Kernels compiled by one Triton, launched on a GPU machine that has another (driver API, no Triton JIT).

    # on the CPU machine, once per Triton version (its own environment; no GPU needed):
    python scripts/cross_version_cubins.py build --out ARTIFACTS/triton-X.Y.Z [--ptxas PATH]
    # on the GPU machine (any Triton installed; only torch, cuda-bindings and this package are used):
    python scripts/cross_version_cubins.py check ARTIFACTS/triton-* [--json FILE]

`build` compiles for sm_90, for saw_int4 and int4 with bf16 queries (head_dim 128, 8 query heads, 2 KV
heads, 64-token blocks): append, decode (the Triton kernel, unsplit), prefill (kernels/aot.py) and the
Gluon decode kernel with its split merge (kernels.aot.gluon_decode_kernels) into one folder per format
(cubin + PTX + manifest.json, as `sawint4 aot` writes them), plus build_info.json: the Triton and ptxas
versions and each cubin's ELF header (OS/ABI, ABI version, flags) and PTX ISA version, which decide whether
an older driver can load it. `--ptxas` assembles with another ptxas (e.g. an older one for an older driver).

`check` loads every cubin with cuModuleLoadData (build_scripts/aot_launcher.py), launches each kernel on
a few batches (one with a 2049-token sequence and an empty one) and compares it with the reference ops
(trtllm_sawint4/ops/reference.py). It prints one table row per (artifact set, format, kernel) and writes
the rows as JSON (default $OUT/cross_version_cubins.json when OUT is set). Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

D, HQ, H, T = 128, 8, 2, 64
FORMATS = ("saw_int4", "int4")
TARGET = "sm_90"
LENGTHS = ([1], [300, 17, 64], [1000, 1000, 5, 5, 5], [2049, 0, 33])


# ---- build (CPU) ----------------------------------------------------------------------------------
def elf_header(cubin: bytes) -> dict:
    """The fields of a cubin's ELF header that say which driver can load it."""
    if cubin[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    e_version = struct.unpack_from("<I", cubin, 20)[0]
    e_flags = struct.unpack_from("<I", cubin, 48)[0]
    return {"os_abi": hex(cubin[7]), "abi_version": cubin[8], "e_version": e_version, "e_flags": hex(e_flags)}


def build(args) -> int:
    if args.ptxas:
        # Triton picks its ptxas from these (3.6+: TRITON_PTXAS_BLACKWELL_PATH for sm_90 from 3.9 on)
        os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = args.ptxas
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))
    import inspect

    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    from trtllm_sawint4.build_scripts.aot import write_artifacts
    from trtllm_sawint4.kernels.aot import gluon_decode_kernels, model_kernels

    ptxas = get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()
    out = Path(args.out)
    info = {"triton": triton.__version__, "ptxas": ptxas.version if hasattr(ptxas, "version") else None,
            "ptxas_path": ptxas.path, "target": TARGET, "sets": {}}
    for fmt in FORMATS:
        model = dict(head_dim=D, num_heads=HQ, num_kv_heads=H, tokens_per_block=T, kv_format=fmt, rotate_v=False,
                     calibrated=False, query_dtype="bf16", scale=D ** -0.5)
        kernels = model_kernels(**model) + gluon_decode_kernels(HQ, H, T, fmt, "bf16", D ** -0.5)
        manifest = write_artifacts(kernels, [TARGET], out / fmt, model)
        files = {}
        for k in manifest["kernels"]:
            cubin = (out / fmt / k["cubin"]).read_bytes()
            ptx = (out / fmt / k["ptx"]).read_text()
            files[k["op"]] = {**elf_header(cubin), "cubin_bytes": len(cubin),
                              "ptx_isa": re.search(r"^\.version\s+(\S+)", ptx, re.M).group(1),
                              "ptx_target": re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)}
        info["sets"][fmt] = files
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"triton {info['triton']}, ptxas {info['ptxas']} ({info['ptxas_path']}): {out} ({size / 1e6:.2f} MB)")
    for fmt, files in info["sets"].items():
        for op, f in files.items():
            print(f"  {fmt:9s} {op:19s} ELF OS/ABI {f['os_abi']} ABI v{f['abi_version']} flags {f['e_flags']}, "
                  f"PTX ISA {f['ptx_isa']} {f['ptx_target']}, {f['cubin_bytes']} B")
    return 0


# ---- check (GPU) ----------------------------------------------------------------------------------
def _case(spec, tf, lengths, seed):
    import torch

    from trtllm_sawint4.ops import reference

    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [-(-n // T) for n in lengths]
    nb = sum(blocks) + 3
    perm = torch.randperm(nb, device="cuda", generator=g)
    table = torch.zeros(len(lengths), max(blocks + [1]), dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[at:at + n]
        at += n
    slots = torch.cat([table[b, torch.arange(n, device="cuda") // T].long() * T + torch.arange(n, device="cuda") % T
                       for b, n in enumerate(lengths)])
    key = torch.randn(slots.numel(), H, D, device="cuda", generator=g).bfloat16()
    value = torch.randn(slots.numel(), H, D, device="cuda", generator=g).bfloat16()
    ref_pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device="cuda")
    reference.append(ref_pool, key, value, slots, tf.k_matrix, None, None, spec.storage, spec.metadata_dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), HQ, D, device="cuda", generator=g).bfloat16()
    q_lens = [min(n, 37) for n in lengths]
    starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    qp = torch.randn(int(starts[-1]), HQ, D, device="cuda", generator=g).bfloat16()
    return dict(key=key, value=value, slots=slots, pool=ref_pool, nb=nb, table=table, lens=lens, q=q, starts=starts,
                qp=qp)


def _check_set(folder: Path, fmt: str) -> list[dict]:
    import torch

    from trtllm_sawint4 import KVCacheSpec, build_layer_transform
    from trtllm_sawint4.build_scripts.aot_launcher import AotLauncher
    from trtllm_sawint4.ops import reference

    spec = KVCacheSpec(D, H, T, fmt)
    tf = build_layer_transform(spec).to("cuda")
    eye = torch.eye(D, device="cuda")
    qm = tf.q_matrix if tf.q_matrix is not None else eye.expand(H, D, D).contiguous()
    km = tf.k_matrix if tf.k_matrix is not None else eye.expand(H, D, D).contiguous()
    try:
        launcher = AotLauncher(folder, TARGET)
    except Exception as e:  # the driver refused a cubin: that is the finding
        return [{"op": "load", "ok": False, "detail": f"{type(e).__name__}: {e}"}]
    rows = {op: {"op": op, "ok": True, "max_err": 0.0, "detail": ""} for op in launcher.kernels}

    def record(op, got, want, tol):
        err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
        rows[op]["max_err"] = max(rows[op]["max_err"], err)
        if not (err <= tol):
            rows[op]["ok"] = False
            rows[op]["detail"] = f"max |error| {err:.3g} > {tol}"

    for seed, lengths in enumerate(LENGTHS):
        c = _case(spec, tf, lengths, seed)
        pool = torch.zeros_like(c["pool"])
        launcher.launch("append", dict(key=c["key"], value=c["value"], slot_mapping=c["slots"].int(), pool=pool,
                                       k_matrix=km, k_bias=torch.zeros(H, D, device="cuda"), v_matrix=eye))
        torch.cuda.synchronize()
        differ = (pool != c["pool"]).float().mean().item()
        rows["append"]["max_err"] = max(rows["append"]["max_err"], differ)
        if differ > (1e-3 if spec.rotated else 0.0):  # a rotated code may move one step on a rounding tie
            rows["append"].update(ok=False, detail=f"{differ:.2%} of pool bytes differ from the reference")
        want = reference.decode(c["q"], c["pool"], c["table"], c["lens"], tf.q_matrix, None, D ** -0.5, spec.storage,
                                spec.metadata_dtype)
        inputs = dict(query=c["q"], pool=c["pool"], block_table=c["table"], seq_lens=c["lens"], q_matrix=qm)
        out = launcher.launch("decode", dict(inputs, v_matrix=eye))["out"]
        record("decode", out, want, 2e-2)
        parts = launcher.launch("decode_gluon", inputs)
        out = launcher.launch("decode_gluon_merge", parts)["out"]
        record("decode_gluon", out, want, 2e-2)
        record("decode_gluon_merge", out, want, 2e-2)
        out = launcher.launch("prefill", dict(query=c["qp"], pool=c["pool"], block_table=c["table"], seq_lens=c["lens"],
                                              query_start_loc=c["starts"], q_matrix=qm, v_matrix=eye))["out"]
        want = reference.prefill(c["qp"], c["pool"], c["table"], c["lens"], c["starts"], tf.q_matrix, None, D ** -0.5,
                                 spec.storage, spec.metadata_dtype)
        record("prefill", out, want, 2e-2)
    torch.cuda.synchronize()
    return list(rows.values())


def _local_ptxas_format(folders) -> str | None:
    """The ELF header this machine's own ptxas (its CUDA toolkit, if any) gives one of the artifacts' PTX: the
    format its driver generation writes, to read the others against."""
    import shutil

    ptxas = shutil.which("ptxas") or next((p for p in ("/usr/local/cuda/bin/ptxas",) if os.path.exists(p)), None)
    ptx = next((p for f in folders for p in sorted(Path(f).glob("*/decode.sm_90.ptx"))), None)
    if ptxas is None or ptx is None:
        return None
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        target = re.search(r"^\.target\s+(\S+)", ptx.read_text(), re.M).group(1)
        done = subprocess.run([ptxas, f"--gpu-name={target}", str(ptx), "-o", f"{tmp}/k.cubin"], capture_output=True,
                              text=True)
        if done.returncode:
            return f"{ptxas} ({version}) could not assemble {ptx}: {done.stderr.strip()[:200]}"
        h = elf_header(Path(tmp, "k.cubin").read_bytes())
    return f"{ptxas} ({version}) assembles {ptx.parent.parent.name}/{ptx.parent.name}/{ptx.name} to ELF OS/ABI {h['os_abi']} ABI v{h['abi_version']} flags {h['e_flags']}"


def check(args) -> int:
    import torch
    from cuda.bindings import driver as cu

    cu.cuInit(0)
    _, driver = cu.cuDriverGetVersion()
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    print(f"GPU: {smi}; CUDA driver API {driver // 1000}.{driver % 1000 // 10}; torch {torch.__version__}")
    local = _local_ptxas_format(args.folders)
    if local:
        print(f"this machine's CUDA toolkit: {local}")
    results = []
    for folder in map(Path, args.folders):
        info = json.loads((folder / "build_info.json").read_text())
        for fmt in FORMATS:
            if not (folder / fmt).is_dir():
                continue
            for row in _check_set(folder / fmt, fmt):
                f = info["sets"].get(fmt, {}).get(row["op"], {})
                results.append({"artifacts": folder.name, "triton": info["triton"], "ptxas": info["ptxas"],
                                "format": fmt, **row, "elf_abi": f.get("abi_version"), "os_abi": f.get("os_abi"),
                                "ptx_isa": f.get("ptx_isa")})
    head = f"{'built by':<16}{'ptxas':<10}{'format':<10}{'kernel':<20}{'ELF ABI':<9}{'PTX':<6}{'result':<7}max err / detail"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{'triton ' + r['triton']:<16}{str(r['ptxas']):<10}{r['format']:<10}{r['op']:<20}"
              f"{str(r['os_abi']) + '/v' + str(r['elf_abi']):<9}{str(r['ptx_isa']):<6}{'ok' if r['ok'] else 'FAIL':<7}"
              f"{r.get('max_err', float('nan')):.3g} {r['detail']}")
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)} of {len(results)} rows ok")
    path = args.json or (os.path.join(os.environ["OUT"], "cross_version_cubins.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps({"gpu": smi, "driver_api": driver, "torch": torch.__version__,
                                          "rows": results}, indent=1))
        print(f"wrote {path}")
    return 1 if bad or not results else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the artifacts with this environment's Triton (CPU)")
    b.add_argument("--out", required=True)
    b.add_argument("--ptxas", help="assemble with this ptxas instead of the one Triton ships")
    c = sub.add_parser("check", help="launch the artifacts on this machine's GPU and compare with the reference")
    c.add_argument("folders", nargs="+")
    c.add_argument("--json", help="write the rows here (default $OUT/cross_version_cubins.json)")
    args = p.parse_args(argv)
    return build(args) if args.cmd == "build" else check(args)


if __name__ == "__main__":
    sys.exit(main())
