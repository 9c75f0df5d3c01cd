"""Why `sawint4 eval` moves between package stacks: dump what each stage of the eval sees, under one stack,
then compare two dumps (docs/eval_reproducibility.md).

    python scripts/eval_stack_drift.py dump --out A.pt     # in the first stack's environment
    python scripts/eval_stack_drift.py dump --out B.pt     # in the second
    python scripts/eval_stack_drift.py compare A.pt B.pt   # any environment with torch

Stages, in the eval's order: the tokens of the eval windows (tokenizer built from the GGUF file), the
model config (RoPE, norms), the dequantized weights (GGUF -> float32), the RoPE tables, then the logits
of the default eval's bf16 row (float32 model, SDPA, no cache) and of the model through the paged cache
(`sawint4_paged`, bf16 and saw_int4 rows, per-window NLL). The first stage that differs is the cause;
the later ones show how far it carries.
"""

from __future__ import annotations

import argparse
import hashlib
import sys


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "triton", "transformers", "gguf", "numpy", "accelerate", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def dump(args) -> int:
    import torch

    import trtllm_sawint4.integrations.transformers as hf
    from trtllm_sawint4 import KVCacheSpec
    from trtllm_sawint4.eval import data
    from trtllm_sawint4.eval.main import chunk_schedule

    torch.set_num_threads(args.threads)
    loaded = data.load_model()
    model, tok = loaded.model, loaded.tokenizer
    split = data.split_text(tok, args.windows, args.window_len, 0, 8)
    ids = split.eval_ids
    cfg = model.config
    config = {k: getattr(cfg, k, None) for k in ("rope_theta", "rope_scaling", "rope_parameters", "rms_norm_eps",
                                                 "max_position_embeddings", "tie_word_embeddings", "hidden_act",
                                                 "head_dim", "num_key_value_heads", "vocab_size", "torch_dtype")}
    config = {k: (v if isinstance(v, (int, float, str, bool, type(None), dict, list)) else str(v))
              for k, v in config.items()}
    weights = {name: p.detach().float().clone() for name, p in model.state_dict().items()}
    digests = {name: hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16] for name, w in weights.items()}
    pos = torch.arange(args.window_len)[None]
    rotary = model.model.rotary_emb
    cos, sin = rotary(torch.zeros(1, args.window_len, 1), pos)
    with torch.inference_mode():
        logits = torch.cat([model(input_ids=ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll_sdpa = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [W, L-1]
    num_layers, kv_heads, head_dim = hf.model_dims(cfg)
    paged = {}
    for fmt in args.formats.split(","):
        spec = KVCacheSpec(head_dim=head_dim, num_kv_heads=kv_heads, tokens_per_block=64,
                           **({"kv_format": fmt} if fmt != "saw_int4" else {}))
        model.set_attn_implementation("sawint4_paged")
        nll = torch.zeros(ids.shape[0], args.window_len - 1, dtype=torch.float64)
        with torch.inference_mode():
            cache = hf.SawInt4Cache(model, spec, max_tokens=args.window_len, batch_size=ids.shape[0])
            at = 0
            for n in chunk_schedule(args.window_len, 2):
                lg = model(input_ids=ids[:, at:at + n], **hf.cache_kwarg(model, cache), use_cache=True).logits.float()
                end = min(at + n, args.window_len - 1)
                if end > at:
                    lp = torch.log_softmax(lg[:, :end - at], -1)
                    nll[:, at:end] = -lp.gather(-1, ids[:, at + 1:end + 1, None]).squeeze(-1).double()
                at += n
        model.set_attn_implementation("sdpa")
        paged[fmt] = nll
    torch.save({"versions": _versions(), "ids": ids, "config": config, "digests": digests, "weights": weights,
                "cos": cos, "sin": sin, "logits_first": logits[0, :64].clone(), "nll_sdpa": nll_sdpa,
                "argmax_sdpa": logits.argmax(-1), "paged_nll": paged}, args.out)
    print(f"wrote {args.out}: {_versions()}")
    return 0


def compare(args) -> int:
    import math

    import torch

    a, b = (torch.load(p, weights_only=False) for p in (args.a, args.b))
    print("versions A:", a["versions"])
    print("versions B:", b["versions"])
    same_ids = a["ids"].shape == b["ids"].shape and torch.equal(a["ids"], b["ids"])
    print(f"1. eval tokens: {'identical' if same_ids else 'DIFFER'}"
          + ("" if same_ids else f" ({(a['ids'] != b['ids']).float().mean().item():.1%} of positions)"))
    diff_cfg = {k: (a["config"].get(k), b["config"].get(k)) for k in set(a["config"]) | set(b["config"])
                if a["config"].get(k) != b["config"].get(k)}
    print(f"2. config: {'identical' if not diff_cfg else diff_cfg}")
    names = sorted(set(a["weights"]) | set(b["weights"]))
    differ = [n for n in names if a["digests"].get(n) != b["digests"].get(n)]
    print(f"3. dequantized weights: {len(names) - len(differ)} of {len(names)} tensors bit-identical")
    for n in differ[:12]:
        wa, wb = a["weights"].get(n), b["weights"].get(n)
        if wa is None or wb is None or wa.shape != wb.shape:
            print(f"   {n}: {None if wa is None else tuple(wa.shape)} vs {None if wb is None else tuple(wb.shape)}")
        else:
            print(f"   {n}: max |diff| {(wa - wb).abs().max().item():.3g} (max |w| {wa.abs().max().item():.3g})")
    print(f"4. RoPE cos/sin: max |diff| {(a['cos'] - b['cos']).abs().max().item():.3g} / "
          f"{(a['sin'] - b['sin']).abs().max().item():.3g}")
    dl = (a["logits_first"] - b["logits_first"]).abs().max().item()
    print(f"5. logits, float32 model, SDPA, no cache (window 0, first 64 positions): max |diff| {dl:.3g}")
    count = a["nll_sdpa"].numel()
    ppl = lambda nll: math.exp(float(nll.sum()) / nll.numel())  # noqa: E731
    agree = (a["argmax_sdpa"] == b["argmax_sdpa"]).float().mean().item() if same_ids else float("nan")
    print(f"   ppl over {count} tokens: {ppl(a['nll_sdpa']):.4f} vs {ppl(b['nll_sdpa']):.4f}; argmax agreement {agree:.2%}")
    print("6. through the paged cache (per-window NLL, the eval's rows):")
    base_a, base_b = a["paged_nll"].get("bf16"), b["paged_nll"].get("bf16")
    for fmt in a["paged_nll"]:
        if fmt not in b["paged_nll"]:
            continue
        na, nb = a["paged_nll"][fmt], b["paged_nll"][fmt]
        line = f"   {fmt:9s} ppl {ppl(na):.3f} vs {ppl(nb):.3f}"
        if fmt != "bf16" and base_a is not None and base_b is not None:
            da, db = 100 * (ppl(na) / ppl(base_a) - 1), 100 * (ppl(nb) / ppl(base_b) - 1)
            w = na.shape[0]
            per_win = lambda n, base: (n.sum(1) - base.sum(1)) / n.shape[1]  # noqa: E731
            se = lambda x: float(x.std() / math.sqrt(w)) * 100  # noqa: E731
            line += (f"; vs bf16 {da:+.2f}% (±{se(per_win(na, base_a)):.2f}) vs {db:+.2f}% (±{se(per_win(nb, base_b)):.2f})"
                     f"; A-B per-token NLL max |diff| {(na - nb).abs().max().item():.3g}")
        else:
            line += f"; A-B per-token NLL max |diff| {(na - nb).abs().max().item():.3g}"
        print(line)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--out", required=True)
    d.add_argument("--windows", type=int, default=4)
    d.add_argument("--window-len", type=int, default=512)
    d.add_argument("--formats", default="bf16,int4,saw_int4")
    d.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = p.parse_args(argv)
    return dump(args) if args.cmd == "dump" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
