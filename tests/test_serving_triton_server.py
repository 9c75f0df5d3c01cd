"""`sawint4 serve` end to end: a real tritonserver (the nvidia-pytriton wheel's) serving the packaged
SmolLM2 with saw_int4 on 127.0.0.1, driven by HTTP (generate, generate_stream) and gRPC streaming clients.

- concurrent streaming clients get exactly the tokens and text of offline greedy generation through the
  same engine (each prompt run alone in this process);
- bad requests get an error naming the input, and the server keeps serving with every block free;
- a client that disconnects or cancels mid-stream frees its blocks (seen on the metrics endpoint);
- SIGTERM aborts the stream in flight and exits 0 within seconds, and the pool's last stats (written by
  the model as it unloads) have every block free;
- startup failures exit non-zero with the reason instead of hanging.

Select with `-m triton_server`; skipped (with the reason) where tritonserver is not installed.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trtllm_sawint4.serving import launcher

pytestmark = [pytest.mark.triton_server, pytest.mark.slow]

try:
    launcher.find_triton()
    _SKIP = None
except launcher.ServeError as e:
    _SKIP = str(e)
if _SKIP is None and int(np.__version__.split(".")[0]) >= 2:
    _SKIP = "numpy>=2 here: the bundled Triton Python backend needs numpy<2 (install the [serve] extra)"
if _SKIP is None:
    from trtllm_sawint4.eval.data import EvalError, smollm2_folder

    try:
        smollm2_folder()
        import gguf  # noqa: F401
        import tritonclient.grpc  # noqa: F401
    except (EvalError, ImportError) as e:
        _SKIP = f"the served model or a client is missing: {e}"
if _SKIP and os.environ.get("SAWINT4_REQUIRE_TRITON_SERVER") == "1":  # CI's server step: a skip hides a broken install
    raise RuntimeError(f"SAWINT4_REQUIRE_TRITON_SERVER=1 but: {_SKIP}")
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))

REPO = Path(__file__).resolve().parents[1]
NUM_BLOCKS, MAX_BATCH, MAX_TOKENS = 32, 4, 12
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are"]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Serve:
    """`sawint4 serve` as a user runs it, in its own process."""

    def __init__(self, work: Path, *extra: str):
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.work, self.stats_file, self.log = work, work / "stats.json", work / "serve.log"
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "trtllm_sawint4.cli", "serve", "--http-port", str(self.http),
               "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--work-dir", str(work / "w"),
               "--stats-file", str(self.stats_file), *extra]
        self.t0 = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600.0) -> None:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"sawint4 serve exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            if "sawint4 serve: ready" in self.output():
                return
            time.sleep(0.3)
        self.proc.kill()
        pytest.fail(f"not ready after {timeout}s:\n{self.output()[-4000:]}")

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"sawint4 serve still running {timeout}s later:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # ---- clients -------------------------------------------------------------------------------
    def post(self, endpoint: str, body: dict, timeout: float = 120.0) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", self.http, timeout=timeout)
        try:
            c.request("POST", f"/v2/models/sawint4/{endpoint}", body=json.dumps(body), headers={"Connection": "close"})
            return json.loads(c.getresponse().read())
        finally:
            c.close()

    def sse(self, body: dict, stop_after: int | None = None, on_event=None, timeout: float = 120.0) -> list[dict]:
        """generate_stream: the events (the connection is closed after `stop_after` of them)."""
        c = http.client.HTTPConnection("127.0.0.1", self.http, timeout=timeout)
        events = []
        try:
            c.request("POST", "/v2/models/sawint4/generate_stream", body=json.dumps(body),
                      headers={"Connection": "close"})
            response = c.getresponse()
            if not response.getheader("Content-Type", "").startswith("text/event-stream"):
                return [json.loads(response.read())]  # Triton refused the request before the model saw it
            for line in response:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
                    if on_event:
                        on_event(events[-1])
                    if stop_after is not None and len(events) >= stop_after:
                        break
        finally:
            c.close()
        return events

    def metrics_values(self) -> dict:
        c = http.client.HTTPConnection("127.0.0.1", self.metrics, timeout=10)
        try:
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
        finally:
            c.close()
        return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("sawint4_")}

    def wait_pool_idle(self, timeout: float = 15.0) -> dict:
        """The pool gauges once nothing is in flight and every block is free (fails after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics_values()
            if (m["sawint4_requests_in_flight"] == 0 and m["sawint4_requests_running"] == 0
                    and m["sawint4_kv_blocks_free"] == m["sawint4_kv_blocks_total"]):
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"the pool is not idle {timeout}s later: {m}")
            time.sleep(0.1)


