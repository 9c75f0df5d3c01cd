"""The saw_int4 plugin contract, in plain Python (no TensorRT needed).

Three ops in namespace `saw_int4`, one per `torch.ops.sawint4.*` op and with its semantics
(trtllm_sawint4/ops/reference.py). docs/tensorrt.md has the table; this module is the single
source of truth that the TensorRT definitions (trt.py), the onnxruntime Python ops (ort_ops.py)
and `sawint4 insert` all read:

    append  (key, value, slot_mapping, pool, k_matrix, k_bias, v_matrix) -> pool_out (aliases pool)
    prefill (query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix) -> out
    decode  (query, pool, block_table, seq_lens, q_matrix, v_matrix) -> out

Transform tensors are always inputs (TensorRT plugins have no optional inputs, and an AOT launch
takes only integer scalars besides pointers); the `has_*` attributes say whether the op applies
each one (0: the input is a placeholder of the right shape and is ignored, the torch op gets None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from trtllm_sawint4.spec import HEAD_DIMS, METADATA_DTYPES, STORAGES, TOKENS_PER_BLOCK, StorageFormat

NAMESPACE = "saw_int4"
PLUGIN_VERSION = "1"
#: Domain the TensorRT-bound plugin nodes carry in ONNX (TensorRT ignores it; onnx needs one).
TRT_DOMAIN = NAMESPACE
#: The only domain onnxruntime-extensions runs Python ops in.
ORT_DOMAIN = "ai.onnx.contrib"

ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
#: dtype names as `trtp.AutoTuneCombination` spells them.
TRT_TYPE_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int32": "INT32", "uint8": "UINT8"}



class ContractError(ValueError):
    """An argument that breaks the plugin contract (raised at build time where possible)."""


@dataclass(frozen=True)
class TensorArg:
    name: str
    dtype: str  # "act" (float32|float16|bfloat16, the same for all "act" I/O of one op), or a fixed dtype
    dims: tuple[str | int, ...]  # symbolic (str) or fixed (int); names below
    doc: str


@dataclass(frozen=True)
class AttrArg:
    name: str
    type: type  # int, float or str (what trtp.register accepts and ONNX attributes carry)
    doc: str


@dataclass(frozen=True)
class OpDef:
    name: str  # plugin name (op_type in ONNX); the torch op is torch.ops.sawint4.<name>
    inputs: tuple[TensorArg, ...]
    attrs: tuple[AttrArg, ...]
    outputs: tuple[TensorArg, ...]
    aliases: Mapping[int, int]  # output index -> aliased input index

    @property
    def qualified_name(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def attr_names(self) -> list[str]:
        return [a.name for a in self.attrs]


# Symbolic dims: N new tokens, NQ queries, B sequences, B1 = B + 1, MB max blocks per sequence,
# NB blocks in the pool; H KV heads, HQ query heads, D head_dim, REGION region bytes (all attributes).
_POOL = TensorArg("pool", "uint8", ("NB", 2, "H", "REGION"), "one layer's paged cache, spec.pool_shape(NB)")
_K_MATRIX = TensorArg("k_matrix", "float32", ("H", "D", "D"), "k' = k_matrix[h] @ k + k_bias[h] (has_k_matrix)")
_K_BIAS = TensorArg("k_bias", "float32", ("H", "D"), "added after k_matrix (has_k_bias)")
_Q_MATRIX = TensorArg("q_matrix", "float32", ("H", "D", "D"), "q' = q_matrix[h // group] @ q (has_q_matrix)")
_V_MATRIX = TensorArg("v_matrix", "float32", ("D", "D"), "v' = v_matrix @ v; out = v_matrix.T @ out' (has_v_matrix)")
_BLOCK_TABLE = TensorArg("block_table", "int32", ("B", "MB"), "block ids of each sequence")
_SEQ_LENS = TensorArg("seq_lens", "int32", ("B",), "tokens in the cache per sequence, this step's included")
_QSL = TensorArg("query_start_loc", "int32", ("B1",), "queries of sequence b are rows [b]..[b+1]")

_FORMAT_ATTRS = (
    AttrArg("num_kv_heads", int, "H: KV heads of the layer"),
    AttrArg("head_dim", int, "D: channels per head"),
    AttrArg("tokens_per_block", int, "T: tokens per paged block"),
    AttrArg("storage", str, f"{' | '.join(STORAGES)} (saw_int4 stores as int4)"),
    AttrArg("meta_dtype", str, f"{' | '.join(METADATA_DTYPES)}: per-vector (scale, min) precision"),
)
_ATTENTION_ATTRS = (
    AttrArg("num_heads", int, "HQ: query heads (a multiple of num_kv_heads)"),
    *_FORMAT_ATTRS,
    AttrArg("scale", float, "softmax scale, usually head_dim ** -0.5"),
    AttrArg("has_q_matrix", int, "1: apply q_matrix, 0: ignore the input"),
    AttrArg("has_v_matrix", int, "1: rotate the output back with v_matrix.T, 0: ignore the input"),
)

APPEND = OpDef(
    name="append",
    inputs=(
        TensorArg("key", "act", ("N", "H", "D"), "new keys, token-major"),
        TensorArg("value", "act", ("N", "H", "D"), "new values"),
        TensorArg("slot_mapping", "int32", ("N",), "slot of token n: block slot // T, row slot % T"),
        _POOL, _K_MATRIX, _K_BIAS, _V_MATRIX,
    ),
    attrs=(
        *_FORMAT_ATTRS,
        AttrArg("has_k_matrix", int, "1: apply k_matrix, 0: ignore the input"),
        AttrArg("has_k_bias", int, "1: add k_bias, 0: ignore the input"),
        AttrArg("has_v_matrix", int, "1: apply v_matrix, 0: ignore the input"),
    ),
    outputs=(TensorArg("pool_out", "uint8", ("NB", 2, "H", "REGION"), "the pool, updated in place (aliases input 3)"),),
    aliases={0: 3},
)

PREFILL = OpDef(
    name="prefill",
    inputs=(
        TensorArg("query", "act", ("NQ", "HQ", "D"), "this step's queries, token-major"),
        _POOL, _BLOCK_TABLE, _SEQ_LENS, _QSL, _Q_MATRIX, _V_MATRIX,
    ),
    attrs=_ATTENTION_ATTRS,
    outputs=(TensorArg("out", "act", ("NQ", "HQ", "D"), "attention output, dtype of query"),),
    aliases={},
)

DECODE = OpDef(
    name="decode",
    inputs=(
        TensorArg("query", "act", ("B", "HQ", "D"), "one query per sequence"),
        _POOL, _BLOCK_TABLE, _SEQ_LENS, _Q_MATRIX, _V_MATRIX,
    ),
    attrs=_ATTENTION_ATTRS,
    outputs=(TensorArg("out", "act", ("B", "HQ", "D"), "attention output, dtype of query"),),
    aliases={},
)

OPS: dict[str, OpDef] = {op.name: op for op in (APPEND, PREFILL, DECODE)}


def op_def(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise ContractError(f"unknown saw_int4 op {name!r}; the ops are {sorted(OPS)}") from None


# ---- attributes -------------------------------------------------------------------------------
def region_bytes(attrs: Mapping[str, Any]) -> int:
    """REGION: bytes of one (block, K|V, head) region."""
    return StorageFormat(attrs["storage"], attrs["meta_dtype"]).region_bytes(attrs["head_dim"], attrs["tokens_per_block"])


def validate_attrs(op: str | OpDef, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalise the attributes of one node; returns them in declaration order with
    their declared Python types. Raises ContractError naming the bad attribute."""
    op = op if isinstance(op, OpDef) else op_def(op)
    extra = set(attrs) - set(op.attr_names)
    if extra:
        raise ContractError(f"{op.qualified_name}: unknown attribute(s) {sorted(extra)}; expected {op.attr_names}")
    out: dict[str, Any] = {}
    for a in op.attrs:
        if a.name not in attrs:
            raise ContractError(f"{op.qualified_name}: attribute {a.name!r} is missing ({a.doc})")
        v = attrs[a.name]
        if isinstance(v, bytes) and a.type is str:
            v = v.decode()
        if a.type is int and not (isinstance(v, int) or (hasattr(v, "__index__") and not isinstance(v, float))):
            raise ContractError(f"{op.qualified_name}: attribute {a.name!r} must be an int, got {v!r}")
        if a.type is float and not isinstance(v, (int, float)):
            raise ContractError(f"{op.qualified_name}: attribute {a.name!r} must be a float, got {v!r}")
        if a.type is str and not isinstance(v, str):
            raise ContractError(f"{op.qualified_name}: attribute {a.name!r} must be a str, got {v!r}")
        out[a.name] = a.type(v)

    def bad(name, msg):
        raise ContractError(f"{op.qualified_name}: attribute {name!r} {msg}, got {out[name]!r}")

    if out["storage"] not in STORAGES:
        bad("storage", f"must be one of {STORAGES}")
    if out["meta_dtype"] not in METADATA_DTYPES:
        bad("meta_dtype", f"must be one of {METADATA_DTYPES}")
    if out["head_dim"] not in HEAD_DIMS:
        bad("head_dim", f"must be one of {HEAD_DIMS}")
    if out["tokens_per_block"] not in TOKENS_PER_BLOCK:
        bad("tokens_per_block", f"must be one of {TOKENS_PER_BLOCK}")
    if out["num_kv_heads"] < 1:
        bad("num_kv_heads", "must be >= 1")
    if "num_heads" in out and (out["num_heads"] < 1 or out["num_heads"] % out["num_kv_heads"]):
        bad("num_heads", f"must be a positive multiple of num_kv_heads={out['num_kv_heads']}")
    if "scale" in out and not (out["scale"] > 0 and math.isfinite(out["scale"])):
        bad("scale", "must be a positive finite float")
    for name in [n for n in out if n.startswith("has_")]:
        if out[name] not in (0, 1):
            bad(name, "must be 0 or 1")
        if out[name] and out["storage"] == "bf16":
            bad(name, "must be 0 with storage='bf16' (transforms apply to quantized storage only)")
    return out


