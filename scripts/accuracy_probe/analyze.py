"""Layer-local analyses of recorded Q/K/V. usage: analyze.py {smollm2,qwen} {bbc,hamlet} ANALYSIS...

ANALYSIS: formats, perlayer, calib, rope, blocks, tokens (see the branches below). Needs record.py's
recordings of the model and text."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lib as P  # noqa: E402
from local import CACHE, Layerwise  # noqa: E402

from trtllm_sawint4.hadamard import rotation_matrix  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
model_name, text = sys.argv[1], sys.argv[2]
X = Layerwise(model_name, text)
L, H, D = X.L, X.H, X.D
R = rotation_matrix(D, min(D, 128))
RH = R[None].expand(H, D, D).contiguous()
cq, ck, cv = torch.load(CACHE / f"{model_name}_{text}_calib_kv.pt")


def flat(x):  # [W,H,L,D] -> [N,H,D]
    return x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]).double()


def stats(i, skip_first=0):
    k = flat(ck[i][:, :, skip_first:])
    m = k.mean(0)
    c = torch.einsum("nhi,nhj->hij", k - m, k - m) / k.shape[0]
    q = flat(cq[i][:, :, skip_first:])  # [N,Hq,D]
    g = q.shape[1] // H
    q = q.view(q.shape[0], H, g, D)
    b = torch.einsum("nhgi,nhgj->hij", q, q) / (q.shape[0] * g)
    return m, c, b


def sqrtm(a):
    e, u = torch.linalg.eigh(a)
    return (u * e.clamp_min(0).sqrt()[..., None, :]) @ u.transpose(-1, -2)


def invsqrtm(a, eps=1e-8):
    e, u = torch.linalg.eigh(a)
    return (u * e.clamp_min(eps * e.max()).rsqrt()[..., None, :]) @ u.transpose(-1, -2)


def diag_calib(i, power=0.5, use_q=False, skip_first=0):
    m, c, b = stats(i, skip_first)
    sk = torch.diagonal(c, dim1=-2, dim2=-1).sqrt().clamp_min(1e-6)
    if use_q:
        sq = torch.diagonal(b, dim1=-2, dim2=-1).sqrt().clamp_min(1e-6)
        s = (sk / sq).pow(power)
    else:
        s = sk.pow(power)
    s = s / s.log().mean(-1, keepdim=True).exp()
    M = RH.double() / s[:, None, :]
    return P.KQuant(M.float(), (-torch.einsum("hij,hj->hi", M, m)).float())


def dense_calib(i, rot=True, skip_first=0, shrink=0.0):
    """M = R P^(1/2), P = A^-1 # B (A key covariance, B query 2nd moment)."""
    m, a, b = stats(i, skip_first)
    eye = torch.eye(D, dtype=torch.float64)
    if shrink:
        a = (1 - shrink) * a + shrink * eye * torch.diagonal(a, dim1=-2, dim2=-1).mean(-1)[:, None, None]
        b = (1 - shrink) * b + shrink * eye * torch.diagonal(b, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    ah, ahi = sqrtm(a), invsqrtm(a)
    p = ahi @ sqrtm(ah @ b @ ah) @ ahi
    M = sqrtm(p)
    M = M / torch.linalg.det(M).abs().pow(1 / D)[:, None, None]
    if rot:
        M = RH.double() @ M
    return P.KQuant(M.float(), (-torch.einsum("hij,hj->hi", M, m)).float())


def mean_only(i, rot=True):
    m, _, _ = stats(i)
    M = RH.double() if rot else torch.eye(D, dtype=torch.float64).expand(H, D, D)
    return P.KQuant(M.float(), (-torch.einsum("hij,hj->hi", M, m)).float())


def show(name, e):
    tot = sum(e)
    top = sorted(range(L), key=lambda i: -e[i])[:4]
    print(f"{name:<34} sum {tot:8.4f}  mean {tot / L:.5f}  top " + ", ".join(f"L{i}:{e[i]:.4f}" for i in top)
          + "  first3 " + ", ".join(f"{x:.4f}" for x in e[:3]), flush=True)
    return e


def rope(x, theta_base, sign=1):
    """rotate x [W,H,L,D] by sign * theta_i * p (transformers' rotate_half convention)."""
    W, Hh, Ln, Dd = x.shape
    inv = 1.0 / (theta_base ** (torch.arange(0, Dd, 2, dtype=torch.float64) / Dd))
    ang = torch.arange(Ln, dtype=torch.float64)[:, None] * inv[None] * sign
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    x1, x2 = x[..., : Dd // 2], x[..., Dd // 2:]
    rot = torch.cat([-x2, x1], -1)
    return x * cos + rot * sin


class RopeMeanK:
    """Subtract R(p) mu_pre (exact pre-RoPE mean centring; needs positions in the kernel), then M."""

    def __init__(self, mu_pre, M=None, levels=15):
        self.mu_pre, self.M, self.levels = mu_pre, M, levels
        self.Minv = None if M is None else torch.linalg.inv(M.double()).float()

    def __call__(self, k):
        W, Hh, Ln, Dd = k.shape
        c = rope(self.mu_pre[None, :, None, :].expand(1, Hh, Ln, Dd).contiguous(), X.theta)
        x = k.float() - c
        if self.M is not None:
            x = torch.einsum("hij,bhlj->bhli", self.M, x)
        y = P.fq_tokens(x, self.levels)
        if self.Minv is not None:
            y = torch.einsum("hij,bhlj->bhli", self.Minv, y)
        return (y + c).to(k.dtype)


def kivi_k(group=32):
    def f(k):
        W, Hh, Ln, Dd = k.shape
        n = (Ln // group) * group
        kg = k[:, :, :n].reshape(W, Hh, n // group, group, Dd).transpose(-1, -2)
        kq = P.fq_tokens(kg).transpose(-1, -2).reshape(W, Hh, n, Dd)
        return torch.cat([kq, k[:, :, n:]], 2)
    return f


def pre_rope_mean(i):
    kp = rope(ck[i], X.theta, -1)
    return flat(kp).mean(0).float()


for a in sys.argv[3:]:
    if a == "formats":
        show("int4 K", X.errs(lambda i: P.KQuant()))
        show("saw K", X.errs(lambda i: P.KQuant(RH)))
        show("saw+calib(p.5) K", X.errs(lambda i: diag_calib(i)))
        show("int4 V", X.errs(None, lambda i: P.KQuant()))
        show("saw V (+Vrot)", X.errs(None, lambda i: P.KQuant(RH)))
    elif a == "perlayer":
        e1 = X.errs(lambda i: P.KQuant())
        e2 = X.errs(lambda i: P.KQuant(RH))
        e3 = X.errs(lambda i: diag_calib(i))
        e4 = X.errs(None, lambda i: P.KQuant())
        print("layer   int4K    sawK  sawcalK   int4V")
        for i in range(L):
            print(f"{i:5d} {e1[i]:7.4f} {e2[i]:7.4f} {e3[i]:7.4f} {e4[i]:7.4f}")
    elif a == "calib":
        for p in (0.25, 0.5, 0.75, 1.0):
            show(f"diag calib p={p}", X.errs(lambda i: diag_calib(i, p)))
        for p in (0.5, 1.0):
            show(f"diag q-aware p={p}", X.errs(lambda i: diag_calib(i, p, use_q=True)))
        show("mean only +rot", X.errs(lambda i: mean_only(i)))
        show("mean only no rot", X.errs(lambda i: mean_only(i, False)))
        show("dense P=A^-1#B +rot", X.errs(lambda i: dense_calib(i)))
        show("dense no rot", X.errs(lambda i: dense_calib(i, rot=False)))
        show("dense +rot shrink .1", X.errs(lambda i: dense_calib(i, shrink=0.1)))
        show("dense +rot skip pos0", X.errs(lambda i: dense_calib(i, skip_first=1)))
    elif a == "rope":
        show("kivi K g32", X.errs(lambda i: kivi_k()))
        show("mean only +rot", X.errs(lambda i: mean_only(i)))
        show("rope-mean +rot", X.errs(lambda i: RopeMeanK(pre_rope_mean(i), RH)))
        show("rope-mean no rot", X.errs(lambda i: RopeMeanK(pre_rope_mean(i))))
        if X.kb[0] is not None:
            kbh = lambda i: X.kb[i].view(H, D)
            show("k_proj bias (rope-exact) +rot", X.errs(lambda i: RopeMeanK(kbh(i), RH)))
            for cut in (0.5, 0.75):
                def static_kb(i, cut=cut):
                    b = kbh(i).clone()
                    # keep only channel pairs whose angle over 512 positions stays small
                    inv = 1.0 / (X.theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
                    slow = (inv * 512 < cut).float()
                    b = b * torch.cat([slow, slow]).float()
                    return P.KQuant(RH, -torch.einsum("hij,hj->hi", RH, b))
                show(f"k_proj bias static (angle<{cut}) +rot", X.errs(static_kb))
                def static_kb_norot(i, cut=cut):
                    b = kbh(i).clone()
                    inv = 1.0 / (X.theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
                    slow = (inv * 512 < cut).float()
                    return P.KQuant(None, -(b * torch.cat([slow, slow]).float()))
                show(f"k_proj bias static (angle<{cut}) no rot", X.errs(static_kb_norot))
    elif a == "blocks":
        for r in (16, 32):
            Rr = rotation_matrix(D, r)[None].expand(H, D, D).contiguous()
            show(f"saw r={r} K", X.errs(lambda i: P.KQuant(Rr)))
        show("int4 K groups=2 (+4B)", X.errs(lambda i: P.KQuant(groups=2)))
        show("saw K groups=2 (+4B)", X.errs(lambda i: P.KQuant(RH, groups=2)))
        def calg(i):
            c = diag_calib(i)
            c.groups = 2
            return c
        show("saw+calib K groups=2 (+4B)", X.errs(calg))
        def dg(i):
            c = dense_calib(i, shrink=0.1)
            c.groups = 2
            return c
        show("dense shrink.1 groups=2 (+4B)", X.errs(dg))
        if X.kb[0] is not None:
            for r in (16, 32, 64):
                Rr = rotation_matrix(D, r)[None].expand(H, D, D).contiguous()
                def skb(i, Rr=Rr):
                    inv = 1.0 / (X.theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
                    slow = (inv * 512 < 0.75).float()
                    b = X.kb[i].view(H, D) * torch.cat([slow, slow]).float()
                    return P.KQuant(Rr, -torch.einsum("hij,hj->hi", Rr, b))
                show(f"kbias static r={r}", X.errs(skb))
    elif a == "tokens":
        keep = torch.tensor([0])
        show("saw K", X.errs(lambda i: P.KQuant(RH)))
        show("saw K keep pos0", X.errs(lambda i: P.KQuant(RH, keep=keep)))
        show("int4 V", X.errs(None, lambda i: P.KQuant()))
        show("int4 V keep pos0", X.errs(None, lambda i: P.KQuant(keep=keep)))
        print("layer  attn->pos0  |k0|/med|k|  |v0|/med|v|  max|mean k|/rms  ")
        for i in range(L):
            q, k, v = X.q[i], X.k[i], X.v[i]
            g = q.shape[1] // H
            s = torch.einsum("whld,whmd->whlm", q, k.repeat_interleave(g, 1)) * X.scale
            s = s.masked_fill(~torch.ones(s.shape[-1], s.shape[-1], dtype=torch.bool).tril(), float("-inf"))
            a0 = float(s.softmax(-1)[..., 16:, 0].mean())
            kn = k.norm(dim=-1)
            vn = v.norm(dim=-1)
            kk = flat(k)
            mu = kk.mean(0)
            rms = (kk - mu).pow(2).mean(0).sqrt()
            print(f"{i:5d} {a0:10.3f} {float((kn[..., 0] / kn.median(-1).values).mean()):12.2f} "
                  f"{float((vn[..., 0] / vn.median(-1).values).mean()):12.2f} "
                  f"{float((mu.abs() / rms.mean(-1, keepdim=True)).max()):12.2f}")
    else:
        raise SystemExit(a)
