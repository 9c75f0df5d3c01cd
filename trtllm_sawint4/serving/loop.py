"""`EngineLoop`: one background thread drives an `Engine`; any thread submits, streams and cancels.

    loop = EngineLoop(engine)
    for event in loop.submit("r1", "Hello", SamplingParams(max_tokens=8)):   # RequestError raised here
        print(event.text, end="")
    loop.shutdown()

Every engine call happens under one lock, so the engine itself stays single-threaded. Callers of
submit/cancel/stats/shutdown are let in before the next step: a released Lock is not handed to a waiting
thread, so without that the loop thread, which takes the lock again at once, keeps it for many steps
while a woken caller waits for a CPU (on a busy machine, seconds). `submit` validates
synchronously (the engine's add_request runs in the caller's thread, under the lock) and returns a blocking
iterator that ends after the request's final event. Closing that iterator early (a client that disconnects)
cancels the request, which frees its blocks at once.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator

from .api import Engine, SamplingParams, TokenEvent


class EngineLoop:
    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._callers = 0  # threads waiting for self._lock (not the loop thread); under self._callers_lock
        self._callers_lock = threading.Lock()
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._closed = False
        self._idle_wait_s = idle_wait_s
        self.steps = 0
        self.step_errors = 0
        self._thread = threading.Thread(target=self._run, name="sawint4-engine-loop", daemon=True)
        self._thread.start()

    # ---- any thread ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _engine_lock(self):
        """self._lock for a caller: counted while it waits, so the loop thread lets it in before its next step."""
        with self._callers_lock:
            self._callers += 1
        try:
            self._lock.acquire()
        finally:
            with self._callers_lock:
                self._callers -= 1
        try:
            yield
        finally:
            self._lock.release()

    def submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Iterator[TokenEvent]:
        """Queue a request; returns an iterator of its events (blocking), ending after the final one.

        Raises RequestError (bad request) before returning; RuntimeError once the loop is shut down."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        with self._engine_lock():
            if self._closed:
                raise RuntimeError("EngineLoop is shut down; it takes no more requests")
            if request_id in self._queues:
                from .api import RequestError
                raise RequestError(f"request_id {request_id!r} is already in flight")
            self.engine.add_request(request_id, prompt, params)  # raises RequestError: nothing registered
            self._queues[request_id] = q
            self._wake.notify()
        return self._events(request_id, q)

    def _events(self, request_id: str, q: queue.SimpleQueue) -> Iterator[TokenEvent]:
        finished = False
        try:
            while not finished:
                event = q.get()
                finished = event.finished
                yield event
        finally:
            if not finished:  # the consumer went away: free the request's blocks now
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        """Abort a request (no-op if unknown or finished); its iterator still gets the final "abort" event."""
        with self._engine_lock():
            if request_id in self._queues:
                self.engine.abort(request_id)
                self._wake.notify()

    def stats(self) -> dict:
        with self._engine_lock():
            out = dict(self.engine.stats())
        out.update(loop_steps=self.steps, loop_step_errors=self.step_errors, in_flight=len(self._queues))
        return out

    def shutdown(self, abort: bool = True, timeout: float | None = 30.0) -> None:
        """Stop taking requests; abort in-flight ones (abort=True) or let them finish; join the thread."""
        with self._engine_lock():
            self._closed = True
            if abort:
                for request_id in list(self._queues):
                    self.engine.abort(request_id)
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            while self._callers:  # let the callers waiting for the lock in first (each holds it briefly)
                time.sleep(0.0002)
            with self._lock:
                while not self.engine.has_unfinished():
                    if self._closed:
                        return
                    self._wake.wait(self._idle_wait_s)
                try:
                    events = self.engine.step()
                except Exception as e:  # an engine failure ends the requests in flight, not the loop
                    self.step_errors += 1
                    events = self._fail_all(e)
                self.steps += 1
                for event in events:
                    q = self._queues.get(event.request_id)
                    if q is None:
                        continue
                    if event.finished:
                        del self._queues[event.request_id]
                    q.put(event)

    def _fail_all(self, error: Exception) -> list[TokenEvent]:
        message = f"{type(error).__name__}: {error}"
        events = []
        for request_id in list(self._queues):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: BLE001 - the engine is already failing; the client gets the error below
                pass
            events.append(TokenEvent(request_id, [], "", finished=True, finish_reason="error", error=message))
        return events
