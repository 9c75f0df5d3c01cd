"""A whole decode step through PagedKVCache on the GPU: planned once (schedule + workspace), captured in
a CUDA graph, and replayed for later steps whose metadata plan() writes in place into the same device
buffers (`pytest -m gpu tests/gpu/test_step_graph_gpu.py`). Also sliding windows and mixed steps at
realistic shapes, against the reference ops."""

from __future__ import annotations

import pytest
import torch

from trtllm_sawint4 import KVCacheSpec, PagedKVCache
from trtllm_sawint4.ops import reference as ref

from helpers import assert_close_relative

pytestmark = pytest.mark.gpu

DEV = "cuda"
HQ, H, D, T = 32, 8, 128, 64


def _prefilled_cache(spec, num_layers, lens, windows=None, seed=0):
    cache = PagedKVCache(spec, num_layers, num_blocks=sum(-(-n // T) + 4 for n in lens) + 16, device=DEV,
                         windows=windows, num_query_heads=HQ, query_dtype=torch.bfloat16)
    g = torch.Generator(device=DEV).manual_seed(seed)
    seqs = [cache.add_sequence() for _ in lens]
    plan = cache.plan(seqs, lens)
    k = torch.randn(sum(lens), H, D, device=DEV, generator=g, dtype=torch.bfloat16)
    for layer in range(num_layers):
        cache.append(layer, plan, k, torch.randn_like(k))
    return cache, seqs


def _reference_step(cache, plan, q, layer, scale):
    tf, pool = cache.transforms[layer], cache.pools[layer]
    return ref.decode(q, pool, plan.block_table, plan.seq_lens, tf.q_matrix, tf.v_matrix, scale, cache.spec.storage,
                      cache.spec.metadata_dtype, 0, cache.windows[layer])


@pytest.mark.parametrize("fmt, rotate_v, windows", [
    ("saw_int4", False, [0, 0]),      # INT4 head_dim 128: the Gluon kernel (the bucket is not "tiny")
    ("saw_int4", True, [0, 300]),     # the V-rotating merge; a windowed layer (the Triton kernel)
    ("int8", False, [0, 0]),          # the Triton kernel
    ("bf16", False, [0, 0]),
])
def test_a_planned_decode_step_replays_from_a_cuda_graph(cuda_kernels, fmt, rotate_v, windows):
    spec = KVCacheSpec(D, H, T, kv_format=fmt, rotate_v=rotate_v)
    lens = [700, 1, 3001, 64, 129, 2048]
    cache, seqs = _prefilled_cache(spec, 2, lens, windows)
    n_bucket, max_tokens, scale = 8, 4096, D ** -0.5
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.zeros(n_bucket, HQ, D, device=DEV, dtype=torch.bfloat16)  # the graph's inputs
    k = torch.zeros(n_bucket, H, D, device=DEV, dtype=torch.bfloat16)
    v = torch.zeros_like(k)

    def fill():
        q.copy_(torch.randn(q.shape, device=DEV, generator=g))
        k.copy_(torch.randn(k.shape, device=DEV, generator=g))
        v.copy_(torch.randn(v.shape, device=DEV, generator=g))

    def step(plan):
        outs = []
        for layer in range(cache.num_layers):
            cache.append(layer, plan, k, v)
            outs.append(cache.attend(layer, plan, q, scale))
        return outs

    # step 1, eager: compiles every kernel the step launches
    plan1 = cache.plan(seqs, [1] * len(seqs), graph_batch=n_bucket, graph_max_tokens=max_tokens)
    expected_backend = "gluon" if fmt == "saw_int4" else "triton"
    assert plan1.schedules[0].backend == expected_backend, plan1.schedules
    if windows[1]:
        assert plan1.schedules[windows[1]].backend == "triton"
    fill()
    eager1 = step(plan1)
    for layer in range(2):
        assert_close_relative(eager1[layer][:len(seqs)], _reference_step(cache, plan1, q, layer, scale)[:len(seqs)])
    torch.cuda.synchronize()

    # step 2: plan (host), then capture the step's layers once; no host work may happen inside
    plan2 = cache.plan(seqs, [1] * len(seqs), graph_batch=n_bucket, graph_max_tokens=max_tokens)
    for name in ("slot_mapping", "block_table", "seq_lens", "query_start_loc", "workspace"):
        assert getattr(plan2, name) is getattr(plan1, name), name
    fill()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):  # (a host sync or a .tolist() inside would raise here)
            captured = step(plan2)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    for layer in range(2):
        assert_close_relative(captured[layer][:len(seqs)], _reference_step(cache, plan2, q, layer, scale)[:len(seqs)])

    # steps 3-5: new metadata in place (a sequence leaves, then comes back longer), replay alone
    for live in (seqs[:4], seqs[1:], seqs):
        plan = cache.plan(live, [1] * len(live), graph_batch=n_bucket, graph_max_tokens=max_tokens)
        assert plan.block_table is plan1.block_table and plan.schedules == plan1.schedules
        fill()
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated  # replay allocates nothing
        for layer in range(2):
            want = _reference_step(cache, plan, q, layer, scale)
            assert_close_relative(captured[layer][:len(live)], want[:len(live)])
            assert torch.count_nonzero(captured[layer][len(live):]) == 0  # padding rows
        replayed = [o.clone() for o in captured]
        eager = step(plan)  # the same step again, eagerly (append rewrites the same bytes)
        for layer in range(2):
            assert torch.equal(replayed[layer], eager[layer])


@pytest.mark.parametrize("fmt", ["saw_int4", "int8", "bf16"])
@pytest.mark.parametrize("window", [1, 63, 64, 500, 4096])
def test_sliding_window_decode_and_prefill(cuda_kernels, fmt, window):
    spec = KVCacheSpec(D, H, T, kv_format=fmt, rotate_v=fmt == "saw_int4")
    lens = [700, 1, 3001, 64, 2048]
    cache, seqs = _prefilled_cache(spec, 1, lens)
    tf, pool = cache.transforms[0], cache.pools[0]
    plan = cache.plan(seqs, [0] * len(seqs))
    q = torch.randn(len(lens), HQ, D, device=DEV, dtype=torch.bfloat16)
    args = (q, pool, plan.block_table, plan.seq_lens, tf.q_matrix, tf.v_matrix, D ** -0.5, spec.storage, "fp16",
            tf.hadamard_block)
    want = ref.decode(*args[:-1], 0, window)
    for splits in (None, 1, 10**4):
        sched = cuda_kernels.decode_module.schedule_for(q, pool, plan.block_table, tf.q_matrix, tf.v_matrix,
                                                        spec.storage, "fp16", tf.hadamard_block, window,
                                                        num_splits=splits)
        assert sched.backend == "triton"
        assert_close_relative(cuda_kernels.decode(*args, window, num_splits=splits), want)
    q_lens = [300, 1, 129, 64, 2048]
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEV)
    qp = torch.randn(sum(q_lens), HQ, D, device=DEV, dtype=torch.bfloat16)
    pargs = (qp, pool, plan.block_table, plan.seq_lens, qsl, tf.q_matrix, tf.v_matrix, D ** -0.5, spec.storage,
             "fp16")
    assert_close_relative(cuda_kernels.prefill(*pargs, tf.hadamard_block, window), ref.prefill(*pargs, 0, window))


def test_a_mixed_step_through_attend(cuda_kernels):
    """Prefill chunks and single-token decodes in one step go through the prefill kernel."""
    spec = KVCacheSpec(D, H, T, kv_format="saw_int4")
    cache, seqs = _prefilled_cache(spec, 1, [700, 1, 3001, 64])
    new = [1, 300, 1, 129]
    plan = cache.plan(seqs, new)
    assert not plan.is_decode
    k = torch.randn(sum(new), H, D, device=DEV, dtype=torch.bfloat16)
    q = torch.randn(sum(new), HQ, D, device=DEV, dtype=torch.bfloat16)
    cache.append(0, plan, k, torch.randn_like(k))
    got = cache.attend(0, plan, q, D ** -0.5)
    tf = cache.transforms[0]
    want = ref.prefill(q, cache.pools[0], plan.block_table, plan.seq_lens, plan.query_start_loc, tf.q_matrix,
                       tf.v_matrix, D ** -0.5, spec.storage, "fp16")
    assert_close_relative(got, want)
