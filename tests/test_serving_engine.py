"""The paged serving engine on tiny random-weight models: greedy outputs equal `model.generate()` with the
same cache format token for token (bf16: stock transformers), under ragged arrivals, chunked prefill,
preemption by a tiny pool and forks; seeded sampling reproducible; aborts free blocks; stop conditions; bad
requests raise RequestError and leave the engine serving."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tiny_models import KINDS, VOCAB, CharTokenizer, reference_greedy, tiny_model  # noqa: E402
from trtllm_sawint4.integrations.transformers import paged_cache_has_windows  # noqa: E402
from trtllm_sawint4.serving.api import RequestError, SamplingParams  # noqa: E402
from trtllm_sawint4.serving.engine import PagedEngine  # noqa: E402

T = 8  # tokens per block in these tests
N_OUT = 10


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts((3, 21, 9, 14, 1, 30))


def _engine(model, fmt="saw_int4", **kw):
    kw.setdefault("num_blocks", 40)
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_step_tokens", 16)
    return PagedEngine(model, kv_format=fmt, tokens_per_block=T, **kw)


def _run(engine, arrivals, params=None):
    """arrivals: (step, request_id, prompt) in any order; returns (tokens, finish reasons) per request id."""
    params = params or {}
    pending = sorted(arrivals, key=lambda a: a[0])
    out, reasons, step = {}, {}, 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt = pending.pop(0)
            engine.add_request(rid, prompt, params.get(rid, SamplingParams(max_tokens=N_OUT)))
            out[rid] = []
        for e in engine.step():
            out[e.request_id] += e.token_ids
            if e.finished:
                reasons[e.request_id] = e.finish_reason
        step += 1
        assert step < 5000
    return out, reasons


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_refs(llama):
    torch.set_num_threads(1)
    return {fmt: [reference_greedy(llama, p, N_OUT, fmt, T) for p in PROMPTS] for fmt in ("bf16", "saw_int4")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["bf16", "int4", "saw_int4"])
def test_greedy_equals_generate_ragged_arrivals(kind, fmt):
    model = tiny_model(kind)
    prompts = PROMPTS[:4]
    refs = [reference_greedy(model, p, N_OUT, fmt, T) for p in prompts]
    engine = _engine(model, fmt, max_batch=3, max_step_tokens=12)
    out, reasons = _run(engine, [(3 * i, f"r{i}", p) for i, p in enumerate(prompts)])
    assert [out[f"r{i}"] for i in range(len(prompts))] == refs
    assert set(reasons.values()) == {"length"}
    if fmt == "bf16":  # the bf16 format is stock transformers
        assert refs == [reference_greedy(model, p, N_OUT, None) for p in prompts]
    st_ = engine.stats()
    assert st_["free_blocks"] == st_["total_blocks"] and st_["num_running"] == st_["num_waiting"] == 0
    assert st_["prefill_tokens"] > 0 and st_["decode_tokens"] > 0


def test_bf16_logits_match_stock_transformers(llama):
    """Prefill logits through the engine's packed forward, bf16 format, against stock sdpa."""
    from trtllm_sawint4.serving.runner import Step, forward_step

    prompts = PROMPTS[:3]
    engine = _engine(llama, "bf16")
    cache = engine.cache
    seqs = [cache.add_sequence() for _ in prompts]
    plan = cache.plan(seqs, [len(p) for p in prompts])
    ids = torch.tensor(sum(prompts, []))
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.no_grad():
        got = forward_step(llama, ids, pos, Step(cache, plan, engine.geometry), torch.arange(len(ids)))
        llama.set_attn_implementation("sdpa")
        ref = torch.cat([llama(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)  # K/V rounded to bf16 in the cache
    assert bool((got.argmax(-1) == ref.argmax(-1)).all())


def test_preemption_by_a_tiny_pool(llama, llama_refs):
    # 7 blocks of 8 tokens: any one sequence (<= 40 tokens) fits, the six together do not
    engine = _engine(llama, "saw_int4", num_blocks=7, max_batch=6, max_step_tokens=24)
    out, reasons = _run(engine, [(0, f"r{i}", p) for i, p in enumerate(PROMPTS)])
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == llama_refs["saw_int4"]
    s = engine.stats()
    assert s["num_preemptions"] > 0
    assert s["free_blocks"] == s["total_blocks"] == 7
    assert set(reasons.values()) == {"length"}


def test_forks_share_a_prompt_prefix(llama):
    base = _prompts((27,), seed=5)[0]
    prompts = [base + tail for tail in ([4, 5], [6], [7, 8, 9], [])]  # the last one is the prefix itself
    refs = [reference_greedy(llama, p, N_OUT, "saw_int4", T) for p in prompts]
    engine = _engine(llama, "saw_int4", max_batch=4, max_step_tokens=64)
    out, _ = _run(engine, [(0, f"r{i}", p) for i, p in enumerate(prompts)])
    assert [out[f"r{i}"] for i in range(len(prompts))] == refs
    s = engine.stats()
    assert s["num_forks"] >= 2
    assert s["prefill_tokens"] < sum(len(p) for p in prompts) - 2 * 24  # shared blocks were not recomputed
    assert s["free_blocks"] == s["total_blocks"]


def test_fork_then_preemption(llama):
    base = _prompts((30,), seed=7)[0]
    prompts = [base + [1, 2], base + [3], base + [4, 5, 6]]
    refs = [reference_greedy(llama, p, N_OUT, "bf16", T) for p in prompts]
    engine = _engine(llama, "bf16", num_blocks=9, max_batch=3, max_step_tokens=40)
    out, _ = _run(engine, [(0, f"r{i}", p) for i, p in enumerate(prompts)])
    assert [out[f"r{i}"] for i in range(len(prompts))] == refs
    s = engine.stats()
    assert s["num_forks"] >= 1 and s["num_preemptions"] >= 1
    assert s["free_blocks"] == s["total_blocks"]


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_arrival_schedules(llama, llama_refs, data):
    picks = data.draw(st.lists(st.integers(0, len(PROMPTS) - 1), min_size=1, max_size=6), label="prompts")
    arrivals = [data.draw(st.integers(0, 8), label="arrival") for _ in picks]
    max_tokens = [data.draw(st.integers(1, N_OUT), label="max_tokens") for _ in picks]
    engine = _engine(llama, "saw_int4", num_blocks=data.draw(st.integers(6, 24), label="num_blocks"),
                     max_batch=data.draw(st.integers(1, 5), label="max_batch"),
                     max_step_tokens=data.draw(st.integers(4, 48), label="max_step_tokens"))
    ids = [f"r{i}" for i in range(len(picks))]
    params = {rid: SamplingParams(max_tokens=m) for rid, m in zip(ids, max_tokens)}
    out, reasons = _run(engine, [(a, rid, PROMPTS[p]) for a, rid, p in zip(arrivals, ids, picks)], params)
    for rid, p, m in zip(ids, picks, max_tokens):
        assert out[rid] == llama_refs["saw_int4"][p][:m], rid
        assert reasons[rid] == "length"
    s = engine.stats()
    assert s["free_blocks"] == s["total_blocks"]


def test_decode_graph_static_path_equals_eager(llama, llama_refs):
    """The padded static-buffer path that CUDA graphs capture, run eagerly: same tokens, trash block kept."""
    engine = _engine(llama, "saw_int4", decode_graphs="static", max_batch=5, graph_batch_sizes=(2, 4))
    out, _ = _run(engine, [(i, f"r{i}", p) for i, p in enumerate(PROMPTS)])
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == llama_refs["saw_int4"]
    s = engine.stats()
    assert s["graph_steps"] > 0
    assert s["free_blocks"] == s["total_blocks"] == 39  # one of the 40 blocks is the padded rows' trash block
    assert {b for b, _ in engine.graphs.buckets} <= {2, 4, 5}


# ---- sampling -----------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(llama):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    solo = _engine(llama).generate([PROMPTS[1]], p)[0]
    crowd = _engine(llama).generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                                    [SamplingParams(max_tokens=12, temperature=1.0, seed=7), p,
                                     SamplingParams(max_tokens=5)])
    assert crowd[1] == solo
    other = _engine(llama).generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                                                 top_k=20, seed=99))[0]
    assert other != solo
    # top_k == 1 is greedy whatever the temperature
    greedy = _engine(llama).generate([PROMPTS[1]], SamplingParams(max_tokens=12))[0]
    assert _engine(llama).generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=2.0, top_k=1,
                                                                seed=3))[0] == greedy


