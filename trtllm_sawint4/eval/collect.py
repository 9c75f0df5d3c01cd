"""Record post-RoPE K and Q statistics of a transformers model over text windows (for calibration).

The model runs with a registered attention function, `sawint4_record`, that adds each layer's query and
key tensors (the ones the attention would use, after RoPE, before GQA repetition) to a `KeyQueryStats`
and then runs sdpa; nothing is stored per token.
"""

from __future__ import annotations

import contextvars

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..calibration import KeyQueryStats

RECORD_ATTENTION = "sawint4_record"
_STATS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("sawint4_stats", default=None)


def _record_attention(module, query, key, value, attention_mask, **kwargs):
    target = _STATS.get()
    if target is not None:
        stats, keys = target
        b, hq, s, d = query.shape
        k = key.transpose(1, 2).reshape(b * s, key.shape[1], d)
        stats.add_queries(module.layer_idx, query.transpose(1, 2).reshape(b * s, hq, d))
        stats.add_keys(module.layer_idx, k)
        if keys is not None:
            keys.setdefault(module.layer_idx, []).append(k.detach().float().cpu())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(RECORD_ATTENTION, _record_attention)
AttentionMaskInterface.register(RECORD_ATTENTION, sdpa_mask)


@torch.inference_mode()
def collect_stats(model, token_windows, num_layers: int, num_kv_heads: int, head_dim: int,
                  progress=None, keep_keys: bool = False):
    """One forward (no cache) per 1-D token window; returns the statistics of every layer, and with
    keep_keys also (stats, keys per layer [tokens, kv_heads, head_dim] float32)."""
    stats = KeyQueryStats(num_layers, num_kv_heads, head_dim)
    keys: dict | None = {} if keep_keys else None
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    model.set_attn_implementation(RECORD_ATTENTION)
    token = _STATS.set((stats, keys))
    try:
        for ids in token_windows:
            model(input_ids=ids.view(1, -1).to(device), use_cache=False)
            if progress is not None:
                progress()
    finally:
        _STATS.reset(token)
        model.set_attn_implementation(previous)
    if stats.k_count == 0:
        raise RuntimeError("no keys were recorded: the model did not call the registered attention function")
    if keep_keys:
        return stats, [torch.cat(keys[i]) for i in range(num_layers)]
    return stats
