"""A ragged serving workload for the warm-up tests (CPU interpreter and GPU): what a demanding client mix
makes the engine step through."""

from __future__ import annotations

import torch

from trtllm_sawint4.serving.api import SamplingParams

#: (step it arrives at, prompt length, max_tokens): one sequence alone, a burst of 17 (a step of more than
#: 16 sequences), prompts longer than a 40-token step (chunked prefill), arrivals while others decode (mixed
#: steps), sequences reaching every block-table width of a 64-token engine at 8 tokens per block
RAGGED_ARRIVALS = ([(0, 5, 2), (3, 1, 2)] + [(6, 2 + (i * 7) % 13, 1 + i % 3) for i in range(17)]
                   + [(9, 45, 2), (10, 20, 30), (12, 16, 3)])


def serve(engine, arrivals, vocab: int, seed: int = 3) -> int:
    """Run `arrivals` to completion (random prompts); returns the number of steps taken."""
    g = torch.Generator().manual_seed(seed)
    pending = sorted(arrivals)
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, n, out = pending.pop(0)
            prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
            engine.add_request(f"r{step}_{len(pending)}", prompt, SamplingParams(max_tokens=out, ignore_eos=True))
        for e in engine.step():
            assert e.finish_reason not in ("error", "abort"), e.error
        step += 1
        assert step < 500
    return step
