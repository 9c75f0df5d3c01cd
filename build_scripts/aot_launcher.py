"""Run the AOT artifacts exactly as a TensorRT AOT plugin would: the cubin through the CUDA driver
API, parameters in the manifest's order (inputs, integer scalars, outputs: exactly what TensorRT
passes), grid and block from the manifest's shape expressions, on a given stream.

Used by the GPU tests to prove the very binaries an engine embeds. Needs cuda-bindings and torch
with CUDA (for device memory and streams).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from trtllm_sawint4 import symexpr
from trtllm_sawint4.aot_manifest import POINTER_TYPES, read_manifest

_SCALAR_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64}


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - GPU machine only
        raise ImportError("the AOT launcher needs cuda-bindings: pip install cuda-bindings") from e
    return driver


def _ok(result):
    """Unpack a cuda-bindings (CUresult, value...) tuple, raising on error."""
    cu = _driver()
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver call failed: {name.decode() if name else err}")
    return values[0] if len(values) == 1 else values


class AotLauncher:
    def __init__(self, folder: str | Path, target: str = "sm_90"):
        cu = _driver()
        torch.zeros(1, device="cuda")  # make torch's primary context current on this thread
        _, self.manifest = read_manifest(folder)
        self.kernels = {}
        for entry in self.manifest["kernels"]:
            if entry["target"] != target:
                continue
            module = _ok(cu.cuModuleLoadData(Path(folder, entry["cubin"]).read_bytes()))
            func = _ok(cu.cuModuleGetFunction(module, entry["kernel_name"].encode()))
            if entry["shared_bytes"] > 48 * 1024:
                _ok(cu.cuFuncSetAttribute(
                    func, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    entry["shared_bytes"]))
            self.kernels[entry["op"]] = (entry, module, func)
        if not self.kernels:
            raise ValueError(f"no kernels for target {target} in {folder}")

    def launch(self, op: str, tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None):
        """Launch `op` on the named input tensors; returns its outputs by name."""
        cu = _driver()
        if op not in self.kernels:
            raise KeyError(f"op {op!r} not in the artifacts (have {sorted(self.kernels)})")
        entry, _, func = self.kernels[op]
        inputs = [p for p in entry["params"] if p["kind"] == "input"]
        missing = [p["name"] for p in inputs if p["name"] not in tensors]
        if missing:
            raise ValueError(f"{op}: missing inputs {missing}")
        shapes = {p["name"]: tuple(tensors[p["name"]].shape) for p in inputs}
        for expr, limit in entry.get("limits", {}).items():
            if symexpr.evaluate(expr, shapes) > limit:
                raise ValueError(f"{op}: {expr} = {symexpr.evaluate(expr, shapes)} exceeds {limit}, the most these "
                                 f"artifacts were compiled for")
        values, types, outputs = [], [], {}
        for p in entry["params"]:
            if p["kind"] == "input":
                t = tensors[p["name"]]
                want = getattr(torch, POINTER_TYPES[p["type"]])
                if t.dtype != want or not t.is_cuda or not t.is_contiguous():
                    raise ValueError(f"{op}.{p['name']}: needs a contiguous CUDA {want} tensor, got {t.dtype} "
                                     f"on {t.device}")
                values.append(t.data_ptr())
                types.append(ctypes.c_void_p)
            elif p["kind"] == "scalar":
                values.append(symexpr.evaluate(p["value"], shapes))
                types.append(_SCALAR_CTYPES[p["type"]])
            else:
                if p["alias"] is not None:
                    t = tensors[p["alias"]]
                else:
                    dims = [symexpr.evaluate(e, shapes) for e in p["shape"]]
                    t = torch.empty(dims, dtype=getattr(torch, POINTER_TYPES[p["type"]]), device="cuda")
                outputs[p["name"]] = t
                values.append(t.data_ptr())
                types.append(ctypes.c_void_p)
        grid = [symexpr.evaluate(e, shapes) for e in entry["grid"]]
        values += [0] * entry["trailing_scratch_params"]  # none: stripped at compile time
        types += [ctypes.c_void_p] * entry["trailing_scratch_params"]
        if min(grid) == 0:
            return outputs
        stream = stream or torch.cuda.current_stream()
        _ok(cu.cuLaunchKernel(func, *grid, *entry["block"], entry["shared_bytes"], cu.CUstream(stream.cuda_stream),
                              (tuple(values), tuple(types)), 0))
        return outputs
