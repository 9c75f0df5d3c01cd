"""Shared test helpers (CPU and GPU): the kernel-test cases (spec, transform, a filled pool, a shuffled
block table), dense expectations, and the CLI runner."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.bench_cases import calibrated_transform
from trtllm_sawint4.ops import reference as ref
from trtllm_sawint4.quant import dequantize, quantize

SPECS = {
    "bf16": dict(kv_format="bf16"),
    "int8": dict(kv_format="int8"),
    "int4": dict(kv_format="int4"),
    "saw_int4": dict(kv_format="saw_int4"),
    "saw_int4_v_signs": dict(kv_format="saw_int4", rotation_block=16, rotate_v=True, sign_seed=1),
    "saw_int4_fp32meta": dict(kv_format="saw_int4", metadata_dtype="fp32"),
}


# ---- kernel-test cases (the interpreter tests on CPU and tests/gpu use the same) ------------------------
def kernel_spec(fmt: str, d: int, h: int, t: int, meta: str = "fp16", rotate_v: bool = False) -> KVCacheSpec:
    """A spec of kv_format `fmt`; rotate_v applies to saw_int4 only (ignored for the others)."""
    return KVCacheSpec(d, h, t, kv_format=fmt, metadata_dtype=meta, rotate_v=rotate_v if fmt == "saw_int4" else False)


def layer_transform(spec: KVCacheSpec, calibrated: bool = False, seed: int = 0, device="cpu"):
    """The spec's layer transform, with random channel statistics when `calibrated`."""
    return calibrated_transform(spec, device, seed) if calibrated else build_layer_transform(spec).to(device)


def filled_pool(spec: KVCacheSpec, tf, num_blocks: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A pool whose every slot holds an appended random token (written by the reference)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.zeros(spec.pool_shape(num_blocks), dtype=torch.uint8, device=device)
    n = num_blocks * spec.tokens_per_block
    k = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g) * 2 + 0.5
    v = torch.randn(n, spec.num_kv_heads, spec.head_dim, generator=g)
    ref.append(pool, k.to(device), v.to(device), torch.arange(n, device=device), tf.k_matrix, tf.k_bias, tf.v_matrix,
               spec.storage, spec.metadata_dtype)
    return pool


def block_table(lens, t: int, num_blocks: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """Shuffled, non-contiguous block ids, two columns wider than needed; entries past each sequence's
    blocks are out of range (2**30), so a kernel that read them would fault or be caught by the sanitizer."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // t) for n in lens]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((len(lens), max(need + [1]) + 2), 2**30, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        table[b, :k] = perm[used:used + k].int()
        used += k
    return table.to(device)


def assert_close_relative(got, want, tol=2e-2):
    """No nan, relative (Frobenius) error below tol, and elementwise close at GPU tolerances."""
    assert not torch.isnan(got).any()
    err = (got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)
    assert err < tol, f"relative error {err:.3e}"
    torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=1e-1)


def stored_kv(spec: KVCacheSpec, tf, k: torch.Tensor, v: torch.Tensor):
    """What the cache should hold for k, v [L, H, D], dequantized (float32), via quant.py directly."""
    k, v = k.float(), v.float()
    if tf.k_matrix is not None:
        k = torch.einsum("hij,lhj->lhi", tf.k_matrix, k)
    if tf.k_bias is not None:
        k = k + tf.k_bias
    if tf.v_matrix is not None:
        v = v @ tf.v_matrix.T
    if not spec.quantized:
        return k.bfloat16().float(), v.bfloat16().float()
    return tuple(dequantize(*quantize(x, spec.levels, spec.metadata_dtype)) for x in (k, v))


def dense_attention(spec, tf, q, k, v, scale, window=0):
    """Causal (bottom-right aligned) attention of q [Q, Hq, D] over the stored form of k, v [L, H, D];
    window > 0: each query sees only its last `window` positions (transformers' sliding window)."""
    ks, vs = stored_kv(spec, tf, k, v)
    return dense_attention_stored(tf, q, ks, vs, scale, window)


def dense_attention_stored(tf, q, ks, vs, scale, window=0):
    """dense_attention over K/V already in their stored (transformed, dequantized) form, e.g. read back
    from a pool with reference.gather_kv."""
    h, group = ks.shape[1], q.shape[1] // ks.shape[1]
    qf = q.float()
    if tf.q_matrix is not None:
        qf = torch.einsum("hij,qhgj->qhgi", tf.q_matrix, qf.reshape(q.shape[0], h, group, -1)).reshape(q.shape)
    mask = torch.ones(q.shape[0], ks.shape[0], dtype=torch.bool).tril(ks.shape[0] - q.shape[0])
    if window:
        mask &= ~torch.ones_like(mask).tril(ks.shape[0] - q.shape[0] - window)
    out = F.scaled_dot_product_attention(qf.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                         vs.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)[0].transpose(0, 1)
    if tf.v_matrix is not None:
        out = out @ tf.v_matrix  # v_matrix.T @ o, row-wise
    return out


def shuffled_table(lengths, tpb, num_blocks, gen):
    """A block table giving each sequence distinct, randomly ordered, non-contiguous blocks."""
    need = [-(-n // tpb) for n in lengths]
    perm = torch.randperm(num_blocks, generator=gen)[: sum(need)]
    table = torch.zeros(len(lengths), max(need + [1]), dtype=torch.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    return table


def slots_for(table, lengths, tpb, starts=None):
    """Slots of positions starts[b]..lengths[b]-1 of every sequence, in order."""
    slots = []
    for b, n in enumerate(lengths):
        for p in range(0 if starts is None else starts[b], n):
            slots.append(int(table[b, p // tpb]) * tpb + p % tpb)
    return torch.tensor(slots, dtype=torch.int64)


def run_sawint4(*args: str, cwd) -> None:
    """Run the `sawint4` CLI in a fresh process without TRITON_INTERPRET (`sawint4 aot` needs the
    real compiler, while this process may run the kernels in Triton's interpreter)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", "import sys; from trtllm_sawint4.cli import main; sys.exit(main())",
                    *args], check=True, env=env, cwd=cwd)