def _ids(event: dict) -> list[int]:
    ids = event.get("output_ids", [])
    return ids if isinstance(ids, list) else [ids]


class GrpcStream:
    """tritonclient's gRPC bidirectional stream (how TensorRT-LLM's clients stream)."""

    def __init__(self, port: int):
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, request_id: str, **values) -> None:
        g, inputs = self.grpcclient, []
        for name, value in values.items():
            if isinstance(value, str):
                arr, dtype = np.array([[value.encode()]], dtype=np.object_), "BYTES"
            elif isinstance(value, (bool, np.bool_)):
                arr, dtype = np.array([[value]], dtype=np.bool_), "BOOL"
            elif isinstance(value, (float, np.floating)):
                arr, dtype = np.array([[value]], dtype=np.float32), "FP32"
            else:
                arr, dtype = np.array([[value]], dtype=np.int32), "INT32"
            inp = g.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        self.client.async_stream_infer("sawint4", inputs, request_id=request_id, enable_empty_final_response=True)

    def receive(self, timeout: float = 120.0):
        """(ids, text, finish_reason, final) of the next response; raises the server's error."""
        result, error = self.results.get(timeout=timeout)
        if error is not None:
            raise RuntimeError(str(error))
        final = result.get_response().parameters["triton_final_response"].bool_param
        text = result.as_numpy("text_output")
        if text is None:  # the empty final response
            return [], "", None, final
        return (result.as_numpy("output_ids").reshape(-1).tolist(), text.reshape(-1)[0].decode(),
                result.as_numpy("finish_reason").reshape(-1)[0].decode(), final)

    def collect(self, request_id: str, timeout: float = 120.0, **values):
        self.send(request_id, **values)
        ids, text, reason, times = [], [], None, []
        while True:
            i, t, r, final = self.receive(timeout)
            times.append(time.monotonic())
            ids += i
            text.append(t)
            reason = r or reason
            if final:
                return ids, "".join(text), reason, times

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


# ---- fixtures ------------------------------------------------------------------------------------
class _Offline(dict):
    """prompt -> (generated ids, text, finish reason); .prompt_ids: prompt -> its token ids."""

    prompt_ids: dict

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve"), "--kv-format", "saw_int4", "--num-blocks", str(NUM_BLOCKS),
              "--max-batch", str(MAX_BATCH))
    yield s
    s.kill()


@pytest.fixture(scope="module")
def offline(server):
    """Greedy generation through the same engine in this process, each prompt alone: (ids, text, reason)."""
    from trtllm_sawint4.serving import SamplingParams, build_engine

    engine = build_engine(kv_format="saw_int4", num_blocks=NUM_BLOCKS, max_batch=MAX_BATCH)
    out = _Offline()
    out.prompt_ids = {p: list(engine.tokenizer(p)["input_ids"]) for p in PROMPTS}
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"offline{i}", prompt, SamplingParams(max_tokens=MAX_TOKENS))
        ids, text, reason = [], [], None
        while engine.has_unfinished():
            for e in engine.step():
                ids += e.token_ids
                text.append(e.text)
                reason = e.finish_reason or reason
        out[prompt] = (ids, "".join(text), reason)
    server.wait_ready()
    return out


