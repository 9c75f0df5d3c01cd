"""Allocator, plan and the paged cache: forks, frees, isolation of sequences."""

import hashlib

import pytest
import torch

import trtllm_sawint4.ops  # noqa: F401  (registers torch.ops.sawint4)
from trtllm_sawint4 import BlockAllocator, KVCacheSpec, OutOfBlocks, PagedKVCache

from helpers import dense_attention


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_allocator_extend_fork_free_refcounts():
    a = BlockAllocator(8, tokens_per_block=4)
    s = a.add_sequence()
    assert a.extend(s, 6) == [0, 1, 2, 3, 4, 5]  # blocks 0, 1
    child, copy = a.fork(s)
    assert copy == (1, 2)  # partial block 1 copied into fresh block 2
    assert a.sequences[child].blocks == [0, 2] and a.owners(0) == 2
    assert a.extend(child, 3) == [2 * 4 + 2, 2 * 4 + 3, 3 * 4 + 0]
    a.free(s)
    assert a.owners(0) == 1 and a.owners(1) == 0
    a.free(child)
    assert a.num_free == 8
    with pytest.raises(KeyError, match="seq_id"):
        a.free(child)


def test_out_of_blocks_is_clean():
    a = BlockAllocator(2, tokens_per_block=4)
    s = a.add_sequence()
    with pytest.raises(OutOfBlocks):
        a.extend(s, 9)
    assert a.sequences[s].length == 0 and a.num_free == 2  # nothing half-done


def test_fork_of_block_aligned_sequence_shares_everything():
    a = BlockAllocator(4, tokens_per_block=4)
    s = a.add_sequence()
    a.extend(s, 8)
    child, copy = a.fork(s)
    assert copy is None and a.sequences[child].blocks == [0, 1]
    assert a.extend(child, 1) == [8]  # new block 2, the shared ones untouched


@pytest.mark.parametrize("fmt", ["saw_int4", "bf16"])
def test_cache_steps_match_dense_and_never_touch_other_sequences(fmt):
    spec = KVCacheSpec(64, 2, 8, kv_format=fmt)
    cache = PagedKVCache(spec, num_layers=2, num_blocks=40)
    gen = torch.Generator().manual_seed(1)
    seqs, history = [], {}
    for _ in range(3):
        s = cache.add_sequence()
        seqs.append(s)
        history[s] = (torch.zeros(0, 2, 64), torch.zeros(0, 2, 64))
    steps = [[5, 17, 1], [1, 1, 1], [9, 1, 3], [1, 1, 1]]
    for new in steps:
        # blocks already full before this step must come out of it bit for bit unchanged
        full = {s: cache.allocator.sequences[s].blocks[: cache.seq_len(s) // 8] for s in seqs}
        before = {s: [_digest(cache.pools[:, blk]) for blk in full[s]] for s in seqs}
        plan = cache.plan(seqs, new)
        k = torch.randn(sum(new), 2, 64, generator=gen)
        v = torch.randn(sum(new), 2, 64, generator=gen)
        q = torch.randn(sum(new), 4, 64, generator=gen)
        for layer in range(2):
            cache.append(layer, plan, k, v)
        out = cache.attend(1, plan, q, 0.125)
        starts = plan.query_start_loc.tolist()
        for i, s in enumerate(seqs):
            lo, hi = starts[i], starts[i + 1]
            hk, hv = history[s]
            history[s] = (torch.cat([hk, k[lo:hi]]), torch.cat([hv, v[lo:hi]]))
            want = dense_attention(spec, cache.transforms[1], q[lo:hi], *history[s], 0.125)
            torch.testing.assert_close(out[lo:hi], want, atol=2e-5, rtol=2e-5)
        for s in seqs:
            assert [_digest(cache.pools[:, blk]) for blk in full[s]] == before[s]
        owned = {b for s in seqs for b in cache.allocator.sequences[s].blocks}
        free = [b for b in range(40) if b not in owned]
        assert int(cache.pools[:, free].sum()) == 0  # no write outside the blocks handed out


def test_forked_sequences_diverge_without_touching_the_shared_prefix():
    spec = KVCacheSpec(64, 1, 8, kv_format="saw_int4")
    cache = PagedKVCache(spec, num_layers=1, num_blocks=16)
    parent = cache.add_sequence()
    k, v = torch.randn(12, 1, 64), torch.randn(12, 1, 64)
    cache.append(0, cache.plan([parent], [12]), k, v)
    child = cache.fork(parent)
    shared = cache.allocator.sequences[parent].blocks[0]
    assert cache.allocator.sequences[child].blocks[0] == shared
    shared_digest = _digest(cache.pools[:, shared])
    kc, vc = torch.randn(5, 1, 64), torch.randn(5, 1, 64)
    kp, vp = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    cache.append(0, cache.plan([child], [5]), kc, vc)
    cache.append(0, cache.plan([parent], [2]), kp, vp)
    assert _digest(cache.pools[:, shared]) == shared_digest
    q = torch.randn(2, 1, 64)
    plan = cache.plan([parent, child], [0, 0])  # no new tokens: decode over the current lengths
    lens = torch.tensor([14, 17], dtype=torch.int32)
    out = torch.ops.sawint4.decode(q, cache.pools[0], plan.block_table, lens, cache.transforms[0].q_matrix, None,
                                   0.125, "int4", "fp16")
    tf = cache.transforms[0]
    torch.testing.assert_close(out[0], dense_attention(spec, tf, q[:1], torch.cat([k, kp]), torch.cat([v, vp]),
                                                       0.125)[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1], dense_attention(spec, tf, q[1:], torch.cat([k, kc]), torch.cat([v, vc]),
                                                       0.125)[0], atol=2e-5, rtol=2e-5)
    cache.free(parent)
    cache.free(child)
    assert cache.allocator.num_free == 16


def test_plan_rejects_bad_batches():
    cache = PagedKVCache(KVCacheSpec(64, 1, 8), num_layers=1, num_blocks=2)
    s = cache.add_sequence()
    with pytest.raises(ValueError, match="seq_ids"):
        cache.plan([s, s], [1, 1])
    with pytest.raises(ValueError, match="num_new_tokens"):
        cache.plan([s], [1, 1])
    with pytest.raises(KeyError, match="seq_id"):
        cache.plan([99], [1])
    with pytest.raises(OutOfBlocks):
        cache.plan([s], [17])
