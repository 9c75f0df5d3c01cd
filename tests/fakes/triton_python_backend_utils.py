"""FAKE triton_python_backend_utils (tests only; see tests/fakes/README.md).

Follows the documented Python-backend API that a decoupled model uses: get_model_dir,
get_input_tensor_by_name(request, name).as_numpy(), Tensor, InferenceResponse(output_tensors, error),
TritonError (with CANCELLED), TritonModelException, TRITONSERVER_RESPONSE_COMPLETE_FINAL, and a
request's get_response_sender() with send(response=None, flags=0) and is_cancelled()."""

import threading

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
MODEL_DIR = [None]  # set by the test


class TritonModelException(Exception):
    pass


class TritonError:
    CANCELLED = 10

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = list(output_tensors or []), error

    def tensor(self, name):
        return next((t for t in self.output_tensors if t.name() == name), None)

    def has_error(self):
        return self.error is not None


def get_model_dir():
    return MODEL_DIR[0]


def get_input_tensor_by_name(request, name):
    return request.inputs.get(name)


class ResponseSender:
    def __init__(self):
        self.sent = []  # (response or None, flags)
        self.done = threading.Event()
        self.cancelled = False

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()

    def is_cancelled(self):
        return self.cancelled


class InferenceRequest:
    """Test-side request: inputs by name (numpy arrays)."""

    def __init__(self, **inputs):
        self.inputs = {k: Tensor(k, v) for k, v in inputs.items()}
        self.sender = ResponseSender()

    def get_response_sender(self):
        return self.sender
