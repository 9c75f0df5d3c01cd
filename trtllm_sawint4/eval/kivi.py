"""A KIVI-style comparator (fake quantization; this row only).

KIVI (Liu et al., 2024) quantizes K per channel over groups of G tokens and V per token, and keeps
the newest tokens that do not yet fill a group in full precision (its "residual"). Here the cache
holds full-precision K/V (a DynamicCache) and every read returns them fake-quantized:

    K: tokens [0, G * floor(L / G)) in groups of G tokens, per channel, asymmetric INT4
    V: the same tokens, per token (whole head_dim), asymmetric INT4
    the last L mod G tokens: full precision (the residual)

with the same quantizer (fp16 scale/min, round-to-nearest) as the paged formats. Complete groups
never change, so recomputing them at every step gives what a real KIVI cache would hold.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from ..quant import dequantize, quantize


def fake_quant_tokens(x: torch.Tensor, levels: int = 15) -> torch.Tensor:
    """Per-token (last dim) asymmetric fake quantization."""
    return dequantize(*quantize(x, levels, "fp16")).to(x.dtype)


def kivi_fake_quant(k: torch.Tensor, v: torch.Tensor, group: int, levels: int = 15):
    """k, v [B, H, L, D] -> fake-quantized copies (see the module docstring)."""
    b, h, length, d = k.shape
    n = (length // group) * group
    if n == 0:
        return k, v
    kg = k[:, :, :n].reshape(b, h, n // group, group, d).transpose(-1, -2)  # [B,H,groups,D,G]: per channel
    kq = fake_quant_tokens(kg, levels).transpose(-1, -2).reshape(b, h, n, d)
    vq = fake_quant_tokens(v[:, :, :n], levels)
    return torch.cat([kq, k[:, :, n:]], 2), torch.cat([vq, v[:, :, n:]], 2)


class KiviFakeQuantCache(DynamicCache):
    """DynamicCache returning KIVI fake-quantized K/V (use with sdpa or eager attention)."""

    def __init__(self, config=None, group: int = 32, levels: int = 15):
        super().__init__(config=config)
        self.group = group
        self.levels = levels

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return kivi_fake_quant(k, v, self.group, self.levels)


def kivi_bytes_per_token(num_kv_heads: int, head_dim: int, group: int, bits: int = 4) -> float:
    """Steady-state bytes per token (one layer, K+V, all heads; residual not counted): codes, plus K's fp16
    (scale, min) per channel per group, plus V's fp16 (scale, min) per token."""
    codes = 2 * head_dim * bits / 8
    return num_kv_heads * (codes + 4 * head_dim / group + 4)
