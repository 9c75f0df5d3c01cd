"""Accuracy probe helpers: record a model's bf16 Q/K/V per layer, fake-quantize K/V through quant.py.

The probe scripts (record.py, analyze.py, product.py) locate where token-wise INT4 loses accuracy
(docs/accuracy.md) without running the model once per variant. Not part of the package; the numbers
that count (`sawint4 eval`) run through the paged cache.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trtllm_sawint4.integrations.transformers import cache_kwarg
from trtllm_sawint4.quant import dequantize, quantize

_REC = {"on": False, "q": {}}


def _record_attention(module, query, key, value, attention_mask, **kw):
    if _REC["on"]:
        _REC["q"].setdefault(module.layer_idx, []).append(query.detach().float().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)


AttentionInterface.register("probe_record", _record_attention)


class RecCache(DynamicCache):
    def __init__(self, config, store):
        super().__init__(config=config)
        self.store = store

    def update(self, k, v, layer_idx, *a, **kw):
        self.store.setdefault(layer_idx, []).append((k.detach().float().clone(), v.detach().float().clone()))
        return super().update(k, v, layer_idx, *a, **kw)


@torch.inference_mode()
def record_qkv(model, ids):
    """ids [W, L] -> (q list per layer [W,Hq,L,D], k [W,H,L,D], v [W,H,L,D]) from one forward per window."""
    model.set_attn_implementation("probe_record")
    _REC["on"], _REC["q"] = True, {}
    store = {}
    for w in range(ids.shape[0]):
        model(input_ids=ids[w:w + 1], **cache_kwarg(model, RecCache(model.config, store)), use_cache=True)
    _REC["on"] = False
    model.set_attn_implementation("sdpa")
    n = len(store)
    q = [torch.cat(_REC["q"][i]) for i in range(n)]
    k = [torch.cat([kv[0] for kv in store[i]]) for i in range(n)]
    v = [torch.cat([kv[1] for kv in store[i]]) for i in range(n)]
    return q, k, v


def fq_tokens(x, levels=15, meta="fp16"):
    return dequantize(*quantize(x, levels, meta))


class KQuant:
    """k^ = M^-1 (Q(M k + b) - b) per head; M [H,D,D] or None, b [H,D] or None.
    keep: LongTensor of token positions kept exact (within each window, absolute position)."""

    def __init__(self, M=None, b=None, levels=15, meta="fp16", keep=None, groups=1):
        self.M, self.b, self.levels, self.meta, self.keep, self.groups = M, b, levels, meta, keep, groups
        self.Minv = None if M is None else torch.linalg.inv(M.double()).float()

    def __call__(self, k):  # [B,H,L,D]
        x = k.float()
        if self.M is not None:
            x = torch.einsum("hij,bhlj->bhli", self.M, x)
        if self.b is not None:
            x = x + self.b[None, :, None, :]
        if self.groups > 1:
            sh = x.shape
            y = fq_tokens(x.reshape(*sh[:-1], self.groups, sh[-1] // self.groups), self.levels, self.meta).reshape(sh)
        else:
            y = fq_tokens(x, self.levels, self.meta)
        if self.b is not None:
            y = y - self.b[None, :, None, :]
        if self.Minv is not None:
            y = torch.einsum("hij,bhlj->bhli", self.Minv, y)
        if self.keep is not None:
            y[:, :, self.keep] = k.float()[:, :, self.keep]
        return y.to(k.dtype)


class FQCache(DynamicCache):
    """DynamicCache returning per-layer fake-quantized K/V (full-window forward: one update per layer)."""

    def __init__(self, config, kq, vq):
        super().__init__(config=config)
        self.kq, self.vq = kq, vq  # dicts layer -> callable or None

    def update(self, k, v, layer_idx, *a, **kw):
        k = k.to(torch.bfloat16).float()
        v = v.to(torch.bfloat16).float()
        fk, fv = self.kq.get(layer_idx), self.vq.get(layer_idx)
        if fk is not None:
            k = fk(k)
        if fv is not None:
            v = fv(v)
        return super().update(k, v, layer_idx, *a, **kw)


@torch.inference_mode()
def logprobs(model, ids, kq=None, vq=None, batch=2):
    """log-softmax [W, L-1, V] (bf16) of a full-window forward with fake-quantized K/V."""
    model.set_attn_implementation("sdpa")
    outs = []
    for s in range(0, ids.shape[0], batch):
        x = ids[s:s + batch]
        cache = FQCache(model.config, kq or {}, vq or {})
        lg = model(input_ids=x, **cache_kwarg(model, cache), use_cache=True).logits
        outs.append(torch.log_softmax(lg[:, :-1].float(), -1).to(torch.bfloat16))
    return torch.cat(outs)


def compare(base_lp, lp, ids):
    """(delta ppl %, mean KL(base||lp), per-window delta nll) from log-probs."""
    tgt = ids[:, 1:, None]
    nb = -base_lp.float().gather(-1, tgt).squeeze(-1)
    nq = -lp.float().gather(-1, tgt).squeeze(-1)
    pb = base_lp.float().exp()
    kl = (pb * (base_lp.float() - lp.float())).sum(-1)
    dppl = 100 * (math.exp(nq.mean()) / math.exp(nb.mean()) - 1)
    return dppl, float(kl.mean()), (nq.mean(1) - nb.mean(1))


PRESETS = {"smollm2": "smollm2-135m", "qwen": "qwen2.5-coder-0.5b"}
#: where recordings go (a few hundred MB per model and text)
CACHE = Path(os.environ.get("SAWINT4_PROBE_DIR") or Path(tempfile.gettempdir()) / "sawint4_probe")


def load(name):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from trtllm_sawint4.eval import data
    return data.load_model(preset=PRESETS[name])
