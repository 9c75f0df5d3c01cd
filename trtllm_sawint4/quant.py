"""Token-wise asymmetric quantization: the specification the kernels follow bit for bit.

One (scale, min) pair per vector (one token of one KV head, whole head_dim):

    clamp     x <- clamp(x, -65504, 65504)                 (saturate: metadata is fp16; -0.0 -> +0.0)
    min       m = min(x), rounded DOWN to the metadata dtype 
    scale     s = (max(x) - m) / L, rounded UP to the metadata dtype     (L = 15 or 255)
    code      c = clamp(floor((x - m) / s + 0.5), 0, L)    (c = 0 when s == 0)
    dequant   x^ = c * s + m

Rounding m down and s up keeps every x inside [m, m + L*s], so |x - x^| <= s/2 for every
element. A vector holding inf or nan is stored with scale = min = nan and codes 0, so it
dequantizes to nan: non-finite input propagates, it is never silently replaced.

INT4 codes are packed two per byte, split halves: byte j = c[j] | c[j + D/2] << 4. A kernel
then unpacks a row into its low half (channels 0..D/2-1) and high half (D/2..D-1), each
contiguous, so q . k is two half-width dot products with no shuffles.
"""

from __future__ import annotations

import torch

from .spec import SATURATION


def round_to_meta(x: torch.Tensor, meta_dtype: str, direction: str) -> torch.Tensor:
    """Round float32 `x` to the nearest value of `meta_dtype` in `direction` ('down' or 'up'); float32 out."""
    if meta_dtype == "fp32":
        return x
    h = x.to(torch.float16)
    if direction == "down":
        h = torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)
    else:
        h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize(x: torch.Tensor, levels: int, meta_dtype: str = "fp16"):
    """Quantize vectors along the last dim. Returns (codes uint8 [..., D], scale [...], min [...]) in float32."""
    x = x.float()
    finite = torch.isfinite(x).all(-1)
    # saturate; -0.0 -> +0.0 so that min/max (which may return either zero) give one answer
    x = torch.where(finite[..., None] & (x != 0), x.clamp(-SATURATION, SATURATION), torch.zeros_like(x))
    vmin = round_to_meta(x.amin(-1), meta_dtype, "down")
    # divide by a tensor: torch on CUDA turns division by a Python scalar into a reciprocal multiply
    scale = round_to_meta((x.amax(-1) - vmin) / torch.full_like(vmin, levels), meta_dtype, "up")
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.floor((x - vmin[..., None]) / safe_scale[..., None] + 0.5).clamp(0, levels)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    nan = torch.full_like(scale, float("nan"))
    return codes, torch.where(finite, scale, nan), torch.where(finite, vmin, nan)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, vmin: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize` (float32)."""
    return codes.float() * scale[..., None].float() + vmin[..., None].float()


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., D] codes in [0, 15] -> [..., D/2] bytes, byte j = c[j] | c[j + D/2] << 4."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] bytes -> [..., D] codes."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)

