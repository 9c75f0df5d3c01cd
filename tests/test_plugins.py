"""The saw_int4 plugin contract and the TensorRT plugin definitions, without TensorRT.

TensorRT cannot be installed here, so the `tensorrt.plugin` definitions run against a small fake
of the API that enforces the signature rules the real one documents (TensorDescs first, annotated
attributes of serializable types, impl = tensors + attributes + outputs + stream, autotune =
tensors + outputs, aot_impl = tensors + attributes + outputs + tactic). The JIT implementations
then run for real on CPU tensors and are compared with the torch ops.
"""

from __future__ import annotations

import inspect
import json
import sys
import types
import typing

import pytest
import torch

from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.ops import reference
from trtllm_sawint4.plugins import aot, contract
from trtllm_sawint4.plugins import trt as trt_defs


# ---- contract ------------------------------------------------------------------------------------
def fmt(**kw):
    a = dict(num_kv_heads=2, head_dim=32, tokens_per_block=16, storage="int4", meta_dtype="fp16")
    a.update(kw)
    return a


def append_attrs(**kw):
    a = dict(fmt(), has_k_matrix=1, has_k_bias=0, has_v_matrix=0)
    a.update(kw)
    return a


def attn_attrs(**kw):
    a = dict(fmt(), num_heads=4, scale=32 ** -0.5, has_q_matrix=1, has_v_matrix=0)
    a.update(kw)
    return a


def test_ops_map_one_to_one_onto_torch_ops():
    assert sorted(contract.OPS) == ["append", "decode", "prefill"]
    for name, op in contract.OPS.items():
        assert hasattr(torch.ops.sawint4, name)
        assert op.qualified_name == f"saw_int4::{name}"
    assert contract.APPEND.aliases == {0: 3} and contract.APPEND.input_names[3] == "pool"
    assert contract.APPEND.input_names[:4] == ["key", "value", "slot_mapping", "pool"]
    assert contract.PREFILL.input_names == ["query", "pool", "block_table", "seq_lens", "query_start_loc",
                                            "q_matrix", "v_matrix"]
    assert contract.DECODE.input_names == ["query", "pool", "block_table", "seq_lens", "q_matrix", "v_matrix"]
    for op in contract.OPS.values():  # TensorRT: only int/float/str attributes, none named like a reserved arg
        assert all(a.type in (int, float, str) for a in op.attrs)
        assert not {"outputs", "stream", "tactic"} & set(op.attr_names)


@pytest.mark.parametrize("change, match", [
    (dict(storage="int3"), "storage"),
    (dict(meta_dtype="bf16"), "meta_dtype"),
    (dict(head_dim=48), "head_dim"),
    (dict(tokens_per_block=12), "tokens_per_block"),
    (dict(num_heads=5), "num_heads"),
    (dict(scale=0.0), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(has_q_matrix=2), "has_q_matrix"),
    (dict(storage="bf16"), "has_q_matrix.*bf16"),
    (dict(num_heads="4"), "num_heads.*int"),
])
def test_attribute_validation(change, match):
    with pytest.raises(contract.ContractError, match=match):
        contract.validate_attrs("prefill", attn_attrs(**change))


def test_attribute_presence_and_normalisation():
    with pytest.raises(contract.ContractError, match="missing"):
        contract.validate_attrs("append", fmt())
    with pytest.raises(contract.ContractError, match="unknown attribute"):
        contract.validate_attrs("append", append_attrs(scale=1.0))
    a = contract.validate_attrs("prefill", attn_attrs(storage=b"int4", scale=1))
    assert a["storage"] == "int4" and isinstance(a["scale"], float)
    assert list(a) == contract.PREFILL.attr_names
    with pytest.raises(contract.ContractError, match="unknown saw_int4 op"):
        contract.op_def("attention")


def test_region_bytes_match_the_spec():
    for kv_format, meta in (("bf16", "fp16"), ("int8", "fp32"), ("int4", "fp16"), ("saw_int4", "fp16")):
        spec = KVCacheSpec(head_dim=64, num_kv_heads=3, tokens_per_block=32, kv_format=kv_format, metadata_dtype=meta)
        a = fmt(head_dim=64, num_kv_heads=3, tokens_per_block=32, storage=spec.storage, meta_dtype=meta)
        assert contract.region_bytes(a) == spec.region_bytes