# ---- dtypes -----------------------------------------------------------------------------------
def output_dtypes(op: str | OpDef, input_dtypes: Sequence[str]) -> list[str]:
    """dtype rule: input dtypes (names like 'float16') in input order -> output dtypes."""
    op = op if isinstance(op, OpDef) else op_def(op)
    if len(input_dtypes) != len(op.inputs):
        raise ContractError(f"{op.qualified_name}: takes {len(op.inputs)} inputs {op.input_names}, "
                            f"got {len(input_dtypes)}")
    act = None
    for arg, dt in zip(op.inputs, input_dtypes):
        if arg.dtype == "act":
            if dt not in ACTIVATION_DTYPES:
                raise ContractError(f"{op.qualified_name}: {arg.name} must be one of {ACTIVATION_DTYPES}, got {dt}")
            if act is not None and dt != act:
                raise ContractError(f"{op.qualified_name}: {arg.name} must have the dtype of the other "
                                    f"activations ({act}), got {dt}")
            act = dt
        elif dt != arg.dtype:
            raise ContractError(f"{op.qualified_name}: {arg.name} must be {arg.dtype}, got {dt}")
    return [act if o.dtype == "act" else o.dtype for o in op.outputs]


def type_combination(op: str | OpDef, activation_dtypes: Sequence[str] = ACTIVATION_DTYPES) -> str:
    """The `trtp.AutoTuneCombination` type string: every input then every output, activations
    dependently FP32|FP16|BF16 (or the given subset), the rest fixed."""
    op = op if isinstance(op, OpDef) else op_def(op)
    bad = [d for d in activation_dtypes if d not in ACTIVATION_DTYPES]
    if bad or not activation_dtypes:
        raise ContractError(f"activation dtypes must be a non-empty subset of {ACTIVATION_DTYPES}, got {activation_dtypes}")
    act = "|".join(TRT_TYPE_NAMES[d] for d in activation_dtypes)
    return ", ".join(act if t.dtype == "act" else TRT_TYPE_NAMES[t.dtype] for t in (*op.inputs, *op.outputs))


