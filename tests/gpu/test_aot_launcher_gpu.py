"""The AOT artifacts, launched through the CUDA driver API as a TensorRT AOT plugin would, agree
with the reference ops for several shapes from one artifact set (dynamic batch and context)."""

import pytest
import torch

from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.ops import reference

pytestmark = pytest.mark.gpu

D, H, HQ, T = 128, 2, 8, 16


@pytest.fixture(scope="module", params=["saw_int4", "int4", "bf16"])
def setup(request, tmp_path_factory):
    from trtllm_sawint4.build_scripts.aot import write_artifacts
    from trtllm_sawint4.build_scripts.aot_launcher import AotLauncher
    from trtllm_sawint4.kernels.aot import model_kernels

    fmt = request.param
    model = dict(head_dim=D, num_heads=HQ, num_kv_heads=H, tokens_per_block=T, kv_format=fmt, rotate_v=False,
                 calibrated=False, query_dtype="bf16", scale=D ** -0.5)
    out = tmp_path_factory.mktemp(f"aot_{fmt}")
    write_artifacts(model_kernels(**model), ["sm_90"], out, model)
    spec = KVCacheSpec(D, H, T, fmt)
    return spec, build_layer_transform(spec).to("cuda"), AotLauncher(out, "sm_90")


def _placeholders(tf):
    eye = torch.eye(D, device="cuda")
    return dict(k_matrix=tf.k_matrix if tf.k_matrix is not None else eye.expand(H, D, D).contiguous(),
                k_bias=torch.zeros(H, D, device="cuda"), v_matrix=eye,
                q_matrix=tf.q_matrix if tf.q_matrix is not None else eye.expand(H, D, D).contiguous())


@pytest.mark.parametrize("lengths", [[1], [300, 17, 64], [1000] * 4 + [5] * 12, [2049, 0, 33]])
def test_append_decode_prefill_through_the_driver_launcher(setup, lengths):
    spec, tf, launcher = setup
    g = torch.Generator(device="cuda").manual_seed(len(lengths))
    blocks = [-(-n // T) for n in lengths]
    nb = sum(blocks) + 3
    perm = torch.randperm(nb, device="cuda", generator=g)
    table = torch.zeros(len(lengths), max(blocks + [1]), dtype=torch.int32, device="cuda")
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[at:at + n]
        at += n
    slots = torch.cat([table[b, torch.arange(n, device="cuda") // T].long() * T + torch.arange(n, device="cuda") % T
                       for b, n in enumerate(lengths)])
    n_tok = int(slots.numel())
    key = torch.randn(n_tok, H, D, device="cuda", generator=g).bfloat16()
    value = torch.randn(n_tok, H, D, device="cuda", generator=g).bfloat16()
    ph = _placeholders(tf)

    pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8, device="cuda")
    launcher.launch("append", dict(key=key, value=value, slot_mapping=slots.int(), pool=pool, k_matrix=ph["k_matrix"],
                                   k_bias=ph["k_bias"], v_matrix=ph["v_matrix"]))
    ref_pool = torch.zeros_like(pool)
    reference.append(ref_pool, key, value, slots, tf.k_matrix, None, None, spec.storage, spec.metadata_dtype)
    torch.cuda.synchronize()
    if spec.rotated:  # the rotation's summation order may move a code by one step, rarely
        assert (pool != ref_pool).float().mean().item() < 1e-3
    else:
        assert torch.equal(pool, ref_pool)

    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lengths), HQ, D, device="cuda", generator=g).bfloat16()
    out = launcher.launch("decode", dict(query=q, pool=ref_pool, block_table=table, seq_lens=lens,
                                         q_matrix=ph["q_matrix"], v_matrix=ph["v_matrix"]))["out"]
    want = reference.decode(q, ref_pool, table, lens, tf.q_matrix, None, D ** -0.5, spec.storage, spec.metadata_dtype)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)

    q_lens = [min(n, 37) for n in lengths]
    starts = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    qp = torch.randn(int(starts[-1]), HQ, D, device="cuda", generator=g).bfloat16()
    out = launcher.launch("prefill", dict(query=qp, pool=ref_pool, block_table=table, seq_lens=lens,
                                          query_start_loc=starts, q_matrix=ph["q_matrix"],
                                          v_matrix=ph["v_matrix"]))["out"]
    want = reference.prefill(qp, ref_pool, table, lens, starts, tf.q_matrix, None, D ** -0.5, spec.storage,
                             spec.metadata_dtype)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