def test_dtype_rules():
    f32, i32, u8 = "float32", "int32", "uint8"
    assert contract.output_dtypes("append", ["float16", "float16", i32, u8, f32, f32, f32]) == [u8]
    assert contract.output_dtypes("prefill", ["bfloat16", u8, i32, i32, i32, f32, f32]) == ["bfloat16"]
    assert contract.output_dtypes("decode", [f32, u8, i32, i32, f32, f32]) == [f32]
    with pytest.raises(contract.ContractError, match="value must have the dtype"):
        contract.output_dtypes("append", ["float16", "float32", i32, u8, f32, f32, f32])
    with pytest.raises(contract.ContractError, match="slot_mapping must be int32"):
        contract.output_dtypes("append", [f32, f32, "int64", u8, f32, f32, f32])
    with pytest.raises(contract.ContractError, match="pool must be uint8"):
        contract.output_dtypes("decode", [f32, "int8", i32, i32, f32, f32])
    with pytest.raises(contract.ContractError, match="query must be one of"):
        contract.output_dtypes("decode", ["int32", u8, i32, i32, f32, f32])
    with pytest.raises(contract.ContractError, match="takes 6 inputs"):
        contract.output_dtypes("decode", [f32])


def test_type_combination_subset():
    assert contract.type_combination("decode", ["bfloat16"]).startswith("BF16, UINT8")
    with pytest.raises(contract.ContractError, match="subset"):
        contract.type_combination("decode", ["int8"])


def test_type_combination_strings():
    assert contract.type_combination("append") == \
        "FP32|FP16|BF16, FP32|FP16|BF16, INT32, UINT8, FP32, FP32, FP32, UINT8"
    assert contract.type_combination("decode") == "FP32|FP16|BF16, UINT8, INT32, INT32, FP32, FP32, FP32|FP16|BF16"


def _append_shapes(n=5, nb=7, h=2, d=32, r=320):
    return [(n, h, d), (n, h, d), (n,), (nb, 2, h, r), (h, d, d), (h, d), (d, d)]


def test_shape_rules():
    a = append_attrs()
    assert contract.output_shapes("append", a, _append_shapes()) == [(7, 2, 2, 320)]
    assert contract.output_shapes("append", a, [[None, 2, 32]] * 2 + [[None], [None, 2, 2, 320],
                                                                        (2, 32, 32), (2, 32), (32, 32)])
    with pytest.raises(contract.ContractError, match=r"pool dim 3 \(REGION\) must be 320"):
        contract.check_shapes("append", a, _append_shapes(r=256))
    with pytest.raises(contract.ContractError, match=r"key dim 1 \(H\) must be 2"):
        contract.check_shapes("append", a, _append_shapes(h=3))
    bad = _append_shapes()
    bad[2] = (4,)
    with pytest.raises(contract.ContractError, match=r"slot_mapping dim 0 \(N\) disagrees with key"):
        contract.check_shapes("append", a, bad)
    with pytest.raises(contract.ContractError, match="rank 3"):
        contract.check_shapes("append", a, [(5, 64)] + _append_shapes()[1:])
    p = attn_attrs()
    ok = [(9, 4, 32), (7, 2, 2, 320), (3, 4), (3,), (4,), (2, 32, 32), (32, 32)]
    assert contract.output_shapes("prefill", p, ok) == [(9, 4, 32)]
    with pytest.raises(contract.ContractError, match=r"query_start_loc dim 0 \(B1\) disagrees"):
        contract.check_shapes("prefill", p, ok[:4] + [(3,)] + ok[5:])
    with pytest.raises(contract.ContractError, match=r"query dim 1 \(HQ\) must be 4"):
        contract.check_shapes("prefill", p, [(9, 2, 32)] + ok[1:])
    d = [(3, 4, 32), (7, 2, 2, 320), (3, 4), (3,), (2, 32, 32), (32, 32)]
    assert contract.output_shapes("decode", p, d) == [(3, 4, 32)]
    with pytest.raises(contract.ContractError, match=r"block_table dim 0 \(B\) disagrees"):
        contract.check_shapes("decode", p, [(2, 4, 32)] + d[1:])


