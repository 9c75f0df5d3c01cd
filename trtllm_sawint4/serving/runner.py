"""One packed forward of a transformers causal LM over the paged cache.

Every step is one forward of `input_ids [1, N]` with explicit `position_ids [1, N]`: the new tokens of all
the step's sequences side by side (prefill chunks and single decode tokens alike). The model is loaded with
``attn_implementation="sawint4_engine"``, the attention function below, and is called with no transformers
cache (``use_cache=False``) and with the step (paged cache + plan) as the keyword argument ``sawint4_step``,
which transformers passes down to every attention call. The attention appends the layer's new K/V through
the plan and attends through the block table: the plan, not a mask, says which tokens belong together.

"sawint4_engine" is registered with transformers' AttentionInterface only, not with its mask interface, so
transformers builds no attention mask for it (its documented path for attention backends that need none, the
one vLLM and TGI use) -- no per-step mask work and nothing that syncs with the host.

`logits_to_keep` (a tensor of row indices) keeps the LM head to the rows that sample: the last new token of each
sequence that finishes its prompt or decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from ..cache import PagedKVCache, StepPlan
from ..integrations.transformers import KVGeometry, layer_window

ATTN_IMPLEMENTATION = "sawint4_engine"
STEP_KWARG = "sawint4_step"


@dataclass
class Step:
    """What every attention call of one forward needs."""

    cache: PagedKVCache
    plan: StepPlan
    geometry: KVGeometry


def sawint4_engine_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] of one packed step -> ([1, N, Hq, D], None)."""
    step: Step | None = kwargs.get(STEP_KWARG)
    if step is None:
        raise RuntimeError(f"attn_implementation={ATTN_IMPLEMENTATION!r} runs only inside the serving engine "
                           f"(it needs the {STEP_KWARG}= keyword); use 'sawint4_paged' with SawInt4Cache otherwise")
    if dropout:
        raise NotImplementedError(f"{ATTN_IMPLEMENTATION} attention has no dropout (use model.eval())")
    if kwargs.get("softcap"):
        raise NotImplementedError(f"{ATTN_IMPLEMENTATION} attention has no logit soft-capping (softcap)")
    layer = module.layer_idx
    want = int(kwargs.get("sliding_window") or 0)
    if want != step.geometry.windows[layer] or (want and layer_window(step.cache, layer) not in (0, want)):
        raise RuntimeError(f"layer {layer} attends with sliding_window={want}; the engine's cache was built for "
                           f"{step.geometry.windows[layer]}")
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise ValueError(f"the engine's forward is packed into batch 1, got query {list(query.shape)}")
    n = query.shape[2]
    k = key[0].transpose(0, 1)  # [N, Hkv, D] (a view; append reads it with its strides)
    v = value[0].transpose(0, 1)
    step.cache.append(layer, step.plan, k.contiguous(), v.contiguous())
    q = query[0].transpose(0, 1).contiguous()  # [N, Hq, D]
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = step.cache.attend(layer, step.plan, q, float(scaling))
    return out.view(1, n, q.shape[1], q.shape[2]), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sawint4_engine_attention)


def use_engine_attention(model) -> None:
    """Switch a loaded model to the engine's attention (idempotent)."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def forward_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, step: Step,
                 logits_rows: torch.Tensor) -> torch.Tensor:
    """Logits [len(logits_rows), vocab] (float32) of one packed step; input_ids/position_ids are [N] int64."""
    out = model(input_ids=input_ids.view(1, -1), position_ids=position_ids.view(1, -1), use_cache=False,
                logits_to_keep=logits_rows, **{STEP_KWARG: step})
    return out.logits[0].float()
