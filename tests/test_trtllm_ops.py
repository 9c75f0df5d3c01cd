"""The AutoDeploy cached-attention op of the saw_int4 backends on a small random GQA model, against dense
attention (on the CPU the ops run their PyTorch reference).

Mirrors TensorRT-LLM's own tests of its Triton paged backend (test_kv_cache.py: a full-sequence pass, a
token-by-token loop, and a continuation after the cache was overwritten with random tokens, each
against the uncached model; test_triton_paged_attention.py: the cached kernels against SDPA). Two
references: the exact one is dense attention over the K/V *as stored* (quantized, rotated: the
specification of the ops), computed from the very q/k/v the op was given; the model-level one is the
uncached model, which differs by the quantization error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import dense_attention
from trtllm_sawint4 import KVCacheSpec
from trtllm_sawint4.integrations.tensorrt_llm import adapter, ops
from trtllm_steps import ADSteps

FORMATS = ["saw_int4", "int4", "bf16"]
# max |cached - uncached| / max |uncached| of the attention output: quantization error, not metadata
MODEL_TOLERANCE = {"bf16": 0.02, "int4": 0.25, "saw_int4": 0.25}


class TinyGQA(torch.nn.Module):
    """Embedding, q/k/v projections, attention, output projection: the model of TensorRT-LLM's test_kv_cache."""

    def __init__(self, vocab=64, heads=4, kv_heads=2, head_dim=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        hidden = heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.q_proj = torch.nn.Linear(hidden, heads * head_dim)
        self.k_proj = torch.nn.Linear(hidden, kv_heads * head_dim)
        self.v_proj = torch.nn.Linear(hidden, kv_heads * head_dim)
        self.o_proj = torch.nn.Linear(heads * head_dim, hidden)

    def qkv(self, ids):
        x = self.embed(ids)
        b, s = x.size(0), x.size(1)  # no unpacking of x.shape: torch.fx can trace this
        return (self.q_proj(x).view(b, s, self.heads, self.head_dim),
                self.k_proj(x).view(b, s, self.kv_heads, self.head_dim),
                self.v_proj(x).view(b, s, self.kv_heads, self.head_dim))

    def uncached_attention(self, ids):
        q, k, v = self.qkv(ids)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        return y.transpose(1, 2)


class CachedRunner:
    """Runs steps through the two custom ops the way an AutoDeploy graph calls them, and keeps the exact
    expectation: dense attention over everything each sequence has stored."""

    def __init__(self, model: TinyGQA, fmt: str, tokens_per_block=8, num_blocks=64, max_batch=6, max_seq_len=48,
                 seed=0):
        self.model = model
        self.spec = KVCacheSpec(head_dim=model.head_dim, num_kv_heads=model.kv_heads, tokens_per_block=tokens_per_block,
                                kv_format=fmt)
        self.tf = ops.layer_transform(self.spec, "cpu")
        self.steps = ADSteps(max_batch, max_seq_len, tokens_per_block, num_blocks, seed=seed)
        self.pool = torch.zeros(self.spec.pool_shape(num_blocks), dtype=torch.uint8)
        self.kv = {}  # seq_id -> (k [max_seq_len, H, D], v) as written
        self.max_seq_len = max_seq_len

    def step(self, entries, ids_per_entry):
        """entries as ADSteps.step; ids_per_entry: one 1-D LongTensor of new tokens per entry.
        Returns (attention output per entry, exact expectation per entry)."""
        md = self.steps.step(entries)
        if md["generate_only"]:
            ids = torch.stack(ids_per_entry)  # [B, 1]
        else:
            ids = torch.cat(ids_per_entry)[None]  # [1, N]
        q, k, v = self.model.qkv(ids)
        seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(md["position_ids"], md["batch_info_host"],
                                                            md["cu_seqlen"], md["seq_len_with_cache"])
        y = torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *[md[n] for n in adapter.STANDARD_METADATA_ARGS], seq, pos,
                                                   self.pool, *adapter.op_constants(self.spec))
        assert y.shape == q.shape
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        qf, kf, vf, yf = flat(q), flat(k), flat(v), flat(y)
        outs, expected, row = [], [], 0
        for (seq_id, p0, n, _), _ in zip(entries, ids_per_entry):
            hist = self.kv.setdefault(seq_id, (torch.zeros(self.max_seq_len, self.model.kv_heads, self.model.head_dim),
                                               torch.zeros(self.max_seq_len, self.model.kv_heads, self.model.head_dim)))
            hist[0][p0:p0 + n], hist[1][p0:p0 + n] = kf[row:row + n].detach(), vf[row:row + n].detach()
            expected.append(dense_attention(self.spec, self.tf, qf[row:row + n].detach(), hist[0][:p0 + n],
                                            hist[1][:p0 + n], self.model.head_dim ** -0.5))
            outs.append(yf[row:row + n])
            row += n
        return outs, expected


