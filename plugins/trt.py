"""TensorRT Python-plugin (`tensorrt.plugin`) definitions of the saw_int4 ops.

Nothing here imports TensorRT at module import; `register_plugins()` does, and raises an
ImportError naming the missing package when it cannot. The definitions are thin: every rule
(shapes, dtypes, attributes, argument order, the torch op each plugin runs) lives in
`contract.py`, which is plain Python and unit-tested without TensorRT.

For every op `saw_int4::<name>` this registers
  @trtp.register  shape/type rule (append's output is `pool.aliased()`: the pool is updated in place;
                  the builder needs PreviewFeature.ALIASED_PLUGIN_IO_10_03),
  @trtp.autotune  the supported type/format combinations (activations FP32|FP16|BF16, LINEAR),
  @trtp.impl      the JIT fallback: runs `torch.ops.sawint4.<name>` (Triton kernels on CUDA) on
                  TensorRT's stream,
  @trtp.aot_impl  only when an AOT manifest (`sawint4 aot` output) is given: the precompiled cubin,
                  grid and integer scalars of aot.py (the engine then runs without Python).

NB: no `from __future__ import annotations` here: tensorrt.plugin inspects real annotation objects.
"""

import contextlib
from typing import List, Tuple, Union

from . import aot, contract

MISSING_TENSORRT = (
    "the saw_int4 TensorRT plugins need TensorRT >= 10.9 with its Python plugin module "
    "(`import tensorrt` and `import tensorrt.plugin` must work; the `tensorrt` wheel comes from NVIDIA's "
    "package index, see docs/tensorrt.md)"
)

#: Device the JIT implementations view TensorRT's buffers on (tests swap in 'cpu' with a fake trtp).
DEVICE = "cuda"

_registered: dict[str, object] = {}


