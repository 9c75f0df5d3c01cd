"""The ahead-of-time implementation (@trtp.aot_impl) of the saw_int4 plugins.

`sawint4 aot` (build_scripts/aot.py) compiles one Triton kernel per op into cubin + a
`manifest.json` (format "sawint4-aot/1"): per kernel its target, parameters in TensorRT order
(plugin inputs, integer scalars given as shape expressions, outputs), grid as shape expressions,
block size, shared memory, the model constants it was compiled for. `aot_kernel` turns one entry
into what TensorRT (>= 10.9) wants from an aot_impl:

    (kernel_name, cubin, trtp.KernelLaunchParams, trtp.SymIntExprs)

after checking that the node's attributes and dtypes are the ones the kernel was compiled for
(AOT kernels bake the model constants, scale included, in as constexprs).

Constraints (TensorRT's, and what is NOT verified here since TensorRT cannot be installed):
  * one kernel launch per plugin; extra scalars are integers; parameters in the order inputs →
    scalars → outputs (append's output aliases the pool and is passed again);
  * Triton 3.6 kernels carry two trailing scratch pointers that TensorRT does not pass; kernels that
    need scratch memory (size > 0) are refused, the others never read those parameters — whether
    TensorRT's launch tolerates the two missing trailing parameters needs a machine with TensorRT;
  * `limits` of a kernel (e.g. the most sequences the prefill kernel's scan covers) cannot be checked
    at run time: `sawint4 build` checks them against the optimization profile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trtllm_sawint4 import symexpr
from trtllm_sawint4.aot_manifest import MANIFEST_FORMAT, POINTER_TYPES, AotError, read_manifest  # noqa: F401

from . import contract

_QUERY_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class AotManifest:
    folder: Path
    raw: dict
    target: str | None = None  # e.g. "sm_90"; None: the only one in the manifest, else the current GPU's
    kernels: list = field(default_factory=list)

    @property
    def model(self) -> dict:
        return self.raw.get("model", {})

    def targets(self) -> list[str]:
        return sorted({k["target"] for k in self.kernels})

    def entry(self, op: str) -> dict:
        target = self.target or _default_target(self.targets())
        for k in self.kernels:
            if k["op"] == op and k["target"] == target:
                return k
        raise AotError(f"{self.folder}: no {op!r} kernel for target {target} (the manifest has "
                       f"{sorted((k['op'], k['target']) for k in self.kernels)})")


def _default_target(targets: list[str]) -> str:
    if len(targets) == 1:
        return targets[0]
    env = os.environ.get("SAWINT4_AOT_TARGET")
    if env:
        return env
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm_{major}{minor}"
    except Exception:  # noqa: BLE001 - fall through to the error
        pass
    raise AotError(f"the AOT manifest has several targets {targets}: pass target= to register_plugins/load_manifest "
                   f"or set SAWINT4_AOT_TARGET")


def load_manifest(source, target: str | None = None) -> AotManifest:
    """A `sawint4 aot` output folder (or its manifest.json), or an AotManifest."""
    if isinstance(source, AotManifest):
        return source
    folder, raw = read_manifest(source)
    return AotManifest(folder, raw, target, list(raw.get("kernels", [])))


# ---- checks (plain Python) -----------------------------------------------------------------------
def expected_model_attrs(model: Mapping[str, Any]) -> dict:
    """The plugin attributes a manifest's model constants imply."""
    from trtllm_sawint4.spec import KVCacheSpec

    spec = KVCacheSpec(model["head_dim"], model["num_kv_heads"], model["tokens_per_block"], model["kv_format"],
                       rotate_v=bool(model.get("rotate_v", False)),
                       metadata_dtype=model.get("metadata_dtype", "fp16"))
    transformed = spec.rotated or bool(model.get("calibrated", False))
    return dict(num_heads=model["num_heads"], num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                tokens_per_block=spec.tokens_per_block, storage=spec.storage, meta_dtype=spec.metadata_dtype,
                scale=float(model["scale"]), has_k_matrix=int(transformed),
                has_k_bias=int(bool(model.get("calibrated", False))), has_q_matrix=int(transformed),
                has_v_matrix=int(spec.rotate_v), activation_dtype=_QUERY_DTYPES[model["query_dtype"]])


