"""Triton Python-backend model: TensorRT-LLM's AutoDeploy LLM with the saw_int4 KV cache.

`sawint4 trtllm triton-repo` writes this file as <model>/1/model.py next to a model.yaml whose keys are
``LLM()`` arguments plus ``triton_config`` -- the layout of TensorRT-LLM's own
``triton_backend/all_models/llmapi`` model. What differs from that model: this one registers the
saw_int4 backends in its process before building the LLM, and it builds AutoDeploy's LLM
(``tensorrt_llm._torch.auto_deploy.LLM``) instead of the base one. Its inputs and outputs are a subset
of that model's names (text_input, streaming, sampling_param_*, return_finish_reason -> text_output,
finish_reason). A streamed response carries the text added since the previous one. A bad request gets
an error response naming the input; the model keeps serving.

This file is not imported by trtllm_sawint4 itself: it needs Triton's ``triton_python_backend_utils``.
"""

import asyncio
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

CONFIG_ENV = "LLM_CONFIG_PATH"  # as in TensorRT-LLM's llmapi model: another file name in the model dir

_SAMPLING_INPUTS = (  # (input name, SamplingParams field, type)
    ("sampling_param_max_tokens", "max_tokens", int),
    ("sampling_param_temperature", "temperature", float),
    ("sampling_param_top_p", "top_p", float),
    ("sampling_param_top_k", "top_k", int),
    ("sampling_param_seed", "seed", int),
)


def load_config():
    import yaml

    path = os.path.join(pb_utils.get_model_dir(), os.environ.get(CONFIG_ENV, "model.yaml"))
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if not isinstance(config, dict) or not config.get("model"):
        raise pb_utils.TritonModelException(f"{path}: needs a 'model' entry (a Hugging Face id or checkpoint dir)")
    return config


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _array(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request, name, kind):
    array = _array(request, name)
    if array is None:
        return None
    if array.size != 1:
        raise ValueError(f"{name}: expected one value, got {array.size}")
    return kind(array.reshape(-1)[0])


def parse_request(request):
    """(prompt, SamplingParams kwargs, streaming, return_finish_reason) of one request."""
    text = _array(request, "text_input")
    if text is None or text.size == 0:
        raise ValueError("text_input: missing")
    if text.size != 1:
        raise ValueError(f"text_input: one prompt per request, got {text.size}")
    prompt = _text(text.reshape(-1)[0])
    if not prompt:
        raise ValueError("text_input: empty prompt")
    params = {}
    for name, field, kind in _SAMPLING_INPUTS:
        value = _scalar(request, name, kind)
        if value is not None:
            params[field] = value
    stop = _array(request, "sampling_param_stop")
    if stop is not None and stop.size:
        params["stop"] = [_text(s) for s in stop.reshape(-1)]
    streaming = bool(_scalar(request, "streaming", bool) or False)
    want_reason = bool(_scalar(request, "return_finish_reason", bool) or False)
    return prompt, params, streaming, want_reason


def _response(text, completion, want_reason):
    tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
    if want_reason:
        reason = getattr(completion, "finish_reason", None)
        tensors.append(pb_utils.Tensor("finish_reason", np.array([str(reason).encode("utf-8")], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    @classmethod
    def auto_complete_config(cls, auto_complete_model_config):
        triton_config = load_config().get("triton_config") or {}
        auto_complete_model_config.set_model_transaction_policy(
            dict(decoupled=bool(triton_config.get("decoupled", True))))
        auto_complete_model_config.set_max_batch_size(int(triton_config.get("max_batch_size", 0)))
        return auto_complete_model_config

    def initialize(self, args):
        config = load_config()
        triton_config = config.pop("triton_config", None) or {}
        self.decoupled = bool(triton_config.get("decoupled", True))
        config.pop("backend", None)  # AutoDeploy's LLM sets backend="_autodeploy" itself

        import trtllm_sawint4.integrations.tensorrt_llm as sawint4_trtllm

        self.backends = sawint4_trtllm.register()  # this process; the .pth hook covers the workers
        from tensorrt_llm import SamplingParams
        from tensorrt_llm._torch.auto_deploy import LLM

        self._sampling_params = SamplingParams
        self._llm = LLM(**config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sawint4-trtllm-requests", daemon=True)
        self._thread.start()

    def execute(self, requests):
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._serve(request), self._loop)
        return None

    async def _serve(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        finished_sent = False
        try:
            prompt, params, streaming, want_reason = parse_request(request)
            if streaming and not self.decoupled:
                raise ValueError("streaming: needs triton_config.decoupled: true in model.yaml")
            result = self._llm.generate_async(prompt, self._sampling_params(**params), streaming=streaming)
            last, sent_chars = None, 0
            async for output in result:
                last = output
                if not streaming:
                    continue
                if getattr(sender, "is_cancelled", lambda: False)():
                    result.abort()
                    sender.send(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("request cancelled", pb_utils.TritonError.CANCELLED)), flags=final)
                    finished_sent = True
                    return
                completion = output.outputs[0]
                text = completion.text[sent_chars:]
                sent_chars = len(completion.text)
                sender.send(_response(text, completion, want_reason), flags=final if output.finished else 0)
                finished_sent = bool(output.finished)
            if last is None:
                raise RuntimeError("the LLM returned no output")
            if not streaming:
                sender.send(_response(last.outputs[0].text, last.outputs[0], want_reason), flags=final)
                finished_sent = True
            elif not finished_sent:
                sender.send(flags=final)
                finished_sent = True
        except Exception as e:  # a bad request or a failed generation: answer with an error, keep serving
            if not finished_sent:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"sawint4 trtllm model: {e}")),
                            flags=final)

    def finalize(self):
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.shutdown()
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
