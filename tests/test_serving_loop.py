"""EngineLoop: many client threads over one engine thread; streaming, cancellation, shutdown."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import VOCAB, tiny_model  # noqa: E402
from trtllm_sawint4.serving import EngineLoop, RequestError, SamplingParams  # noqa: E402
from trtllm_sawint4.serving.api import Engine, TokenEvent  # noqa: E402
from trtllm_sawint4.serving.engine import PagedEngine  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture
def loop(model, one_torch_thread):
    engine = PagedEngine(model, kv_format="saw_int4", tokens_per_block=8, num_blocks=24, max_batch=4,
                         max_step_tokens=32)
    lp = EngineLoop(engine)
    yield lp
    lp.shutdown()
    assert not lp.running


def _prompt(n, seed):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_engine_satisfies_the_protocol(model):
    assert isinstance(PagedEngine(model, num_blocks=4, tokens_per_block=8), Engine)


def test_concurrent_clients_get_offline_outputs(loop, model):
    prompts = [_prompt(5 + 3 * i, i) for i in range(6)]
    offline = PagedEngine(model, kv_format="saw_int4", tokens_per_block=8, num_blocks=24).generate(
        prompts, SamplingParams(max_tokens=8))
    results: dict[int, list[int]] = {}

    def client(i):
        toks = []
        for event in loop.submit(f"c{i}", prompts[i], SamplingParams(max_tokens=8)):
            toks += event.token_ids
            last = event
        assert last.finished and last.finish_reason == "length"
        results[i] = toks

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[i] for i in range(6)] == offline
    s = loop.stats()
    assert s["free_blocks"] == s["total_blocks"] and s["in_flight"] == 0


def test_bad_request_raises_in_the_caller(loop):
    with pytest.raises(RequestError, match="max_tokens"):
        loop.submit("bad", [1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(RequestError, match="prompt"):
        loop.submit("bad", [], SamplingParams())
    events = list(loop.submit("good", [1, 2, 3], SamplingParams(max_tokens=2)))
    assert sum(len(e.token_ids) for e in events) == 2


def test_cancel_and_closing_the_stream_free_blocks(model, one_torch_thread):
    # a pool of 4096 tokens: 3000-token requests run for seconds, long after the cancels below
    loop = EngineLoop(PagedEngine(model, kv_format="saw_int4", tokens_per_block=8, num_blocks=512, max_batch=4))
    stream = loop.submit("long", _prompt(20, 1), SamplingParams(max_tokens=3000))
    first = next(stream)
    assert first.token_ids and not first.finished
    loop.cancel("long")
    rest = list(stream)
    assert rest[-1].finish_reason == "abort"
    # a client that stops reading: closing its iterator cancels the request
    stream = loop.submit("gone", _prompt(20, 2), SamplingParams(max_tokens=3000))
    next(stream)
    stream.close()
    for _ in range(200):
        s = loop.stats()
        if s["in_flight"] == 0 and s["num_running"] == 0:
            break
        threading.Event().wait(0.01)
    assert s["free_blocks"] == s["total_blocks"] and s["in_flight"] == 0
    loop.cancel("no-such-request")
    loop.shutdown()


def test_shutdown_aborts_in_flight_requests(model, one_torch_thread):
    engine = PagedEngine(model, tokens_per_block=8, num_blocks=512)
    lp = EngineLoop(engine)
    stream = lp.submit("a", _prompt(10, 3), SamplingParams(max_tokens=3000))  # seconds: shutdown comes first
    next(stream)
    lp.shutdown(abort=True, timeout=10)
    assert not lp.running
    assert list(stream)[-1].finish_reason == "abort"
    with pytest.raises(RuntimeError, match="shut down"):
        lp.submit("b", [1], SamplingParams())
    s = engine.stats()
    assert s["free_blocks"] == s["total_blocks"]


def test_shutdown_without_abort_finishes_requests(model, one_torch_thread):
    lp = EngineLoop(PagedEngine(model, tokens_per_block=8, num_blocks=24))
    stream = lp.submit("a", _prompt(10, 4), SamplingParams(max_tokens=5))
    lp.shutdown(abort=False, timeout=30)
    events = list(stream)
    assert events[-1].finish_reason == "length" and sum(len(e.token_ids) for e in events) == 5


class _FailingEngine:
    """An engine whose step raises: the loop turns that into error events and keeps running."""

    def __init__(self):
        self.ids, self.fail = [], True

    def add_request(self, request_id, prompt, params):
        self.ids.append(request_id)

    def abort(self, request_id):
        self.ids.remove(request_id)

    def step(self):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        out = [TokenEvent(r, [7], "", finished=True, finish_reason="length") for r in self.ids]
        self.ids = []
        return out

    def has_unfinished(self):
        return bool(self.ids)

    def stats(self):
        return dict(num_running=len(self.ids), num_waiting=0, free_blocks=1, total_blocks=1)


def test_engine_failure_becomes_error_events():
    lp = EngineLoop(_FailingEngine())
    events = list(lp.submit("x", [1], SamplingParams()))
    assert events[-1].finish_reason == "error" and "device lost" in events[-1].error
    assert [e.token_ids for e in lp.submit("y", [1], SamplingParams())] == [[7]]
    lp.shutdown()
    assert lp.stats()["loop_step_errors"] == 1
