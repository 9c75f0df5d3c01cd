"""Per-layer linear transforms applied around the quantizer.

Every option of the format (rotation, sign flips, calibrated channel centring and
scaling, V rotation) folds into four small tensors per layer, which is what the
reference ops and the kernels take:

    k' = k_matrix[h] @ k + k_bias[h]     before quantizing K      (k_matrix = R G, k_bias = -k_matrix m)
    q' = q_matrix[h] @ q                  before q . k'            (q_matrix = R G^-T)
    v' = v_matrix @ v                     before quantizing V      (v_matrix = R, only with rotate_v)
    o  = v_matrix.T @ o'                  after attention          (R is orthogonal)

with G = diag(1/s) (per-channel scales) or a dense calibrated key map, so q' . k' = q . k - q . m:
the constant q . m is the same for every key of a query and softmax ignores it. The calibration
(m and s or G) comes from `sawint4 calibrate` (calibration.py); without it m = 0 and G = I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .hadamard import random_signs, rotation_matrix
from .spec import KVCacheSpec


@dataclass
class LayerTransform:
    """Transform tensors of one layer (all float32). `None` means identity."""

    k_matrix: torch.Tensor | None  # [Hkv, D, D]
    k_bias: torch.Tensor | None  # [Hkv, D]
    q_matrix: torch.Tensor | None  # [Hkv, D, D]
    v_matrix: torch.Tensor | None  # [D, D]
    #: > 0: every matrix is S diag(d) with S = blockdiag of +-1 Sylvester blocks of this size
    #: (hadamard.block_hadamard_form), which lets the kernels read only d; 0: dense matrices. The
    #: ops take it as their `hadamard_block` argument. It equals spec.rotation_block for saw_int4 and
    #: is 1 (diagonal matrices) for a calibrated format without rotation.
    hadamard_block: int = 0

    def to(self, device: torch.device | str) -> "LayerTransform":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LayerTransform(move(self.k_matrix), move(self.k_bias), move(self.q_matrix), move(self.v_matrix),
                              self.hadamard_block)


def build_layer_transform(
    spec: KVCacheSpec,
    channel_mean: torch.Tensor | None = None,
    channel_scale: torch.Tensor | None = None,
    key_map: torch.Tensor | None = None,
) -> LayerTransform:
    """Transforms of one layer from the spec and an optional calibration (calibration.py): a centre
    channel_mean [Hkv, D], and per-channel channel_scale [Hkv, D] or a dense invertible key_map [Hkv, D, D].

    k' = R G (k - m), q' = R G^-T q with G = diag(1/s) or key_map. Diagonal G keeps every matrix in
    block-Hadamard form (hadamard_block > 0: the kernels read only its diagonal); a dense key_map gives
    dense matrices (hadamard_block 0)."""
    d, h = spec.head_dim, spec.num_kv_heads
    calibrated = channel_mean is not None or channel_scale is not None or key_map is not None
    if calibrated and not spec.quantized:
        raise ValueError("channel calibration applies to quantized formats only (kv_format != 'bf16')")
    for name, t in (("channel_mean", channel_mean), ("channel_scale", channel_scale)):
        if t is not None and tuple(t.shape) != (h, d):
            raise ValueError(f"{name} must have shape [num_kv_heads={h}, head_dim={d}], got {tuple(t.shape)}")
    if channel_scale is not None and not bool((channel_scale > 0).all() and torch.isfinite(channel_scale).all()):
        raise ValueError("channel_scale must be finite and > 0")
    if key_map is not None:
        if channel_scale is not None:
            raise ValueError("give channel_scale or key_map, not both")
        if tuple(key_map.shape) != (h, d, d):
            raise ValueError(f"key_map must have shape [num_kv_heads={h}, head_dim={d}, head_dim={d}], got "
                             f"{tuple(key_map.shape)}")
        if not bool(torch.isfinite(key_map).all()):
            raise ValueError("key_map must be finite")
        if bool((torch.linalg.matrix_rank(key_map.double()) < d).any()):
            raise ValueError("key_map must be invertible")
    if not spec.rotated and not calibrated:
        return LayerTransform(None, None, None, None)

    if spec.rotated:
        signs = random_signs(d, spec.sign_seed) if spec.sign_seed is not None else None
        rot = rotation_matrix(d, spec.rotation_block, signs)
    else:
        rot = torch.eye(d)
    mean = channel_mean.float() if channel_mean is not None else torch.zeros(h, d)
    v_matrix = rot.clone() if spec.rotate_v else None
    if key_map is not None:
        g = key_map.double()
        k_matrix = (rot.double()[None] @ g).float()  # R G
        q_matrix = (rot.double()[None] @ torch.linalg.inv(g).transpose(-1, -2)).float()  # R G^-T
        k_bias = -torch.einsum("hij,hj->hi", k_matrix, mean) if channel_mean is not None else None
        return LayerTransform(k_matrix.contiguous(), k_bias, q_matrix.contiguous(), v_matrix, 0)

    scale = channel_scale.float() if channel_scale is not None else torch.ones(h, d)
    k_matrix = rot[None] / scale[:, None, :]  # R @ diag(1/s), per head
    k_bias = -torch.einsum("hij,hj->hi", k_matrix, mean) if channel_mean is not None else None
    q_matrix = rot[None] * scale[:, None, :]  # R @ diag(s)
    # R diag(c) = S diag(c / sqrt(block)) with S the +-1 Sylvester blocks; identity R: blocks of 1
    block = spec.rotation_block if spec.rotated else 1
    return LayerTransform(k_matrix.contiguous(), k_bias, q_matrix.contiguous(), v_matrix, block)