def _close(got, want, rel=1e-4):
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * max(want.abs().max().item(), 1.0), f"max abs error {err}"


def _rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("fmt", FORMATS)
@torch.inference_mode()
def test_full_pass_token_loop_and_continuation(fmt, one_torch_thread):
    model = TinyGQA()
    batch, length = 3, 20
    ids = torch.randint(0, 64, (batch, length))
    y_model = model.uncached_attention(ids)

    # 1: all tokens at once (a prefill step of three sequences, flattened to [1, 60])
    run = CachedRunner(model, fmt)
    outs, want = run.step([(b, 0, length, "prefill") for b in range(batch)], list(ids))
    for b in range(batch):
        _close(outs[b], want[b])
        assert _rel_err(outs[b], y_model[b]) < MODEL_TOLERANCE[fmt]

    # 2: token by token (generate-only steps [3, 1]; the first one has no cache yet)
    run = CachedRunner(model, fmt, seed=1)
    loop = torch.empty_like(y_model)
    for p in range(length):
        outs, want = run.step([(b, p, 1, "decode") for b in range(batch)], list(ids[:, p:p + 1]))
        for b in range(batch):
            _close(outs[b], want[b])
            loop[b, p] = outs[b][0]
    assert _rel_err(loop, y_model) < MODEL_TOLERANCE[fmt]

    # 3: random tokens overwrite the last two positions and write two more; then the original tokens again
    for p in range(length - 2, length + 2):
        run.step([(b, p, 1, "decode") for b in range(batch)], list(torch.randint(0, 64, (batch, 1))))
    for p in range(length - 2, length):
        outs, want = run.step([(b, p, 1, "decode") for b in range(batch)], list(ids[:, p:p + 1]))
        for b in range(batch):
            _close(outs[b], want[b])
            _close(outs[b][0], loop[b, p], rel=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@torch.inference_mode()
def test_mixed_step_prefill_extend_decode(fmt, one_torch_thread):
    """One step holding a new prompt, a chunked-prefill continuation and decodes, after some history."""
    model = TinyGQA(seed=3)
    run = CachedRunner(model, fmt, tokens_per_block=16, seed=2)
    toks = {s: torch.randint(0, 64, (40,)) for s in range(5)}
    run.step([(1, 0, 9, "prefill"), (2, 0, 17, "prefill"), (3, 0, 5, "prefill")],
             [toks[1][:9], toks[2][:17], toks[3][:5]])
    entries = [(0, 0, 6, "prefill"), (1, 9, 12, "extend"), (2, 17, 1, "decode"), (3, 5, 1, "decode")]
    ids = [toks[0][:6], toks[1][9:21], toks[2][17:18], toks[3][5:6]]
    outs, want = run.step(entries, ids)
    for got, exp in zip(outs, want):
        _close(got, exp)
    # the same sequences without the cache
    y1 = model.uncached_attention(toks[1][None, :21])[0, 9:21]
    assert _rel_err(outs[1], y1) < MODEL_TOLERANCE[fmt]


@torch.inference_mode()
def test_bf16_activations(one_torch_thread):
    model = TinyGQA(seed=4).to(torch.bfloat16)
    run = CachedRunner(model, "saw_int4")
    ids = torch.randint(0, 64, (2, 12))
    outs, want = run.step([(0, 0, 12, "prefill"), (1, 0, 12, "prefill")], list(ids))
    assert outs[0].dtype == torch.bfloat16
    for got, exp in zip(outs, want):
        _close(got, exp, rel=2e-2)  # the output is rounded to bf16


@torch.inference_mode()
def test_out_buffer_and_padding_rows(one_torch_thread):
    """AutoDeploy's piecewise runner passes `out`; a buffer longer than the step gets zeros past it."""
    model = TinyGQA()
    run = CachedRunner(model, "saw_int4")
    md = run.steps.step([(0, 0, 5, "prefill")])
    ids = torch.randint(0, 64, (1, 8))  # 5 real tokens + 3 rows of padding
    q, k, v = model.qkv(ids)
    seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(ids, md["batch_info_host"], md["cu_seqlen"],
                                                        md["seq_len_with_cache"])
    out = torch.full_like(q, 7.0)
    ret = torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *[md[n] for n in adapter.STANDARD_METADATA_ARGS], seq, pos,
                                                 run.pool, *adapter.op_constants(run.spec), out=out)
    assert ret.numel() == 0
    assert bool((out[0, 5:] == 0).all()) and not bool((out[0, :5] == 7.0).any())
    want = dense_attention(run.spec, run.tf, q[0, :5], k[0, :5], v[0, :5], model.head_dim ** -0.5)
    _close(out[0, :5], want)


