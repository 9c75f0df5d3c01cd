"""The ahead-of-time kernel contract, in one place: how an AOT kernel is described (`AotKernel`,
`AotParam`) and what the `manifest.json` that `sawint4 aot` writes holds.

A TensorRT AOT plugin launches exactly one kernel whose parameters are: input pointers, then
integer scalars (shape expressions, `symexpr`), then output pointers, nothing else. The kernel layer
describes its AOT variants with these classes (kernels/aot.py), `sawint4 aot` (build_scripts/aot.py)
compiles them and writes the manifest, and the TensorRT plugins (plugins/aot.py) and the test launcher
(build_scripts/aot_launcher.py) read it with `read_manifest`. Plain Python: no triton, no torch.

A manifest: {"format": MANIFEST_FORMAT, "triton_version", "model": {...}, "kernels": [entry, ...]},
each entry holding at least MANIFEST_ENTRY_KEYS (op, target, kernel name, cubin file, parameters in
TensorRT order, grid as shape expressions, block, shared memory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import symexpr

MANIFEST_FORMAT = "sawint4-aot/1"
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


#: What every kernel entry of a manifest holds.
MANIFEST_ENTRY_KEYS = ("op", "target", "kernel_name", "cubin", "params", "grid", "block", "shared_bytes")


class AotError(ValueError):
    """AOT artifacts that are malformed or do not fit what they are used for."""


def read_manifest(source: str | Path) -> tuple[Path, dict]:
    """(folder, manifest) of a `sawint4 aot` output folder or its manifest.json, checked for the format
    and for the keys every kernel entry must have."""
    path = Path(source)
    folder = path.parent if path.is_file() else path
    path = folder / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: write it with `sawint4 aot --out {folder}`")
    raw = json.loads(path.read_text())
    if raw.get("format") != MANIFEST_FORMAT:
        raise AotError(f"{path}: not a {MANIFEST_FORMAT} manifest (format={raw.get('format')!r})")
    for k in raw.get("kernels", []):
        for key in MANIFEST_ENTRY_KEYS:
            if key not in k:
                raise AotError(f"{path}: kernel entry without {key!r}: {sorted(k)}")
    return folder, raw