def test_filtered_logits_top_k_top_p():
    from trtllm_sawint4.serving.sampling import filtered_logits

    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    keep = lambda **kw: torch.isfinite(filtered_logits(logits, SamplingParams(temperature=1.0, **kw))).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.5) == [True, False, False, False, False]
    assert keep(top_p=0.6) == [True, True, False, False, False]
    assert keep(top_p=0.86) == [True, True, True, True, False]
    assert keep(top_p=1.0, top_k=0) == [True] * 5
    # temperature scales before the softmax
    x = filtered_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(x, logits / 0.5)


# ---- abort, stop conditions, errors -------------------------------------------------------------
def test_abort_frees_blocks_at_once(llama):
    engine = _engine(llama, max_step_tokens=64)
    for i, p in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50))
    engine.add_request("waiting", PROMPTS[3], SamplingParams(max_tokens=5))
    engine.scheduler.max_batch = 3  # keep the fourth one queued
    engine.step()
    engine.step()
    used = engine.stats()["total_blocks"] - engine.stats()["free_blocks"]
    assert used > 0
    engine.abort("r1")
    engine.abort("waiting")
    engine.abort("no-such-request")  # ignored
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"] - used + -(-(len(PROMPTS[1]) + 1) // T)
    events = engine.step()
    aborted = {e.request_id: e for e in events if e.finish_reason == "abort"}
    assert set(aborted) == {"r1", "waiting"} and all(e.finished and e.token_ids == [] for e in aborted.values())
    engine.abort("r0")
    engine.abort("r2")
    engine.step()
    assert not engine.has_unfinished()
    s = engine.stats()
    assert s["free_blocks"] == s["total_blocks"] and s["num_running"] == 0
    engine.add_request("r1", PROMPTS[1], SamplingParams(max_tokens=2))  # an id can be reused once finished
    assert len(engine.generate([PROMPTS[0]], SamplingParams(max_tokens=3))[0]) == 3


