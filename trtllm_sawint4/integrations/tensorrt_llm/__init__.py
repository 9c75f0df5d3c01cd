"""TensorRT-LLM integration: the SAW-INT4 paged KV cache as attention backends of TensorRT-LLM's AutoDeploy.

AutoDeploy (``tensorrt_llm._torch.auto_deploy``, ``LLM(..., backend="_autodeploy")``, ``trtllm-serve
--backend _autodeploy``) swaps a model's attention for a cached-attention op chosen by name
(``transforms.insert_cached_attention.backend``). This package registers three names:

    ``saw_int4``       4-bit codes with the block-Hadamard rotation of K (the product)
    ``sawint4_int4``   the same 4-bit storage without the rotation
    ``sawint4_bf16``   this project's paged layout in bf16 (a like-for-like baseline)

Usage (this process)::

    import trtllm_sawint4.integrations.tensorrt_llm as sawint4_trtllm
    sawint4_trtllm.register()           # idempotent; needs TensorRT-LLM

TensorRT-LLM builds the model in worker processes, which do not run this import. ``sawint4 trtllm
install-hook`` writes a ``.pth`` file into the environment's site-packages that arms a post-import hook
(`autoload`) in every interpreter: the backends are registered the moment AutoDeploy's attention
interface is imported. ``docs/tensorrt_llm.md`` has the enablement snippets and what is not verified.

Modules, each with one job: `metadata` (AutoDeploy's per-step sequence info -> block table, lengths,
slots; plain torch), `ops` (the cached-attention and prepare-metadata torch custom ops, built on
``torch.ops.sawint4.*``), `resources` (pool sizing), `adapter` (the AutoDeploy descriptor and resource
handler classes, created only from TensorRT-LLM's own base classes), `registration`, `autoload` (the
hook, stdlib only), `deploy` and `cli` (the generated ``LLM(...)`` call, trtllm-serve YAML and Triton
repository), `triton_model` (the Triton Python model that `deploy` writes out).
"""

from __future__ import annotations

#: The TensorRT-LLM line this adapter was written against. It was written against the AutoDeploy
#: sources of NVIDIA/TensorRT-LLM at `TARGET_TENSORRT_LLM_COMMIT` (2026, the 1.3.0rc pre-release
#: line; which rc number contains that commit was not determinable from the sources read). Another
#: version only draws a warning: AutoDeploy's interfaces change often, so rerun the GPU tests there.
TARGET_TENSORRT_LLM_VERSION = "1.3"
#: The commit of ``tensorrt_llm/_torch/auto_deploy/custom_ops/attention_interface.py`` that was read.
TARGET_TENSORRT_LLM_COMMIT = "1099c65cb0519c1bf2c2bc6386bd2d0d96c794eb"

#: Registered AutoDeploy backend name -> kv_format of `trtllm_sawint4.KVCacheSpec`.
BACKENDS = {"saw_int4": "saw_int4", "sawint4_int4": "int4", "sawint4_bf16": "bf16"}


def register(attention_interface=None) -> list[str]:
    """Register the backends with AutoDeploy's AttentionRegistry (idempotent); returns their names."""
    from .registration import register as _register

    return _register(attention_interface)


def is_tensorrt_llm_available() -> bool:
    """Whether TensorRT-LLM's AutoDeploy attention interface can be imported (imports it if so)."""
    from .registration import load_attention_interface

    try:
        load_attention_interface()
    except ImportError:
        return False
    return True


__all__ = ["BACKENDS", "TARGET_TENSORRT_LLM_COMMIT", "TARGET_TENSORRT_LLM_VERSION", "is_tensorrt_llm_available",
           "register"]
