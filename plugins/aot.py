"""Hook for the ahead-of-time implementation (@trtp.aot_impl) of the saw_int4 plugins.

NOT IMPLEMENTED YET. The AOT compilation of the Triton kernels (`sawint4 aot`, module
trtllm_sawint4.build_scripts.aot) is the later part of issue 4; it writes a manifest, and
`aot_kernel` below is the one function it has to fill. Until then, build engines with the JIT
implementations (plugin nodes with `aot=0`, the default of `sawint4 insert`).

What `aot_kernel` must return, per TensorRT (>= 10.9) `tensorrt.plugin.aot_impl`:
    (kernel_name, cubin_or_ptx, trtp.KernelLaunchParams, trtp.SymIntExprs)
and the constraints it must respect:
  * ONE kernel launch per plugin: append is one kernel, prefill/decode one single-pass kernel each
    (a split-K attention with a separate reduction kernel does not fit).
  * kernel parameters in this order: every plugin input pointer in contract order (transform
    tensors included even when has_* = 0), then the extra scalars, then the output pointer
    (append's output aliases the pool input: it is passed again). Triton 3.6 kernels carry two
    trailing scratch pointers (global and profile scratch): read the compiled metadata.
  * extra scalars are integers only (trtp.SymInt32 expressions of shapes or constants). `scale` is
    a float attribute: bake it in as a constexpr at compile time, or pass its float32 bit pattern
    as an int32 and bit-cast it in the kernel.
  * load the cubin, not the PTX, on machines whose driver is older than the local ptxas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import contract

MANIFEST_FORMAT = "sawint4-aot"
MANIFEST_VERSION = 1


@dataclass
class AotManifest:
    """The AOT compiler's output: {"format": "sawint4-aot", "version": 1, "kernels": {key: entry}}.
    `key` is `kernel_key(...)`; the entry layout belongs to the AOT work."""

    path: Path | None
    kernels: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def load_manifest(source) -> AotManifest:
    if isinstance(source, AotManifest):
        return source
    path = Path(source)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"AOT manifest {path} not found (write it with `sawint4 aot`)") from None
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest "
                         f"(format={data.get('format')!r}, version={data.get('version')!r})")
    return AotManifest(path, dict(data.get("kernels", {})), data)


def kernel_key(op: str | contract.OpDef, attrs: Mapping[str, Any], activation_dtype: str) -> str:
    """Which compiled kernel a plugin instance needs: everything that is a compile-time constant."""
    op = op if isinstance(op, contract.OpDef) else contract.op_def(op)
    a = contract.validate_attrs(op, attrs)
    flags = "".join(c for n, c in (("has_k_matrix", "K"), ("has_k_bias", "b"), ("has_q_matrix", "Q"),
                                   ("has_v_matrix", "V")) if a.get(n))
    heads = f"H{a['num_kv_heads']}" + (f"_HQ{a['num_heads']}" if "num_heads" in a else "")
    return (f"{op.name}/{activation_dtype}/{a['storage']}/{a['meta_dtype']}/D{a['head_dim']}/"
            f"T{a['tokens_per_block']}/{heads}/tf-{flags or 'none'}")


def aot_kernel(trtp, manifest: AotManifest, op: contract.OpDef, inputs, attrs: Mapping[str, Any], outputs,
               tactic: int):
    """Body of every @trtp.aot_impl: the AOT work fills this in (see the module docstring)."""
    raise NotImplementedError(
        f"{op.qualified_name}: the ahead-of-time implementation is not written yet (it comes with the AOT "
        f"compilation of the Triton kernels, `sawint4 aot`). Build with the JIT implementation instead: plugin "
        f"nodes with aot=0 (`sawint4 insert` without --aot) and no --aot-manifest."
    )