def test_stop_tokens_strings_and_eos(llama):
    tok = CharTokenizer(eos_token_id=None)
    greedy = _engine(llama, tokenizer=tok).generate([PROMPTS[1]], SamplingParams(max_tokens=N_OUT))[0]
    text = tok.decode(greedy)
    # a stop token ends the request; it is in the tokens, not in the text
    stop_tok = greedy[4]
    engine = _engine(llama, tokenizer=tok)
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=N_OUT, stop_token_ids=(stop_tok,)))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    first = greedy.index(stop_tok)
    assert sum((e.token_ids for e in events), []) == greedy[:first + 1]
    assert "".join(e.text for e in events) == tok.decode(greedy[:first])
    assert events[-1].finish_reason == "stop"
    # the model's EOS (unless ignore_eos)
    eos_engine = _engine(llama, tokenizer=tok, eos_token_ids=(stop_tok,))
    assert eos_engine.generate([PROMPTS[1]], SamplingParams(max_tokens=N_OUT))[0] == greedy[:first + 1]
    assert eos_engine.generate([PROMPTS[1]], SamplingParams(max_tokens=N_OUT, ignore_eos=True))[0] == greedy
    # a stop string spanning tokens: the text ends before it, nothing after it is streamed
    stop = text[5:8]
    engine = _engine(llama, tokenizer=tok)
    engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=N_OUT, stop=("zzzz", stop)))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    streamed = "".join(e.text for e in events)
    assert streamed == text[:text.index(stop)]
    assert events[-1].finish_reason == "stop" and events[-1].finished
    assert engine.stats()["free_blocks"] == engine.stats()["total_blocks"]


