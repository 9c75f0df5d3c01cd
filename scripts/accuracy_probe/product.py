"""Local K error of the package's calibrations (trtllm_sawint4.calibration) on recorded q/k/v."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lib as P  # noqa: E402
from local import CACHE, Layerwise  # noqa: E402

from trtllm_sawint4.calibration import ChannelCalibration, KeyQueryStats  # noqa: E402
from trtllm_sawint4.spec import KVCacheSpec  # noqa: E402
from trtllm_sawint4.transforms import build_layer_transform  # noqa: E402

torch.set_num_threads(1)
model_name, text = sys.argv[1], sys.argv[2]
X = Layerwise(model_name, text)
L, H, D = X.L, X.H, X.D
cq, ck, cv = torch.load(CACHE / f"{model_name}_{text}_calib_kv.pt")
st = KeyQueryStats(L, H, D)
for i in range(L):
    st.add_keys(i, ck[i].permute(0, 2, 1, 3).reshape(-1, H, D))
    st.add_queries(i, cq[i].permute(0, 2, 1, 3).reshape(-1, cq[i].shape[1], D))
spec = KVCacheSpec(head_dim=D, num_kv_heads=H)


def kq_of(cal, i, **spec_kw):
    sp = KVCacheSpec(head_dim=D, num_kv_heads=H, **spec_kw) if spec_kw else spec
    tf = build_layer_transform(sp, **({} if cal is None else cal.layer_args(i)))
    return P.KQuant(tf.k_matrix, tf.k_bias)


def show(name, cal, **kw):
    e = X.errs(lambda i: kq_of(cal, i, **kw))
    print(f"{name:<40} sum {sum(e):.4f}  L0 {e[0]:.4f} L1 {e[1]:.4f} L2 {e[2]:.4f} max L{max(range(L), key=lambda i: e[i])}",
          flush=True)


for a in sys.argv[3:]:
    if a == "kbias":
        show("int4", None, kv_format="int4")
        show("saw (paper)", None)
        if X.kb[0] is None:
            continue
        for mp, ang in ((32768, 1.0), (4096, 0.5), (4096, 1.0), (512, 0.75)):
            show(f"kbias {mp}/{ang}", ChannelCalibration.from_key_bias(X.kb, H, X.theta, mp, ang))
        show("int4 + kbias 32768/1", ChannelCalibration.from_key_bias(X.kb, H, X.theta, 32768, 1.0),
             kv_format="int4")
    elif a == "methods":
        show("channel p.5", ChannelCalibration.from_stats(st, "channel"))
        show("qk-channel", ChannelCalibration.from_stats(st, "qk-channel"))
        for sh in (0.0, 0.05, 0.1, 0.2, 0.4):
            show(f"qk-dense shrink {sh}", ChannelCalibration.from_stats(st, "qk-dense", shrinkage=sh))
    elif a == "diagshrink":
        import trtllm_sawint4.calibration as C
        orig = C._shrink
        C._shrink = lambda a, amount: (1 - amount) * a + amount * torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))
        for sh in (0.05, 0.1, 0.2, 0.4):
            show(f"qk-dense diag-shrink {sh}", ChannelCalibration.from_stats(st, "qk-dense", shrinkage=sh))
        C._shrink = orig
    else:
        raise SystemExit(a)


def _shrink_diag(a, amount):
    return (1 - amount) * a + amount * torch.diag_embed(torch.diagonal(a, dim1=-2, dim2=-1))


if "diagshrink" in sys.argv[3:] or os.environ.get("DIAGSHRINK"):
    pass
