"""The serving engine on a GPU: Triton kernels, CUDA-graph decode steps, preemption and forks, against
`model.generate()` through SawInt4Cache on the same device; and a throughput sanity check of the graphs.

Token checks use float32 tiny models against generate() through the same kernels; the engine runs them at
other batch shapes (a sequence's tokens go through the prefill kernel in one and the decode kernel in the
other, with bf16 dots), so a sequence may leave generate()'s path at a near-tie of its logits and only there
(tiny_models.assert_agree_with_greedy). The production shapes (bf16 model,
head_dim 128, 64-token blocks: the Gluon INT4 decode kernel) are checked on logits of a captured step against
the same step run eagerly, and on the first generated tokens."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("transformers")

from serving_workloads import RAGGED_ARRIVALS, serve  # noqa: E402
from tiny_models import (VOCAB, assert_agree_with_greedy, reference_greedy, scored_reference_greedy,  # noqa: E402
                         tiny_model)
from trtllm_sawint4.serving.api import SamplingParams  # noqa: E402
from trtllm_sawint4.serving.engine import PagedEngine  # noqa: E402

T = 8


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts((3, 21, 9, 14, 1, 30, 17))


def _run(engine, prompts, max_tokens=10, stagger=2):
    """Requests arrive every `stagger` steps; returns their generated tokens."""
    out, step, i = {}, 0, 0
    while i < len(prompts) or engine.has_unfinished():
        if i < len(prompts) and step % stagger == 0:
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens))
            out[f"r{i}"] = []
            i += 1
        for e in engine.step():
            assert e.finish_reason in (None, "length"), e
            out[e.request_id] += e.token_ids
        step += 1
    return [out[f"r{k}"] for k in range(len(prompts))]


@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3", "gemma3-window12"])
def model(request):
    from trtllm_sawint4.integrations.transformers import paged_cache_has_windows

    kind, _, window = request.param.partition("-window")
    if window and not paged_cache_has_windows():
        pytest.skip("this PagedKVCache has no per-layer windows")
    return tiny_model(kind, **({"sliding_window": int(window)} if window else {})).cuda()


@pytest.mark.parametrize("fmt", ["bf16", "int4", "saw_int4"])
def test_greedy_equals_generate_with_cuda_graphs(model, fmt):
    refs = [scored_reference_greedy(model, p, 10, fmt, T) for p in PROMPTS]
    engine = PagedEngine(model, kv_format=fmt, tokens_per_block=T, num_blocks=64, max_batch=6, max_step_tokens=24,
                         decode_graphs="on")
    assert_agree_with_greedy(_run(engine, PROMPTS), refs)
    s = engine.stats()
    assert s["cuda_graphs"] and s["graph_steps"] > 0 and engine.graphs.num_captures > 0
    assert s["free_blocks"] == s["total_blocks"]
    eager = PagedEngine(model, kv_format=fmt, tokens_per_block=T, num_blocks=64, max_batch=6, max_step_tokens=24,
                        decode_graphs="off")
    assert_agree_with_greedy(_run(eager, PROMPTS), refs)
    if fmt == "bf16":
        stock = [scored_reference_greedy(model, p, 10, None) for p in PROMPTS]
        assert_agree_with_greedy([r.tokens for r in refs], stock)


def test_preemption_and_forks_on_cuda(model):
    base = _prompts((26,), seed=4)[0]
    prompts = PROMPTS[:4] + [base + [1], base + [2, 3], base]
    refs = [scored_reference_greedy(model, p, 10, "saw_int4", T) for p in prompts]
    engine = PagedEngine(model, kv_format="saw_int4", tokens_per_block=T, num_blocks=8, max_batch=7,
                         max_step_tokens=40, decode_graphs="on")
    assert_agree_with_greedy(_run(engine, prompts, stagger=1), refs)
    s = engine.stats()
    assert s["num_preemptions"] > 0 and s["num_forks"] > 0
    assert s["free_blocks"] == s["total_blocks"] == 7  # one block holds the graph steps' padding slots


@pytest.fixture(scope="module")
def llama_hd128():
    """bf16 weights, head_dim 128: the INT4 decode runs the Gluon kernel at 64-token blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8.0)
    m.generation_config.eos_token_id = None
    return m.to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.parametrize("fmt", ["bf16", "int4", "saw_int4"])
