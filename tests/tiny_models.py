"""Tiny random-weight causal LMs built from real transformers configs, for engine and integration tests.

Each keeps its architecture's peculiarity: Llama (plain GQA), Qwen2 (q/k/v bias: K bias), Qwen3 (q/k RMSNorm),
Mistral, Gemma-3 (head_dim 256, sliding-window layers, query_pre_attn_scalar scaling). The LM head is scaled
up so that greedy choices have clear margins: token-for-token comparisons then test the engine, not float
rounding between two equally likely tokens.
"""

from __future__ import annotations

import torch

KINDS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
VOCAB = 96


def tiny_config(kind: str, *, sliding_window: int | None = None, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    if kind == "llama":
        return tf.LlamaConfig(**common)
    if kind == "qwen2":  # q/k/v projections with bias
        return tf.Qwen2Config(**common)
    if kind == "qwen3":  # q/k RMSNorm before RoPE
        return tf.Qwen3Config(**common)
    if kind == "mistral":
        return tf.MistralConfig(**common, sliding_window=sliding_window)
    if kind == "gemma3":  # head_dim 256, two sliding-window layers then a full one
        common.update(num_attention_heads=2, num_key_value_heads=1, head_dim=256, num_hidden_layers=max(layers, 3))
        n = common["num_hidden_layers"]
        types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(n)]
        return tf.Gemma3TextConfig(**common, sliding_window=sliding_window or 4096, layer_types=types)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0, dtype=torch.float32, **kw):
    import transformers as tf

    cfg = tiny_config(kind, **kw)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
           "mistral": tf.MistralForCausalLM, "gemma3": tf.Gemma3ForCausalLM}[kind]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        if kind == "qwen2":  # make the K bias large enough to matter
            for layer in model.model.layers:
                layer.self_attn.k_proj.bias.normal_(0, 1.0)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def reference_greedy(model, prompt: list[int], n: int, kv_format: str | None, tokens_per_block: int = 8) -> list[int]:
    """`model.generate()` greedy tokens: through SawInt4Cache in `kv_format`, or stock transformers (sdpa,
    DynamicCache) for kv_format=None. Leaves the model on sdpa."""
    from trtllm_sawint4.integrations.transformers import SawInt4Cache, cache_kwarg, spec_for_config

    ids = torch.tensor([prompt])
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        if kv_format is None:
            model.set_attn_implementation("sdpa")
            out = model.generate(ids, **kwargs)
        else:
            model.set_attn_implementation("sawint4_paged")
            cache = SawInt4Cache(model, spec_for_config(model.config, kv_format, tokens_per_block=tokens_per_block),
                                 max_tokens=len(prompt) + n)
            out = model.generate(ids, **cache_kwarg(model, cache), **kwargs)
    model.set_attn_implementation("sdpa")
    return out[0, len(prompt):].tolist()


class CharTokenizer:
    """A character tokenizer (token i <-> one character) with the two calls the engine makes."""

    alphabet = "abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def __init__(self, vocab: int = VOCAB, eos_token_id: int | None = None):
        self.vocab = vocab
        self.eos_token_id = eos_token_id

    def _char(self, i: int) -> str:
        return self.alphabet[i % len(self.alphabet)]

    def __call__(self, text: str):
        return {"input_ids": [self.alphabet.index(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return "".join(self._char(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))