# ---- shapes -----------------------------------------------------------------------------------
def _dim_values(attrs: Mapping[str, Any]) -> dict[str, int]:
    vals = {"D": attrs["head_dim"], "H": attrs["num_kv_heads"], "REGION": region_bytes(attrs)}
    if "num_heads" in attrs:
        vals["HQ"] = attrs["num_heads"]
    return vals


def check_shapes(op: str | OpDef, attrs: Mapping[str, Any], shapes: Sequence[Sequence[int | None]]) -> None:
    """Shape rule on (possibly partly unknown: None) input shapes, in input order. Checks ranks,
    the dims the attributes fix, and that symbolic dims agree between inputs (B1 = B + 1)."""
    op = op if isinstance(op, OpDef) else op_def(op)
    attrs = validate_attrs(op, attrs)
    if len(shapes) != len(op.inputs):
        raise ContractError(f"{op.qualified_name}: takes {len(op.inputs)} inputs {op.input_names}, got {len(shapes)}")
    fixed = _dim_values(attrs)
    seen: dict[str, tuple[int, str]] = {}
    for arg, shape in zip(op.inputs, shapes):
        shape = tuple(shape)
        if len(shape) != len(arg.dims):
            raise ContractError(f"{op.qualified_name}: {arg.name} must have rank {len(arg.dims)} "
                                f"{list(arg.dims)}, got shape {list(shape)}")
        for axis, (sym, n) in enumerate(zip(arg.dims, shape)):
            if n is None or (isinstance(n, int) and n < 0):
                continue
            want = sym if isinstance(sym, int) else fixed.get(sym)
            if want is not None and n != want:
                raise ContractError(f"{op.qualified_name}: {arg.name} dim {axis} ({sym}) must be {want}, "
                                    f"got shape {list(shape)}")
            if isinstance(sym, str) and sym not in fixed:
                key, val = ("B", n - 1) if sym == "B1" else (sym, n)
                if key in seen and seen[key][0] != val:
                    raise ContractError(f"{op.qualified_name}: {arg.name} dim {axis} ({sym}) disagrees with "
                                        f"{seen[key][1]} ({key}={seen[key][0]}), got shape {list(shape)}")
                seen.setdefault(key, (val, arg.name))


