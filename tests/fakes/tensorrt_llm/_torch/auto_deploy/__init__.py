"""FAKE tensorrt_llm._torch.auto_deploy (tests only): `LLM` records its arguments and produces canned
text, following the documented LLM API (generate, generate_async with streaming, shutdown)."""

import asyncio

CREATED = []  # every LLM built, for the tests to inspect


class _Completion:
    def __init__(self, text, finish_reason=None):
        self.text = text
        self.finish_reason = finish_reason


class _Output:
    def __init__(self, text, finished):
        self.outputs = [_Completion(text, "length" if finished else None)]
        self.finished = finished


class _Result:
    """What LLM.generate_async returns: an async iterator of RequestOutput-like objects."""

    def __init__(self, words, streaming):
        self._words, self._streaming, self.aborted = words, streaming, False

    def abort(self):
        self.aborted = True

    async def _gen(self):
        text = ""
        for i, word in enumerate(self._words):
            await asyncio.sleep(0)
            text += word
            last = i == len(self._words) - 1
            if self._streaming or last:
                yield _Output(text, last)
            if self.aborted:
                return

    def __aiter__(self):
        return self._gen()


class LLM:
    def __init__(self, **kwargs):
        if kwargs.get("fail"):
            raise RuntimeError("fake LLM asked to fail")
        self.kwargs = kwargs
        self.shut_down = False
        CREATED.append(self)

    def _words(self, prompt, sampling_params):
        n = getattr(sampling_params, "max_tokens", 3)
        return [f" w{i}" for i in range(n)]

    def generate(self, prompts, sampling_params=None):
        return [_Output("".join(self._words(p, sampling_params)), True) for p in prompts]

    def generate_async(self, prompt, sampling_params=None, streaming=False):
        if prompt == "explode":
            raise RuntimeError("generation failed")
        return _Result(self._words(prompt, sampling_params), streaming)

    def shutdown(self):
        self.shut_down = True
