"""Next-token choice from one step's last-token logits: greedy, or temperature / top-k / top-p sampling.

Each sampled request owns a `torch.Generator` (seeded from SamplingParams.seed, else from the engine's
seed stream), so its tokens do not depend on which other requests share the step. Greedy rows are one
batched argmax; sampled rows are filtered and drawn one row at a time (each with its own generator). The
whole step ends in one device-to-host copy of the chosen ids.
"""

from __future__ import annotations

import torch

from .api import SamplingParams


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row of logits [V] (float32) after temperature, top-k and top-p; removed tokens are -inf."""
    x = logits / params.temperature
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, -1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def choose_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> list[int]:
    """logits [R, V] float32, one row per request that samples this step -> R token ids."""
    if logits.shape[0] == 0:
        return []
    chosen = logits.argmax(-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            continue
        probs = torch.softmax(filtered_logits(logits[row], p), -1)
        chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen.tolist()


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