def test_onnx_node_attrs():
    a = contract.onnx_node_attrs("append", append_attrs(), aot=True)
    assert a["plugin_namespace"] == "saw_int4" and a["plugin_version"] == "1" and a["aot"] == 1
    assert a["storage"] == "int4"


# ---- the torch op each plugin runs -----------------------------------------------------------------
def _case(kv_format="saw_int4", n=6, hq=4):
    spec = KVCacheSpec(head_dim=32, num_kv_heads=2, tokens_per_block=16, kv_format=kv_format,
                       rotate_v=kv_format == "saw_int4")
    tf = build_layer_transform(spec)
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8)
    key, value = torch.randn(n, 2, 32), torch.randn(n, 2, 32)
    slots = torch.arange(16, 16 + n, dtype=torch.int32)  # block 1
    eye = torch.eye(32)
    ins = [key, value, slots, pool,
           tf.k_matrix if tf.k_matrix is not None else eye.expand(2, 32, 32).contiguous(),
           torch.zeros(2, 32), tf.v_matrix if tf.v_matrix is not None else eye]
    attrs = dict(num_kv_heads=2, head_dim=32, tokens_per_block=16, storage=spec.storage, meta_dtype="fp16",
                 has_k_matrix=int(tf.k_matrix is not None), has_k_bias=0, has_v_matrix=int(tf.v_matrix is not None))
    return spec, tf, ins, attrs


@pytest.mark.parametrize("kv_format", ["bf16", "int4", "saw_int4"])
def test_torch_call_matches_reference(kv_format):
    spec, tf, ins, attrs = _case(kv_format)
    expected = ins[3].clone()
    reference.append(expected, ins[0], ins[1], ins[2], tf.k_matrix, None, tf.v_matrix, spec.storage, "fp16")
    out = contract.torch_call("append", ins, attrs)
    assert out is ins[3] and torch.equal(out, expected)  # in place

    q = torch.randn(6, 4, 32)
    table, lens, qsl = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([22], dtype=torch.int32), \
        torch.tensor([0, 6], dtype=torch.int32)
    eye = torch.eye(32)
    qm = tf.q_matrix if tf.q_matrix is not None else eye.expand(2, 32, 32)
    vm = tf.v_matrix if tf.v_matrix is not None else eye
    pattrs = dict(num_heads=4, num_kv_heads=2, head_dim=32, tokens_per_block=16, storage=spec.storage,
                  meta_dtype="fp16", scale=32 ** -0.5, has_q_matrix=int(tf.q_matrix is not None),
                  has_v_matrix=int(tf.v_matrix is not None))
    got = contract.torch_call("prefill", [q, out, table, lens, qsl, qm, vm], pattrs)
    want = reference.prefill(q, out, table, lens, qsl, tf.q_matrix, tf.v_matrix, 32 ** -0.5, spec.storage, "fp16")
    torch.testing.assert_close(got, want)
    got = contract.torch_call("decode", [q[:1], out, table, lens, qm, vm], pattrs)
    want = reference.decode(q[:1], out, table, lens, tf.q_matrix, tf.v_matrix, 32 ** -0.5, spec.storage, "fp16")
    torch.testing.assert_close(got, want)


# ---- a fake tensorrt / tensorrt.plugin -------------------------------------------------------------
class _DType:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"DataType.{self.name}"


class _Expr:
    """Stands in for trtp.ShapeExpr: arithmetic on known values (None stays unknown)."""

    def __init__(self, value):
        self.value, self.is_fake = value, False

    @property
    def is_constant(self):
        return self.value is not None

    def constant_value(self):
        return self.value

    def _op(self, other, fn):
        o = other.value if isinstance(other, _Expr) else other
        return _Expr(None if self.value is None or o is None else fn(self.value, o))

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b)

    __radd__, __rmul__ = __add__, __mul__


def _val(x):
    return x.value if isinstance(x, _Expr) else x


