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


# ---- the step plan owns the decode schedule and its workspace ---------------------------------------
def _decode_history(cache, seqs, lens, gen):
    """Prefill each sequence to its length; returns its (k, v) history."""
    history = {}
    plan = cache.plan(seqs, lens)
    k = torch.randn(sum(lens), cache.spec.num_kv_heads, cache.spec.head_dim, generator=gen)
    v = torch.randn_like(k)
    for layer in range(cache.num_layers):
        cache.append(layer, plan, k, v)
    starts = plan.query_start_loc.tolist()
    for i, s in enumerate(seqs):
        history[s] = (k[starts[i]:starts[i + 1]], v[starts[i]:starts[i + 1]])
    return history


def test_plan_decides_the_decode_schedule_once_and_attend_only_launches(kernels_on_cpu, one_torch_thread):
    spec = KVCacheSpec(64, 2, 16, kv_format="saw_int4", rotate_v=True)
    cache = PagedKVCache(spec, num_layers=2, num_blocks=24, num_query_heads=4, query_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = _decode_history(cache, seqs, [20, 45, 7], gen)
    plan = cache.plan(seqs, [1, 1, 1])
    sched = plan.schedules[0]
    assert sched.backend == "triton" and sched.merges  # rotate_v: the merge undoes the V rotation
    assert plan.workspace is not None and plan.workspace.numel() >= sched.workspace_elems
    k, v = torch.randn(3, 2, 64, generator=gen), torch.randn(3, 2, 64, generator=gen)
    q = torch.randn(3, 4, 64, generator=gen).bfloat16()
    kernels_on_cpu.clear()
    for layer in range(2):
        cache.append(layer, plan, k, v)
        out = cache.attend(layer, plan, q, 0.125)
    # every layer launched the plan's schedule into the plan's workspace
    assert len(kernels_on_cpu) == 2
    assert all(c["schedule"] == sched and c["workspace"] is plan.workspace for c in kernels_on_cpu)
    for i, s in enumerate(seqs):
        hk, hv = history[s]
        want = dense_attention(spec, cache.transforms[1], q[i:i + 1], torch.cat([hk, k[i:i + 1]]),
                               torch.cat([hv, v[i:i + 1]]), 0.125)
        torch.testing.assert_close(out[i:i + 1].float(), want, atol=3e-2, rtol=3e-2)
    # queries the plan did not expect (fp32): the schedule is planned again at attend, on the host
    out32 = cache.attend(1, plan, q.float(), 0.125)
    assert plan.schedules[0].shape.query_dtype == torch.float32
    torch.testing.assert_close(out32.float(), out.float(), atol=3e-2, rtol=3e-2)


def test_a_graph_plan_writes_every_step_into_the_same_buffers(kernels_on_cpu, one_torch_thread):
    """graph_batch=N: the step is padded to N rows, and each plan rewrites the same device tensors (what
    a captured graph reads) with the same schedule and workspace; padding rows attend nothing."""
    spec = KVCacheSpec(64, 2, 16, kv_format="saw_int4")
    cache = PagedKVCache(spec, num_layers=1, num_blocks=32, num_query_heads=4)
    gen = torch.Generator().manual_seed(4)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = _decode_history(cache, seqs, [9, 30, 16], gen)
    plans, outs = [], []
    for step, live in enumerate([seqs, seqs[:2]]):
        plan = cache.plan(live, [1] * len(live), graph_batch=4, graph_max_tokens=64)
        assert plan.block_table.shape == (4, 4) and plan.slot_mapping.shape == (4,)
        k, v = torch.randn(4, 2, 64, generator=gen), torch.randn(4, 2, 64, generator=gen)
        q = torch.randn(4, 4, 64, generator=gen).bfloat16()
        cache.append(0, plan, k, v)
        out = cache.attend(0, plan, q, 0.125)
        assert torch.count_nonzero(out[len(live):]) == 0
        for i, s in enumerate(live):
            hk, hv = history[s]
            history[s] = (torch.cat([hk, k[i:i + 1]]), torch.cat([hv, v[i:i + 1]]))
            want = dense_attention(spec, cache.transforms[0], q[i:i + 1], *history[s], 0.125)
            torch.testing.assert_close(out[i:i + 1].float(), want, atol=3e-2, rtol=3e-2)
        plans.append(plan)
        outs.append(out)
    a, b = plans
    for name in ("slot_mapping", "block_table", "seq_lens", "query_start_loc", "workspace"):
        assert getattr(a, name) is getattr(b, name), name
    assert a.schedules == b.schedules and b.seq_lens.tolist() == [11, 32, 0, 0]
    # the padding rows write only the cache's own padding blocks
    owned = {blk for s in seqs for blk in cache.allocator.sequences[s].blocks}
    padding = set(cache.allocator.sequences[cache._padding_seq].blocks)
    assert not owned & padding and {int(x) // 16 for x in b.slot_mapping[2:]} <= padding
    with pytest.raises(ValueError, match="graph_batch"):
        cache.plan(seqs, [1, 2, 1], graph_batch=4)
    with pytest.raises(ValueError, match="graph_batch"):
        cache.plan(seqs, [1, 1, 1], graph_batch=2)
    with pytest.raises(ValueError, match="block-table row"):
        cache.plan(seqs, [1, 1, 1], graph_batch=4, graph_max_tokens=32)
    with pytest.raises(ValueError, match="num_query_heads"):
        PagedKVCache(spec, 1, 8).plan([], [], graph_batch=2)


def test_a_mixed_step_runs_through_attend(kernels_on_cpu, one_torch_thread):
    """Sequences adding a prefill chunk and sequences decoding one token, in one step: the prefill op
    serves the varlen queries (a decode row is a 1-query prefill)."""
    spec = KVCacheSpec(64, 2, 16, kv_format="saw_int4")
    cache = PagedKVCache(spec, num_layers=1, num_blocks=24, num_query_heads=4)
    gen = torch.Generator().manual_seed(5)
    seqs = [cache.add_sequence() for _ in range(3)]
    history = _decode_history(cache, seqs, [12, 3, 30], gen)
    new = [1, 17, 1]
    plan = cache.plan(seqs, new)
    assert not plan.is_decode
    k, v = torch.randn(sum(new), 2, 64, generator=gen), torch.randn(sum(new), 2, 64, generator=gen)
    q = torch.randn(sum(new), 4, 64, generator=gen).bfloat16()
    cache.append(0, plan, k, v)
    out = cache.attend(0, plan, q, 0.125)
    starts = plan.query_start_loc.tolist()
    for i, s in enumerate(seqs):
        lo, hi = starts[i], starts[i + 1]
        hk, hv = history[s]
        want = dense_attention(spec, cache.transforms[0], q[lo:hi], torch.cat([hk, k[lo:hi]]),
                               torch.cat([hv, v[lo:hi]]), 0.125)
        torch.testing.assert_close(out[lo:hi].float(), want, atol=3e-2, rtol=3e-2)


def test_each_layer_attends_within_its_window(kernels_on_cpu, one_torch_thread):
    """windows=[0, 7]: layer 0 full attention, layer 1 its last 7 positions, in prefill and decode steps;
    a decode plan holds one schedule per distinct window."""
    spec = KVCacheSpec(64, 2, 16, kv_format="saw_int4")
    cache = PagedKVCache(spec, num_layers=2, num_blocks=24, windows=[0, 7], num_query_heads=4)
    gen = torch.Generator().manual_seed(6)
    seqs = [cache.add_sequence() for _ in range(2)]
    history = {s: (torch.zeros(0, 2, 64), torch.zeros(0, 2, 64)) for s in seqs}
    for new in ([19, 30], [1, 1], [4, 1]):
        plan = cache.plan(seqs, new)
        if plan.is_decode:
            assert set(plan.schedules) == {0, 7} and plan.schedules[7].shape.window == 7
        k, v = torch.randn(sum(new), 2, 64, generator=gen), torch.randn(sum(new), 2, 64, generator=gen)
        q = torch.randn(sum(new), 4, 64, generator=gen).bfloat16()
        starts = plan.query_start_loc.tolist()
        for layer in range(2):
            cache.append(layer, plan, k, v)
        outs = [cache.attend(layer, plan, q, 0.125) for layer in range(2)]
        for i, s in enumerate(seqs):
            lo, hi = starts[i], starts[i + 1]
            history[s] = (torch.cat([history[s][0], k[lo:hi]]), torch.cat([history[s][1], v[lo:hi]]))
            for layer, window in enumerate((0, 7)):
                want = dense_attention(spec, cache.transforms[layer], q[lo:hi], *history[s], 0.125, window)
                torch.testing.assert_close(outs[layer][lo:hi].float(), want, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="windows"):
        PagedKVCache(spec, num_layers=2, num_blocks=4, windows=[0])
    with pytest.raises(ValueError, match="windows"):
        PagedKVCache(spec, num_layers=2, num_blocks=4, windows=[0, -3])