def test_signature_is_autodeploy_call_layout():
    """AutoDeploy passes (*qkv, *standard metadata, *extra metadata, *caches, *constants) positionally."""
    names = [a.name for a in torch.ops.sawint4.trtllm_mha_with_cache.default._schema.arguments]
    assert names == (["q", "k", "v"] + adapter.STANDARD_METADATA_ARGS + adapter.EXTRA_METADATA_OUTPUTS
                     + adapter.CACHE_NAMES + adapter.CONSTANT_NAMES + ["out"])
    prep = torch.ops.sawint4.trtllm_prepare_metadata.default._schema
    assert [a.name for a in prep.arguments] == ["position_ids", "batch_info_host", "cu_seqlen", "seq_len_with_cache"]
    assert len(prep.returns) == 1  # one Tensor[] of len(EXTRA_METADATA_OUTPUTS)


def test_fake_implementations_give_static_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 10, 4, 32)
        k = torch.empty(1, 10, 2, 32)
        pid = torch.empty(1, 10, dtype=torch.long)
        info = torch.empty(12, dtype=torch.int32)
        buf = torch.empty(9, dtype=torch.int32)
        pool = torch.empty(16, 2, 2, 8 * 20, dtype=torch.uint8)
        seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(pid, info, buf, buf)
        y = torch.ops.sawint4.trtllm_mha_with_cache(q, k, k, info, buf, buf, buf, buf, seq, pos, pool, None,
                                                   "saw_int4", 32, False, None, "fp16")
    assert seq.shape == pos.shape == (10,) and seq.dtype == torch.int32
    assert y.shape == q.shape


def test_errors_name_the_argument():
    model = TinyGQA()
    run = CachedRunner(model, "int4")
    md = run.steps.step([(0, 0, 4, "prefill")])
    q, k, v = model.qkv(torch.randint(0, 64, (1, 4)))
    seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(md["position_ids"], md["batch_info_host"], md["cu_seqlen"],
                                                        md["seq_len_with_cache"])
    meta = [md[n] for n in adapter.STANDARD_METADATA_ARGS]
    consts = adapter.op_constants(run.spec)
    with pytest.raises(ValueError, match="q, k, v"):
        torch.ops.sawint4.trtllm_mha_with_cache(q, k[:, :2], v, *meta, seq, pos, run.pool, *consts)
    with pytest.raises(ValueError, match="kv_format"):
        torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *meta, seq, pos, run.pool, None, "fp8", 0, False, None, "fp16")
    with pytest.raises(ValueError, match="kv_pool"):
        torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *meta, seq, pos, run.pool.float(), *consts)
    with pytest.raises(ValueError, match="kv_pool"):  # a saw_int4 pool read as bf16: wrong region size
        torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, *meta, seq, pos, run.pool[..., :-3].contiguous(), *consts)
    short = md["batch_info_host"].clone()
    short[1] = 9  # says 9 tokens, q holds 4
    with pytest.raises(ValueError, match="batch_info_host"):
        torch.ops.sawint4.trtllm_mha_with_cache(q, k, v, short, *meta[1:], seq, pos, run.pool, *consts)


def test_opcheck(one_torch_thread):
    """torch.library.opcheck: schema (the pool mutation declared), fake tensors, AOT dispatch."""
    model = TinyGQA()
    run = CachedRunner(model, "saw_int4")
    md = run.steps.step([(0, 0, 5, "prefill"), (1, 0, 3, "prefill")])
    with torch.no_grad():
        q, k, v = model.qkv(torch.randint(0, 64, (1, 8)))
    prep = (md["position_ids"], md["batch_info_host"], md["cu_seqlen"], md["seq_len_with_cache"])
    torch.library.opcheck(torch.ops.sawint4.trtllm_prepare_metadata.default, prep)
    seq, pos = torch.ops.sawint4.trtllm_prepare_metadata(*prep)
    args = (q, k, v, *[md[n] for n in adapter.STANDARD_METADATA_ARGS], seq, pos, run.pool, *adapter.op_constants(run.spec))
    torch.library.opcheck(torch.ops.sawint4.trtllm_mha_with_cache.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
