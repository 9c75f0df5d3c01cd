"""Layer-local error of K/V fake quantization from recorded bf16 q/k/v (no model forward per variant).

err_l = ||W_o (o^ - o)||^2 / ||W_o o||^2 summed over heads/tokens, o = causal attention of the recorded q over
bf16 K/V, o^ the same with fake-quantized K (or V)."""

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lib as P  # noqa: E402
from lib import CACHE  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))


def get(model_name, text, which="eval"):
    f = CACHE / f"{model_name}_{text}_{which}_qkv.pt"
    if f.exists():
        return torch.load(f)
    raise SystemExit(f"missing {f}")


def attn(q, k, v, scale):
    # q [W,Hq,L,D], k,v [W,H,L,D] -> [W,Hq,L,D]
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def oproj_err(o_hat, o, wo):
    # o [W,Hq,L,D]; wo [hidden, Hq*D]
    W, Hq, L, D = o.shape
    a = (o_hat - o).permute(0, 2, 1, 3).reshape(W * L, Hq * D) @ wo.T
    b = o.permute(0, 2, 1, 3).reshape(W * L, Hq * D) @ wo.T
    return float(a.pow(2).sum() / b.pow(2).sum())


class Layerwise:
    def __init__(self, model_name, text):
        self.q, self.k, self.v = get(model_name, text)
        w = torch.load(CACHE / f"{model_name}_weights.pt")
        self.wo, self.kb, self.qb, self.theta = w["wo"], w["kb"], w["qb"], w["rope_theta"]
        self.L, self.H, self.D, self.Hq = w["dims"]
        self.scale = self.D ** -0.5
        self.k = [x.to(torch.bfloat16).float() for x in self.k]
        self.v = [x.to(torch.bfloat16).float() for x in self.v]
        self.ref = [attn(self.q[i], self.k[i], self.v[i], self.scale) for i in range(self.L)]

    def err(self, i, kfn=None, vfn=None):
        k = self.k[i] if kfn is None else kfn(self.k[i])
        v = self.v[i] if vfn is None else vfn(self.v[i])
        return oproj_err(attn(self.q[i], k, v, self.scale), self.ref[i], self.wo[i])

    def errs(self, kfns=None, vfns=None):
        return [self.err(i, None if kfns is None else kfns(i), None if vfns is None else vfns(i))
                for i in range(self.L)]