def _fake_tensorrt():
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "fake"
    for name in ("float32", "float16", "bfloat16", "int32", "uint8", "int64"):
        setattr(trt, name, _DType(name))
    trtp = types.ModuleType("tensorrt.plugin")
    registry = {"register": {}, "impl": {}, "autotune": {}, "aot_impl": {}}

    class TensorDesc:
        def __init__(self, shape=(), dtype=None):
            self.shape_expr = [_Expr(s) for s in shape]
            self.dtype, self.aliased_to = dtype, None

        def like(self):
            d = TensorDesc(dtype=self.dtype)
            d.shape_expr = list(self.shape_expr)
            return d

        def aliased(self):
            d = self.like()
            d.aliased_to = self
            return d

    class Tensor:
        pass

    class AutoTuneCombination:
        def __init__(self, io_types=None, layouts=None, tactics=None):
            self.io_types, self.layouts, self.tactics = io_types, layouts, tactics

    class KernelLaunchParams:
        pass

    class SymExprs:
        pass

    class SymInt32:
        def __init__(self, expr):
            self.expr = expr

    class SymIntExprs(SymExprs):
        @classmethod
        def from_tuple(cls, items):
            assert all(isinstance(i, SymInt32) for i in items)
            inst = cls()
            inst.items = list(items)
            return inst

    def _sym(fn):
        return lambda a, b: _Expr(None if _val(a) is None or _val(b) is None else fn(_val(a), _val(b)))

    serializable = (int, float, str, bool, bytes)

    def register(name):
        def deco(fn):
            sig = inspect.signature(fn)
            tensors, attrs, seen_attr = [], [], False
            for p in sig.parameters.values():
                assert p.annotation is not inspect.Parameter.empty, f"{name}: {p.name} not annotated"
                assert p.default is inspect.Parameter.empty, f"{name}: {p.name} has a default"
                if p.annotation is TensorDesc:
                    assert not seen_attr, f"{name}: tensors and attributes interspersed"
                    tensors.append(p.name)
                else:
                    assert p.annotation in serializable, f"{name}: {p.name} type {p.annotation}"
                    assert p.name not in ("outputs", "stream", "tactic")
                    attrs.append(p.name)
                    seen_attr = True
            assert sig.return_annotation is TensorDesc or typing.get_origin(sig.return_annotation) is tuple
            ns, op = name.split("::")
            assert ns and "." not in ns and ns not in ("", "trt", "tensorrt", "std")
            registry["register"][name] = (fn, tensors, attrs)
            return fn
        return deco

    def _follower(kind, tail):
        def decorator(name):
            def deco(fn):
                _, tensors, attrs = registry["register"][name]
                sig = inspect.signature(fn)
                params = list(sig.parameters)
                used = [a for a in attrs if a in params]
                assert params == tensors + used + tail, f"{kind} {name}: {params}"
                if kind == "aot_impl":  # the return annotation is mandatory there
                    args = typing.get_args(sig.return_annotation)
                    assert typing.get_origin(sig.return_annotation) is tuple and len(args) == 4
                    assert args[2] is KernelLaunchParams and issubclass(args[3], SymExprs)
                registry[kind][name] = fn
                return fn
            return deco
        return decorator

    trtp.TensorDesc, trtp.Tensor, trtp.AutoTuneCombination = TensorDesc, Tensor, AutoTuneCombination
    trtp.KernelLaunchParams, trtp.SymIntExprs, trtp.SymInt32 = KernelLaunchParams, SymIntExprs, SymInt32
    trtp.cdiv, trtp.min, trtp.max = _sym(lambda a, b: -(-a // b)), _sym(min), _sym(max)
    trtp.register = register
    trtp.impl = _follower("impl", ["outputs", "stream"])
    trtp.autotune = _follower("autotune", ["outputs"])
    trtp.aot_impl = _follower("aot_impl", ["outputs", "tactic"])
    trt.plugin = trtp
    return trt, trtp, registry


@pytest.fixture
def fake_trt(monkeypatch):
    trt, trtp, registry = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_defs, "_registered", {})
    monkeypatch.setattr(trt_defs, "DEVICE", "cpu")
    return trt, trtp, registry


def test_missing_tensorrt_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(trt_defs, "_registered", {})
    with pytest.raises(ImportError, match=r"need TensorRT >= 10\.9.*missing package `tensorrt`"):
        trt_defs.register_plugins()
    import trtllm_sawint4.plugins  # noqa: F401  (importing never needs TensorRT)


def test_registers_every_op(fake_trt):
    trt, trtp, registry = fake_trt
    trt_defs.register_plugins()
    names = {op.qualified_name for op in contract.OPS.values()}
    assert set(registry["register"]) == set(registry["impl"]) == set(registry["autotune"]) == names
    assert registry["aot_impl"] == {}
    for name, (fn, tensors, attrs) in registry["register"].items():
        op = contract.op_def(name.split("::")[1])
        assert tensors == op.input_names and attrs == op.attr_names  # argument order is the contract's
    trt_defs.register_plugins()  # idempotent
    assert trt_defs.registered()["ops"] == sorted(names, key=["saw_int4::append", "saw_int4::prefill",
                                                                "saw_int4::decode"].index)


def _descs(trt, trtp, shapes, dtypes):
    return [trtp.TensorDesc(s, getattr(trt, d)) for s, d in zip(shapes, dtypes)]


def test_register_rules_through_the_fake(fake_trt):
    trt, trtp, registry = fake_trt
    trt_defs.register_plugins()
    fn = registry["register"]["saw_int4::append"][0]
    descs = _descs(trt, trtp, _append_shapes(n=None), ["float16", "float16", "int32", "uint8"] + ["float32"] * 3)
    out = fn(*descs, **append_attrs())
    assert out.aliased_to is descs[3]  # the pool is updated in place
    bad = _descs(trt, trtp, _append_shapes(r=100), ["float16", "float16", "int32", "uint8"] + ["float32"] * 3)
    with pytest.raises(contract.ContractError, match="pool dim 3"):
        fn(*bad, **append_attrs())
    bad = _descs(trt, trtp, _append_shapes(), ["float16", "float16", "int64", "uint8"] + ["float32"] * 3)
    with pytest.raises(contract.ContractError, match="slot_mapping must be int32"):
        fn(*bad, **append_attrs())
    fn = registry["register"]["saw_int4::prefill"][0]
    q = _descs(trt, trtp, [(None, 4, 32), (None, 2, 2, 320), (None, None), (None,), (None,), (2, 32, 32), (32, 32)],
               ["bfloat16", "uint8", "int32", "int32", "int32", "float32", "float32"])
    out = fn(*q, **attn_attrs())
    assert out.dtype is trt.bfloat16 and out.aliased_to is None
    tune = registry["autotune"]["saw_int4::prefill"](*q, outputs=(out,))
    assert [c.io_types for c in tune] == [contract.type_combination("prefill")] and tune[0].layouts == "LINEAR"


def test_jit_impl_runs_the_torch_ops(fake_trt):
    trt, trtp, registry = fake_trt
    trt_defs.register_plugins()
    spec, tf, ins, attrs = _case("saw_int4")
    expected = ins[3].clone()
    reference.append(expected, ins[0], ins[1], ins[2], tf.k_matrix, None, tf.v_matrix, "int4", "fp16")
    registry["impl"]["saw_int4::append"](*ins, **attrs, outputs=(ins[3],), stream=0)
    assert torch.equal(ins[3], expected)

    pool = ins[3]
    q = torch.randn(6, 4, 32)
    table, lens, qsl = (torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([22], dtype=torch.int32),
                        torch.tensor([0, 6], dtype=torch.int32))
    pattrs = attn_attrs(has_v_matrix=1)
    out = torch.empty_like(q)
    registry["impl"]["saw_int4::prefill"](q, pool, table, lens, qsl, tf.q_matrix, tf.v_matrix, **pattrs,
                                          outputs=(out,), stream=0)
    torch.testing.assert_close(out, reference.prefill(q, pool, table, lens, qsl, tf.q_matrix, tf.v_matrix,
                                                      32 ** -0.5, "int4", "fp16"))
    out = torch.empty_like(q[:1])
    registry["impl"]["saw_int4::decode"](q[:1], pool, table, lens, tf.q_matrix, tf.v_matrix, **pattrs,
                                         outputs=(out,), stream=0)
    torch.testing.assert_close(out, reference.decode(q[:1], pool, table, lens, tf.q_matrix, tf.v_matrix,
                                                     32 ** -0.5, "int4", "fp16"))


MODEL = dict(head_dim=32, num_heads=4, num_kv_heads=2, tokens_per_block=16, kv_format="saw_int4", rotate_v=False,
             calibrated=False, query_dtype="fp16", scale=32 ** -0.5)


def _synthetic_manifest(folder, **model_changes):
    """A manifest in the `sawint4 aot` format (build_scripts/aot.py), with stand-in cubins."""
    folder.mkdir(parents=True, exist_ok=True)

    def inputs(op, act="*fp16"):
        types = {"key": act, "value": act, "query": act, "slot_mapping": "*i32", "pool": "*u8", "block_table": "*i32",
                 "seq_lens": "*i32", "query_start_loc": "*i32"}
        return [dict(name=n, kind="input", type=types.get(n, "*fp32")) for n in contract.op_def(op).input_names]

    scalars = {"append": [("num_tokens", "key.shape[0]")], "decode": [("max_blocks", "block_table.shape[1]")],
               "prefill": [("num_seqs", "block_table.shape[0]"), ("max_blocks", "block_table.shape[1]")]}
    grids = {"append": ["cdiv(key.shape[0], 64)", "2", "1"], "decode": ["query.shape[0]", "2", "1"],
             "prefill": ["cdiv(query.shape[0], 16) + block_table.shape[0]", "4", "1"]}
    kernels = []
    for op in ("append", "decode", "prefill"):
        (folder / f"{op}.sm_90.cubin").write_bytes(b"\x7fELF" + op.encode())
        out = dict(name="pool_out", kind="output", type="*u8", alias="pool") if op == "append" else \
            dict(name="out", kind="output", type="*fp16", shape=["query.shape[0]", "query.shape[1]", "query.shape[2]"])
        kernels.append(dict(op=op, target="sm_90", kernel_name=f"{op}_aot", cubin=f"{op}.sm_90.cubin",
                            params=inputs(op) + [dict(name=n, kind="scalar", type="i32", value=v) for n, v in scalars[op]]
                            + [out], grid=grids[op], block=[128, 1, 1], shared_bytes=4096, trailing_scratch_params=0,
                            limits={"block_table.shape[0]": 256} if op == "prefill" else {}))
    model = dict(MODEL, **model_changes)
    (folder / "manifest.json").write_text(json.dumps({"format": aot.MANIFEST_FORMAT, "model": model, "kernels": kernels}))
    return folder


def _aot_descs(trt, trtp, op, act="float16", n=5, b=3):
    shapes = {"append": _append_shapes(n=n), "decode": [(b, 4, 32), (7, 2, 2, 320), (b, 6), (b,), (2, 32, 32), (32, 32)],
              "prefill": [(n, 4, 32), (7, 2, 2, 320), (b, 6), (b,), (b + 1,), (2, 32, 32), (32, 32)]}[op]
    op_def = contract.op_def(op)
    dtypes = [act if t.dtype == "act" else t.dtype for t in op_def.inputs]
    return _descs(trt, trtp, shapes, dtypes)


def _node_attrs(op):
    return append_attrs() if op == "append" else attn_attrs()


def test_aot_impl_from_a_manifest(fake_trt, tmp_path):
    trt, trtp, registry = fake_trt
    folder = _synthetic_manifest(tmp_path / "aot")
    trt_defs.register_plugins(aot_manifest=folder)
    assert set(registry["aot_impl"]) == {op.qualified_name for op in contract.OPS.values()}
    expect = {"append": ([5], (1, 2, 1)), "decode": ([6], (3, 2, 1)), "prefill": ([3, 6], (4, 4, 1))}
    for op in ("append", "decode", "prefill"):
        descs = _aot_descs(trt, trtp, op)
        name, cubin, launch, extra = registry["aot_impl"][f"saw_int4::{op}"](
            *descs, **_node_attrs(op), outputs=(descs[0].like(),), tactic=0)
        assert name == f"{op}_aot" and cubin == b"\x7fELF" + op.encode()
        assert [_val(s.expr) for s in extra.items] == expect[op][0]
        assert tuple(_val(g) for g in (launch.grid_x, launch.grid_y, launch.grid_z)) == expect[op][1]
        assert (launch.block_x, launch.shared_mem) == (128, 4096)
        tune = registry["autotune"][f"saw_int4::{op}"](*descs, outputs=(descs[0],))
        assert "FP16" in tune[0].io_types and "FP32|" not in tune[0].io_types and "BF16" not in tune[0].io_types


@pytest.mark.parametrize("change, match", [
    (dict(head_dim=64), "head_dim=32.*compiled for 64"),
    (dict(scale=0.5), "scale"),
    (dict(kv_format="int8"), "storage='int4'.*'int8'"),
    (dict(query_dtype="bf16"), "query is float16 but the kernel takes"),
])
def test_aot_refuses_a_kernel_compiled_for_another_model(fake_trt, tmp_path, change, match):
    trt, trtp, registry = fake_trt
    folder = _synthetic_manifest(tmp_path / "aot", **change)
    if "query_dtype" in change:  # the kernels' pointer types follow the model's dtype
        m = json.loads((folder / "manifest.json").read_text())
        for k in m["kernels"]:
            for p in k["params"]:
                p["type"] = p["type"].replace("fp16", "bf16")
        (folder / "manifest.json").write_text(json.dumps(m))
    trt_defs.register_plugins(aot_manifest=folder)
    descs = _aot_descs(trt, trtp, "prefill")
    with pytest.raises(aot.AotError, match=match):
        registry["aot_impl"]["saw_int4::prefill"](*descs, **attn_attrs(), outputs=(descs[0],), tactic=0)


def test_aot_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sawint4 aot"):
        aot.load_manifest(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{}")
    with pytest.raises(aot.AotError, match="not a sawint4-aot/1"):
        aot.load_manifest(tmp_path / "bad")
    m = aot.load_manifest(_synthetic_manifest(tmp_path / "ok") / "manifest.json")  # the file works too
    assert m.targets() == ["sm_90"] and m.entry("decode")["kernel_name"] == "decode_aot"
    with pytest.raises(aot.AotError, match="no 'decode' kernel for target sm_80"):
        aot.load_manifest(tmp_path / "ok", target="sm_80").entry("decode")
    assert aot.check_limits(m, {"prefill": {"block_table": (64, 8)}}) == []
    assert "can reach 300" in aot.check_limits(m, {"prefill": {"block_table": (300, 8)}})[0]


def test_aot_impl_with_real_artifacts(fake_trt, tmp_path):
    """The `sawint4 aot` output itself (compiled on this CPU machine) drives the aot_impls."""
    pytest.importorskip("triton")
    from helpers import run_sawint4

    out = tmp_path / "aot"
    run_sawint4("aot", "--out", str(out), "--targets", "sm_90", "--head-dim", "32", "--num-heads", "4",
                "--num-kv-heads", "2", "--tokens-per-block", "16", "--query-dtype", "fp16", cwd=tmp_path)
    trt, trtp, registry = fake_trt
    trt_defs.register_plugins(aot_manifest=out)
    for op in ("append", "decode", "prefill"):
        descs = _aot_descs(trt, trtp, op)
        name, cubin, launch, extra = registry["aot_impl"][f"saw_int4::{op}"](
            *descs, **_node_attrs(op), outputs=(descs[0].like(),), tactic=0)
        assert cubin[:4] == b"\x7fELF" and isinstance(name, str) and name
        assert all(_val(g) >= 1 for g in (launch.grid_x, launch.grid_y, launch.grid_z))
        assert launch.block_x % 32 == 0


def test_bf16_buffers_bypass_trtp_cuda_array_interface():
    """trtp.Tensor refuses BF16 in __cuda_array_interface__; the JIT impls wrap the raw pointer as int16."""
    raw = trt_defs._RawCudaBuffer(1234, (3, 4, 32), (128, 32, 1), 2, "<i2")
    cai = raw.__cuda_array_interface__
    assert cai["data"] == (1234, False) and cai["shape"] == (3, 4, 32) and cai["strides"] == (256, 64, 2)
    assert cai["typestr"] == "<i2" and cai["version"] == 3
