"""The AutoDeploy descriptor and resource handler of the saw_int4 backends.

AutoDeploy's ``insert_cached_attention`` transform finds every ``auto_deploy::torch_attention`` node of
the exported model and, for the configured backend, asks its descriptor for the cache resources
(`get_cache_initializers`), the constants (`get_constants`) and the ops, then inserts

    cached_op(*qkv, *standard_metadata, *extra_metadata, *caches, *constants)

positionally; the lists below fix that order and must match the signature in `ops` (a test checks it).

The classes subclass TensorRT-LLM's own ``AttentionDescriptor`` and ``ResourceHandler``, so they exist
only where TensorRT-LLM imports: `make_backends` creates them from its ``attention_interface`` module.
Everything they decide is in the plain functions here, tested without TensorRT-LLM.

What a backend refuses, with an error at transform time rather than a silently different model:
attention masks, dropout, non-causal attention, attention sinks, logit soft-capping, a value head_dim
different from the key's, a kv_cache_config.dtype other than 'auto' (the backend name picks the
format), and sliding windows while ``torch.ops.sawint4`` lacks its ``window`` argument.
"""

from __future__ import annotations

from typing import Any

import torch

from ...spec import KVCacheSpec
from . import ops
from .resources import PoolSizing

#: Inputs of the cached-attention op after q, k, v, in AutoDeploy's insertion order.
STANDARD_METADATA_ARGS = ["batch_info_host", "cu_seqlen", "cu_num_pages", "cache_loc", "seq_len_with_cache"]
EXTRA_METADATA_OUTPUTS = ["token_seq", "token_pos"]  # of sawint4::trtllm_prepare_metadata
CACHE_NAMES = ["kv_pool"]
CONSTANT_NAMES = ["scale", "kv_format", "rotation_block", "rotate_v", "sign_seed", "metadata_dtype", "sliding_window"]

LAYOUT = "bsnd"


def source_args(node) -> dict[str, Any]:
    """Arguments of a torch_attention node by name (positional and keyword, defaults filled in)."""
    target = node.target
    schema = getattr(target, "_schema", None) or target.default._schema
    values = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
    names = [a.name for a in schema.arguments]
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


def _shape(name: str, arg) -> tuple[int, ...]:
    val = getattr(arg, "meta", {}).get("val")
    if val is None or not hasattr(val, "shape"):
        raise ValueError(f"torch_attention {name}: the node carries no shape (meta['val']); run shape propagation")
    return tuple(int(x) for x in val.shape)


def spec_for_source_node(node, kv_format: str, tokens_per_block: int, backend: str = "saw_int4") -> KVCacheSpec:
    """The pool format of one attention layer: heads and head_dim from the node, T from kv_cache_config."""
    a = source_args(node)
    if a.get("layout") != LAYOUT:
        raise ValueError(f"{backend}: torch_attention layout must be {LAYOUT!r} (the backend's layout), got "
                         f"{a.get('layout')!r}")
    qs, ks, vs = _shape("query", a["query"]), _shape("key", a["key"]), _shape("value", a["value"])
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        raise ValueError(f"{backend}: q, k, v must be 4-D 'bsnd' tensors, got {qs}, {ks}, {vs}")
    hq, hkv, d = qs[2], ks[2], ks[3]
    if vs[3] != d or qs[3] != d:
        raise NotImplementedError(f"{backend}: q, k and v must share head_dim (got {qs[3]}, {d}, {vs[3]})")
    if hq % hkv:
        raise ValueError(f"{backend}: {hq} query heads are not a multiple of {hkv} KV heads")
    try:
        return KVCacheSpec(head_dim=d, num_kv_heads=hkv, tokens_per_block=tokens_per_block, kv_format=kv_format)
    except ValueError as e:
        raise ValueError(f"{backend}: {e} (head_dim comes from the model, tokens_per_block from "
                         f"kv_cache_config.tokens_per_block)") from None


def constants_for_source_node(node, spec: KVCacheSpec, backend: str = "saw_int4") -> list:
    """The cached op's constants (CONSTANT_NAMES order); refuses what the backend would compute differently."""
    a = source_args(node)
    if a.get("attn_mask") is not None:
        raise NotImplementedError(f"{backend}: attention with an explicit attn_mask is not supported (causal only)")
    if a.get("dropout_p") not in (None, 0, 0.0):
        raise NotImplementedError(f"{backend}: dropout_p={a['dropout_p']} is not supported")
    if not a.get("is_causal"):
        raise NotImplementedError(f"{backend}: non-causal attention is not supported (the paged ops are causal)")
    if a.get("sinks") is not None:
        raise NotImplementedError(f"{backend}: attention sinks are not supported")
    cap = a.get("logit_cap")
    if cap is not None and cap > 0:
        raise NotImplementedError(f"{backend}: logit soft-capping (logit_cap={cap}) is not supported")
    scale = a.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
        raise ValueError(f"{backend}: torch_attention scale must be a positive constant or None, got {scale!r}")
    window = a.get("sliding_window")
    window = int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    if window is not None and not ops.supports_sliding_window():
        raise NotImplementedError(f"{backend}: sliding_window={window} needs torch.ops.sawint4 ops with a window "
                                  "argument; this installation has none")
    return op_constants(spec, None if scale is None else float(scale), window)


