"""The TensorRT-LLM AutoDeploy cached-attention op on CUDA (Triton kernels) against the PyTorch reference,
and a decode step through the op captured in a CUDA graph and replayed with new step metadata written in
place, as AutoDeploy's monolithic decode graphs are (`pytest -m gpu tests/gpu/test_trtllm_gpu.py`).

No TensorRT-LLM here: the metadata are built like AutoDeploy's SequenceInfo (tests/trtllm_steps.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers, trtllm_steps

from helpers import dense_attention, dense_attention_stored  # noqa: E402
from trtllm_sawint4 import KVCacheSpec  # noqa: E402
from trtllm_sawint4.ops import reference as ref  # noqa: E402
from trtllm_sawint4.integrations.tensorrt_llm import adapter, ops  # noqa: E402
from trtllm_steps import ADSteps  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = "cuda"
FORMATS = ["saw_int4", "int4", "bf16"]
HQ, HKV, D, T = 32, 8, 128, 64
STD = adapter.STANDARD_METADATA_ARGS


@pytest.fixture(scope="module", autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from trtllm_sawint4 import kernels

    if not kernels.HAVE_TRITON:
        pytest.skip("needs triton")


def _spec(fmt):
    return KVCacheSpec(head_dim=D, num_kv_heads=HKV, tokens_per_block=T, kv_format=fmt)


def _run(md, q, k, v, pool, spec, device):
    on = lambda x: x.to(device)  # noqa: E731
    meta = {n: (md[n] if n == "batch_info_host" else on(md[n])) for n in STD + ["position_ids"]}
    seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(meta["position_ids"], meta["batch_info_host"],
                                                        meta["cu_seqlen"], meta["seq_len_with_cache"])
    return torch.ops.sawint4.trtllm_mha_with_cache(on(q), on(k), on(v), *[meta[n] for n in STD], seq, pos, pool,
                                                  *adapter.op_constants(spec))


def _close(got, want, rel=2e-2):
    err = (got.float().cpu() - want.float().cpu()).abs().max().item()
    assert err <= rel * max(want.float().abs().max().item(), 1.0), f"max abs error {err}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_step_cuda_matches_reference(fmt):
    """History, then one step with a prompt, a chunked-prefill continuation and decodes: CUDA (kernels)
    against dense attention over the K/V the CUDA path stored, and the CPU path against dense attention
    over the reference quantizer's K/V. With a rotation the append kernel may store a code one off from
    the reference (its summation order; tests/gpu/test_kernels_gpu.py bounds that), so the two paths'
    outputs are compared directly only without one."""
    torch.manual_seed(0)
    spec = _spec(fmt)
    nb = 160
    steps = ADSteps(max_batch=16, max_seq_len=2048, tokens_per_block=T, num_blocks=nb, seed=0)
    pools = {"cpu": torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)}
    pools[DEV] = pools["cpu"].to(DEV)
    hist = {}

    def step(entries):
        n = sum(e[2] for e in entries)
        q = torch.randn(1, n, HQ, D, dtype=torch.bfloat16)
        k = torch.randn(1, n, HKV, D, dtype=torch.bfloat16) * 2 + 0.3
        v = torch.randn(1, n, HKV, D, dtype=torch.bfloat16)
        md = steps.step(entries)
        out = {dev: _run(md, q, k, v, pools[dev], spec, dev) for dev in ("cpu", DEV)}
        tf = ops.layer_transform(spec, "cpu")
        stored = pools[DEV].cpu()
        row = 0
        for seq_id, p0, new, _ in entries:
            kh, vh = hist.setdefault(seq_id, (torch.zeros(2048, HKV, D), torch.zeros(2048, HKV, D)))
            kh[p0:p0 + new], vh[p0:p0 + new] = k[0, row:row + new].float(), v[0, row:row + new].float()
            qs = q[0, row:row + new].float()
            _close(out["cpu"][0, row:row + new], dense_attention(spec, tf, qs, kh[:p0 + new], vh[:p0 + new], D ** -0.5))
            ks, vs = ref.gather_kv(stored, torch.tensor(steps.table_of(seq_id)), p0 + new, D, spec.storage,
                                   spec.metadata_dtype)
            _close(out[DEV][0, row:row + new], dense_attention_stored(tf, qs, ks, vs, D ** -0.5))
            row += new
        if tf.k_matrix is None:
            _close(out[DEV], out["cpu"])

    step([(0, 0, 300, "prefill"), (1, 0, 130, "prefill"), (2, 0, 64, "prefill")])
    step([(3, 0, 77, "prefill"), (1, 130, 200, "extend"), (0, 300, 1, "decode"), (2, 64, 1, "decode")])


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_step_in_a_cuda_graph(fmt):
    """Capture prepare-metadata + cached attention for a decode batch once, then replay it for many steps
    with cu_seqlen/seq_len_with_cache/cache_loc/cu_num_pages and q/k/v rewritten in place (pages added as
    sequences cross block boundaries): each replay equals the eager op on a copy of the pool, outputs and
    pool bytes alike, and the reference on the CPU."""
    torch.manual_seed(1)
    spec = _spec(fmt)
    b, nb = 8, 200
    steps = ADSteps(max_batch=b, max_seq_len=4096, tokens_per_block=T, num_blocks=nb, seed=1)
    lens = [61, 63, 64, 1, 500, 127, 250, 2]  # several cross a block boundary during the replays
    pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device=DEV)
    n = sum(lens)
    md = steps.step([(i, 0, ln, "prefill") for i, ln in enumerate(lens)])
    kv = (torch.randn(1, n, HKV, D, dtype=torch.bfloat16), torch.randn(1, n, HKV, D, dtype=torch.bfloat16))
    _run(md, torch.randn(1, n, HQ, D, dtype=torch.bfloat16), *kv, pool, spec, DEV)

    # static buffers, as AutoDeploy keeps them (device views of fixed capacity + the host batch info)
    md = steps.step([(i, ln, 1, "decode") for i, ln in enumerate(lens)])
    static = {name: (md[name].clone() if name == "batch_info_host" else md[name].to(DEV))
              for name in STD + ["position_ids"]}
    q = torch.randn(b, 1, HQ, D, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(b, 1, HKV, D, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(b, 1, HKV, D, dtype=torch.bfloat16, device=DEV)
    consts = adapter.op_constants(spec)

    def step_op(pool_):
        seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(static["position_ids"], static["batch_info_host"],
                                                            static["cu_seqlen"], static["seq_len_with_cache"])
        return torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *[static[n] for n in STD], seq, pos, pool_, *consts)

    scratch = pool.clone()
    step_op(scratch)  # compile and build the transforms outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step_op(scratch)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = step_op(pool)

    eager_pool = pool.clone()
    for it in range(70):
        if it:
            md = steps.step([(i, ln, 1, "decode") for i, ln in enumerate(lens)])
            for name in STD + ["position_ids"]:
                static[name].copy_(md[name])  # the host batch info is frozen in the graph; its split is unchanged
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        before = pool.cpu() if it in (0, 3, 69) else None
        graph.replay()
        y_eager = step_op(eager_pool)
        torch.cuda.synchronize()
        assert torch.equal(y_graph, y_eager), f"step {it}: replay differs from eager"
        assert torch.equal(pool, eager_pool), f"step {it}: pools differ"
        if before is not None:  # the PyTorch reference on the CPU from the same pool: same output, same bytes
            ref = _run(md, q.cpu(), k.cpu(), v.cpu(), before, spec, "cpu")
            _close(y_graph, ref)
            assert torch.equal(before, pool.cpu()), f"step {it}: the kernels wrote other bytes than the reference"
        lens = [ln + 1 for ln in lens]