# ---- generation ----------------------------------------------------------------------------------
def test_concurrent_streams_equal_offline_generation(server, offline):
    results, errors = {}, []

    def sse_client(prompt):
        times = []
        events = server.sse({"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True},
                            on_event=lambda e: times.append(time.monotonic()))
        if any("error" in e for e in events):
            errors.append(events)
        results[prompt] = ([i for e in events for i in _ids(e)], "".join(e.get("text_output", "") for e in events),
                           events[-1].get("finish_reason"), times, len(events))

    def grpc_client(prompt):
        stream = GrpcStream(server.grpc)
        try:
            ids, text, reason, times = stream.collect(f"g-{prompt}", text_input=prompt, max_tokens=MAX_TOKENS,
                                                      stream=True)
            results[prompt] = (ids, text, reason, times, len(times))
        finally:
            stream.close()

    threads = [threading.Thread(target=sse_client if i % 2 == 0 else grpc_client, args=(p,))
               for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for prompt in PROMPTS:
        ids, text, reason, times, n_responses = results[prompt]
        assert (ids, text, reason) == offline[prompt], prompt
        assert n_responses >= len(ids), "streamed one response per token"
    # They were served at the same time: every stream had started before any had ended.
    firsts = [results[p][3][0] for p in PROMPTS]
    lasts = [results[p][3][-1] for p in PROMPTS]
    assert max(firsts) < min(lasts)
    server.wait_pool_idle()


def test_generate_returns_the_whole_text_in_one_response(server, offline):
    prompt = PROMPTS[0]
    r = server.post("generate", {"text_input": prompt, "max_tokens": MAX_TOKENS})
    assert (_ids(r), r["text_output"], r["finish_reason"]) == offline[prompt]
    assert r["num_output_tokens"] == len(offline[prompt][0])
    r = server.post("generate", {"text_input": prompt, "max_tokens": MAX_TOKENS, "exclude_input_in_output": False})
    assert r["text_output"] == prompt + offline[prompt][1]
    # The prompt as token ids (input_ids, for a model without a tokenizer) gives the same tokens.
    r = server.post("generate", {"input_ids": offline.prompt_ids[prompt], "max_tokens": MAX_TOKENS})
    assert (_ids(r), r["text_output"]) == offline[prompt][:2]
    # generate_stream without "stream": true is one event with everything (TensorRT-LLM's default).
    events = server.sse({"text_input": prompt, "max_tokens": MAX_TOKENS})
    assert len(events) == 1 and events[0]["text_output"] == offline[prompt][1]


def test_stop_words_and_sampling_inputs(server, offline):
    prompt = PROMPTS[0]
    ids, text, _ = offline[prompt]
    cut = text[len(text) // 2:][:3]  # a stop string from the middle of the greedy text
    r = server.post("generate", {"text_input": prompt, "max_tokens": MAX_TOKENS, "stop_words": [cut]})
    assert r["finish_reason"] == "stop" and r["text_output"] == text[:text.index(cut)]
    sampled = [server.post("generate", {"text_input": prompt, "max_tokens": 8, "temperature": 1.0, "top_k": 50,
                                        "top_p": 0.9, "seed": 7, "ignore_eos": True}) for _ in range(2)]
    assert _ids(sampled[0]) == _ids(sampled[1]) and len(_ids(sampled[0])) == 8  # same seed, same tokens


# ---- bad requests ----------------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"max_tokens": 4}, "text_input"),
    ({"text_input": "hi"}, "max_tokens"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be an int >= 1"),
    # A JSON value of the wrong type is refused by Triton's HTTP frontend itself, in its own words.
    ({"text_input": "hi", "max_tokens": "four"}, "Unable to parse 'data'"),
    ({"text_input": "hi", "max_tokens": 4, "temprature": 0.5}, "unknown parameter(s) temprature"),
    ({"text_input": "hi", "max_tokens": 4, "top_p": 1.5}, "top_p must be"),
    ({"text_input": "hi", "max_tokens": 4, "beam_width": 2}, "beam_width=2 is not supported"),
    ({"text_input": "", "max_tokens": 4}, "text_input must not be empty"),
    ({"text_input": "hello " * 2100, "max_tokens": 4}, "prompt: "),  # longer than the pool can ever hold
]


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_bad_requests_get_an_error_and_the_server_keeps_serving(server, offline, endpoint):
    for body, message in BAD_REQUESTS:
        if endpoint == "generate":
            reply = server.post("generate", body)
        else:
            events = server.sse({**body, "stream": True})
            assert len(events) == 1, events
            reply = events[0]
        assert message in reply.get("error", ""), (body if len(str(body)) < 200 else message, reply)
    r = server.post("generate", {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS})
    assert _ids(r) == offline[PROMPTS[1]][0]
    server.wait_pool_idle()


def test_bad_requests_over_grpc(server, offline):
    stream = GrpcStream(server.grpc)
    try:
        stream.send("bad1", text_input="hi", max_tokens=0)
        with pytest.raises(RuntimeError, match="max_tokens must be an int >= 1"):
            stream.receive()
        stream.send("bad2", text_input="hi", max_tokens=np.float32(4.0))  # FP32 where INT32 is declared
        with pytest.raises(RuntimeError, match="max_tokens"):
            stream.receive()
        ids, text, reason, _ = stream.collect("good", text_input=PROMPTS[2], max_tokens=MAX_TOKENS, stream=True)
        assert (ids, text, reason) == offline[PROMPTS[2]]
    finally:
        stream.close()
    server.wait_pool_idle()


# ---- cancellation ----------------------------------------------------------------------------------
LONG = {"text_input": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}


def _assert_holds_blocks(server, timeout: float = 10.0):
    """The gauges (refreshed every 0.2 s, each refresh waiting for an engine step) show a request holding blocks."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics_values()
        if m["sawint4_requests_in_flight"] >= 1 and m["sawint4_kv_blocks_free"] < m["sawint4_kv_blocks_total"]:
            return
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_sse_client_that_disconnects_frees_its_blocks(server, offline):
    seen = []

    def on_event(e):
        if len(seen) == 2:
            _assert_holds_blocks(server)  # while the stream runs (the server keeps generating meanwhile)
        seen.append(e)

    events = server.sse(LONG, stop_after=4, on_event=on_event)
    assert len(events) == 4 and all(e["finish_reason"] == "" for e in events)
    # 1500 tokens would take minutes on this CPU; the blocks come back within seconds of the disconnect.
    server.wait_pool_idle(timeout=15)


def test_grpc_cancellation_frees_its_blocks(server, offline):
    stream = GrpcStream(server.grpc)
    try:
        stream.send("long", **LONG)
        for _ in range(3):
            assert not stream.receive()[3]
        _assert_holds_blocks(server)
    finally:
        stream.close(cancel=True)
    server.wait_pool_idle(timeout=15)


# ---- shutdown (last: it stops the module's server) -------------------------------------------------
def test_sigterm_aborts_in_flight_requests_and_exits_0_with_every_block_free(server, offline):
    events, started = [], threading.Event()

    def client():
        server.sse(LONG, on_event=lambda e: (events.append(e), len(events) >= 2 and started.set()))

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(120)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.wait_exit(timeout=60)
    took = time.monotonic() - t0
    t.join(30)
    log = server.output()
    assert rc == 0, log[-3000:]
    assert took < 30, f"{took:.1f}s to stop:\n{log[-3000:]}"
    assert events[-1]["finish_reason"] == "abort" and len(events) < 1500
    stats = json.loads(server.stats_file.read_text())
    assert stats["free_blocks"] == stats["total_blocks"] == NUM_BLOCKS, stats
    assert stats["num_running"] == stats["num_waiting"] == stats["in_flight"] == stats["requests_unanswered"] == 0
    assert stats["loop_step_errors"] == 0 and stats["errors"] == 0
    assert not list(Path("/dev/shm").glob(f"sawint4_{server.proc.pid}_*")), "shared memory left behind"


# ---- startup failures --------------------------------------------------------------------------------
def test_a_model_that_cannot_load_exits_1_with_the_reason(tmp_path):
    s = Serve(tmp_path, "--engine", "no_such_module_for_sawint4:build")
    rc = s.wait_exit(timeout=180)
    assert rc == 1 and "No module named 'no_such_module_for_sawint4'" in s.output(), s.output()[-3000:]


def test_a_server_not_ready_in_time_is_stopped_with_exit_1(tmp_path):
    s = Serve(tmp_path, "--startup-timeout", "1")
    rc = s.wait_exit(timeout=120)
    assert rc == 1 and "not ready after 1s" in s.output(), s.output()[-3000:]


# ---- the server's own error handling, with a test double of the engine ------------------------------------
@pytest.fixture(scope="module")
def failing_server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("failing"), "--engine", str(REPO / "tests" / "triton_engine_doubles.py")
              + ":make_failing_engine")
    s.wait_ready(timeout=300)
    yield s
    s.kill()


def test_an_engine_failure_mid_stream_reaches_the_client(failing_server):
    events = failing_server.sse({"text_input": "one two FAIL_IN_STEP", "max_tokens": 10, "stream": True})
    assert [e.get("text_output") for e in events[:2]] == ["one ", "two "]
    assert "generation failed: RuntimeError: scripted engine failure" in events[-1]["error"]
    reply = failing_server.post("generate", {"text_input": "FAIL_IN_STEP x", "max_tokens": 10})
    assert "scripted engine failure" in reply["error"]
    reply = failing_server.post("generate", {"text_input": "FAIL_IN_ADD", "max_tokens": 10})
    assert "internal error: KeyError" in reply["error"]
    reply = failing_server.post("generate", {"text_input": "still serving", "max_tokens": 3})
    assert reply["text_output"] == "still serving still " and reply["finish_reason"] == "length"
    failing_server.wait_pool_idle()


def test_the_watcher_sees_cancellations_after_many_finished_requests(failing_server):
    # Each finished request must drop out of the watcher's cancellation checks (it reads the response
    # factory, which Triton frees with the final response); then a disconnect is still seen.
    for i in range(20):
        assert failing_server.post("generate", {"text_input": f"r{i} a", "max_tokens": 2})["finish_reason"] == "length"
    long = {"text_input": "a b c", "max_tokens": 100000, "stream": True}
    seen = []

    def on_event(e):
        seen.append(e)
        if len(seen) == 5:
            _assert_holds_blocks(failing_server)

    assert len(failing_server.sse(long, stop_after=8, on_event=on_event)) == 8
    failing_server.wait_pool_idle(timeout=10)
    stream = GrpcStream(failing_server.grpc)
    try:
        stream.send("long", **long)
        for _ in range(3):
            assert not stream.receive()[3]
    finally:
        stream.close(cancel=True)
    failing_server.wait_pool_idle(timeout=10)
