"""Offline channel statistics of K (per layer, per KV head): the optional calibrated transform.

K is centred by `mean` and divided by `scale` before rotation; Q is multiplied by `scale`
(transforms.py shows why attention is unchanged). The file is a small torch.save dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .spec import KVCacheSpec

FILE_FORMAT = "sawint4-calibration/1"


@dataclass
class ChannelCalibration:
    mean: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32
    scale: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32, > 0
    num_tokens: int = 0
    source: str = ""

    @classmethod
    def from_keys(cls, keys_per_layer: list[torch.Tensor], source: str = "",
                  scale_power: float = 0.5) -> "ChannelCalibration":
        """Statistics from sample keys, one [num_tokens, num_kv_heads, head_dim] tensor per layer.

        scale = rms(k - mean) ** scale_power, normalised to geometric mean 1 per head: a full
        whitening (power 1) would multiply the error of small channels back into q . k."""
        means, scales = [], []
        for k in keys_per_layer:
            k = k.double()
            mean = k.mean(0)
            rms = (k - mean).pow(2).mean(0).sqrt().clamp_min(1e-6)
            s = rms.pow(scale_power)
            s = s / s.log().mean(-1, keepdim=True).exp()
            means.append(mean.float())
            scales.append(s.float())
        return cls(torch.stack(means), torch.stack(scales), keys_per_layer[0].shape[0], source)

    def check_matches(self, spec: KVCacheSpec, num_layers: int) -> None:
        want = (num_layers, spec.num_kv_heads, spec.head_dim)
        for name in ("mean", "scale"):
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise ValueError(f"calibration {name} has shape {list(got)}, the model needs "
                                 f"[num_layers, num_kv_heads, head_dim] = {list(want)}")

    def save(self, path: str | Path) -> None:
        torch.save({"format": FILE_FORMAT, "mean": self.mean, "scale": self.scale,
                    "num_tokens": self.num_tokens, "source": self.source}, path)

    @classmethod
    def load(cls, path: str | Path) -> "ChannelCalibration":
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a {FILE_FORMAT} file (write one with `sawint4 calibrate`)")
        return cls(data["mean"].float(), data["scale"].float(), int(data["num_tokens"]), str(data["source"]))