def output_shapes(op: str | OpDef, attrs: Mapping[str, Any], shapes: Sequence[Sequence[int | None]]):
    """Output shapes: append -> the pool's; attention -> the query's."""
    op = op if isinstance(op, OpDef) else op_def(op)
    check_shapes(op, attrs, shapes)
    src = op.input_names.index("pool" if op is APPEND else "query")
    return [tuple(shapes[src])]


# ---- the torch op each plugin maps onto -------------------------------------------------------
def torch_call(op: str | OpDef, inputs: Sequence, attrs: Mapping[str, Any]):
    """Run the plugin's semantics with `torch.ops.sawint4.<op>` on torch tensors given in plugin
    input order. append mutates `pool` (input 3) and returns it; attention returns `out`."""
    import torch

    import trtllm_sawint4.ops  # noqa: F401  (registers torch.ops.sawint4)

    op = op if isinstance(op, OpDef) else op_def(op)
    attrs = validate_attrs(op, attrs)
    if len(inputs) != len(op.inputs):
        raise ContractError(f"{op.qualified_name}: takes {len(op.inputs)} inputs {op.input_names}, got {len(inputs)}")
    t = dict(zip(op.input_names, inputs))
    use = lambda name: t[name] if attrs[f"has_{name}"] else None  # noqa: E731
    storage, meta = attrs["storage"], attrs["meta_dtype"]
    if op is APPEND:
        torch.ops.sawint4.append(t["pool"], t["key"], t["value"], t["slot_mapping"], use("k_matrix"), use("k_bias"),
                                 use("v_matrix"), storage, meta)
        return t["pool"]
    if op is PREFILL:
        return torch.ops.sawint4.prefill(t["query"], t["pool"], t["block_table"], t["seq_lens"],
                                         t["query_start_loc"], use("q_matrix"), use("v_matrix"), attrs["scale"],
                                         storage, meta)
    return torch.ops.sawint4.decode(t["query"], t["pool"], t["block_table"], t["seq_lens"], use("q_matrix"),
                                    use("v_matrix"), attrs["scale"], storage, meta)


# ---- ONNX node attributes ---------------------------------------------------------------------
def onnx_node_attrs(op: str | OpDef, attrs: Mapping[str, Any], *, aot: bool = False) -> dict:
    """Attributes of an ONNX node that the TensorRT ONNX parser turns into this plugin:
    the op's own attributes plus plugin_namespace, plugin_version and aot. (onnxruntime-extensions
    nodes carry the same; it reads only the declared ones.)"""
    op = op if isinstance(op, OpDef) else op_def(op)
    out = dict(validate_attrs(op, attrs))
    out.update(plugin_namespace=NAMESPACE, plugin_version=PLUGIN_VERSION, aot=int(bool(aot)))
    return out
