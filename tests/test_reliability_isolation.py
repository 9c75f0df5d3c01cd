"""Cache isolation through PagedKVCache: an append for one sequence never changes a byte outside
its new slots, attention never writes the pool, forks share prefixes without touching them, and
a random soak of add / plan+append / attend / fork / free keeps every invariant (the soak driver is
tests/soak.py, shared with the GPU soak).
"""

from __future__ import annotations

import os

import pytest
import torch

import trtllm_sawint4.ops  # noqa: F401
from trtllm_sawint4 import KVCacheSpec, OutOfBlocks, PagedKVCache

from helpers import SPECS, dense_attention
from soak import Soak, block_digests

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- CPU tests -----------------------------------------------------------------------------------------


CPU_SOAK_STEPS = int(os.environ.get("SAWINT4_CPU_SOAK_STEPS", "200"))


@pytest.mark.parametrize("fmt", ["saw_int4_v_signs", "int8", "bf16"])
def test_cpu_soak_random_steps_keep_isolation_and_match_dense(fmt):
    spec = KVCacheSpec(32, 2, 8, **SPECS[fmt])
    soak = Soak(spec, num_layers=2, num_blocks=40, seed=sum(map(ord, fmt)), max_seqs=8, max_prefill=20, max_len=64,
                max_batch=6)
    for _ in range(CPU_SOAK_STEPS):
        soak.step()
    for op in ("admit", "fork", "free", "decode", "prefill"):
        assert soak.counts.get(op, 0) > 0, f"the soak never ran {op}: {soak.counts}"
    soak.finish()


def _cache_with_forks(fmt="saw_int4"):
    spec = KVCacheSpec(32, 2, 8, **SPECS[fmt])
    cache = PagedKVCache(spec, num_layers=2, num_blocks=24)
    g = torch.Generator().manual_seed(0)
    parent = cache.add_sequence()
    plan = cache.plan([parent], [13])  # one full block + 5 rows
    for layer in range(2):
        cache.append(layer, plan, torch.randn(13, 2, 32, generator=g), torch.randn(13, 2, 32, generator=g))
    child = cache.fork(parent)
    grandchild = cache.fork(child)
    other = cache.add_sequence()
    plan = cache.plan([other], [9])
    for layer in range(2):
        cache.append(layer, plan, torch.randn(9, 2, 32, generator=g), torch.randn(9, 2, 32, generator=g))
    return cache, [parent, child, grandchild, other], g


@pytest.mark.parametrize("fmt", ["saw_int4", "bf16"])
def test_append_for_one_sequence_changes_no_block_it_does_not_own(fmt):
    cache, seqs, g = _cache_with_forks(fmt)
    a = cache.allocator
    shared = a.sequences[seqs[0]].blocks[0]
    assert a.owners(shared) == 3
    for s in seqs:
        before = block_digests(cache.pools)
        own_partial = a.sequences[s].blocks[-1] if a.sequences[s].length % 8 else None
        plan = cache.plan([s], [4])
        new_blocks = set(a.sequences[s].blocks) - ({own_partial} | set(a.sequences[s].blocks[:-1]))
        for layer in range(2):
            cache.append(layer, plan, torch.randn(4, 2, 32, generator=g), torch.randn(4, 2, 32, generator=g))
        after = block_digests(cache.pools)
        changed = {b for b in range(len(after)) if after[b] != before[b]}
        allowed = ({own_partial} if own_partial is not None else set()) | new_blocks | set(
            a.sequences[s].blocks[-1:])
        assert changed and changed <= allowed, f"seq {s} changed {changed}, may change {allowed}"
        assert shared not in changed


@pytest.mark.parametrize("fmt", list(SPECS))
def test_attend_never_writes_the_pool(fmt):
    cache, seqs, g = _cache_with_forks(fmt)
    before = cache.pools.clone()
    for new in ([1, 1, 1, 1], [0, 0, 0, 0]):
        plan = cache.plan(seqs, new) if new[0] == 0 else None
        if plan is None:  # decode over what is there: plan with no new tokens, then attend as decode
            plan = cache.plan(seqs, [0, 0, 0, 0])
            plan.is_decode = True
        for layer in range(2):
            out = cache.attend(layer, plan, torch.randn(4, 4, 32, generator=g), 0.2)
            assert bool(torch.isfinite(out).all())
    plan = cache.plan(seqs, [0, 0, 0, 0])
    for layer in range(2):
        cache.attend(layer, plan, torch.zeros(0, 4, 32), 0.2)  # prefill with no queries
    assert torch.equal(cache.pools, before)


def test_free_then_reuse_does_not_leak_stale_rows_into_attention():
    """A recycled block still holds the old sequence's bytes; the new owner's attention must read only
    its own rows (its output equals that of a fresh cache)."""
    spec = KVCacheSpec(32, 1, 8, kv_format="int4")
    g = torch.Generator().manual_seed(1)
    k_new, v_new, q = torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 32, generator=g), torch.randn(1, 1, 32)
    outs = []
    for dirty in (True, False):
        cache = PagedKVCache(spec, num_layers=1, num_blocks=2)
        if dirty:
            old = cache.add_sequence()
            cache.append(0, cache.plan([old], [16]), torch.full((16, 1, 32), 1e4), torch.full((16, 1, 32), 1e4))
            cache.free(old)
        s = cache.add_sequence()
        cache.append(0, cache.plan([s], [3]), k_new, v_new)
        plan = cache.plan([s], [0])
        plan.is_decode = True
        outs.append(cache.attend(0, plan, q, 0.2))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("failure", ["out_of_blocks", "unknown_seq"])
def test_failed_plan_leaves_the_cache_unchanged(failure):
    cache = PagedKVCache(KVCacheSpec(32, 1, 8, kv_format="int4"), num_layers=1, num_blocks=3)
    a, b = cache.add_sequence(), cache.add_sequence()
    with pytest.raises(OutOfBlocks if failure == "out_of_blocks" else KeyError):
        cache.plan([a, b], [8, 100]) if failure == "out_of_blocks" else cache.plan([a, 99], [8, 1])
    assert cache.seq_len(a) == 0 and cache.allocator.num_free == 3
