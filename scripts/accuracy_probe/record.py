"""Record Q/K/V and run fake-quantization perplexity experiments.

usage: record.py {smollm2,qwen} {bbc,hamlet} EXP...   (EXP: record, int4, saw, calib, sink, layer0, perlayer*)

`record` saves the eval windows' Q/K/V per layer, the held-out calibration windows' Q/K/V, the bf16
log-probs and the o_proj/K-bias weights under SAWINT4_PROBE_DIR; the other experiments print the
perplexity change and KL divergence of a full-window forward with fake-quantized K/V."""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lib as P  # noqa: E402
from lib import CACHE  # noqa: E402

from trtllm_sawint4.hadamard import rotation_matrix  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
CACHE.mkdir(exist_ok=True)
model_name, text = sys.argv[1], sys.argv[2]
exps = sys.argv[3:]

t0 = time.time()
loaded = P.load(model_name)
model, tok = loaded.model, loaded.tokenizer
cfg = model.config
L = cfg.num_hidden_layers
H = cfg.num_key_value_heads
D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
print(f"loaded {model_name} in {time.time()-t0:.0f}s", flush=True)


def windows(text):
    """The windows `sawint4 eval` scores and calibrates on (4 x 512 tokens, 2048 held-out tokens)."""
    from trtllm_sawint4.eval import data
    s = data.split_text(tok, 4, 512, 2048, 512, text=text)
    return s.eval_ids, s.calib_ids


ids, calib_ids = windows(text)
base_file = CACHE / f"{model_name}_{text}_base.pt"
if base_file.exists():
    base = torch.load(base_file)
else:
    base = P.logprobs(model, ids)
    torch.save(base, base_file)
print(f"base ready {time.time()-t0:.0f}s", flush=True)

kcal_file = CACHE / f"{model_name}_{text}_calib_kv.pt"
if kcal_file.exists():
    cq, ck, cv = torch.load(kcal_file)
else:
    cq, ck, cv = P.record_qkv(model, calib_ids)
    torch.save((cq, ck, cv), kcal_file)

R = rotation_matrix(D, min(D, 128))
RH = R[None].expand(H, D, D).contiguous()
results = {}


def run(name, kq=None, vq=None):
    t = time.time()
    lp = P.logprobs(model, ids, kq, vq)
    d, kl, dw = P.compare(base, lp, ids)
    results[name] = {"dppl": d, "kl": kl, "dwin": dw.tolist()}
    print(f"{name:<40} dppl {d:+7.2f}%  KL {kl:.4f}  win {[round(x*100,1) for x in dw.tolist()]}  "
          f"({time.time()-t:.0f}s)", flush=True)


def all_layers(f):
    return {i: f(i) for i in range(L)}


def calib_stats(i, power=0.5):
    k = ck[i].permute(0, 2, 1, 3).reshape(-1, H, D).double()  # [N,H,D]
    m = k.mean(0)
    rms = (k - m).pow(2).mean(0).sqrt().clamp_min(1e-6)
    s = rms.pow(power)
    s = s / s.log().mean(-1, keepdim=True).exp()
    return m.float(), s.float()


def calib_M(i, power=0.5):
    m, s = calib_stats(i, power)
    M = RH / s[:, None, :]
    b = -torch.einsum("hij,hj->hi", M, m)
    return M, b


for e in exps:
    if e == "record":
        f = CACHE / f"{model_name}_{text}_eval_qkv.pt"
        if not f.exists():
            torch.save(P.record_qkv(model, ids), f)
        wf = CACHE / f"{model_name}_weights.pt"
        if not wf.exists():
            lay = model.model.layers
            torch.save({"wo": [l.self_attn.o_proj.weight.detach().float().clone() for l in lay],
                        "kb": [None if l.self_attn.k_proj.bias is None else l.self_attn.k_proj.bias.detach().float().clone() for l in lay],
                        "qb": [None if l.self_attn.q_proj.bias is None else l.self_attn.q_proj.bias.detach().float().clone() for l in lay],
                        "rope_theta": getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"],
                        "dims": (L, H, D, cfg.num_attention_heads)}, wf)
        print("recorded", flush=True)
    elif e == "int4":
        run("int4 K+V", all_layers(lambda i: P.KQuant()), all_layers(lambda i: P.KQuant()))
        run("int4 K only", all_layers(lambda i: P.KQuant()), None)
        run("int4 V only", None, all_layers(lambda i: P.KQuant()))
    elif e == "saw":
        run("saw K+V", all_layers(lambda i: P.KQuant(RH)), all_layers(lambda i: P.KQuant()))
        run("saw K only", all_layers(lambda i: P.KQuant(RH)), None)
        run("saw +Vrot V only", None, all_layers(lambda i: P.KQuant(RH)))
    elif e == "calib":
        run("saw+calib K only", all_layers(lambda i: P.KQuant(*calib_M(i))), None)
        run("saw+calib K+V", all_layers(lambda i: P.KQuant(*calib_M(i))), all_layers(lambda i: P.KQuant()))
    elif e == "sink":
        keep = torch.tensor([0])
        run("saw K only keep pos0", all_layers(lambda i: P.KQuant(RH, keep=keep)), None)
        run("saw V only keep pos0", None, all_layers(lambda i: P.KQuant(keep=keep)))
        keep4 = torch.arange(4)
        run("saw K only keep pos0-3", all_layers(lambda i: P.KQuant(RH, keep=keep4)), None)
    elif e == "layer0":
        run("saw K only, layer0 exact", {i: P.KQuant(RH) for i in range(1, L)}, None)
        run("saw K only, layers0-1 exact", {i: P.KQuant(RH) for i in range(2, L)}, None)
        run("int4 K only, layer0 exact", {i: P.KQuant() for i in range(1, L)}, None)
        run("saw+calib K only, layer0 exact", {i: P.KQuant(*calib_M(i)) for i in range(1, L)}, None)
    elif e.startswith("perlayerK"):
        for i in range(L):
            run(f"saw K only layer {i}", {i: P.KQuant(RH)}, None)
    elif e.startswith("perlayerV"):
        for i in range(L):
            run(f"int4 V only layer {i}", None, {i: P.KQuant()})
    elif e.startswith("perlayerint4K"):
        for i in range(L):
            run(f"int4 K only layer {i}", {i: P.KQuant()}, None)
    else:
        raise SystemExit(f"unknown {e}")

out = CACHE / f"res_{model_name}_{text}_{'_'.join(exps)}.json"
out.write_text(json.dumps(results, indent=1))
print(f"done {time.time()-t0:.0f}s")