def test_captured_step_equals_eager_step_production_shapes(llama_hd128, fmt):
    from trtllm_sawint4.serving.runner import Step, forward_step

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (700, 64, 1500, 5, 333)]
    engine = PagedEngine(llama_hd128, kv_format=fmt, tokens_per_block=64, num_blocks=256, max_batch=8,
                         max_step_tokens=4096, decode_graphs="on")
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=40))
    firsts, compared = {}, False
    while engine.has_unfinished():
        running = engine.scheduler.running
        if running and all(s.remaining == 1 for s in running) and len(running) == len(prompts) \
                and running[0].extra.num_generated == 20:
            # one decode step both ways, on the same (graph) plan: append writes the same values to the same slots
            seqs = list(running)
            ids = [s.tokens[-1] for s in seqs]
            pos = [len(s.tokens) - 1 for s in seqs]
            with torch.inference_mode():
                graph = engine.graphs.run([s.seq_id for s in seqs], ids, pos).clone()
                plan = engine.graphs.last_plan
                pad = plan.num_rows - len(ids)
                eager = forward_step(llama_hd128, torch.tensor(ids + [0] * pad, device="cuda"),
                                     torch.tensor(pos + [0] * pad, device="cuda"),
                                     Step(engine.cache, plan, engine.geometry),
                                     torch.arange(plan.num_rows, device="cuda"))[:len(ids)]
            torch.testing.assert_close(graph, eager, atol=0.15, rtol=0.02)
            assert (graph.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.8
            compared = True
            break  # the step above reserved slots the engine did not schedule: stop here
        for e in engine.step():
            firsts.setdefault(e.request_id, e.token_ids[0])
    assert compared and engine.stats()["graph_steps"] > 0
    refs = [reference_greedy(llama_hd128, p, 1, fmt, 64)[0] for p in prompts]
    assert sum(firsts[f"r{i}"] == r for i, r in enumerate(refs)) >= len(prompts) - 1


def test_graph_decode_is_faster_than_eager():
    """Throughput sanity: a SmolLM2-135M-shaped random model (30 layers), batch 32, saw_int4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    rates = {}
    for mode in ("off", "on"):
        engine = PagedEngine(model, kv_format="saw_int4", num_blocks=32 * 8 + 1, max_batch=32, decode_graphs=mode)
        prompts = torch.randint(0, 49152, (32, 256), generator=torch.Generator().manual_seed(0)).tolist()
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_tokens=96, ignore_eos=True))
        for _ in range(20):  # prefill and warm-up (compiles, captures)
            engine.step()
        torch.cuda.synchronize()
        t, n = time.perf_counter(), 0
        for _ in range(64):
            n += sum(len(e.token_ids) for e in engine.step())
        torch.cuda.synchronize()
        rates[mode] = n / (time.perf_counter() - t)
    print(f"decode at batch 32: eager {rates['off']:.0f} tok/s, CUDA graphs {rates['on']:.0f} tok/s "
          f"({rates['on'] / rates['off']:.2f}x)")
    assert rates["on"] > rates["off"]


@pytest.mark.parametrize("fmt", ["bf16", "saw_int4"])
def test_no_kernel_compiles_after_the_warm_up_on_cuda(fmt):
    """Triton's own compile caches: after warm_up(), a ragged workload (one sequence alone, a step of 17,
    chunked prefill, mixed steps, every block-table width, CUDA-graph decode) compiles no kernel variant."""
    from trtllm_sawint4.kernels.variants import VariantCensus

    model = tiny_model("llama").cuda()
    engine = PagedEngine(model, kv_format=fmt, tokens_per_block=T, num_blocks=80, max_batch=18, max_step_tokens=40,
                         max_seq_len=64, decode_graphs="on", graph_batch_sizes=(1, 4, 16), prefix_sharing=False)
    with VariantCensus() as census:
        engine.warm_up()
        warmed = census.snapshot()
        serve(engine, RAGGED_ARRIVALS, VOCAB)
        missed = census.new_since(warmed)
    assert sum(map(len, warmed.values())) > 0  # the census read the compile caches
    assert missed == {}, missed