def check_node(manifest: AotManifest, op: contract.OpDef, attrs: Mapping[str, Any], input_dtypes) -> dict:
    """Raise AotError unless the kernel for `op` was compiled for exactly this node; returns its entry."""
    attrs = contract.validate_attrs(op, attrs)
    entry = manifest.entry(op.name)
    want = expected_model_attrs(manifest.model)
    for name, value in attrs.items():
        w = want.get(name)
        same = math.isclose(value, w, rel_tol=1e-6) if name == "scale" else value == w
        if not same:
            raise AotError(f"{op.qualified_name}: attribute {name}={value!r} but the AOT kernel was compiled for "
                           f"{w!r} ({manifest.folder}); rerun `sawint4 aot` for this model")
    params = [p for p in entry["params"] if p["kind"] == "input"]
    if [p["name"] for p in params] != op.input_names:
        raise AotError(f"{op.qualified_name}: kernel inputs {[p['name'] for p in params]} are not the plugin's "
                       f"{op.input_names}")
    for p, dt in zip(params, input_dtypes):
        if POINTER_TYPES.get(p["type"]) != dt:
            raise AotError(f"{op.qualified_name}: input {p['name']} is {dt} but the kernel takes {p['type']}")
    if entry.get("trailing_scratch_params", 0):
        raise AotError(f"{op.qualified_name}: the kernel still takes Triton's scratch pointers, which a TensorRT AOT "
                       f"launch does not pass; rebuild the artifacts with this version of `sawint4 aot`")
    return entry


def translate(expr: str, shapes: Mapping[str, Any], trtp=None):
    """A manifest shape expression over plugin inputs -> an int (concrete shapes) or a trtp symbolic
    expression (`shapes` holding trtp ShapeExprs; `trtp` gives cdiv/min/max)."""
    def leaf(name, i):
        if name not in shapes:
            raise AotError(f"shape expression {expr!r} names {name!r}, not a plugin input")
        return shapes[name][i]

    def binop(op, a, b):
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "//":
            return a // b
        return a - (a // b) * b  # '%': ShapeExpr has no mod

    def call(fn, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return {"cdiv": lambda: -(-a // b), "min": lambda: min(a, b), "max": lambda: max(a, b)}[fn]()
        if trtp is None:
            raise AotError(f"{fn} of symbolic values needs tensorrt.plugin")
        return getattr(trtp, fn)(a, b)

    return symexpr.translate(expr, leaf, int, binop, call)


# ---- the aot_impl body ------------------------------------------------------------------------
def aot_kernel(trtp, manifest: AotManifest, op: contract.OpDef, inputs, attrs: Mapping[str, Any], outputs,
               tactic: int, dtype_names: Mapping | None = None):
    """Body of every @trtp.aot_impl: (kernel_name, cubin, KernelLaunchParams, SymIntExprs)."""
    names = dtype_names or {}
    entry = check_node(manifest, op, attrs, [names.get(d.dtype, str(d.dtype)) for d in inputs])
    shapes = {name: desc.shape_expr for name, desc in zip(op.input_names, inputs)}
    scalars = []
    for p in entry["params"]:
        if p["kind"] != "scalar":
            continue
        if p["type"] != "i32":
            raise AotError(f"{op.qualified_name}: scalar {p['name']} is {p['type']}; TensorRT AOT scalars here are i32")
        scalars.append(trtp.SymInt32(translate(p["value"], shapes, trtp)))
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y, launch.grid_z = (translate(g, shapes, trtp) for g in entry["grid"])
    launch.block_x, launch.block_y, launch.block_z = entry["block"]
    launch.shared_mem = entry["shared_bytes"]
    cubin = (manifest.folder / entry["cubin"]).read_bytes()
    return entry["kernel_name"], cubin, launch, trtp.SymIntExprs.from_tuple(scalars)


def check_limits(manifest: AotManifest, max_shapes: Mapping[str, Mapping[str, tuple]]) -> list[str]:
    """Problems with the kernels' `limits` for the largest input shapes of each op
    ({op: {input: shape}}); an empty list when everything fits."""
    problems = []
    for op, shapes in max_shapes.items():
        try:
            entry = manifest.entry(op)
        except AotError as e:
            problems.append(str(e))
            continue
        for expr, limit in entry.get("limits", {}).items():
            try:
                value = translate(expr, shapes)
            except AotError:
                problems.append(f"{op}: cannot check the limit {expr} <= {limit} (an input the build does not bound)")
                continue
            if value > limit:
                problems.append(f"{op}: {expr} can reach {value} but the AOT kernel covers at most {limit}")
    return problems
