"""The random-step soak driver over a PagedKVCache (`Soak`), shared by the CPU isolation tests
(tests/test_reliability_isolation.py) and the GPU soak (tests/gpu/test_soak_gpu.py).

On CPU the cache runs the reference ops and outputs are compared with dense attention over each
sequence's history; on CUDA the cache runs the Triton kernels and every step is compared with the
reference ops on the same pool.
"""

from __future__ import annotations

import hashlib

import torch

import trtllm_sawint4.ops  # noqa: F401  (registers torch.ops.sawint4)
from trtllm_sawint4 import KVCacheSpec, PagedKVCache
from trtllm_sawint4.layout import pool_views
from trtllm_sawint4.ops import reference as ref
from trtllm_sawint4.quant import unpack_int4

from helpers import dense_attention


def block_digests(pools: torch.Tensor) -> list[str]:
    """sha256 of every block across all layers: pools [L, NB, ...] -> NB digests."""
    per_block = pools.transpose(0, 1).contiguous().cpu()
    return [hashlib.sha256(per_block[b].numpy().tobytes()).hexdigest() for b in range(per_block.shape[0])]


def _row_bytes_mask(spec: KVCacheSpec, written: torch.Tensor) -> torch.Tensor:
    """[NB, T] rows -> [NB, region_bytes]: the bytes of every region of a block that belong to those rows."""
    t, cb, mb = spec.tokens_per_block, spec.code_bytes_per_vector, spec.meta_bytes_per_scalar
    rows = torch.arange(t, device=written.device)
    row_of_byte = torch.cat([rows.repeat_interleave(cb), rows.repeat_interleave(mb), rows.repeat_interleave(mb)])
    return written[:, row_of_byte]


def dequant_rows(spec, pool, blocks, rows):
    """Dequantized K and V ([n, H, D] each, float32) of the given (block, row)s."""
    views = pool_views(pool, spec.head_dim, spec.storage, spec.metadata_dtype)
    out = []
    for kv in range(2):
        codes = views.codes[blocks, kv, :, rows]
        if spec.storage == "bf16":
            out.append(codes.float())
            continue
        if spec.storage == "int4":
            codes = unpack_int4(codes)
        s, m = views.scale[blocks, kv, :, rows].float(), views.vmin[blocks, kv, :, rows].float()
        out.append(codes.float() * s[..., None] + m[..., None])
    return out