def test_bad_requests_raise_and_the_engine_keeps_serving(llama):
    engine = _engine(llama, num_blocks=4)  # max_seq_len = 32 tokens
    engine.add_request("ok", PROMPTS[0], SamplingParams(max_tokens=3))
    bad = [
        ("", PROMPTS[0], SamplingParams(), "request_id"),
        ("ok", PROMPTS[0], SamplingParams(), "already in flight"),
        ("x", [], SamplingParams(), "prompt"),
        ("x", [VOCAB + 5], SamplingParams(), "prompt"),
        ("x", [1.5], SamplingParams(), "prompt"),
        ("x", list(range(32)), SamplingParams(), "prompt: 32 tokens"),
        ("x", "some text", SamplingParams(), "tokenizer"),
        ("x", PROMPTS[0], SamplingParams(max_tokens=0), "max_tokens"),
        ("x", PROMPTS[0], SamplingParams(top_p=0.0), "top_p"),
        ("x", PROMPTS[0], SamplingParams(temperature=-1.0), "temperature"),
        ("x", PROMPTS[0], SamplingParams(top_k=-2), "top_k"),
        ("x", PROMPTS[0], SamplingParams(seed=-1), "seed"),
        ("x", PROMPTS[0], SamplingParams(stop=("",)), "stop"),
        ("x", PROMPTS[0], SamplingParams(stop=("a",)), "stop"),
        ("x", PROMPTS[0], SamplingParams(stop_token_ids=[1]), "stop_token_ids"),
        ("x", PROMPTS[0], {"max_tokens": 3}, "SamplingParams"),
    ]
    before = engine.stats()
    for rid, prompt, params, word in bad:
        with pytest.raises(RequestError, match=word):
            engine.add_request(rid, prompt, params)
    assert engine.stats() == before
    out = {}
    while engine.has_unfinished():
        for e in engine.step():
            out.setdefault(e.request_id, []).extend(e.token_ids)
    assert len(out["ok"]) == 3
    # a prompt of max_seq_len - 1 tokens is served, and ends with "length" at max_seq_len
    engine.add_request("long", list(range(31)), SamplingParams(max_tokens=10))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert events[-1].finish_reason == "length" and sum(len(e.token_ids) for e in events) == 1


def test_text_prompts_and_streamed_text(llama):
    tok = CharTokenizer()
    engine = _engine(llama, tokenizer=tok)
    engine.add_request("t", "hello world", SamplingParams(max_tokens=6))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    tokens = sum((e.token_ids for e in events), [])
    assert len(tokens) == 6 and "".join(e.text for e in events) == tok.decode(tokens)
    assert all(len(e.token_ids) == 1 for e in events)  # one event per token: streaming


def test_reserve_output_admits_without_preemption(llama, llama_refs):
    engine = _engine(llama, "saw_int4", num_blocks=7, max_batch=6, max_step_tokens=24, reserve_output=True)
    out, _ = _run(engine, [(0, f"r{i}", p) for i, p in enumerate(PROMPTS)])
    assert [out[f"r{i}"] for i in range(len(PROMPTS))] == llama_refs["saw_int4"]
    s = engine.stats()
    assert s["num_preemptions"] == 0 and s["free_blocks"] == s["total_blocks"]


@pytest.mark.skipif(not paged_cache_has_windows(), reason="this PagedKVCache has no per-layer windows")
@pytest.mark.parametrize("kind", ["gemma3", "mistral"])
@pytest.mark.parametrize("fmt", ["bf16", "saw_int4"])
def test_sliding_window_models(kind, fmt):
    """Windows of 12 positions, sequences of up to 40: the engine equals generate() (bf16: stock)."""
    model = tiny_model(kind, sliding_window=12)
    prompts = [PROMPTS[1], PROMPTS[5], PROMPTS[2]]
    refs = [reference_greedy(model, p, N_OUT, fmt, T) for p in prompts]
    if fmt == "bf16":
        assert refs == [reference_greedy(model, p, N_OUT, None) for p in prompts]
    engine = _engine(model, fmt, max_batch=3, max_step_tokens=16)
    assert engine.cache.windows is not None and 12 in list(engine.cache.windows)
    out, _ = _run(engine, [(2 * i, f"r{i}", p) for i, p in enumerate(prompts)])
    assert [out[f"r{i}"] for i in range(len(prompts))] == refs
