"""`sawint4 insert`: rewrite an ONNX decoder's attention into saw_int4 plugin nodes.

Each attention node (standard ONNX `Attention`, opset 23, or com.microsoft `GroupQueryAttention`)
becomes

    key/value -> [N, H, D] -> saw_int4::append(key, value, slot_mapping, kv_pool_<i>, k_matrix, k_bias, v_matrix)
                                  -> kv_pool_<i>_out  (graph output; the pool updated in place)
    query -> [N, HQ, D] -> saw_int4::prefill(query, kv_pool_<i>_out, block_table, seq_lens, query_start_loc,
                                              q_matrix, v_matrix)        (or ::decode with --mode decode)
                        -> back to the node's output layout

with new graph inputs kv_pool_<i> (uint8 [num_blocks, 2, H, R]), block_table (int32 [num_seqs,
max_blocks_per_seq]), seq_lens (int32 [num_seqs]), slot_mapping (int32 [num_tokens]) and
query_start_loc (int32 [num_seqs + 1], prefill mode). The attention reads the append's output, so
every engine orders the write before the read. Tokens are flattened batch-major (token n = b * S + s
of the node's [B, S] layout); with B = 1 the S tokens may belong to many sequences, which
query_start_loc separates (continuous batching).

A dense KV cache that the graph carried (Attention past_key/past_value, GQA past/present, seqlens_k,
total_sequence_length) is replaced by the pools: those graph inputs/outputs disappear when nothing
else uses them. The input file is never written. `--ort` puts the plugin nodes in the domain
`ai.onnx.contrib` so onnxruntime runs them with build_scripts/ort_ops.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trtllm_sawint4.plugins import contract
from trtllm_sawint4.spec import FORMATS, METADATA_DTYPES, TOKENS_PER_BLOCK, KVCacheSpec

#: model.metadata_props key holding the cache format the rewritten graph expects (JSON).
METADATA_KEY = "sawint4.kv_cache"
INPUT_NAMES = {"block_table": "block_table", "seq_lens": "seq_lens", "slot_mapping": "slot_mapping",
               "query_start_loc": "query_start_loc"}
POOL_INPUT = "kv_pool_{}"
POOL_OUTPUT = "kv_pool_{}_out"


class InsertError(ValueError):
    """The graph cannot be rewritten (with the reason)."""


@dataclass
class InsertOptions:
    kv_format: str = "saw_int4"
    tokens_per_block: int = 16
    rotation_block: int | None = None
    rotate_v: bool = False
    sign_seed: int | None = None
    metadata_dtype: str = "fp16"
    calibration: str | None = None  # a `sawint4 calibrate` file
    mode: str = "prefill"  # prefill (general: prefill, chunked prefill, decode) or decode (one query per sequence)
    ort: bool = False  # plugin nodes in ai.onnx.contrib for onnxruntime-extensions
    aot: bool = False  # aot=1 on the nodes: TensorRT uses the @trtp.aot_impl (needs `sawint4 aot`)
    num_heads: int | None = None  # overrides when the graph's shapes do not say
    num_kv_heads: int | None = None
    head_dim: int | None = None


@dataclass
class InsertReport:
    num_layers: int
    spec: dict
    attention_ops: dict
    added_inputs: list = field(default_factory=list)
    added_outputs: list = field(default_factory=list)
    removed_inputs: list = field(default_factory=list)
    removed_outputs: list = field(default_factory=list)


@dataclass
class _Attn:
    node: object
    kind: str  # "Attention" | "GroupQueryAttention"
    layout: str  # "bhsd" (4-D Q/K/V) or "bsd" (3-D, heads folded into the last dim)
    q: object
    k: object
    v: object
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dtype: object
    dead_inputs: list  # inputs the paged cache replaces (past KV, seqlens_k, ...)
    rotary: dict | None = None  # GQA do_rotary=1: cos, sin, dim, interleaved


# ---- reading the attention nodes --------------------------------------------------------------
def _is_onnx_attention(node) -> bool:
    return node.op == "Attention" and (node.domain or "") in ("", "ai.onnx")


def _is_gqa(node) -> bool:
    return node.op == "GroupQueryAttention" and node.domain == "com.microsoft"


def _input(node, i):
    """Input i of a node, or None when absent/empty."""
    if i >= len(node.inputs):
        return None
    t = node.inputs[i]
    return None if t.name == "" else t


def _static(shape, axis):
    if shape is None or len(shape) <= axis:
        return None
    d = shape[axis]
    return d if isinstance(d, int) and d >= 0 else None


def _resolve(name, value, override, where):
    if override is not None:
        if value is not None and value != override:
            raise InsertError(f"{where}: the graph says {name}={value} but --{name.replace('_', '-')}={override}")
        return override
    if value is None:
        raise InsertError(f"{where}: cannot determine {name} from the graph's shapes; "
                          f"pass --{name.replace('_', '-')}")
    return value


def _used_outputs(node, graph_outputs):
    return [i for i, t in enumerate(node.outputs) if t.name and (t.outputs or t in graph_outputs)]


def _parse_attention(node, graph, opts: InsertOptions) -> _Attn:
    where = f"Attention node {node.name!r}"
    q, k, v = (_input(node, i) for i in range(3))
    if q is None or k is None or v is None:
        raise InsertError(f"{where}: needs Q, K and V inputs")
    if _input(node, 3) is not None:
        raise InsertError(f"{where}: has an attn_mask input. The paged op expresses causality and lengths through "
                          f"seq_lens/query_start_loc, not a mask: export with an attention function that calls "
                          f"scaled_dot_product_attention(is_causal=True, enable_gqa=True) and no mask "
                          f"(build_scripts/export.py does)")
    if len(node.inputs) > 6 and _input(node, 6) is not None:
        raise InsertError(f"{where}: nonpad_kv_seqlen input is not supported")
    extra = [i for i in _used_outputs(node, graph.outputs) if i == 3]
    if extra:
        raise InsertError(f"{where}: its qk_matmul_output (output 3) is used; the paged op does not produce it")
    if not node.attrs.get("is_causal", 0):
        raise InsertError(f"{where}: is_causal=0; only causal decoder self-attention can be rewritten")
    if float(node.attrs.get("softcap", 0.0) or 0.0) != 0.0:
        raise InsertError(f"{where}: softcap is not supported by the saw_int4 ops")
    rank = len(q.shape) if q.shape is not None else None
    if rank == 4:
        hq, d, hkv = _static(q.shape, 1), _static(q.shape, 3), _static(k.shape, 1)
        layout = "bhsd"
    elif rank == 3:
        hq, hkv = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
        hidden = _static(q.shape, 2)
        d = hidden // hq if hidden is not None and hq else None
        layout = "bsd"
    else:
        raise InsertError(f"{where}: unknown layout: Q must be 4-D [B, H, S, D] or 3-D [B, S, H*D], "
                          f"got shape {q.shape}")
    hq = _resolve("num_heads", hq, opts.num_heads, where)
    hkv = _resolve("num_kv_heads", hkv, opts.num_kv_heads, where)
    d = _resolve("head_dim", d, opts.head_dim, where)
    scale = float(node.attrs.get("scale", 0.0) or 0.0) or 1.0 / math.sqrt(d)
    dead = [t for t in (_input(node, 4), _input(node, 5)) if t is not None]
    return _Attn(node, "Attention", layout, q, k, v, hq, hkv, d, scale, q.dtype, dead)


def _parse_gqa(node, graph, opts: InsertOptions) -> _Attn:
    where = f"GroupQueryAttention node {node.name!r}"
    rotary = None
    if node.attrs.get("do_rotary", 0):
        cos, sin = _input(node, 7), _input(node, 8)
        if cos is None or sin is None:
            raise InsertError(f"{where}: do_rotary=1 needs cos_cache and sin_cache inputs")
        half = _static(cos.shape, 1)
        if half is None:
            raise InsertError(f"{where}: cannot determine the rotary dimension from cos_cache shape {cos.shape}")
        rotary = dict(cos=cos, sin=sin, dim=2 * half, interleaved=int(node.attrs.get("rotary_interleaved", 0)))
    for attr, ok in (("local_window_size", -1), ("softcap", 0.0), ("smooth_softmax", 0)):
        if attr in node.attrs and node.attrs[attr] not in (ok, None):
            raise InsertError(f"{where}: {attr}={node.attrs[attr]} is not supported by the saw_int4 ops")
    for i, name in ((9, "position_ids"), (10, "attention_bias"), (11, "head_sink")):
        if _input(node, i) is not None:
            raise InsertError(f"{where}: input {name} is not supported")
    hq = node.attrs.get("num_heads")
    hkv = node.attrs.get("kv_num_heads")
    hq = _resolve("num_heads", hq, opts.num_heads, where)
    hkv = _resolve("num_kv_heads", hkv, opts.num_kv_heads, where)
    q, k, v = (_input(node, i) for i in range(3))
    if q is None or q.shape is None or len(q.shape) != 3:
        raise InsertError(f"{where}: unknown layout: query must be 3-D [B, S, hidden], got "
                          f"{None if q is None else q.shape}")
    hidden = _static(q.shape, 2)
    packed = k is None
    if packed != (v is None):
        raise InsertError(f"{where}: key and value must both be given or both be absent (packed QKV)")
    d = None if hidden is None else hidden // (hq + 2 * hkv if packed else hq)
    d = _resolve("head_dim", d, opts.head_dim, where)
    scale = float(node.attrs.get("scale", 0.0) or 0.0) or 1.0 / math.sqrt(d)
    if rotary is not None and (rotary["dim"] > d or rotary["dim"] % 2):
        raise InsertError(f"{where}: rotary dimension {rotary['dim']} (from cos_cache) does not fit head_dim={d}")
    dead = [t for t in (_input(node, i) for i in (3, 4, 5, 6, 7, 8)) if t is not None]
    return _Attn(node, "GroupQueryAttention", "bsd", q, k, v, hq, hkv, d, scale, q.dtype, dead, rotary)


def find_attention(graph, opts: InsertOptions) -> list[_Attn]:
    found = []
    for node in graph.nodes:
        if _is_onnx_attention(node):
            found.append(_parse_attention(node, graph, opts))
        elif _is_gqa(node):
            found.append(_parse_gqa(node, graph, opts))
    if not found:
        ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op}" for n in graph.nodes)
        hint = ""
        if ops.get("Softmax") and ops.get("MatMul"):
            hint = (" The graph computes attention from MatMul/Softmax (eager attention or opset < 23): export with "
                    "opset_version=23 and an sdpa-based attention function so that each layer is one Attention node.")
        raise InsertError("no attention found: expected ONNX `Attention` (opset 23) or com.microsoft "
                          f"`GroupQueryAttention` nodes; the graph has {dict(ops.most_common(12))}.{hint}")
    return found


# ---- building -----------------------------------------------------------------------------------
class _Builder:
    def __init__(self, gs, graph):
        self.gs, self.graph, self.n = gs, graph, 0

    def name(self, base):
        self.n += 1
        return f"sawint4/{base}_{self.n}"

    def op(self, op, inputs, attrs=None, dtype=None, shape=None, domain=None, outputs=None):
        out = outputs or [self.gs.Variable(self.name(op.lower() + "_out"), dtype=dtype, shape=shape)]
        node = self.gs.Node(op=op, name=self.name(op), attrs=attrs or {}, inputs=list(inputs), outputs=out)
        if domain:
            node.domain = domain
        self.graph.nodes.append(node)
        return out[0]

    def const(self, name, array):
        return self.gs.Constant(name, np.ascontiguousarray(array))

    def shape_const(self, values):
        return self.const(self.name("shape"), np.array(values, dtype=np.int64))


def _tokens_major(b: _Builder, x, heads, d, layout):
    """[B, H, S, D] or [B, S, H*D] -> [B*S, H, D]."""
    if layout == "bhsd":
        x = b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}, dtype=x.dtype)
    return b.op("Reshape", [x, b.shape_const([-1, heads, d])], dtype=x.dtype)


def _token_positions(b: _Builder, inputs: dict, q3, mode: str):
    """int64 [N] absolute position of each new token, from the paged-cache inputs:
    prefill: token n of sequence j = #(query_start_loc[1:] <= n) sits at n + seq_lens[j] - query_start_loc[j + 1];
    decode: seq_lens - 1."""
    i64 = np.int64
    lens = b.op("Cast", [inputs["seq_lens"]], {"to": 7}, dtype=i64)
    if mode == "decode":
        return b.op("Sub", [lens, b.const(b.name("one"), np.array(1, i64))], dtype=i64)
    shape = b.op("Shape", [q3], dtype=i64)
    n_tok = b.op("Gather", [shape, b.const(b.name("zero"), np.array(0, i64))], {"axis": 0}, dtype=i64)
    n = b.op("Range", [b.const(b.name("zero"), np.array(0, i64)), n_tok, b.const(b.name("one"), np.array(1, i64))],
             dtype=i64)
    qsl = b.op("Cast", [inputs["query_start_loc"]], {"to": 7}, dtype=i64)
    ends = b.op("Slice", [qsl, b.const(b.name("s"), np.array([1], i64)), b.const(b.name("e"), np.array([2 ** 62], i64)),
                          b.const(b.name("a"), np.array([0], i64))], dtype=i64)
    n_col = b.op("Unsqueeze", [n, b.const(b.name("ax"), np.array([1], i64))], dtype=i64)
    ends_row = b.op("Unsqueeze", [ends, b.const(b.name("ax"), np.array([0], i64))], dtype=i64)
    past_end = b.op("Cast", [b.op("GreaterOrEqual", [n_col, ends_row], dtype=np.bool_)], {"to": 7}, dtype=i64)
    seq = b.op("ReduceSum", [past_end, b.const(b.name("ax"), np.array([1], i64))], {"keepdims": 0}, dtype=i64)
    start = b.op("Sub", [b.op("Gather", [lens, seq], {"axis": 0}, dtype=i64),
                         b.op("Gather", [ends, seq], {"axis": 0}, dtype=i64)], dtype=i64)
    return b.op("Add", [n, start], dtype=i64)


def _slice_last(b: _Builder, x, start, end):
    i64 = np.int64
    return b.op("Slice", [x, b.const(b.name("s"), np.array([start], i64)), b.const(b.name("e"), np.array([end], i64)),
                          b.const(b.name("a"), np.array([-1], i64))], dtype=x.dtype)


def _apply_rotary(b: _Builder, x, heads, d, cos, sin, rotary):
    """Rotary embedding of x [N, heads, D] with cos/sin [N, rd/2] (GQA's do_rotary semantics)."""
    i64 = np.int64
    rd, half = rotary["dim"], rotary["dim"] // 2
    c = b.op("Unsqueeze", [cos, b.const(b.name("ax"), np.array([1], i64))], dtype=x.dtype)
    s = b.op("Unsqueeze", [sin, b.const(b.name("ax"), np.array([1], i64))], dtype=x.dtype)
    xr = _slice_last(b, x, 0, rd) if rd < d else x
    if rotary["interleaved"]:
        pairs = b.op("Reshape", [xr, b.shape_const([0, heads, half, 2])], dtype=x.dtype)
        x1 = b.op("Squeeze", [_slice_last(b, pairs, 0, 1), b.const(b.name("ax"), np.array([-1], i64))], dtype=x.dtype)
        x2 = b.op("Squeeze", [_slice_last(b, pairs, 1, 2), b.const(b.name("ax"), np.array([-1], i64))], dtype=x.dtype)
    else:
        x1, x2 = _slice_last(b, xr, 0, half), _slice_last(b, xr, half, rd)
    o1 = b.op("Sub", [b.op("Mul", [x1, c], dtype=x.dtype), b.op("Mul", [x2, s], dtype=x.dtype)], dtype=x.dtype)
    o2 = b.op("Add", [b.op("Mul", [x2, c], dtype=x.dtype), b.op("Mul", [x1, s], dtype=x.dtype)], dtype=x.dtype)
    if rotary["interleaved"]:
        ax = b.const(b.name("ax"), np.array([-1], i64))
        st = b.op("Concat", [b.op("Unsqueeze", [o1, ax], dtype=x.dtype), b.op("Unsqueeze", [o2, ax], dtype=x.dtype)],
                  {"axis": -1}, dtype=x.dtype)
        out = b.op("Reshape", [st, b.shape_const([0, heads, rd])], dtype=x.dtype)
        parts = [out]
    else:
        parts = [o1, o2]
    if rd < d:
        parts.append(_slice_last(b, x, rd, d))
    return parts[0] if len(parts) == 1 else b.op("Concat", parts, {"axis": -1}, dtype=x.dtype)


def _transform_consts(b: _Builder, spec: KVCacheSpec, transform, layer: int, cache: dict):
    """The four transform inputs of one layer, as constants (shared between layers when equal), plus flags."""
    import torch

    h, d = spec.num_kv_heads, spec.head_dim
    given = {"k_matrix": transform.k_matrix, "k_bias": transform.k_bias, "q_matrix": transform.q_matrix,
             "v_matrix": transform.v_matrix}
    placeholder = {"k_matrix": torch.eye(d).expand(h, d, d), "k_bias": torch.zeros(h, d),
                   "q_matrix": torch.eye(d).expand(h, d, d), "v_matrix": torch.eye(d)}
    consts, flags = {}, {}
    for name, t in given.items():
        flags[f"has_{name}"] = int(t is not None)
        arr = (t if t is not None else placeholder[name]).detach().float().contiguous().numpy()
        key = (name, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
        if key not in cache:
            cache[key] = b.const(f"sawint4/{name}_L{layer}", arr)
        consts[name] = cache[key]
    return consts, flags


def insert(model, opts: InsertOptions | None = None):
    """Rewrite `model` (an onnx.ModelProto, not modified) and return (new ModelProto, InsertReport)."""
    import onnx
    import onnx_graphsurgeon as gs
    import torch

    from trtllm_sawint4.transforms import build_layer_transform

    opts = opts or InsertOptions()
    if opts.mode not in ("prefill", "decode"):
        raise InsertError(f"mode must be 'prefill' or 'decode', got {opts.mode!r}")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        work = onnx.shape_inference.infer_shapes(work)
    except Exception:  # shapes only help; an un-inferable graph still has its declared ones
        pass
    graph = gs.import_onnx(work)
    layers = find_attention(graph, opts)

    kv = {(a.num_kv_heads, a.head_dim) for a in layers}
    if len(kv) != 1:
        raise InsertError(f"all attention layers must share num_kv_heads and head_dim (one cache format), got {kv}")
    (hkv, d), = kv
    try:
        spec = KVCacheSpec(head_dim=d, num_kv_heads=hkv, tokens_per_block=opts.tokens_per_block,
                           kv_format=opts.kv_format, rotation_block=opts.rotation_block, rotate_v=opts.rotate_v,
                           sign_seed=opts.sign_seed, metadata_dtype=opts.metadata_dtype)
    except ValueError as e:
        raise InsertError(f"cache format: {e}") from e
    calibration = None
    if opts.calibration:
        from trtllm_sawint4.calibration import ChannelCalibration

        try:
            calibration = ChannelCalibration.load(opts.calibration)
            calibration.check_matches(spec, len(layers))
        except (OSError, ValueError) as e:
            raise InsertError(f"--calibration {opts.calibration}: {e}") from e
    act_dtypes = {np.dtype(a.dtype).name if a.dtype is not None else None for a in layers}
    if opts.ort and act_dtypes - {"float32", None}:
        raise InsertError(f"--ort: the onnxruntime Python ops take float32 activations, the graph has {act_dtypes}")

    b = _Builder(gs, graph)
    i32 = np.int32
    new_inputs = {
        "block_table": gs.Variable(INPUT_NAMES["block_table"], dtype=i32, shape=["num_seqs", "max_blocks_per_seq"]),
        "seq_lens": gs.Variable(INPUT_NAMES["seq_lens"], dtype=i32, shape=["num_seqs"]),
        "slot_mapping": gs.Variable(INPUT_NAMES["slot_mapping"], dtype=i32, shape=["num_tokens"]),
    }
    if opts.mode == "prefill":
        new_inputs["query_start_loc"] = gs.Variable(INPUT_NAMES["query_start_loc"], dtype=i32,
                                                    shape=["num_seqs_plus_1"])
    existing = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    clash = existing & ({t.name for t in new_inputs.values()} | {POOL_INPUT.format(0), POOL_OUTPUT.format(0)})
    if clash:
        raise InsertError(f"the graph already has inputs/outputs named {sorted(clash)} (already rewritten?)")

    domain = contract.ORT_DOMAIN if opts.ort else contract.TRT_DOMAIN
    region = spec.region_bytes
    fmt = dict(num_kv_heads=hkv, head_dim=d, tokens_per_block=spec.tokens_per_block, storage=spec.storage,
               meta_dtype=spec.metadata_dtype)
    pools_in, pools_out, dead = [], [], []
    const_cache: dict = {}
    for layer, a in enumerate(layers):
        node = a.node
        transform = build_layer_transform(spec, **({} if calibration is None else calibration.layer_args(layer)))
        consts, flags = _transform_consts(b, spec, transform, layer, const_cache)
        q, k, v = a.q, a.k, a.v
        if k is None:  # packed QKV [B, S, (HQ + 2 H) D]
            split = b.const(b.name("split"), np.array([a.num_heads * d, hkv * d, hkv * d], dtype=np.int64))
            outs = [gs.Variable(b.name("qkv"), dtype=q.dtype) for _ in range(3)]
            b.op("Split", [q, split], {"axis": -1}, outputs=outs)
            q, k, v = outs
        q3 = _tokens_major(b, q, a.num_heads, d, a.layout)
        k3 = _tokens_major(b, k, hkv, d, a.layout)
        v3 = _tokens_major(b, v, hkv, d, a.layout)
        q_tokens = q3
        if a.rotary is not None:
            if "pos" not in const_cache:  # one position computation shared by all layers
                const_cache["pos"] = _token_positions(b, new_inputs, q3, opts.mode)
            pos = const_cache["pos"]
            cos = b.op("Gather", [a.rotary["cos"], pos], {"axis": 0}, dtype=q.dtype)
            sin = b.op("Gather", [a.rotary["sin"], pos], {"axis": 0}, dtype=q.dtype)
            q3 = _apply_rotary(b, q3, a.num_heads, d, cos, sin, a.rotary)
            k3 = _apply_rotary(b, k3, hkv, d, cos, sin, a.rotary)

        pool_in = gs.Variable(POOL_INPUT.format(layer), dtype=np.uint8, shape=["num_blocks", 2, hkv, region])
        pool_out = gs.Variable(POOL_OUTPUT.format(layer), dtype=np.uint8, shape=["num_blocks", 2, hkv, region])
        append_attrs = contract.onnx_node_attrs(contract.APPEND, dict(
            fmt, has_k_matrix=flags["has_k_matrix"], has_k_bias=flags["has_k_bias"],
            has_v_matrix=flags["has_v_matrix"]), aot=opts.aot)
        b.op("append", [k3, v3, new_inputs["slot_mapping"], pool_in, consts["k_matrix"], consts["k_bias"],
                        consts["v_matrix"]], append_attrs, domain=domain, outputs=[pool_out])

        attn_op = contract.PREFILL if opts.mode == "prefill" else contract.DECODE
        attn_attrs = contract.onnx_node_attrs(attn_op, dict(
            fmt, num_heads=a.num_heads, scale=a.scale, has_q_matrix=flags["has_q_matrix"],
            has_v_matrix=flags["has_v_matrix"]), aot=opts.aot)
        index_inputs = [new_inputs["block_table"], new_inputs["seq_lens"]]
        if opts.mode == "prefill":
            index_inputs.append(new_inputs["query_start_loc"])
        o3 = b.op(attn_op.name, [q3, pool_out, *index_inputs, consts["q_matrix"], consts["v_matrix"]], attn_attrs,
                  dtype=q.dtype, shape=["num_tokens", a.num_heads, d], domain=domain)

        y = node.outputs[0]
        node.outputs.clear()  # the old node goes; its output Y is now produced below
        node.inputs.clear()
        if a.layout == "bhsd":
            qt = q_tokens.inputs[0].inputs[0]  # the [B, S, HQ, D] transpose of Q
            o4 = b.op("Reshape", [o3, b.op("Shape", [qt], dtype=np.int64)], dtype=q.dtype)
            b.op("Transpose", [o4], {"perm": [0, 2, 1, 3]}, outputs=[y])
        else:
            b.op("Reshape", [o3, b.op("Shape", [q], dtype=np.int64)], outputs=[y])
        dead.extend(a.dead_inputs)
        pools_in.append(pool_in)
        pools_out.append(pool_out)

    graph.cleanup(remove_unused_graph_inputs=False)
    used = {t.name for n in graph.nodes for t in n.inputs}
    produced = {t.name for n in graph.nodes for t in n.outputs} | {t.name for t in graph.inputs}
    dead_names = {t.name for t in dead}
    removed_inputs = [t.name for t in graph.inputs if t.name in dead_names and t.name not in used]
    removed_outputs = [t.name for t in graph.outputs if t.name not in produced]
    graph.inputs = [t for t in graph.inputs if t.name not in removed_inputs]
    graph.outputs = [t for t in graph.outputs if t.name not in removed_outputs]
    graph.inputs.extend([*new_inputs.values(), *pools_in])
    graph.outputs.extend(pools_out)
    graph.cleanup().toposort()

    out = gs.export_onnx(graph)
    out.ir_version = model.ir_version
    if not any(o.domain == domain for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    for p in model.metadata_props:
        out.metadata_props.add(key=p.key, value=p.value)
    spec_dict = {k: v for k, v in asdict(spec).items()}
    meta = dict(spec=spec_dict, num_layers=len(layers), region_bytes=region, pool_shape=["num_blocks", 2, hkv, region],
                mode=opts.mode, plugin_domain=domain, plugin_namespace=contract.NAMESPACE,
                plugin_version=contract.PLUGIN_VERSION, aot=int(opts.aot),
                calibration=Path(opts.calibration).name if opts.calibration else None)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    report = InsertReport(
        num_layers=len(layers), spec=spec_dict,
        attention_ops=dict(Counter(a.kind for a in layers)),
        added_inputs=[t.name for t in (*new_inputs.values(), *pools_in)], added_outputs=[t.name for t in pools_out],
        removed_inputs=removed_inputs, removed_outputs=removed_outputs)
    return out, report


def insert_file(src, dst, opts: InsertOptions | None = None) -> InsertReport:
    import onnx

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InsertError(f"{src}: no such ONNX file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InsertError("the output path is the input file; the input is never overwritten")
    model = onnx.load(str(src))
    out, report = insert(model, opts)
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = out.ByteSize() > 1_800_000_000
    onnx.save(out, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)
    return report


def read_metadata(model) -> dict:
    """The cache format a rewritten model expects (from its metadata), or {} for other models."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return {}


# ---- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="ONNX decoder with Attention (opset 23) or com.microsoft GroupQueryAttention")
    parser.add_argument("output", help="where to write the rewritten model (the input is never modified)")
    parser.add_argument("--kv-format", default="saw_int4", choices=FORMATS)
    parser.add_argument("--tokens-per-block", type=int, default=16, choices=TOKENS_PER_BLOCK)
    parser.add_argument("--rotation-block", type=int, default=None, help="saw_int4 only (default min(head_dim, 128))")
    parser.add_argument("--rotate-v", action="store_true", help="saw_int4 only: rotate V too")
    parser.add_argument("--sign-seed", type=int, default=None, help="saw_int4 only: random sign flips")
    parser.add_argument("--metadata-dtype", default="fp16", choices=METADATA_DTYPES)
    parser.add_argument("--calibration", default=None, help="channel calibration file from `sawint4 calibrate`")
    parser.add_argument("--mode", default="prefill", choices=["prefill", "decode"],
                        help="prefill: general attention (prefill, chunked prefill and decode); "
                             "decode: one query per sequence, no query_start_loc input")
    parser.add_argument("--ort", action="store_true",
                        help="plugin nodes in domain ai.onnx.contrib, to run in onnxruntime with the Python ops")
    parser.add_argument("--aot", action="store_true", help="aot=1 on the plugin nodes (needs `sawint4 aot`)")
    parser.add_argument("--num-heads", type=int, default=None, help="when the graph's shapes do not say")
    parser.add_argument("--num-kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)


def run(args) -> int:
    opts = InsertOptions(kv_format=args.kv_format, tokens_per_block=args.tokens_per_block,
                         rotation_block=args.rotation_block, rotate_v=args.rotate_v, sign_seed=args.sign_seed,
                         metadata_dtype=args.metadata_dtype, calibration=args.calibration, mode=args.mode,
                         ort=args.ort, aot=args.aot, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                         head_dim=args.head_dim)
    try:
        report = insert_file(args.input, args.output, opts)
    except InsertError as e:
        print(f"sawint4 insert: error: {e}", file=sys.stderr)
        return 2
    print(f"rewrote {report.num_layers} attention layer(s) {report.attention_ops} -> {args.output}")
    print(f"  cache: {json.dumps(report.spec)}")
    print(f"  added inputs: {', '.join(report.added_inputs)}")
    print(f"  added outputs: {', '.join(report.added_outputs)}")
    if report.removed_inputs or report.removed_outputs:
        print(f"  removed (dense KV cache replaced by the pools): inputs {report.removed_inputs}, "
              f"outputs {report.removed_outputs}")
    return 0
