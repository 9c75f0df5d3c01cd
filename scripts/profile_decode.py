"""Run one decode shape a few times (for `ncu` / `compute-sanitizer` on the GPU machine).

    python scripts/profile_decode.py [batch] [context] [storage]
"""

from __future__ import annotations

import sys

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    batch = int(argv[0]) if argv else 64
    ctx = int(argv[1]) if len(argv) > 1 else 8192
    storage = argv[2] if len(argv) > 2 else "int4"
    from trtllm_sawint4.kernels.decode import decode
    from trtllm_sawint4.bench_cases import bf16_pool, quant_pool
    from trtllm_sawint4.spec import KVCacheSpec
    from trtllm_sawint4.transforms import build_layer_transform

    spec = KVCacheSpec(128, 8, 64, kv_format="saw_int4" if storage == "int4" else storage)
    tf = build_layer_transform(spec).to("cuda")
    nb = batch * ctx // 64
    pool = bf16_pool(spec, nb, "cuda") if storage == "bf16" else quant_pool(spec, nb, "cuda")
    table = torch.randperm(nb, device="cuda").int().view(batch, -1)
    sl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        out = decode(q, pool, table, sl, tf.q_matrix, None, 0.088, spec.storage, "fp16", tf.hadamard_block)
    torch.cuda.synchronize()
    print("ok", storage, batch, ctx, float(out.float().abs().mean()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
