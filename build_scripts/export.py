"""Export a small Llama-architecture transformers model to ONNX (opset 23) with one standard
`Attention` node per layer, ready for `sawint4 insert`.

The recipe (the project's shared environment notes): torch.onnx.export(dynamo=True,
opset_version=23) of a model whose attention function calls
scaled_dot_product_attention(is_causal=True, enable_gqa=True) with no mask, so each layer
exports as Attention(Q[B,HQ,S,D], K[B,H,S,D], V[B,H,S,D]) without K/V repetition. Such a graph
is correct on its own for prefill only (is_causal aligns to the start); after `sawint4 insert` the
paged cache gives it decode and chunked prefill too. The example batch has 2 rows and explicit
position_ids so that batch and sequence stay dynamic.

    python -m trtllm_sawint4.build_scripts.export OUT.onnx [--layers 2 --hidden 128 ...]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ATTENTION_NAME = "sawint4_onnx_export"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    import torch.nn.functional as F

    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register the export attention function with transformers; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _attention)
    return ATTENTION_NAME


def small_llama(*, layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=256,
                max_positions=512, seed=0, dtype=None):
    """A random-weight LlamaForCausalLM (eval mode) using the export attention function."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    cfg._attn_implementation = register_attention()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def _logits_only(model):
    """forward(input_ids, position_ids) -> logits of a causal LM (no cache, no mask), for export."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, position_ids):
            return self.m(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_model(model, path, *, example_batch=2, example_seq=8, opset=23) -> Path:
    """Export `model` (a transformers causal LM with the export attention) to `path`.
    Graph inputs input_ids, position_ids (int64 [batch, seq]); output logits [batch, seq, vocab]."""
    import torch

    if model.config._attn_implementation != ATTENTION_NAME:
        raise ValueError(f"set model.config._attn_implementation = {ATTENTION_NAME!r} (register_attention()) so that "
                         f"each layer exports as one ONNX Attention node")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (example_batch, example_seq), generator=g)
    pos = torch.arange(example_seq)[None].repeat(example_batch, 1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _logits_only(model), (ids, pos), dynamo=True, opset_version=opset, verbose=False,
            input_names=["input_ids", "position_ids"], output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq}})
    program.save(str(path))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = small_llama(layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim,
                        vocab=a.vocab, seed=a.seed)
    print(export_model(model, a.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
