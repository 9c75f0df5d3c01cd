"""Tiny random-weight causal LMs built from real transformers configs, for engine and integration tests.

Each keeps its architecture's peculiarity: Llama (plain GQA), Qwen2 (q/k/v bias: K bias), Qwen3 (q/k RMSNorm),
Mistral, Gemma-3 (head_dim 256, sliding-window layers, query_pre_attn_scalar scaling). The LM head is scaled
up so that most greedy choices have clear margins. Where the engine and `generate()` run one float path
(the CPU tests) their tokens must be equal; where they round differently (kernels at other batch shapes on a
GPU) `assert_agree_with_greedy` lets a sequence leave generate()'s path only at a near-tie.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    return scored_reference_greedy(model, prompt, n, kv_format, tokens_per_block).tokens


@dataclass(frozen=True)
class GreedyReference:
    """generate()'s greedy tokens with, at each step, its top-1 minus top-2 logit and its second choice."""

    tokens: list[int]
    margins: list[float]
    runners_up: list[int]


def scored_reference_greedy(model, prompt: list[int], n: int, kv_format: str | None,
                            tokens_per_block: int = 8) -> GreedyReference:
    """reference_greedy with the margin of every choice (for agrees_with_greedy)."""
    from trtllm_sawint4.integrations.transformers import SawInt4Cache, cache_kwarg, spec_for_config

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
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
    top = [logits[0].float().topk(2) for logits in out.logits]
    return GreedyReference(out.sequences[0, len(prompt):].tolist(), [(t.values[0] - t.values[1]).item() for t in top],
                           [int(t.indices[1]) for t in top])


#: generate()'s top-1/top-2 logit gap below which the engine may take the other token. Where the engine
#: and generate() run the kernels at different batch shapes (on a GPU: bf16 dots, other tiles, a decode
#: kernel where generate() ran the prefill one), their logits differ by rounding, ~1e-2 here; the tiny
#: models' logits have a standard deviation of ~1.2 and a median gap of ~0.4 (0.003-0.02 at their closest).
NEAR_TIE = 0.05


def agrees_with_greedy(got: list[int], ref: GreedyReference, near_tie: float = NEAR_TIE) -> str | None:
    """None when `got` equals generate()'s tokens, or equals them up to a step where generate()'s choice was
    a near-tie and `got` took its second choice (from there the two continue different texts); otherwise
    what differs."""
    for i, (a, b) in enumerate(zip(got, ref.tokens)):
        if a != b:
            if ref.margins[i] < near_tie and a == ref.runners_up[i]:
                return None
            return (f"token {i}: engine {a}, generate() {b} (margin {ref.margins[i]:.4f}, second choice "
                    f"{ref.runners_up[i]}); engine {got}, generate() {ref.tokens}")
    return None if len(got) == len(ref.tokens) else f"lengths differ: engine {got}, generate() {ref.tokens}"


def assert_agree_with_greedy(got: list[list[int]], refs: list[GreedyReference], max_near_ties: int = 2) -> None:
    """Every sequence agrees (agrees_with_greedy), and at most `max_near_ties` of them leave generate()'s path
    at a near-tie (the rest are equal token for token)."""
    errors = [f"prompt {i}: {e}" for i, (g, r) in enumerate(zip(got, refs)) if (e := agrees_with_greedy(g, r))]
    assert len(got) == len(refs) and not errors, "\n".join(errors)
    ties = sum(g != r.tokens for g, r in zip(got, refs))
    assert ties <= max_near_ties, f"{ties} of {len(refs)} sequences left generate()'s path at a near-tie"


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
