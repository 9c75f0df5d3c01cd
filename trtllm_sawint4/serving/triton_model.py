"""The Triton Python-backend model that serves an engine (decoupled: any number of responses a request).

Runs inside Triton's Python backend stub (it imports `triton_python_backend_utils`, which only exists
there). One `EngineLoop` drives the engine; `execute()` only parses: each request then gets a thread that
submits it and turns its TokenEvents into responses -- one per event when `stream` is true, one in all
otherwise (which is what /generate needs). Every request gets exactly one final response, an error one
for a bad request, and nothing raised in that thread can leave a client without it.

A watcher thread (every 50 ms) aborts requests whose client cancelled or went away (the response
sender's `is_cancelled()`: gRPC cancellation, a closed HTTP connection), which frees their blocks at
once, and, when the launcher's drain file appears (`sawint4 serve` got SIGTERM), aborts everything in
flight and refuses new requests, so that Triton's own shutdown, which waits for in-flight requests, is
quick. Another thread refreshes the pool gauges on Triton's metrics endpoint (sawint4_kv_blocks_free,
...). finalize() shuts the loop down and writes the pool's last stats (stats_file), which is how a test
sees that every block came back.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from .api import RequestError
from .loop import EngineLoop
from .triton_protocol import GenerateRequest, parse_request
from .triton_repo import ServeConfig

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
WATCH_INTERVAL_S = 0.05


@dataclass(eq=False)
class _Active:
    rid: str
    sender: object  # the request's response sender
    spec: GenerateRequest
    cancel_requested: bool = False
    client_gone: bool = False
    # `done` is set (under `lock`) just before the final response goes out. The watcher asks
    # sender.is_cancelled() only under the lock while not done: after the final response Triton frees the
    # response factory that call reads.
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    thread: threading.Thread | None = field(default=None, repr=False)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(message: str):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


def _response(text: str, ids: list[int], finish_reason: str, num_output_tokens: int):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_)),
        pb_utils.Tensor("output_ids", np.array([ids], dtype=np.int32).reshape(1, len(ids))),
        pb_utils.Tensor("finish_reason", np.array([[finish_reason.encode()]], dtype=np.object_)),
        pb_utils.Tensor("num_output_tokens", np.array([[num_output_tokens]], dtype=np.int32)),
    ])


def _load_factory(spec: str):
    """"package.module:function", or "/path/to/file.py:function" (a file outside any installed package)."""
    module_name, _, func_name = spec.rpartition(":")
    if module_name.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(f"sawint4_engine_{abs(hash(module_name))}", module_name)
        if file_spec is None or not os.path.isfile(module_name):
            raise FileNotFoundError(f"engine: no such file {module_name!r}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, func_name)


def build_engine_from_config(cfg: ServeConfig):
    factory = _load_factory(cfg.engine)
    kwargs = dict(model_path=cfg.model_path or None, gguf_file=cfg.gguf_file or None, kv_format=cfg.kv_format,
                  device=cfg.device or None, dtype=cfg.dtype or None)
    if cfg.num_blocks is not None:
        kwargs["num_blocks"] = cfg.num_blocks
    if cfg.max_batch is not None:
        kwargs["max_batch"] = cfg.max_batch
    kwargs.update(cfg.engine_options)
    return factory(**kwargs)


class _Gauges:
    """The pool's state on Triton's metrics endpoint (custom metrics of the Python backend)."""

    NAMES = {"sawint4_kv_blocks_free": ("free_blocks", "free KV-cache blocks"),
             "sawint4_kv_blocks_total": ("total_blocks", "KV-cache blocks in the pool"),
             "sawint4_requests_running": ("num_running", "requests in the running batch"),
             "sawint4_requests_waiting": ("num_waiting", "requests queued or preempted"),
             "sawint4_requests_in_flight": ("in_flight", "requests submitted and not finished")}

    def __init__(self, labels: dict):
        self.metrics = {}
        for name, (key, doc) in self.NAMES.items():
            family = pb_utils.MetricFamily(name=name, description=doc, kind=pb_utils.MetricFamily.GAUGE)
            self.metrics[key] = (family, family.Metric(labels=labels))

    def update(self, stats: dict) -> None:
        for key, (_, metric) in self.metrics.items():
            metric.set(float(stats.get(key, 0)))


class TritonPythonModel:
    def initialize(self, args):
        major = int(np.__version__.split(".")[0])
        if major >= 2:
            # The Python backend of tritonserver 2.51 (nvidia-pytriton 0.7.0) was built for numpy 1: under
            # numpy 2 its tensors arrive zeroed or empty, silently. Refuse to load instead.
            raise RuntimeError(f"numpy {np.__version__} in the model's environment: this Triton Python backend "
                               f"needs numpy<2 (with numpy 2 it silently corrupts tensors); run it from an "
                               f"environment with numpy<2 (see docs/serving_triton.md)")
        model_config = json.loads(args["model_config"])
        self.name = model_config.get("name", "sawint4")
        self.cfg = ServeConfig.from_parameters(model_config.get("parameters", {}))
        t0 = time.perf_counter()
        engine = build_engine_from_config(self.cfg)
        # compile every kernel variant and capture the decode graphs before the server reports ready, not
        # in the first requests' steps (an engine from another factory may have no warm-up)
        warm_up = getattr(engine, "warm_up", None)
        warmed = warm_up() if callable(warm_up) else None
        self.loop = EngineLoop(engine)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._draining = False
        self._stop = threading.Event()
        self._gauges = None
        try:
            self._gauges = _Gauges({"model": self.name, "kv_format": self.cfg.kv_format})
        except Exception as e:  # noqa: BLE001 - metrics disabled in this server: serve without them
            pb_utils.Logger.log_warn(f"sawint4: no pool gauges on the metrics endpoint ({type(e).__name__}: {e})")
        stats = self.loop.stats()
        if self._gauges:
            self._gauges.update(stats)
        self._threads = [threading.Thread(target=self._watch, name="sawint4-watcher", daemon=True)]
        if self._gauges:
            self._threads.append(threading.Thread(target=self._publish, name="sawint4-gauges", daemon=True))
        for t in self._threads:
            t.start()
        pb_utils.Logger.log_info(
            f"sawint4 engine ready in {time.perf_counter() - t0:.1f}s: kv_format={self.cfg.kv_format} "
            f"blocks={stats.get('total_blocks')} max_seq_len={stats.get('max_seq_len')} numpy={np.__version__}"
            + ("" if warmed is None else f"; warm-up {warmed['steps']} steps, {warmed['graph_captures']} decode "
                                         f"graphs, {warmed['seconds']:.1f}s"))

    # ---- requests ------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            self._start(request)
        return None  # decoupled: responses go through each request's sender

    def _start(self, request) -> None:
        sender = request.get_response_sender()
        try:
            if self._draining:
                raise RequestError("the server is shutting down; it takes no new requests")
            spec = parse_request(lambda name: _input(request, name), request.parameters())
        except RequestError as e:
            self._send(sender, _error(str(e)), final=True)
            return
        except Exception as e:  # noqa: BLE001 - any parsing bug still answers the client
            pb_utils.Logger.log_error(f"sawint4: cannot read a request: {type(e).__name__}: {e}")
            self._send(sender, _error(f"cannot read the request: {type(e).__name__}: {e}"), final=True)
            return
        rid = f"{next(self._ids)}:{request.request_id()}"
        act = _Active(rid, sender, spec)
        with self._lock:
            self._active[rid] = act
        act.thread = threading.Thread(target=self._serve, args=(act,), name=f"sawint4-req-{rid}", daemon=True)
        act.thread.start()

    def _serve(self, act: _Active) -> None:
        try:
            try:
                events = self.loop.submit(act.rid, act.spec.prompt, act.spec.params)
            except (RequestError, RuntimeError) as e:  # a bad request; or the loop is shut down
                self._finish(act, _error(str(e)))
                return
            if act.cancel_requested:  # cancelled (or drained) while it was being submitted
                self.loop.cancel(act.rid)
            self._pump(act, events)
        except Exception as e:  # noqa: BLE001
            pb_utils.Logger.log_error(f"sawint4: request {act.rid} failed: {type(e).__name__}: {e}")
            self._finish(act, _error(f"internal error: {type(e).__name__}: {e}"))
        finally:
            self._finish(act, None)  # a no-op once the final response went out
            with self._lock:
                self._active.pop(act.rid, None)

    def _pump(self, act: _Active, events) -> None:
        """Events -> responses, until the request's final event."""
        spec, texts, ids, n = act.spec, [], [], 0
        for ev in events:
            n += len(ev.token_ids)
            if ev.finished and ev.finish_reason == "error":
                self._finish(act, _error(f"generation failed: {ev.error}"))
            elif ev.finished and ev.finish_reason == "abort" and not spec.stream:
                why = "the server is shutting down" if self._draining else "cancelled"
                self._finish(act, _error(f"request aborted ({why})"))
            elif spec.stream:
                if ev.finished:
                    self._finish(act, _response(ev.text, ev.token_ids, ev.finish_reason or "", n))
                elif ev.token_ids or ev.text:
                    self._deliver(act, _response(ev.text, ev.token_ids, "", n))
            else:
                texts.append(ev.text)
                ids += ev.token_ids
                if ev.finished:
                    text = "".join(texts) if spec.exclude_input_in_output else spec.prompt + "".join(texts)
                    self._finish(act, _response(text, ids, ev.finish_reason or "", n))
            if ev.finished:
                return

    def _deliver(self, act: _Active, response) -> None:
        """A response that is not the last one."""
        if not act.client_gone and not self._send(act.sender, response, final=False):
            act.client_gone = True  # nobody to send to: stop generating for it
            self.loop.cancel(act.rid)

    def _finish(self, act: _Active, response) -> None:
        """The final response (None: the final flag alone), once per request."""
        with act.lock:
            if act.done:
                return
            act.done = True
        if not act.client_gone:
            self._send(act.sender, response, final=True)

    @staticmethod
    def _send(sender, response, final: bool) -> bool:
        try:
            if response is None:
                sender.send(flags=FINAL)
            else:
                sender.send(response, flags=FINAL if final else 0)
            return True
        except Exception:  # noqa: BLE001 - the client cancelled or disconnected
            return False

    # ---- cancellation, drain, gauges -----------------------------------------------------------
    def _watch(self) -> None:
        """Cancellations and the drain file, every WATCH_INTERVAL_S."""
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                if self.cfg.drain_file and not self._draining and os.path.exists(self.cfg.drain_file):
                    self._drain()
                with self._lock:
                    active = list(self._active.values())
                for act in active:
                    if act.cancel_requested:
                        continue
                    with act.lock:
                        cancelled = not act.done and act.sender.is_cancelled()
                    if cancelled:
                        act.cancel_requested = True
                        self.loop.cancel(act.rid)
            except Exception as e:  # noqa: BLE001 - the watcher must outlive any one failure
                pb_utils.Logger.log_error(f"sawint4 watcher: {type(e).__name__}: {e}")

    def _publish(self) -> None:
        """The pool gauges, every stats_interval_s (its own thread: stats() waits for the engine's step)."""
        while not self._stop.wait(self.cfg.stats_interval_s):
            try:
                self._gauges.update(self.loop.stats())
            except Exception as e:  # noqa: BLE001
                pb_utils.Logger.log_error(f"sawint4 gauges: {type(e).__name__}: {e}")

    def _drain(self) -> None:
        with self._lock:
            self._draining = True
            active = list(self._active.values())
        pb_utils.Logger.log_info(f"sawint4: draining, aborting {len(active)} request(s) in flight")
        for act in active:
            act.cancel_requested = True
            self.loop.cancel(act.rid)

    def finalize(self):
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.loop.shutdown(abort=True, timeout=30)
        with self._lock:
            threads = [a.thread for a in self._active.values() if a.thread is not None]
        for t in threads:
            t.join(5)
        stats = self.loop.stats()
        stats["requests_unanswered"] = len(self._active)
        line = json.dumps(stats, sort_keys=True, default=str)
        pb_utils.Logger.log_info(f"sawint4 finalize: {line}")
        if self.cfg.stats_file:
            tmp = f"{self.cfg.stats_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(line + "\n")
            os.replace(tmp, self.cfg.stats_file)