def _changed_blocks(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Ids of the blocks (any layer) whose bytes differ: pools [L, NB, ...]."""
    return torch.nonzero((before != after).flatten(2).any(-1).any(0)).flatten().tolist()


class Soak:
    """Random steps over a PagedKVCache with a full check after every step.

    mode "dense": outputs against dense attention over each sequence's history (CPU reference path).
    mode "reference": outputs and appended bytes against trtllm_sawint4.ops.reference on the same
    pool (the kernels path on CUDA).
    """

    def __init__(self, spec, *, num_layers=2, num_blocks=64, device="cpu", seed=0, max_seqs=8, max_prefill=24,
                 max_len=96, max_batch=8, q_group=2, mode="dense", q_dtype=torch.float32, atol=3e-5, rtol=3e-5,
                 calibration=None):
        self.spec, self.device, self.mode = spec, torch.device(device), mode
        self.cache = PagedKVCache(spec, num_layers, num_blocks, device=device, calibration=calibration,
                                  num_query_heads=spec.num_kv_heads * q_group, query_dtype=q_dtype)
        self.gen = torch.Generator().manual_seed(seed)
        self.max_seqs, self.max_prefill, self.max_len, self.max_batch = max_seqs, max_prefill, max_len, max_batch
        self.hq = spec.num_kv_heads * q_group
        self.q_dtype, self.atol, self.rtol = q_dtype, atol, rtol
        self.scale = spec.head_dim ** -0.5
        self.history: dict[int, list[torch.Tensor]] = {}  # seq -> [k [L, H, D], v] per layer (dense mode)
        self.max_err = 0.0
        self.counts: dict[str, int] = {}

    # ---- random data --------------------------------------------------------------------------
    def _rand(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.gen).to(dtype)

    def _kv(self, n):
        k, v = self._rand(n, self.spec.num_kv_heads, self.spec.head_dim), self._rand(n, self.spec.num_kv_heads,
                                                                                      self.spec.head_dim)
        if n and self._coin(0.2):  # edge rows, finite: a constant vector, a spike, a value past fp16
            i = int(torch.randint(n, (1,), generator=self.gen))
            k[i, 0] = 2.5
            v[i, -1, 3] = 300.0
            v[i, 0, 1] = -7e4
        if self._coin(0.3):  # the model's dtype
            k, v = k.bfloat16(), v.bfloat16()
        return k, v

    def _coin(self, p):
        return float(torch.rand(1, generator=self.gen)) < p

    def _pick(self, items, k):
        perm = torch.randperm(len(items), generator=self.gen)[:k].tolist()
        return [items[i] for i in perm]

    # ---- invariants ---------------------------------------------------------------------------
    def check_allocator(self):
        a = self.cache.allocator
        owners: dict[int, int] = {}
        t = self.spec.tokens_per_block
        for seq in a.sequences.values():
            assert len(seq.blocks) == -(-seq.length // t), "blocks do not match the length"
            assert len(set(seq.blocks)) == len(seq.blocks), "a sequence holds a block twice"
            for blk in seq.blocks:
                owners[blk] = owners.get(blk, 0) + 1
            if seq.length % t:
                assert a.owners(seq.blocks[-1]) == 1, "a partial last block is shared"
        free = set(a._free)
        assert len(free) == len(a._free), "a block is free twice"
        assert not (free & set(owners)), "a block is both free and owned"
        assert len(free) + len(owners) == a.num_blocks, "a block leaked"
        refs = [a.owners(blk) for blk in range(a.num_blocks)]
        want = [0] * a.num_blocks
        for blk, n in owners.items():
            want[blk] = n
        if refs != want:
            bad = [blk for blk in range(a.num_blocks) if refs[blk] != want[blk]]
            raise AssertionError(f"refcounts of blocks {bad[:8]} are wrong")

    def _same_pool(self, before, what):
        assert torch.equal(self.cache.pools, before), f"{what} wrote the pool"

    # ---- steps --------------------------------------------------------------------------------
    def step(self):
        a = self.cache.allocator
        live = list(a.sequences)
        r = float(torch.rand(1, generator=self.gen))
        if not live or (r < 0.15 and len(live) < self.max_seqs):
            return self.admit()
        if r < 0.25 and len(live) < self.max_seqs:
            return self.fork(self._pick(live, 1)[0])
        if r < 0.35 or a.num_free < 2:
            return self.free(self._pick(live, 1)[0])
        if r < 0.75:
            return self.run(self._pick(live, 1 + int(torch.randint(min(self.max_batch, len(live)), (1,),
                                                                   generator=self.gen))), decode=True)
        return self.run(self._pick(live, 1 + int(torch.randint(min(4, len(live)), (1,), generator=self.gen))),
                        decode=False)

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def admit(self):
        s = self.cache.add_sequence()
        self.history[s] = [torch.zeros(0, self.spec.num_kv_heads, self.spec.head_dim)
                           for _ in range(2 * self.cache.num_layers)]
        self._count("admit")
        n = 1 + int(torch.randint(self.max_prefill, (1,), generator=self.gen))
        if -(-n // self.spec.tokens_per_block) > self.cache.allocator.num_free:
            return self.free(s)
        self.run([s], decode=False, new=[n])

    def fork(self, s):
        a = self.cache.allocator
        if a.num_free < 1:
            return self.free(s)
        before = self.cache.pools.clone()
        child = self.cache.fork(s)
        self._count("fork")
        self.history[child] = [h.clone() for h in self.history[s]]
        parent_blocks, child_blocks = a.sequences[s].blocks, a.sequences[child].blocks
        t = self.spec.tokens_per_block
        full = a.sequences[s].length // t
        assert child_blocks[:full] == parent_blocks[:full], "fork did not share the full blocks"
        changed = _changed_blocks(before, self.cache.pools)
        if a.sequences[s].length % t:
            dst, src = child_blocks[-1], parent_blocks[-1]
            assert dst not in parent_blocks
            assert changed in ([], [dst]), f"fork wrote blocks {changed}"
            assert torch.equal(self.cache.pools[:, dst], self.cache.pools[:, src]), "fork copy differs"
        else:
            assert changed == [], f"fork wrote blocks {changed}"
        self.check_allocator()

    def free(self, s):
        before = self.cache.pools.clone()
        self.cache.free(s)
        self.history.pop(s, None)
        self._count("free")
        self._same_pool(before, "free")
        self.check_allocator()

    def run(self, seqs, decode, new=None):
        """plan + append (every layer) + attend (every layer) for `seqs`."""
        a, t = self.cache.allocator, self.spec.tokens_per_block
        if new is None:
            room = [self.max_len - a.sequences[s].length for s in seqs]
            seqs = [s for s, r in zip(seqs, room) if r > 0]
            if not seqs:
                return self.free(self._pick(list(a.sequences), 1)[0])
            if decode:
                new = [1] * len(seqs)
            else:  # chunked prefill; a sequence may add nothing this step
                new = [int(torch.randint(min(16, r) + 1, (1,), generator=self.gen))
                       for r in [self.max_len - a.sequences[s].length for s in seqs]]
        if sum(a.blocks_needed(s, n) for s, n in zip(seqs, new)) > a.num_free:
            return self.free(self._pick(seqs, 1)[0])
        before = self.cache.pools.clone()
        shared = {b for s in a.sequences.values() for b in s.blocks if a.owners(b) > 1}
        plan = self.cache.plan(seqs, new)
        self._count("decode" if plan.is_decode else "prefill")
        slots = plan.slot_mapping.long()
        blocks_w, rows_w = slots // t, slots % t
        assert not (set(blocks_w.tolist()) & shared), "an append targets a shared block"
        for s, n in zip(seqs, new):
            owned = a.sequences[s].blocks
            assert len(owned) == -(-a.sequences[s].length // t)
        n_tok = int(slots.numel())
        k_all, v_all, q_all = [], [], []
        for layer in range(self.cache.num_layers):
            k, v = self._kv(n_tok)
            q = self._rand(n_tok, self.hq, self.spec.head_dim, dtype=self.q_dtype)
            k_all.append(k), v_all.append(v), q_all.append(q)
            self.cache.append(layer, plan, k.to(self.device), v.to(self.device))
        self.check_append(before, plan, blocks_w, rows_w, k_all, v_all)
        after_append = self.cache.pools.clone()
        # the reference is the slow part of a long soak: in "reference" mode one random layer per step
        check_layer = int(torch.randint(self.cache.num_layers, (1,), generator=self.gen))
        for layer in range(self.cache.num_layers):
            q = q_all[layer].to(self.device)
            out = self.cache.attend(layer, plan, q, self.scale)
            self._same_pool(after_append, "attend")
            assert out.shape == q.shape and out.dtype == q.dtype
            if self.mode == "dense" or layer == check_layer:
                self.check_attention(layer, plan, seqs, q, out, k_all[layer], v_all[layer])
        self.check_allocator()

    # ---- checks against the reference / dense ---------------------------------------------------
    def check_append(self, before, plan, blocks_w, rows_w, k_all, v_all):
        spec, t = self.spec, self.spec.tokens_per_block
        written = torch.zeros(before.shape[1], t, dtype=torch.bool, device=before.device)
        written[blocks_w.to(before.device), rows_w.to(before.device)] = True
        may = _row_bytes_mask(spec, written)
        for layer in range(self.cache.num_layers):
            got = self.cache.pools[layer]
            changed = (got != before[layer]).any(1).any(1)  # [NB, region_bytes]
            assert not bool((changed & ~may).any()), f"layer {layer}: bytes outside the slots changed"
            if self.mode != "reference":
                continue
            want = before[layer].clone()
            tf = self.cache.transforms[layer]
            ref.append(want, k_all[layer].to(self.device), v_all[layer].to(self.device), plan.slot_mapping,
                       tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
            if tf.k_matrix is None and tf.v_matrix is None:
                assert torch.equal(got, want), f"layer {layer}: appended bytes differ from the reference"
                continue
            b, r = blocks_w.to(got.device), rows_w.to(got.device)
            for (xg, xw), kv in zip(zip(dequant_rows(spec, got, b, r), dequant_rows(spec, want, b, r)), "KV"):
                views = pool_views(want, spec.head_dim, spec.storage, spec.metadata_dtype)
                step = views.scale[b, 0 if kv == "K" else 1, :, r].float()[..., None]
                err = (xg - xw).abs()
                tol = 1.5 * step + 2e-3 * xw.abs() + 1e-5
                assert bool((err <= tol).all()), f"layer {layer} {kv}: dequantized append off by " \
                                                 f"{float((err - tol).max())} beyond a step"

    def check_attention(self, layer, plan, seqs, q, out, k_new, v_new):
        spec, tf = self.spec, self.cache.transforms[layer]
        pool = self.cache.pools[layer]
        if self.mode == "reference":
            args = (pool, plan.block_table, plan.seq_lens)
            rest = (tf.q_matrix, tf.v_matrix, self.scale, spec.storage, spec.metadata_dtype)
            want = ref.decode(q, *args, *rest) if plan.is_decode else ref.prefill(q, *args, plan.query_start_loc,
                                                                                  *rest)
            err = float((out.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1.0)) \
                if out.numel() else 0.0
            self.max_err = max(self.max_err, err)  # relative to the output's magnitude
            atol = self.atol * max(1.0, float(want.abs().max())) if want.numel() else self.atol
            torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=self.rtol)
            return
        starts = plan.query_start_loc.tolist()
        for i, s in enumerate(seqs):
            lo, hi = starts[i], starts[i + 1]
            kh, vh = self._layer_history(s, layer, k_new[lo:hi], v_new[lo:hi])
            if hi == lo:
                continue
            want = dense_attention(spec, tf, q[lo:hi], kh, vh, self.scale)
            err = float((out[lo:hi].float() - want).abs().max() / want.abs().max().clamp_min(1.0))
            self.max_err = max(self.max_err, err)
            # absolute tolerance relative to the output's magnitude: rotated-back outputs of huge V cancel
            atol = self.atol * max(1.0, float(want.abs().max()))
            torch.testing.assert_close(out[lo:hi].float(), want.to(out.dtype).float(), atol=atol, rtol=self.rtol)

    def _layer_history(self, s, layer, k_new, v_new):
        """History of (K, V) of sequence s in `layer`, with this step's tokens appended."""
        hist = self.history[s]
        hist[2 * layer] = torch.cat([hist[2 * layer], k_new.float()])
        hist[2 * layer + 1] = torch.cat([hist[2 * layer + 1], v_new.float()])
        return hist[2 * layer], hist[2 * layer + 1]

    def finish(self):
        for s in list(self.cache.allocator.sequences):
            self.free(s)
        a = self.cache.allocator
        assert a.num_free == a.num_blocks, f"{a.num_blocks - a.num_free} blocks leaked"
