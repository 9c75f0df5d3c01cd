"""Offline K calibration per layer and KV head: the optional static transform in front of the quantizer.

Every method gives, per layer and KV head, a centre `mean` [D], and either per-channel `scale` [D] or a
dense `key_map` [D, D]; `transforms.build_layer_transform` folds them with the format's rotation R into
the k/q matrices the ops take:

    k' = R G (k - mean)        q' = R G^-T q        so q' . k' = q . k - q . mean   (softmax ignores q . mean)

with G = diag(1/scale) (method `channel`, `qk-channel`) or G = key_map (method `qk-dense`). Why these:
with a rotation in front, token-wise INT4 adds to every coordinate of k' an error of about the same size,
proportional to the norm of the centred key, E||G (k - m)||^2 = tr(G A G^T) (A: the key covariance); that
error reaches the score through q', E||G^-T q||^2 = tr(G^-1 G^-T B) (B: the queries' second moment). The
product of the two is smallest for G^T G = A^-1 # B, the matrix geometric mean of A^-1 and B (`qk-dense`);
restricted to diagonal G it is scale_i = (sigma_k,i / rms_q,i)^(1/2) (`qk-channel`); without query
statistics the best guess is scale_i = sigma_k,i^(1/2) (`channel`, scale_power 0.5). docs/accuracy.md has
the measurements. The file is a small torch.save dict (format `sawint4-calibration/2`; `/1` files load).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .spec import KVCacheSpec

FILE_FORMAT = "sawint4-calibration/2"
_READABLE = ("sawint4-calibration/1", FILE_FORMAT)
METHODS = ("channel", "qk-channel", "qk-dense", "k-bias")


@dataclass
class KeyQueryStats:
    """Running sums of post-RoPE K and Q per layer and KV head (float64), enough for every method."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    k_count: int = 0
    q_count: int = 0
    k_sum: torch.Tensor = field(init=False)  # [L, H, D]
    k_outer: torch.Tensor = field(init=False)  # [L, H, D, D]
    q_outer: torch.Tensor = field(init=False)  # [L, H, D, D], summed over the query heads of each KV head

    def __post_init__(self):
        shape = (self.num_layers, self.num_kv_heads, self.head_dim)
        self.k_sum = torch.zeros(shape, dtype=torch.float64)
        self.k_outer = torch.zeros(*shape, self.head_dim, dtype=torch.float64)
        self.q_outer = torch.zeros(*shape, self.head_dim, dtype=torch.float64)
        self._seen_k = [0] * self.num_layers
        self._seen_q = [0] * self.num_layers

    def add_keys(self, layer: int, k: torch.Tensor) -> None:
        """k [tokens, H, D] of one layer."""
        k = k.detach().double().cpu()
        self.k_sum[layer] += k.sum(0)
        self.k_outer[layer] += torch.einsum("nhi,nhj->hij", k, k)
        self._seen_k[layer] += k.shape[0]
        self.k_count = self._seen_k[0]

    def add_queries(self, layer: int, q: torch.Tensor) -> None:
        """q [tokens, Hq, D] of one layer (Hq a multiple of H; head i belongs to KV head i // (Hq // H))."""
        q = q.detach().double().cpu()
        n, hq, d = q.shape
        q = q.view(n, self.num_kv_heads, hq // self.num_kv_heads, d)
        self.q_outer[layer] += torch.einsum("nhgi,nhgj->hij", q, q) / (hq // self.num_kv_heads)
        self._seen_q[layer] += n
        self.q_count = self._seen_q[0]

    def key_mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k_count < 2:
            raise ValueError("calibration needs keys from at least 2 tokens")
        mean = self.k_sum / self.k_count
        cov = self.k_outer / self.k_count - mean[..., :, None] * mean[..., None, :]
        return mean, cov

    def query_moment(self) -> torch.Tensor:
        if self.q_count < 1:
            raise ValueError("this calibration method needs query statistics (none were recorded)")
        return self.q_outer / self.q_count


def _sym_sqrt(a: torch.Tensor, inverse: bool = False, floor: float = 1e-9) -> torch.Tensor:
    e, u = torch.linalg.eigh(a)
    e = e.clamp_min(floor * e.amax(-1, keepdim=True).clamp_min(1e-300))
    e = e.rsqrt() if inverse else e.sqrt()
    return (u * e[..., None, :]) @ u.transpose(-1, -2)


def _shrink(a: torch.Tensor, amount: float) -> torch.Tensor:
    """(1 - amount) a + amount * (mean diagonal) I: a better-conditioned estimate from few tokens."""
    d = a.shape[-1]
    avg = torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return (1 - amount) * a + amount * avg * torch.eye(d, dtype=a.dtype)


def _unit_geomean(s: torch.Tensor) -> torch.Tensor:
    return s / s.log().mean(-1, keepdim=True).exp()


def model_fingerprint(model) -> str:
    """16 hex digits identifying a transformers model's weights: sha256 of its first layer's K projection
    weight (float32) and its dims. Stored in calibration files, so that a file is not used with another model."""
    layer = model.model.layers[0].self_attn
    w = layer.k_proj.weight.detach().float().cpu().contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class ChannelCalibration:
    """Static K transform of every layer (see the module docstring)."""

    mean: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32
    scale: torch.Tensor | None = None  # [num_layers, num_kv_heads, head_dim] float32, > 0 (diagonal methods)
    num_tokens: int = 0
    source: str = ""
    key_map: torch.Tensor | None = None  # [num_layers, num_kv_heads, head_dim, head_dim] float32 (qk-dense)
    method: str = "channel"
    model_fingerprint: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if self.mean.dim() != 3:
            raise ValueError(f"calibration mean must be [num_layers, num_kv_heads, head_dim], got "
                             f"{list(self.mean.shape)}")
        if self.scale is not None and self.key_map is not None:
            raise ValueError("a calibration has per-channel scales or a dense key_map, not both")
        if self.scale is not None and tuple(self.scale.shape) != tuple(self.mean.shape):
            raise ValueError(f"calibration scale has shape {list(self.scale.shape)}, mean {list(self.mean.shape)}")
        if self.key_map is not None and tuple(self.key_map.shape) != (*self.mean.shape, self.mean.shape[-1]):
            raise ValueError(f"calibration key_map has shape {list(self.key_map.shape)}, expected "
                             f"{[*self.mean.shape, self.mean.shape[-1]]}")
        for name in ("mean", "scale", "key_map"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"calibration {name} holds non-finite values")
        if self.scale is not None and not bool((self.scale > 0).all()):
            raise ValueError("calibration scale must be > 0")

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_keys(cls, keys_per_layer: list[torch.Tensor], source: str = "",
                  scale_power: float = 0.5) -> "ChannelCalibration":
        """`channel` statistics from sample keys, one [num_tokens, num_kv_heads, head_dim] tensor per layer.

        scale = rms(k - mean) ** scale_power, normalised to geometric mean 1 per head: a full
        whitening (power 1) would multiply the error of small channels back into q . k."""
        means, scales = [], []
        for k in keys_per_layer:
            k = k.double()
            mean = k.mean(0)
            rms = (k - mean).pow(2).mean(0).sqrt().clamp_min(1e-6)
            means.append(mean.float())
            scales.append(_unit_geomean(rms.pow(scale_power)).float())
        return cls(torch.stack(means), torch.stack(scales), keys_per_layer[0].shape[0], source)

    @classmethod
    def from_stats(cls, stats: KeyQueryStats, method: str = "qk-dense", source: str = "",
                   scale_power: float = 0.5, shrinkage: float = 0.1,
                   model_fingerprint: str | None = None) -> "ChannelCalibration":
        """A calibration of `method` from recorded statistics (module docstring). scale_power applies to
        `channel`; shrinkage (0..1, towards a multiple of I) to `qk-dense`'s covariance estimates."""
        if method not in ("channel", "qk-channel", "qk-dense"):
            raise ValueError(f"method must be channel, qk-channel or qk-dense, got {method!r}")
        if not 0 <= shrinkage < 1:
            raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
        mean, cov = stats.key_mean_cov()
        sigma = torch.diagonal(cov, dim1=-2, dim2=-1).clamp_min(1e-12).sqrt()
        common = dict(num_tokens=stats.k_count, source=source, method=method, model_fingerprint=model_fingerprint)
        if method == "channel":
            return cls(mean.float(), _unit_geomean(sigma.pow(scale_power)).float(), **common)
        b = stats.query_moment()
        if method == "qk-channel":
            rq = torch.diagonal(b, dim1=-2, dim2=-1).clamp_min(1e-12).sqrt()
            return cls(mean.float(), _unit_geomean((sigma / rq).sqrt()).float(), **common)
        a, b = _shrink(cov, shrinkage), _shrink(b, shrinkage)
        a_half, a_ihalf = _sym_sqrt(a), _sym_sqrt(a, inverse=True)
        p = a_ihalf @ _sym_sqrt(a_half @ b @ a_half) @ a_ihalf  # A^-1 # B
        g = _sym_sqrt(p)
        g = g / torch.linalg.det(g).abs().pow(1 / g.shape[-1])[..., None, None]  # unit determinant
        return cls(mean.float(), None, key_map=g.float(), **common)

    @classmethod
    def from_key_bias(cls, k_bias: list[torch.Tensor], num_kv_heads: int, rope_theta: float | None = None,
                      max_positions: int = 4096, max_angle: float = 1.0, source: str = "",
                      inv_freq: torch.Tensor | None = None) -> "ChannelCalibration":
        """Calibration-free centre from the K projection bias of each layer ([H * D] each; Qwen2 has one).

        Post-RoPE the bias of a rotary channel pair (i, i + D/2) turns with the position p by theta_i * p,
        so it is a constant only in the slow pairs: those with theta_i * max_positions <= max_angle are
        centred, the others are left alone. theta_i = inv_freq[i], or rope_theta ** (-2i / D)."""
        d = k_bias[0].numel() // num_kv_heads
        if inv_freq is None:
            if rope_theta is None:
                raise ValueError("give rope_theta or inv_freq")
            inv_freq = 1.0 / (rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        if inv_freq.numel() != d // 2:
            raise ValueError(f"inv_freq has {inv_freq.numel()} entries, head_dim {d} needs {d // 2}")
        slow = (inv_freq.double() * max_positions <= max_angle).float()
        mask = torch.cat([slow, slow])  # rotate_half layout: pair (i, i + D/2)
        mean = torch.stack([b.detach().float().cpu().view(num_kv_heads, d) * mask for b in k_bias])
        return cls(mean, None, 0, source or f"K projection bias, {int(slow.sum())} of {d // 2} rotary pairs "
                   f"slow enough (theta * {max_positions} <= {max_angle})", method="k-bias")

    # ---- use ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)

    def check_matches(self, spec: KVCacheSpec, num_layers: int, fingerprint: str | None = None) -> None:
        want = (num_layers, spec.num_kv_heads, spec.head_dim)
        if self.shape != want:
            raise ValueError(f"calibration has shape [num_layers, num_kv_heads, head_dim] = {list(self.shape)}, "
                             f"the model needs {list(want)}")
        if fingerprint is not None and self.model_fingerprint is not None and fingerprint != self.model_fingerprint:
            raise ValueError(f"calibration was made for another model (fingerprint {self.model_fingerprint}, this "
                             f"model has {fingerprint}); write one for this model with `sawint4 calibrate`")

    def layer_args(self, layer: int) -> dict:
        """Keyword arguments of `transforms.build_layer_transform` for one layer."""
        return {"channel_mean": self.mean[layer],
                "channel_scale": None if self.scale is None else self.scale[layer],
                "key_map": None if self.key_map is None else self.key_map[layer]}

    def describe(self) -> str:
        n = f"{self.num_tokens} tokens of " if self.num_tokens else ""
        return f"{self.method} ({n}{self.source})" if self.source else self.method

    # ---- file -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        torch.save({"format": FILE_FORMAT, "method": self.method, "mean": self.mean, "scale": self.scale,
                    "key_map": self.key_map, "num_tokens": self.num_tokens, "source": self.source,
                    "model_fingerprint": self.model_fingerprint}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ChannelCalibration":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a file that is not a torch.save archive
            raise ValueError(f"{path} is not a calibration file (write one with `sawint4 calibrate`): {e}") from None
        if not isinstance(data, dict) or data.get("format") not in _READABLE:
            raise ValueError(f"{path} is not a {FILE_FORMAT} file (write one with `sawint4 calibrate`)")
        tensors = {}
        for name in ("mean", "scale", "key_map"):
            t = data.get(name)
            if t is not None and not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: '{name}' is not a tensor")
            tensors[name] = None if t is None else t.float()
        if tensors["mean"] is None:
            raise ValueError(f"{path}: no 'mean' tensor")
        try:
            return cls(tensors["mean"], tensors["scale"], int(data.get("num_tokens", 0)), str(data.get("source", "")),
                       key_map=tensors["key_map"], method=str(data.get("method", "channel")),
                       model_fingerprint=data.get("model_fingerprint"))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
