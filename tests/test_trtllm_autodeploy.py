"""The AutoDeploy side of the saw_int4 backends against a FAKE tensorrt_llm (tests/fakes): a fake that
follows the documented interface of TensorRT-LLM 1.3 (AutoDeploy sources at commit 1099c65c), not
TensorRT-LLM. Passing here shows the descriptor, handlers and registration follow that interface as
documented; only a run with the real TensorRT-LLM shows they work with it (docs/tensorrt_llm.md).

The graph test mirrors TensorRT-LLM's test_kv_cache.py: a small GQA model calling
auto_deploy::torch_attention, the cached-attention insertion done the way the documented
insert_cached_attention transform does it (same call layout, same descriptor calls), then a
full-sequence pass, a token-by-token loop and a continuation, each against the uncached model, and an
export of the transformed graph.
"""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import trtllm_sawint4.integrations.tensorrt_llm as sawint4_trtllm
from trtllm_fakes import FAKES, fake_trtllm, no_trtllm  # noqa: F401  (fixtures)
from trtllm_sawint4 import KVCacheSpec
from trtllm_sawint4.integrations.tensorrt_llm import adapter, autoload, deploy, registration
from trtllm_sawint4.integrations.tensorrt_llm.resources import bf16_bytes_per_token
from trtllm_steps import ADSteps
from test_trtllm_ops import MODEL_TOLERANCE, TinyGQA, _rel_err


class KvCacheConfig:  # the two fields of TensorRT-LLM's KvCacheConfig that the descriptor reads
    def __init__(self, tokens_per_block=16, dtype="auto"):
        self.tokens_per_block, self.dtype = tokens_per_block, dtype


class SequenceInfo:  # what ResourceHandler.allocate reads of AutoDeploy's SequenceInfo
    def __init__(self, num_blocks, tokens_per_block, device="cpu"):
        self.num_blocks, self.tokens_per_block, self.device = num_blocks, tokens_per_block, torch.device(device)


# ---- registration ----------------------------------------------------------------------------------------
def test_register_is_idempotent_and_refuses_foreign_names(fake_trtllm):
    ai = fake_trtllm
    assert sawint4_trtllm.register(ai) == ["saw_int4", "sawint4_int4", "sawint4_bf16"]
    first = {n: ai.AttentionRegistry.get(n) for n in sawint4_trtllm.BACKENDS}
    assert sawint4_trtllm.register(ai) == list(sawint4_trtllm.BACKENDS)  # the registry asserts on a second add
    assert {n: ai.AttentionRegistry.get(n) for n in sawint4_trtllm.BACKENDS} == first
    for name, fmt in sawint4_trtllm.BACKENDS.items():
        cls = first[name]
        assert issubclass(cls, ai.AttentionDescriptor) and cls.KV_FORMAT == fmt
        cls()  # every abstract classmethod is implemented
    assert registration.registered(ai) == {n: True for n in sawint4_trtllm.BACKENDS}

    ai.AttentionRegistry._attention_registry.pop("sawint4_bf16")
    ai.AttentionRegistry.register("sawint4_bf16")(type("Other", (ai.AttentionDescriptor,), {}))
    with pytest.raises(RuntimeError, match="'sawint4_bf16' is already registered by"):
        sawint4_trtllm.register(ai)


def test_register_without_tensorrt_llm_says_what_to_install(no_trtllm):
    with pytest.raises(ImportError) as e:
        sawint4_trtllm.register()
    assert str(e.value) == registration.MISSING_MESSAGE
    assert "TensorRT-LLM 1.3" in str(e.value) and "pip install tensorrt_llm" in str(e.value)
    assert sawint4_trtllm.is_tensorrt_llm_available() is False


