"""Property-based tests of the public ops: random shapes, dtypes, strides, block tables, lengths.

Every call either matches an independent dense computation (tests/helpers.py) or raises a
ValueError before anything is written; nothing is written outside the given slots; attention never
writes the pool. The last tests run the Triton kernels (TRITON_INTERPRET=1) on the same kind of
input, including non-contiguous index tensors.
"""

from __future__ import annotations


import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trtllm_sawint4.ops  # noqa: F401
from trtllm_sawint4 import KVCacheSpec, build_layer_transform
from trtllm_sawint4.ops import checks
from trtllm_sawint4.ops import reference as ref

from helpers import SPECS, dense_attention, shuffled_table, slots_for, stored_kv

ops = torch.ops.sawint4
FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _noncontig(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `x`, in a non-contiguous layout."""
    if how == "contiguous" or x.dim() == 0:
        return x
    if how == "strided":  # every other element of a twice-as-long last dim
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if how == "transposed" and x.dim() >= 2:  # leading dims swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "offset":  # storage offset, last dim contiguous
        big = torch.zeros(x.shape[0] + 1, *x.shape[1:], dtype=x.dtype)
        big[1:] = x
        return big[1:]
    return x


LAYOUTS = ["contiguous", "strided", "transposed", "offset"]


@st.composite
def scenarios(draw):
    fmt = draw(st.sampled_from(sorted(SPECS)))
    d = draw(st.sampled_from([32, 64]))
    h = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    t = draw(st.sampled_from([8, 16]))
    if fmt == "saw_int4_v_signs" and d % 16:
        d = 32
    b = draw(st.integers(0, 4))
    lengths = draw(st.lists(st.integers(0, 40), min_size=b, max_size=b))
    new = [draw(st.integers(0, n)) for n in lengths]
    return dict(
        fmt=fmt, d=d, h=h, group=group, t=t, lengths=lengths, new=new,
        kv_dtype=draw(st.sampled_from(DTYPES)), q_dtype=draw(st.sampled_from(DTYPES)),
        kv_layout=draw(st.sampled_from(LAYOUTS)), q_layout=draw(st.sampled_from(LAYOUTS)),
        idx_layout=draw(st.sampled_from(["contiguous", "strided", "offset"])),
        slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        extra_blocks=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def _build(sc):
    """Spec, transforms, a garbage-filled pool, and per-sequence K/V/Q with the table that holds them."""
    spec = KVCacheSpec(sc["d"], sc["h"], sc["t"], **SPECS[sc["fmt"]])
    tf = build_layer_transform(spec)
    g = torch.Generator().manual_seed(sc["seed"])
    t = sc["t"]
    need = sum(-(-n // t) for n in sc["lengths"])
    nb = need + sc["extra_blocks"] + 1
    table = shuffled_table(sc["lengths"], t, nb, g)
    pool = torch.randint(0, 256, spec.pool_shape(nb), dtype=torch.uint8, generator=g)
    total = sum(sc["lengths"])
    k = (torch.randn(total, sc["h"], sc["d"], generator=g) * 2).to(sc["kv_dtype"])
    v = torch.randn(total, sc["h"], sc["d"], generator=g).to(sc["kv_dtype"])
    return spec, tf, g, table, pool, k, v


def _row_mask(pool_shape, t, slots):
    """[NB, T] True where a slot was given."""
    mask = torch.zeros(pool_shape[0], t, dtype=torch.bool)
    if len(slots):
        s = torch.as_tensor(slots).long()
        mask[s // t, s % t] = True
    return mask


def _assert_only_rows_changed(spec, before, after, written):
    """Every byte of a (block, kv, head) region that belongs to a row not in `written` is unchanged."""
    t = spec.tokens_per_block
    regions_b, regions_a = before.reshape(-1, spec.region_bytes), after.reshape(-1, spec.region_bytes)
    cb, mb = spec.code_bytes_per_vector, spec.meta_bytes_per_scalar
    nb = before.shape[0]
    # byte -> row inside a region: codes rows, then scale rows, then min rows
    row_of_byte = torch.cat([torch.arange(t).repeat_interleave(cb), torch.arange(t).repeat_interleave(mb),
                             torch.arange(t).repeat_interleave(mb)])
    block_of_region = torch.arange(nb).repeat_interleave(2 * spec.num_kv_heads)
    may_change = written[block_of_region][:, row_of_byte]  # [regions, region_bytes]
    changed = regions_b != regions_a
    assert not bool((changed & ~may_change).any()), "bytes outside the given slots changed"


def _call(op, *args, index_args=()):
    """Index tensors (slot_mapping, block_table, seq_lens, query_start_loc) must be contiguous: a
    non-contiguous one is rejected with a ValueError before anything is written; the same call with
    contiguous copies then runs. Data tensors (key, value, query) may have any strides."""
    pool = next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.uint8 and a.dim() == 4)
    if any(not args[i].is_contiguous() for i in index_args):
        before = pool.clone()
        with pytest.raises(ValueError, match="contiguous"):
            op(*args)
        assert torch.equal(pool, before)
        args = tuple(a.contiguous() if i in index_args else a for i, a in enumerate(args))
    return op(*args)


@settings(FUZZ, max_examples=15)
@given(sc=scenarios())
def test_random_batches_match_dense_and_write_only_their_slots(sc):
    spec, tf, g, table, pool, k, v = _build(sc)
    t, lengths, new = sc["t"], sc["lengths"], sc["new"]
    cached = [n - m for n, m in zip(lengths, new)]
    offsets = torch.tensor([0] + lengths).cumsum(0).tolist()
    tfargs = (tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    # two appends: the cached prefixes, then this step's new tokens (a chunked prefill)
    for lo_of, hi_of in ((lambda b: 0, lambda b: cached[b]), (lambda b: cached[b], lambda b: lengths[b])):
        sel = [offsets[b] + p for b in range(len(lengths)) for p in range(lo_of(b), hi_of(b))]
        slots = slots_for(table, [hi_of(b) for b in range(len(lengths))], t,
                          [lo_of(b) for b in range(len(lengths))])
        before = pool.clone()
        key = _noncontig(k[sel], sc["kv_layout"]) if sel else k[:0]
        val = _noncontig(v[sel], sc["kv_layout"]) if sel else v[:0]
        _call(ops.append, pool, key, val, _noncontig(slots.to(sc["slot_dtype"]), sc["idx_layout"]), *tfargs,
              index_args=(3,))
        _assert_only_rows_changed(spec, before, pool, _row_mask(pool.shape, t, slots))

    hq = sc["h"] * sc["group"]
    nq = sum(new)
    q = torch.randn(nq, hq, sc["d"], generator=g).to(sc["q_dtype"])
    starts = torch.tensor([0] + new, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    idx = lambda x: _noncontig(x, sc["idx_layout"])  # noqa: E731
    snapshot = pool.clone()
    out = _call(ops.prefill, _noncontig(q, sc["q_layout"]), pool, idx(table), idx(lens), idx(starts), tf.q_matrix,
                tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype, index_args=(2, 3, 4))
    qd = torch.randn(len(lengths), hq, sc["d"], generator=g).to(sc["q_dtype"])
    out_d = _call(ops.decode, _noncontig(qd, sc["q_layout"]), pool, idx(table), idx(lens), tf.q_matrix,
                  tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype, index_args=(2, 3))
    assert torch.equal(pool, snapshot), "attention wrote the pool"
    assert out.dtype == sc["q_dtype"] and out.shape == q.shape
    assert out_d.dtype == sc["q_dtype"] and out_d.shape == qd.shape
    for b, n in enumerate(lengths):
        kb, vb = k[offsets[b]:offsets[b + 1]], v[offsets[b]:offsets[b + 1]]
        lo, hi = int(starts[b]), int(starts[b + 1])
        if hi > lo:
            want = dense_attention(spec, tf, q[lo:hi], kb, vb, 0.125)
            torch.testing.assert_close(out[lo:hi].float(), want.to(sc["q_dtype"]).float(), **TOL[sc["q_dtype"]])
        if n == 0:  # a sequence with no tokens: zero output
            assert not bool(out_d[b].any())
        else:
            want = dense_attention(spec, tf, qd[b:b + 1], kb, vb, 0.125)
            torch.testing.assert_close(out_d[b:b + 1].float(), want.to(sc["q_dtype"]).float(),
                                       **TOL[sc["q_dtype"]])


@st.composite
def tables(draw):
    """Arbitrary block tables over a fully written pool: repeated ids, shared ids, garbage past the end."""
    nb = draw(st.integers(1, 6))
    b = draw(st.integers(0, 4))
    mb = draw(st.integers(1, 4))
    ids = draw(st.lists(st.lists(st.integers(0, nb - 1), min_size=mb, max_size=mb), min_size=b, max_size=b))
    lens = [draw(st.integers(0, mb * 8)) for _ in range(b)]
    junk = draw(st.sampled_from([-1, nb, 2 ** 31 - 1, -(2 ** 31)]))
    return dict(nb=nb, ids=ids, lens=lens, mb=mb, junk=junk, fmt=draw(st.sampled_from(sorted(SPECS))),
                seed=draw(st.integers(0, 2 ** 31 - 1)), q_len=draw(st.integers(0, 3)))


@settings(FUZZ, max_examples=20)
@given(tc=tables())
def test_any_valid_block_table_reads_exactly_what_it_names(tc):
    """Repeated and shared block ids are legal reads; entries past a sequence's length are never read
    (even garbage ids); the result is dense attention over the rows the table names."""
    t = 8
    spec = KVCacheSpec(32, 1, t, **SPECS[tc["fmt"]])
    tf = build_layer_transform(spec)
    g = torch.Generator().manual_seed(tc["seed"])
    nb = tc["nb"]
    pool = torch.zeros(spec.pool_shape(nb), dtype=torch.uint8)
    k_all, v_all = torch.randn(nb * t, 1, 32, generator=g), torch.randn(nb * t, 1, 32, generator=g)
    ops.append(pool, k_all, v_all, torch.arange(nb * t), tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage,
               spec.metadata_dtype)
    b = len(tc["ids"])
    table = torch.tensor(tc["ids"], dtype=torch.int32).reshape(b, tc["mb"])
    for i, n in enumerate(tc["lens"]):  # garbage in the unused tail of each row
        used = -(-n // t)
        table[i, used:] = tc["junk"]
    lens = torch.tensor(tc["lens"], dtype=torch.int32)
    q_lens = [min(tc["q_len"], n) for n in tc["lens"]]
    starts = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(starts[-1]), 2, 32, generator=g)
    qd = torch.randn(b, 2, 32, generator=g)
    snapshot = pool.clone()
    out = ops.prefill(q, pool, table, lens, starts, tf.q_matrix, tf.v_matrix, 0.25, spec.storage,
                      spec.metadata_dtype)
    out_d = ops.decode(qd, pool, table, lens, tf.q_matrix, tf.v_matrix, 0.25, spec.storage, spec.metadata_dtype)
    assert torch.equal(pool, snapshot)
    for i, n in enumerate(tc["lens"]):
        if n == 0:
            assert not bool(out_d[i].any())
            continue
        slots = torch.tensor([int(table[i, p // t]) * t + p % t for p in range(n)])
        kb, vb = k_all[slots], v_all[slots]
        torch.testing.assert_close(out_d[i:i + 1], dense_attention(spec, tf, qd[i:i + 1], kb, vb, 0.25),
                                   atol=3e-5, rtol=3e-5)
        lo, hi = int(starts[i]), int(starts[i + 1])
        if hi > lo:
            torch.testing.assert_close(out[lo:hi], dense_attention(spec, tf, q[lo:hi], kb, vb, 0.25),
                                       atol=3e-5, rtol=3e-5)


# ---- malformed calls --------------------------------------------------------------------------------
SPEC = KVCacheSpec(32, 2, 8, kv_format="saw_int4")
TF = build_layer_transform(SPEC)
NB = 4


def _valid_append(g):
    return dict(pool=torch.randint(0, 256, SPEC.pool_shape(NB), dtype=torch.uint8, generator=g),
                key=torch.randn(3, 2, 32, generator=g), value=torch.randn(3, 2, 32, generator=g),
                slot_mapping=torch.tensor([0, 9, 31]), k_matrix=TF.k_matrix, k_bias=None, v_matrix=None,
                storage="int4", meta_dtype="fp16")


def _valid_attention(g):
    return dict(query=torch.randn(3, 4, 32, generator=g),
                pool=torch.randint(0, 256, SPEC.pool_shape(NB), dtype=torch.uint8, generator=g),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
                seq_lens=torch.tensor([10, 8], dtype=torch.int32),
                query_start_loc=torch.tensor([0, 2, 3], dtype=torch.int32),
                q_matrix=TF.q_matrix, v_matrix=None, scale=0.125, storage="int4", meta_dtype="fp16")


APPEND_MUTATIONS = {
    "key_dtype": lambda a, r: a.update(key=a["key"].to(r.choice([torch.float64, torch.int32, torch.uint8]))),
    "value_dtype": lambda a, r: a.update(value=a["value"].half()),  # differs from key
    "key_rank": lambda a, r: a.update(key=a["key"].reshape(r.choice([(3, 64), (1, 3, 2, 32)]))),
    "value_shape": lambda a, r: a.update(value=a["value"][: r.choice([1, 2])]),
    "heads": lambda a, r: a.update(key=torch.randn(3, 3, 32), value=torch.randn(3, 3, 32)),
    "head_dim": lambda a, r: a.update(key=torch.randn(3, 2, r.choice([16, 48, 33])),
                                      value=torch.randn(3, 2, 32)),
    "slot_high": lambda a, r: a["slot_mapping"].__setitem__(r.randrange(3), r.choice([NB * 8, 10 ** 6, 2 ** 40])),
    "slot_negative": lambda a, r: a["slot_mapping"].__setitem__(r.randrange(3), r.choice([-1, -(2 ** 40)])),
    "slot_repeated": lambda a, r: a["slot_mapping"].__setitem__(2, int(a["slot_mapping"][r.randrange(2)])),
    "slot_dtype": lambda a, r: a.update(slot_mapping=a["slot_mapping"].to(r.choice([torch.float32, torch.int16]))),
    "slot_len": lambda a, r: a.update(slot_mapping=a["slot_mapping"][:2]),
    "slot_rank": lambda a, r: a.update(slot_mapping=a["slot_mapping"][None]),
    "pool_dtype": lambda a, r: a.update(pool=a["pool"].to(torch.int8)),
    "pool_rank": lambda a, r: a.update(pool=a["pool"].reshape(NB, 2, -1)),
    "pool_region": lambda a, r: a.update(pool=a["pool"][..., : r.choice([1, 100, SPEC.region_bytes - 1])]),
    "pool_noncontig": lambda a, r: a.update(pool=a["pool"].transpose(0, 2).contiguous().transpose(0, 2)),
    "storage": lambda a, r: a.update(storage=r.choice(["int2", "INT4", "", "fp8"])),
    "meta": lambda a, r: a.update(meta_dtype=r.choice(["bf16", "fp8", "FP16"])),
    "k_matrix_shape": lambda a, r: a.update(k_matrix=a["k_matrix"][:1]),
    "k_matrix_dtype": lambda a, r: a.update(k_matrix=a["k_matrix"].double()),
    "k_bias_shape": lambda a, r: a.update(k_bias=torch.zeros(2, 16)),
    "v_matrix_shape": lambda a, r: a.update(v_matrix=torch.eye(16)),
    "bf16_transform": lambda a, r: a.update(storage="bf16", pool=torch.zeros(
        KVCacheSpec(32, 2, 8, "bf16").pool_shape(NB), dtype=torch.uint8)),
}

ATTENTION_MUTATIONS = {
    "query_dtype": lambda a, r: a.update(query=a["query"].to(r.choice([torch.float64, torch.int8]))),
    "query_rank": lambda a, r: a.update(query=a["query"].reshape(a["query"].shape[0], -1)),
    "query_heads": lambda a, r: a.update(query=torch.randn(3, r.choice([1, 3, 5]), 32)),
    "query_dim": lambda a, r: a.update(query=torch.randn(3, 4, 16)),
    "table_dtype": lambda a, r: a.update(block_table=a["block_table"].long()),
    "table_rank": lambda a, r: a.update(block_table=a["block_table"].flatten()),
    "table_id_high": lambda a, r: a["block_table"].__setitem__((r.randrange(2), 0), r.choice([NB, 2 ** 31 - 1])),
    "table_id_negative": lambda a, r: a["block_table"].__setitem__((r.randrange(2), 0), -1),
    "lens_past_blocks": lambda a, r: a["seq_lens"].__setitem__(r.randrange(2), r.choice([17, 1000, 2 ** 31 - 1])),
    "lens_negative": lambda a, r: a["seq_lens"].__setitem__(r.randrange(2), -1),
    "lens_dtype": lambda a, r: a.update(seq_lens=a["seq_lens"].long()),
    "lens_count": lambda a, r: a.update(seq_lens=torch.tensor([10, 8, 1], dtype=torch.int32)),
    "starts_not_zero": lambda a, r: a.update(query_start_loc=torch.tensor([1, 2, 3], dtype=torch.int32)),
    "starts_end": lambda a, r: a.update(query_start_loc=torch.tensor([0, 2, r.choice([2, 4])], dtype=torch.int32)),
    "starts_falling": lambda a, r: a.update(query_start_loc=torch.tensor([0, 3, 2], dtype=torch.int32)),
    "more_queries_than_tokens": lambda a, r: a.update(seq_lens=torch.tensor([1, 8], dtype=torch.int32)),
    "starts_dtype": lambda a, r: a.update(query_start_loc=a["query_start_loc"].long()),
    "scale": lambda a, r: a.update(scale=r.choice([0.0, -1.0, float("nan"), float("inf")])),
    "q_matrix": lambda a, r: a.update(q_matrix=a["q_matrix"].transpose(0, 1)[:1]),
    "v_matrix_dtype": lambda a, r: a.update(v_matrix=torch.eye(32, dtype=torch.float16)),
    "pool_region": lambda a, r: a.update(pool=a["pool"][..., :-1]),
    "storage": lambda a, r: a.update(storage="int3"),
}


def _pool_of(args):
    return args["pool"]


@FUZZ
@given(name=st.sampled_from(sorted(APPEND_MUTATIONS)), seed=st.integers(0, 2 ** 20))
def test_malformed_append_raises_value_error_before_writing(name, seed):
    import random
    g = torch.Generator().manual_seed(seed)
    args = _valid_append(g)
    APPEND_MUTATIONS[name](args, random.Random(seed))
    before = args["pool"].clone()
    with pytest.raises(ValueError):
        ops.append(**args)
    assert torch.equal(args["pool"], before)


@FUZZ
@given(name=st.sampled_from(sorted(ATTENTION_MUTATIONS)), seed=st.integers(0, 2 ** 20),
       op=st.sampled_from(["prefill", "decode"]))
def test_malformed_attention_raises_value_error_and_never_writes(name, seed, op):
    import random
    g = torch.Generator().manual_seed(seed)
    args = _valid_attention(g)
    if op == "decode":
        args.pop("query_start_loc")
        args["query"] = args["query"][:2]
        if name.startswith("starts") or name == "more_queries_than_tokens":
            name = "lens_past_blocks"
    ATTENTION_MUTATIONS[name](args, random.Random(seed))
    before = args["pool"].clone()
    with pytest.raises(ValueError):
        getattr(ops, op)(**args)
    assert torch.equal(args["pool"], before)


def test_mutation_bases_are_valid():
    """The unmutated argument sets run: every rejection above comes from its mutation."""
    g = torch.Generator().manual_seed(0)
    ops.append(**_valid_append(g))
    ops.prefill(**_valid_attention(g))
    a = _valid_attention(g)
    a.pop("query_start_loc")
    a["query"] = a["query"][:2]
    ops.decode(**a)


def test_empty_batches_and_zero_lengths():
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, SPEC.pool_shape(NB), dtype=torch.uint8, generator=g)
    before = pool.clone()
    ops.append(pool, torch.zeros(0, 2, 32), torch.zeros(0, 2, 32), torch.zeros(0, dtype=torch.int64), TF.k_matrix,
               None, None, "int4", "fp16")
    assert torch.equal(pool, before)
    empty_table = torch.zeros(0, 3, dtype=torch.int32)
    out = ops.decode(torch.zeros(0, 4, 32), pool, empty_table, torch.zeros(0, dtype=torch.int32), TF.q_matrix,
                     None, 0.1, "int4", "fp16")
    assert out.shape == (0, 4, 32)
    out = ops.prefill(torch.zeros(0, 4, 32), pool, empty_table, torch.zeros(0, dtype=torch.int32),
                      torch.zeros(1, dtype=torch.int32), TF.q_matrix, None, 0.1, "int4", "fp16")
    assert out.shape == (0, 4, 32)
    # zero-length sequences (with garbage block ids: never read) give zero output
    table = torch.tensor([[-5, 7], [0, 1]], dtype=torch.int32)
    lens = torch.tensor([0, 0], dtype=torch.int32)
    out = ops.decode(torch.randn(2, 4, 32), pool, table, lens, TF.q_matrix, None, 0.1, "int4", "fp16")
    assert not bool(out.any()) and bool(torch.isfinite(out).all())
    assert torch.equal(pool, before)


def test_prefill_with_no_sequences_but_queries_is_rejected():
    pool = torch.zeros(SPEC.pool_shape(NB), dtype=torch.uint8)
    with pytest.raises(ValueError, match="query"):
        ops.prefill(torch.randn(3, 4, 32), pool, torch.zeros(0, 2, dtype=torch.int32),
                    torch.zeros(0, dtype=torch.int32), torch.tensor([0], dtype=torch.int32), TF.q_matrix, None, 0.1,
                    "int4", "fp16")


# ---- the kernels (TRITON_INTERPRET=1) on fuzzed input ------------------------------------------------
# the fixture `interp_kernels` (the kernel modules under the interpreter) lives in conftest.py


def _through_kernel(interp_kernels, op, *args):
    """What the public op does on CUDA, run on CPU tensors: the checks, then the kernel."""
    if op == "append":
        t = checks.check_append(*args)
        checks.check_append_indices(args[0], args[3], t)
        return interp_kernels["append"].append(*args)
    query, pool, table, lens = args[:4]
    qsl = args[4] if op == "prefill" else None
    rest = args[5:] if op == "prefill" else args[4:]
    t = checks.check_attention(query, pool, table, lens, qsl, *rest)
    checks.check_attention_indices(pool, table, lens, qsl, query.shape[0], t)
    return getattr(interp_kernels[op], op)(*args)


KERNEL_FUZZ = settings(FUZZ, max_examples=6)


@st.composite
def kernel_scenarios(draw):
    b = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 20), min_size=b, max_size=b))
    return dict(fmt=draw(st.sampled_from(["int4", "int8", "bf16", "saw_int4_v_signs"])), d=32, h=draw(st.integers(1, 2)),
                group=draw(st.sampled_from([1, 2])), t=8, lengths=lengths,
                new=[draw(st.integers(1, n)) for n in lengths], kv_dtype=draw(st.sampled_from(DTYPES[1:])),
                q_dtype=draw(st.sampled_from(DTYPES)), kv_layout=draw(st.sampled_from(LAYOUTS)),
                q_layout=draw(st.sampled_from(LAYOUTS)), idx_layout="contiguous",
                slot_dtype=draw(st.sampled_from([torch.int32, torch.int64])), extra_blocks=1,
                seed=draw(st.integers(0, 2 ** 31 - 1)))


@KERNEL_FUZZ
@given(sc=kernel_scenarios())
def test_kernels_match_reference_on_fuzzed_batches(interp_kernels, sc):
    spec, tf, g, table, pool, k, v = _build(sc)
    t = sc["t"]
    slots = slots_for(table, sc["lengths"], t)
    p_ker = pool.clone()
    tfargs = (tf.k_matrix, tf.k_bias, tf.v_matrix, spec.storage, spec.metadata_dtype)
    key, val = _noncontig(k, sc["kv_layout"]), _noncontig(v, sc["kv_layout"])
    ref.append(pool, key, val, slots.to(sc["slot_dtype"]), *tfargs)
    _through_kernel(interp_kernels, "append", p_ker, key, val, slots.to(sc["slot_dtype"]), *tfargs)
    if tf.k_matrix is None:  # no transform: bit-identical (bf16/fp16 input converts exactly to bf16)
        assert torch.equal(pool, p_ker)
    else:
        _assert_only_rows_changed(spec, pool, p_ker, _row_mask(pool.shape, t, slots))
    hq = sc["h"] * sc["group"]
    starts = torch.tensor([0] + sc["new"], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(sc["lengths"], dtype=torch.int32)
    q = _noncontig(torch.randn(int(starts[-1]), hq, 32, generator=g).to(sc["q_dtype"]), sc["q_layout"])
    qd = _noncontig(torch.randn(len(sc["lengths"]), hq, 32, generator=g).to(sc["q_dtype"]), sc["q_layout"])
    snap = pool.clone()
    attn = (tf.q_matrix, tf.v_matrix, 0.125, spec.storage, spec.metadata_dtype)
    got = _through_kernel(interp_kernels, "prefill", q, pool, table, lens, starts, *attn)
    got_d = _through_kernel(interp_kernels, "decode", qd, pool, table, lens, *attn)
    assert torch.equal(pool, snap)
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.prefill(q, pool, table, lens, starts, *attn).float(), **tol)
    torch.testing.assert_close(got_d.float(), ref.decode(qd, pool, table, lens, *attn).float(), **tol)


def _noncontig_index_case():
    spec = KVCacheSpec(32, 1, 8, kv_format="int4")
    g = torch.Generator().manual_seed(3)
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8)
    k, v = torch.randn(32, 1, 32, generator=g), torch.randn(32, 1, 32, generator=g)
    ref.append(pool, k, v, torch.arange(32), None, None, None, "int4", "fp16")
    table = torch.tensor([[3, 0, 2, 0], [1, 0, 0, 0]], dtype=torch.int32)[:, ::2]  # [[3, 2], [1, 0]]
    lens = torch.tensor([13, 0, 8, 0], dtype=torch.int32)[::2]  # [13, 8]
    return spec, pool, table, lens, g


def test_kernel_append_strided_slot_mapping_matches_reference_or_is_rejected(interp_kernels):
    spec = KVCacheSpec(32, 1, 8, kv_format="int4")
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(5, 1, 32, generator=g), torch.randn(5, 1, 32, generator=g)
    slots = torch.arange(10)[::2]
    p_ref, p_ker = (torch.zeros(spec.pool_shape(2), dtype=torch.uint8) for _ in range(2))
    ref.append(p_ref, k, v, slots, None, None, None, "int4", "fp16")
    try:
        _through_kernel(interp_kernels, "append", p_ker, k, v, slots, None, None, None, "int4", "fp16")
    except ValueError:
        assert not bool(p_ker.any())  # rejected before writing: acceptable
        return
    assert torch.equal(p_ref, p_ker)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_kernel_attention_strided_index_tensors_match_reference_or_are_rejected(interp_kernels, op):
    spec, pool, table, lens, g = _noncontig_index_case()
    q = torch.randn(2, 1, 32, generator=g)
    args = (q, pool, table, lens) + ((torch.tensor([0, 1, 2], dtype=torch.int32)[::1],) if op == "prefill" else ())
    args += (None, None, 0.2, "int4", "fp16")
    try:
        got = _through_kernel(interp_kernels, op, *args)
    except ValueError:
        return
    want = getattr(ref, op)(*args)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
