"""FAKE auto_deploy::torch_attention (tests only): the source op that AutoDeploy's graph matchers
produce, with the documented signature (q, k, v, attn_mask, dropout_p, is_causal, scale, sinks,
sliding_window, logit_cap, layout). This implementation covers what the tests call: causal or full
GQA attention without mask, sinks, window or cap, layout 'bsnd' or 'bnsd'."""

from typing import Optional

import torch
import torch.nn.functional as F


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, sinks=None,
               sliding_window=None, logit_cap=None, layout="bnsd"):
    if layout == "bsnd":
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    out = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=is_causal,
                                         scale=scale, enable_gqa=True).to(query.dtype)
    return out.transpose(1, 2).contiguous() if layout == "bsnd" else out


def _define():
    try:
        torch.ops.auto_deploy.torch_attention.default
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("auto_deploy::torch_attention", mutates_args=())
    def torch_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: Optional[float] = None, sinks: Optional[torch.Tensor] = None,
                        sliding_window: Optional[int] = None, logit_cap: Optional[float] = None,
                        layout: str = "bnsd") -> torch.Tensor:
        return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks, sliding_window,
                          logit_cap, layout)

    @torch_attention.register_fake
    def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, sinks=None,
          sliding_window=None, logit_cap=None, layout="bnsd"):
        return query.new_empty(query.shape)


_define()