def test_version_other_than_the_target_warns_once(fake_trtllm, monkeypatch):
    monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.2.0")
    registration._warned_version.discard("1.2.0")
    with pytest.warns(RuntimeWarning, match="written against TensorRT-LLM 1.3.*this is 1.2.0"):
        sawint4_trtllm.register(fake_trtllm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sawint4_trtllm.register(fake_trtllm)  # once per version
        monkeypatch.setattr(sys.modules["tensorrt_llm"], "__version__", "1.3.0rc30")
        sawint4_trtllm.register(fake_trtllm)  # the target line: no warning


# ---- resource handler: exact bytes per token ------------------------------------------------------------
@pytest.mark.parametrize("name", list(sawint4_trtllm.BACKENDS))
def test_pool_handler_reports_exact_bytes(fake_trtllm, name):
    fmt = sawint4_trtllm.BACKENDS[name]
    spec = KVCacheSpec(head_dim=128, num_kv_heads=8, tokens_per_block=32, kv_format=fmt)
    handler = adapter.make_backends(fake_trtllm)[name].PoolHandler(spec)
    assert handler.is_paged
    pool = handler.allocate(SequenceInfo(num_blocks=10, tokens_per_block=32))
    assert pool.dtype == torch.uint8 and tuple(pool.shape) == spec.pool_shape(10) and pool.is_contiguous()
    # the property AutoDeploy's resize sums: exactly the pool's bytes per token
    assert handler.bytes_per_token == pool.numel() // (10 * 32) == spec.bytes_per_token
    with pytest.raises(ValueError, match="tokens_per_block=64 but the pool was planned with tokens_per_block=32"):
        handler.allocate(SequenceInfo(num_blocks=10, tokens_per_block=64))


def test_int4_pool_holds_about_3_76x_the_tokens_of_bf16(fake_trtllm):
    spec = KVCacheSpec(head_dim=128, num_kv_heads=8, tokens_per_block=64, kv_format="saw_int4")
    handler = adapter.make_backends(fake_trtllm)["saw_int4"].PoolHandler(spec)
    ratio = bf16_bytes_per_token(8, 128) / handler.bytes_per_token
    assert handler.bytes_per_token == 2 * 8 * (64 + 4)  # codes + fp16 scale and min, K and V
    assert ratio == pytest.approx(256 / 68) and 3.76 < ratio < 3.77


# ---- the graph: cached-attention insertion as AutoDeploy's transform does it ------------------------------
class GQAWithTorchAttention(TinyGQA):
    """TinyGQA whose attention is AutoDeploy's source op (like test_kv_cache.py's GQAWithSdpaAndEmbedding)."""

    def forward(self, input_ids):
        q, k, v = self.qkv(input_ids)
        y = torch.ops.auto_deploy.torch_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None,
                                                  sinks=None, sliding_window=None, logit_cap=None, layout="bsnd")
        return self.o_proj(y.flatten(2))


def _trace(model, example):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    gm = torch.fx.symbolic_trace(model)
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example)  # meta["val"], as after export
    return gm


def insert_cached_attention(gm, descriptor, cache_config):
    """The documented steps of AutoDeploy's insert_cached_attention, for one backend: a graph input per
    standard metadata arg, one prepare-metadata call, per layer the cache inputs named r{N}_{key}, and
    cached_op(*qkv, *std, *extra, *caches, *constants) in place of the source op. Returns the handlers."""
    g = gm.graph
    source = descriptor.get_source_attention_op()
    nodes = [n for n in g.nodes if n.op == "call_function" and n.target in (source, source.default)]
    inputs = {}

    def graph_input(name):
        if name not in inputs:
            last = [n for n in g.nodes if n.op == "placeholder"][-1]
            with g.inserting_after(last):
                inputs[name] = g.placeholder(name)
        return inputs[name]

    std = [graph_input(n) for n in descriptor.get_standard_metadata_args()]
    prep_op, num_out, const_args = descriptor.get_prepare_extra_metadata_info(nodes[0])
    available = {"position_ids", "batch_info_host", "cu_seqlen", "seq_len_with_cache", "cu_num_pages", "cache_loc",
                 "input_pos", "last_page_len"}
    prep_in = [graph_input(a.name) for a in prep_op._schema.arguments if a.name in available]
    with g.inserting_before(nodes[0]):
        ret = g.call_function(prep_op, (*prep_in, *const_args))
        extra = [g.call_function(operator.getitem, (ret, i)) for i in range(num_out)]
    handlers = {}
    for node in nodes:
        qkv = node.args[: descriptor.get_num_qkv_args()]
        caches = []
        for key, handler in descriptor.get_cache_initializers(node, cache_config).items():
            name = f"r{len(handlers)}_{key}"
            handlers[name] = handler
            caches.append(graph_input(name))
        constants = descriptor.get_constants(node)
        with g.inserting_before(node):
            cached = g.call_function(descriptor.get_cached_attention_op(), (*qkv, *std, *extra, *caches, *constants))
        node.replace_all_uses_with(cached)
        g.erase_node(node)
    gm.recompile()
    return handlers