def require_tensorrt():
    """(tensorrt, tensorrt.plugin), or ImportError naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"{MISSING_TENSORRT}: missing package `tensorrt` ({e})") from e
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError(f"{MISSING_TENSORRT}: `tensorrt.plugin` does not import ({e}); "
                          f"TensorRT {getattr(trt, '__version__', '?')} is too old or lacks the Python plugin API") from e
    return trt, trtp


def registered() -> dict[str, object]:
    """What register_plugins() registered: {'ops': [...], 'aot_manifest': ...}; empty before."""
    return dict(_registered)


def register_plugins(aot_manifest=None, aot_target: str | None = None) -> None:
    """Register the three saw_int4 plugins with TensorRT (idempotent). With `aot_manifest`
    (a `sawint4 aot` folder or an aot.AotManifest) also register their @trtp.aot_impl, using the
    kernels of `aot_target` (e.g. "sm_90"; default: the only target, or the current GPU's)."""
    trt, trtp = require_tensorrt()
    if _registered:
        if aot_manifest is not None and _registered.get("aot_manifest") is None:
            raise RuntimeError("saw_int4 plugins are already registered without an AOT manifest; "
                               "call register_plugins(aot_manifest=...) before anything else registers them")
        return
    manifest = aot.load_manifest(aot_manifest, aot_target) if aot_manifest is not None else None
    _define(trt, trtp, manifest)
    _registered.update(ops=[op.qualified_name for op in contract.OPS.values()], aot_manifest=manifest)


# ---- helpers shared by the definitions --------------------------------------------------------
def _dtype_names(trt):
    table = {}
    for name, attr in (("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
                       ("int32", "int32"), ("uint8", "uint8")):
        if hasattr(trt, attr):
            table[getattr(trt, attr)] = name
    return table


def _static_shape(desc) -> list:
    """Known dims of a TensorDesc (None where symbolic or not yet known)."""
    dims = []
    for e in desc.shape_expr:
        try:
            dims.append(None if e.is_fake or not e.is_constant else int(e.constant_value()))
        except (RuntimeError, AttributeError):
            dims.append(None)
    return dims


def _check_descs(trt, op, descs, attrs) -> None:
    names = _dtype_names(trt)
    contract.output_dtypes(op, [names.get(d.dtype, str(d.dtype)) for d in descs])
    contract.check_shapes(op, attrs, [_static_shape(d) for d in descs])


def _stream_ctx(stream):
    if DEVICE == "cpu":
        return contextlib.nullcontext()
    import torch

    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


class _RawCudaBuffer:
    """`__cuda_array_interface__` over a raw device pointer (trtp.Tensor refuses BF16 there)."""

    def __init__(self, ptr: int, shape, strides, itemsize: int, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": tuple(int(d) for d in shape), "typestr": typestr, "data": (int(ptr), False), "version": 3,
            "strides": tuple(int(s) * itemsize for s in strides) if strides is not None else None, "stream": None,
        }


def _as_torch(trt, t):
    """A torch view of a trtp.Tensor's buffer (no copy), BF16 included."""
    import torch

    if DEVICE != "cpu" and getattr(t, "dtype", None) == getattr(trt, "bfloat16", object()):
        raw = _RawCudaBuffer(t.data_ptr, tuple(t.shape), t.strides, 2, "<i2")
        return torch.as_tensor(raw, device=DEVICE).view(torch.bfloat16)
    return torch.as_tensor(t, device=DEVICE)


def _run(trt, op, tensors, attrs, outputs, stream) -> None:
    """JIT implementation: view TensorRT's buffers as torch tensors and run the torch op."""
    with _stream_ctx(stream):
        ins = [_as_torch(trt, t) for t in tensors]
        if op is contract.APPEND:
            contract.torch_call(op, ins, attrs)  # writes the pool, which outputs[0] aliases
            return
        out = _as_torch(trt, outputs[0])
        out.copy_(contract.torch_call(op, ins, attrs))


def _combination(trtp, op, manifest):
    """JIT: any activation dtype. AOT: only the one the kernels were compiled for."""
    acts = contract.ACTIVATION_DTYPES
    if manifest is not None:
        acts = (aot.expected_model_attrs(manifest.model)["activation_dtype"],)
    return [trtp.AutoTuneCombination(contract.type_combination(op, acts), "LINEAR")]


# ---- the definitions --------------------------------------------------------------------------
def _define(trt, trtp, manifest) -> None:  # noqa: C901 (one block per op, kept flat on purpose)
    TD, T = trtp.TensorDesc, trtp.Tensor
    A, P, D = contract.APPEND, contract.PREFILL, contract.DECODE

    # append -------------------------------------------------------------------------------------
    @trtp.register(A.qualified_name)
    def append_desc(key: TD, value: TD, slot_mapping: TD, pool: TD, k_matrix: TD, k_bias: TD, v_matrix: TD,
                    num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str, meta_dtype: str,
                    has_k_matrix: int, has_k_bias: int, has_v_matrix: int) -> TD:
        attrs = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, tokens_per_block=tokens_per_block,
                     storage=storage, meta_dtype=meta_dtype, has_k_matrix=has_k_matrix, has_k_bias=has_k_bias,
                     has_v_matrix=has_v_matrix)
        _check_descs(trt, A, (key, value, slot_mapping, pool, k_matrix, k_bias, v_matrix), attrs)
        return pool.aliased()

    @trtp.autotune(A.qualified_name)
    def append_tune(key: TD, value: TD, slot_mapping: TD, pool: TD, k_matrix: TD, k_bias: TD, v_matrix: TD,
                    outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return _combination(trtp, A, manifest)

    @trtp.impl(A.qualified_name)
    def append_impl(key: T, value: T, slot_mapping: T, pool: T, k_matrix: T, k_bias: T, v_matrix: T,
                    num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str, meta_dtype: str,
                    has_k_matrix: int, has_k_bias: int, has_v_matrix: int, outputs: Tuple[T], stream: int) -> None:
        attrs = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, tokens_per_block=tokens_per_block,
                     storage=storage, meta_dtype=meta_dtype, has_k_matrix=has_k_matrix, has_k_bias=has_k_bias,
                     has_v_matrix=has_v_matrix)
        _run(trt, A, (key, value, slot_mapping, pool, k_matrix, k_bias, v_matrix), attrs, outputs, stream)

    # prefill ------------------------------------------------------------------------------------
    @trtp.register(P.qualified_name)
    def prefill_desc(query: TD, pool: TD, block_table: TD, seq_lens: TD, query_start_loc: TD, q_matrix: TD,
                     v_matrix: TD, num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
                     storage: str, meta_dtype: str, scale: float, has_q_matrix: int, has_v_matrix: int) -> TD:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        _check_descs(trt, P, (query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix), attrs)
        return query.like()

    @trtp.autotune(P.qualified_name)
    def prefill_tune(query: TD, pool: TD, block_table: TD, seq_lens: TD, query_start_loc: TD, q_matrix: TD,
                     v_matrix: TD, outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return _combination(trtp, P, manifest)

    @trtp.impl(P.qualified_name)
    def prefill_impl(query: T, pool: T, block_table: T, seq_lens: T, query_start_loc: T, q_matrix: T,
                     v_matrix: T, num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
                     storage: str, meta_dtype: str, scale: float, has_q_matrix: int, has_v_matrix: int,
                     outputs: Tuple[T], stream: int) -> None:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        _run(trt, P, (query, pool, block_table, seq_lens, query_start_loc, q_matrix, v_matrix), attrs, outputs, stream)

    # decode -------------------------------------------------------------------------------------
    @trtp.register(D.qualified_name)
    def decode_desc(query: TD, pool: TD, block_table: TD, seq_lens: TD, q_matrix: TD, v_matrix: TD,
                    num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str,
                    meta_dtype: str, scale: float, has_q_matrix: int, has_v_matrix: int) -> TD:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        _check_descs(trt, D, (query, pool, block_table, seq_lens, q_matrix, v_matrix), attrs)
        return query.like()

    @trtp.autotune(D.qualified_name)
    def decode_tune(query: TD, pool: TD, block_table: TD, seq_lens: TD, q_matrix: TD, v_matrix: TD,
                    outputs: Tuple[TD]) -> List[trtp.AutoTuneCombination]:
        return _combination(trtp, D, manifest)

    @trtp.impl(D.qualified_name)
    def decode_impl(query: T, pool: T, block_table: T, seq_lens: T, q_matrix: T, v_matrix: T, num_heads: int,
                    num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str, meta_dtype: str,
                    scale: float, has_q_matrix: int, has_v_matrix: int, outputs: Tuple[T], stream: int) -> None:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        _run(trt, D, (query, pool, block_table, seq_lens, q_matrix, v_matrix), attrs, outputs, stream)

    if manifest is not None:
        _define_aot(trt, trtp, manifest)


def _define_aot(trt, trtp, manifest) -> None:
    """@trtp.aot_impl for every op; each asks aot.aot_kernel for (name, binary, launch, extra args)."""
    TD = trtp.TensorDesc
    Ret = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    names = _dtype_names(trt)
    A, P, D = contract.APPEND, contract.PREFILL, contract.DECODE

    @trtp.aot_impl(A.qualified_name)
    def append_aot(key: TD, value: TD, slot_mapping: TD, pool: TD, k_matrix: TD, k_bias: TD, v_matrix: TD,
                   num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str, meta_dtype: str,
                   has_k_matrix: int, has_k_bias: int, has_v_matrix: int, outputs: Tuple[TD], tactic: int) -> Ret:
        attrs = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, tokens_per_block=tokens_per_block,
                     storage=storage, meta_dtype=meta_dtype, has_k_matrix=has_k_matrix, has_k_bias=has_k_bias,
                     has_v_matrix=has_v_matrix)
        return aot.aot_kernel(trtp, manifest, A, (key, value, slot_mapping, pool, k_matrix, k_bias, v_matrix),
                              attrs, outputs, tactic, names)

    @trtp.aot_impl(P.qualified_name)
    def prefill_aot(query: TD, pool: TD, block_table: TD, seq_lens: TD, query_start_loc: TD, q_matrix: TD,
                    v_matrix: TD, num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
                    storage: str, meta_dtype: str, scale: float, has_q_matrix: int, has_v_matrix: int,
                    outputs: Tuple[TD], tactic: int) -> Ret:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        return aot.aot_kernel(trtp, manifest, P, (query, pool, block_table, seq_lens, query_start_loc, q_matrix,
                                                  v_matrix), attrs, outputs, tactic, names)

    @trtp.aot_impl(D.qualified_name)
    def decode_aot(query: TD, pool: TD, block_table: TD, seq_lens: TD, q_matrix: TD, v_matrix: TD,
                   num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int, storage: str,
                   meta_dtype: str, scale: float, has_q_matrix: int, has_v_matrix: int, outputs: Tuple[TD],
                   tactic: int) -> Ret:
        attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     tokens_per_block=tokens_per_block, storage=storage, meta_dtype=meta_dtype, scale=scale,
                     has_q_matrix=has_q_matrix, has_v_matrix=has_v_matrix)
        return aot.aot_kernel(trtp, manifest, D, (query, pool, block_table, seq_lens, q_matrix, v_matrix), attrs,
                              outputs, tactic, names)