def op_constants(spec: KVCacheSpec, scale: float | None = None, sliding_window: int | None = None) -> list:
    """The cached op's constants for a pool of `spec` (CONSTANT_NAMES order)."""
    return [scale, spec.kv_format, spec.rotation_block or 0, spec.rotate_v, spec.sign_seed, spec.metadata_dtype,
            sliding_window]


def check_cache_dtype(cache_config, backend: str) -> None:
    dtype = getattr(cache_config, "dtype", "auto")
    if dtype not in (None, "auto"):
        raise ValueError(f"kv_cache_config.dtype={dtype!r}: the {backend} backend stores its own format; leave the "
                         f"dtype 'auto' and pick the format by the backend name")


def check_tokens_per_block(spec: KVCacheSpec, tokens_per_block: int) -> None:
    if tokens_per_block != spec.tokens_per_block:
        raise ValueError(f"sequence_info.tokens_per_block={tokens_per_block} but the pool was planned with "
                         f"tokens_per_block={spec.tokens_per_block} (kv_cache_config.tokens_per_block)")


def make_backends(attention_interface) -> dict[str, type]:
    """Backend name -> descriptor class, subclassing the given TensorRT-LLM attention_interface module's
    AttentionDescriptor (and its ResourceHandler for the pool)."""
    from . import BACKENDS

    ai = attention_interface

    class SawInt4PoolHandler(ai.ResourceHandler):
        """One layer's uint8 pool, indexed by AutoDeploy's page ids (cache_loc)."""

        def __init__(self, spec: KVCacheSpec):
            self.spec = spec
            self.sizing = PoolSizing(spec)

        @property
        def is_paged(self) -> bool:
            return True

        def _get_bytes_per_token(self) -> int:
            return self.sizing.bytes_per_token

        def allocate(self, sequence_info) -> torch.Tensor:
            check_tokens_per_block(self.spec, int(sequence_info.tokens_per_block))
            device = sequence_info.device
            ops.layer_transform(self.spec, device)  # before any CUDA-graph capture
            return torch.zeros(self.sizing.pool_shape(int(sequence_info.num_blocks)), dtype=torch.uint8,
                               device=device)

        def __repr__(self) -> str:
            return f"SawInt4PoolHandler({self.spec.describe()}, {self.bytes_per_token} B/token)"

    def descriptor(name: str, kv_format: str) -> type:
        class Descriptor(ai.AttentionDescriptor):
            SAWINT4_BACKEND = name
            KV_FORMAT = kv_format
            PoolHandler = SawInt4PoolHandler

            @classmethod
            def get_attention_layout(cls):
                return LAYOUT

            @classmethod
            def get_num_qkv_args(cls) -> int:
                return 3

            @classmethod
            def get_source_attention_op(cls):
                return torch.ops.auto_deploy.torch_attention

            @classmethod
            def get_cached_attention_op(cls):
                return torch.ops.sawint4.trtllm_mha_with_cache.default

            @classmethod
            def get_standard_metadata_args(cls) -> list[str]:
                return list(STANDARD_METADATA_ARGS)

            @classmethod
            def get_prepare_extra_metadata_info(cls, any_source_attn_node):
                return torch.ops.sawint4.trtllm_prepare_metadata.default, len(EXTRA_METADATA_OUTPUTS), []

            @classmethod
            def get_cache_initializers(cls, source_attn_node, cache_config):
                check_cache_dtype(cache_config, name)
                spec = spec_for_source_node(source_attn_node, kv_format, int(cache_config.tokens_per_block), name)
                return {CACHE_NAMES[0]: SawInt4PoolHandler(spec)}

            @classmethod
            def get_constants(cls, source_attn_node) -> list:
                # tokens_per_block does not enter the constants; any valid value builds the spec
                spec = spec_for_source_node(source_attn_node, kv_format, 64, name)
                return constants_for_source_node(source_attn_node, spec, name)

            @classmethod
            def kernel_handles_cyclic_swa(cls) -> bool:
                return False

        stem = {"saw_int4": "SawInt4", "int4": "SawInt4Int4", "bf16": "SawInt4Bf16"}.get(kv_format, "SawInt4")
        Descriptor.__name__ = Descriptor.__qualname__ = f"{stem}Attention"
        return Descriptor

    return {name: descriptor(name, fmt) for name, fmt in BACKENDS.items()}