@pytest.mark.parametrize("name", ["saw_int4", "sawint4_bf16"])
@torch.inference_mode()
def test_transformed_graph_matches_the_uncached_model(fake_trtllm, name, one_torch_thread):
    fmt = sawint4_trtllm.BACKENDS[name]
    sawint4_trtllm.register(fake_trtllm)
    descriptor = fake_trtllm.AttentionRegistry.get(name)
    model = GQAWithTorchAttention(seed=5)
    batch, length, t = 3, 12, 8
    ids = torch.randint(0, 64, (batch, length))
    y_model = model(ids)
    gm = _trace(model, (ids,))
    handlers = insert_cached_attention(gm, descriptor, KvCacheConfig(tokens_per_block=t))
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "torch_attention" in str(n.target)]
    assert list(handlers) == ["r0_kv_pool"] and handlers["r0_kv_pool"].spec.kv_format == fmt

    def fresh(seed):
        pools = {k: h.allocate(SequenceInfo(64, t)) for k, h in handlers.items()}
        return ADSteps(max_batch=8, max_seq_len=32, tokens_per_block=t, num_blocks=64, seed=seed), pools

    def call(steps, pools, entries, step_ids):
        md = steps.step(entries)
        args = {k: md[k] for k in ("batch_info_host", "cu_seqlen", "cu_num_pages", "cache_loc",
                                    "seq_len_with_cache", "position_ids")}
        return gm(input_ids=step_ids, **args, **pools)

    # 1: the whole sequences in one step ([1, b*s], as AutoDeploy flattens a non-generate batch)
    steps, pools = fresh(0)
    y = call(steps, pools, [(b, 0, length, "prefill") for b in range(batch)], ids.reshape(1, -1))
    assert _rel_err(y.view(batch, length, -1), y_model) < MODEL_TOLERANCE[fmt]
    # 2: token by token ([b, 1] generate-only steps)
    steps, pools = fresh(1)
    loop = torch.cat([call(steps, pools, [(b, p, 1, "decode") for b in range(batch)], ids[:, p:p + 1])
                      for p in range(length)], 1)
    assert _rel_err(loop, y_model) < MODEL_TOLERANCE[fmt]
    assert _rel_err(loop, y.view(batch, length, -1)) < 1e-4  # same stored K/V, same answers
    # 3: continuation after random tokens overwrote the last positions
    for p in range(length - 2, length + 1):
        call(steps, pools, [(b, p, 1, "decode") for b in range(batch)], torch.randint(0, 64, (batch, 1)))
    again = torch.cat([call(steps, pools, [(b, p, 1, "decode") for b in range(batch)], ids[:, p:p + 1])
                       for p in range(length - 2, length)], 1)
    assert _rel_err(again, loop[:, -2:]) < 1e-4


@torch.inference_mode(False)
def test_transformed_graph_exports(fake_trtllm):
    """torch.export of the transformed graph (test_kv_cache.py's last check): the fakes and the pool
    mutation are traceable."""
    sawint4_trtllm.register(fake_trtllm)
    model = GQAWithTorchAttention(seed=6)
    ids = torch.randint(0, 64, (2, 5))
    gm = _trace(model, (ids,))
    handlers = insert_cached_attention(gm, fake_trtllm.AttentionRegistry.get("saw_int4"), KvCacheConfig(16))
    md = ADSteps(4, 32, 16, 16).step([(0, 0, 5, "prefill"), (1, 0, 5, "prefill")])
    kwargs = {k: md[k] for k in ("batch_info_host", "cu_seqlen", "cu_num_pages", "cache_loc", "seq_len_with_cache",
                                  "position_ids")}
    kwargs.update({k: h.allocate(SequenceInfo(16, 16)) for k, h in handlers.items()})
    with torch.no_grad():
        exported = torch.export.export(gm, (), {"input_ids": ids.reshape(1, -1), **kwargs}, strict=False)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "sawint4.trtllm_mha_with_cache.default" in targets


# ---- what the descriptor refuses, at transform time -------------------------------------------------------
def _node(fake_trtllm, **overrides):
    args = dict(attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, sinks=None, sliding_window=None,
                logit_cap=None, layout="bsnd")
    args.update(overrides)

    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            a = dict(args)
            if a["attn_mask"] == "mask":
                a["attn_mask"] = mask
            return torch.ops.auto_deploy.torch_attention(q, k, v, **a)

    ex = (torch.randn(1, 4, 4, 32), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32), torch.zeros(4, 4))
    gm = _trace(M(), ex)
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "torch_attention" in str(n.target))


