"""A TEST DOUBLE of the engine, for tests of the Triton server's own error handling only.

It has no model and no KV cache: it streams the prompt's words back, one per step, and fails on purpose
(a prompt with FAIL_IN_STEP makes step() raise after two tokens; one with FAIL_IN_ADD makes add_request
raise something that is not a RequestError). Generation through the server is tested with the real
engine (tests/test_serving_triton_server.py); this file is loaded by the served model through
`sawint4 serve --engine tests/triton_engine_doubles.py:make_failing_engine`.
"""

from __future__ import annotations

import time

from trtllm_sawint4.serving.api import RequestError, SamplingParams, TokenEvent

POOL = 8


class ScriptedFailingEngine:
    def __init__(self):
        self.requests: dict[str, list] = {}
        self.events: list[TokenEvent] = []

    def add_request(self, request_id: str, prompt, params: SamplingParams) -> None:
        try:
            params.validate()
        except ValueError as e:
            raise RequestError(str(e)) from None
        if "FAIL_IN_ADD" in prompt:
            raise KeyError("scripted failure in add_request")
        self.requests[request_id] = [prompt.split(), 0, params.max_tokens, "FAIL_IN_STEP" in prompt]

    def abort(self, request_id: str) -> None:
        if self.requests.pop(request_id, None) is not None:
            self.events.append(TokenEvent(request_id, [], "", finished=True, finish_reason="abort"))

    def step(self) -> list[TokenEvent]:
        time.sleep(0.02)
        events, self.events = self.events, []
        for rid, state in list(self.requests.items()):
            words, n, max_tokens, fail = state
            if fail and n == 2:
                raise RuntimeError("scripted engine failure")
            state[1] = n + 1
            done = state[1] >= max_tokens
            events.append(TokenEvent(rid, [n], words[n % len(words)] + " ", finished=done,
                                     finish_reason="length" if done else None))
            if done:
                del self.requests[rid]
        return events

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.events)

    def stats(self) -> dict:
        return dict(num_running=len(self.requests), num_waiting=0, free_blocks=POOL - len(self.requests),
                    total_blocks=POOL)


def make_failing_engine(**_build_engine_kwargs) -> ScriptedFailingEngine:
    return ScriptedFailingEngine()
