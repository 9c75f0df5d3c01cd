"""After `PagedEngine.warm_up()`, serving compiles no new kernel variant.

Triton compiles a kernel variant the first time a launch needs it, inside the step that launched it: on the
H200 about a second per kernel, a stall of every request in that step. Here the engine runs the Triton
kernels under the interpreter (which compiles nothing) and `VariantCensus` computes, with Triton's own
binder, the variant each launch would compile on a GPU: after the warm-up, a workload of ragged arrivals,
one-sequence and many-sequence steps, chunked prefill and decode must meet none it has not launched."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("triton")

from serving_workloads import RAGGED_ARRIVALS, serve  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402
from trtllm_sawint4.kernels.variants import VariantCensus  # noqa: E402
from trtllm_sawint4.serving.engine import PagedEngine  # noqa: E402

T = 8  # tokens per block


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def test_no_kernel_variant_compiles_after_the_warm_up(kernels_on_cpu):
    model = tiny_model("llama")
    engine = PagedEngine(model, kv_format="saw_int4", tokens_per_block=T, num_blocks=80, max_batch=18,
                         max_step_tokens=40, max_seq_len=64, decode_graphs="static", graph_batch_sizes=(1, 4, 16),
                         prefix_sharing=False)
    with VariantCensus() as census:
        done = engine.warm_up()  # by default the decode graphs of every width bucket (1, 2, 4, 8 blocks)
        warmed = census.snapshot()
        assert engine.counters["steps"] == 0 and done["steps"] > 0  # the warm-up's own steps are not counted
        steps = serve(engine, RAGGED_ARRIVALS, VOCAB)
        missed = census.new_since(warmed)
    assert steps > 20
    launched = {name for name, keys in warmed.items() if keys}
    assert {"append._append_kernel", "prefill._prefill_kernel", "decode_triton._decode_kernel"} <= launched
    assert missed == {}, missed


def test_the_census_sees_a_variant_a_new_constexpr_compiles(kernels_on_cpu):
    from trtllm_sawint4 import KVCacheSpec
    from trtllm_sawint4.kernels import append as kappend

    spec = KVCacheSpec(head_dim=32, num_kv_heads=2, tokens_per_block=T, kv_format="bf16")
    pool = torch.zeros(spec.pool_shape(4), dtype=torch.uint8)

    def launch(n, dtype=torch.float32):
        kv = torch.randn(n, 2, 32).to(dtype)
        kappend.append(pool, kv, kv, torch.arange(n), None, None, None, "bf16", "fp16")

    with VariantCensus() as census:
        launch(3)
        first = census.snapshot()
        launch(5)  # the same variant: N is not specialised
        assert census.new_since(first) == {}
        launch(3, torch.bfloat16)  # bf16 keys: a new pointer type, a new variant
        assert list(census.new_since(first)) == ["append._append_kernel"]
    assert "run" not in vars(kappend._append_kernel)  # closing the census restored the kernel