def test_descriptor_refuses_what_it_cannot_compute(fake_trtllm):
    sawint4_trtllm.register(fake_trtllm)
    d = fake_trtllm.AttentionRegistry.get("saw_int4")
    assert d.get_constants(_node(fake_trtllm, scale=0.125)) == [0.125, "saw_int4", 32, False, None, "fp16", None]
    with pytest.raises(ValueError, match="kv_cache_config.dtype='fp8'"):
        d.get_cache_initializers(_node(fake_trtllm), KvCacheConfig(dtype="fp8"))
    with pytest.raises(ValueError, match="tokens_per_block must be a power of 2.*kv_cache_config.tokens_per_block"):
        d.get_cache_initializers(_node(fake_trtllm), KvCacheConfig(tokens_per_block=48))
    for bad, match in ((dict(attn_mask="mask"), "attn_mask"), (dict(is_causal=False), "non-causal"),
                       (dict(logit_cap=30.0), "soft-capping"), (dict(layout="bnsd"), "layout must be 'bsnd'")):
        with pytest.raises((NotImplementedError, ValueError), match=match):
            d.get_constants(_node(fake_trtllm, **bad))
    if not sawint4_trtllm.ops.supports_sliding_window():
        with pytest.raises(NotImplementedError, match="sliding_window=64"):
            d.get_constants(_node(fake_trtllm, sliding_window=64))


# ---- worker hook -----------------------------------------------------------------------------------------
def test_hook_registers_when_autodeploy_is_imported(fake_trtllm, monkeypatch):
    # the fixture imported the fake attention interface already; drop it to import it under the hook
    for m in [m for m in sys.modules if m.startswith("tensorrt_llm")]:
        del sys.modules[m]
    autoload.disarm()
    try:
        assert autoload.arm() and autoload.arm() and sum(
            getattr(f, "sawint4_trtllm_hook", False) for f in sys.meta_path) == 1
        import tensorrt_llm._torch.auto_deploy.custom_ops as custom_ops  # the package imports the interface

        ai = custom_ops.attention_interface
        assert registration.registered(ai) == {n: True for n in sawint4_trtllm.BACKENDS}
        assert ai.__spec__.loader.get_filename(ai.__name__).endswith("attention_interface.py")  # loader forwarded
    finally:
        autoload.disarm()
    monkeypatch.setenv(autoload.DISABLE_ENV, "0")
    assert autoload.arm() is False and not autoload.armed()


def test_pth_hook_in_a_fresh_interpreter(tmp_path):
    """The .pth line, processed by `site` at start-up, must not import torch; importing AutoDeploy's
    attention interface afterwards registers the backends."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    pth = deploy.install_hook(site_dir)
    assert deploy.hook_installed(site_dir) and pth.name == deploy.PTH_NAME
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); "
        "print('torch' in sys.modules, 'trtllm_sawint4' in sys.modules); "
        "sys.path.insert(0, sys.argv[2]); "
        "import tensorrt_llm._torch.auto_deploy.custom_ops as c; "
        "print(sorted(k for k in c.attention_interface.AttentionRegistry._attention_registry))"
    )
    env = {k: v for k, v in os.environ.items() if k != autoload.DISABLE_ENV}
    out = subprocess.run([sys.executable, "-c", code, str(site_dir), str(FAKES)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "False False"  # arming costs no torch import
    assert lines[1] == "['saw_int4', 'sawint4_bf16', 'sawint4_int4']"
    assert "Warning" not in out.stderr and "Error" not in out.stderr, out.stderr
    assert deploy.uninstall_hook(site_dir) == pth and not pth.exists()


def test_pth_line_is_harmless_when_the_package_is_gone(tmp_path):
    (tmp_path / deploy.PTH_NAME).write_text(deploy.pth_line(tmp_path / "missing" / "autoload.py"))
    out = subprocess.run([sys.executable, "-c", "import site, sys; site.addsitedir(sys.argv[1]); print('ok')",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok" and out.stderr == ""


def test_snippet_runs_against_the_fake(fake_trtllm):
    """The generated LLM(...) snippet registers the backends and passes the AutoDeploy arguments."""
    import tensorrt_llm._torch.auto_deploy as ad

    kwargs = deploy.llm_kwargs("org/model", "sawint4_int4", 0.7, 32, max_seq_len=2048)
    exec(compile(deploy.llm_snippet(kwargs), "<snippet>", "exec"), {})
    llm = ad.CREATED[-1]
    assert llm.kwargs["transforms"] == {"insert_cached_attention": {"backend": "sawint4_int4"}}
    assert llm.kwargs["kv_cache_config"].fields == {"free_gpu_memory_fraction": 0.7, "tokens_per_block": 32,
                                                    "enable_block_reuse": False}
    assert llm.kwargs["max_seq_len"] == 2048 and llm.kwargs["model"] == "org/model"
    assert registration.registered(fake_trtllm)["saw_int4"]


def test_fakes_are_not_importable_by_default():
    assert not (Path(__file__).parent / "tensorrt_llm").exists()
    assert "tensorrt_llm" not in sys.modules or sys.modules["tensorrt_llm"] is None
